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
use std::io::Cursor;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::snapshot_file::SnapshotFile;
use super::{background, io_err, Durable};
use crate::codec;
use crate::domain::apply::EXPIRY_PREFIX;
use crate::domain::command::{DuplicateSet, IdempotencyRecord};
use crate::domain::{apply, Change, DcSettings, Event, Inventory, Order, Outcome, Request, Session, State};
use crate::raft::{LogId, NodeId, StorageError, TypeConfig};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

const APPLIED: &[u8] = b"m/applied";
const MEMBERSHIP: &[u8] = b"m/membership";
const SNAPSHOT: &[u8] = b"snapshot";

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

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    /// Bulk bytes (same encoding as a `Vec<u8>`, without a call per byte).
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// A snapshot body: every state record. `serde_bytes` encodes exactly as `Vec<u8>` would,
/// but copies each record in one go instead of serialising it byte by byte.
type SnapshotRecords<'a> = Vec<(&'a serde_bytes::Bytes, &'a serde_bytes::Bytes)>;
type SnapshotRecordsOwned = Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>;

/// Snapshot data, format 2: this tag, the body's length (u64 big-endian), the SHA-256 of
/// the body, then the body (the encoded records). Format 1 was the body alone; it starts
/// with the codec's version byte (1), never with this tag, so the two are told apart. A
/// node reads format 1 only from its own disk (a snapshot built before the upgrade),
/// sealing it as format 2 before it serves it; from a leader it takes format 2 only.
pub const SNAPSHOT_TAG: &[u8; 8] = b"AGSNAP02";
const SNAPSHOT_HEADER_LEN: usize = 8 + 8 + 32;

/// Wraps encoded records as format-2 snapshot data.
pub fn seal_snapshot_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER_LEN + body.len());
    out.extend_from_slice(SNAPSHOT_TAG);
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(&Sha256::digest(body));
    out.extend_from_slice(body);
    out
}

/// The body of format-2 snapshot data whose checksum matches (bytes after the declared
/// length are ignored: a receive buffer rewritten from offset 0 may keep a longer
/// earlier attempt's tail). Format 1 (no checksum) only if `legacy_ok`.
pub fn open_snapshot_data(data: &[u8], legacy_ok: bool) -> Result<&[u8], String> {
    if !data.starts_with(SNAPSHOT_TAG) {
        return if legacy_ok { Ok(data) } else { Err("snapshot data without a checksum (format 1) refused".into()) };
    }
    if data.len() < SNAPSHOT_HEADER_LEN {
        return Err(format!("snapshot data of {} bytes is shorter than its header", data.len()));
    }
    let len = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| SNAPSHOT_HEADER_LEN.checked_add(l))
        .filter(|e| *e <= data.len())
        .ok_or_else(|| format!("snapshot body of {len} bytes declared, {} present", data.len() - SNAPSHOT_HEADER_LEN))?;
    let body = &data[SNAPSHOT_HEADER_LEN..end];
    if Sha256::digest(body).as_slice() != &data[16..SNAPSHOT_HEADER_LEN] {
        return Err("snapshot checksum mismatch".into());
    }
    Ok(body)
}

/// Whether `data` is a snapshot this node could install: format 2, its checksum matching,
/// its records decoding. Checked before the last chunk reaches openraft, for which a
/// failing install is a fatal storage error.
pub fn verify_snapshot_data(data: &[u8]) -> Result<(), String> {
    let body = open_snapshot_data(data, false)?;
    codec::decode::<SnapshotRecordsOwned>(body).map(|_| ()).map_err(|e| format!("snapshot records do not decode: {e}"))
}

