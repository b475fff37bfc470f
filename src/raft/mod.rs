//! Raft inside a datacentre (openraft 0.9): the type configuration, the network adapter
//! over the peer transport, and the settings derived from the cluster file. The sled
//! stores that openraft drives live in `storage`.

pub mod guard;
pub mod network;
pub mod proposer;
pub mod read_index;
pub mod snapshots;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::domain::{Outcome, Request};

openraft::declare_raft_types!(
    /// Agora's Raft types: commands in, outcomes out, snapshots as files.
    pub TypeConfig:
        D = Request,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::storage::snapshot_data::SnapshotHandle,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// openraft's settings from the cluster file: every timeout is explicit (openraft's
/// defaults are LAN values).
pub fn raft_config(config: &ClusterConfig, dc: &str) -> anyhow::Result<Arc<openraft::Config>> {
    let r = &config.raft;
    let c = openraft::Config {
        cluster_name: format!("{}-{dc}", config.cluster.name),
        heartbeat_interval: r.heartbeat_interval_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        install_snapshot_timeout: r.install_snapshot_timeout_ms,
        // Snapshots are asked for by `snapshots::snapshot_loop`, staggered across the DC.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: r.logs_to_keep_after_snapshot,
        snapshot_max_chunk_size: r.snapshot_chunk_bytes_max,
        // So that one AppendEntries of the largest entries still fits in a peer frame.
        max_payload_entries: config.raft_payload_entries_max(),
        ..Default::default()
    };
    Ok(Arc::new(c.validate()?))
}

/// A membership change asked of the DC leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipOp {
    Add(NodeId),
    /// Refused when it would leave fewer voters than a quorum of the DC's configured nodes.
    Remove(NodeId),
    /// A removal the operator forces past that check (`?force=true`).
    ForceRemove(NodeId),
    /// `add` in, as a learner that catches up, then `remove` out, in one change of voters:
    /// a replica moved between nodes (`crate::placement`).
    Replace {
        add: NodeId,
        remove: NodeId,
    },
}

impl MembershipOp {
    /// The node the change takes out of the group, if any.
    pub fn removes(&self) -> Option<NodeId> {
        match self {
            MembershipOp::Remove(id) | MembershipOp::ForceRemove(id) | MembershipOp::Replace { remove: id, .. } => Some(*id),
            MembershipOp::Add(_) => None,
        }
    }
}
