//! Messages between nodes.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use serde::{Deserialize, Serialize};

use crate::domain::{Change, Event, Outcome, Request};
pub use crate::domain::{Found, Lookup};
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
    Membership(crate::raft::MembershipOp),
    /// From another DC's leader: its events, in order from our cursor.
    Replicate {
        origin: String,
        events: Vec<Event>,
    },
    /// From another DC's leader: a page of its owned state, for a DC past the outbox cap
    /// (`upto`: the seq the state is as of on the last page, 0 on the others).
    InstallRemote {
        origin: String,
        upto: u64,
        changes: Vec<Change>,
    },
    /// From any node of another DC: are you alive, and who leads your DC?
    Probe,
    /// From another DC's leader: grant us up to `want` units of `sku`.
    AskStock {
        sku: String,
        want: u64,
    },
    /// From any node of another DC: your copy of something your DC owns, read
    /// linearizably — how a DC answers a client for an id or token it has not seen yet.
    Lookup(Lookup),
    /// Any request above, for shard `shard` of the receiving node's DC (shard 0's go
    /// unwrapped). Never nested. (Last, so the other variants keep their encoding.)
    Shard {
        shard: u16,
        req: Box<PeerRequest>,
    },
    /// From a node of this DC: are you alive, what does your clock say, and is yours off
    /// from the DC's (see `replication::clock`)?
    Clock,
    /// From this shard's leader, handing leadership over: start an election now.
    Campaign,
    /// From a node of this DC that holds no replica of the shard: a record, read
    /// linearizably unless `stale`. Answered with `PeerResponse::Lookup`.
    Read {
        what: Lookup,
        stale: bool,
    },
    /// From a node of this DC that holds no replica of the shard: its digest
    /// (`recent`: a recent one will do).
    Digest {
        recent: bool,
    },
    /// From a node of this DC, to the shard's leader: the group's voters and learners.
    Members,
    /// From a node of this DC that just removed this node from the shard: ask the leader
    /// whether you are still a member (the answer to this is only `Rechecked`).
    Recheck,
}

/// A shard's members as its leader holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub voters: std::collections::BTreeSet<NodeId>,
    pub learners: std::collections::BTreeSet<NodeId>,
    /// The leader has applied the membership these come from: it is committed, and no
    /// later leader can go back to one before it.
    pub committed: bool,
}

/// One shard's digest, as a node holding a replica computed it: hex SHA-256 per entity
/// kind and of them all, the index it was taken at, and its age.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardDigest {
    pub kinds: std::collections::BTreeMap<String, String>,
    pub applied_index: u64,
    pub age_ms: u64,
}

/// A DC's answer to replication traffic: its cursor for the origin after applying.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicateAck {
    pub cursor: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeAck {
    pub dc: String,
    pub leader: Option<NodeId>,
    pub term: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Submit(Result<Outcome, NodeError>),
    ReadIndex(Result<u64, NodeError>),
    Membership(Result<std::collections::BTreeSet<NodeId>, NodeError>),
    Replicate(Result<ReplicateAck, NodeError>),
    Probe(ProbeAck),
    Granted(Result<u64, NodeError>),
    /// The request could not be handled at all (e.g. it was for another DC's Raft group).
    Refused(String),
    Lookup(Result<Found, NodeError>),
    /// The answering node's wall clock (ms since the epoch), and whether it has fenced
    /// itself for a clock off from its DC's.
    Clock {
        wall_ms: u64,
        fenced: bool,
    },
    Campaign(Result<(), NodeError>),
    Digest(Result<ShardDigest, NodeError>),
    Members(Result<Members, NodeError>),
    Rechecked,
}
