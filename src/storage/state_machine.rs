//! The replicated state machine in sled: one `state` tree holds every entity under a
//! kind prefix plus the applied log id and membership, so one `apply_batch` makes a
//! whole batch of Raft entries — state and progress together — atomic.
//!
//! Hot entities also stay in a bounded LRU cache (`cache_entities_max`), written through
//! on apply, which serves the actors' validation and the API's reads.
//!
//! The outbox keeps the events of one Raft entry in one record, keyed by the first
//! event's seq: an entry of many orders costs one sled insert for all its events, not two
//! per order. Grouping by entry (never by `apply` call, whose bounds differ between
//! replicas) keeps every replica's outbox byte-identical.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::digest::{DigestCache, Wanted};
use super::snapshot_data::{self, SnapshotHandle};
use super::snapshot_file::{Current, SnapshotFiles, WritebackFile};
use super::{background, install, io_err, Durable};
use crate::codec;
use crate::domain::apply::EXPIRY_PREFIX;
use crate::domain::command::{DuplicateSet, IdempotencyRecord};
use crate::domain::{apply, Change, DcSettings, Event, Inventory, Order, Outcome, Request, Session, State};
use crate::raft::{LogId, NodeId, StorageError, TypeConfig};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

const APPLIED: &[u8] = b"m/applied";
const MEMBERSHIP: &[u8] = b"m/membership";
/// Where a node kept its snapshot before it had files (meta tree).
const SNAPSHOT: &[u8] = b"snapshot";
/// Present in the meta tree once this node's replica was removed from its group by a
/// committed change, holding the index its log ended at then: the next start deletes the
/// shard's data if the log still ends there (`super::wipe_if_dropped`).
pub(super) const DROPPED: &[u8] = b"dropped";
/// Present in the state tree while a snapshot is installed, removed in the install's last
/// batch: a node that finds it at start resumes the install.
const INSTALLING: &[u8] = b"m/installing";

/// Key prefixes of the entity kinds, also the digest's kinds.
pub const KINDS: [(&str, &[u8]); 4] = [("sessions", b"s/"), ("inventory", b"i/"), ("orders", b"o/"), ("settings", b"f/")];

fn session_key(token: &str) -> Vec<u8> {
    [b"s/", token.as_bytes()].concat()
}
fn inventory_key(sku: &str) -> Vec<u8> {
    [b"i/", sku.as_bytes()].concat()
}
fn order_key(id: &str) -> Vec<u8> {
    [b"o/", id.as_bytes()].concat()
}
fn idempotency_key(k: &str) -> Vec<u8> {
    [b"k/", k.as_bytes()].concat()
}
fn duplicates_key(scope: &str) -> Vec<u8> {
    [b"d/", scope.as_bytes()].concat()
}
/// A logout recorded outside the session's shard (not an entity: no digest kind).
fn revoked_key(token: &str) -> Vec<u8> {
    [b"v/", token.as_bytes()].concat()
}
fn cursor_key(origin: &str) -> Vec<u8> {
    [b"c/", origin.as_bytes()].concat()
}
/// An outbox record: the events one entry emitted, from seq `first_seq` on. (`x/` held
/// one event per record in earlier versions; such records are no longer read, and a DC
/// that still needed them is caught up from a snapshot.)
fn outbox_key(first_seq: u64) -> Vec<u8> {
    [OUTBOX.as_slice(), &first_seq.to_be_bytes()].concat()
}
const OUTBOX: &[u8; 2] = b"y/";
fn outbox_first_seq(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[OUTBOX.len()..].try_into().expect("outbox key holds a seq"))
}
const OUT_SEQ: &[u8] = b"m/out_seq";
fn settings_key(dc: &str) -> Vec<u8> {
    [b"f/", dc.as_bytes()].concat()
}

/// How a node kept its snapshot before format 3 (meta and data in one encoded value, in
/// `raft-snapshot.bin` or, earlier still, in sled). Read once at start, to convert it.
#[derive(Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// A legacy snapshot's records. Its data was format 2 (a tag, the body's length, its
/// SHA-256, the body) or format 1 (the body alone); the body, the encoded records.
fn legacy_records(data: &[u8]) -> Result<Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>, String> {
    const TAG: &[u8; 8] = b"AGSNAP02";
    const HEADER: usize = 8 + 8 + 32;
    let body = match data.strip_prefix(TAG) {
        None => data,
        Some(_) if data.len() < HEADER => return Err("format-2 snapshot shorter than its header".into()),
        Some(_) => {
            let len = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
            let end = usize::try_from(len).ok().and_then(|l| HEADER.checked_add(l)).filter(|e| *e <= data.len()).ok_or("format-2 snapshot cut short")?;
            let body = &data[HEADER..end];
            if Sha256::digest(body).as_slice() != &data[16..HEADER] {
                return Err("format-2 snapshot checksum mismatch".into());
            }
            body
        }
    };
    codec::decode(body).map_err(|e| format!("legacy snapshot records do not decode: {e}"))
}

/// Keys removed per sled batch while a snapshot is installed, and the bytes of records
/// written per batch after: sled holds a batch, and what it replaces until its epoch
/// ends, in memory.
const INSTALL_BATCH: usize = 4096;

/// Shared by the state machine (writer) and every reader.
struct Inner {
    /// The DC this node belongs to: the origin of what it emits.
    dc: String,
    /// Which shard this is, of the entities' spread: which sessions live here.
    shard: u16,
    shards: crate::ids::Spread,
    tree: sled::Tree,
    meta: sled::Tree,
    snapshots: SnapshotFiles,
    durable: Durable,
    /// Hot records by key, and keys known to be absent (a new order's id is looked up
    /// by validation and again by apply); std Mutex because no await happens while it
    /// is held. `IVec` shares its bytes, so a hit copies nothing.
    cache: Mutex<lru::LruCache<Vec<u8>, Option<sled::IVec>>>,
    /// Held while a batch is written (and while a cache miss is filled).
    write_lock: Mutex<Writer>,
    /// A snapshot install is writing the tree: reads fill no cache (see `Installing`).
    installing: AtomicBool,
    /// One snapshot build or install at a time, from its start to its commit.
    snapshot_lock: Mutex<()>,
    snapshot_seq: std::sync::atomic::AtomicU64,
    /// What the snapshot schedule and `/metrics` read: builds, their cost, the state's size.
    stats: SnapshotCounters,
    /// The last state digest, shared by callers that can take it.
    digests: Arc<DigestCache>,
    /// When this replica applied the outbox events it emitted (the shipper's lag).
    emitted_at: super::emitted::EmittedAt,
}

/// Counters kept by the state machine for the snapshot schedule and `/metrics`.
#[derive(Default)]
struct SnapshotCounters {
    /// Client writes applied since this process started (a batch counts its requests).
    writes: AtomicU64,
    /// `writes` when the last snapshot copy began (or was installed).
    writes_at_snapshot: AtomicU64,
    /// Records of the last snapshot built or installed (0: none since start).
    records: AtomicU64,
    /// Encoded bytes of the last snapshot built or installed.
    bytes: AtomicU64,
    builds: AtomicU64,
    build_ms_total: AtomicU64,
    build_ms_last: AtomicU64,
    installs: AtomicU64,
    /// Applies of a whole backlog at once (`storage::CATCH_UP_ENTRIES` entries or more).
    catch_up_applies: AtomicU64,
}

