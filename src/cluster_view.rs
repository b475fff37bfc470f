//! What this node believes about the whole cluster's health, as the DNS server sees it:
//! its own DC from Raft, other DCs from the links, drain and weight from the replicated
//! operator settings.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{parse_cidr, NodeId};
use crate::dns::{DcView, DnsSnapshot, DnsView, NodeView};
use crate::replication::CrossDc;

/// How long a computed snapshot serves queries: far below the health bound (seconds),
/// and it keeps the per-query cost to a reference count.
const SNAPSHOT_TTL: Duration = Duration::from_millis(100);

pub struct ClusterView {
    cross: Arc<CrossDc>,
    // std Mutex: held to swap or clone a snapshot, never across an await.
    cached: Mutex<Option<(Instant, Arc<DnsSnapshot>)>>,
}

impl ClusterView {
    pub fn new(cross: Arc<CrossDc>) -> Self {
        ClusterView { cross, cached: Mutex::new(None) }
    }

    fn compute(&self) -> DnsSnapshot {
        let c = &self.cross.shard.config;
        DnsSnapshot { zone: c.cluster.zone.clone(), ttl: c.cluster.dns_ttl_s, dcs: c.dcs.iter().map(|dc| self.dc_view(dc)).collect() }
    }

    fn ip_of(&self, id: Option<NodeId>) -> Option<IpAddr> {
        id.and_then(|id| self.cross.shard.config.node_by_id(id)).and_then(|n| self.cross.shard.addresses().ip_of(&n))
    }

    fn dc_view(&self, dc: &crate::config::DcConfig) -> DcView {
        let (shard, links) = (&self.cross.shard, &self.cross.links);
        let local = dc.name == shard.dc;
        let (healthy, leader) = if local {
            let leader = shard.leader();
            (leader.is_some(), self.ip_of(leader))
        } else {
            (links.healthy(&dc.name), self.ip_of(links.get(&dc.name).remote_leader))
        };
        let settings = shard.sm.settings(&dc.name);
        let nodes = shard
            .config
            .dc_nodes(&dc.name)
            .into_iter()
            // A node named by host whose name has not resolved yet has no address to give.
            .filter_map(|n| Some((shard.addresses().ip_of(&n)?, n)))
            .map(|(ip, n)| {
                // This node by its own clock check and disk; the others by their probes (a
                // node that fenced itself for its clock, or whose disk failed, answers as
                // unhealthy).
                let up = if n.id == shard.me { !self.cross.unfit() } else { links.node_healthy(n.id) };
                NodeView { healthy: healthy && up, name: n.name, ip, http_port: n.http.port() }
            })
            .collect();
        let subnets = dc.subnet.as_deref().and_then(|s| parse_cidr(s).ok()).into_iter().collect();
        DcView { name: dc.name.clone(), healthy, drained: settings.drained, weight: settings.weight, leader, nodes, subnets }
    }
}

impl DnsView for ClusterView {
    fn snapshot(&self) -> DnsSnapshot {
        (*self.shared()).clone()
    }

    /// The same `Arc` for `SNAPSHOT_TTL`, and again after it while nothing changed, so
    /// the DNS answer caches stay valid.
    fn shared(&self) -> Arc<DnsSnapshot> {
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *cached {
            Some((at, snap)) if at.elapsed() < SNAPSHOT_TTL => snap.clone(),
            Some((at, snap)) => {
                let fresh = self.compute();
                if **snap != fresh {
                    *snap = Arc::new(fresh);
                }
                *at = Instant::now();
                snap.clone()
            }
            None => {
                let snap = Arc::new(self.compute());
                *cached = Some((Instant::now(), snap.clone()));
                snap
            }
        }
    }
}
