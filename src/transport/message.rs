//! Messages between nodes.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use serde::{Deserialize, Serialize};

use crate::domain::{Outcome, Request};
use crate::error::NodeError;
use crate::raft::{NodeId, TypeConfig};

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write received by a follower, for the leader to run.
    Submit(Request),
    /// A follower asks the leader to confirm its leadership and name the log index a
    /// linearizable read must wait for.
    ReadIndex,
    /// An admin membership change for the leader to run.
    Membership(crate::node::MembershipOp),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Submit(Result<Outcome, NodeError>),
    ReadIndex(Result<u64, NodeError>),
    Membership(Result<std::collections::BTreeSet<NodeId>, NodeError>),
    /// The request could not be handled at all (e.g. it was for another DC's Raft group).
    Refused(String),
}
