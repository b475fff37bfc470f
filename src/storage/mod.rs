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

pub mod background;
pub mod digest;
pub mod emitted;
pub mod install;
pub mod log_store;
pub mod snapshot_data;
pub mod snapshot_file;
pub mod state_machine;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::LogFlushed;
use tokio::sync::{mpsc, oneshot};

use crate::config::Durability;
use crate::raft::TypeConfig;

pub use log_store::LogStore;
pub use state_machine::{SmReader, StateMachineStore};

/// A disk failure injected at the sync (a test hook, `PUT /v1/admin/disk`): sled writes
/// into memory and its file's page cache, so a failing or full disk shows itself when
/// that is made durable — which is where the hook fails it.
/// Spelled the same in the admin API, `agora cluster disk` and chaos scenarios.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFault {
    #[default]
    None,
    /// Every sync fails with EIO (a failing device).
    SyncError,
    /// Every sync fails with ENOSPC (a full disk).
    Full,
}

impl DiskFault {
    /// As the command line and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            DiskFault::None => "none",
            DiskFault::SyncError => "sync-error",
            DiskFault::Full => "full",
        }
    }
}

/// The node's disk: the fault injected, and whether a sync has failed. After a failed
/// fsync the kernel may have dropped the dirty pages and still report the next fsync as
/// done, so no later sync can vouch for what was written before: once one fails, every
/// later one fails too, and the node acknowledges nothing more until it is restarted
/// (its DC then brings it up to date from its log on disk and the leader's).
#[derive(Clone, Default)]
pub struct Disk {
    fault: Arc<std::sync::Mutex<DiskFault>>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Disk {
    pub fn inject(&self, fault: DiskFault) {
        *self.fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = fault;
    }

    pub fn fault(&self) -> DiskFault {
        *self.fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A sync has failed: this node's storage can vouch for nothing until a restart.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Syncs, unless a sync failed before or a fault is injected; a failure is final.
    fn sync(&self, db: &sled::Db, file: Option<&File>) -> std::io::Result<()> {
        let r = if self.failed() {
            Err(std::io::Error::other("an earlier sync failed: restart the node"))
        } else {
            match self.fault() {
                DiskFault::None => sync(db, file),
                DiskFault::SyncError => Err(std::io::Error::from_raw_os_error(5)),
                DiskFault::Full => Err(std::io::Error::from_raw_os_error(28)),
            }
        };
        if r.is_err() && !self.failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(error = ?r.as_ref().err(), "storage sync failed: this node acknowledges no more writes until it is restarted");
        }
        r
    }
}

/// Makes everything written to the db so far durable, to the configured level.
#[derive(Clone)]
pub struct Durable {
    /// The group-commit task: one sync covers every request queued while the last ran.
    flusher: mpsc::UnboundedSender<Waiter>,
}

/// Someone waiting for their writes to be durable.
pub enum Waiter {
    /// openraft's append callback (log entries).
    Log(LogFlushed<TypeConfig>),
    Notify(oneshot::Sender<std::io::Result<()>>),
}

impl Durable {
    /// `file` is sled's single data file; `Some` when fdatasync is wanted.
    fn new(db: sled::Db, file: Option<Arc<File>>, disk: Disk) -> Self {
        let (flusher, rx) = mpsc::unbounded_channel();
        // The task holds no sender, so it ends when the last Durable is dropped.
        tokio::spawn(group_commit(db, file, disk, rx));
        Durable { flusher }
    }

    /// Queues `w` to be told once everything written before this call is durable.
    pub fn after_sync(&self, w: Waiter) {
        if let Err(mpsc::error::SendError(w)) = self.flusher.send(w) {
            complete(w, &Err(std::io::Error::other("storage flusher stopped")));
        }
    }

    /// Waits until everything written so far is durable.
    pub async fn sync_async(&self) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.after_sync(Waiter::Notify(tx));
        rx.await.map_err(|_| std::io::Error::other("storage flusher stopped"))?
    }
}

fn sync(db: &sled::Db, file: Option<&File>) -> std::io::Result<()> {
    db.flush().map_err(std::io::Error::other)?;
    if let Some(f) = file {
        f.sync_data()?;
    }
    Ok(())
}