/// Shared by the state machine (writer) and every reader.
struct Inner {
    /// The DC this node belongs to: the origin of what it emits.
    dc: String,
    /// Which shard of how many this is: which sessions live here.
    shard: u16,
    shards: u16,
    tree: sled::Tree,
    meta: sled::Tree,
    snapshot_file: SnapshotFile,
    durable: Durable,
    /// Hot records by key, and keys known to be absent (a new order's id is looked up
    /// by validation and again by apply); std Mutex because no await happens while it
    /// is held. `IVec` shares its bytes, so a hit copies nothing.
    cache: Mutex<lru::LruCache<Vec<u8>, Option<sled::IVec>>>,
    /// Held while a batch is written (and while a cache miss is filled).
    write_lock: Mutex<Writer>,
    /// One snapshot copy at a time.
    snapshot_lock: Mutex<()>,
    snapshot_seq: std::sync::atomic::AtomicU64,
    /// What the snapshot schedule and `/metrics` read: builds, their cost, the state's size.
    stats: SnapshotCounters,
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
        self.cache.lock().expect("cache lock").put(key.to_vec(), v.clone());
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
        (shard, shards): (u16, u16),
        snapshot_file: SnapshotFile,
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
            snapshot_file,
            durable,
            cache: Mutex::new(lru::LruCache::new(cap)),
            write_lock: Mutex::new(Writer::default()),
            snapshot_lock: Mutex::new(()),
            snapshot_seq: Default::default(),
            stats: Default::default(),
        };
        Ok(StateMachineStore { inner: Arc::new(inner) })
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
}

