//! sled storage of one node: the Raft log and vote ([`log_store`]), the state machine and
//! its snapshots ([`state_machine`]). Only this module touches sled, so another engine can
//! replace it in one place.
//!
//! Durability: openraft counts a vote or a log entry as durable once `save_vote` returns or
//! the `append` callback fires. We call both only after [`Durable::sync`]: sled's
//! `flush()` writes its log buffers and waits on `sync_file_range(WAIT_BEFORE | WRITE |
//! WAIT_AFTER)`, which puts the bytes in the page cache and starts write-back — enough
//! for a process crash (SIGKILL), not for power loss, because it neither flushes the
//! drive's cache nor the file's metadata. With `durability = "fsync"` (the default) we
//! then `fdatasync` sled's file, as etcd does for its WAL.

pub mod log_store;
pub mod state_machine;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::config::Durability;

pub use log_store::LogStore;
pub use state_machine::{SmReader, StateMachineStore};

/// Makes everything written to the db so far durable, to the configured level.
#[derive(Clone)]
pub struct Durable {
    db: sled::Db,
    /// sled's single data file; `Some` when fdatasync is wanted.
    file: Option<Arc<File>>,
}

impl Durable {
    pub fn sync(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        Ok(())
    }

    /// `sync` on the blocking pool: flush and fdatasync block the thread for milliseconds.
    pub async fn sync_async(&self) -> std::io::Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync()).await.map_err(std::io::Error::other)?
    }
}

/// Opens (or creates) a node's data dir and returns its log store and state machine.
pub fn open(dir: &Path, durability: Durability, cache_bytes: u64, cache_entities_max: usize) -> anyhow::Result<(LogStore, StateMachineStore)> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        // We flush when Raft needs it; the background flush only bounds what an
        // unsynced state-machine write may lose, which the log replays anyway.
        .flush_every_ms(Some(1000))
        .open()
        .map_err(|e| anyhow::anyhow!("open sled db in {}: {e}", dir.display()))?;
    let file = match durability {
        Durability::Fsync => Some(Arc::new(File::open(dir.join("db"))?)),
        Durability::Flush => None,
    };
    let durable = Durable { db: db.clone(), file };
    let log = LogStore::new(&db, durable.clone())?;
    let sm = StateMachineStore::new(&db, durable, cache_entities_max)?;
    Ok((log, sm))
}

/// Turns any error into openraft's storage error for the given operation.
pub(crate) fn io_err<E: std::error::Error + 'static>(make: fn(openraft::AnyError) -> openraft::StorageIOError<u64>, e: E) -> openraft::StorageError<u64> {
    openraft::StorageError::IO {
        source: make(openraft::AnyError::new(&e)),
    }
}
