//! What this node knows of every other DC: when it last answered, who leads it, and —
//! on the leader — how far it has applied our events.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::clock::{self, ClockView, Sample};
use super::CrossDc;
use crate::error::NodeError;
use crate::raft::NodeId;
use crate::transport::{PeerRequest, PeerResponse};

#[derive(Debug, Clone, Default)]
pub struct Link {
    /// Last answer from any node of that DC.
    pub last_contact: Option<Instant>,
    /// Its leader as it last told us.
    pub remote_leader: Option<NodeId>,
    /// Leader only: that DC's cursor for our events (None until it told us).
    pub acked: Option<u64>,
    /// Leader only: our events it has not applied, and the age of the oldest.
    pub lag_events: u64,
    pub lag_ms: u64,
    /// Times it was caught up from a snapshot because it fell past the outbox cap.
    pub snapshot_catchups: u64,
    /// Leader only: answers acknowledging more events than we had emitted (ignored).
    pub bad_acks: u64,
    /// Probes in a row that no node of that DC answered.
    pub misses: u32,
    /// Every node of that DC failed its last probe, and at least [`DOWN_AFTER_MISSES`]
    /// probes in a row failed: down without waiting for `unhealthy_after`.
    pub down: bool,
    /// Health as the probe loop last saw it (None before the first probe), and how
    /// often it changed since (flaps show here).
    pub was_healthy: Option<bool>,
    pub health_changes: u64,
}

/// Probes in a row that must fail (and at least one per node of the DC) before a DC
/// counts as down: one late answer from a busy DC does not take it out of DNS, while
/// refused connections (a dead DC) add up within one probe round.
pub const DOWN_AFTER_MISSES: usize = 3;

fn misses_to_down(nodes: usize) -> usize {
    nodes.max(DOWN_AFTER_MISSES)
}

pub struct Links {
    // std RwLock: held for a copy or an update, never across an await.
    map: RwLock<BTreeMap<String, Link>>,
    /// The probed nodes whose last probe failed, and since when every probe of each has
    /// failed (a node answering again leaves the map; at most the cluster's nodes).
    failing: RwLock<HashMap<NodeId, Instant>>,
    unhealthy_after: Duration,
    /// This node's clock against its DC's, from the last round of local probes.
    clock: RwLock<ClockView>,
}

impl Links {
    pub fn new(dcs: impl IntoIterator<Item = String>, unhealthy_after: Duration) -> Arc<Self> {
        let map = dcs.into_iter().map(|d| (d, Link::default())).collect();
        Arc::new(Links { map: RwLock::new(map), failing: Default::default(), unhealthy_after, clock: Default::default() })
    }

    pub fn get(&self, dc: &str) -> Link {
        self.map.read().expect("links lock").get(dc).cloned().unwrap_or_default()
    }

    pub fn all(&self) -> BTreeMap<String, Link> {
        self.map.read().expect("links lock").clone()
    }

    pub fn update(&self, dc: &str, f: impl FnOnce(&mut Link)) {
        if let Some(l) = self.map.write().expect("links lock").get_mut(dc) {
            f(l);
        }
    }

    pub fn record_probe(&self, node: NodeId, ok: bool) {
        let mut failing = self.failing.write().expect("links lock");
        if ok {
            failing.remove(&node);
        } else {
            failing.entry(node).or_insert_with(Instant::now);
        }
    }

    /// How long `node` has failed every probe; None while it answers (or before its
    /// first probe).
    pub fn failing_for(&self, node: NodeId) -> Option<Duration> {
        self.failing.read().expect("links lock").get(&node).map(Instant::elapsed)
    }

    /// This node's clock against its DC's (fenced: off by more than the bound).
    pub fn clock(&self) -> ClockView {
        self.clock.read().expect("links lock").clone()
    }

    /// Whether this node fenced itself for its clock: read on every write, so without
    /// copying the offsets.
    pub fn fenced(&self) -> bool {
        self.clock.read().expect("links lock").fenced
    }

    fn set_clock(&self, view: ClockView) {
        let mut clock = self.clock.write().expect("links lock");
        if clock.fenced != view.fenced {
            tracing::warn!(fenced = view.fenced, offsets_ms = ?view.offsets_ms, "this node's clock against its DC's changed");
        }
        *clock = view;
    }

    /// A node counts as healthy unless its last probe failed (never probed: healthy).
    pub fn node_healthy(&self, node: NodeId) -> bool {
        !self.failing.read().expect("links lock").contains_key(&node)
    }

    /// Heard from recently.
    pub fn reachable(&self, dc: &str) -> bool {
        self.get(dc).last_contact.is_some_and(|t| t.elapsed() < self.unhealthy_after)
    }

