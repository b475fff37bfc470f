//! Random identifiers: session tokens, order ids and admin tokens.

/// A random 128-bit value in hex.
pub fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The shard (of `shards`) that holds an entity: sessions by token, inventory by SKU,
/// orders by id. The first 8 bytes of the key's SHA-256, so every node of every DC and
/// every build agree (std's hasher promises neither).
pub fn shard_of(key: &str, shards: u16) -> u16 {
    use sha2::{Digest, Sha256};
    if shards <= 1 {
        return 0;
    }
    let h = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    let n = u64::from_be_bytes(first) % u64::from(shards);
    u16::try_from(n).expect("below the shard count, a u16")
}

/// A new order id of DC `dc` that [`shard_of`] maps to `shard`: an order lives in its
/// SKU's shard, and its id must lead there. Random ids are drawn until one lands (on
/// average `shards` draws).
pub fn order_id(dc: &str, shard: u16, shards: u16) -> String {
    loop {
        let id = format!("{dc}-{}", random_hex());
        if shard_of(&id, shards) == shard {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys spread over every shard, the mapping never changes, and an order id leads
    /// to the shard it was made for.
    #[test]
    fn keys_spread_over_all_shards_and_order_ids_land_in_theirs() {
        let mut seen = [0u32; 6];
        for i in 0..600 {
            let s = shard_of(&format!("sku-{i}"), 6);
            seen[usize::from(s)] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "uneven spread: {seen:?}");
        assert_eq!(shard_of("sku-1", 6), shard_of("sku-1", 6));
        assert_eq!(shard_of("sku-1", 1), 0);
        // Pinned: a change here would move every entity of an existing cluster.
        assert_eq!([shard_of("sku-1", 6), shard_of("dc1-abc", 6), shard_of("", 64)], PINNED);
        for shard in 0..6 {
            let id = order_id("dc2", shard, 6);
            assert!(id.starts_with("dc2-") && id.len() == 36, "{id}");
            assert_eq!(shard_of(&id, 6), shard);
        }
    }
    const PINNED: [u16; 3] = [1, 2, 20];
}
