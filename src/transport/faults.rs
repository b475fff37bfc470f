//! Fault injection, in the manner of TiKV's transport filters: tests (through the admin
//! API, when a node runs with `--enable-test-hooks`) cut this node off from chosen peers
//! or delay messages to them. A cut drops messages silently in both directions — the
//! sender waits for its timeout, as on a real partition, instead of failing fast. A delay
//! holds every message each way (our requests to the peer, our answers to it), as a
//! one-way link latency does: a round trip between two nodes that both set it takes twice
//! the delay. `scripts/bench-replication` uses it for WAN latency where the kernel has no
//! netem.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::raft::NodeId;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultRules {
    /// Peers this node neither sends to nor answers.
    pub partitioned: BTreeSet<NodeId>,
    /// Extra delay before each message to a peer (request or answer), in milliseconds.
    pub delay_ms: BTreeMap<NodeId, u64>,
    /// This node, as its DC's leader, ships no events to other DCs (every other message
    /// still flows): how tests hold replication back while lookups go through.
    pub replication_paused: bool,
}

#[derive(Clone, Default)]
pub struct Faults {
    // std RwLock: held for a lookup only, never across an await.
    rules: Arc<RwLock<FaultRules>>,
}

impl Faults {
    pub fn set(&self, rules: FaultRules) {
        *self.rules.write().expect("faults lock") = rules;
    }

    pub fn get(&self) -> FaultRules {
        self.rules.read().expect("faults lock").clone()
    }

    pub fn is_cut(&self, peer: NodeId) -> bool {
        self.rules.read().expect("faults lock").partitioned.contains(&peer)
    }

    pub fn replication_paused(&self) -> bool {
        self.rules.read().expect("faults lock").replication_paused
    }

    pub fn delay(&self, peer: NodeId) -> Option<Duration> {
        self.rules.read().expect("faults lock").delay_ms.get(&peer).map(|ms| Duration::from_millis(*ms))
    }
}
