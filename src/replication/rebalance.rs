//! Rebalancing escrow allowances: a DC running low on a SKU asks the reachable DCs for
//! part of their surplus; a DC grants only what it holds above its reserve, by recording
//! `sent[me→them]` through its own Raft log (so it can never grant units it has sold).

use std::sync::Arc;
use std::time::Duration;

use super::CrossDc;
use crate::domain::{Command, Outcome, Request};
use crate::error::NodeError;
use crate::transport::{PeerRequest, PeerResponse};

impl CrossDc {
    /// After an order on `sku`: if this DC's allowance is under the low-water mark, ask
    /// the others (in the background, one ask per SKU at a time). Only the shard's leader
    /// asks: its replica has the stock the order just took, and one node per DC asks
    /// (a node may hold no replica of the shard at all).
    pub fn after_order(self: &Arc<Self>, sku: &str) {
        if self.config().dcs.len() < 2 || !self.shard.is_leader() {
            return; // no other DC to ask, or not this node's to ask
        }
        let low = self.config().replication.low_water_units;
        let available = self.shard.sm.inventory(sku).map(|i| i.available(self.dc())).unwrap_or(0);
        if available >= low || !self.begin_ask(sku) {
            return;
        }
        let (cross, sku) = (self.clone(), sku.to_string());
        tokio::spawn(async move {
            let want = low.saturating_mul(2).saturating_sub(available).max(1);
            let got = cross.ask_peers(&sku, want).await;
            if got > 0 {
                tracing::info!(%sku, got, "stock granted by other DCs");
            }
            cross.end_ask(&sku);
        });
    }

    fn begin_ask(&self, sku: &str) -> bool {
        self.asking.lock().expect("asking lock").insert(sku.to_string())
    }

    fn end_ask(&self, sku: &str) {
        self.asking.lock().expect("asking lock").remove(sku);
    }

    async fn ask_peers(&self, sku: &str, want: u64) -> u64 {
        let mut got: u64 = 0;
        for dc in self.remote_dcs() {
            if got >= want || !self.links.healthy(&dc) {
                continue;
            }
            let Some(leader) = self.links.get(&dc).remote_leader else { continue };
            let req = PeerRequest::AskStock { sku: sku.to_string(), want: want - got };
            if let Ok(PeerResponse::Granted(Ok(n))) = self.peers.call(leader, req, None).await {
                // A number from another DC, used only to stop asking: it must not overflow.
                got = got.saturating_add(n);
            }
        }
        got
    }

    /// On the granting DC's leader: hands over up to `want` units above the reserve, at
    /// most `grant_units_max` per ask and one grant per asking DC and SKU per
    /// `grant_interval_ms` (so a forged ask can move little, and never the reserve). The
    /// reserve is checked again when the grant is applied: an order sold in between
    /// cannot push it below.
    pub async fn grant(&self, sku: &str, want: u64, to: &str) -> Result<u64, NodeError> {
        let shard = &self.shard;
        if !shard.is_leader() {
            return Err(NodeError::NotLeader(shard.leader()));
        }
        let r = &self.config().replication;
        let available = shard.sm.inventory(sku).map(|i| i.available(self.dc())).unwrap_or(0);
        let qty = super::guard::grant_qty(want, available, r.reserve_units, r.grant_units_max);
        if qty == 0 || !self.grants.try_begin(to, sku, Duration::from_millis(r.grant_interval_ms)) {
            return Ok(0);
        }
        let cmd = Command::GrantAboveReserve {
            sku: sku.to_string(),
            qty,
            from: self.dc().to_string(),
            to: to.to_string(),
            hlc: self.hlc.now(),
            reserve: r.reserve_units,
        };
        match shard.submit_local(Request::new(cmd, None)).await? {
            Outcome::Granted { qty } => Ok(qty),
            // Sold in the meantime: nothing to give.
            _ => Ok(0),
        }
    }
}
