//! What this node knows of every other DC: when it last answered, who leads it, and —
//! on the leader — how far it has applied our events.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::CrossDc;
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
}

pub struct Links {
    // std RwLock: held for a copy or an update, never across an await.
    map: RwLock<BTreeMap<String, Link>>,
    /// Per node probed: when it last answered, and when it last failed to.
    nodes: RwLock<HashMap<NodeId, (Option<Instant>, Option<Instant>)>>,
    unhealthy_after: Duration,
}

impl Links {
    pub fn new(dcs: impl IntoIterator<Item = String>, unhealthy_after: Duration) -> Arc<Self> {
        let map = dcs.into_iter().map(|d| (d, Link::default())).collect();
        Arc::new(Links { map: RwLock::new(map), nodes: Default::default(), unhealthy_after })
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
        let mut nodes = self.nodes.write().expect("links lock");
        let seen = nodes.entry(node).or_default();
        if ok {
            seen.0 = Some(Instant::now());
        } else {
            seen.1 = Some(Instant::now());
        }
    }

    /// A node counts as healthy unless its last probe failed (never probed: healthy).
    pub fn node_healthy(&self, node: NodeId) -> bool {
        match self.nodes.read().expect("links lock").get(&node) {
            Some((ok, Some(fail))) => ok.is_some_and(|ok| ok > *fail),
            _ => true,
        }
    }

    /// Heard from recently.
    pub fn reachable(&self, dc: &str) -> bool {
        self.get(dc).last_contact.is_some_and(|t| t.elapsed() < self.unhealthy_after)
    }

    /// Reachable, and it has a leader: it takes writes.
    pub fn healthy(&self, dc: &str) -> bool {
        let l = self.get(dc);
        l.last_contact.is_some_and(|t| t.elapsed() < self.unhealthy_after) && l.remote_leader.is_some()
    }
}

/// Every node asks one node of `dc`, every probe interval, whether it is alive and who
/// leads it; it tries the next node when one does not answer.
pub async fn probe_loop(cross: Arc<CrossDc>, dc: String) {
    let interval = Duration::from_millis(cross.config().replication.probe_interval_ms);
    let targets: Vec<NodeId> = cross.config().dc_nodes(&dc).iter().map(|n| n.id).collect();
    let mut i = 0usize;
    loop {
        let started = Instant::now();
        let target = targets[i % targets.len()];
        match cross.peers.call(target, PeerRequest::Probe, Some(interval * 2)).await {
            Ok(PeerResponse::Probe(ack)) if ack.dc == dc => {
                cross.links.record_probe(target, true);
                cross.links.update(&dc, |l| {
                    l.last_contact = Some(Instant::now());
                    l.remote_leader = ack.leader;
                });
            }
            other => {
                tracing::debug!(%dc, target, answer = ?other.err(), "probe failed");
                cross.links.record_probe(target, false);
                // The next node of that DC; kept below the list's length, so it never grows.
                i = (i + 1) % targets.len();
            }
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}

/// Every node probes the other nodes of its own DC, so DNS can leave out a dead one.
pub async fn probe_local_loop(cross: Arc<CrossDc>) {
    let interval = Duration::from_millis(cross.config().replication.probe_interval_ms);
    let me = cross.shard.me;
    let peers: Vec<NodeId> = cross.config().dc_nodes(cross.dc()).iter().map(|n| n.id).filter(|id| *id != me).collect();
    loop {
        let started = Instant::now();
        let probes = peers.iter().map(|p| async { (*p, cross.peers.call(*p, PeerRequest::Probe, Some(interval * 2)).await) });
        for (peer, r) in futures::future::join_all(probes).await {
            cross.links.record_probe(peer, matches!(r, Ok(PeerResponse::Probe(_))));
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}
