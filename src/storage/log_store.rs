//! The Raft log and vote in sled. Keys of the `log` tree are big-endian indexes, so sled's
//! byte order is log order.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, RaftLogReader, StorageIOError, Vote};

use super::{background, io_err, Durable, Waiter};
use crate::codec;
use crate::raft::{LogId, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    durable: Durable,
    /// The first index not purged: entries below it may still be in the tree for a while
    /// (they are removed in the background) but are never read.
    first_index: Arc<AtomicU64>,
    /// The most encoded bytes of entries one AppendEntries carries (at least one entry):
    /// entries vary in size (one carries a batch of client requests), so a count alone
    /// could make a request larger than a peer accepts.
    payload_bytes_max: usize,
}

/// [`LogStore::payload_bytes_max`] until the node sets it from its frame limit.
const PAYLOAD_BYTES_DEFAULT: usize = 8 << 20;

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    #[cfg(test)]
    fn new(db: &sled::Db, durable: Durable) -> anyhow::Result<Self> {
        Self::for_shard(db, 0, durable)
    }

    /// Shard `shard`'s log, in its own trees of the node's db.
    pub(super) fn for_shard(db: &sled::Db, shard: u16, durable: Durable) -> anyhow::Result<Self> {
        let (log, meta) = (super::tree(db, shard, "raft_log")?, super::tree(db, shard, "raft_meta")?);
        let store = LogStore { log, meta, durable, first_index: Arc::default(), payload_bytes_max: PAYLOAD_BYTES_DEFAULT };
        let purged: Option<LogId> = store.get_meta(LAST_PURGED).map_err(|e| anyhow::anyhow!("read the last purged log id: {e}"))?;
        store.first_index.store(purged.map_or(0, |p| p.index + 1), Ordering::Release);
        Ok(store)
    }

    /// Caps the entries one AppendEntries carries at `bytes` (as stored; the request adds
    /// little around them).
    pub fn with_payload_bytes_max(mut self, bytes: usize) -> Self {
        self.payload_bytes_max = bytes;
        self
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self.meta.get(k).map_err(|e| io_err(StorageIOError::read, e))? else {
            return Ok(None);
        };
        codec::decode(&bytes).map(Some).map_err(|e| io_err(StorageIOError::read, e))
    }

    fn put_meta<T: serde::Serialize>(&self, k: &[u8], v: &T) -> Result<(), StorageError> {
        self.meta.insert(k, codec::encode(v)).map_err(|e| io_err(StorageIOError::write, e))?;
        Ok(())
    }

    async fn sync(&self) -> Result<(), StorageError> {
        self.durable.sync_async().await.map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    /// The id of the log's last entry, purged or not.
    pub(super) fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED)?;
        // A log purged to its end (its entries perhaps not yet removed) ends at the last
        // purged id.
        Ok(match (self.last_entry_id()?, last_purged_log_id) {
            (Some(last), Some(purged)) if last.index <= purged.index => Some(purged),
            (last, purged) => last.or(purged),
        })
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let Some((_, bytes)) = self.log.last().map_err(|e| io_err(StorageIOError::read_logs, e))? else {
            return Ok(None);
        };
        let entry: Entry<TypeConfig> = codec::decode(&bytes).map_err(|e| io_err(StorageIOError::read_logs, e))?;
        Ok(Some(entry.log_id))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        self.read_entries(range, usize::MAX)
    }

    /// A prefix of `[start, end)` of at most `payload_bytes_max` bytes, and never empty
    /// when the range holds an entry: what one AppendEntries carries.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        self.read_entries(start..end, self.payload_bytes_max)
    }
}