fn complete(w: Waiter, r: &std::io::Result<()>) {
    let r = r.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
    match w {
        Waiter::Log(cb) => cb.log_io_completed(r),
        Waiter::Notify(tx) => {
            let _ = tx.send(r);
        }
    }
}

/// Group commit: takes every waiter queued so far, syncs once on the blocking pool, and
/// answers them in order. Under load one fsync covers many Raft appends.
async fn group_commit(db: sled::Db, file: Option<Arc<File>>, disk: Disk, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(w) = rx.try_recv() {
            batch.push(w);
        }
        let (db, file, disk) = (db.clone(), file.clone(), disk.clone());
        let r = tokio::task::spawn_blocking(move || disk.sync(&db, file.as_deref())).await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        for w in batch {
            complete(w, &r);
        }
    }
}

/// Opens (or creates) a node's data dir and returns its log store and state machine.
pub fn open(dir: &Path, dc: &str, durability: Durability, cache_bytes: u64, cache_entities_max: usize) -> anyhow::Result<(LogStore, StateMachineStore)> {
    let sled = SledOptions { durability, cache_bytes, segment_bytes: 0, compression_level: 0, compress_updates: true };
    let mut shards = open_shards(dir, dc, 1, sled, cache_entities_max, Disk::default())?;
    Ok(shards.remove(0))
}

/// How a node's sled database is opened.
#[derive(Debug, Clone, Copy)]
pub struct SledOptions {
    pub durability: Durability,
    /// sled's page cache, shared by every shard.
    pub cache_bytes: u64,
    /// sled's segment size (0: sled's default).
    pub segment_bytes: usize,
    /// zstd level of sled's pages (0: not compressed; negative: zstd's fast levels).
    pub compression_level: i8,
    /// With compressed pages, whether updates to a page are compressed too.
    pub compress_updates: bool,
}

/// The layout sled fixed when it created a data dir (its `conf` file): it refuses to
/// open the dir with another segment size or compression switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    segment_bytes: usize,
    compressed: bool,
}

impl Layout {
    /// The layout of the sled db in `dir`, if there is one. sled's `conf` is text lines
    /// (`segment_size: N`, `use_compression: B`, ...) followed by a checksum.
    fn stored(dir: &Path) -> Option<Layout> {
        let conf = std::fs::read(dir.join("conf")).ok()?;
        let conf = String::from_utf8_lossy(&conf);
        let field = |name: &str| conf.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ").map(|v| v.trim().to_string()));
        Some(Layout { segment_bytes: field("segment_size")?.parse().ok()?, compressed: field("use_compression")?.parse().ok()? })
    }
}

/// sled's configuration for `dir`: the options asked for, except that a dir sled already
/// created keeps the segment size and compression switch it was created with (a warning
/// says when they differ from what was asked; the compression level may change).
fn sled_config(dir: &Path, sled: SledOptions) -> sled::Config {
    let asked = Layout { segment_bytes: sled.segment_bytes, compressed: sled.compression_level != 0 };
    let layout = match Layout::stored(dir) {
        Some(stored) => {
            let differs = stored.compressed != asked.compressed || (asked.segment_bytes > 0 && stored.segment_bytes != asked.segment_bytes);
            if differs {
                tracing::warn!(dir = %dir.display(), ?stored, ?asked, "the data dir keeps the sled layout it was created with; a new one applies to new data dirs only");
            }
            stored
        }
        None => asked,
    };
    let mut config = sled::Config::new().path(dir).cache_capacity(sled.cache_bytes).use_compression(layout.compressed);
    if layout.compressed {
        // A compressed dir opened with compression off in the config: level 1.
        let level = if sled.compression_level == 0 { 1 } else { sled.compression_level };
        config = config.compression_factor(i32::from(level)).compress_links(sled.compress_updates);
    }
    if layout.segment_bytes > 0 {
        config = config.segment_size(layout.segment_bytes);
    }
    config
}

