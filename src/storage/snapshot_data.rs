//! Snapshot data: what a leader sends, a follower receives into a file, and every node
//! keeps on disk. It is written, checked and read as a stream, a frame at a time, so
//! building, sending, receiving and installing a snapshot hold a few megabytes of it in
//! memory however large the state is.
//!
//! Layout: a tag, the body's length (u64 big-endian), the SHA-256 of the body, then the
//! body. What the body holds is a stream of frames, each a kind byte (put or delete), the
//! key's and the value's lengths (u32 big-endian; a delete has no value), the key, the
//! value. Frames apply in order, a later one for a key replacing an earlier one: a build
//! writes the records as it scans them, then puts back (or deletes) every key written
//! while it scanned, so the data is the state of exactly one applied entry.
//!
//! - Format 4 (`AGSNAP04`, written now): the frame stream is cut into blocks of at most
//!   [`BLOCK_RAW`] bytes, each stored as its raw length and compressed length (u32
//!   big-endian) and a zstd frame. Records are ids, tokens and names that repeat: a
//!   block takes several times fewer bytes on disk and on the wire. A block is checked
//!   and decompressed on its own, into a buffer bounded by [`BLOCK_RAW_MAX`]; frames
//!   may run across blocks.
//! - Format 3 (`AGSNAP03`): the frame stream itself is the body. Still read and
//!   accepted, so that a data dir or a leader from before format 4 still works.
//!
//! The checksum sits before the body yet covers it all (as stored): a writer leaves the
//! header blank and fills it in when the body is done (hence `Seek`).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};

pub const TAG: &[u8; 8] = b"AGSNAP04";
/// The uncompressed format, still read.
const TAG_PLAIN: &[u8; 8] = b"AGSNAP03";
pub const HEADER_LEN: usize = 8 + 8 + 32;
/// A block's fixed part: raw length, compressed length.
const BLOCK_HEAD: usize = 4 + 4;
/// The raw bytes a writer puts in one block.
pub const BLOCK_RAW: usize = 256 << 10;
/// The most raw bytes a block may declare: a reader's buffer stays this small whatever
/// a sender claims.
pub const BLOCK_RAW_MAX: usize = 1 << 20;
/// zstd level of the blocks: its fastest, since a build shares the CPU with the request
/// path and records compress well at any level.
const LEVEL: i32 = 1;
/// A frame's fixed part: kind, key length, value length.
const FRAME_HEAD: usize = 1 + 4 + 4;
/// The largest key or value a frame may declare. State records are bytes to kilobytes;
/// the bound keeps a reader's one allocation per frame small whatever a sender claims.
pub const RECORD_BYTES_MAX: u32 = 16 << 20;
const PUT: u8 = 1;
const DELETE: u8 = 2;

/// One frame of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// Writes format-4 data frame by frame.
pub struct Writer<W: Write + Seek> {
    out: W,
    hasher: Sha256,
    body_len: u64,
    puts: u64,
    /// Frame bytes not yet compressed into a block.
    raw: Vec<u8>,
    zstd: zstd::block::Compressor,
}

