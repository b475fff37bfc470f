//! Cross-DC replication (DESIGN §2). Each DC's leader streams the events its DC
//! originated — kept in the replicated outbox of the state machine — to every other DC,
//! batched, in origin order ([`shipper`]). The receiving DC applies them through its own
//! Raft log; its per-origin cursor, also in the state machine, makes that exactly-once
//! across restarts and leader changes on both sides ([`receiver`]). Every node probes the
//! other DCs for liveness and leadership ([`links`]), which status, metrics, inventory
//! answers and DNS read. A DC short of stock asks the others for part of their surplus
//! ([`rebalance`]).

pub mod guard;
pub mod links;
pub mod rebalance;
pub mod receiver;
pub mod shipper;

use std::sync::Arc;

use crate::node::Node;
pub use links::{Link, Links};

/// Starts, for every other DC, its prober and its shipper, plus the outbox trimmer.
pub fn spawn(node: Arc<Node>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for dc in node.config.dc_names().into_iter().filter(|d| *d != node.info.dc) {
        tasks.push(tokio::spawn(links::probe_loop(node.clone(), dc.clone())));
        tasks.push(tokio::spawn(shipper::ship_loop(node.clone(), dc)));
    }
    tasks.push(tokio::spawn(links::probe_local_loop(node.clone())));
    tasks.push(tokio::spawn(shipper::trim_loop(node)));
    tasks
}