/// A reading of the snapshot counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Client writes applied since the last snapshot began (or since start).
    pub writes_since: u64,
    /// Records in the last snapshot built or installed (0: none since start).
    pub records: u64,
    pub bytes: u64,
    pub builds: u64,
    /// Wall time of builds: copy, encode, write and sync of the file.
    pub build_ms_total: u64,
    pub build_ms_last: u64,
    pub installs: u64,
    /// Applies of a backlog of entries at once: while it grows, the replica is catching up.
    pub catch_up_applies: u64,
}

/// What the write lock guards besides the tree: while a snapshot copies the tree without
/// the lock, the value every key had when the copy began, kept by the first write to it
/// since (its pre-image; `None`: the key did not exist).
#[derive(Default)]
struct Writer {
    preimages: Option<BTreeMap<Vec<u8>, Option<sled::IVec>>>,
}

impl Writer {
    /// To call before writing `keys`: a snapshot in progress keeps their current values.
    fn preserve<'k>(&mut self, tree: &sled::Tree, keys: impl IntoIterator<Item = &'k [u8]>) {
        let Some(pre) = self.preimages.as_mut() else { return };
        for k in keys {
            if !pre.contains_key(k) {
                pre.insert(k.to_vec(), tree.get(k).expect("sled read of state machine"));
            }
        }
    }
}

impl Inner {
    fn get(&self, key: &[u8]) -> Option<sled::IVec> {
        if let Some(v) = self.cache.lock().expect("cache lock").get(key) {
            return v.clone();
        }
        // Read and fill under the write lock: otherwise a value read just before an apply
        // could land in the cache just after it, and stay there stale.
        let _w = self.write_lock.lock().expect("write lock");
        // A read error from sled is a broken disk: crash rather than answer wrongly.
        let v = self.tree.get(key).expect("sled read of state machine");
        if !self.installing.load(Ordering::Relaxed) {
            self.cache.lock().expect("cache lock").put(key.to_vec(), v.clone());
        }
        v
    }

    fn get_typed<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Option<T> {
        let bytes = self.get(key)?;
        // Bytes we wrote ourselves failing to decode means corruption: crash loudly.
        Some(codec::decode(&bytes).expect("state machine record decodes"))
    }
}

/// The openraft state machine. Clone-cheap; readers get an [`SmReader`].
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

/// Read access for actors and the API.
#[derive(Clone)]
pub struct SmReader {
    inner: Arc<Inner>,
}

impl StateMachineStore {
    /// Shard `shard`'s state machine, in its own trees of the node's db.
    pub(super) fn new(
        db: &sled::Db,
        (shard, shards): (u16, crate::ids::Spread),
        snapshots: SnapshotFiles,
        durable: Durable,
        cache_entities_max: usize,
        dc: &str,
    ) -> anyhow::Result<Self> {
        let cap = NonZeroUsize::new(cache_entities_max).unwrap_or(NonZeroUsize::MIN);
        let inner = Inner {
            dc: dc.to_string(),
            shard,
            shards,
            tree: super::tree(db, shard, "state")?,
            meta: super::tree(db, shard, "sm_meta")?,
            snapshots,
            durable,
            cache: Mutex::new(lru::LruCache::new(cap)),
            write_lock: Mutex::new(Writer::default()),
            installing: AtomicBool::new(false),
            snapshot_lock: Mutex::new(()),
            snapshot_seq: Default::default(),
            stats: Default::default(),
            digests: Default::default(),
            emitted_at: Default::default(),
        };
        let store = StateMachineStore { inner: Arc::new(inner) };
        store.convert_legacy().map_err(|e| anyhow::anyhow!("snapshot of shard {shard}: {e}"))?;
        store.inner.snapshots.remove_leftovers()?;
        // The snapshot schedule waits for writes in proportion to the state's size, known
        // from the last snapshot: a restarted node that did not know it would build a
        // whole snapshot as soon as it had replayed the log since the last one.
        if let Some(current) = store.inner.snapshots.current()? {
            store.inner.stats.records.store(current.records, Ordering::Relaxed);
            store.inner.stats.bytes.store(current.bytes, Ordering::Relaxed);
        }
        Ok(store)
    }

    pub fn reader(&self) -> SmReader {
        SmReader { inner: self.inner.clone() }
    }

    fn read_applied(&self) -> Result<(Option<LogId>, Membership), StorageError> {
        let get = |k: &[u8]| self.inner.tree.get(k).map_err(|e| io_err(StorageIOError::read_state_machine, e));
        let applied = match get(APPLIED)? {
            Some(b) => codec::decode(&b).map_err(|e| io_err(StorageIOError::read_state_machine, e))?,
            None => None,
        };
        let membership = match get(MEMBERSHIP)? {
            Some(b) => codec::decode(&b).map_err(|e| io_err(StorageIOError::read_state_machine, e))?,
            None => Membership::default(),
        };
        Ok((applied, membership))
    }
}

/// Entity writes of one `apply` call (`None`: deleted), visible to later entries of the
/// same call before they are committed to sled in one batch.
struct Overlay<'a> {
    inner: &'a Inner,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Changes (with their HLC) the entry being applied emitted; `seal_entry` numbers
    /// them and writes them as one record.
    emitted: Vec<(u64, Change)>,
    /// Stock moves without a client call, for the escrow journal (only when it is on).
    moves: Vec<(String, i64)>,
    /// The outbox seqs this call has emitted so far, first and last.
    sealed: Option<(u64, u64)>,
}

impl<'a> Overlay<'a> {
    fn new(inner: &'a Inner) -> Self {
        Overlay { inner, pending: BTreeMap::new(), emitted: Vec::new(), moves: Vec::new(), sealed: None }
    }

    /// Ends one entry: its events become one outbox record.
    fn seal_entry(&mut self) {
        if self.emitted.is_empty() {
            return;
        }
        let changes = coalesce_stock(std::mem::take(&mut self.emitted));
        // 2^64 events is out of reach; wrapping would reuse seqs, so crash instead.
        let first = self.get::<u64>(OUT_SEQ.to_vec()).unwrap_or(0).checked_add(1).expect("outbox seq exhausted");
        let origin = &self.inner.dc;
        let events: Vec<Event> = changes.into_iter().zip(first..).map(|((hlc, change), seq)| Event { seq, origin: origin.clone(), hlc, change }).collect();
        let last = first.checked_add(events.len() as u64 - 1).expect("outbox seq exhausted");
        self.put(outbox_key(first), &events);
        self.put(OUT_SEQ.to_vec(), &last);
        self.sealed = Some((self.sealed.map_or(first, |(f, _)| f), last));
    }

    /// Outbox record keys that start at or before `upto`, in sled or written in this call.
    fn outbox_keys_upto(&self, upto: u64) -> Vec<Vec<u8>> {
        let range = outbox_key(0)..=outbox_key(upto);
        let mut keys: Vec<Vec<u8>> = self.inner.tree.range(range.clone()).keys().map(|k| k.expect("sled read of state machine").to_vec()).collect();
        keys.extend(self.pending.range(range).map(|(k, _)| k.clone()));
        keys.sort();
        keys.dedup();
        keys
    }
}

