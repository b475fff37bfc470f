//! Cross-DC replication. Each DC's leader streams the events its DC originated — kept in
//! the replicated outbox of the state machine — to every other DC, batched, in origin
//! order ([`shipper`]). The receiving DC applies them through its own Raft log; its
//! per-origin cursor, also in the state machine, makes that exactly-once across restarts
//! and leader changes on both sides ([`receiver`]). Every node probes the other DCs for
//! liveness and leadership ([`links`]), which status, metrics, inventory answers and DNS
//! read. A DC short of stock asks the others for part of their surplus ([`rebalance`]).
//! A DC asks the owner of an order or session it has not seen yet, and forwards cancels
//! to it ([`remote`]).

pub mod clock;
pub mod guard;
pub mod lag;
pub mod links;
pub mod rebalance;
pub mod receiver;
pub mod remote;
pub mod shipper;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::ClusterConfig;
use crate::hlc::Hlc;
use crate::metrics::Metrics;
use crate::shard::Shard;
use crate::transport::{Faults, Peers};
pub use links::{Link, Links};

/// Everything between this node's shard and the other DCs: the links to them, and the
/// state of the asks and grants in flight.
pub struct CrossDc {
    pub shard: Arc<Shard>,
    pub links: Arc<Links>,
    pub hlc: Arc<Hlc>,
    /// Exact lag of the events applied here, per origin (bounded).
    pub lag: lag::LagSamples,
    /// Exact lag of the events this node shipped as leader, per destination DC: from
    /// their commit here to the answer saying they are committed there (bounded).
    pub shipped: lag::LagSamples,
    peers: Peers,
    faults: Faults,
    metrics: Metrics,
    request_timeout: Duration,
    /// SKUs this node is asking other DCs for stock for (one ask at a time per SKU).
    asking: Mutex<HashSet<String>>,
    /// Grants to other DCs: how much and how often (see [`guard`]).
    grants: guard::GrantLimiter,
}

impl CrossDc {
    /// This node is not to be sent clients: its clock is off from its DC's, or a disk
    /// sync failed (its Raft groups stopped). Its DNS view, its answers to its DC's probes
    /// and `/healthz` all say so.
    pub fn unfit(&self) -> bool {
        self.links.fenced() || self.shard.disk.failed()
    }

    pub fn new(shard: Arc<Shard>, hlc: Arc<Hlc>, peers: Peers, faults: Faults, metrics: Metrics) -> Arc<Self> {
        let c = &shard.config;
        let remote_dcs = c.dc_names().into_iter().filter(|d| *d != shard.dc);
        let links = Links::new(remote_dcs, Duration::from_millis(c.replication.dc_unhealthy_after_ms));
        let request_timeout = Duration::from_millis(c.limits.request_timeout_ms);
        Arc::new(CrossDc {
            shard,
            links,
            hlc,
            lag: Default::default(),
            shipped: Default::default(),
            peers,
            faults,
            metrics,
            request_timeout,
            asking: Default::default(),
            grants: Default::default(),
        })
    }

    fn config(&self) -> &ClusterConfig {
        &self.shard.config
    }

    /// This node's DC.
    pub fn dc(&self) -> &str {
        &self.shard.dc
    }

    /// The other DCs, in cluster-file order.
    pub fn remote_dcs(&self) -> Vec<String> {
        self.config().dc_names().into_iter().filter(|d| d != self.dc()).collect()
    }
}

/// Starts, for every other DC, its prober and its shipper, plus the outbox trimmer and (in
/// shard 0) the prober of this DC's nodes.
pub fn spawn(cross: Arc<CrossDc>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for dc in cross.remote_dcs() {
        tasks.push(tokio::spawn(links::probe_loop(cross.clone(), dc.clone())));
        tasks.push(tokio::spawn(shipper::ship_loop(cross.clone(), dc)));
    }
    // This DC's nodes (and this node's clock against theirs) once per node, not per shard.
    if cross.shard.number == 0 {
        tasks.push(tokio::spawn(links::probe_local_loop(cross.clone())));
    }
    tasks.push(tokio::spawn(shipper::trim_loop(cross)));
    tasks
}