impl<W: Write + Seek> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&[0; HEADER_LEN])?;
        Ok(Writer { out, hasher: Sha256::new(), body_len: 0, puts: 0, raw: Vec::with_capacity(BLOCK_RAW * 2), zstd: zstd::block::Compressor::new() })
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        // A count of frames, each at least FRAME_HEAD bytes of a u64-long body: saturating
        // only for form's sake.
        self.puts = self.puts.saturating_add(1);
        self.frame(PUT, key, value)
    }

    pub fn delete(&mut self, key: &[u8]) -> io::Result<()> {
        self.frame(DELETE, key, &[])
    }

    fn frame(&mut self, kind: u8, key: &[u8], value: &[u8]) -> io::Result<()> {
        let len = |b: &[u8]| {
            u32::try_from(b.len())
                .ok()
                .filter(|l| *l <= RECORD_BYTES_MAX)
                .ok_or_else(|| io::Error::other(format!("a record of {} bytes is over the frame limit", b.len())))
        };
        let mut head = [0u8; FRAME_HEAD];
        head[0] = kind;
        head[1..5].copy_from_slice(&len(key)?.to_be_bytes());
        head[5..9].copy_from_slice(&len(value)?.to_be_bytes());
        for part in [&head[..], key, value] {
            self.raw.extend_from_slice(part);
        }
        let mut start = 0;
        while self.raw.len() - start >= BLOCK_RAW {
            self.block(start, start + BLOCK_RAW)?;
            start += BLOCK_RAW;
        }
        self.raw.drain(..start);
        Ok(())
    }

    /// Compresses `raw[from..to]` into a block and writes it.
    fn block(&mut self, from: usize, to: usize) -> io::Result<()> {
        let raw = &self.raw[from..to];
        let z = self.zstd.compress(raw, LEVEL)?;
        let mut head = [0u8; BLOCK_HEAD];
        // Both at most BLOCK_RAW and its compress bound: far below u32::MAX.
        head[..4].copy_from_slice(&u32::try_from(raw.len()).map_err(io::Error::other)?.to_be_bytes());
        head[4..].copy_from_slice(&u32::try_from(z.len()).map_err(io::Error::other)?.to_be_bytes());
        for part in [&head[..], &z[..]] {
            self.hasher.update(part);
            self.out.write_all(part)?;
        }
        self.body_len = self.body_len.checked_add((BLOCK_HEAD + z.len()) as u64).ok_or_else(|| io::Error::other("snapshot body length overflows"))?;
        Ok(())
    }

    /// Fills in the header; returns the output and what was written: total bytes, puts.
    pub fn finish(mut self) -> io::Result<(W, u64, u64)> {
        if !self.raw.is_empty() {
            self.block(0, self.raw.len())?;
        }
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(TAG)?;
        self.out.write_all(&self.body_len.to_be_bytes())?;
        self.out.write_all(&self.hasher.finalize())?;
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok((self.out, HEADER_LEN as u64 + self.body_len, self.puts))
    }
}

/// The largest compressed block a raw one of [`BLOCK_RAW_MAX`] bytes can give.
fn block_zlen_max() -> usize {
    zstd::zstd_safe::compress_bound(BLOCK_RAW_MAX)
}

/// Decompresses one block, which must give exactly `raw_len` bytes.
fn unblock(z: &[u8], raw_len: usize, out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    out.reserve(raw_len);
    let n = zstd::block::Decompressor::new().decompress_to_buffer(z, out).map_err(|e| format!("snapshot block does not decompress: {e}"))?;
    if n != raw_len {
        return Err(format!("snapshot block declared {raw_len} bytes and gave {n}"));
    }
    Ok(())
}

/// Checks a block head: raw and compressed lengths within their bounds.
fn parse_block_head(head: &[u8]) -> Result<(usize, usize), String> {
    // A length that does not fit a usize is over the bounds below anyway.
    let len = |b: &[u8]| usize::try_from(u32::from_be_bytes(b.try_into().expect("4 bytes"))).unwrap_or(usize::MAX);
    let (raw, z) = (len(&head[..4]), len(&head[4..]));
    if raw == 0 || raw > BLOCK_RAW_MAX || z == 0 || z > block_zlen_max() {
        return Err(format!("snapshot block of {raw} bytes ({z} compressed) is out of bounds"));
    }
    Ok((raw, z))
}

/// Checks data fed in pieces, as it arrives, without keeping it: the header, each
/// block's bounds and content, each frame's shape and limits, and at the end the length
/// and checksum. Bytes after the declared body are ignored (a receive file rewritten from
/// offset 0 may keep a longer tail). Memory: one block, compressed and raw.
#[derive(Default, Clone)]
pub struct Verifier {
    header: Vec<u8>,
    /// Format 4: the body is blocks.
    blocks: bool,
    body_len: u64,
    seen: u64,
    hasher: Sha256,
    /// The block being gathered: its head, then its compressed bytes.
    block_head: Vec<u8>,
    block: Vec<u8>,
    block_len: (usize, usize),
    raw: Vec<u8>,
    head: Vec<u8>,
    skip: u64,
    puts: u64,
}