impl LogStore {
    /// The entries of `range` not purged, in order, stopping before the one that would
    /// take their stored size past `bytes_max` (the first is always returned).
    fn read_entries(&self, range: impl RangeBounds<u64>, bytes_max: usize) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let start = start.max(self.first_index.load(Ordering::Acquire));
        let (mut entries, mut bytes) = (Vec::new(), 0usize);
        for item in self.log.range(key(start)..) {
            let (k, v) = item.map_err(|e| io_err(StorageIOError::read_logs, e))?;
            let index = u64::from_be_bytes(k.as_ref().try_into().expect("log keys are 8 bytes"));
            bytes = bytes.saturating_add(v.len());
            if !range.contains(&index) || (!entries.is_empty() && bytes > bytes_max) {
                break;
            }
            let entry: Entry<TypeConfig> = codec::decode(&v).map_err(|e| io_err(StorageIOError::read_logs, e))?;
            assert_eq!(entry.log_id.index, index, "log entry stored under the wrong index");
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED)?;
        Ok(LogState { last_purged_log_id, last_log_id: self.last_log_id()? })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)?;
        // A vote must be on disk before it is answered: otherwise a restarted node could
        // vote twice in one term.
        self.durable.sync_async().await.map_err(|e| io_err(StorageIOError::write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: it only lets a restarted node re-apply its log sooner.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // Plain inserts, not a sled batch: every sled batch rolls sled's I/O buffer twice
        // (each roll a write on its I/O pool), and a Raft append needs no atomicity —
        // sled recovers a prefix of its writes, and a prefix of the entries is a valid
        // log, none of them acknowledged before the sync below.
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let _plain = super::plain_while_catching_up(&self.log, entries.len());
        for entry in entries {
            self.log.insert(key(entry.log_id.index), codec::encode(&entry)).map_err(|e| io_err(StorageIOError::write_logs, e))?;
        }
        // Only entries on disk may be reported as flushed: Raft counts them towards a
        // commit quorum the moment the callback fires. The group-commit task fires it
        // after the next sync; returning now lets Raft go on meanwhile.
        self.durable.after_sync(Waiter::Log(callback));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(key(log_id.index)..).keys() {
            batch.remove(k.map_err(|e| io_err(StorageIOError::write_logs, e))?);
        }
        self.log.apply_batch(batch).map_err(|e| io_err(StorageIOError::write_logs, e))?;
        self.sync().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point durably first: from then on openraft reads nothing at or
        // below it, and a crash midway never leaves a log that starts later than
        // `last_purged` says.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.sync().await?;
        self.first_index.fetch_max(log_id.index + 1, Ordering::Release);
        // Removing the entries themselves is background work: openraft awaits `purge`
        // inside its core loop, and thousands of removes in one sled batch hold sled's
        // global write lock (30–105 ms measured), stalling the core and every apply of
        // the node meanwhile. Leftovers (a crash midway) are covered by the next purge's
        // range.
        let log = self.log.clone();
        tokio::spawn(background::run_low_priority("log-purge", move || remove_through(&log, log_id.index)));
        Ok(())
    }
}

