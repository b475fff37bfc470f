//! A bounded cache of encoded UDP answers, one per UDP worker (so no lock).
//!
//! An answer depends only on the query's bytes after its ID, the snapshot, the
//! client address (only through which DC subnets hold it: the nearest-first rule
//! looks at nothing else) and, for rotating names, the rotation slot modulo the
//! rotation period. The cache is keyed on the query bytes and the client's
//! subnets, holds one encoded response per phase of the rotation, and belongs to
//! one snapshot: it is emptied as soon as the view hands out a different one. A
//! hit costs a hash lookup and a copy, the ID patched in by the caller.
//!
//! Bounded in bytes: when an insert would pass the bound the cache is emptied and
//! starts again (a flood of distinct queries only costs the uncached path).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_server::proto::op::ResponseCode;

use super::handler::Encoded;
use super::select::in_subnet;
use super::DnsSnapshot;

/// Queries longer than this are never cached (a resolver's query is under 100 bytes).
pub(crate) const MAX_QUERY_BYTES: usize = 512;
/// Rotation periods above this are not cached (the weights allow up to 100 per DC).
pub(crate) const MAX_PERIOD: u64 = 1024;
/// Bytes one worker's cache may hold (keys, responses and bookkeeping).
pub(crate) const MAX_CACHE_BYTES: usize = 4 << 20;
/// Bookkeeping counted per entry and per response on top of their bytes.
const OVERHEAD_BYTES: usize = 64;
/// The client's subnets are a bit set, so at most this many DC subnets.
const MAX_SUBNETS: usize = 64;

/// One cached question: the sent response per rotation phase, and its effects.
pub(crate) struct Entry {
    pub rcode: ResponseCode,
    pub truncated: bool,
    pub fail_open: Option<bool>,
    /// Rotation period, for rotating answers.
    pub period: Option<u64>,
    /// Encoded responses by phase (`slot % period`); one slot when not rotating.
    responses: Vec<Option<Box<[u8]>>>,
}

impl Entry {
    /// The response for this rotation slot (ignored when not rotating), if cached.
    pub fn response(&self, slot: u64) -> Option<&[u8]> {
        let phase = self.period.map_or(0, |p| slot % p);
        self.responses.get(usize::try_from(phase).ok()?)?.as_deref()
    }
}

pub(crate) struct AnswerCache {
    snap: Option<Arc<DnsSnapshot>>,
    /// Every DC subnet of the snapshot, flattened; None if too many for the bit set.
    subnets: Option<Vec<(IpAddr, u8)>>,
    entries: HashMap<Box<[u8]>, Entry>,
    bytes: usize,
    max_bytes: usize,
    /// The key of the current query: client subnet bits, then the query after its ID.
    key: Vec<u8>,
}

impl AnswerCache {
    pub fn new(max_bytes: usize) -> Self {
        Self { snap: None, subnets: None, entries: HashMap::new(), bytes: 0, max_bytes, key: Vec::with_capacity(MAX_QUERY_BYTES + 8) }
    }