impl Verifier {
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        if self.header.len() < HEADER_LEN {
            let n = (HEADER_LEN - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() < HEADER_LEN {
                return Ok(());
            }
            self.blocks = match &self.header[..8] {
                t if t == TAG => true,
                t if t == TAG_PLAIN => false,
                _ => return Err("not a snapshot of format 3 or 4 (an older format, or not a snapshot)".into()),
            };
            self.body_len = u64::from_be_bytes(self.header[8..16].try_into().expect("8 bytes"));
        }
        let room = usize::try_from(self.body_len - self.seen).unwrap_or(usize::MAX);
        let body = &bytes[..bytes.len().min(room)];
        self.hasher.update(body);
        // At most `body_len - seen` bytes were taken: `seen` never passes `body_len`.
        self.seen += body.len() as u64;
        if self.blocks {
            self.blocks(body)
        } else {
            self.frames(body)
        }
    }

    /// Gathers blocks through `body`, across calls; each complete one is decompressed and
    /// its frames walked.
    fn blocks(&mut self, mut body: &[u8]) -> Result<(), String> {
        while !body.is_empty() {
            if self.block_head.len() < BLOCK_HEAD {
                let n = (BLOCK_HEAD - self.block_head.len()).min(body.len());
                self.block_head.extend_from_slice(&body[..n]);
                body = &body[n..];
                if self.block_head.len() == BLOCK_HEAD {
                    self.block_len = parse_block_head(&self.block_head)?;
                    self.block.clear();
                }
                continue;
            }
            let (raw_len, z_len) = self.block_len;
            let n = (z_len - self.block.len()).min(body.len());
            self.block.extend_from_slice(&body[..n]);
            body = &body[n..];
            if self.block.len() == z_len {
                let mut raw = std::mem::take(&mut self.raw);
                unblock(&self.block, raw_len, &mut raw)?;
                let walked = self.frames(&raw);
                self.raw = raw;
                walked?;
                self.block_head.clear();
            }
        }
        Ok(())
    }

    /// Walks frames through `body`, across calls: a frame's head is gathered byte by
    /// byte, its key and value are skipped.
    fn frames(&mut self, mut body: &[u8]) -> Result<(), String> {
        while !body.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(body.len());
                self.skip -= n as u64;
                body = &body[n..];
                continue;
            }
            let n = (FRAME_HEAD - self.head.len()).min(body.len());
            self.head.extend_from_slice(&body[..n]);
            body = &body[n..];
            if self.head.len() == FRAME_HEAD {
                let (kind, klen, vlen) = parse_head(&self.head)?;
                self.puts = self.puts.saturating_add(u64::from(kind == PUT));
                self.skip = u64::from(klen) + u64::from(vlen);
                self.head.clear();
            }
        }
        Ok(())
    }

    /// The whole snapshot arrived: its body complete, ending on a block's and a frame's
    /// end, its checksum matching. Returns the number of records (puts).
    pub fn finish(self) -> Result<u64, String> {
        if self.header.len() < HEADER_LEN {
            return Err(format!("snapshot data of {} bytes is shorter than its header", self.header.len()));
        }
        if self.seen < self.body_len {
            return Err(format!("snapshot body of {} bytes declared, {} present", self.body_len, self.seen));
        }
        if !self.block_head.is_empty() {
            return Err("snapshot body ends inside a block".into());
        }
        if !self.head.is_empty() || self.skip > 0 {
            return Err("snapshot body ends inside a frame".into());
        }
        if self.hasher.finalize().as_slice() != &self.header[16..HEADER_LEN] {
            return Err("snapshot checksum mismatch".into());
        }
        Ok(self.puts)
    }
}