/// Opens (or creates) a node's data dir and returns the log store and state machine of
/// each of its `shards` Raft groups: one sled database, a set of trees per shard (shard
/// 0's under the names a one-group node always used), one group commit for them all (one
/// sync covers the appends of every shard), and a snapshot file per shard.
/// `cache_entities_max` is split between the shards.
pub fn open_shards(
    dir: &Path,
    dc: &str,
    spread: impl Into<crate::ids::Spread>,
    sled: SledOptions,
    cache_entities_max: usize,
    disk: Disk,
) -> anyhow::Result<Vec<(LogStore, StateMachineStore)>> {
    let spread = spread.into();
    let shards = spread.count;
    std::fs::create_dir_all(dir)?;
    // We flush when Raft needs it; the background flush only bounds what an unsynced
    // state-machine write may lose, which the log replays anyway.
    let config = sled_config(dir, sled).flush_every_ms(Some(1000));
    let started = std::time::Instant::now();
    let db = config.open().map_err(|e| anyhow::anyhow!("open sled db in {}: {e}", dir.display()))?;
    // sled 0.34 writes its page table's snapshot only when it opens, so an open reads
    // every segment written since the last one: a node that ran long starts slowly.
    let file_bytes = std::fs::metadata(dir.join("db")).map(|m| m.len()).unwrap_or(0);
    tracing::info!(ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), file_bytes, dir = %dir.display(), "opened the data dir");
    check_format(&db, dir)?;
    let file = match sled.durability {
        Durability::Fsync => Some(Arc::new(File::open(dir.join("db"))?)),
        Durability::Flush => None,
    };
    let durable = Durable::new(db.clone(), file, disk);
    let per_shard = cache_entities_max / usize::from(shards.max(1));
    (0..shards)
        .map(|shard| {
            let snapshot_dir = shard_dir(dir, shard);
            wipe_if_dropped(&db, shard, &snapshot_dir, &durable)?;
            std::fs::create_dir_all(&snapshot_dir)?;
            let log = LogStore::for_shard(&db, shard, durable.clone())?;
            let sm = StateMachineStore::new(&db, (shard, spread), snapshot_file::SnapshotFiles::in_dir(&snapshot_dir), durable.clone(), per_shard.max(1), dc)?;
            Ok((log, sm))
        })
        .collect()
}

/// Deletes shard `shard`'s trees and snapshot files if its replica here was removed from
/// the group (marked by `StateMachineStore::mark_dropped`): the shard then starts empty,
/// as on a node that never held it, and a membership change that brings it back sends a
/// snapshot. Without this a replica moved away would keep its data on disk for good.
/// Shard 0 is never marked (its trees carry no prefix to tell them apart).
fn wipe_if_dropped(db: &sled::Db, shard: u16, snapshot_dir: &Path, durable: &Durable) -> anyhow::Result<()> {
    // No handle on the shard's trees is kept across their removal.
    let Some(mark) = tree(db, shard, "sm_meta")?.get(state_machine::DROPPED)?.filter(|_| shard != 0) else { return Ok(()) };
    let dropped_at: Option<u64> = crate::codec::decode(&mark).map_err(|e| anyhow::anyhow!("shard {shard}'s removal mark: {e}"))?;
    let log = LogStore::for_shard(db, shard, durable.clone())?;
    let now_at = log.last_log_id().map_err(|e| anyhow::anyhow!("shard {shard}'s log: {e}"))?.map(|l| l.index);
    drop(log);
    if now_at != dropped_at {
        // Entries came after the removal: the node was added back. Its data stays.
        tracing::info!(shard, ?dropped_at, ?now_at, "a replica marked removed got entries since: kept");
        tree(db, shard, "sm_meta")?.remove(state_machine::DROPPED)?;
        return Ok(());
    }
    let prefix = format!("s{shard}/");
    let mut trees = 0;
    for name in db.tree_names() {
        if name.starts_with(prefix.as_bytes()) {
            db.drop_tree(&name)?;
            trees += 1;
        }
    }
    let mut files = 0;
    for e in std::fs::read_dir(snapshot_dir).into_iter().flatten().flatten() {
        if e.path().is_file() {
            std::fs::remove_file(e.path())?;
            files += 1;
        }
    }
    db.flush()?;
    tracing::warn!(shard, trees, files, "deleted the data of a replica removed from its group");
    Ok(())
}

/// Where shard `shard` keeps its snapshot file: the data dir for shard 0, `shard-N/` in
/// it for the others.
fn shard_dir(dir: &Path, shard: u16) -> std::path::PathBuf {
    if shard == 0 {
        dir.to_path_buf()
    } else {
        dir.join(format!("shard-{shard}"))
    }
}

