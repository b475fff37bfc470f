//! A shard's current Raft snapshot, in files of its own beside sled's: the data
//! (`raft-snapshot-<id>.bin`, format 4, see [`super::snapshot_data`]) and a small meta file
//! (`raft-snapshot.meta`) that names it. The meta file is the commit point: the data is
//! synced first, then the meta file is written to a temporary file, synced and renamed
//! into place (the directory synced after), so a crash leaves the old snapshot or the new
//! one, never a mix. Data files the meta does not name are leftovers and are removed.
//!
//! Why files and not sled values: storing tens of megabytes as one value held sled's read
//! side of its global write lock for hundreds of milliseconds, and every state-machine
//! batch (the applies of the whole node) waited behind it. Why a stream: a snapshot is
//! written, sent, received and installed a frame at a time, never held whole in memory.
//!
//! Data is written back to disk as it is written, a few megabytes at a time (as RocksDB's
//! `bytes_per_sync` does): left to one `fdatasync` at the end, tens of megabytes of dirty
//! pages went to disk at once, and on ext4 the Raft log's next `fdatasync` can wait for
//! them behind the same journal commit. (Measured with `agora bench --timeline`: the
//! second after a 58 MB snapshot write had a p99 of 361 ms, max 412 ms; written back as
//! it goes, the whole run's max was 55 ms.)

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use openraft::SnapshotMeta;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::raft::NodeId;

/// Bytes written between two write-back requests.
const WRITEBACK_CHUNK: u64 = 4 << 20;
const META: &str = "raft-snapshot.meta";
const PREFIX: &str = "raft-snapshot-";
/// A snapshot being built (`.tmp`) or received (`.recv`) until it is committed (`.bin`).
const BUILDING: &str = "tmp";
const RECEIVING: &str = "recv";
/// The one file a node kept its snapshot in before format 3 (meta and data encoded
/// together); read once, to convert it.
const LEGACY: &str = "raft-snapshot.bin";

/// The committed snapshot: what the meta file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Current {
    pub meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    /// The data file's name, in the same directory.
    pub file: String,
    pub bytes: u64,
    /// Records put (a record written during the build may count twice).
    pub records: u64,
}