fn parse_head(head: &[u8]) -> Result<(u8, u32, u32), String> {
    let kind = head[0];
    let klen = u32::from_be_bytes(head[1..5].try_into().expect("4 bytes"));
    let vlen = u32::from_be_bytes(head[5..9].try_into().expect("4 bytes"));
    match kind {
        PUT | DELETE if klen > RECORD_BYTES_MAX || vlen > RECORD_BYTES_MAX => Err(format!("snapshot frame of {klen}+{vlen} bytes is over the limit")),
        DELETE if vlen != 0 => Err("snapshot delete frame with a value".into()),
        PUT | DELETE => Ok((kind, klen, vlen)),
        other => Err(format!("snapshot frame of unknown kind {other}")),
    }
}

/// Checks a whole snapshot read from `r` (see [`Verifier`]); returns its record count.
pub fn verify(mut r: impl Read) -> Result<u64, String> {
    let mut v = Verifier::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(|e| format!("reading snapshot data: {e}"))?;
        if n == 0 {
            return v.finish();
        }
        v.feed(&buf[..n])?;
    }
}

/// Reads frames back from data already checked with [`verify`].
pub struct Reader<R: Read> {
    body: Body<R>,
}

/// A body's frame stream: read as stored (format 3), or block by block (format 4).
enum Body<R: Read> {
    Plain(io::Take<R>),
    Blocks { r: io::Take<R>, raw: Vec<u8>, at: usize },
}

impl<R: Read> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Plain(r) => r.read(buf),
            Body::Blocks { r, raw, at } => {
                if *at == raw.len() {
                    if !next_block(r, raw)? {
                        return Ok(0);
                    }
                    *at = 0;
                }
                let n = buf.len().min(raw.len() - *at);
                buf[..n].copy_from_slice(&raw[*at..*at + n]);
                *at += n;
                Ok(n)
            }
        }
    }
}

/// Reads and decompresses the next block into `raw`; false at the body's end.
fn next_block(r: &mut impl Read, raw: &mut Vec<u8>) -> io::Result<bool> {
    let mut head = [0u8; BLOCK_HEAD];
    match r.read(&mut head[..1])? {
        0 => return Ok(false),
        _ => r.read_exact(&mut head[1..])?,
    }
    let (raw_len, z_len) = parse_block_head(&head).map_err(io::Error::other)?;
    let mut z = vec![0u8; z_len];
    r.read_exact(&mut z)?;
    unblock(&z, raw_len, raw).map_err(io::Error::other)?;
    Ok(true)
}

impl<R: Read> Reader<R> {
    pub fn new(mut r: R) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)?;
        let body_len = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        let body = match &header[..8] {
            t if t == TAG => Body::Blocks { r: r.take(body_len), raw: Vec::new(), at: 0 },
            t if t == TAG_PLAIN => Body::Plain(r.take(body_len)),
            _ => return Err(io::Error::other("not a snapshot of format 3 or 4")),
        };
        Ok(Reader { body })
    }

    /// The next frame, `None` at the body's end.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let mut head = [0u8; FRAME_HEAD];
        if self.body.read(&mut head[..1])? == 0 {
            return Ok(None);
        }
        self.body.read_exact(&mut head[1..]).map_err(|e| io::Error::other(format!("snapshot frame runs past the body: {e}")))?;
        let (kind, klen, vlen) = parse_head(&head).map_err(io::Error::other)?;
        let mut read = |len: u32| -> io::Result<Vec<u8>> {
            // `len` passed `parse_head`: at most RECORD_BYTES_MAX (16 MiB).
            let mut b = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
            self.body.read_exact(&mut b).map_err(|e| io::Error::other(format!("snapshot frame runs past the body: {e}")))?;
            Ok(b)
        };
        let key = read(klen)?;
        let value = read(vlen)?;
        Ok(Some(if kind == PUT { Frame::Put(key, value) } else { Frame::Delete(key) }))
    }
}

