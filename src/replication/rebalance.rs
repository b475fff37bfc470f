//! Rebalancing escrow allowances: a DC running low on a SKU asks the reachable DCs for
//! part of their surplus; a DC grants only what it holds above its reserve, by recording
//! `sent[me→them]` through its own Raft log (so it can never grant units it has sold).

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Command, Outcome, Request};
use crate::error::NodeError;
use crate::node::Node;
use crate::transport::{PeerRequest, PeerResponse};

/// After an order on `sku`: if this DC's allowance is under the low-water mark, ask the
/// others (in the background, one ask per SKU at a time).
pub fn after_order(node: &Arc<Node>, sku: &str) {
    if node.config.dcs.len() < 2 {
        return; // no other DC to ask
    }
    let low = node.config.replication.low_water_units;
    let available = node.sm.inventory(sku).map(|i| i.available(&node.info.dc)).unwrap_or(0);
    if available >= low || !node.begin_ask(sku) {
        return;
    }
    let (node, sku) = (node.clone(), sku.to_string());
    tokio::spawn(async move {
        let want = (2 * low).saturating_sub(available).max(1);
        let got = ask_peers(&node, &sku, want).await;
        if got > 0 {
            tracing::info!(%sku, got, "stock granted by other DCs");
        }
        node.end_ask(&sku);
    });
}

async fn ask_peers(node: &Node, sku: &str, want: u64) -> u64 {
    let mut got = 0;
    for dc in node.config.dc_names().into_iter().filter(|d| *d != node.info.dc) {
        if got >= want || !node.links.healthy(&dc) {
            continue;
        }
        let Some(leader) = node.links.get(&dc).remote_leader else { continue };
        let req = PeerRequest::AskStock { sku: sku.to_string(), want: want - got };
        if let Ok(PeerResponse::Granted(Ok(n))) = node.peers.call(leader, req, None).await {
            // A number from another DC, used only to stop asking: it must not overflow.
            got = got.saturating_add(n);
        }
    }
    got
}

/// On the granting DC's leader: hands over up to `want` units above the reserve, at
/// most `grant_units_max` per ask and one grant per asking DC and SKU per
/// `grant_interval_ms` (so a forged ask can move little, and never the reserve). The
/// reserve is checked again when the grant is applied: an order sold in between cannot
/// push it below.
pub async fn grant(node: &Node, sku: &str, want: u64, to: &str) -> Result<u64, NodeError> {
    if !node.is_leader() {
        return Err(NodeError::NotLeader(node.leader()));
    }
    let r = &node.config.replication;
    let available = node.sm.inventory(sku).map(|i| i.available(&node.info.dc)).unwrap_or(0);
    let qty = super::guard::grant_qty(want, available, r.reserve_units, r.grant_units_max);
    if qty == 0 || !node.grants.try_begin(to, sku, Duration::from_millis(r.grant_interval_ms)) {
        return Ok(0);
    }
    let cmd =
        Command::GrantAboveReserve { sku: sku.to_string(), qty, from: node.info.dc.clone(), to: to.to_string(), hlc: node.hlc.now(), reserve: r.reserve_units };
    match node.actors.submit(Request::new(cmd, None)).await? {
        Outcome::Granted { qty } => Ok(qty),
        // Sold in the meantime: nothing to give.
        _ => Ok(0),
    }
}