    /// Reachable, not down, and it has a leader: it takes writes.
    pub fn healthy(&self, dc: &str) -> bool {
        self.healthy_link(&self.get(dc))
    }

    fn healthy_link(&self, l: &Link) -> bool {
        self.why_unhealthy(l).is_none()
    }

    /// What keeps a DC out of the healthy ones, for the log line of a health change.
    fn why_unhealthy(&self, l: &Link) -> Option<&'static str> {
        if l.down {
            Some("every node failed its probes")
        } else if !l.last_contact.is_some_and(|t| t.elapsed() < self.unhealthy_after) {
            Some("no answer lately")
        } else if l.remote_leader.is_none() {
            Some("no leader there")
        } else {
            None
        }
    }

    /// Records one probe of `dc` (of `nodes` nodes) and counts a change of its health.
    fn record_dc_probe(&self, dc: &str, nodes: usize, answer: Option<Option<NodeId>>) {
        let mut map = self.map.write().expect("links lock");
        let Some(l) = map.get_mut(dc) else { return };
        match answer {
            Some(leader) => {
                l.last_contact = Some(Instant::now());
                l.remote_leader = leader;
                l.misses = 0;
                l.down = false;
            }
            None => {
                l.misses = l.misses.saturating_add(1);
                l.down = usize::try_from(l.misses).is_ok_and(|m| m >= misses_to_down(nodes));
            }
        }
        let why = self.why_unhealthy(l);
        let healthy = why.is_none();
        if l.was_healthy.replace(healthy).is_some_and(|was| was != healthy) {
            l.health_changes = l.health_changes.saturating_add(1);
            let reason = why.unwrap_or("answered, with a leader");
            tracing::info!(%dc, healthy, reason, changes = l.health_changes, misses = l.misses, "dc health changed");
        }
    }
}

/// Every node asks one node of `dc`, every probe interval, whether it is alive and who
/// leads it, going round the DC's nodes so each one's health is fresh (a node whose
/// probe failed once is tried again within a round, not only when the others fail);
/// when one does not answer it tries the next node at once if the failure was quick (a
/// refused connection) — so a dead DC is found within one round.
pub async fn probe_loop(cross: Arc<CrossDc>, dc: String) {
    let interval = Duration::from_millis(cross.config().replication.probe_interval_ms);
    let targets: Vec<NodeId> = cross.config().dc_nodes(&dc).iter().map(|n| n.id).collect();
    let mut i = 0usize;
    let mut quick_failures = 0usize;
    loop {
        let started = Instant::now();
        let target = targets[i % targets.len()];
        // The next node of that DC; kept below the list's length, so it never grows.
        i = (i + 1) % targets.len();
        match cross.peers.call(target, PeerRequest::Probe, Some(interval * 2)).await {
            Ok(PeerResponse::Probe(ack)) if ack.dc == dc => {
                cross.links.record_probe(target, true);
                cross.links.record_dc_probe(&dc, targets.len(), Some(ack.leader));
                quick_failures = 0;
            }
            other => {
                let refused = matches!(other, Err(NodeError::Unreachable(_)));
                tracing::debug!(%dc, target, answer = ?other.err(), "probe failed");
                cross.links.record_probe(target, false);
                cross.links.record_dc_probe(&dc, targets.len(), None);
                if refused && quick_failures < misses_to_down(targets.len()) {
                    quick_failures += 1;
                    continue;
                }
                quick_failures = 0;
            }
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}

/// Every node probes the other nodes of its own DC, so DNS can leave out a dead one.
pub async fn probe_local_loop(cross: Arc<CrossDc>) {
    let interval = Duration::from_millis(cross.config().replication.probe_interval_ms);
    let max_offset = cross.config().replication.max_clock_offset_ms;
    let me = cross.shard.me;
    let peers: Vec<NodeId> = cross.config().dc_nodes(cross.dc()).iter().map(|n| n.id).filter(|id| *id != me).collect();
    loop {
        let started = Instant::now();
        let probes = peers.iter().map(|p| async {
            let sent_ms = crate::hlc::wall_ms();
            let r = cross.peers.call(*p, PeerRequest::Clock, Some(interval * 2)).await;
            (*p, sent_ms, r, crate::hlc::wall_ms())
        });
        let mut samples = Vec::new();
        for (peer, sent_ms, r, received_ms) in futures::future::join_all(probes).await {
            // A peer that fenced itself for its clock answers, but is not healthy.
            let healthy = match r {
                Ok(PeerResponse::Clock { wall_ms, fenced }) => {
                    samples.push(Sample { peer, sent_ms, their_ms: wall_ms, received_ms });
                    !fenced
                }
                _ => false,
            };
            cross.links.record_probe(peer, healthy);
        }
        cross.links.set_clock(clock::judge(&samples, peers.len(), max_offset));
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}