impl<'a> Overlay<'a> {
    fn new(inner: &'a Inner) -> Self {
        Overlay { inner, pending: BTreeMap::new(), emitted: Vec::new() }
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
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let inner = &*self.inner;
        let mut overlay = Overlay::new(inner);
        let mut outcomes = Vec::new();
        let mut last = None;
        let mut membership = None;
        let mut writes = 0u64;
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
                    outcome
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    Outcome::Noop
                }
            });
        }
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
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, openraft::BasicNode>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let mut data = snapshot.into_inner();
        let body = open_snapshot_data(&data, false).map_err(|e| io_err(StorageIOError::read, std::io::Error::other(e)))?;
        let records: SnapshotRecordsOwned = codec::decode(body).map_err(|e| io_err(StorageIOError::read, e))?;
        let sealed_len = SNAPSHOT_HEADER_LEN + body.len();
        data.truncate(sealed_len);
        let inner = &*self.inner;
        let st = &inner.stats;
        st.writes_at_snapshot.store(st.writes.load(Ordering::Relaxed), Ordering::Relaxed);
        st.records.store(records.len() as u64, Ordering::Relaxed);
        st.bytes.store(data.len() as u64, Ordering::Relaxed);
        st.installs.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = inner.write_lock.lock().expect("write lock");
            let old: Vec<sled::IVec> = inner.tree.iter().keys().collect::<Result<_, _>>().map_err(|e| io_err(StorageIOError::write_state_machine, e))?;
            w.preserve(&inner.tree, old.iter().map(|k| k.as_ref()).chain(records.iter().map(|(k, _)| k.as_slice())));
            let mut batch = sled::Batch::default();
            for k in old {
                batch.remove(k);
            }
            for (k, v) in records {
                batch.insert(k.into_vec(), v.into_vec());
            }
            batch.insert(APPLIED, codec::encode(&meta.last_log_id));
            batch.insert(MEMBERSHIP, codec::encode(&meta.last_membership));
            inner.tree.apply_batch(batch).map_err(|e| io_err(StorageIOError::write_state_machine, e))?;
            inner.cache.lock().expect("cache lock").clear();
        }
        self.save_snapshot(StoredSnapshot { meta: meta.clone(), data }).await.map(|_| ())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let (file, meta) = (self.inner.snapshot_file.clone(), self.inner.meta.clone());
        let bytes = tokio::task::spawn_blocking(move || read_snapshot(&file, &meta)).await.map_err(|e| io_err(StorageIOError::read, e))??;
        let Some(bytes) = bytes else { return Ok(None) };
        let s: StoredSnapshot = codec::decode(&bytes).map_err(|e| io_err(StorageIOError::read, e))?;
        // Built before snapshots carried a checksum: sealed now, as followers require.
        let data = if s.data.starts_with(SNAPSHOT_TAG) { s.data } else { seal_snapshot_body(&s.data) };
        Ok(Some(Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

/// The stored snapshot's bytes: from its file, or, in a data dir written before snapshots
/// had a file, from sled.
fn read_snapshot(file: &SnapshotFile, meta: &sled::Tree) -> Result<Option<Vec<u8>>, StorageError> {
    match file.read().map_err(|e| io_err(StorageIOError::read, e))? {
        Some(b) => Ok(Some(b)),
        None => Ok(meta.get(SNAPSHOT).map_err(|e| io_err(StorageIOError::read, e))?.map(|v| v.to_vec())),
    }
}

impl StateMachineStore {
    /// Stores `s` durably and hands it back (its data is megabytes: no copy is kept).
    async fn save_snapshot(&self, s: StoredSnapshot) -> Result<StoredSnapshot, StorageError> {
        let this = self.clone();
        // Encoding and storing megabytes: off the async workers.
        let s = tokio::task::spawn_blocking(move || this.store_snapshot(s)).await.map_err(|e| io_err(StorageIOError::write, e))??;
        self.snapshot_durable().await?;
        Ok(s)
    }

    /// The state machine's own writes durable too (the applies a built snapshot covers, an
    /// installed snapshot's records), before openraft purges the log entries they replace.
    async fn snapshot_durable(&self) -> Result<(), StorageError> {
        self.inner.durable.sync_async().await.map_err(|e| io_err(StorageIOError::write, e))
    }

    /// Writes `s` as the current snapshot, durably, and hands it back.
    fn store_snapshot(&self, s: StoredSnapshot) -> Result<StoredSnapshot, StorageError> {
        self.inner.snapshot_file.write(&codec::encode(&s)).map_err(|e| io_err(StorageIOError::write, e))?;
        // A snapshot sled held from before snapshots had a file is now stale.
        self.inner.meta.remove(SNAPSHOT).map_err(|e| io_err(StorageIOError::write, e))?;
        Ok(s)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Copying, encoding and storing the whole state: seconds of CPU for a large one,
        // taken from what the request path leaves (see `background`).
        let this = self.clone();
        let started = std::time::Instant::now();
        let s = background::run_low_priority("snapshot", move || {
            let (meta, data) = this.copy_state()?;
            this.store_snapshot(StoredSnapshot { meta, data })
        })
        .await
        .map_err(|e| io_err(StorageIOError::read_state_machine, e))??;
        self.snapshot_durable().await?;
        let ms = started.elapsed().as_millis() as u64;
        let st = &self.inner.stats;
        st.bytes.store(s.data.len() as u64, Ordering::Relaxed);
        st.builds.fetch_add(1, Ordering::Relaxed);
        st.build_ms_total.fetch_add(ms, Ordering::Relaxed);
        st.build_ms_last.store(ms, Ordering::Relaxed);
        tracing::info!(bytes = s.data.len(), build_ms = ms, "snapshot stored");
        Ok(Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) })
    }
}

