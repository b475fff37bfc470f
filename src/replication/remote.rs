//! Calls to another DC on a client's behalf: asking the owner of an order or session
//! this DC has not seen yet for its copy, and forwarding a cancel to the DC that owns
//! the order.

use crate::domain::{Found, Lookup, Outcome, Request};
use crate::error::NodeError;
use crate::raft::NodeId;
use crate::transport::{PeerRequest, PeerResponse};

use super::CrossDc;

impl CrossDc {
    /// Sends a cancel for an order owned by another DC to that DC: its last known leader
    /// first, then its nodes in turn.
    pub async fn forward_to_owner(&self, owner: &str, req: Request) -> Result<Outcome, NodeError> {
        let mut targets: Vec<NodeId> = self.config().dc_nodes(owner).iter().map(|n| n.id).collect();
        if let Some(l) = self.links.get(owner).remote_leader {
            targets.sort_by_key(|t| *t != l);
        }
        let mut last = NodeError::Unreachable(owner.to_string());
        for t in targets {
            match self.peers.call(t, PeerRequest::Submit(req.clone()), Some(self.request_timeout / 3)).await {
                Ok(PeerResponse::Submit(r)) => return r,
                Ok(other) => last = NodeError::Internal(format!("unexpected answer: {other:?}")),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Asks `owner` (another DC) for its copy of an order or session it created: one
    /// lookup, bounded by half the request timeout. Its last known leader first, then its
    /// nodes in turn (healthy ones first); any node of the owner answers after a read
    /// barrier, so what it says is linearizable in the owner DC. An error means the owner
    /// could not answer (retryable: `owner_unreachable` to the client).
    pub async fn lookup(&self, owner: &str, what: Lookup) -> Result<Found, NodeError> {
        let r = tokio::time::timeout(self.request_timeout / 2, self.lookup_attempt(owner, &what)).await.unwrap_or(Err(NodeError::Timeout));
        let label = if r.is_ok() { "ok" } else { "error" };
        self.metrics.lookups.with_label_values(&[owner, label]).inc();
        r
    }

    async fn lookup_attempt(&self, owner: &str, what: &Lookup) -> Result<Found, NodeError> {
        let owner_nodes: Vec<NodeId> = self.config().dc_nodes(owner).iter().map(|n| n.id).collect();
        let mut targets = owner_nodes.clone();
        let leader = self.links.get(owner).remote_leader;
        targets.sort_by_key(|t| (Some(*t) != leader, !self.links.node_healthy(*t)));
        let per_call = self.request_timeout / 5;
        let mut last = NodeError::Unreachable(owner.to_string());
        let mut tried = Vec::new();
        while let Some(t) = targets.first().copied() {
            targets.remove(0);
            tried.push(t);
            match self.peers.call(t, PeerRequest::Lookup(what.clone()), Some(per_call)).await {
                Ok(PeerResponse::Lookup(Ok(found))) => return self.check_found(owner, what, found),
                // Its leader is elsewhere (or it has none): try the node it names next.
                Ok(PeerResponse::Lookup(Err(NodeError::NotLeader(Some(l))))) if !tried.contains(&l) && owner_nodes.contains(&l) => {
                    targets.retain(|x| *x != l);
                    targets.insert(0, l);
                    last = NodeError::NotLeader(Some(l));
                }
                Ok(PeerResponse::Lookup(Err(e))) => last = e,
                Ok(other) => last = NodeError::Internal(format!("unexpected answer to a lookup: {other:?}")),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// An answer is taken only if it is what was asked for, from its owner, and not from
    /// the far future.
    fn check_found(&self, owner: &str, what: &Lookup, found: Found) -> Result<Found, NodeError> {
        let max_offset = self.config().replication.max_clock_offset_ms;
        super::guard::check_found(what, owner, &found, crate::hlc::wall_ms(), max_offset).map(|_| found).map_err(|m| {
            crate::warn_limited!("bad_lookup_answer", %owner, reason = %m, "lookup answer refused");
            NodeError::BadRequest(m)
        })
    }

    /// On the owner: answers a lookup from another DC, for what this DC owns only, after
    /// a read barrier.
    /// A node of this DC that holds no replica of the shard answers from the shard's
    /// leader's.
    pub async fn answer_lookup(&self, what: Lookup) -> Result<Found, NodeError> {
        if matches!(what, Lookup::Inventory(_)) {
            return Err(NodeError::BadRequest("stock is not looked up across DCs".into()));
        }
        let id = what.key();
        crate::domain::validate::name("id", id).map_err(NodeError::BadRequest)?;
        if self.config().owner_of(id).as_deref() != Some(self.dc()) {
            return Err(NodeError::BadRequest(format!("{id} is not {}'s", self.dc())));
        }
        Ok(match self.shard.read(what, false).await? {
            Found::Order(o) => Found::Order(o.filter(|o| o.dc == self.shard.dc)),
            other => other,
        })
    }
}
