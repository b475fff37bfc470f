//! Writing a snapshot's records into a state tree, several threads at once.
//!
//! A snapshot's frame stream is first the records of a scan of the tree, in key order,
//! each key once; then the keys written while the scan ran, put back (or deleted) as
//! they were when the snapshot's entry applied, in any order and possibly again. While
//! keys strictly ascend no key repeats, so the order in which those frames are written
//! does not matter, and chunks of them go to several writer threads: sled's writes are
//! CPU-bound (tree descent, page updates, compression) and take a second core. From the
//! first key that does not ascend, the rest is written in stream order, on this thread,
//! once the writers are done. A wiped node's rejoin is mostly this load.
//!
//! The writes are not one sled batch: the caller marks the install first, so a crash
//! midway repeats it whole at the next start.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::snapshot_data::{Frame, Reader};

/// Bytes of records per chunk handed to a writer, and per batch of the ordered rest.
/// Memory holds at most two chunks per writer and one being read, whatever the size of
/// the snapshot.
pub const CHUNK_BYTES: usize = 256 << 10;
/// Writer threads: sled's writes gained 1.8× from a second thread on two cores, and
/// nothing from two more.
pub const WRITERS_MAX: usize = 4;

/// What can stop a load: the data (reading or decoding it) or sled.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the snapshot: {0}")]
    Read(#[from] io::Error),
    #[error("writing the state: {0}")]
    Write(#[from] sled::Error),
}

/// How many writer threads a load uses here: one per core, within `WRITERS_MAX`.
pub fn writers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, WRITERS_MAX)
}

/// Writes every frame `reader` holds into `tree`, with `writers` threads for the part
/// whose keys ascend; returns how many frames were written.
pub fn load<R: Read>(tree: &sled::Tree, reader: &mut Reader<R>, writers: usize) -> Result<u64, LoadError> {
    load_in_chunks(tree, reader, writers, CHUNK_BYTES)
}