/// Shard `shard`'s tree `name`: shard 0 keeps the plain names, the others are prefixed.
pub(crate) fn tree(db: &sled::Db, shard: u16, name: &str) -> sled::Result<sled::Tree> {
    if shard == 0 {
        db.open_tree(name)
    } else {
        db.open_tree(format!("s{shard}/{name}"))
    }
}

/// A replica that is far behind its leader (restarted, or rejoining after a snapshot)
/// receives and applies entries a whole AppendEntries at a time; one in step gets them one
/// or two at a time. At this many entries per write it is catching up.
const CATCH_UP_ENTRIES: usize = 8;

/// While a replica catches up, its page updates are stored uncompressed, as during a
/// snapshot install: replaying a log rewrites the same pages over and over, and each
/// compressed update is a zstd frame of its own (a third of a catching-up follower's CPU).
/// The pages' next consolidations still compress them whole.
pub(crate) fn plain_while_catching_up(tree: &sled::Tree, entries: usize) -> Option<sled::PlainUpdates> {
    (entries >= CATCH_UP_ENTRIES).then(|| tree.plain_updates())
}

/// The record format a data dir was written in, kept under this key of the default tree.
const FORMAT_KEY: &[u8] = b"agora-format";

/// A data dir written in another record format than this build's is refused at start
/// with a message, rather than read as garbage later. A data dir without the marker but
/// with data predates it: format 1.
fn check_format(db: &sled::Db, dir: &Path) -> anyhow::Result<()> {
    let found = match db.get(FORMAT_KEY)? {
        Some(v) => v.first().copied().unwrap_or(0),
        None if !has_data(db) => {
            db.insert(FORMAT_KEY, &[crate::codec::FORMAT_VERSION])?;
            db.flush()?;
            return Ok(());
        }
        None => 1,
    };
    if (crate::codec::FORMAT_VERSION_MIN..=crate::codec::FORMAT_VERSION).contains(&found) {
        return Ok(());
    }
    anyhow::bail!(
        "{}: data written in record format {found}, this build reads {}..={}: start the build that wrote it, or move the data dir away (the node then catches up from its DC)",
        dir.display(),
        crate::codec::FORMAT_VERSION_MIN,
        crate::codec::FORMAT_VERSION
    )
}

fn has_data(db: &sled::Db) -> bool {
    db.tree_names().iter().any(|name| db.open_tree(name).map(|t| !t.is_empty()).unwrap_or(true))
}

/// Turns any error into openraft's storage error for the given operation.
pub(crate) fn io_err<E: std::error::Error + 'static>(make: fn(openraft::AnyError) -> openraft::StorageIOError<u64>, e: E) -> openraft::StorageError<u64> {
    openraft::StorageError::IO { source: make(openraft::AnyError::new(&e)) }
}