/// Within one entry, this DC's later stock row for a SKU supersedes its earlier ones
/// (rows are grow-only counters, merged by max): only the last is shipped, in its place.
/// An entry of many orders for one SKU then ships its orders and one row.
fn coalesce_stock(changes: Vec<(u64, Change)>) -> Vec<(u64, Change)> {
    let mut seen = std::collections::HashSet::new();
    let mut kept: Vec<(u64, Change)> = changes
        .into_iter()
        .rev()
        .filter(|(_, c)| match c {
            Change::Stock { sku, .. } | Change::StockV2 { sku, .. } => seen.insert(sku.clone()),
            _ => true,
        })
        .collect();
    kept.reverse();
    kept
}

impl Overlay<'_> {
    fn get<T: serde::de::DeserializeOwned>(&self, key: Vec<u8>) -> Option<T> {
        match self.pending.get(&key) {
            Some(Some(bytes)) => Some(codec::decode(bytes).expect("pending record decodes")),
            Some(None) => None,
            None => self.inner.get_typed(&key),
        }
    }
    fn put<T: Serialize>(&mut self, key: Vec<u8>, v: &T) {
        self.pending.insert(key, Some(codec::encode(v)));
    }
}

impl State for Overlay<'_> {
    fn local_dc(&self) -> String {
        self.inner.dc.clone()
    }
    fn holds_session(&self, token: &str) -> bool {
        crate::ids::shard_of(token, self.inner.shards) == self.inner.shard
    }
    fn session(&self, token: &str) -> Option<Session> {
        self.get(session_key(token))
    }
    fn inventory(&self, sku: &str) -> Option<Inventory> {
        self.get(inventory_key(sku))
    }
    fn order(&self, id: &str) -> Option<Order> {
        self.get(order_key(id))
    }
    fn idempotency(&self, key: &str) -> Option<IdempotencyRecord> {
        self.get(idempotency_key(key))
    }
    fn duplicates(&self, scope: &str) -> Option<DuplicateSet> {
        self.get(duplicates_key(scope))
    }
    fn cursor(&self, origin: &str) -> u64 {
        self.get(cursor_key(origin)).unwrap_or(0)
    }
    fn settings(&self, dc: &str) -> Option<DcSettings> {
        self.get(settings_key(dc))
    }
    fn put_settings(&mut self, s: DcSettings) {
        self.put(settings_key(&s.dc), &s)
    }
    fn put_session(&mut self, s: Session) {
        self.put(session_key(&s.token), &s)
    }
    fn put_inventory(&mut self, i: Inventory) {
        self.put(inventory_key(&i.sku), &i)
    }
    fn put_order(&mut self, o: Order) {
        self.put(order_key(&o.id), &o)
    }
    fn put_idempotency(&mut self, key: &str, r: IdempotencyRecord) {
        self.put(idempotency_key(key), &r)
    }
    fn remove_idempotency(&mut self, key: &str) {
        self.pending.insert(idempotency_key(key), None);
    }
    fn put_duplicates(&mut self, scope: &str, d: DuplicateSet) {
        self.put(duplicates_key(scope), &d)
    }
    fn remove_duplicates(&mut self, scope: &str) {
        self.pending.insert(duplicates_key(scope), None);
    }
    fn revoked(&self, token: &str) -> bool {
        self.get::<u64>(revoked_key(token)).is_some()
    }
    fn put_revoked(&mut self, token: &str, hlc: u64) {
        self.put(revoked_key(token), &hlc)
    }
    fn remove_revoked(&mut self, token: &str) {
        self.pending.insert(revoked_key(token), None);
    }
    fn put_expiry(&mut self, key: Vec<u8>) {
        self.pending.insert(key, Some(Vec::new()));
    }
    fn remove_expiry(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }
    /// sled's entries in the range, as this call's pending writes change them.
    fn expiry_keys(&self, range: std::ops::Range<Vec<u8>>, max: usize) -> Vec<Vec<u8>> {
        let pending: Vec<(&Vec<u8>, bool)> = self.pending.range(range.clone()).map(|(k, v)| (k, v.is_some())).collect();
        // Enough from sled that deletions pending in this call cannot leave us short.
        let removed = pending.iter().filter(|(_, present)| !present).count();
        let mut keys: std::collections::BTreeSet<Vec<u8>> =
            self.inner.tree.range(range).keys().take(max + removed).map(|k| k.expect("sled read of state machine").to_vec()).collect();
        for (k, present) in pending {
            if present {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        keys.into_iter().take(max).collect()
    }
    fn set_cursor(&mut self, origin: &str, seq: u64) {
        self.put(cursor_key(origin), &seq)
    }
    fn emit(&mut self, hlc: u64, change: Change) {
        self.emitted.push((hlc, change));
    }
    fn journals_escrow(&self) -> bool {
        crate::escrow_journal::enabled()
    }
    fn escrow_moved(&mut self, sku: &str, delta: i64) {
        self.moves.push((sku.to_string(), delta));
    }
    /// Drops events up to `upto`; a record that straddles it is rewritten with the rest,
    /// so the floor is exactly `upto + 1`.
    fn trim_outbox(&mut self, upto: u64) {
        self.seal_entry();
        for k in self.outbox_keys_upto(upto) {
            let Some(events) = self.get::<Vec<Event>>(k.clone()) else { continue };
            self.pending.insert(k, None);
            let rest: Vec<Event> = events.into_iter().filter(|e| e.seq > upto).collect();
            if let Some(first) = rest.first() {
                self.put(outbox_key(first.seq), &rest);
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        self.resume_install().await?;
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let inner = &*self.inner;
        let entries: Vec<openraft::Entry<TypeConfig>> = entries.into_iter().collect();
        // Held to the end of the apply: its sled writes come last.
        let plain = super::plain_while_catching_up(&inner.tree, entries.len());
        if plain.is_some() {
            inner.stats.catch_up_applies.fetch_add(1, Ordering::Relaxed);
        }
        let mut overlay = Overlay::new(inner);
        let mut outcomes = Vec::new();
        let mut last = None;
        let mut membership = None;
        let mut writes = 0u64;
        let mut journal = Vec::new();
        for entry in entries {
            last = Some(entry.log_id);
            outcomes.push(match entry.payload {
                EntryPayload::Blank => Outcome::Noop,
                EntryPayload::Normal(cmd) => {
                    writes += match &cmd.cmd {
                        crate::domain::Command::Batch { requests } => requests.len() as u64,
                        _ => 1,
                    };
                    let outcome = apply(&mut overlay, &cmd);
                    overlay.seal_entry();
                    if !overlay.moves.is_empty() {
                        journal.push((entry.log_id, std::mem::take(&mut overlay.moves)));
                    }
                    outcome
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    Outcome::Noop
                }
            });
        }
        let sealed = overlay.sealed;
        let pending: Vec<(Vec<u8>, Option<sled::IVec>)> = overlay.pending.into_iter().map(|(k, v)| (k, v.map(sled::IVec::from))).collect();
        let mut batch = sled::Batch::default();
        for (k, v) in &pending {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.clone()),
                None => batch.remove(k.as_slice()),
            }
        }
        batch.insert(APPLIED, codec::encode(&last));
        if let Some(m) = &membership {
            batch.insert(MEMBERSHIP, codec::encode(m));
        }
        {
            let mut w = inner.write_lock.lock().expect("write lock");
            w.preserve(&inner.tree, pending.iter().map(|(k, _)| k.as_slice()));
            inner.tree.apply_batch(batch).map_err(|e| io_err(StorageIOError::write_state_machine, e))?;
            let mut cache = inner.cache.lock().expect("cache lock");
            // The shipper reads the outbox, and expiry its indexes, from sled in ranges:
            // caching them would only push entities out.
            for (k, v) in pending.into_iter().filter(|(k, _)| !k.starts_with(OUTBOX) && !k.starts_with(EXPIRY_PREFIX)) {
                cache.put(k, v);
            }
            // Under the write lock, as a snapshot copy's start is.
            inner.stats.writes.fetch_add(writes, Ordering::Relaxed);
        }
        if let Some((first, last)) = sealed {
            inner.emitted_at.record(first, last, std::time::Instant::now());
        }
        // Once the state shows them: the journal's "applied" time bounds them from above.
        for (log_id, moves) in &journal {
            crate::escrow_journal::applied(inner.shard, log_id, moves);
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotHandle>, StorageError> {
        let (path, f) = self.inner.snapshots.create(true).map_err(|e| io_err(StorageIOError::write, e))?;
        Ok(Box::new(SnapshotHandle::new(path, f)))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, openraft::BasicNode>, snapshot: Box<SnapshotHandle>) -> Result<(), StorageError> {
        let path = self.received_file(*snapshot).await?;
        let meta = meta.clone();
        self.install(move |this| this.commit_received(&path, meta)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let files = self.inner.snapshots.clone();
        let opened = tokio::task::spawn_blocking(move || files.open_current()).await.map_err(|e| io_err(StorageIOError::read, e))?;
        let opened = opened.map_err(|e| io_err(StorageIOError::read, e))?;
        Ok(opened.map(|(c, path, f)| Snapshot { meta: c.meta, snapshot: Box::new(SnapshotHandle::new(path, f)) }))
    }
}

/// While an install writes the tree (its writer threads hold no lock), reads go to sled
/// and fill no cache: a value cached mid-install could be replaced by the install and stay
/// stale. Set and cleared under the write lock, so no read that began before fills the
/// cache after, with the cache emptied both times.
struct Installing<'a>(&'a Inner);

impl<'a> Installing<'a> {
    fn begin(inner: &'a Inner) -> Self {
        Installing::set(inner, true);
        Installing(inner)
    }

    fn set(inner: &Inner, on: bool) {
        let _w = inner.write_lock.lock().expect("write lock");
        inner.installing.store(on, Ordering::Relaxed);
        inner.cache.lock().expect("cache lock").clear();
    }
}

impl Drop for Installing<'_> {
    fn drop(&mut self) {
        Installing::set(self.0, false);
    }
}

/// A sled error as openraft's, for a write of the state machine.
fn sm_write(e: sled::Error) -> StorageError {
    io_err(StorageIOError::write_state_machine, e)
}

impl StateMachineStore {
    /// The path of a complete snapshot's data, flushed: the receive file it was written
    /// to, or, for data that is not in a receive file of ours (another store's snapshot
    /// handed over whole), a receive file it is copied into.
    async fn received_file(&self, handle: SnapshotHandle) -> Result<std::path::PathBuf, StorageError> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        let ours = handle.path().parent() == Some(self.inner.snapshots.dir()) && handle.path().extension().is_some_and(|e| e == "recv");
        let path = handle.path().to_path_buf();
        let mut file = handle.into_file();
        let write = |e| io_err(StorageIOError::write, e);
        if ours {
            file.flush().await.map_err(write)?;
            return Ok(path);
        }
        let (path, copy) = self.inner.snapshots.create(true).map_err(write)?;
        let mut copy = tokio::fs::File::from_std(copy);
        file.seek(std::io::SeekFrom::Start(0)).await.map_err(write)?;
        tokio::io::copy(&mut file, &mut copy).await.map_err(write)?;
        copy.flush().await.map_err(write)?;
        Ok(path)
    }

    /// Checks received data (format, frames, checksum) and makes it the current snapshot.
    fn commit_received(&self, path: &std::path::Path, meta: SnapshotMeta<NodeId, openraft::BasicNode>) -> Result<Current, StorageError> {
        let file = std::fs::File::open(path).map_err(|e| io_err(StorageIOError::read, e))?;
        let bytes = file.metadata().map_err(|e| io_err(StorageIOError::read, e))?.len();
        let records = snapshot_data::verify(std::io::BufReader::new(file)).map_err(|e| io_err(StorageIOError::read, std::io::Error::other(e)))?;
        self.inner.snapshots.commit(path, Current { meta, file: String::new(), bytes, records }).map_err(|e| io_err(StorageIOError::write, e))
    }

    /// Installs the snapshot `commit` makes current (under the snapshot lock, so that no
    /// build commits an older one in between): marks the tree as being installed
    /// (durably), replaces its records in batches from the data file, and ends with the
    /// applied log id and membership in the batch that removes the mark. Memory stays at
    /// one batch of records whatever the snapshot's size. A crash midway leaves the mark,
    /// and the next start installs again (see `applied_state`).
    async fn install(&self, commit: impl FnOnce(&Self) -> Result<Current, StorageError> + Send + 'static) -> Result<(), StorageError> {
        let this = self.clone();
        let rt = tokio::runtime::Handle::current();
        let installed = tokio::task::spawn_blocking(move || {
            let _one = this.inner.snapshot_lock.lock().expect("snapshot lock");
            let current = commit(&this)?;
            this.inner.tree.insert(INSTALLING, current.meta.snapshot_id.as_bytes()).map_err(sm_write)?;
            rt.block_on(this.snapshot_durable())?;
            this.replace_state(&current)?;
            rt.block_on(this.snapshot_durable())?;
            Ok::<_, StorageError>(current)
        });
        let current = installed.await.map_err(|e| io_err(StorageIOError::write_state_machine, e))??;
        let st = &self.inner.stats;
        st.records.store(current.records, Ordering::Relaxed);
        st.bytes.store(current.bytes, Ordering::Relaxed);
        st.installs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(id = %current.meta.snapshot_id, records = current.records, bytes = current.bytes, "snapshot installed");
        Ok(())
    }

    /// Replaces the tree's records with the snapshot's. The caller holds the snapshot lock.
    /// Meanwhile page updates are stored uncompressed (the pages' next consolidations
    /// compress them whole) and reads fill no cache (`Installing`).
    fn replace_state(&self, current: &Current) -> Result<(), StorageError> {
        let inner = &*self.inner;
        let _plain = inner.tree.plain_updates();
        let _installing = Installing::begin(inner);
        {
            let st = &inner.stats;
            let _w = inner.write_lock.lock().expect("write lock");
            st.writes_at_snapshot.store(st.writes.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        // Every record goes, but the mark.
        let mut from: Vec<u8> = Vec::new();
        loop {
            let keys: Vec<sled::IVec> = inner.tree.range(from.as_slice()..).keys().take(INSTALL_BATCH).collect::<Result<_, _>>().map_err(sm_write)?;
            let Some(last) = keys.last() else { break };
            from = [last.as_ref(), &[0]].concat();
            let mut batch = sled::Batch::default();
            keys.iter().filter(|k| k.as_ref() != INSTALLING).for_each(|k| batch.remove(k.clone()));
            inner.tree.apply_batch(batch).map_err(sm_write)?;
        }
        let path = inner.snapshots.dir().join(&current.file);
        let file = std::fs::File::open(&path).map_err(|e| io_err(StorageIOError::read, e))?;
        let mut reader = snapshot_data::Reader::new(std::io::BufReader::new(file)).map_err(|e| io_err(StorageIOError::read, e))?;
        let started = std::time::Instant::now();
        let writers = install::writers();
        let frames = install::load(&inner.tree, &mut reader, writers).map_err(|e| match e {
            install::LoadError::Read(e) => io_err(StorageIOError::read, e),
            install::LoadError::Write(e) => sm_write(e),
        })?;
        tracing::info!(frames, writers, ms = started.elapsed().as_millis(), "snapshot records written");
        let mut batch = sled::Batch::default();
        batch.insert(APPLIED, codec::encode(&current.meta.last_log_id));
        batch.insert(MEMBERSHIP, codec::encode(&current.meta.last_membership));
        batch.remove(INSTALLING);
        inner.tree.apply_batch(batch).map_err(sm_write)
    }

    /// At start: an install a crash interrupted is done again from the committed snapshot
    /// (committed before the install began).
    async fn resume_install(&self) -> Result<(), StorageError> {
        if !self.inner.tree.contains_key(INSTALLING).map_err(|e| io_err(StorageIOError::read_state_machine, e))? {
            return Ok(());
        }
        let current = self.inner.snapshots.current().map_err(|e| io_err(StorageIOError::read, e))?;
        let current = current.ok_or_else(|| io_err(StorageIOError::read, std::io::Error::other("an install was interrupted, and no snapshot is committed")))?;
        tracing::warn!(id = %current.meta.snapshot_id, "resuming a snapshot install a stop interrupted");
        self.install(move |_| Ok(current)).await
    }

    /// Writes a legacy snapshot (file or sled value) in the current format, committed; then drops it.
    fn convert_legacy(&self) -> Result<(), StorageError> {
        let files = &self.inner.snapshots;
        let read = |e| io_err(StorageIOError::read, e);
        let legacy = match files.legacy().map_err(read)? {
            Some(b) => Some(b),
            None => self.inner.meta.get(SNAPSHOT).map_err(|e| io_err(StorageIOError::read, e))?.map(|v| v.to_vec()),
        };
        let Some(bytes) = legacy else { return Ok(()) };
        if files.current().map_err(read)?.is_none() {
            let old: LegacySnapshot = codec::decode(&bytes).map_err(|e| io_err(StorageIOError::read, e))?;
            let records = legacy_records(&old.data).map_err(|e| read(std::io::Error::other(e)))?;
            let (path, f) = files.create(false).map_err(read)?;
            let write = |e| io_err(StorageIOError::write, e);
            let mut w = snapshot_data::Writer::new(std::io::BufWriter::new(WritebackFile::new(f))).map_err(write)?;
            for (k, v) in &records {
                w.put(k, v).map_err(write)?;
            }
            let (_, bytes, records) = w.finish().map_err(write)?;
            files.commit(&path, Current { meta: old.meta, file: String::new(), bytes, records }).map_err(write)?;
            tracing::info!(records, bytes, "snapshot converted to format 4");
        }
        self.inner.meta.remove(SNAPSHOT).map_err(|e| io_err(StorageIOError::write, e))?;
        Ok(())
    }

    /// The state machine's own writes durable too (the applies a built snapshot covers, an
    /// installed snapshot's records), before openraft purges the log entries they replace.
    async fn snapshot_durable(&self) -> Result<(), StorageError> {
        self.inner.durable.sync_async().await.map_err(|e| io_err(StorageIOError::write, e))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Scanning, encoding and writing the whole state: seconds of CPU for a large one,
        // taken from what the request path leaves (see `background`).
        let this = self.clone();
        let started = std::time::Instant::now();
        let built =
            background::run_low_priority("snapshot", move || this.build_to_file()).await.map_err(|e| io_err(StorageIOError::read_state_machine, e))??;
        let (current, path, file) = built;
        self.snapshot_durable().await?;
        let ms = started.elapsed().as_millis() as u64;
        let st = &self.inner.stats;
        st.records.store(current.records, Ordering::Relaxed);
        st.bytes.store(current.bytes, Ordering::Relaxed);
        st.builds.fetch_add(1, Ordering::Relaxed);
        st.build_ms_total.fetch_add(ms, Ordering::Relaxed);
        st.build_ms_last.store(ms, Ordering::Relaxed);
        tracing::info!(records = current.records, bytes = current.bytes, build_ms = ms, "snapshot stored");
        Ok(Snapshot { meta: current.meta, snapshot: Box::new(SnapshotHandle::new(path, file)) })
    }
}

impl StateMachineStore {
    /// Writes the state as of the last applied entry to a new data file, commits it as the
    /// current snapshot, and returns it open for reading.
    ///
    /// Applies go on while the tree is scanned: the scan starts at one applied entry, and
    /// every key written since then gets back the value it had at that point (from the
    /// pre-images the writers keep) in frames after the scanned ones, so the data is
    /// exactly that entry's state. Memory: the pre-images of the keys written meanwhile.
    fn build_to_file(&self) -> Result<(Current, std::path::PathBuf, std::fs::File), StorageError> {
        let _one = self.inner.snapshot_lock.lock().expect("snapshot lock");
        let started = std::time::Instant::now();
        let (applied, membership) = self.begin_copy()?;
        let seq = self.inner.snapshot_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let current = self.write_copy(meta)?;
        let path = self.inner.snapshots.dir().join(&current.file);
        let file = std::fs::File::open(&path).map_err(|e| io_err(StorageIOError::read, e))?;
        tracing::info!(records = current.records, bytes = current.bytes, build_ms = started.elapsed().as_millis() as u64, "snapshot built");
        Ok((current, path, file))
    }

    /// Scans the tree into a new data file, rolls back what was written since
    /// [`Self::begin_copy`], and commits the file as the snapshot `meta` describes.
    fn write_copy(&self, meta: SnapshotMeta<NodeId, openraft::BasicNode>) -> Result<Current, StorageError> {
        let write = |e| io_err(StorageIOError::write, e);
        let (path, f) = self.inner.snapshots.create(false).map_err(write)?;
        let mut w = snapshot_data::Writer::new(std::io::BufWriter::with_capacity(1 << 20, WritebackFile::new(f))).map_err(write)?;
        // Progress travels in the snapshot's meta, not among its records.
        let record = |k: &[u8]| k != APPLIED && k != MEMBERSHIP;
        for item in self.inner.tree.iter() {
            let (k, v) = item.map_err(|e| io_err(StorageIOError::read_state_machine, e))?;
            if record(&k) {
                w.put(&k, &v).map_err(write)?;
            }
        }
        let preimages = self.inner.write_lock.lock().expect("write lock").preimages.take().unwrap_or_default();
        for (k, v) in preimages.iter().filter(|(k, _)| record(k)) {
            match v {
                Some(v) => w.put(k, v),
                None => w.delete(k),
            }
            .map_err(write)?;
        }
        tracing::debug!(rolled_back = preimages.len(), "snapshot scan done");
        let (_, bytes, records) = w.finish().map_err(write)?;
        self.inner.snapshots.commit(&path, Current { meta, file: String::new(), bytes, records }).map_err(write)
    }

    /// Marks the point the copy is of: from now on writers keep pre-images.
    fn begin_copy(&self) -> Result<(Option<LogId>, Membership), StorageError> {
        let mut w = self.inner.write_lock.lock().expect("write lock");
        w.preimages = Some(BTreeMap::new());
        // Under the write lock: exactly the writes the snapshot does not hold count on.
        let st = &self.inner.stats;
        st.writes_at_snapshot.store(st.writes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.read_applied()
    }
}

impl SmReader {
    /// Empties the hot-entity cache (the memory bound's release): every entry is a copy
    /// of what sled holds, so the next read of it goes to sled and fills it again.
    pub fn drop_cache(&self) {
        let dropped = {
            let mut cache = self.inner.cache.lock().expect("cache lock");
            let cap = cache.cap();
            std::mem::replace(&mut *cache, lru::LruCache::new(cap))
        };
        // Freed outside the lock: readers wait for no deallocation.
        drop(dropped);
    }

    /// Marks this replica as removed from its group while its log ended at `last_index`
    /// (None: an empty log): see [`DROPPED`].
    pub fn mark_dropped(&self, last_index: Option<u64>) -> sled::Result<()> {
        self.inner.meta.insert(DROPPED, codec::encode(&last_index))?;
        self.inner.meta.flush().map(|_| ())
    }

    /// Takes the mark of [`Self::mark_dropped`] back: a member again.
    pub fn clear_dropped(&self) -> sled::Result<()> {
        self.inner.meta.remove(DROPPED)?;
        self.inner.meta.flush().map(|_| ())
    }

    /// The node's data dir (the snapshot file's directory), for disk usage metrics.
    pub fn data_dir(&self) -> &std::path::Path {
        self.inner.snapshots.dir()
    }

    /// The snapshot counters: what the schedule decides on, what `/metrics` shows.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        let st = &self.inner.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SnapshotStats {
            writes_since: get(&st.writes).saturating_sub(get(&st.writes_at_snapshot)),
            records: get(&st.records),
            bytes: get(&st.bytes),
            builds: get(&st.builds),
            build_ms_total: get(&st.build_ms_total),
            build_ms_last: get(&st.build_ms_last),
            installs: get(&st.installs),
            catch_up_applies: get(&st.catch_up_applies),
        }
    }

    pub fn session(&self, token: &str) -> Option<Session> {
        self.inner.get_typed(&session_key(token))
    }
    pub fn inventory(&self, sku: &str) -> Option<Inventory> {
        self.inner.get_typed(&inventory_key(sku))
    }
    pub fn settings(&self, dc: &str) -> DcSettings {
        self.inner.get_typed(&settings_key(dc)).unwrap_or_else(|| DcSettings::default_for(dc))
    }
    pub fn order(&self, id: &str) -> Option<Order> {
        self.inner.get_typed(&order_key(id))
    }
    /// The last seq this DC has emitted (0 before any).
    pub fn out_seq(&self) -> u64 {
        self.inner.get_typed(OUT_SEQ).unwrap_or(0)
    }

    /// Milliseconds from this replica's apply of each of our events `from..=to` to `now`,
    /// for those it remembers (see [`super::emitted`]).
    pub fn emitted_ages_ms(&self, from: u64, to: u64, now: std::time::Instant) -> Vec<u64> {
        self.inner.emitted_at.ages_ms(from, to, now)
    }

    /// This DC's cursor for `origin`: the last of its events applied here.
    pub fn cursor(&self, origin: &str) -> u64 {
        self.inner.get_typed(&cursor_key(origin)).unwrap_or(0)
    }

    /// The oldest event still in the outbox (`out_seq + 1` when it is empty).
    pub fn outbox_floor(&self) -> u64 {
        match self.inner.tree.scan_prefix(OUTBOX).keys().next() {
            Some(k) => outbox_first_seq(&k.expect("sled read of state machine")),
            None => self.out_seq().saturating_add(1),
        }
    }

    /// Up to `max` outbox events from `from_seq` on, in order.
    pub fn outbox(&self, from_seq: u64, max: usize) -> Vec<Event> {
        let tree = &self.inner.tree;
        // Start at the record holding `from_seq`: the last one starting at or before it.
        let start = tree.range(outbox_key(0)..=outbox_key(from_seq)).keys().next_back().map(|k| k.expect("sled read of state machine").to_vec());
        tree.range(start.unwrap_or_else(|| outbox_key(from_seq))..=outbox_key(u64::MAX))
            .values()
            .flat_map(|v| codec::decode::<Vec<Event>>(&v.expect("sled read of state machine")).expect("outbox record decodes"))
            .skip_while(|e| e.seq < from_seq)
            .take(max)
            .collect()
    }

    /// What this DC owns, as changes, from key `from` on: at most `max` of them, and the
    /// key to go on from (`None`: that was the last page). Pages of it are what a DC that
    /// fell behind the outbox cap installs instead of the events it missed.
    pub fn owned_state_page(&self, from: &[u8], max: usize) -> (Vec<Change>, Option<Vec<u8>>) {
        let dc = &self.inner.dc;
        let mut out = Vec::new();
        for item in self.inner.tree.range(from..) {
            let (k, v) = item.expect("sled read of state machine");
            if out.len() >= max {
                return (out, Some(k.to_vec()));
            }
            match &k[..2] {
                b"s/" => {
                    let s: Session = codec::decode(&v).expect("session decodes");
                    if &s.dc == dc {
                        out.push(Change::Session(s));
                    }
                }
                b"i/" => {
                    let i: Inventory = codec::decode(&v).expect("inventory decodes");
                    out.push(Change::StockV2 { sku: i.sku.clone(), row: i.row(dc), received: i.received_by(dc) });
                }
                b"o/" => {
                    let o: Order = codec::decode(&v).expect("order decodes");
                    if &o.dc == dc {
                        out.push(Change::Order(o));
                    }
                }
                b"f/" => out.push(Change::Settings(codec::decode(&v).expect("settings decode"))),
                _ => {}
            }
        }
        (out, None)
    }

    /// Index of the last applied log entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        let bytes = self.inner.tree.get(APPLIED).expect("sled read of state machine");
        let applied: Option<LogId> = bytes.map(|b| codec::decode(&b).expect("applied id decodes")).flatten();
        applied.map(|l| l.index).unwrap_or(0)
    }

    /// [`Self::digest`] as `wanted`, computed off the async runtime, and its age.
    pub async fn digest_as(&self, wanted: Wanted) -> std::io::Result<(BTreeMap<String, String>, std::time::Duration)> {
        let (reader, scan) = (self.clone(), self.clone());
        self.inner.digests.get(wanted, move || reader.applied_index(), move || scan.digest()).await
    }

    /// Hex SHA-256 per entity kind, and of them all: equal digests mean equal state. A
    /// scan of the whole state: callers on the async runtime use [`Self::digest_as`].
    pub fn digest(&self) -> BTreeMap<String, String> {
        let mut all = Sha256::new();
        let mut out = BTreeMap::new();
        for (kind, prefix) in KINDS {
            let mut h = Sha256::new();
            for item in self.inner.tree.scan_prefix(prefix) {
                let (k, v) = item.expect("sled read of state machine");
                h.update((k.len() as u64).to_be_bytes());
                h.update(&k);
                h.update((v.len() as u64).to_be_bytes());
                h.update(&v);
            }
            let d = h.finalize();
            all.update(d);
            out.insert(kind.to_string(), hex::encode(d));
        }
        out.insert("all".to_string(), hex::encode(all.finalize()));
        out
    }

    /// Applies `cmd` to a copy of the current state, without writing anything: how the
    /// actors pre-check a command before proposing it.
    pub fn dry_run(&self, cmd: &Request) -> Outcome {
        let mut overlay = Overlay::new(&self.inner);
        apply(&mut overlay, cmd)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload};

    use super::*;
    use crate::config::Durability;
    use crate::domain::Command;
    use crate::storage::snapshot_data::Frame;

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry { log_id: openraft::LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Request::new(cmd, None)) }
    }
    fn order(id: &str, hlc: u64) -> Command {
        Command::PlaceOrder { id: id.into(), session: "t1".into(), sku: "sku1".into(), qty: 1, dc: "dc1".into(), hlc, refresh_session: false }
    }

    /// The state tree's records (without the progress keys), as a snapshot holds them.
    fn records(sm: &StateMachineStore) -> BTreeMap<Vec<u8>, Vec<u8>> {
        sm.inner
            .tree
            .iter()
            .map(|r| r.expect("read"))
            .filter(|(k, _)| k.as_ref() != APPLIED && k.as_ref() != MEMBERSHIP)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// What a snapshot's data file holds once its frames are applied in order.
    fn frames_of(sm: &StateMachineStore, c: &Current) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let f = std::fs::File::open(sm.inner.snapshots.dir().join(&c.file)).expect("open data");
        let mut r = snapshot_data::Reader::new(std::io::BufReader::new(f)).expect("header");
        let mut out = BTreeMap::new();
        while let Some(frame) = r.next_frame().expect("frame") {
            match frame {
                Frame::Put(k, v) => out.insert(k, v),
                Frame::Delete(k) => out.remove(&k),
            };
        }
        out
    }

    /// The escrow journal test hook (one process per test, so the global is this test's):
    /// a grant given and a grant received are journaled with their entry; other entries
    /// are not.
    #[tokio::test]
    async fn grants_given_and_received_are_journaled_with_their_entry() {
        use crate::domain::{Change, Event, StockRow};
        use crate::escrow_journal::Record;
        let dir = tempfile::tempdir().expect("temp dir");
        crate::escrow_journal::enable(dir.path()).expect("journal");
        let (_log, mut sm) = crate::storage::open(dir.path(), "dc1", Durability::Flush, 16 << 20, 1000).expect("open sled store");
        let row = StockRow { stocked: 20, sold: 0, released: 0, sent: [("dc1".to_string(), 5)].into() };
        let remote = Event { seq: 1, origin: "dc2".into(), hlc: 5, change: Change::StockV2 { sku: "sku1".into(), row, received: Default::default() } };
        let grant = Command::GrantAboveReserve { sku: "sku1".into(), qty: 3, from: "dc1".into(), to: "dc2".into(), hlc: 3, reserve: 0 };
        let give =
            |qty, to: &str| Request::new(Command::GrantAboveReserve { sku: "sku1".into(), qty, from: "dc1".into(), to: to.into(), hlc: 6, reserve: 0 }, None);
        let restock = |add| Request::new(Command::Restock { sku: "sku1".into(), add, dc: "dc1".into(), hlc: 6 }, None);
        let entries = [
            entry(1, Command::Restock { sku: "sku1".into(), add: 10, dc: "dc1".into(), hlc: 2 }),
            entry(2, grant),
            entry(3, Command::ApplyRemote { origin: "dc2".into(), events: vec![remote.clone()] }),
            // A replay changes nothing, and journals nothing.
            entry(4, Command::ApplyRemote { origin: "dc2".into(), events: vec![remote] }),
            // One entry, two grants with a restock between: each grant keeps its place.
            entry(5, Command::Batch { requests: vec![give(2, "dc2"), restock(4), give(1, "dc3")] }),
        ];
        sm.apply(entries).await.expect("apply");
        let moves: Vec<(u64, u32, String, i64)> = crate::escrow_journal::read()
            .expect("read")
            .into_iter()
            .map(|r| match r {
                Record::Applied { shard: 0, term: 1, index, seq, sku, delta, .. } => (index, seq, sku, delta),
                other => panic!("unexpected record {other:?}"),
            })
            .collect();
        let sku = || "sku1".to_string();
        assert_eq!(moves, [(2, 0, sku(), -3), (3, 0, sku(), 5), (5, 0, sku(), -2), (5, 1, sku(), -1)]);
        assert_eq!(sm.reader().inventory("sku1").expect("stock").available("dc1"), 13);
    }

    async fn with_orders(dir: &std::path::Path) -> StateMachineStore {
        let (_log, mut sm) = crate::storage::open(dir, "dc1", Durability::Flush, 16 << 20, 1000).expect("open sled store");
        let setup = [
            entry(1, Command::CreateSession { token: "t1".into(), user: "u".into(), dc: "dc1".into(), hlc: 1 }),
            entry(2, Command::Restock { sku: "sku1".into(), add: 10, dc: "dc1".into(), hlc: 2 }),
            entry(3, order("o1", 3)),
            entry(4, order("o2", 4)),
        ];
        sm.apply(setup).await.expect("apply");
        sm
    }

    /// A snapshot built on one node and streamed to a fresh one installs the same records
    /// and progress; an install a crash interrupted is done again at the next start.
    #[tokio::test]
    async fn a_streamed_snapshot_installs_and_an_interrupted_install_resumes() {
        use tokio::io::AsyncWriteExt;
        let (a, b) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
        let mut source = with_orders(a.path()).await;
        let mut built = source.build_snapshot().await.expect("build");
        let mut data = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut built.snapshot, &mut data).await.expect("read data");
        {
            let (_log, mut target) = crate::storage::open(b.path(), "dc1", Durability::Flush, 16 << 20, 1000).expect("open");
            // Something of its own the install must replace.
            target.apply([entry(1, Command::CreateSession { token: "gone".into(), user: "u".into(), dc: "dc1".into(), hlc: 1 })]).await.expect("apply");
            let mut into = target.begin_receiving_snapshot().await.expect("begin");
            into.write_all(&data).await.expect("write");
            target.install_snapshot(&built.meta, into).await.expect("install");
            assert_eq!(records(&target), records(&source));
            assert_eq!(target.applied_state().await.expect("applied").0, built.meta.last_log_id);
            assert!(target.reader().snapshot_stats().records > 0, "the installed snapshot's records are counted");
            // A crash in the middle of the next install: the mark stays, records are missing.
            target.inner.tree.insert(INSTALLING, b"x".as_slice()).expect("mark");
            target.inner.tree.remove(b"s/t1").expect("remove");
            target.inner.tree.flush().expect("flush");
        }
        let (_log, mut target) = reopen(b.path()).await;
        assert_eq!(target.applied_state().await.expect("applied").0, built.meta.last_log_id);
        assert_eq!(records(&target), records(&source), "the install was done again");
        // Restarted, the store knows its snapshot's size (the snapshot schedule scales with it).
        let size = |sm: &StateMachineStore| sm.reader().snapshot_stats().records;
        assert!(size(&target) > 0 && size(&target) == size(&source), "{} records against the source's {}", size(&target), size(&source));
        assert!(!target.inner.tree.contains_key(INSTALLING).expect("read"));
    }

    /// The store in `dir` opened again, once the previous handle's sled lock is gone (it
    /// goes with the store's last handle, once its flusher task sees it).
    /// (It sleeps on the runtime, not the thread: the flusher task that holds the last
    /// handle runs on this test's runtime.)
    async fn reopen(dir: &std::path::Path) -> (crate::storage::LogStore, StateMachineStore) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match crate::storage::open(dir, "dc1", Durability::Flush, 16 << 20, 1000) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    /// A restarted store knows the size of its last snapshot: the snapshot schedule waits
    /// for writes in proportion to it, and without it a restarted node built a whole
    /// snapshot as soon as it had replayed its log.
    #[tokio::test]
    async fn a_reopened_store_knows_its_snapshot_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let built = {
            let mut sm = with_orders(dir.path()).await;
            sm.build_snapshot().await.expect("build");
            sm.reader().snapshot_stats().records
        };
        assert!(built > 0);
        let (_log, sm) = reopen(dir.path()).await;
        assert_eq!(sm.reader().snapshot_stats().records, built);
    }

    /// A snapshot kept in the format before streaming (meta and checksummed records in one
    /// file) is converted at start; a corrupt one stops the start.
    #[tokio::test]
    async fn a_legacy_snapshot_is_converted_at_start() {
        #[derive(Serialize)]
        struct Legacy<'a> {
            meta: SnapshotMeta<NodeId, openraft::BasicNode>,
            #[serde(with = "serde_bytes")]
            data: &'a [u8],
        }
        let (bad_dir, dir) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
        let records: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"s/t1".to_vec(), vec![1, 2, 3]), (b"o/x".to_vec(), vec![])];
        let body = codec::encode(&records);
        let sealed = [b"AGSNAP02".as_slice(), &(body.len() as u64).to_be_bytes(), &Sha256::digest(&body), &body].concat();
        let meta = SnapshotMeta { snapshot_id: "old".into(), ..Default::default() };
        let mut corrupt = sealed.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        std::fs::write(bad_dir.path().join("raft-snapshot.bin"), codec::encode(&Legacy { meta: meta.clone(), data: &corrupt })).expect("write");
        assert!(crate::storage::open(bad_dir.path(), "dc1", Durability::Flush, 16 << 20, 1000).is_err(), "a corrupt snapshot is not converted");
        let legacy = dir.path().join("raft-snapshot.bin");
        std::fs::write(&legacy, codec::encode(&Legacy { meta, data: &sealed })).expect("write");
        let (_log, mut sm) = crate::storage::open(dir.path(), "dc1", Durability::Flush, 16 << 20, 1000).expect("open");
        let c = sm.inner.snapshots.current().expect("read").expect("converted");
        assert_eq!(c.meta.snapshot_id, "old");
        assert_eq!(frames_of(&sm, &c), records.into_iter().collect());
        assert!(!legacy.exists(), "the legacy file is gone");
        assert!(sm.get_current_snapshot().await.expect("current").is_some());
    }

    /// An expiry pass over sled (with writes of the same apply call still pending) removes
    /// exactly what the in-memory state removes: the same records on every replica.
    #[tokio::test]
    async fn expiry_over_sled_matches_the_in_memory_rules() {
        use crate::domain::MemState;
        let dir = tempfile::tempdir().expect("temp dir");
        let (_log, mut sm) = crate::storage::open(dir.path(), "dc1", Durability::Flush, 16 << 20, 1000).expect("open sled store");
        let keyed = |id: &str, hlc: u64| {
            let cmd = Command::PlaceOrder { id: id.into(), session: "t1".into(), sku: "sku1".into(), qty: 1, dc: "dc1".into(), hlc, refresh_session: false };
            Request::new(cmd, Some(format!("key-{id}")))
        };
        let expire = Request::new(Command::Expire { idempotency_before: 13, sessions_before: 0, batch_len_max: 3, dc: "dc1".into(), hlc: 20 }, None);
        let mut first = vec![
            Request::new(Command::CreateSession { token: "t1".into(), user: "u".into(), dc: "dc1".into(), hlc: 1 }, None),
            Request::new(Command::Restock { sku: "sku1".into(), add: 100, dc: "dc1".into(), hlc: 2 }, None),
        ];
        first.extend((0..6).map(|i| keyed(&format!("o{i}"), 10 + i)));
        // In one apply call: an older record still pending in the overlay, then the pass.
        let second = vec![keyed("late", 5), expire];
        let mut mem = MemState::new("dc1");
        for r in first.iter().chain(&second) {
            apply(&mut mem, r);
        }
        let as_entry = |(i, r): (usize, &Request)| Entry {
            log_id: openraft::LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
            payload: EntryPayload::Normal(r.clone()),
        };
        sm.apply(first.iter().enumerate().map(as_entry).collect::<Vec<_>>()).await.expect("apply");
        let outs = sm.apply(second.iter().enumerate().map(|(i, r)| as_entry((i + first.len(), r))).collect::<Vec<_>>()).await.expect("apply");
        assert_eq!(outs[1], Outcome::Expired { idempotency: 3, duplicates: 3, sessions: 0 });
        let keys =
            |prefix: &[u8]| -> Vec<String> { sm.inner.tree.scan_prefix(prefix).keys().map(|k| String::from_utf8(k.unwrap()[2..].to_vec()).unwrap()).collect() };
        assert_eq!(keys(b"k/"), mem.idempotency.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(b"d/"), mem.duplicates.keys().cloned().collect::<Vec<_>>());
        assert_eq!(sm.inner.tree.scan_prefix(b"e/").count(), mem.expiry.len());
        assert!(!keys(b"k/").iter().any(|k| k.contains("late") || k.ends_with("o0") || k.ends_with("o1")), "the three oldest went: {:?}", keys(b"k/"));
    }

    /// Writes that land while a snapshot copies the tree — inserts, updates, deletes —
    /// are rolled back to the copy's starting point: the snapshot is exactly that state.
    #[tokio::test]
    async fn a_snapshot_copy_is_one_point_while_applies_go_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sm = with_orders(dir.path()).await;
        let expected = records(&sm);
        let (applied, membership) = sm.begin_copy().expect("begin");
        assert_eq!(applied.map(|l| l.index), Some(4));
        // A new key, changed keys (order, inventory, outbox) and deleted keys (trimmed outbox).
        sm.apply([entry(5, order("o3", 5)), entry(6, Command::CancelOrder { id: "o1".into(), dc: "dc1".into(), session: "t1".into(), hlc: 6 })])
            .await
            .expect("apply");
        sm.apply([entry(7, Command::TrimOutbox { upto: 4 }), entry(8, Command::Restock { sku: "sku1".into(), add: 5, dc: "dc1".into(), hlc: 8 })])
            .await
            .expect("apply");
        let now = records(&sm);
        assert_ne!(now.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "the writes above must change the tree");

        let c = sm.write_copy(SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id: "t".into() }).expect("copy");
        assert_eq!(frames_of(&sm, &c), expected);
        assert!(sm.inner.write_lock.lock().unwrap().preimages.is_none(), "writers stop keeping pre-images");
    }
}
