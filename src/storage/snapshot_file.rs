//! The current Raft snapshot, in a file of its own beside sled's. Written whole to a
//! temporary file, synced, and renamed into place (the directory synced after), so a crash
//! leaves either the old snapshot or the new one, never a mix.
//!
//! Why not a sled value: storing tens of megabytes as one value held sled's read side of
//! its global write lock for hundreds of milliseconds, and every state-machine batch (the
//! applies of the whole node) waited behind it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    pub fn in_dir(dir: &Path) -> Self {
        SnapshotFile { path: dir.join("raft-snapshot.bin") }
    }

    /// Replaces the snapshot with `bytes`, durably.
    pub fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        // The rename itself is durable only once the directory is synced.
        File::open(self.path.parent().unwrap_or(Path::new(".")))?.sync_all()
    }

    /// The snapshot's bytes, or `None` when no snapshot was written yet.
    pub fn read(&self) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_snapshot_replaces_the_last_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = SnapshotFile::in_dir(dir.path());
        assert_eq!(f.read().unwrap(), None);
        f.write(b"first").unwrap();
        f.write(b"second").unwrap();
        assert_eq!(f.read().unwrap().as_deref(), Some(&b"second"[..]));
        // Nothing left behind but the snapshot itself.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("raft-snapshot.bin")]);
    }
}