/// Where a stopped node's data dir's bytes go: per sled tree, and in the `state` tree per
/// record kind (its two-byte key prefix), the records and their key and value bytes; and
/// the files of the dir. Opens sled, so the node must not be running.
pub fn usage(dir: &Path) -> anyhow::Result<serde_json::Value> {
    use std::collections::BTreeMap;
    anyhow::ensure!(dir.join("conf").is_file() && dir.join("db").is_file(), "{} holds no sled database", dir.display());
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        let bytes = if m.is_dir() { std::fs::read_dir(e.path())?.filter_map(|f| f.ok()?.metadata().ok()).map(|m| m.len()).sum() } else { m.len() };
        files.insert(e.file_name().to_string_lossy().into_owned(), bytes);
    }
    // Asked for the dir's own layout, so opening it warns of no difference.
    let layout = Layout::stored(dir);
    let options = SledOptions {
        durability: Durability::Flush,
        cache_bytes: 64 << 20,
        segment_bytes: layout.map_or(0, |l| l.segment_bytes),
        compression_level: i8::from(layout.is_some_and(|l| l.compressed)),
        compress_updates: true,
    };
    let db = sled_config(dir, options).open().map_err(|e| anyhow::anyhow!("open sled db in {}: {e}", dir.display()))?;
    let mut trees = BTreeMap::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        let mut kinds: BTreeMap<String, [u64; 3]> = BTreeMap::new();
        for item in tree.iter() {
            let (k, v) = item?;
            let kind = if name.ends_with(b"state") { String::from_utf8_lossy(&k[..k.len().min(2)]).into_owned() } else { "all".to_string() };
            let c = kinds.entry(kind).or_default();
            c[0] += 1;
            c[1] += k.len() as u64;
            c[2] += v.len() as u64;
        }
        let kinds: BTreeMap<String, serde_json::Value> =
            kinds.into_iter().map(|(kind, [n, kb, vb])| (kind, serde_json::json!({"records": n, "key_bytes": kb, "value_bytes": vb}))).collect();
        trees.insert(String::from_utf8_lossy(&name).into_owned(), kinds);
    }
    Ok(serde_json::json!({"files": files, "trees": trees}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data dir created with another segment size still opens for `usage`, which counts
    /// the state's records by kind; a dir without sled is refused, not turned into one.
    #[test]
    fn usage_reads_a_data_dir_of_any_segment_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = sled::Config::new().path(dir.path()).segment_size(1 << 20).open().expect("open sled");
            db.open_tree("state").expect("tree").insert(b"o/1", b"order".as_slice()).expect("insert");
            db.flush().expect("flush");
        }
        let u = usage(dir.path()).expect("usage");
        assert!(u["files"]["db"].as_u64().is_some(), "{u}");
        assert_eq!(u["trees"]["state"]["o/"]["records"], 1, "{u}");
        let compressed = tempfile::tempdir().expect("temp dir");
        {
            let db = sled::Config::new().path(compressed.path()).use_compression(true).open().expect("open sled");
            db.open_tree("state").expect("tree").insert(b"o/1", b"order".as_slice()).expect("insert");
            db.flush().expect("flush");
        }
        assert_eq!(usage(compressed.path()).expect("usage of a compressed dir")["trees"]["state"]["o/"]["records"], 1);
        let empty = tempfile::tempdir().expect("temp dir");
        assert!(usage(empty.path()).is_err());
        assert!(!empty.path().join("db").exists());
    }
}

#[cfg(test)]
mod compressed_pages {
    /// Runs of one byte value, so that pages compress; the low byte of a counter.
    fn value(i: usize) -> Vec<u8> {
        let len = match i % 500 {
            0 => 300_000, // a blob
            n => 1 + n * 37 % 2_000,
        };
        (0..len).map(|j| (i * 31 + j / 7).to_le_bytes()[0]).collect()
    }

    fn config(dir: &std::path::Path, compress_updates: bool) -> sled::Config {
        sled::Config::new().path(dir).use_compression(true).compress_links(compress_updates).cache_capacity(1 << 20)
    }

    fn write(tree: &sled::Tree, records: std::ops::Range<usize>) {
        records.for_each(|i| drop(tree.insert(i.to_be_bytes(), value(i)).expect("insert")));
        tree.flush().expect("flush");
    }

    /// Every record read back whole after a reopen, from compressed pages the reopen
    /// recovered from the log and reads that miss a small cache: sled's pages are
    /// decompressed with a context kept per thread (`vendor/sled`), reused across pages
    /// of any size, inline or blobs. The records are written in three opens, with
    /// updates compressed, then stored as they are, then compressed again, so that the
    /// pages read back mix both kinds.
    #[test]
    fn compressed_pages_read_back_whole_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (records, compress_updates) in [(0..2_000, true), (2_000..4_000, false), (4_000..5_000, true)] {
            let db = super::when_unlocked(|| config(dir.path(), compress_updates).open()).expect("open sled");
            write(&db.open_tree("state").expect("tree"), records);
        }
        let db = super::when_unlocked(|| config(dir.path(), true).open()).expect("reopen");
        let tree = db.open_tree("state").expect("tree");
        for pass in 0..2 {
            for i in 0..5_000usize {
                let got = tree.get(i.to_be_bytes()).expect("get").unwrap_or_else(|| panic!("record {i} missing (pass {pass})"));
                assert_eq!(got.as_ref(), value(i).as_slice(), "record {i} (pass {pass})");
            }
        }
    }

    /// With `compress_links` off, updates are stored as they are: the same compressible
    /// records take more disk than with every message compressed.
    #[test]
    fn updates_stored_as_they_are_take_more_disk() {
        let size = |compress_updates: bool| {
            let dir = tempfile::tempdir().expect("temp dir");
            let db = config(dir.path(), compress_updates).open().expect("open sled");
            write(&db.open_tree("state").expect("tree"), 1..2_000);
            db.size_on_disk().expect("size")
        };
        let (compressed, as_they_are) = (size(true), size(false));
        assert!(as_they_are > compressed.saturating_add(compressed / 4), "{as_they_are} bytes with updates as they are, {compressed} compressed");
    }
}

