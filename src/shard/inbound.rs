//! Raft requests from peers of this DC, checked by [`crate::raft::guard`] before openraft
//! handles them. A refused request is answered without reaching openraft.

use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::SnapshotSegmentId;
use std::time::{Duration, Instant};

use super::Shard;
use crate::raft::guard::{self, ChunkRefusal, Limits};
use crate::raft::{NodeId, TypeConfig};
use crate::transport::PeerResponse;

fn limits<'a>(shard: &Shard, is_member: &'a dyn Fn(NodeId) -> bool) -> Limits<'a> {
    Limits { current_term: shard.raft.metrics().borrow().current_term, term_jump_max: shard.config.raft.term_jump_max, is_member }
}

fn member_of(shard: &Shard) -> impl Fn(NodeId) -> bool + '_ {
    |id| shard.is_member(id)
}

fn refuse(from: NodeId, what: &str, reason: String) -> PeerResponse {
    tracing::warn!(from, request = what, %reason, "raft request refused");
    PeerResponse::Refused(format!("{what} refused: {reason}"))
}

pub async fn vote(shard: &Shard, from: NodeId, r: VoteRequest<NodeId>) -> PeerResponse {
    if let Err(e) = guard::check_vote_request(&r, from, limits(shard, &member_of(shard))) {
        return refuse(from, "vote", e);
    }
    let candidate_log = r.last_log_id;
    let answer = shard.raft.vote(r).await;
    if let Ok(v) = &answer {
        if !v.vote_granted && v.last_log_id > candidate_log && leader_silent(shard) {
            campaign(shard, from);
        }
    }
    PeerResponse::Vote(answer)
}

/// No AppendEntries from a leader for a whole minimum election timeout, though one came
/// before (a node that has heard no leader since it started is held back by its restart
/// grace instead).
fn leader_silent(shard: &Shard) -> bool {
    let quiet = Duration::from_millis(shard.config.raft.election_timeout_min_ms);
    let last = *shard.last_append.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    last.is_some_and(|t| t.elapsed() > quiet) && !shard.is_leader()
}

/// A candidate whose log is behind this node's asked for its vote while the leader is
/// silent: the leader is most likely gone, and that candidate cannot win with this
/// node's vote. openraft 0.9 has no pre-vote, and it makes a node that saw a longer log
/// wait two more election timeouts before its own next try, so the node best placed to
/// lead could sit out the election for over a second. It stands now instead. Elections
/// are always safe in Raft; the conditions only keep this from disturbing a leader that
/// is alive. At most once per minimum election timeout, whatever a peer sends.
fn campaign(shard: &Shard, candidate: NodeId) {
    let spacing = Duration::from_millis(shard.config.raft.election_timeout_min_ms);
    {
        let mut last = shard.last_campaign.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < spacing) {
            return;
        }
        *last = Some(Instant::now());
    }
    tracing::info!(shard = shard.number, candidate, "leader silent and a candidate with a shorter log asked for votes: standing for election");
    let raft = shard.raft.clone();
    tokio::spawn(async move {
        if let Err(e) = raft.trigger().elect().await {
            tracing::debug!(error = %e, "election not started");
        }
    });
}

pub async fn append_entries(shard: &Shard, from: NodeId, r: AppendEntriesRequest<TypeConfig>) -> PeerResponse {
    if let Err(e) = guard::check_append_entries(&r, from, limits(shard, &member_of(shard))) {
        return refuse(from, "append_entries", e);
    }
    let answer = shard.raft.append_entries(r).await;
    // A leader spoke to us (a conflict is still its leadership; a higher vote is not).
    if answer.as_ref().is_ok_and(|a| !matches!(a, openraft::raft::AppendEntriesResponse::HigherVote(_))) {
        *shard.last_append.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }
    PeerResponse::AppendEntries(answer)
}

/// Chunks are taken one at a time (the transfer's lock is held while openraft writes
/// one), in order, up to `raft.snapshot_bytes_max`; the last is handed on only if the
/// whole snapshot verifies (format, checksum, records).
pub async fn install_snapshot(shard: &Shard, from: NodeId, r: InstallSnapshotRequest<TypeConfig>) -> PeerResponse {
    if let Err(e) = guard::check_install_snapshot(&r, from, limits(shard, &member_of(shard))) {
        return refuse(from, "install_snapshot", e);
    }
    let mut transfer = shard.snapshot_transfer.lock().await;
    match transfer.check(&r, shard.config.raft.snapshot_bytes_max, crate::storage::verify_snapshot_data) {
        Ok(()) => {}
        Err(ChunkRefusal::Offset { expect }) => {
            tracing::warn!(from, offset = r.offset, expect, id = %r.meta.snapshot_id, "snapshot chunk out of order refused");
            let id = r.meta.snapshot_id.clone();
            let mismatch = SnapshotMismatch { expect: SnapshotSegmentId { id: id.clone(), offset: expect }, got: SnapshotSegmentId { id, offset: r.offset } };
            return PeerResponse::InstallSnapshot(Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch))));
        }
        Err(ChunkRefusal::Invalid(e)) => {
            transfer.reset();
            return refuse(from, "install_snapshot", e);
        }
    }
    let vote = r.vote;
    // openraft has the chunk only if it accepted the sender's vote (then it holds it).
    let chunk = (r.offset, r.done, r.meta.snapshot_id.clone(), r.data.len());
    let resp = shard.raft.install_snapshot(r.clone()).await;
    match &resp {
        Ok(ok) if ok.vote.leader_id == vote.leader_id => transfer.accept(&r),
        _ => {
            tracing::debug!(?chunk, "snapshot chunk not taken by raft");
            transfer.reset();
        }
    }
    PeerResponse::InstallSnapshot(resp)
}
