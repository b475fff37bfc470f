//! The receiving side of cross-DC traffic. Everything is checked against the cluster
//! file first: the sender must be a node of another DC, and may only speak for its own
//! DC. Anything else is refused and logged, never applied.

use super::CrossDc;
use crate::domain::{Command, Outcome, Rejection, Request};
use crate::error::NodeError;
use crate::raft::NodeId;
use crate::transport::message::ReplicateAck;
use crate::transport::{PeerRequest, PeerResponse};

/// The sender's DC, if it is a known node of another DC.
fn remote_dc(cross: &CrossDc, from: NodeId) -> Option<String> {
    cross.config().node_by_id(from).map(|n| n.dc).filter(|dc| dc != cross.dc())
}

/// Handles a request from a node of another DC.
pub async fn handle(cross: &CrossDc, from: NodeId, req: PeerRequest) -> PeerResponse {
    let Some(sender_dc) = remote_dc(cross, from) else {
        crate::warn_limited!("peer_unknown_node", from, request = request_name(&req), "cross-DC request from an unknown node refused");
        return PeerResponse::Refused(format!("unknown node {from}"));
    };
    match req {
        PeerRequest::Probe => PeerResponse::Probe(cross.shard.probe_ack()),
        PeerRequest::Replicate { origin, events } if origin == sender_dc => {
            // Before anything is applied or observed: no timestamp from the far future.
            let max_offset = cross.config().replication.max_clock_offset_ms;
            let (shard, spread) = (cross.shard.number, cross.config().spread());
            let checked = super::guard::check_events(&events, crate::hlc::wall_ms(), max_offset)
                .and_then(|()| super::guard::check_shard(events.iter().map(|e| &e.change), shard, spread));
            if let Err(m) = checked {
                tracing::warn!(%origin, reason = %m, "replicated batch refused");
                return PeerResponse::Replicate(Err(NodeError::BadRequest(m)));
            }
            if let Some(max) = events.iter().map(|e| e.hlc).max() {
                // Checked above; a refusal here only means the clock moved back meanwhile.
                let _ = cross.hlc.observe(max, max_offset);
            }
            let stamps: Vec<(u64, u64)> = events.iter().map(|e| (e.seq, e.hlc)).collect();
            let before = cross.shard.sm.cursor(&origin);
            // Nothing new (an empty heartbeat batch, or a replay): answer from the applied
            // cursor without a Raft write — writing would wake our own shippers, whose
            // heartbeats would wake the sender's, in a loop.
            if stamps.iter().all(|(seq, _)| *seq <= before) {
                let ack = if cross.shard.is_leader() { Ok(ReplicateAck { cursor: before }) } else { Err(NodeError::NotLeader(cross.shard.leader())) };
                return PeerResponse::Replicate(ack);
            }
            let r = apply(cross, Command::ApplyRemote { origin: origin.clone(), events }).await;
            if let Ok(ack) = &r {
                // Lag of the events this batch newly applied (a batch that arrived before
                // the one ahead of it applies none): origin timestamp to commit here.
                let applied = |seq: u64| seq > before && seq <= ack.cursor;
                let lags: Vec<u64> = stamps.iter().filter(|(seq, ts)| applied(*seq) && *ts > 0).map(|(_, ts)| crate::hlc::age_ms(*ts)).collect();
                let histogram = cross.metrics.replication_apply_lag.with_label_values(&[&origin]);
                for ms in &lags {
                    histogram.observe(*ms as f64 / 1000.0);
                }
                cross.lag.record(&origin, lags);
            }
            PeerResponse::Replicate(r)
        }
        PeerRequest::InstallRemote { origin, upto, changes } if origin == sender_dc => {
            let max_offset = cross.config().replication.max_clock_offset_ms;
            let (shard, spread) = (cross.shard.number, cross.config().spread());
            let checked = changes
                .iter()
                .try_for_each(|c| super::guard::check_change(c, crate::hlc::wall_ms(), max_offset))
                .and_then(|()| super::guard::check_shard(&changes, shard, spread));
            if let Err(m) = checked {
                tracing::warn!(%origin, reason = %m, "snapshot of another DC refused");
                return PeerResponse::Replicate(Err(NodeError::BadRequest(m)));
            }
            tracing::warn!(%origin, upto, changes = changes.len(), "installing a snapshot of another DC's state");
            PeerResponse::Replicate(apply(cross, Command::InstallRemote { origin, upto, changes }).await)
        }
        PeerRequest::AskStock { sku, want } => PeerResponse::Granted(cross.grant(&sku, want, &sender_dc).await),
        // A client of the sender's DC asks for an order or session we created.
        PeerRequest::Lookup(what) => PeerResponse::Lookup(cross.answer_lookup(what).await),
        // A cancel for one of our orders, forwarded by the DC that received it. It carries
        // the session that placed the order, which apply checks (as for a `CancelRequest`
        // event in the sender's stream): an order id alone cancels nothing.
        PeerRequest::Submit(req) if matches!(&req.cmd, Command::CancelOrder { dc, .. } if dc == cross.dc()) => {
            // Its timestamp orders the order's versions: not from the far future.
            let max_offset = cross.config().replication.max_clock_offset_ms;
            if let Err(m) = super::guard::check_command(&req.cmd, crate::hlc::wall_ms(), max_offset) {
                crate::warn_limited!("forwarded_cancel_clock_skew", %sender_dc, reason = %m, "forwarded cancel refused: clocks disagree");
                return PeerResponse::Submit(Err(NodeError::ClockSkew(m)));
            }
            PeerResponse::Submit(cross.shard.submit(req).await)
        }
        other => {
            crate::warn_limited!(
                "peer_cross_dc_refused",
                from,
                %sender_dc,
                request = request_name(&other),
                "cross-DC request refused: sender does not own what it sends, or the request is not cross-DC"
            );
            PeerResponse::Refused(format!("{} from {sender_dc} refused", request_name(&other)))
        }
    }
}

/// Applies replicated data through this DC's Raft log, on its leader.
async fn apply(cross: &CrossDc, cmd: Command) -> Result<ReplicateAck, NodeError> {
    match cross.shard.submit_local(Request::new(cmd, None)).await? {
        Outcome::Replicated { cursor } => Ok(ReplicateAck { cursor }),
        Outcome::Rejected(Rejection::Invalid(m)) => {
            crate::warn_limited!("peer_replicated_batch_rejected", reason = %m, "replicated batch rejected");
            Err(NodeError::BadRequest(m))
        }
        other => Err(NodeError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

/// A request's name for logs (never its payload).
pub fn request_name(r: &PeerRequest) -> &'static str {
    match r {
        PeerRequest::AppendEntries(_) => "append_entries",
        PeerRequest::Vote(_) => "vote",
        PeerRequest::InstallSnapshot(_) => "install_snapshot",
        PeerRequest::Submit(_) => "submit",
        PeerRequest::ReadIndex => "read_index",
        PeerRequest::Membership(_) => "membership",
        PeerRequest::Replicate { .. } => "replicate",
        PeerRequest::InstallRemote { .. } => "install_remote",
        PeerRequest::Probe => "probe",
        PeerRequest::AskStock { .. } => "ask_stock",
        PeerRequest::Lookup(_) => "lookup",
        PeerRequest::Shard { .. } => "shard",
        PeerRequest::Clock => "clock",
        PeerRequest::Campaign => "campaign",
        PeerRequest::Read { .. } => "read",
        PeerRequest::Digest { .. } => "digest",
        PeerRequest::Members => "members",
        PeerRequest::Recheck => "recheck",
    }
}
