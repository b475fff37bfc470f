//! The one place that knows the wire and disk format: serde + bincode 2 (`standard()`),
//! behind a leading format-version byte so a newer node can recognise — and keep
//! reading — an older node's bytes during a rolling upgrade.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Format version written in front of every frame and stored record.
///
/// 2: cancels carry the buyer's session, idempotency records and duplicate sets their
/// time of writing, and `Command::Expire` exists. Version 1 records are not decodable
/// as version 2 types (bincode is positional), so they are refused by version, with a
/// message, rather than misread.
pub const FORMAT_VERSION: u8 = 2;
/// Oldest version this build still reads.
pub const FORMAT_VERSION_MIN: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("unsupported format version {0} (this node reads {FORMAT_VERSION_MIN}..={FORMAT_VERSION})")]
    Version(u8),
    #[error("decode: {0}")]
    Decode(String),
    #[error("{0} trailing bytes after record")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` with the version byte in front.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Encoding our own in-memory types cannot fail (no maps with non-string keys issue in
    // bincode, no I/O): a failure is a programming error.
    let body = bincode::serde::encode_to_vec(value, config()).expect("bincode encode of agora type");
    out.extend_from_slice(&body);
    out
}

/// What the decoder may account per byte of input. bincode counts a value's in-memory size
/// before reading it (8 bytes for a `u64` whose varint is 1 byte, 16 for a `u128`), and a
/// string's or byte buffer's full length before allocating it. A valid record never
/// accounts more than 16 bytes per input byte; a length prefix that claims more than
/// that is a lie and is refused before anything is allocated.
pub const CLAIM_PER_INPUT_BYTE: usize = 16;

/// The smallest decode limit (a short record may still hold a few small integers).
const LIMIT_MIN: usize = 64 << 10;

/// The decode limit for an input of `len` bytes: `CLAIM_PER_INPUT_BYTE` times the
/// input, rounded up to the next of a few fixed steps (bincode's limit is a const
/// generic, so each step is a separate instantiation); `None` (no limit) only for inputs
/// over 64 MiB, which only local disk holds (a large snapshot) — peer frames are capped
/// below that by `limits.peer_frame_bytes_max`.
pub fn decode_limit(len: usize) -> Option<usize> {
    let need = len.saturating_mul(CLAIM_PER_INPUT_BYTE).max(LIMIT_MIN);
    LIMIT_STEPS.iter().copied().find(|&l| l >= need)
}

const LIMIT_STEPS: [usize; 6] = [LIMIT_MIN, 1 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30];

/// Decodes a versioned record; the whole slice must be consumed. A length prefix inside
/// the record can make the decoder allocate at most [`decode_limit`] of the input's
/// length (64 KiB for anything up to 4 KiB), never what the prefix claims.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::Version(version));
    }
    let c = config();
    let r = match decode_limit(body.len()) {
        Some(l) if l <= LIMIT_STEPS[0] => decode_with(body, c.with_limit::<{ LIMIT_STEPS[0] }>()),
        Some(l) if l <= LIMIT_STEPS[1] => decode_with(body, c.with_limit::<{ LIMIT_STEPS[1] }>()),
        Some(l) if l <= LIMIT_STEPS[2] => decode_with(body, c.with_limit::<{ LIMIT_STEPS[2] }>()),
        Some(l) if l <= LIMIT_STEPS[3] => decode_with(body, c.with_limit::<{ LIMIT_STEPS[3] }>()),
        Some(l) if l <= LIMIT_STEPS[4] => decode_with(body, c.with_limit::<{ LIMIT_STEPS[4] }>()),
        Some(_) => decode_with(body, c.with_limit::<{ LIMIT_STEPS[5] }>()),
        None => decode_with(body, c),
    };
    let (value, used) = r?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

fn decode_with<T: DeserializeOwned, C: bincode::config::Config>(body: &[u8], cfg: C) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice::<T, _>(body, cfg).map_err(|e| CodecError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let v = (7u64, "sku-1".to_string(), Some(3u32));
        let bytes = encode(&v);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<(u64, String, Option<u32>)>(&bytes).unwrap(), v);
        assert!(matches!(decode::<(u64, String)>(&[]), Err(CodecError::Empty)));
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert!(matches!(decode::<(u64, String, Option<u32>)>(&wrong), Err(CodecError::Version(99))));
        assert!(decode::<(u64, String, Option<u32>)>(&bytes[..bytes.len() - 2]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(decode::<(u64, String, Option<u32>)>(&long), Err(CodecError::Trailing(1))));
    }

    #[test]
    fn the_limit_follows_the_input() {
        assert_eq!(decode_limit(0), Some(64 << 10));
        assert_eq!(decode_limit(4 << 10), Some(64 << 10));
        assert_eq!(decode_limit(4 << 20), Some(64 << 20));
        assert_eq!(decode_limit(64 << 20), Some(1 << 30));
        assert_eq!(decode_limit((64 << 20) + 1), None);
    }

    /// A few bytes claiming a 250 MB string: refused before the string is allocated.
    /// The test build's allocator records the largest block asked for meanwhile.
    #[test]
    fn a_short_input_claiming_a_huge_length_allocates_nothing() {
        // version, then a bincode varint: 0xfc + u32 LE = 250_000_000 bytes of string.
        let mut bytes = vec![FORMAT_VERSION, 0xfc];
        bytes.extend_from_slice(&250_000_000u32.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        crate::alloc_probe::reset();
        let r = decode::<String>(&bytes);
        assert!(matches!(&r, Err(CodecError::Decode(m)) if m.contains("Limit")), "{r:?}");
        // Also inside a peer request, as a frame would carry it.
        let mut frame = encode(&(7u64, 3u64, crate::transport::PeerRequest::AskStock { sku: "x".into(), want: 1 }));
        let at = frame.len() - 3; // the sku's length byte (1) and "x", then `want`
        frame.truncate(at);
        frame.push(0xfc);
        frame.extend_from_slice(&250_000_000u32.to_le_bytes());
        frame.extend_from_slice(b"x");
        assert!(decode::<(u64, u64, crate::transport::PeerRequest)>(&frame).is_err());
        let peak = crate::alloc_probe::peak();
        assert!(peak < 1 << 20, "decoding 10 bytes allocated a block of {peak} bytes");
    }
}