impl StateMachineStore {
    /// The state as of the last applied entry, encoded: the body of a snapshot.
    ///
    /// Applies go on while the tree is copied: the copy starts at one applied entry, and
    /// every key written since then gets back the value it had at that point (from the
    /// pre-images the writers keep), so the snapshot is exactly that entry's state.
    fn copy_state(&self) -> Result<(SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>), StorageError> {
        let _one = self.inner.snapshot_lock.lock().expect("snapshot lock");
        let started = std::time::Instant::now();
        let (applied, membership) = self.begin_copy()?;
        let paused = started.elapsed();
        let records = self.finish_copy(self.scan()?);
        self.inner.stats.records.store(records.len() as u64, Ordering::Relaxed);
        let seq = self.inner.snapshot_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let records: SnapshotRecords = records.iter().map(|(k, v)| (serde_bytes::Bytes::new(k.as_ref()), serde_bytes::Bytes::new(v.as_ref()))).collect();
        let data = seal_snapshot_body(&codec::encode(&records));
        tracing::info!(
            records = records.len(),
            bytes = data.len(),
            applies_paused_ms = paused.as_millis() as u64,
            copy_ms = started.elapsed().as_millis() as u64,
            "snapshot built"
        );
        Ok((meta, data))
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

    /// The tree as it is now, without the write lock, in key order (no copy of the bytes).
    fn scan(&self) -> Result<Vec<(sled::IVec, sled::IVec)>, StorageError> {
        self.inner.tree.iter().collect::<Result<_, _>>().map_err(|e| io_err(StorageIOError::read_state_machine, e))
    }

    /// Rolls the scanned records back to the copy's starting point: a key written since
    /// takes its pre-image, or goes if it did not exist then. Both inputs are in key order,
    /// so this is one merge.
    fn finish_copy(&self, scanned: Vec<(sled::IVec, sled::IVec)>) -> Vec<(sled::IVec, sled::IVec)> {
        let preimages = self.inner.write_lock.lock().expect("write lock").preimages.take().unwrap_or_default();
        let mut pre = preimages.into_iter().peekable();
        let mut out = Vec::with_capacity(scanned.len());
        let keep = |out: &mut Vec<(sled::IVec, sled::IVec)>, k: Vec<u8>, v: Option<sled::IVec>| {
            if let Some(v) = v {
                out.push((sled::IVec::from(k), v));
            }
        };
        for (k, v) in scanned {
            // Written since and gone from the tree before the scan reached them.
            while let Some((pk, pv)) = pre.next_if(|(pk, _)| pk.as_slice() < k.as_ref()) {
                keep(&mut out, pk, pv);
            }
            match pre.next_if(|(pk, _)| pk.as_slice() == k.as_ref()) {
                Some((pk, pv)) => keep(&mut out, pk, pv),
                None => out.push((k, v)),
            }
        }
        for (pk, pv) in pre {
            keep(&mut out, pk, pv);
        }
        // Progress travels in the snapshot's meta, not among its records.
        out.retain(|(k, _)| k.as_ref() != APPLIED && k.as_ref() != MEMBERSHIP);
        out
    }
}

impl SmReader {
    /// The node's data dir (the snapshot file's directory), for disk usage metrics.
    pub fn data_dir(&self) -> &std::path::Path {
        self.inner.snapshot_file.dir()
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
    /// Whether a request with idempotency scope `scope` (see `Request::idempotency`) was
    /// recorded here and has not expired.
    pub fn has_idempotency(&self, scope: &str) -> bool {
        self.inner.get_typed::<IdempotencyRecord>(&idempotency_key(scope)).is_some()
    }

    /// The last seq this DC has emitted (0 before any).
    pub fn out_seq(&self) -> u64 {
        self.inner.get_typed(OUT_SEQ).unwrap_or(0)
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

    /// Everything this DC owns, as changes: what a DC that fell behind the outbox cap
    /// installs instead of the events it missed.
    pub fn owned_state(&self) -> Vec<Change> {
        let dc = &self.inner.dc;
        let mut out = Vec::new();
        for item in self.inner.tree.iter() {
            let (k, v) = item.expect("sled read of state machine");
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
        out
    }

    /// Index of the last applied log entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        let bytes = self.inner.tree.get(APPLIED).expect("sled read of state machine");
        let applied: Option<LogId> = bytes.map(|b| codec::decode(&b).expect("applied id decodes")).flatten();
        applied.map(|l| l.index).unwrap_or(0)
    }

    /// Hex SHA-256 per entity kind, and of them all: equal digests mean equal state.
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

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry { log_id: openraft::LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Request::new(cmd, None)) }
    }
    fn order(id: &str, hlc: u64) -> Command {
        Command::PlaceOrder { id: id.into(), session: "t1".into(), sku: "sku1".into(), qty: 1, dc: "dc1".into(), hlc, refresh_session: false }
    }

