//! One Raft group as hosted on this node: its Raft, its state machine (read side), the
//! actors that serialise its writes, and the two request paths every call takes —
//! [`Shard::submit`] for writes (to the local actors on the leader, forwarded over the
//! transport from a follower) and [`Shard::read_barrier`] for linearizable reads (read
//! index: the leader confirms its lease with a quorum, the reading node waits until it
//! has applied up to that index).
//!
//! A node runs every shard of its DC (`crate::shards`) but holds a replica only of those
//! whose membership names it (`Shard::hosts`; all of them unless `cluster.replicas` is
//! set). For a shard it does not hold, it finds the leader by asking its DC's nodes and
//! sends writes and reads there: one forward, as from a follower. Everything a group owns
//! lives here.

pub mod background;
mod handover;
pub mod inbound;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{BasicNode, RaftMetrics, ServerState};

use crate::actors::Directory;
use crate::config::ClusterConfig;
use crate::domain::{Found, Lookup, Outcome, Request};
use crate::error::NodeError;
use crate::metrics::Metrics;
use crate::raft::guard::SnapshotTransfer;
use crate::raft::proposer::Proposer;
use crate::raft::read_index::ReadIndex;
use crate::raft::{MembershipOp, NodeId, Raft};
use crate::storage::SmReader;
use crate::transport::message::{Members, ProbeAck, ShardDigest};
use crate::transport::{PeerRequest, PeerResponse, Peers};

/// Forwarding hops before a write gives up (leadership moving under it).
const SUBMIT_ATTEMPTS: usize = 3;

pub struct Shard {
    /// Which of the DC's shards this is.
    pub number: u16,
    /// The DC this group replicates within.
    pub dc: String,
    /// This node's id.
    pub me: NodeId,
    pub config: Arc<ClusterConfig>,
    pub raft: Raft,
    pub sm: SmReader,
    pub actors: Arc<Directory>,
    peers: Peers,
    metrics: Metrics,
    request_timeout: Duration,
    /// Ids of this DC's nodes: checked on every peer request (each Raft heartbeat), so
    /// computed once rather than from the config's node list each time.
    members: HashSet<NodeId>,
    /// The nodes that hold the shard when the DC first starts, the preferred leader first
    /// (`ClusterConfig::shard_placement`).
    placement: Vec<NodeId>,
    /// On a node that holds no replica: the leader its DC's nodes last named, and their
    /// term (`Shard::leader`).
    leader_hint: Mutex<Option<(NodeId, u64)>>,
    /// The membership (its log position) at which this node found the leader had removed
    /// it from the group: it holds no replica until its log shows another one.
    dropped: Mutex<Option<Option<openraft::LogId<NodeId>>>>,
    /// True while this node, as leader, runs a membership change: no leadership handover
    /// meanwhile (the balancer's would take the change's leadership away).
    changing: AtomicBool,
    /// True while a membership check asked by a peer (`Shard::recheck`) runs.
    rechecking: AtomicBool,
    /// The snapshot being received from the leader (see `raft::guard`).
    snapshot_transfer: tokio::sync::Mutex<SnapshotTransfer>,
    /// Read-index rounds shared by the linearizable reads that queue for one.
    read_index: Arc<ReadIndex>,
    /// The node's disk (shared by its shards): whether a sync failed, the injected fault.
    pub disk: crate::storage::Disk,
    /// The leader's batcher: held while leadership is handed over.
    proposer: Proposer,
    /// True while this node hands the shard's leadership over (`handover`).
    handover: tokio::sync::watch::Sender<bool>,
}

/// What a shard is built from; the startup wiring owns the parts.
pub struct ShardParts {
    pub number: u16,
    pub dc: String,
    pub me: NodeId,
    pub config: Arc<ClusterConfig>,
    pub raft: Raft,
    pub sm: SmReader,
    pub actors: Arc<Directory>,
    pub peers: Peers,
    pub metrics: Metrics,
    /// The node's disk, shared by its shards.
    pub disk: crate::storage::Disk,
    pub proposer: Proposer,
    /// Shared read-index rounds (the actors' too).
    pub read_index: Arc<ReadIndex>,
}

