//! One node: wiring and shutdown order in [`start`], and the two request paths that every
//! API call takes — [`Node::submit`] for writes (to the local actors on the leader,
//! forwarded over the transport from a follower) and [`Node::read_barrier`] for
//! linearizable reads (read index: the leader confirms its lease with a quorum, the
//! reading node waits until it has applied up to that index).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};

use crate::actors::{self, Directory};
use crate::cluster_view::ClusterView;
use crate::config::{ClusterConfig, NodeInfo};
use crate::dns::DnsThread;
use crate::domain::{Outcome, Request};
use crate::door::{ConnLimits, Door};
use crate::error::NodeError;
use crate::hlc::Hlc;
use crate::metrics::Metrics;
use crate::raft::proposer::{Proposer, ProposerLimits};
use crate::raft::{network::Network, raft_config, NodeId, Raft};
use crate::replication::{self, Links};
use crate::storage::{self, SmReader};
use crate::transport::message::{Found, Lookup};
use crate::transport::server::{Admission, ServerLimits};
use crate::transport::tls::{Directory as PeerDirectory, PeerTls, Security};
use crate::transport::{self, Faults, PeerHandler, PeerRequest, PeerResponse, Peers};

/// Forwarding hops before a write gives up (leadership moving under it).
const SUBMIT_ATTEMPTS: usize = 3;

pub struct NodeOptions {
    pub name: String,
    pub data_dir: PathBuf,
    /// Enables the admin endpoints that inject faults and crash actors.
    pub test_hooks: bool,
    /// How peers prove who they are: certificates (the default) or nothing at all.
    pub peer_auth: PeerAuth,
    /// The bearer token the admin API wants; without one, the admin API refuses every call.
    pub admin_token: Option<String>,
}

/// Where this node's peer identity comes from.
#[derive(Debug, Clone)]
pub enum PeerAuth {
    /// Mutual TLS with the CA, certificate and key in this certs directory.
    Certs(PathBuf),
    /// No authentication (`--insecure-plaintext-peers`): anyone who reaches the peer port
    /// can act as any node.
    InsecurePlaintext,
}

pub struct Node {
    pub info: NodeInfo,
    pub config: Arc<ClusterConfig>,
    pub raft: Raft,
    pub sm: SmReader,
    pub peers: Peers,
    pub actors: Arc<Directory>,
    pub faults: Faults,
    /// WAN emulation: the delay of frames to other DCs (`[wan]`, `PUT /v1/admin/wan`).
    pub wan: transport::Wan,
    pub metrics: Metrics,
    pub test_hooks: bool,
    pub links: Arc<Links>,
    /// The DNS server, once started (its counters feed /metrics).
    pub dns: Mutex<Option<DnsThread>>,
    pub hlc: Hlc,
    request_timeout: Duration,
    /// Ids of this DC's nodes: checked on every peer request (each Raft heartbeat), so
    /// computed once rather than from the config's node list each time.
    dc_ids: HashSet<NodeId>,
    /// SKUs this node is asking other DCs for stock for (one ask at a time per SKU).
    asking: Mutex<HashSet<String>>,
    /// The snapshot being received from the leader (see `raft::guard`).
    pub snapshot_transfer: tokio::sync::Mutex<crate::raft::guard::SnapshotTransfer>,
    /// Grants to other DCs: how much and how often (see `replication::guard`).
    pub grants: crate::replication::guard::GrantLimiter,
}

/// A membership change asked of the DC leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipOp {
    Add(NodeId),
    /// Refused when it would leave fewer voters than a quorum of the DC's configured nodes.
    Remove(NodeId),
    /// A removal the operator forces past that check (`?force=true`).
    ForceRemove(NodeId),
}