    /// Snapshots written before records were encoded in bulk still decode, and the other
    /// way round: the bytes are the same.
    #[test]
    fn bulk_encoded_records_are_byte_identical() {
        let plain: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"s/t1".to_vec(), vec![1, 2, 3, 255]), (b"o/x".to_vec(), vec![])];
        let bulk: SnapshotRecords = plain.iter().map(|(k, v)| (serde_bytes::Bytes::new(k), serde_bytes::Bytes::new(v))).collect();
        assert_eq!(codec::encode(&plain), codec::encode(&bulk));
        let back: SnapshotRecordsOwned = codec::decode(&codec::encode(&plain)).expect("decode");
        assert_eq!(back.into_iter().map(|(k, v)| (k.into_vec(), v.into_vec())).collect::<Vec<_>>(), plain);
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

    /// Snapshot data carries a checksum: a flipped byte, a truncation or data without a
    /// checksum (from the wire) are refused; a longer buffer's tail is ignored.
    #[test]
    fn snapshot_data_is_checksummed() {
        let records: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"s/t1".to_vec(), vec![1, 2, 3])];
        let body = codec::encode(&records);
        let data = seal_snapshot_body(&body);
        assert_eq!(open_snapshot_data(&data, false), Ok(body.as_slice()));
        assert!(verify_snapshot_data(&data).is_ok());
        let mut longer = data.clone();
        longer.extend_from_slice(b"stale tail");
        assert_eq!(open_snapshot_data(&longer, false), Ok(body.as_slice()));
        let mut flipped = data.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(verify_snapshot_data(&flipped).is_err());
        assert!(verify_snapshot_data(&data[..data.len() - 1]).is_err());
        assert!(verify_snapshot_data(&data[..20]).is_err());
        assert!(verify_snapshot_data(&body).is_err(), "format 1 is not taken from a leader");
        assert_eq!(open_snapshot_data(&body, true), Ok(body.as_slice()), "but read from our own disk");
        // Checksummed garbage is caught by decoding.
        assert!(verify_snapshot_data(&seal_snapshot_body(&[1, 0xff, 0xff])).is_err());
        let mut huge_len = data.clone();
        huge_len[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(verify_snapshot_data(&huge_len).is_err());
    }

    /// Writes that land while a snapshot copies the tree — inserts, updates, deletes —
    /// are rolled back to the copy's starting point: the snapshot is exactly that state.
    #[tokio::test]
    async fn a_snapshot_copy_is_one_point_while_applies_go_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_log, mut sm) = crate::storage::open(dir.path(), "dc1", Durability::Flush, 16 << 20, 1000).expect("open sled store");
        let setup = [
            entry(1, Command::CreateSession { token: "t1".into(), user: "u".into(), dc: "dc1".into(), hlc: 1 }),
            entry(2, Command::Restock { sku: "sku1".into(), add: 10, dc: "dc1".into(), hlc: 2 }),
            entry(3, order("o1", 3)),
            entry(4, order("o2", 4)),
        ];
        sm.apply(setup).await.expect("apply");
        let expected = sm.finish_copy(sm.scan().expect("scan"));

        let (applied, _) = sm.begin_copy().expect("begin");
        assert_eq!(applied.map(|l| l.index), Some(4));
        // A new key, changed keys (order, inventory, outbox) and deleted keys (trimmed outbox).
        sm.apply([entry(5, order("o3", 5)), entry(6, Command::CancelOrder { id: "o1".into(), dc: "dc1".into(), session: "t1".into(), hlc: 6 })])
            .await
            .expect("apply");
        sm.apply([entry(7, Command::TrimOutbox { upto: 4 }), entry(8, Command::Restock { sku: "sku1".into(), add: 5, dc: "dc1".into(), hlc: 8 })])
            .await
            .expect("apply");
        let now = sm.scan().expect("scan");
        let keys = |r: &[(sled::IVec, sled::IVec)]| r.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_ne!(keys(&now), keys(&expected), "the writes above must change the tree");

        let copied = sm.finish_copy(now);
        assert_eq!(copied, expected);
        assert!(sm.inner.write_lock.lock().unwrap().preimages.is_none(), "writers stop keeping pre-images");
    }
}
