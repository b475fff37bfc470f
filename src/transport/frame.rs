//! A frame is a big-endian `u32` length, then that many bytes of `codec` output (whose
//! first byte is the format version). Requests carry `(id, PeerRequest)`, responses
//! `(id, PeerResponse)`; who sent a request is known from the connection (its TLS
//! certificate), never from the frame.

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame any configuration may allow: the codec bounds what a length prefix
/// inside a record can make it allocate only for records up to this size.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// Room in a frame for what surrounds the payload proper (ids, enum tags, Raft's vote
/// and log ids, a snapshot chunk's metadata).
pub const FRAME_OVERHEAD_BYTES: usize = 64 << 10;
/// An encoded cross-DC event at most: names are at most 64 bytes, an idempotency key 128,
/// a stock row names up to 16 DCs (the test below encodes the largest ones).
pub const EVENT_BYTES_MAX: usize = 2048;
/// An encoded client request at most (same rules).
pub const REQUEST_BYTES_MAX: usize = 1024;
/// What a frame's buffer starts with before its bytes arrive.
const READ_CHUNK_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R, max_bytes: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max_bytes {
        return Err(FrameError::TooLarge(len, max_bytes));
    }
    // Grown as the bytes arrive, not sized by the prefix: a peer that announces 64 MiB
    // and sends 10 bytes makes us hold about 10 bytes (at most twice what arrived).
    // A frame that fits the first chunk (every heartbeat and most entries) is read into
    // a buffer of exactly its size.
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK_BYTES));
    while buf.len() < len {
        if buf.len() == buf.capacity() {
            // Doubles, never past the frame's length.
            buf.reserve_exact((len - buf.len()).min(buf.capacity()));
        }
        let room = (buf.capacity() - buf.len()).min(len - buf.len());
        if (&mut *r).take(room as u64).read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(buf)
}

/// Writes one frame into `w` (usually buffered: the caller flushes).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge(payload.len(), u32::MAX as usize))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::codec;
    use crate::domain::{Change, Command, Event, Order, OrderStatus, Request, StockRow};

    fn name(c: char) -> String {
        std::iter::repeat_n(c, crate::domain::validate::NAME_LEN_MAX).collect()
    }

    #[test]
    fn the_largest_events_and_requests_fit_their_bounds() {
        let key = Some("k".repeat(crate::domain::validate::IDEMPOTENCY_KEY_LEN_MAX));
        let order = Order {
            id: name('i'),
            session: name('s'),
            user: name('u'),
            sku: name('k'),
            qty: u32::MAX,
            status: OrderStatus::Cancelled,
            dc: name('d'),
            hlc: u64::MAX,
            idempotency_key: key.clone(),
        };
        let sent: BTreeMap<String, u64> = (0..16).map(|i| (format!("{i:0>63}"), u64::MAX)).collect();
        let row = StockRow { stocked: u64::MAX, sold: u64::MAX, released: u64::MAX, sent };
        for change in [Change::Order(order), Change::Stock { sku: name('k'), row }] {
            let e = Event { seq: u64::MAX, origin: name('o'), hlc: u64::MAX, change };
            let n = codec::encode(&e).len();
            assert!(n <= EVENT_BYTES_MAX, "an event of {n} bytes");
        }
        let cmd = Command::PlaceOrder { id: name('i'), session: name('s'), sku: name('k'), qty: u32::MAX, dc: name('d'), hlc: u64::MAX, refresh_session: true };
        let n = codec::encode(&Request::new(cmd, key)).len();
        assert!(n <= REQUEST_BYTES_MAX, "a request of {n} bytes");
    }

    /// A frame announcing 64 MiB that carries 10 bytes: refused as truncated, and the
    /// buffer never grew past what arrived.
    #[tokio::test]
    async fn a_truncated_frame_holds_only_what_arrived() {
        let mut bytes = (64u32 << 20).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1; 10]);
        crate::alloc_probe::reset();
        let r = read_frame(&mut &bytes[..], 64 << 20).await;
        assert!(matches!(r, Err(FrameError::Io(_))), "{r:?}");
        let peak = crate::alloc_probe::peak();
        assert!(peak <= READ_CHUNK_BYTES, "a 14-byte frame allocated a block of {peak} bytes");
    }

    /// A frame larger than the first chunk, arriving in pieces, is read whole.
    #[tokio::test]
    async fn a_large_frame_in_pieces_is_read_whole() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut a, mut b) = tokio::io::duplex(4096);
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            write_frame(&mut a, &sent).await.unwrap();
            write_frame(&mut a, b"next").await.unwrap();
        });
        assert_eq!(read_frame(&mut b, 1 << 20).await.unwrap(), payload);
        assert_eq!(read_frame(&mut b, 1 << 20).await.unwrap(), b"next");
        writer.await.unwrap();
    }

    fn peer_frame() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let valid = codec::encode(&(7u64, 3u64, crate::transport::PeerRequest::AskStock { sku: "sku-1".into(), want: 3 }));
        let valid2 = valid.clone();
        prop_oneof![
            // Noise after the version byte.
            prop::collection::vec(any::<u8>(), 0..512).prop_map(|mut v| {
                v.insert(0, codec::FORMAT_VERSION);
                v
            }),
            // A valid request with bytes changed or appended.
            (prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), prop::collection::vec(any::<u8>(), 0..16)).prop_map(
                move |(edits, tail)| {
                    let mut v = valid.clone();
                    for (i, x) in edits {
                        let at = i.index(v.len());
                        v[at] = x;
                    }
                    v.extend(tail);
                    v
                }
            ),
            // A valid request with a large length prefix spliced in (where a string's or a
            // sequence's length may be read).
            (any::<prop::sample::Index>(), any::<u32>(), any::<bool>()).prop_map(move |(i, n, long)| {
                let mut v = valid2.clone();
                let at = 1 + i.index(v.len() - 1);
                let mut prefix = if long { vec![0xfd] } else { vec![0xfc] };
                if long {
                    prefix.extend_from_slice(&(u64::from(n) << 8).to_le_bytes());
                } else {
                    prefix.extend_from_slice(&n.to_le_bytes());
                }
                v.splice(at..at, prefix);
                v
            }),
            prop::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 4000, ..proptest::prelude::ProptestConfig::default() })]

        /// Random bytes as a peer request: no panic, and no block larger than the codec's
        /// limit for that input (or serde's own cap on preallocating a sequence, 1 MiB).
        #[test]
        fn peer_request_decoding_is_total_and_bounded(bytes in peer_frame()) {
            crate::alloc_probe::reset();
            let _ = codec::decode::<(u64, u64, crate::transport::PeerRequest)>(&bytes);
            let peak = crate::alloc_probe::peak();
            let bound = codec::decode_limit(bytes.len()).unwrap().max(1 << 20);
            proptest::prop_assert!(peak <= bound, "{} bytes made a block of {peak}", bytes.len());
        }

        /// Random bytes as a frame stream: no panic; a frame is at most the limit and
        /// holds no more memory than twice what arrived.
        #[test]
        fn frame_reading_is_total_and_bounded(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = &bytes[..];
                crate::alloc_probe::reset();
                while let Ok(f) = read_frame(&mut r, 1 << 20).await {
                    proptest::prop_assert!(f.len() <= 1 << 20);
                }
                let peak = crate::alloc_probe::peak();
                proptest::prop_assert!(peak <= READ_CHUNK_BYTES.max(2 * bytes.len()), "{} bytes made a block of {peak}", bytes.len());
                Ok(())
            })?;
        }
    }
}
