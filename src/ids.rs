//! Random identifiers: session tokens, order ids and admin tokens.

/// A random 128-bit value in hex.
pub fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The shards entities live in: `first..count`. All of a DC's shards (`first` 0), or —
/// with shards on subsets of the nodes, where shard 0 is on every node — all but shard 0,
/// which then holds only the DC's own settings (`ClusterConfig::spread`). A plain count
/// is every shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub count: u16,
    pub first: u16,
}

impl From<u16> for Spread {
    fn from(count: u16) -> Self {
        Spread { count, first: 0 }
    }
}

/// The shard (of the spread) that holds an entity: sessions by token, inventory by SKU,
/// orders by id. The first 8 bytes of the key's SHA-256, so every node of every DC and
/// every build agree (std's hasher promises neither).
pub fn shard_of(key: &str, spread: impl Into<Spread>) -> u16 {
    use sha2::{Digest, Sha256};
    let Spread { count, first } = spread.into();
    let first = first.min(count.saturating_sub(1));
    let n = count.saturating_sub(first);
    if n <= 1 {
        return first;
    }
    let h = Sha256::digest(key.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&h[..8]);
    let k = u64::from_be_bytes(head) % u64::from(n);
    first + u16::try_from(k).expect("below the shard count, a u16")
}

/// A new order id of DC `dc` that [`shard_of`] maps to `shard`: an order lives in its
/// SKU's shard, and its id must lead there. Random suffixes are drawn until one lands
/// (on average `shards` draws).
///
/// The id is `{dc}-` and 32 hex digits: the wall-clock milliseconds (12 digits), then 80
/// random bits. Leading with the time makes a DC's new orders sort after its older ones,
/// so the store appends them at the end of its key order instead of into a random page
/// of a tree that grows with every order ever taken: the pages that take writes stay few
/// and hot, and pages of old orders are written once and left alone. The random part
/// keeps ids unguessable and unique.
pub fn order_id(dc: &str, shard: u16, spread: impl Into<Spread>) -> String {
    order_id_at(dc, shard, spread.into(), crate::hlc::wall_ms())
}

fn order_id_at(dc: &str, shard: u16, spread: Spread, now_ms: u64) -> String {
    // A shard outside the spread would never be drawn: the nearest one inside is.
    let shard = shard.clamp(spread.first.min(spread.count.saturating_sub(1)), spread.count.saturating_sub(1));
    // 12 hex digits hold milliseconds until the year 10889; masking keeps the width fixed
    // (and so the order) for any clock value.
    let time = now_ms & 0xffff_ffff_ffff;
    loop {
        let random = rand::random::<u128>() & ((1u128 << 80) - 1);
        let id = format!("{dc}-{time:012x}{random:020x}");
        if shard_of(&id, spread) == shard {
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

    /// Spread over all but shard 0, keys land in shards 1 to 5 and never in 0; an order id
    /// leads to its shard; one shard in all holds everything.
    #[test]
    fn a_spread_past_shard_0_leaves_it_empty() {
        let spread = Spread { count: 6, first: 1 };
        let mut seen = [0u32; 6];
        for i in 0..600 {
            seen[usize::from(shard_of(&format!("sku-{i}"), spread))] += 1;
        }
        assert!(seen[0] == 0 && seen[1..].iter().all(|n| *n > 50), "{seen:?}");
        for shard in 1..6 {
            assert_eq!(shard_of(&order_id("dc1", shard, spread), spread), shard);
        }
        assert_eq!(shard_of("x", Spread { count: 1, first: 1 }), 0, "a single shard holds all");
        assert_eq!(shard_of("x", Spread { count: 2, first: 1 }), 1);
    }

    /// A later millisecond's id sorts after an earlier one's, as the store's key order
    /// sees it, whatever the random parts; ids of one millisecond still differ.
    #[test]
    fn order_ids_sort_by_time_and_stay_unique() {
        let mut ids: Vec<String> = (0..200u64).map(|ms| order_id_at("dc1", 0, 1.into(), 1_764_500_000_000 + ms / 4)).collect();
        let made = ids.clone();
        ids.sort();
        assert_eq!(ids.iter().map(|id| &id[..16]).collect::<Vec<_>>(), made.iter().map(|id| &id[..16]).collect::<Vec<_>>());
        ids.dedup();
        assert_eq!(ids.len(), 200);
        assert!(order_id_at("dc1", 0, 1.into(), 0xfff_ffff_ffff_ffff).len() == 36, "a clock past 48 bits keeps the width");
        assert!(order_id_at("dc1", 0, 1.into(), 9) < order_id_at("dc1", 0, 1.into(), 10));
    }
}
