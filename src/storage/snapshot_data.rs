//! Snapshot data, format 3: what a leader sends, a follower receives into a file, and
//! every node keeps on disk. It is written, checked and read as a stream, a frame at a
//! time, so building, sending, receiving and installing a snapshot hold a few megabytes
//! of it in memory however large the state is.
//!
//! Layout: the tag `AGSNAP03`, the body's length (u64 big-endian), the SHA-256 of the
//! body, then the body: frames, each a kind byte (put or delete), the key's and the
//! value's lengths (u32 big-endian; a delete has no value), the key, the value. Frames
//! apply in order, a later one for a key replacing an earlier one: a build writes the
//! records as it scans them, then puts back (or deletes) every key written while it
//! scanned, so the data is the state of exactly one applied entry.
//!
//! The checksum sits before the body yet covers it all: a writer leaves the header blank
//! and fills it in when the body is done (hence `Seek`).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};

pub const TAG: &[u8; 8] = b"AGSNAP03";
pub const HEADER_LEN: usize = 8 + 8 + 32;
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

/// Writes format-3 data frame by frame.
pub struct Writer<W: Write + Seek> {
    out: W,
    hasher: Sha256,
    body_len: u64,
    puts: u64,
}

impl<W: Write + Seek> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&[0; HEADER_LEN])?;
        Ok(Writer { out, hasher: Sha256::new(), body_len: 0, puts: 0 })
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
            self.hasher.update(part);
            self.out.write_all(part)?;
        }
        self.body_len =
            self.body_len.checked_add((FRAME_HEAD + key.len() + value.len()) as u64).ok_or_else(|| io::Error::other("snapshot body length overflows"))?;
        Ok(())
    }

    /// Fills in the header; returns the output and what was written: total bytes, puts.
    pub fn finish(mut self) -> io::Result<(W, u64, u64)> {
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(TAG)?;
        self.out.write_all(&self.body_len.to_be_bytes())?;
        self.out.write_all(&self.hasher.finalize())?;
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok((self.out, HEADER_LEN as u64 + self.body_len, self.puts))
    }
}

/// Checks data fed in pieces, as it arrives, without keeping it: the header, each frame's
/// shape and limits, and at the end the length and checksum. Bytes after the declared
/// body are ignored (a receive file rewritten from offset 0 may keep a longer tail).
#[derive(Default, Clone)]
pub struct Verifier {
    header: Vec<u8>,
    body_len: u64,
    seen: u64,
    hasher: Sha256,
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
            if !self.header.starts_with(TAG) {
                return Err("not a format-3 snapshot (an older format, or not a snapshot)".into());
            }
            self.body_len = u64::from_be_bytes(self.header[8..16].try_into().expect("8 bytes"));
        }
        let room = usize::try_from(self.body_len - self.seen).unwrap_or(usize::MAX);
        let body = &bytes[..bytes.len().min(room)];
        self.hasher.update(body);
        // At most `body_len - seen` bytes were taken: `seen` never passes `body_len`.
        self.seen += body.len() as u64;
        self.frames(body)
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

    /// The whole snapshot arrived: its body complete, ending on a frame's end, its
    /// checksum matching. Returns the number of records (puts).
    pub fn finish(self) -> Result<u64, String> {
        if self.header.len() < HEADER_LEN {
            return Err(format!("snapshot data of {} bytes is shorter than its header", self.header.len()));
        }
        if self.seen < self.body_len {
            return Err(format!("snapshot body of {} bytes declared, {} present", self.body_len, self.seen));
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
    r: R,
    left: u64,
}

impl<R: Read> Reader<R> {
    pub fn new(mut r: R) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)?;
        if !header.starts_with(TAG) {
            return Err(io::Error::other("not a format-3 snapshot"));
        }
        Ok(Reader { r, left: u64::from_be_bytes(header[8..16].try_into().expect("8 bytes")) })
    }

    /// The next frame, `None` at the body's end.
    pub fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut head = [0u8; FRAME_HEAD];
        self.r.read_exact(&mut head)?;
        let (kind, klen, vlen) = parse_head(&head).map_err(io::Error::other)?;
        let mut read = |len: u32| -> io::Result<Vec<u8>> {
            // `len` passed `parse_head`: at most RECORD_BYTES_MAX (16 MiB).
            let mut b = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
            self.r.read_exact(&mut b)?;
            Ok(b)
        };
        let key = read(klen)?;
        let value = read(vlen)?;
        let size = (FRAME_HEAD as u64) + u64::from(klen) + u64::from(vlen);
        self.left = self.left.checked_sub(size).ok_or_else(|| io::Error::other("snapshot frame runs past the body"))?;
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
