//! The peer port's dispatcher: a request goes to the shard it names (`PeerRequest::Shard`,
//! or shard 0 when unwrapped); there, Raft RPCs, forwarded writes, read-index asks and
//! membership changes from nodes of this DC go to the shard's Raft group, and everything
//! from other DCs goes to the shard's cross-DC receiver.

use std::sync::Arc;

use crate::domain::{Command, Outcome, Rejection, Request};
use crate::error::NodeError;
use crate::raft::NodeId;
use crate::replication::{receiver, CrossDc};
use crate::shard::inbound;
use crate::shards::Shards;
use crate::storage::digest::Wanted;
use crate::transport::{PeerHandler, PeerRequest, PeerResponse};

pub struct Handler {
    /// The shards this node hosts, by number, each with its cross-DC side.
    pub shards: Arc<Shards>,
}

#[async_trait::async_trait]
impl PeerHandler for Handler {
    async fn handle(&self, from: NodeId, req: PeerRequest) -> PeerResponse {
        let (number, req) = match req {
            PeerRequest::Shard { shard, req } => (shard, *req),
            other => (0, other),
        };
        if matches!(req, PeerRequest::Shard { .. }) {
            crate::warn_limited!("peer_nested_shard", from, "nested shard request refused");
            return PeerResponse::Refused("nested shard request".into());
        }
        // A node's clock and fitness are the node's (shard 0's prober judges the clock):
        // asked through any shard, shard 0 answers.
        let number = if matches!(req, PeerRequest::Clock) { 0 } else { number };
        let Some(cross) = self.shards.all().get(usize::from(number)) else {
            crate::warn_limited!("peer_unknown_shard", from, shard = number, "request for a shard this DC does not have refused");
            return PeerResponse::Refused(format!("no shard {number} here"));
        };
        if !cross.shard.is_member(from) && self.cancels_an_ended_session(&req) {
            return PeerResponse::Submit(Ok(Outcome::Rejected(Rejection::UnknownSession)));
        }
        handle_in_shard(cross, from, req).await
    }
}

impl Handler {
    /// A cancel forwarded by another DC whose session this node's replica of the session's
    /// shard holds ended (the order's shard cannot tell; cancels made in this DC were
    /// checked by the node that took them).
    fn cancels_an_ended_session(&self, req: &PeerRequest) -> bool {
        matches!(req, PeerRequest::Submit(Request { cmd: Command::CancelOrder { session, .. }, .. }) if self.shards.session_ended(session))
    }
}

/// A request for one shard.
async fn handle_in_shard(cross: &Arc<CrossDc>, from: NodeId, req: PeerRequest) -> PeerResponse {
    let shard = &cross.shard;
    if !shard.is_member(from) {
        return receiver::handle(cross, from, req).await;
    }
    match req {
        // Checked by `raft::guard` before openraft sees them.
        PeerRequest::AppendEntries(r) => inbound::append_entries(shard, from, r).await,
        PeerRequest::Vote(r) => inbound::vote(shard, from, r).await,
        PeerRequest::InstallSnapshot(r) => inbound::install_snapshot(shard, from, r).await,
        PeerRequest::Submit(cmd) => PeerResponse::Submit(submit_forwarded(cross, cmd).await),
        PeerRequest::Members => PeerResponse::Members(shard.answer_members()),
        PeerRequest::Recheck => {
            // The check asks the leader; the sender need not wait for it. One at a time:
            // a flood of these starts no more.
            if let Some(check) = shard.clone().recheck() {
                tokio::spawn(check);
            }
            PeerResponse::Rechecked
        }
        PeerRequest::Read { what, stale } => PeerResponse::Lookup(shard.answer_read(what, stale).await),
        PeerRequest::Digest { recent } => {
            let wanted = if recent { Wanted::Recent } else { Wanted::Fresh };
            PeerResponse::Digest(shard.digest_local(wanted).await)
        }
        PeerRequest::ReadIndex => PeerResponse::ReadIndex(shard.read_index_for_follower().await),
        PeerRequest::Membership(op) => PeerResponse::Membership(shard.change_membership_local(op).await),
        PeerRequest::Probe => PeerResponse::Probe(shard.probe_ack()),
        // "Fenced": not to be sent clients — its clock is off, or its disk failed.
        PeerRequest::Clock => PeerResponse::Clock { wall_ms: crate::hlc::wall_ms(), fenced: cross.unfit() },
        PeerRequest::Campaign => PeerResponse::Campaign(shard.campaign(from).await),
        // Cross-DC requests from a node of this DC: a confused or hostile peer.
        other @ (PeerRequest::Replicate { .. }
        | PeerRequest::InstallRemote { .. }
        | PeerRequest::AskStock { .. }
        | PeerRequest::Lookup(_)
        | PeerRequest::Shard { .. }) => {
            // The request's name only: its payload may be a whole DC's state.
            let request = receiver::request_name(&other);
            crate::warn_limited!("peer_same_dc_cross_dc_request", from, request, "cross-DC request from a node of this DC refused");
            PeerResponse::Refused("cross-DC request from the same DC".into())
        }
    }
}

/// A write forwarded by another node of this DC, run here if this node leads: its
/// timestamp must not be beyond the clock offset (a command is proposed with the
/// timestamp it carries). The sender is a node of this DC, so a timestamp too far
/// ahead means the two clocks disagree: a retryable `ClockSkew`, not a bad request.
async fn submit_forwarded(cross: &Arc<CrossDc>, req: Request) -> Result<Outcome, NodeError> {
    let shard = &cross.shard;
    let max_offset = shard.config.replication.max_clock_offset_ms;
    if let Err(m) = crate::replication::guard::check_command(&req.cmd, crate::hlc::wall_ms(), max_offset) {
        crate::warn_limited!("forwarded_clock_skew", reason = %m, "forwarded command refused: clocks disagree");
        return Err(NodeError::ClockSkew(m));
    }
    let sku = req.cmd.order_sku().map(str::to_string);
    let r = shard.submit_local(req).await;
    if let (Some(sku), Ok(Outcome::Order(_))) = (sku, &r) {
        cross.after_order(&sku);
    }
    r
}