/// Snapshot data as openraft holds it: an open file, and its path, so that a snapshot
/// received into a file is committed by renaming that file rather than copying it.
pub struct SnapshotHandle {
    path: PathBuf,
    file: tokio::fs::File,
}

impl SnapshotHandle {
    pub fn new(path: PathBuf, file: std::fs::File) -> Self {
        SnapshotHandle { path, file: tokio::fs::File::from_std(file) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn into_file(self) -> tokio::fs::File {
        self.file
    }
}

impl tokio::io::AsyncRead for SnapshotHandle {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SnapshotHandle {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for SnapshotHandle {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.get_mut().file).start_seek(position)
    }
    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.get_mut().file).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use proptest::prelude::*;

    use super::*;

    fn write(frames: &[Frame]) -> Vec<u8> {
        let mut w = Writer::new(Cursor::new(Vec::new())).unwrap();
        for f in frames {
            match f {
                Frame::Put(k, v) => w.put(k, v).unwrap(),
                Frame::Delete(k) => w.delete(k).unwrap(),
            }
        }
        w.finish().unwrap().0.into_inner()
    }

    fn read(data: &[u8]) -> Vec<Frame> {
        let mut r = Reader::new(data).unwrap();
        std::iter::from_fn(|| r.next_frame().unwrap()).collect()
    }

    fn frames() -> impl Strategy<Value = Vec<Frame>> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
        let frame = prop_oneof![(bytes(), bytes()).prop_map(|(k, v)| Frame::Put(k, v)), bytes().prop_map(Frame::Delete)];
        proptest::collection::vec(frame, 0..30)
    }

    proptest! {
        /// Whatever the frames and however the bytes are cut into chunks, what is written
        /// verifies and reads back the same; a tail after the body changes nothing.
        #[test]
        fn frames_round_trip_through_any_chunking(fs in frames(), cut in 1usize..64, tail in proptest::collection::vec(any::<u8>(), 0..20)) {
            let mut data = write(&fs);
            data.extend_from_slice(&tail);
            let mut v = Verifier::default();
            for chunk in data.chunks(cut) {
                v.feed(chunk).unwrap();
            }
            let puts = fs.iter().filter(|f| matches!(f, Frame::Put(..))).count() as u64;
            prop_assert_eq!(v.finish().unwrap(), puts);
            prop_assert_eq!(read(&data), fs);
        }

        /// Any single byte changed in the header or body, or the data cut short, fails.
        #[test]
        fn a_changed_or_truncated_snapshot_fails(fs in frames(), at in any::<prop::sample::Index>(), flip in 1u8..=255, keep in any::<prop::sample::Index>()) {
            let data = write(&fs);
            let mut bad = data.clone();
            let i = at.index(bad.len());
            bad[i] ^= flip;
            prop_assert!(verify(&bad[..]).is_err(), "byte {} changed", i);
            let k = keep.index(data.len());
            prop_assert!(verify(&data[..k]).is_err(), "cut at {}", k);
        }
    }

    /// Data with `body` under `tag` and a correct checksum: only the checks on the body's
    /// content can refuse it.
    fn sealed(tag: &[u8; 8], body: &[u8]) -> Vec<u8> {
        let mut data = tag.to_vec();
        data.extend_from_slice(&(body.len() as u64).to_be_bytes());
        data.extend_from_slice(&Sha256::digest(body));
        data.extend_from_slice(body);
        data
    }

    fn raw_frames(frames: &[Frame]) -> Vec<u8> {
        let mut raw = Vec::new();
        for f in frames {
            let (kind, k, v): (u8, &[u8], &[u8]) = match f {
                Frame::Put(k, v) => (PUT, k, v),
                Frame::Delete(k) => (DELETE, k, &[]),
            };
            raw.push(kind);
            for part in [k, v] {
                raw.extend_from_slice(&u32::try_from(part.len()).expect("test records are small").to_be_bytes());
            }
            raw.extend_from_slice(k);
            raw.extend_from_slice(v);
        }
        raw
    }