/// Removes the entries up to `index`, one by one (each remove takes sled's write lock only
/// for itself).
fn remove_through(log: &sled::Tree, index: u64) {
    for k in log.range(..=key(index)).keys() {
        if let Err(e) = k.and_then(|k| log.remove(k)) {
            tracing::warn!(error = %e, "removing purged log entries failed; the next purge retries");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// A crash between recording the purge point and removing the entries leaves them in
    /// the tree: a restarted store must neither read them nor count them as its log.
    #[tokio::test]
    async fn entries_left_behind_by_a_purge_are_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = LogStore::new(&db, Durable::new(db.clone(), None, crate::storage::Disk::default())).unwrap();
        for i in 1..=10 {
            let entry = Entry::<TypeConfig> { log_id: log_id(i), payload: EntryPayload::Blank };
            store.log.insert(key(i), codec::encode(&entry)).unwrap();
        }
        store.put_meta(LAST_PURGED, &log_id(6)).unwrap();

        let mut restarted = LogStore::new(&db, Durable::new(db.clone(), None, crate::storage::Disk::default())).unwrap();
        let read: Vec<u64> = restarted.try_get_log_entries(0..=10).await.unwrap().iter().map(|e| e.log_id.index).collect();
        assert_eq!(read, vec![7, 8, 9, 10]);
        let state = restarted.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(6)), Some(log_id(10))));

        // Purged past its end (as by an installed snapshot), the log ends at the purge
        // point even before the removal ran.
        restarted.put_meta(LAST_PURGED, &log_id(12)).unwrap();
        let state = LogStore::new(&db, Durable::new(db.clone(), None, crate::storage::Disk::default())).unwrap().get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(12)));
        assert!(LogStore::new(&db, Durable::new(db.clone(), None, crate::storage::Disk::default()))
            .unwrap()
            .try_get_log_entries(0..)
            .await
            .unwrap()
            .is_empty());
    }

    /// One AppendEntries carries a prefix of the range no larger than the cap (a peer
    /// refuses a frame over its limit, and a refused request would be sent again as is),
    /// and never nothing.
    #[tokio::test]
    async fn a_read_for_one_request_stops_at_the_byte_cap() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let one = codec::encode(&Entry::<TypeConfig> { log_id: log_id(1), payload: EntryPayload::Blank }).len();
        let mut store = LogStore::new(&db, Durable::new(db.clone(), None, crate::storage::Disk::default())).unwrap().with_payload_bytes_max(3 * one);
        for i in 1..=10 {
            let entry = Entry::<TypeConfig> { log_id: log_id(i), payload: EntryPayload::Blank };
            store.log.insert(key(i), codec::encode(&entry)).unwrap();
        }
        let indexes = |v: Vec<Entry<TypeConfig>>| v.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
        assert_eq!(indexes(store.limited_get_log_entries(2, 11).await.unwrap()), vec![2, 3, 4]);
        assert_eq!(indexes(store.limited_get_log_entries(9, 11).await.unwrap()), vec![9, 10]);
        // The whole-range read is not capped.
        assert_eq!(store.try_get_log_entries(1..=10).await.unwrap().len(), 10);
        // A cap below one entry still sends one: replication always moves.
        let mut tiny = store.with_payload_bytes_max(1);
        assert_eq!(indexes(tiny.limited_get_log_entries(5, 11).await.unwrap()), vec![5]);
    }

    /// A replica marked removed from its group is deleted at the next open only if its log
    /// still ends where it ended when marked; one that got entries since (it was added
    /// back, as a learner first) keeps its data and loses the mark.
    #[tokio::test]
    async fn a_removed_replica_is_deleted_only_if_its_log_did_not_move() {
        let (dir, snapshots) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(snapshots.path().join("raft-snapshot.bin"), b"x").unwrap();
        let db = sled::open(dir.path()).unwrap();
        let durable = Durable::new(db.clone(), None, crate::storage::Disk::default());
        let store = LogStore::for_shard(&db, 1, durable.clone()).unwrap();
        let meta = crate::storage::tree(&db, 1, "sm_meta").unwrap();
        let append = |upto: u64| {
            for i in 1..=upto {
                let entry = Entry::<TypeConfig> { log_id: log_id(i), payload: EntryPayload::Blank };
                store.log.insert(key(i), codec::encode(&entry)).unwrap();
            }
        };
        let mark = |at: Option<u64>| meta.insert(super::super::state_machine::DROPPED, codec::encode(&at)).unwrap();

        // Added back: entries 6 and 7 came after the mark at 5.
        append(7);
        mark(Some(5));
        super::super::wipe_if_dropped(&db, 1, snapshots.path(), &durable).unwrap();
        assert_eq!(store.last_log_id().unwrap(), Some(log_id(7)), "kept");
        assert!(snapshots.path().join("raft-snapshot.bin").exists());
        assert!(!meta.contains_key(super::super::state_machine::DROPPED).unwrap(), "the stale mark is gone");

        // Still where it was marked: every tree of the shard goes, shard 0's stay.
        mark(Some(7));
        drop((store, meta));
        db.open_tree("raft_log").unwrap().insert(b"zero", b"kept".as_slice()).unwrap();
        super::super::wipe_if_dropped(&db, 1, snapshots.path(), &durable).unwrap();
        assert!(crate::storage::tree(&db, 1, "raft_log").unwrap().is_empty(), "shard 1's log deleted");
        assert!(!snapshots.path().join("raft-snapshot.bin").exists(), "and its snapshot file");
        assert!(!crate::storage::tree(&db, 1, "sm_meta").unwrap().contains_key(super::super::state_machine::DROPPED).unwrap());
        assert_eq!(db.open_tree("raft_log").unwrap().get(b"zero").unwrap().as_deref(), Some(b"kept".as_slice()));

        // Shard 0 is never deleted, marked or not.
        db.open_tree("sm_meta").unwrap().insert(super::super::state_machine::DROPPED, codec::encode(&None::<u64>)).unwrap();
        super::super::wipe_if_dropped(&db, 0, snapshots.path(), &durable).unwrap();
        assert_eq!(db.open_tree("raft_log").unwrap().get(b"zero").unwrap().as_deref(), Some(b"kept".as_slice()));
    }
}
