//! Errors a node reports about itself (not about the request's content, which is a
//! `domain::Rejection`). They cross the peer transport, so they are serde types.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum NodeError {
    #[error("no leader in this datacentre (no quorum)")]
    NoLeader,
    #[error("this node is not the leader (leader: {0:?})")]
    NotLeader(Option<u64>),
    #[error("timed out")]
    Timeout,
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Never sent: the peer refused the connection (or we are backing off from it).
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// Sent, then the connection failed before an answer: it may have been applied.
    #[error("connection to {0} lost before an answer; the request may have been applied")]
    Lost(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A membership change that would leave the DC with fewer voters than a quorum of
    /// its configured nodes (forcible by the operator).
    #[error("{0}")]
    WouldLoseQuorum(String),
    /// A write stamped by a node whose clock runs further ahead of this one's than
    /// `replication.max_clock_offset_ms`: the clocks disagree, the request is fine.
    #[error("clocks disagree: {0}")]
    ClockSkew(String),
    /// This node's Raft group has stopped (a disk sync failed): another node can serve.
    #[error("this node's raft group stopped: {0}")]
    Stopped(String),
    /// This node is at its memory bound (`limits.memory_bytes_max`) and takes no new
    /// client writes until it is back under it; another node, or a retry, can.
    #[error("{0}")]
    MemoryPressure(String),
}

impl NodeError {
    /// Worth retrying elsewhere or later: the request may not have been applied.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, NodeError::BadRequest(_) | NodeError::Internal(_) | NodeError::WouldLoseQuorum(_))
    }
}