/// `load`, with chunks of `chunk_bytes`.
fn load_in_chunks<R: Read>(tree: &sled::Tree, reader: &mut Reader<R>, writers: usize, chunk_bytes: usize) -> Result<u64, LoadError> {
    let (first_unordered, in_parallel) = std::thread::scope(|s| {
        let (senders, handles): (Vec<_>, Vec<_>) = (0..writers.max(1))
            .map(|_| {
                let (tx, rx) = sync_channel::<Vec<Frame>>(1);
                (tx, s.spawn(move || write_chunks(tree, rx)))
            })
            .unzip();
        let dispatched = dispatch_ascending(reader, &senders, chunk_bytes);
        drop(senders);
        let mut written = 0u64;
        let mut failed = None;
        for h in handles {
            match h.join() {
                Ok(Ok(n)) => written = written.saturating_add(n),
                Ok(Err(e)) => failed = Some(LoadError::Write(e)),
                // A bug, as it would be on this thread: let it unwind here.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        // A writer's error stops the dispatch too (its channel closes): report the cause.
        match (failed, dispatched) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(e),
            (None, Ok(first)) => Ok((first, written)),
        }
    })?;
    let in_order = write_in_order(tree, first_unordered, reader)?;
    Ok(in_parallel.saturating_add(in_order))
}

/// Reads frames while their keys strictly ascend, in chunks handed to the writers in
/// turn; returns the first frame whose key does not ascend (`None`: the stream ended).
/// Stops early, with `Ok(None)`, if a writer stopped (its error is the one to report).
fn dispatch_ascending<R: Read>(reader: &mut Reader<R>, writers: &[SyncSender<Vec<Frame>>], chunk_bytes: usize) -> Result<Option<Frame>, LoadError> {
    let mut last: Option<Vec<u8>> = None;
    let (mut chunk, mut bytes, mut turn) = (Vec::new(), 0usize, 0usize);
    while let Some(frame) = reader.next_frame()? {
        let key = frame_key(&frame);
        if last.as_deref().is_some_and(|l| key <= l) {
            if !send(writers, &mut turn, std::mem::take(&mut chunk)) {
                return Ok(None);
            }
            return Ok(Some(frame));
        }
        last = Some(key.to_vec());
        bytes = bytes.saturating_add(frame_bytes(&frame));
        chunk.push(frame);
        if bytes >= chunk_bytes {
            if !send(writers, &mut turn, std::mem::take(&mut chunk)) {
                return Ok(None);
            }
            bytes = 0;
        }
    }
    send(writers, &mut turn, chunk);
    Ok(None)
}

/// Hands `chunk` to the next writer; false if that writer has stopped.
fn send(writers: &[SyncSender<Vec<Frame>>], turn: &mut usize, chunk: Vec<Frame>) -> bool {
    if chunk.is_empty() {
        return true;
    }
    let to = &writers[*turn];
    // `turn` stays below the number of writers, so the increment cannot overflow.
    *turn = (*turn + 1) % writers.len();
    to.send(chunk).is_ok()
}

/// One writer: every chunk it is handed, frame by frame (no sled batch: a batch holds
/// sled's write lock, which would put the writers back in single file).
fn write_chunks(tree: &sled::Tree, chunks: Receiver<Vec<Frame>>) -> sled::Result<u64> {
    let mut written = 0u64;
    for chunk in chunks {
        for frame in chunk {
            match frame {
                Frame::Put(k, v) => tree.insert(k, v)?,
                Frame::Delete(k) => tree.remove(k)?,
            };
            written = written.saturating_add(1);
        }
    }
    Ok(written)
}

/// The rest of the stream from `first` on, in order, in batches.
fn write_in_order<R: Read>(tree: &sled::Tree, first: Option<Frame>, reader: &mut Reader<R>) -> Result<u64, LoadError> {
    let Some(first) = first else { return Ok(0) };
    let (mut batch, mut bytes, mut written) = (sled::Batch::default(), 0usize, 0u64);
    let mut next = Some(first);
    while let Some(frame) = next {
        bytes = bytes.saturating_add(frame_bytes(&frame));
        match frame {
            Frame::Put(k, v) => batch.insert(k, v),
            Frame::Delete(k) => batch.remove(k),
        }
        written = written.saturating_add(1);
        if bytes >= CHUNK_BYTES {
            tree.apply_batch(std::mem::take(&mut batch))?;
            bytes = 0;
        }
        next = reader.next_frame()?;
    }
    tree.apply_batch(batch)?;
    Ok(written)
}

fn frame_key(f: &Frame) -> &[u8] {
    match f {
        Frame::Put(k, _) | Frame::Delete(k) => k,
    }
}

fn frame_bytes(f: &Frame) -> usize {
    match f {
        Frame::Put(k, v) => k.len().saturating_add(v.len()),
        Frame::Delete(k) => k.len(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::storage::snapshot_data::Writer;

    /// A stream as a build writes it: `scan` in key order, then `tail` as it comes.
    fn stream(scan: &BTreeMap<Vec<u8>, Vec<u8>>, tail: &[Frame]) -> Vec<u8> {
        let mut w = Writer::new(std::io::Cursor::new(Vec::new())).expect("writer");
        for (k, v) in scan {
            w.put(k, v).expect("put");
        }
        for f in tail {
            match f {
                Frame::Put(k, v) => w.put(k, v),
                Frame::Delete(k) => w.delete(k),
            }
            .expect("frame");
        }
        w.finish().expect("finish").0.into_inner()
    }

    /// The stream applied frame by frame, in order: what a load must leave.
    fn expected(scan: &BTreeMap<Vec<u8>, Vec<u8>>, tail: &[Frame]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut out = scan.clone();
        for f in tail {
            match f {
                Frame::Put(k, v) => out.insert(k.clone(), v.clone()),
                Frame::Delete(k) => out.remove(k),
            };
        }
        out
    }

    fn loaded(data: Vec<u8>, writers: usize, chunk_bytes: usize) -> (BTreeMap<Vec<u8>, Vec<u8>>, u64) {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("state").expect("tree");
        let mut reader = Reader::new(std::io::Cursor::new(data)).expect("reader");
        let n = load_in_chunks(&tree, &mut reader, writers, chunk_bytes).expect("load");
        (tree.iter().map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("read")).collect(), n)
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        // Few distinct keys, so that the tail often repeats and deletes the scan's.
        (0u16..400).prop_map(|i| format!("o/{i:05}").into_bytes())
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![(key(), prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(k, v)| Frame::Put(k, v)), key().prop_map(Frame::Delete)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever the scan and the tail, several writers leave exactly what applying
        /// the frames one by one leaves. Chunks of a few frames make the writers share
        /// the scan.
        #[test]
        fn a_parallel_load_leaves_what_the_frames_in_order_leave(
            scan in prop::collection::btree_map(key(), prop::collection::vec(any::<u8>(), 0..600), 0..400),
            tail in prop::collection::vec(frame(), 0..60),
            writers in 1usize..4,
            chunk_bytes in 1usize..4000,
        ) {
            let frames = u64::try_from(scan.len() + tail.len()).expect("small");
            let (got, n) = loaded(stream(&scan, &tail), writers, chunk_bytes);
            prop_assert_eq!(n, frames);
            prop_assert_eq!(got, expected(&scan, &tail));
        }
    }

    /// The case the rule exists for: a tail that puts back a key the scan wrote earlier,
    /// with a key that happens to ascend before it.
    #[test]
    fn a_tail_that_rewrites_a_scanned_key_wins() {
        let scan: BTreeMap<Vec<u8>, Vec<u8>> = (0..2000).map(|i| (format!("o/{i:05}").into_bytes(), vec![b'a'; 300])).collect();
        let tail = vec![
            Frame::Put(b"o/99999".to_vec(), b"new".to_vec()),
            Frame::Put(b"o/00007".to_vec(), b"rolled back".to_vec()),
            Frame::Delete(b"o/01500".to_vec()),
        ];
        let (got, n) = loaded(stream(&scan, &tail), 2, CHUNK_BYTES);
        assert_eq!(n, 2003);
        assert_eq!(got, expected(&scan, &tail));
        assert_eq!(got.get(b"o/00007".as_slice()).map(Vec::as_slice), Some(b"rolled back".as_slice()));
        assert!(!got.contains_key(b"o/01500".as_slice()));
    }

    /// The writers get the frames whose keys ascend, and only those: the first that does
    /// not comes back, with the rest left in the stream, to be written in order.
    #[test]
    fn the_writers_get_frames_up_to_the_first_key_that_does_not_ascend() {
        let put = |k: &str| Frame::Put(k.as_bytes().to_vec(), b"v".to_vec());
        let scan: BTreeMap<Vec<u8>, Vec<u8>> = ["o/1", "o/2", "o/3"].iter().map(|k| (k.as_bytes().to_vec(), b"v".to_vec())).collect();
        let tail = vec![put("o/9"), put("o/2"), put("o/5")];
        let mut reader = Reader::new(std::io::Cursor::new(stream(&scan, &tail))).expect("reader");
        let (tx, rx) = sync_channel(16);
        let first = dispatch_ascending(&mut reader, &[tx], 2).expect("dispatch");
        assert_eq!(first, Some(put("o/2")));
        let sent: Vec<Vec<u8>> = rx.try_iter().flatten().map(|f| frame_key(&f).to_vec()).collect();
        assert_eq!(sent, ["o/1", "o/2", "o/3", "o/9"].map(|k| k.as_bytes().to_vec()));
        assert_eq!(reader.next_frame().expect("read"), Some(put("o/5")));
    }
}
