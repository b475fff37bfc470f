//! Raft requests from peers of this DC, checked by [`crate::raft::guard`] before openraft
//! handles them. A refused request is answered without reaching openraft.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::SnapshotSegmentId;

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
    match guard::check_vote_request(&r, from, limits(shard, &member_of(shard))) {
        Ok(()) => PeerResponse::Vote(shard.raft.vote(r).await),
        Err(e) => refuse(from, "vote", e),
    }
}

pub async fn append_entries(shard: &Shard, from: NodeId, r: AppendEntriesRequest<TypeConfig>) -> PeerResponse {
    if let Err(e) = guard::check_append_entries(&r, from, limits(shard, &member_of(shard))) {
        return refuse(from, "append_entries", e);
    }
    PeerResponse::AppendEntries(shard.raft.append_entries(r).await)
}

/// Chunks are taken one at a time (the transfer's lock is held while openraft writes
/// one), in order, up to `raft.snapshot_bytes_max`, each checked as it comes (format,
/// frames); the last is handed on only if the whole snapshot's checksum matches.
pub async fn install_snapshot(shard: &Shard, from: NodeId, r: InstallSnapshotRequest<TypeConfig>) -> PeerResponse {
    if let Err(e) = guard::check_install_snapshot(&r, from, limits(shard, &member_of(shard))) {
        return refuse(from, "install_snapshot", e);
    }
    let mut transfer = shard.snapshot_transfer.lock().await;
    match transfer.check(&r, shard.config.raft.snapshot_bytes_max) {
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
    // Installing a large snapshot takes seconds, and the leader sends nothing meanwhile
    // (it waits for this answer): this node's election timer would fire, and its higher
    // term depose the leader. No elections from here until a grace after the install.
    if r.done {
        shard.raft.runtime_config().elect(false);
    }
    let resp = shard.raft.install_snapshot(r.clone()).await;
    if r.done {
        let (raft, grace) = (shard.raft.clone(), Duration::from_millis(2 * shard.config.raft.election_timeout_max_ms));
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            raft.runtime_config().elect(true);
        });
    }
    match &resp {
        Ok(ok) if ok.vote.leader_id == vote.leader_id => transfer.accept(&r),
        _ => {
            tracing::debug!(?chunk, "snapshot chunk not taken by raft");
            transfer.reset();
        }
    }
    PeerResponse::InstallSnapshot(resp)
}
