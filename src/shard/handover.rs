//! Leadership handed to another node of the DC: before a graceful stop (a restart then
//! costs one short election, not an election timeout of silence), and on an operator's
//! request. openraft 0.9 has no leader transfer; this is one built from what it has.
//!
//! The obstacle is the leader lease: a follower refuses to vote while it heard from a
//! leader within the last `election_timeout_max`. So the leader goes quiet — it holds
//! new proposals and linearizable reads (the read-index round is a heartbeat), and turns
//! its heartbeats off — once every voter holds its whole log; after a lease and a margin
//! it asks the target to campaign. The target, whose log is complete, wins the votes of
//! the others, and its first append tells the old leader its term is over. Held writes
//! then go to Raft here, are answered `NotLeader`, and the write path sends them to the
//! new leader; held reads ask the new leader. Nothing is refused meanwhile: clients see
//! one slow request, about a lease long.
//!
//! If the target does not win in time, the leader takes its heartbeats and proposals
//! back (it may meanwhile have lost an election to another node: that is fine too).

use std::time::{Duration, Instant};

use super::Shard;
use crate::error::NodeError;
use crate::raft::NodeId;
use crate::transport::{PeerRequest, PeerResponse};

/// Entries a handover target may still lack when the balancer picks it.
const CAUGHT_UP_SLACK: u64 = 64;

impl Shard {
    /// Hands this shard's leadership to `to` (a voter of the DC); returns once `to` leads.
    pub async fn hand_over(&self, to: NodeId) -> Result<(), NodeError> {
        if !self.is_leader() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        if self.changing_membership() || self.raft.metrics().borrow().membership_config.membership().get_joint_config().len() > 1 {
            return Err(NodeError::Overloaded(format!("a membership change of shard {} is under way", self.number)));
        }
        if to == self.me || !self.voters().contains(&to) {
            return Err(NodeError::BadRequest(format!("node {to} is not another voter of shard {}", self.number)));
        }
        if self.handover.send_replace(true) {
            return Err(NodeError::Overloaded("a leadership handover of this shard is under way".into()));
        }
        self.proposer.hold(true);
        self.raft.runtime_config().heartbeat(false);
        let r = self.go_quiet_and_hand_over(to).await;
        self.raft.runtime_config().heartbeat(true);
        self.proposer.hold(false);
        self.handover.send_replace(false);
        match &r {
            Ok(()) => tracing::info!(shard = self.number, to, "leadership handed over"),
            Err(e) => tracing::warn!(shard = self.number, to, error = %e, "leadership handover failed"),
        }
        r
    }

    async fn go_quiet_and_hand_over(&self, to: NodeId) -> Result<(), NodeError> {
        let lease = Duration::from_millis(self.config.raft.election_timeout_max_ms);
        let heartbeat = Duration::from_millis(self.config.raft.heartbeat_interval_ms);
        // The target holds the whole log (so it can win), and every other voter does too
        // (no append still on its way to refresh a lease) or had a lease's time for it: a
        // voter that is down, as when a whole DC stops, must not hold the handover up.
        let started = Instant::now();
        loop {
            let (target, all) = self.matched_log(to);
            if all || (target && started.elapsed() > lease) {
                break;
            }
            if started.elapsed() > 2 * lease || !self.is_leader() {
                return Err(NodeError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(lease + 2 * heartbeat).await;
        match self.peers.call(to, PeerRequest::Campaign, Some(lease)).await? {
            PeerResponse::Campaign(r) => r?,
            other => return Err(NodeError::Internal(format!("unexpected answer to a campaign request: {other:?}"))),
        }
        let deadline = Instant::now() + 2 * lease;
        loop {
            if self.leader() == Some(to) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NodeError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// On the leader: whether `to`, and whether every voter, has matched the last entry.
    fn matched_log(&self, to: NodeId) -> (bool, bool) {
        let m = self.raft.metrics().borrow().clone();
        let (Some(last), Some(replication)) = (m.last_log_index, m.replication.as_ref()) else { return (false, false) };
        let matched = |id: &NodeId| *id == self.me || replication.get(id).is_some_and(|l| l.map(|l| l.index) == Some(last));
        (matched(&to), self.voters().iter().all(matched))
    }

    /// The other voters, the one that has matched the most of the log first: whom to
    /// hand this shard to.
    pub fn handover_targets(&self) -> Vec<NodeId> {
        let m = self.raft.metrics().borrow().clone();
        let matched = |id: &NodeId| m.replication.as_ref().and_then(|r| r.get(id).copied().flatten()).map(|l| l.index);
        let mut targets: Vec<NodeId> = self.voters().into_iter().filter(|id| *id != self.me).collect();
        targets.sort_by_key(|id| std::cmp::Reverse(matched(id)));
        targets
    }

    /// Waits (a little) until the writes this node proposed are answered: after a
    /// handover they are committed by the new leader and answered once applied here, so
    /// a node about to stop waits for them.
    pub async fn proposals_answered(&self) {
        self.proposer.drained(2 * Duration::from_millis(self.config.raft.election_timeout_max_ms)).await;
    }

    /// On the leader: whether `id` is a voter that has matched all but a few entries of
    /// the log (a handover to it would not wait long).
    pub fn nearly_caught_up(&self, id: NodeId) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let matched = m.replication.as_ref().and_then(|r| r.get(&id).copied().flatten()).map(|l| l.index);
        self.voters().contains(&id) && matched.is_some_and(|i| i.saturating_add(CAUGHT_UP_SLACK) >= m.last_log_index.unwrap_or(0))
    }

    /// Whether node `id` answers its clock probe and is not fenced (clock off from the
    /// DC's, or a failed disk): a node to send clients to, and to lead.
    pub async fn peer_fit(&self, id: NodeId) -> bool {
        matches!(self.peers.call(id, PeerRequest::Clock, Some(self.request_timeout)).await, Ok(PeerResponse::Clock { fenced: false, .. }))
    }

    /// On the target, asked by `from`: only this shard's current leader may ask, so no
    /// other peer can make this node depose it.
    pub async fn campaign(&self, from: NodeId) -> Result<(), NodeError> {
        if self.leader() != Some(from) {
            return Err(NodeError::BadRequest(format!("node {from} asked for an election but does not lead shard {}", self.number)));
        }
        self.raft.trigger().elect().await.map_err(|e| NodeError::Stopped(e.to_string()))
    }

    /// Waits while this node hands leadership over (reads then go to the new leader).
    pub(super) async fn handover_done(&self) {
        let mut rx = self.handover.subscribe();
        let _ = rx.wait_for(|h| !h).await;
    }

    fn voters(&self) -> std::collections::BTreeSet<NodeId> {
        self.raft.metrics().borrow().membership_config.membership().voter_ids().collect()
    }
}