impl Node {
    fn dc_members(&self) -> BTreeMap<NodeId, BasicNode> {
        self.config.dc_nodes(&self.info.dc).into_iter().map(|n| (n.id, BasicNode::new(n.peer))).collect()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The current leader, waiting up to an election's length for one to appear.
    async fn wait_leader(&self) -> Result<NodeId, NodeError> {
        if let Some(l) = self.leader() {
            return Ok(l);
        }
        let wait = Duration::from_millis(self.config.raft.election_timeout_max_ms * 2);
        self.raft.wait(Some(wait)).metrics(|m| m.current_leader.is_some(), "leader").await.ok().and_then(|m| m.current_leader).ok_or(NodeError::NoLeader)
    }

    /// Runs a write on the DC leader and returns its outcome once applied there.
    pub async fn submit(&self, cmd: Request) -> Result<Outcome, NodeError> {
        let mut last = NodeError::NoLeader;
        for _ in 0..SUBMIT_ATTEMPTS {
            let leader = self.wait_leader().await?;
            let r = if leader == self.info.id { self.actors.submit(cmd.clone()).await } else { self.forward(leader, cmd.clone()).await };
            match r {
                Err(NodeError::NotLeader(hint)) => {
                    last = NodeError::NotLeader(hint);
                    // Leadership is moving: give the new leader a heartbeat to show up.
                    tokio::time::sleep(Duration::from_millis(self.config.raft.heartbeat_interval_ms)).await;
                }
                other => return other,
            }
        }
        Err(if matches!(last, NodeError::NotLeader(_)) { NodeError::NoLeader } else { last })
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
    pub async fn read_barrier(&self, stale: bool) -> Result<(), NodeError> {
        if stale {
            return Ok(());
        }
        let leader = self.wait_leader().await?;
        let index = if leader == self.info.id {
            self.read_index_local().await?
        } else {
            match self.peers.call(leader, PeerRequest::ReadIndex, Some(self.request_timeout)).await? {
                PeerResponse::ReadIndex(r) => r?,
                other => return Err(NodeError::Internal(format!("unexpected answer to read index: {other:?}"))),
            }
        };
        self.raft.wait(Some(self.request_timeout)).applied_index_at_least(Some(index), "read index").await.map_err(|_| NodeError::Timeout)?;
        Ok(())
    }

    /// On the leader: confirms leadership with a quorum and returns the read index.
    async fn read_index_local(&self) -> Result<u64, NodeError> {
        let r = tokio::time::timeout(self.request_timeout, self.raft.ensure_linearizable()).await.map_err(|_| NodeError::Timeout)?;
        match r {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(NodeError::NotLeader(f.leader_id)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Err(NodeError::NoLeader),
            Err(RaftError::Fatal(f)) => Err(NodeError::Internal(f.to_string())),
        }
    }

    /// Adds (learner, then voter) or removes a node of this DC; on a follower, asks the leader.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<BTreeSet<NodeId>, NodeError> {
        let leader = self.wait_leader().await?;
        if leader != self.info.id {
            return match self.peers.call(leader, PeerRequest::Membership(op), Some(Duration::from_secs(30))).await? {
                PeerResponse::Membership(r) => r,
                other => Err(NodeError::Internal(format!("unexpected answer to membership change: {other:?}"))),
            };
        }
        self.change_membership_local(op).await
    }

    async fn change_membership_local(&self, op: MembershipOp) -> Result<BTreeSet<NodeId>, NodeError> {
        let internal = |e: &dyn std::fmt::Display| NodeError::Internal(e.to_string());
        let mut voters: BTreeSet<NodeId> = self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        match op {
            MembershipOp::Add(id) => {
                let node = self.dc_members().remove(&id).ok_or_else(|| NodeError::BadRequest(format!("node {id} is not in this DC's config")))?;
                // Blocking: returns once the learner has caught up with the log.
                self.raft.add_learner(id, node, true).await.map_err(|e| internal(&e))?;
                voters.insert(id);
            }
            MembershipOp::Remove(id) | MembershipOp::ForceRemove(id) => {
                if !voters.remove(&id) {
                    return Err(NodeError::BadRequest(format!("node {id} is not a voter")));
                }
                if voters.is_empty() {
                    return Err(NodeError::BadRequest("cannot remove the last voter".into()));
                }
                // With fewer voters than a majority of the configured nodes, a write is
                // "committed" on fewer copies than the DC was built to keep.
                let quorum = self.dc_members().len() / 2 + 1;
                if voters.len() < quorum && matches!(op, MembershipOp::Remove(_)) {
                    return Err(NodeError::WouldLoseQuorum(format!(
                        "removing node {id} would leave {} voter(s), fewer than a quorum ({quorum}) of this DC's {} configured nodes; add ?force=true to do it anyway",
                        voters.len(),
                        self.dc_members().len()
                    )));
                }
            }
        }
        self.raft.change_membership(voters.clone(), false).await.map_err(|e| internal(&e))?;
        Ok(voters)
    }

    pub fn begin_ask(&self, sku: &str) -> bool {
        self.asking.lock().expect("asking lock").insert(sku.to_string())
    }

    pub fn end_ask(&self, sku: &str) {
        self.asking.lock().expect("asking lock").remove(sku);
    }

    /// Sends a cancel for an order owned by another DC to that DC.
    pub async fn forward_to_owner(&self, owner: &str, req: Request) -> Result<Outcome, NodeError> {
        let mut targets: Vec<NodeId> = self.config.dc_nodes(owner).iter().map(|n| n.id).collect();
        if let Some(l) = self.links.get(owner).remote_leader {
            targets.sort_by_key(|t| *t != l);
        }
        let mut last = NodeError::Unreachable(owner.to_string());
        for t in targets {
            match self.peers.call(t, PeerRequest::Submit(req.clone()), Some(self.request_timeout / 3)).await {
                Ok(PeerResponse::Submit(r)) => return r,
                Ok(other) => last = NodeError::Internal(format!("unexpected answer: {other:?}")),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Asks `owner` (another DC) for its copy of an order or session it created: one
    /// lookup, bounded by half the request timeout. Its last known leader first, then its
    /// nodes in turn (healthy ones first); any node of the owner answers after a read
    /// barrier, so what it says is linearizable in the owner DC. An error means the owner
    /// could not answer (retryable: `owner_unreachable` to the client).
    pub async fn lookup(&self, owner: &str, what: Lookup) -> Result<Found, NodeError> {
        let mut targets: Vec<NodeId> = self.config.dc_nodes(owner).iter().map(|n| n.id).collect();
        let leader = self.links.get(owner).remote_leader;
        targets.sort_by_key(|t| (Some(*t) != leader, !self.links.node_healthy(*t)));
        let per_call = self.request_timeout / 5;
        let attempt = async {
            let mut last = NodeError::Unreachable(owner.to_string());
            let mut tried = Vec::new();
            while let Some(t) = targets.first().copied() {
                targets.remove(0);
                tried.push(t);
                match self.peers.call(t, PeerRequest::Lookup(what.clone()), Some(per_call)).await {
                    Ok(PeerResponse::Lookup(Ok(found))) => {
                        let max_offset = self.config.replication.max_clock_offset_ms;
                        return replication::guard::check_found(&what, owner, &found, crate::hlc::wall_ms(), max_offset).map(|_| found).map_err(|m| {
                            crate::warn_limited!("bad_lookup_answer", %owner, reason = %m, "lookup answer refused");
                            NodeError::BadRequest(m)
                        });
                    }
                    // Its leader is elsewhere (or it has none): try the node it names next.
                    Ok(PeerResponse::Lookup(Err(NodeError::NotLeader(Some(l)))))
                        if !tried.contains(&l) && self.config.dc_nodes(owner).iter().any(|n| n.id == l) =>
                    {
                        targets.retain(|x| *x != l);
                        targets.insert(0, l);
                        last = NodeError::NotLeader(Some(l));
                    }
                    Ok(PeerResponse::Lookup(Err(e))) => last = e,
                    Ok(other) => last = NodeError::Internal(format!("unexpected answer to a lookup: {other:?}")),
                    Err(e) => last = e,
                }
            }
            Err(last)
        };
        let r = tokio::time::timeout(self.request_timeout / 2, attempt).await.unwrap_or(Err(NodeError::Timeout));
        let label = if r.is_ok() { "ok" } else { "error" };
        self.metrics.lookups.with_label_values(&[owner, label]).inc();
        r
    }

    /// On the owner: answers a lookup from another DC, for what this DC owns only, after
    /// a read barrier.
    pub async fn answer_lookup(&self, what: Lookup) -> Result<Found, NodeError> {
        let id = match &what {
            Lookup::Order(id) | Lookup::Session(id) => id,
        };
        crate::domain::validate::name("id", id).map_err(NodeError::BadRequest)?;
        if self.config.owner_of(id).as_deref() != Some(self.info.dc.as_str()) {
            return Err(NodeError::BadRequest(format!("{id} is not {}'s", self.info.dc)));
        }
        self.read_barrier(false).await?;
        Ok(match what {
            Lookup::Order(id) => Found::Order(self.sm.order(&id).filter(|o| o.dc == self.info.dc)),
            Lookup::Session(token) => Found::Session(self.sm.session(&token)),
        })
    }

    /// Commit index, from Raft's own state.
    pub async fn commit_index(&self) -> u64 {
        self.raft.with_raft_state(|st| st.committed.map(|l| l.index).unwrap_or(0)).await.unwrap_or(0)
    }
}

/// Answers peer requests: Raft RPCs from this DC, forwarded writes and read-index asks.
struct Handler(Arc<Node>);

#[async_trait::async_trait]
impl PeerHandler for Handler {
    async fn handle(&self, from: NodeId, req: PeerRequest) -> PeerResponse {
        let node = &self.0;
        if !node.dc_ids.contains(&from) {
            return replication::receiver::handle(node, from, req).await;
        }
        match req {
            // Checked by `raft::guard` before openraft sees them.
            PeerRequest::AppendEntries(r) => crate::raft::inbound::append_entries(node, from, r).await,
            PeerRequest::Vote(r) => crate::raft::inbound::vote(node, from, r).await,
            PeerRequest::InstallSnapshot(r) => crate::raft::inbound::install_snapshot(node, from, r).await,
            PeerRequest::Submit(cmd) if node.is_leader() => PeerResponse::Submit(replication::receiver::submit_forwarded(node, cmd).await),
            PeerRequest::Submit(_) => PeerResponse::Submit(Err(NodeError::NotLeader(node.leader()))),
            PeerRequest::ReadIndex => PeerResponse::ReadIndex(node.read_index_local().await),
            PeerRequest::Membership(op) if node.is_leader() => PeerResponse::Membership(node.change_membership_local(op).await),
            PeerRequest::Membership(_) => PeerResponse::Membership(Err(NodeError::NotLeader(node.leader()))),
            PeerRequest::Probe => PeerResponse::Probe(replication::receiver::probe_ack(node)),
            // Cross-DC requests from a node of this DC: a confused or hostile peer.
            other @ (PeerRequest::Replicate { .. } | PeerRequest::InstallRemote { .. } | PeerRequest::AskStock { .. } | PeerRequest::Lookup(_)) => {
                // The request's name only: its payload may be a whole DC's state.
                let request = replication::receiver::request_name(&other);
                crate::warn_limited!("peer_same_dc_cross_dc_request", from, request, "cross-DC request from a node of this DC refused");
                PeerResponse::Refused("cross-DC request from the same DC".into())
            }
        }
    }
}

/// A started node: its HTTP address and how to stop it.
pub struct Running {
    pub node: Arc<Node>,
    pub http_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    supervisor: ractor::ActorRef<()>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {what} port {addr} (is another node or program using it?)"))
}

/// Starts every part of a node, in dependency order: storage, transport, Raft, actors,
/// HTTP; then bootstraps the DC if this is its first start.
pub async fn start(config: ClusterConfig, opts: NodeOptions) -> anyhow::Result<Running> {
    let info = config.node(&opts.name).ok_or_else(|| anyhow::anyhow!("unknown node '{}'; valid nodes: {}", opts.name, config.node_names().join(", ")))?;
    let config = Arc::new(config);
    let peer_listener = bind(info.peer, "peer").await?;
    let http_listener = bind(info.http, "http").await?;
    let admin_listener = bind(info.admin, "admin").await?;
    let st = &config.storage;
    let (log, sm) =
        storage::open_with(&opts.data_dir, &info.dc, st.durability, st.sled_cache_bytes_max, st.sled_segment_bytes, config.limits.cache_entities_max)
            .context("open storage")?;
    let reader = sm.reader();
    let faults = Faults::default();
    let security = match &opts.peer_auth {
        PeerAuth::Certs(dir) => Security::Tls(Arc::new(
            PeerTls::load(dir, &info.name).with_context(|| format!("load peer certificates from {} (create them with `agora certs create`)", dir.display()))?,
        )),
        PeerAuth::InsecurePlaintext => {
            tracing::warn!("PEER TRAFFIC IS NOT AUTHENTICATED (--insecure-plaintext-peers): anyone who reaches the peer port can act as any node");
            Security::Plaintext { me: info.id }
        }
    };
    let wan = transport::Wan::new(&config, &info.dc);
    let peers = Peers::new(&config, info.id, faults.clone(), security.clone(), &wan);
    let raft = Raft::new(info.id, raft_config(&config, &info.dc)?, Network { peers: peers.clone() }, log, sm).await.context("start raft")?;
    let metrics = Metrics::new(&info.name, &info.dc);
    let request_timeout = Duration::from_millis(config.limits.request_timeout_ms);
    let actors = Directory::new(config.limits.mailbox_len_max, request_timeout);
    let proposer = Proposer::start(
        raft.clone(),
        ProposerLimits {
            inflight_max: config.raft.proposals_inflight_max,
            batch_len_max: config.raft.proposal_batch_len_max,
            queue_len_max: config.raft.proposal_queue_len_max,
            timeout: request_timeout,
        },
    );
    let template = actors::entity::EntityArgs { kind: actors::Kind::Sessions, raft: raft.clone(), proposer, sm: reader.clone() };
    let supervisor = actors::spawn_supervisor(actors::supervisor::SupervisorArgs { template, directory: actors.clone(), metrics: metrics.clone() }).await?;
    let info_dc = info.dc.clone();
    let remote_dcs = config.dc_names().into_iter().filter(|d| *d != info.dc);
    let links = Links::new(remote_dcs, Duration::from_millis(config.replication.dc_unhealthy_after_ms));
    let node = Arc::new(Node {
        info,
        config: config.clone(),
        raft,
        sm: reader,
        peers,
        actors,
        faults: faults.clone(),
        wan: wan.clone(),
        metrics,
        test_hooks: opts.test_hooks,
        links,
        dns: Mutex::new(None),
        hlc: Hlc::default(),
        request_timeout,
        asking: Mutex::new(HashSet::new()),
        snapshot_transfer: Default::default(),
        grants: Default::default(),
        dc_ids: config.dc_nodes(&info_dc).iter().map(|n| n.id).collect(),
    });

    let l = &config.limits;
    let conns = ConnLimits { total_max: l.peer_conns_max, per_source_max: l.peer_conns_per_source_max };
    let door = Door::counted("peer", conns, Duration::from_millis(l.peer_idle_timeout_ms), node.metrics.door());
    let limits = ServerLimits { frame_bytes_max: l.peer_frame_bytes_max, inflight_per_connection_max: l.peer_inflight_max, door };
    let admission = Admission { security, directory: Arc::new(PeerDirectory::new(&config)) };
    let mut tasks = vec![tokio::spawn(transport::serve(peer_listener, Arc::new(Handler(node.clone())), faults, wan, limits, admission))];
    let http_addr = http_listener.local_addr()?;
    tasks.push(tokio::spawn(crate::api::serve(http_listener, node.clone())));
    let admin_token = opts.admin_token.map(Arc::<str>::from);
    if admin_token.is_none() {
        tracing::warn!(admin = %node.info.admin, "no admin token: the admin API refuses every call");
    }
    tasks.push(tokio::spawn(crate::api::serve_admin(admin_listener, node.clone(), admin_token)));
    tasks.push(tokio::spawn(bootstrap(node.clone())));
    tasks.push(tokio::spawn(crate::raft::snapshots::snapshot_loop(node.clone())));
    tasks.extend(replication::spawn(node.clone()));
    tasks.push(tokio::spawn(crate::expiry::expiry_loop(node.clone())));
    let dns = DnsThread::spawn(node.info.dns, Arc::new(ClusterView::new(node.clone())), config.dns.rate_limit())
        .with_context(|| format!("start dns on {}", node.info.dns))?;
    *node.dns.lock().expect("dns lock") = Some(dns);
    tracing::info!(node = %node.info.name, dc = %node.info.dc, id = node.info.id, http = %http_addr, peer = %node.info.peer, admin = %node.info.admin, "node started");
    Ok(Running { node, http_addr, tasks, supervisor })
}

/// A fresh DC forms by itself: every node whose store is empty proposes the configured
/// members. openraft writes that membership as log entry 0 with the same id on every
/// node, so several nodes doing it is harmless, and an initialised node refuses.
async fn bootstrap(node: Arc<Node>) {
    match node.raft.is_initialized().await {
        Ok(false) => {}
        Ok(true) => return rejoin_quietly(&node).await,
        Err(_) => return,
    }
    match node.raft.initialize(node.dc_members()).await {
        Ok(()) => tracing::info!(dc = %node.info.dc, "bootstrapped datacentre membership"),
        Err(e) => tracing::debug!(error = %e, "bootstrap skipped"),
    }
}

/// A restarted node holds back its own election timer for two election timeouts, so it
/// hears the current leader's heartbeat before it could depose it with a higher term
/// (openraft 0.9 has no pre-vote). It still votes, and a DC whose every node restarted
/// elects a leader once the grace ends.
async fn rejoin_quietly(node: &Node) {
    node.raft.runtime_config().elect(false);
    tokio::time::sleep(Duration::from_millis(2 * node.config.raft.election_timeout_max_ms)).await;
    node.raft.runtime_config().elect(true);
}

impl Running {
    /// Stops serving, then Raft (which flushes what it has), then the actors.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        let dns = self.node.dns.lock().expect("dns lock").take();
        if let Some(dns) = dns {
            dns.shutdown().await;
        }
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.supervisor.stop(None);
        tracing::info!(node = %self.node.info.name, "node stopped");
    }
}
