//! The one place that knows the wire and disk format: serde + bincode 2 (`standard()`),
//! behind a leading format-version byte so a newer node can recognise — and keep
//! reading — an older node's bytes during a rolling upgrade.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Format version written in front of every frame and stored record.
pub const FORMAT_VERSION: u8 = 1;
/// Oldest version this build still reads.
pub const FORMAT_VERSION_MIN: u8 = 1;

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

/// Decodes a versioned record; the whole slice must be consumed. `max_bytes` bounds what a
/// length prefix inside the record may make the decoder allocate.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::Version(version));
    }
    // The limit stops a hostile length prefix from allocating more than the input holds.
    let cfg = config().with_limit::<{ 256 << 20 }>();
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, cfg).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
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
}