    /// Makes the cache belong to `snap`: emptied if it differs from the last one.
    pub fn refresh(&mut self, snap: &Arc<DnsSnapshot>) {
        if self.snap.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap)) {
            return;
        }
        if self.snap.as_deref() != Some(&**snap) {
            self.clear();
            let subnets: Vec<(IpAddr, u8)> = snap.dcs.iter().flat_map(|dc| dc.subnets.iter().copied()).collect();
            self.subnets = (subnets.len() <= MAX_SUBNETS).then_some(subnets);
        }
        self.snap = Some(snap.clone());
    }

    /// Sets the current key to this query from this client; false if it cannot be cached.
    pub fn set_key(&mut self, packet: &[u8], client: IpAddr) -> bool {
        let Some(subnets) = &self.subnets else { return false };
        let Some(query) = packet.get(2..).filter(|q| q.len() <= MAX_QUERY_BYTES) else { return false };
        let bits = subnets.iter().enumerate().filter(|(_, (net, prefix))| in_subnet(client, *net, *prefix)).fold(0u64, |bits, (i, _)| bits | 1 << i);
        self.key.clear();
        self.key.extend_from_slice(&bits.to_be_bytes());
        self.key.extend_from_slice(query);
        true
    }

    /// The entry under the current key.
    pub fn entry(&self) -> Option<&Entry> {
        self.entries.get(&self.key[..])
    }

    /// Keeps `encoded` under the current key, at its rotation phase.
    pub fn store(&mut self, encoded: &Encoded) {
        let period = encoded.effects.turn.map(|t| t.period);
        if period.is_some_and(|p| p == 0 || p > MAX_PERIOD) {
            return;
        }
        let matches = |e: &Entry| e.period == period && e.rcode == encoded.rcode;
        if !self.entries.get(&self.key[..]).is_some_and(matches) {
            self.insert_entry(encoded, period);
        }
        let phase = encoded.effects.turn.map_or(0, |t| t.slot % t.period);
        let cost = encoded.bytes.len().saturating_add(OVERHEAD_BYTES);
        if !self.reserve(cost) {
            return;
        }
        let slot = self.entries.get_mut(&self.key[..]).and_then(|e| e.responses.get_mut(usize::try_from(phase).ok()?));
        match slot {
            Some(slot @ None) => *slot = Some(encoded.bytes.clone().into_boxed_slice()),
            _ => self.bytes = self.bytes.saturating_sub(cost),
        }
    }

    fn insert_entry(&mut self, encoded: &Encoded, period: Option<u64>) {
        let phases = usize::try_from(period.unwrap_or(1)).unwrap_or(1);
        let cost = self.key.len().saturating_add(phases.saturating_mul(std::mem::size_of::<Option<Box<[u8]>>>())).saturating_add(OVERHEAD_BYTES);
        if !self.reserve(cost) {
            return;
        }
        let entry = Entry { rcode: encoded.rcode, truncated: encoded.truncated, fail_open: encoded.effects.fail_open, period, responses: vec![None; phases] };
        // An entry replaced (its rotation period changed) stays counted until the next clear.
        self.entries.insert(self.key.clone().into_boxed_slice(), entry);
    }

    /// Counts `cost` more bytes, emptying the cache first if they would not fit;
    /// false if they cannot fit at all.
    fn reserve(&mut self, cost: usize) -> bool {
        if cost > self.max_bytes {
            return false;
        }
        if self.bytes.saturating_add(cost) > self.max_bytes {
            self.clear();
        }
        self.bytes = self.bytes.saturating_add(cost);
        true
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::answer::Turn;
    use crate::dns::handler::Effects;
    use crate::dns::DcView;

    fn encoded(len: usize, turn: Option<Turn>) -> Encoded {
        Encoded { bytes: vec![7; len], rcode: ResponseCode::NoError, truncated: false, effects: Effects { fail_open: None, turn } }
    }

    fn query(n: u32) -> Vec<u8> {
        let mut packet = vec![0, 0];
        packet.extend_from_slice(&n.to_be_bytes());
        packet
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn stays_within_its_byte_bound() {
        let mut cache = AnswerCache::new(10_000);
        cache.refresh(&Arc::new(DnsSnapshot::default()));
        for n in 0..1000 {
            assert!(cache.set_key(&query(n), CLIENT));
            cache.store(&encoded(100, None));
            assert!(cache.bytes() <= 10_000, "{} bytes", cache.bytes());
            assert!(cache.entry().and_then(|e| e.response(0)).is_some(), "the newest answer is kept");
        }
        assert!(cache.entries.len() < 1000);
        // An answer larger than the whole bound is never kept.
        assert!(cache.set_key(&query(5000), CLIENT));
        cache.store(&encoded(20_000, None));
        assert!(cache.entry().and_then(|e| e.response(0)).is_none());
        assert!(!cache.set_key(&[0; MAX_QUERY_BYTES + 3], CLIENT), "long queries are not cached");
    }

    #[test]
    fn a_changed_snapshot_empties_it_and_an_equal_one_does_not() {
        let mut cache = AnswerCache::new(MAX_CACHE_BYTES);
        let snap = DnsSnapshot { dcs: vec![DcView::new("dc1")], ..DnsSnapshot::default() };
        cache.refresh(&Arc::new(snap.clone()));
        cache.set_key(&query(1), CLIENT);
        cache.store(&encoded(40, None));
        cache.refresh(&Arc::new(snap.clone()));
        assert!(cache.entry().is_some(), "an equal snapshot in another Arc keeps the answers");
        let mut changed = snap;
        changed.dcs[0].healthy = false;
        cache.refresh(&Arc::new(changed));
        assert!(cache.entry().is_none());
    }

    #[test]
    fn rotating_answers_are_kept_per_phase_and_clients_by_their_subnets() {
        let mut cache = AnswerCache::new(MAX_CACHE_BYTES);
        let mut dc = DcView::new("dc1");
        dc.subnets = vec![(IpAddr::from([10, 1, 0, 0]), 16)];
        cache.refresh(&Arc::new(DnsSnapshot { dcs: vec![dc], ..DnsSnapshot::default() }));
        cache.set_key(&query(1), IpAddr::from([10, 1, 2, 3]));
        let mut first = encoded(40, Some(Turn { slot: 7, period: 3 }));
        first.bytes[0] = 1;
        cache.store(&first);
        let entry = cache.entry().unwrap();
        assert_eq!(entry.period, Some(3));
        assert_eq!(entry.response(1).map(|b| b[0]), Some(1), "slot 7 is phase 1");
        assert!(entry.response(2).is_none() && entry.response(3).is_none());
        // Another client in the same subnet shares the answers; one outside does not.
        cache.set_key(&query(1), IpAddr::from([10, 1, 200, 1]));
        assert!(cache.entry().is_some());
        cache.set_key(&query(1), IpAddr::from([10, 2, 0, 1]));
        assert!(cache.entry().is_none());
    }
}