    /// A state larger than a block, with a value larger than a block, fed in odd chunks:
    /// frames run across blocks, and it all verifies and reads back; the records take
    /// several times fewer bytes than as plain frames (format 3).
    #[test]
    fn frames_run_across_compressed_blocks() {
        let mut fs: Vec<Frame> =
            (0..20_000).map(|i| Frame::Put(format!("o/dc1-{i:032x}").into_bytes(), format!("sku-{} session-{}", i % 1000, i % 77).into_bytes())).collect();
        fs.insert(7_000, Frame::Put(b"big".to_vec(), (0..600_000u32).map(|i| (i % 251) as u8).collect()));
        fs.push(Frame::Delete(b"o/dc1-gone".to_vec()));
        let data = write(&fs);
        let plain = raw_frames(&fs).len();
        assert!(plain > 3 * BLOCK_RAW, "several blocks");
        assert!(data.len() * 3 < plain, "{} bytes compressed, {plain} plain", data.len());
        let mut v = Verifier::default();
        for chunk in data.chunks(7_777) {
            v.feed(chunk).unwrap();
        }
        assert_eq!(v.finish().unwrap(), fs.len() as u64 - 1);
        assert_eq!(read(&data), fs);
    }

    /// Data written before format 4 (plain frames) still verifies and reads back.
    #[test]
    fn format_3_data_is_still_read() {
        let fs = vec![Frame::Put(b"k".to_vec(), b"v".to_vec()), Frame::Delete(b"k".to_vec()), Frame::Put(b"a".to_vec(), vec![])];
        let data = sealed(TAG_PLAIN, &raw_frames(&fs));
        assert_eq!(verify(&data[..]).unwrap(), 2);
        assert_eq!(read(&data), fs);
    }

    /// Blocks that declare more than the bound, or another length than they decompress
    /// to, or that are not zstd, are refused even under a matching checksum.
    #[test]
    fn blocks_out_of_bounds_or_unlike_their_head_are_refused() {
        let raw = raw_frames(&[Frame::Put(b"k".to_vec(), b"value".to_vec())]);
        let z = zstd::block::compress(&raw, LEVEL).unwrap();
        let block = |raw_len: usize, z: &[u8]| {
            let mut b = u32::try_from(raw_len).expect("test lengths are small").to_be_bytes().to_vec();
            b.extend_from_slice(&u32::try_from(z.len()).expect("test lengths are small").to_be_bytes());
            b.extend_from_slice(z);
            b
        };
        assert_eq!(verify(&sealed(TAG, &block(raw.len(), &z))[..]).unwrap(), 1, "the well-formed block passes");
        for (what, body) in [
            ("declares more than it holds", block(raw.len() + 1, &z)),
            ("declares less than it holds", block(raw.len() - 1, &z)),
            ("over the raw bound", block(BLOCK_RAW_MAX + 1, &z)),
            ("not zstd", block(raw.len(), &raw)),
            ("empty", block(0, &[])),
        ] {
            let data = sealed(TAG, &body);
            assert!(verify(&data[..]).is_err(), "a block that {what} passed");
            assert!(Reader::new(&data[..]).and_then(|mut r| r.next_frame()).is_err(), "a block that {what} was read");
        }
    }

    #[test]
    fn frames_over_the_limit_or_of_unknown_kind_are_refused() {
        let mut head = [0u8; FRAME_HEAD];
        head[0] = PUT;
        head[1..5].copy_from_slice(&(RECORD_BYTES_MAX + 1).to_be_bytes());
        assert!(parse_head(&head).is_err());
        head[1..5].copy_from_slice(&1u32.to_be_bytes());
        head[0] = 9;
        assert!(parse_head(&head).is_err());
        head[0] = DELETE;
        head[5..9].copy_from_slice(&1u32.to_be_bytes());
        assert!(parse_head(&head).is_err(), "a delete carries no value");
    }
}