impl Shard {
    pub fn new(p: ShardParts) -> Arc<Self> {
        let members = p.config.dc_nodes(&p.dc).iter().map(|n| n.id).collect();
        let placement = p.config.shard_placement(&p.dc, p.number).iter().map(|n| n.id).collect();
        let request_timeout = Duration::from_millis(p.config.limits.request_timeout_ms);
        Arc::new(Shard {
            number: p.number,
            dc: p.dc,
            me: p.me,
            config: p.config,
            raft: p.raft,
            sm: p.sm,
            actors: p.actors,
            peers: p.peers,
            metrics: p.metrics,
            request_timeout,
            members,
            placement,
            leader_hint: Mutex::new(None),
            dropped: Mutex::new(None),
            changing: AtomicBool::new(false),
            rechecking: AtomicBool::new(false),
            snapshot_transfer: Default::default(),
            read_index: p.read_index,
            disk: p.disk,
            proposer: p.proposer,
            handover: tokio::sync::watch::channel(false).0,
        })
    }

    /// Where the nodes named by host are now (the DNS answers' addresses).
    pub fn addresses(&self) -> &Arc<crate::transport::addresses::AddressBook> {
        self.peers.addresses()
    }

    /// Whether `id` is a node of this group's DC.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.members.contains(&id)
    }

    /// The nodes that hold this shard at the DC's first start, as openraft wants them
    /// for initialisation.
    pub fn configured_members(&self) -> BTreeMap<NodeId, BasicNode> {
        self.config.shard_placement(&self.dc, self.number).into_iter().map(|n| (n.id, BasicNode::new(n.peer))).collect()
    }

    /// Whether this node is one of the shard's first replicas.
    pub fn placed_here(&self) -> bool {
        self.placement.contains(&self.me)
    }

    /// The node meant to lead this shard when all are up, so that leaders spread over
    /// the DC: the DC's nodes in turn, shard by shard (the first of its placement).
    pub fn preferred_leader(&self) -> Option<NodeId> {
        self.placement.first().copied()
    }

    /// Whether this node holds a replica of the shard now: its group's membership, as
    /// this node last applied it, names it (a voter, or a learner catching up), and the
    /// leader has not been found to have removed it since (`Shard::check_still_member`).
    pub fn hosts(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let named = m.membership_config.membership().get_node(&self.me).is_some();
        named && *self.dropped.lock().expect("dropped lock") != Some(*m.membership_config.log_id())
    }

    /// The session `token` as this node's replica holds it, unchecked (no read barrier);
    /// `None` also when this node holds no replica.
    pub fn replica_session(&self, token: &str) -> Option<crate::domain::Session> {
        self.hosts().then(|| self.sm.session(token)).flatten()
    }

    pub fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The leader as this node knows it: from its own replica, or — holding none — as its
    /// DC's nodes last named it.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader_and_term().0
    }

    fn leader_and_term(&self) -> (Option<NodeId>, u64) {
        if self.hosts() {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            return (m.current_leader, m.current_term);
        }
        match *self.leader_hint.lock().expect("leader hint lock") {
            Some((leader, term)) => (Some(leader), term),
            None => (None, 0),
        }
    }

    /// What a node that holds no replica learned of the leader: `Some` from an answer
    /// naming it, `None` when the named node failed to answer.
    fn note_leader(&self, leader: Option<NodeId>, term: u64) {
        if !self.hosts() {
            *self.leader_hint.lock().expect("leader hint lock") = leader.map(|l| (l, term));
        }
    }

    /// This DC and its leader as another DC's probe wants them.
    pub fn probe_ack(&self) -> ProbeAck {
        let (leader, term) = self.leader_and_term();
        ProbeAck { dc: self.dc.clone(), leader, term }
    }

    /// Commit index, from Raft's own state.
    pub async fn commit_index(&self) -> u64 {
        self.raft.with_raft_state(|st| st.committed.map(|l| l.index).unwrap_or(0)).await.unwrap_or(0)
    }

    /// The current leader, waiting up to an election's length for one to appear: from
    /// this node's replica, or asked of the DC's nodes when it holds none.
    async fn wait_leader(&self) -> Result<NodeId, NodeError> {
        let deadline = Instant::now() + self.read_index.source().leader_wait;
        loop {
            if self.hosts() {
                return self.read_index.source().wait_leader().await;
            }
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if let Some((leader, term)) = self.ask_who_leads().await {
                self.note_leader(Some(leader), term);
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(self.config.raft.heartbeat_interval_ms)).await;
        }
    }

    /// Asks every other node of the DC who leads this shard (their probe answers, within
    /// an election timeout); the answer of the highest term wins.
    async fn ask_who_leads(&self) -> Option<(NodeId, u64)> {
        let timeout = Some(Duration::from_millis(self.config.raft.election_timeout_max_ms));
        let asks = self.members.iter().filter(|id| **id != self.me).map(|id| self.peers.call(*id, PeerRequest::Probe, timeout));
        let answers = futures::future::join_all(asks).await;
        answers
            .into_iter()
            .filter_map(|r| match r {
                Ok(PeerResponse::Probe(a)) if a.dc == self.dc => a.leader.filter(|l| self.members.contains(l)).map(|l| (a.term, l)),
                _ => None,
            })
            .max()
            .map(|(term, leader)| (leader, term))
    }

    /// Runs `call` against the group's leader, following its answers' hints when
    /// leadership moves (a few hops at most). A leader that did not answer is forgotten,
    /// so the next call asks the DC again.
    async fn at_leader<T, F, Fut>(&self, mut call: F) -> Result<T, NodeError>
    where
        F: FnMut(NodeId) -> Fut,
        Fut: Future<Output = Result<T, NodeError>>,
    {
        let mut last = NodeError::NoLeader;
        for _ in 0..SUBMIT_ATTEMPTS {
            let leader = self.wait_leader().await?;
            match call(leader).await {
                Err(NodeError::NotLeader(hint)) => {
                    self.note_leader(hint, self.leader_and_term().1);
                    last = NodeError::NotLeader(hint);
                    // Leadership is moving: give the new leader a heartbeat to show up.
                    tokio::time::sleep(Duration::from_millis(self.config.raft.heartbeat_interval_ms)).await;
                }
                Err(e @ (NodeError::Unreachable(_) | NodeError::Lost(_) | NodeError::Timeout)) if leader != self.me => {
                    self.note_leader(None, 0);
                    return Err(e);
                }
                other => return other,
            }
        }
        Err(if matches!(last, NodeError::NotLeader(_)) { NodeError::NoLeader } else { last })
    }

    /// Runs a write on the group's leader and returns its outcome once applied there.
    pub async fn submit(&self, cmd: Request) -> Result<Outcome, NodeError> {
        self.at_leader(|leader| {
            let cmd = cmd.clone();
            async move {
                if leader == self.me {
                    self.actors.submit(cmd).await
                } else {
                    self.forward(leader, cmd).await
                }
            }
        })
        .await
    }

    /// [`Self::submit`] for a write that may be applied more than once: retried while the
    /// failure is worth retrying (no leader yet, the leader unreachable or gone silent)
    /// until `within` has passed. `submit` itself does not retry those, since a write
    /// that may repeat its effect must not be sent twice.
    pub async fn submit_repeatable(&self, req: Request, within: Duration) -> Result<Outcome, NodeError> {
        let deadline = tokio::time::Instant::now() + within;
        let pause = Duration::from_millis(self.config.raft.heartbeat_interval_ms.max(1));
        loop {
            match self.submit(req.clone()).await {
                Err(e) if e.is_retryable() && tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, shard = self.number, "repeatable write retried");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }

    /// A record of this shard, read linearizably unless `stale`: from this node's
    /// replica if it holds one, else from the leader's (one forward).
    pub async fn read(&self, what: Lookup, stale: bool) -> Result<Found, NodeError> {
        if self.hosts() {
            return self.answer_read(what, stale).await;
        }
        self.ask_leader(
            || PeerRequest::Read { what: what.clone(), stale },
            |r| match r {
                PeerResponse::Lookup(r) => Ok(r),
                other => Err(other),
            },
        )
        .await
    }

    /// On a node that holds no replica: `req` answered by the leader.
    /// `unpack` takes the answer apart, or hands back one of another kind.
    async fn ask_leader<T>(
        &self,
        req: impl Fn() -> PeerRequest,
        unpack: fn(PeerResponse) -> Result<Result<T, NodeError>, PeerResponse>,
    ) -> Result<T, NodeError> {
        let req = &req;
        self.at_leader(|leader| async move {
            let answer = self.peers.call(leader, req(), Some(self.request_timeout)).await?;
            unpack(answer).unwrap_or_else(|other| Err(NodeError::Internal(format!("unexpected answer from node {leader}: {other:?}"))))
        })
        .await
    }

    /// This shard's digest: of this node's replica, or of the leader's when it holds none.
    pub async fn digest(&self, wanted: crate::storage::digest::Wanted) -> Result<ShardDigest, NodeError> {
        if self.hosts() {
            return self.digest_local(wanted).await;
        }
        let recent = wanted == crate::storage::digest::Wanted::Recent;
        self.ask_leader(
            || PeerRequest::Digest { recent },
            |r| match r {
                PeerResponse::Digest(r) => Ok(r),
                other => Err(other),
            },
        )
        .await
    }

    /// The digest of this node's replica (asked by a node of the DC that holds none).
    pub async fn digest_local(&self, wanted: crate::storage::digest::Wanted) -> Result<ShardDigest, NodeError> {
        if !self.hosts() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        let (kinds, age) = self.sm.digest_as(wanted).await.map_err(|e| NodeError::Internal(format!("state digest: {e}")))?;
        Ok(ShardDigest { kinds, applied_index: self.sm.applied_index(), age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX) })
    }

    /// A read from this node's replica (asked here, or by a node of this DC that holds
    /// none); without a replica, the answer is where the leader is (`read_barrier`).
    pub async fn answer_read(&self, what: Lookup, stale: bool) -> Result<Found, NodeError> {
        self.read_barrier(stale).await?;
        Ok(self.read_local(&what))
    }

    /// This node's replica's copy of a record.
    fn read_local(&self, what: &Lookup) -> Found {
        match what {
            Lookup::Order(id) => Found::Order(self.sm.order(id)),
            Lookup::Session(token) => Found::Session(self.sm.session(token)),
            Lookup::Inventory(sku) => Found::Inventory(self.sm.inventory(sku)),
        }
    }

    /// Runs a write here if this node leads, else answers where the leader is: for
    /// requests that arrived from elsewhere, which must not be forwarded again.
    pub async fn submit_local(&self, cmd: Request) -> Result<Outcome, NodeError> {
        if !self.is_leader() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        self.actors.submit(cmd).await
    }

    async fn forward(&self, leader: NodeId, cmd: Request) -> Result<Outcome, NodeError> {
        let r = match self.peers.call(leader, PeerRequest::Submit(cmd), Some(self.request_timeout)).await {
            Ok(PeerResponse::Submit(r)) => r,
            Ok(other) => Err(NodeError::Internal(format!("unexpected answer to a forwarded write: {other:?}"))),
            Err(e) => Err(e),
        };
        let label = if r.is_ok() { "ok" } else { "error" };
        self.metrics.forwarded_writes.with_label_values(&[label]).inc();
        r
    }

    /// Returns once a read of local state is linearizable (or at once for stale reads).
    /// A node without a replica has no local state to read: it answers where the leader is.
    pub async fn read_barrier(&self, stale: bool) -> Result<(), NodeError> {
        if !self.hosts() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        if stale {
            return Ok(());
        }
        self.handover_done().await;
        self.read_index.get().await.map(|_| ())
    }

    /// Whether a peer of this DC knows a leader of this shard (asked of every peer at
    /// once, within an election timeout): it leads, or names the node that does.
    pub async fn dc_has_leader(&self) -> bool {
        self.ask_who_leads().await.is_some()
    }

    /// A follower's read-index request, on the leader: it shares the rounds of this
    /// node's own reads (one heartbeat broadcast for all that queued meanwhile).
    pub async fn read_index_for_follower(&self) -> Result<u64, NodeError> {
        self.handover_done().await;
        if !self.is_leader() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        self.read_index.get().await
    }

    /// Adds (learner, then voter) or removes a node of this DC; on a follower, asks the leader.
    /// Leadership moving under it (a leader removed from the group steps down, and the
    /// others elect one) is waited out for up to two elections.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<BTreeSet<NodeId>, NodeError> {
        let deadline = std::time::Instant::now() + Duration::from_millis(4 * self.config.raft.election_timeout_max_ms);
        loop {
            match self.change_membership_once(op.clone()).await {
                Err(NodeError::NotLeader(hint)) if std::time::Instant::now() < deadline => {
                    self.note_leader(hint, self.leader_and_term().1);
                    tokio::time::sleep(Duration::from_millis(self.config.raft.heartbeat_interval_ms)).await;
                }
                Err(NodeError::NoLeader) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(self.config.raft.heartbeat_interval_ms)).await;
                }
                Ok(voters) => {
                    self.tell_removed(&op, &voters).await;
                    return Ok(voters);
                }
                other => return other,
            }
        }
    }

    /// A node just removed from the group is asked to check with the leader at once
    /// (`PeerRequest::Recheck`): before its election timer fires, it learns it holds no
    /// replica and stays quiet, instead of campaigning to a higher term that would cost
    /// the shard an election when it is added back. A node that cannot be reached finds
    /// out by itself (`check_still_member`).
    async fn tell_removed(&self, op: &MembershipOp, voters: &BTreeSet<NodeId>) {
        let Some(removed) = op.removes().filter(|id| !voters.contains(id)) else { return };
        if removed == self.me {
            return self.check_still_member(true).await;
        }
        let (peers, timeout) = (self.peers.clone(), self.request_timeout);
        tokio::spawn(async move { peers.call(removed, PeerRequest::Recheck, Some(timeout)).await });
    }

    async fn change_membership_once(&self, op: MembershipOp) -> Result<BTreeSet<NodeId>, NodeError> {
        let leader = self.wait_leader().await?;
        if leader != self.me {
            return match self.peers.call(leader, PeerRequest::Membership(op), Some(Duration::from_secs(30))).await? {
                PeerResponse::Membership(r) => r,
                other => Err(NodeError::Internal(format!("unexpected answer to membership change: {other:?}"))),
            };
        }
        self.change_membership_local(op).await
    }

    /// On the leader: the change itself (a follower answers where the leader is).
    pub async fn change_membership_local(&self, op: MembershipOp) -> Result<BTreeSet<NodeId>, NodeError> {
        if !self.is_leader() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        // A handover under way: the change would refresh the followers' leases (and
        // fail as leadership moves); it waits, then goes to the new leader.
        self.handover_done().await;
        if !self.is_leader() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        let mut voters: BTreeSet<NodeId> = self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if !voters.contains(&self.me) {
            // A leader that removed itself leads until the change commits, then steps down;
            // openraft 0.9 must not be asked for another change meanwhile (it asserts it is
            // still leader). The caller retries once the others have elected one.
            return Err(NodeError::NotLeader(None));
        }
        // A leader leaving the group hands its leadership over first, so that the change
        // costs no election; the caller then asks the new leader.
        if op.removes() == Some(self.me) {
            if let Some(to) = self.handover_targets().into_iter().next() {
                if self.hand_over(to).await.is_ok() {
                    return Err(NodeError::NotLeader(Some(to)));
                }
            }
        }
        if self.changing.swap(true, Ordering::AcqRel) {
            return Err(NodeError::Overloaded(format!("a membership change of shard {} is under way", self.number)));
        }
        let _changing = Unset(&self.changing);
        match op {
            MembershipOp::Add(id) => {
                self.add_caught_up_learner(id).await?;
                voters.insert(id);
            }
            MembershipOp::Replace { add, remove } => {
                if !voters.contains(&remove) || voters.contains(&add) {
                    return Err(NodeError::BadRequest(format!("node {add} cannot replace {remove}: voters are {voters:?}")));
                }
                self.add_caught_up_learner(add).await?;
                voters.remove(&remove);
                voters.insert(add);
            }
            MembershipOp::Remove(id) | MembershipOp::ForceRemove(id) => {
                if !voters.remove(&id) {
                    return Err(NodeError::BadRequest(format!("node {id} is not a voter")));
                }
                if voters.is_empty() {
                    return Err(NodeError::BadRequest("cannot remove the last voter".into()));
                }
                // With fewer voters than a majority of the shard's configured replicas, a
                // write is "committed" on fewer copies than the DC was built to keep.
                let quorum = self.placement.len() / 2 + 1;
                if voters.len() < quorum && matches!(op, MembershipOp::Remove(_)) {
                    return Err(NodeError::WouldLoseQuorum(format!(
                        "removing node {id} would leave {} voter(s), fewer than a quorum ({quorum}) of the shard's {} configured replicas; add ?force=true to do it anyway",
                        voters.len(),
                        self.placement.len()
                    )));
                }
            }
        }
        self.raft.change_membership(voters.clone(), false).await.map_err(membership_error)?;
        Ok(voters)
    }

    /// Adds `id`, a node of this DC, as a learner, and returns once it has caught up
    /// with the log.
    async fn add_caught_up_learner(&self, id: NodeId) -> Result<(), NodeError> {
        let node = self.config.dc_nodes(&self.dc).into_iter().find(|n| n.id == id).map(|n| BasicNode::new(n.peer));
        let node = node.ok_or_else(|| NodeError::BadRequest(format!("node {id} is not in this DC's config")))?;
        self.raft.add_learner(id, node, true).await.map_err(membership_error)?;
        Ok(())
    }

    /// Turns this node's election timer back on after a grace that turned it off — unless
    /// the node found it was removed from the group meanwhile.
    pub fn resume_elections(&self) {
        if self.dropped.lock().expect("dropped lock").is_none() {
            self.raft.runtime_config().elect(true);
        }
    }

    /// Whether this node, as leader, is running a membership change.
    pub fn changing_membership(&self) -> bool {
        self.changing.load(Ordering::Acquire)
    }

    /// The group's voters and learners as this node last applied them.
    fn local_members(&self) -> Members {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let committed = m.membership_config.log_id().map(|l| l.index) <= m.last_applied.map(|l| l.index);
        Members { voters: membership.voter_ids().collect(), learners: membership.learner_ids().collect(), committed }
    }

    /// On the leader: the group's members (a follower answers where the leader is).
    pub fn answer_members(&self) -> Result<Members, NodeError> {
        if !self.is_leader() {
            return Err(NodeError::NotLeader(self.leader()));
        }
        Ok(self.local_members())
    }

    /// The group's members as its leader holds them.
    pub async fn members(&self) -> Result<Members, NodeError> {
        if self.is_leader() {
            return Ok(self.local_members());
        }
        self.ask_leader(
            || PeerRequest::Members,
            |r| match r {
                PeerResponse::Members(r) => Ok(r),
                other => Err(other),
            },
        )
        .await
    }

    /// Whether this node, which holds a replica as far as its own log says, was removed
    /// from the group: the leader its DC names does not count it. (The entry that removes
    /// a node is never sent to it, so it cannot learn this from its log.) Then it stops
    /// counting itself a replica (`Shard::hosts`) and holding elections, until its log
    /// shows another membership or the leader counts it again (asked at each check: a
    /// stale leader's answer is not final).
    /// `asked`: a membership change just removed this node, so it checks whatever its
    /// role (else only a node that campaigns, learns or follows no leader does).
    pub async fn check_still_member(&self, asked: bool) {
        let current = *self.raft.metrics().borrow().membership_config.log_id();
        let dropped = *self.dropped.lock().expect("dropped lock");
        if let Some(at) = dropped {
            let added_back = at != current && self.local_members().contains(self.me);
            if added_back || self.leader_members().await.is_some_and(|m| m.contains(self.me)) {
                tracing::info!(shard = self.number, "a member of the group again: a replica here");
                *self.dropped.lock().expect("dropped lock") = None;
                self.record_dropped(|sm| sm.clear_dropped());
                self.raft.runtime_config().elect(true);
            }
            return;
        }
        // A removed voter hears no leader and campaigns (or, restarted, waits as a follower
        // without a leader); a removed learner stays a learner. A follower that hears its
        // leader is still counted.
        let (state, leader) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (m.state, m.current_leader)
        };
        let unsure = matches!(state, ServerState::Candidate | ServerState::Learner) || (state == ServerState::Follower && leader.is_none());
        if !self.hosts() || !(asked || unsure) {
            return;
        }
        let Some(members) = self.leader_members().await.filter(|m| !m.contains(self.me)) else { return };
        tracing::info!(shard = self.number, committed = members.committed, "removed from the group by its leader: no longer a replica here");
        *self.dropped.lock().expect("dropped lock") = Some(current);
        self.raft.runtime_config().elect(false);
        if members.committed {
            let last_index = self.raft.metrics().borrow().last_log_index;
            self.record_dropped(|sm| sm.mark_dropped(last_index));
        }
    }

    /// Records in the store that this node's replica was removed from the group by a
    /// committed change, with the index its log ended at (`SmReader::mark_dropped`), or
    /// that it is a member again (`clear_dropped`), so that its next start deletes the
    /// replica's data (`storage::open_shards`) instead of keeping a copy nobody reads.
    /// Shard 0 is on every member of the DC and holds the node's own records: it is never
    /// marked. Only a committed removal is marked: a voter may forget its log only once no
    /// leader can count it again. And the start deletes only if the log still ends where
    /// it did: a node added back gets entries (as a learner, before it can be a voter
    /// again), so a mark it had no time to clear cannot cost a voter its log.
    fn record_dropped(&self, write: impl FnOnce(&crate::storage::SmReader) -> sled::Result<()>) {
        if self.number == 0 {
            return;
        }
        if let Err(e) = write(&self.sm) {
            tracing::warn!(shard = self.number, error = %e, "could not record this replica's removal: its data stays until it is a member again");
        }
    }

    /// The membership check a peer asked for (`PeerRequest::Recheck`), to run; `None`
    /// while one already runs.
    pub fn recheck(self: Arc<Self>) -> Option<impl Future<Output = ()> + Send + 'static> {
        if self.rechecking.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(async move {
            let _running = Unset(&self.rechecking);
            self.check_still_member(true).await;
        })
    }

    /// The group's members as the leader the DC names holds them (`None`: no leader
    /// known, or no answer).
    async fn leader_members(&self) -> Option<Members> {
        let (leader, _) = self.ask_who_leads().await?;
        if leader == self.me {
            // A leader counts itself until it steps down (one that removed itself leads
            // until the change commits).
            let mut m = self.local_members();
            m.voters.insert(self.me);
            return Some(m);
        }
        match self.peers.call(leader, PeerRequest::Members, Some(self.request_timeout)).await {
            Ok(PeerResponse::Members(Ok(m))) => Some(m),
            _ => None,
        }
    }
}

/// Clears a flag when dropped: however the change it marks ends.
struct Unset<'a>(&'a AtomicBool);

impl Drop for Unset<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Members {
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

/// Leadership that moved while a membership change ran is `NotLeader`, for the caller to
/// retry on the new leader; anything else is internal.
fn membership_error(e: openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, BasicNode>>) -> NodeError {
    match e.forward_to_leader() {
        Some(f) => NodeError::NotLeader(f.leader_id),
        None => NodeError::Internal(e.to_string()),
    }
}