#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    pub fn in_dir(dir: &Path) -> Self {
        SnapshotFiles { dir: dir.to_path_buf() }
    }

    /// The directory the files live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty data file for a snapshot being built (`receive`: being received; the
    /// older partial receives are removed first, as one transfer runs at a time).
    pub fn create(&self, receive: bool) -> io::Result<(PathBuf, File)> {
        let ext = if receive { RECEIVING } else { BUILDING };
        if receive {
            self.remove_where(|name| name.ends_with(&format!(".{RECEIVING}")))?;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = self.dir.join(format!("{PREFIX}{nanos:x}-{:08x}.{ext}", rand::random::<u32>()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        Ok((path, f))
    }

    /// Makes the complete data at `path` (from [`SnapshotFiles::create`]) the current
    /// snapshot, durably, and removes the one it replaces.
    pub fn commit(&self, path: &Path, mut current: Current) -> io::Result<Current> {
        File::open(path)?.sync_data()?;
        let committed = path.with_extension("bin");
        std::fs::rename(path, &committed)?;
        current.file = committed.file_name().and_then(|n| n.to_str()).ok_or_else(|| io::Error::other("snapshot file name"))?.to_string();
        let tmp = self.dir.join(format!("{META}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(&codec::encode(&current))?;
        f.sync_data()?;
        std::fs::rename(&tmp, self.dir.join(META))?;
        // The renames are durable only once the directory is synced.
        File::open(&self.dir)?.sync_all()?;
        let keep = current.file.clone();
        self.remove_where(|name| name != keep && name.ends_with(".bin") && name.starts_with(PREFIX))?;
        Ok(current)
    }

    /// The committed snapshot's meta, `None` when there is none.
    pub fn current(&self) -> io::Result<Option<Current>> {
        match std::fs::read(self.dir.join(META)) {
            Ok(b) => codec::decode(&b).map(Some).map_err(|e| io::Error::other(format!("{META}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The committed snapshot and its data file, open for reading.
    pub fn open_current(&self) -> io::Result<Option<(Current, PathBuf, File)>> {
        let Some(c) = self.current()? else { return Ok(None) };
        let path = self.dir.join(&c.file);
        let f = File::open(&path)?;
        Ok(Some((c, path, f)))
    }

    /// What a node wrote before format 3, if it is still there.
    pub fn legacy(&self) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.dir.join(LEGACY)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Leftovers of a crash or of an older format: files of builds and receives never
    /// committed, the legacy file once converted.
    pub fn remove_leftovers(&self) -> io::Result<()> {
        self.remove_where(|name| {
            name == LEGACY || (name.starts_with(PREFIX) && (name.ends_with(&format!(".{BUILDING}")) || name.ends_with(&format!(".{RECEIVING}"))))
        })
    }

    fn remove_where(&self, doomed: impl Fn(&str) -> bool) -> io::Result<()> {
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            if e.file_name().to_str().is_some_and(&doomed) {
                match std::fs::remove_file(e.path()) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A file written front to back (and patched in place at the end) that asks the kernel
/// to write back each chunk as it fills and waits for the chunk before: at most two
/// chunks are ever dirty, and the writer goes at the disk's pace.
pub struct WritebackFile {
    f: File,
    pos: u64,
    /// Where the next chunk to hand to write-back begins.
    next: u64,
}

impl WritebackFile {
    pub fn new(f: File) -> Self {
        WritebackFile { f, pos: 0, next: 0 }
    }
}

impl Write for WritebackFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.f.write(buf)?;
        self.pos += n as u64;
        while self.pos >= self.next + WRITEBACK_CHUNK {
            sync_range(&self.f, self.next, WRITEBACK_CHUNK, libc::SYNC_FILE_RANGE_WRITE)?;
            if self.next >= WRITEBACK_CHUNK {
                let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                sync_range(&self.f, self.next - WRITEBACK_CHUNK, WRITEBACK_CHUNK, wait)?;
            }
            self.next += WRITEBACK_CHUNK;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.f.flush()
    }
}

impl Seek for WritebackFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.f.seek(to)?;
        Ok(self.pos)
    }
}

/// `sync_file_range(2)`: write-back control only, no durability (`sync_data` gives that).
fn sync_range(f: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    let (offset, len) = (libc::off64_t::try_from(offset).map_err(io::Error::other)?, libc::off64_t::try_from(len).map_err(io::Error::other)?);
    // SAFETY: a system call on an open file descriptor we own; no memory is passed.
    let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), offset, len, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    fn current(id: &str) -> Current {
        Current { meta: SnapshotMeta { snapshot_id: id.into(), ..Default::default() }, file: String::new(), bytes: 0, records: 0 }
    }

    #[test]
    fn a_committed_snapshot_replaces_the_last_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::in_dir(dir.path());
        assert!(files.current().unwrap().is_none());
        let chunk = usize::try_from(WRITEBACK_CHUNK).unwrap();
        for (id, len) in [("first", 5usize), ("second", 2 * chunk + 12345)] {
            let (path, f) = files.create(false).unwrap();
            let mut w = WritebackFile::new(f);
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            w.write_all(&data).unwrap();
            files.commit(&path, current(id)).unwrap();
            let (c, _, mut f) = files.open_current().unwrap().unwrap();
            assert_eq!(c.meta.snapshot_id, id);
            let mut back = Vec::new();
            f.read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
        }
        // A receive in progress is a leftover once the node restarts.
        let (_recv, _) = files.create(true).unwrap();
        files.remove_leftovers().unwrap();
        let left = names(dir.path());
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[1], META);
        assert!(left[0].starts_with(PREFIX) && left[0].ends_with(".bin"), "{left:?}");
    }
}