/// Opens again a db this process has just closed: sled's flusher thread holds the
/// file's lock for a moment after the last handle is dropped, and an open meanwhile
/// fails with "could not acquire lock". Any other outcome is returned at once. It waits
/// on the thread: not for a store whose last handle a task of the same runtime holds.
#[cfg(test)]
pub(crate) fn when_unlocked<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    fn options(segment_bytes: usize, compression_level: i8) -> SledOptions {
        SledOptions { durability: Durability::Flush, cache_bytes: 1 << 20, segment_bytes, compression_level, compress_updates: true }
    }

    /// A data dir keeps the layout sled created it with: opened later with compression
    /// off, or another segment size, it still opens (sled alone would refuse) and keeps
    /// its records; a new dir takes the layout asked for.
    #[test]
    fn a_data_dir_keeps_the_layout_it_was_created_with() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled_config(dir.path(), options(1 << 16, 3)).open().unwrap();
            db.insert(b"k", b"v".as_slice()).unwrap();
            db.flush().unwrap();
        }
        assert_eq!(Layout::stored(dir.path()), Some(Layout { segment_bytes: 1 << 16, compressed: true }));
        let db = when_unlocked(|| sled_config(dir.path(), options(0, 0)).open()).expect("reopened with the stored layout");
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(b"v".as_slice()));
        drop(db);
        assert!(when_unlocked(|| sled::Config::new().path(dir.path()).open()).is_err(), "sled alone refuses another layout");

        let plain = tempfile::tempdir().unwrap();
        drop(sled_config(plain.path(), options(0, 0)).open().unwrap());
        assert_eq!(Layout::stored(plain.path()).map(|l| l.compressed), Some(false));
        assert_eq!(Layout::stored(tempfile::tempdir().unwrap().path()), None);
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    fn open_dir(dir: &Path) -> anyhow::Result<()> {
        when_unlocked(|| open(dir, "dc1", Durability::Flush, 1 << 20, 100).map(|_| ()).map_err(|e| format!("{e:#}"))).map_err(anyhow::Error::msg)
    }

    /// A fresh dir and a dir marked with this build's format open; a dir with data
    /// but no marker (format 1) or another format is refused with a message.
    #[tokio::test]
    async fn data_of_another_format_is_refused_at_open() {
        let fresh = tempfile::tempdir().unwrap();
        open_dir(fresh.path()).expect("fresh dir opens");

        let current = tempfile::tempdir().unwrap();
        {
            let db = sled::open(current.path()).unwrap();
            db.insert(FORMAT_KEY, &[crate::codec::FORMAT_VERSION]).unwrap();
            db.open_tree("log").unwrap().insert(b"entry", &[crate::codec::FORMAT_VERSION, 0][..]).unwrap();
            db.flush().unwrap();
        }
        open_dir(current.path()).expect("data of this format opens");

        let old = tempfile::tempdir().unwrap();
        {
            let db = sled::open(old.path()).unwrap();
            db.open_tree("log").unwrap().insert(b"entry", &[1u8, 0][..]).unwrap();
            db.flush().unwrap();
        }
        let err = open_dir(old.path()).expect_err("format 1 data refused");
        assert!(format!("{err:#}").contains("record format 1"), "{err:#}");

        let future = tempfile::tempdir().unwrap();
        {
            let db = sled::open(future.path()).unwrap();
            db.insert(FORMAT_KEY, &[crate::codec::FORMAT_VERSION + 1]).unwrap();
            db.flush().unwrap();
        }
        assert!(open_dir(future.path()).is_err());
    }
}
