//! A node: a process hosting replicas of its DC's shards, wired in [`start`] in dependency order —
//! storage, transport, Raft, actors, the cross-DC links, DNS, HTTP — and stopped in
//! [`Running::shutdown`]. This is the composition root: the parts it builds hold only what
//! they use, and nothing below imports it.

mod peer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::actors::{self, Directory};
use crate::api::ApiState;
use crate::cluster_view::ClusterView;
use crate::config::ClusterConfig;
use crate::dns::DnsThread;
use crate::door::{ConnLimits, Door};
use crate::hlc::Hlc;
use crate::memory::{MemoryBound, Release};
use crate::metrics::Metrics;
use crate::raft::proposer::{Proposer, ProposerLimits};
use crate::raft::read_index::{self, ReadIndex};
use crate::raft::{network::Network, raft_config, Raft};
use crate::replication::{self, CrossDc};
use crate::shard::{background, Shard, ShardParts};
use crate::shards::Shards;
use crate::shop::Shop;
use crate::storage;
use crate::transport::server::{Admission, ServerLimits};
use crate::transport::tls::{Directory as PeerDirectory, PeerTls, Security};
use crate::transport::{self, Faults, Peers};

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

/// A started node: its HTTP address and how to stop it.
pub struct Running {
    pub state: Arc<ApiState>,
    pub http_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// One actor supervisor per shard.
    supervisors: Vec<ractor::ActorRef<()>>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {what} port {addr} (is another node or program using it?)"))
}

/// How this node proves who it is to peers, and checks who they are.
fn security(opts: &NodeOptions, name: &str, id: u64) -> anyhow::Result<Security> {
    Ok(match &opts.peer_auth {
        PeerAuth::Certs(dir) => Security::Tls(Arc::new(
            PeerTls::load(dir, name).with_context(|| format!("load peer certificates from {} (create them with `agora certs create`)", dir.display()))?,
        )),
        PeerAuth::InsecurePlaintext => {
            tracing::warn!("PEER TRAFFIC IS NOT AUTHENTICATED (--insecure-plaintext-peers): anyone who reaches the peer port can act as any node");
            Security::Plaintext { me: id }
        }
    })
}

/// The actors that serialise the shard's writes, and the proposer that batches them
/// into Raft.
async fn start_actors(
    config: &ClusterConfig,
    shard: u16,
    raft: &Raft,
    sm: &storage::SmReader,
    reads: &Arc<ReadIndex>,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<Directory>, ractor::ActorRef<()>, Proposer)> {
    let request_timeout = Duration::from_millis(config.limits.request_timeout_ms);
    let directory = Directory::new(config.limits.mailbox_len_max, request_timeout);
    let r = &config.raft;
    let limits = ProposerLimits {
        inflight_max: r.proposals_inflight_max,
        batch_len_max: r.proposal_batch_len_max,
        queue_len_max: r.proposal_queue_len_max,
        timeout: request_timeout,
    };
    let proposer = Proposer::start(raft.clone(), shard, limits);
    let template = actors::entity::EntityArgs { kind: actors::Kind::Sessions, reads: reads.clone(), proposer: proposer.clone(), sm: sm.clone() };
    let supervisor = actors::spawn_supervisor(actors::supervisor::SupervisorArgs { template, directory: directory.clone(), metrics: metrics.clone() }).await?;
    Ok((directory, supervisor, proposer))
}

/// What one shard needs from the node to start.
struct ShardEnv<'a> {
    config: &'a Arc<ClusterConfig>,
    info: &'a crate::config::NodeInfo,
    peers: &'a Peers,
    faults: &'a Faults,
    hlc: &'a Arc<Hlc>,
    metrics: &'a Metrics,
    disk: &'a storage::Disk,
}

/// Starts shard `number`'s replica on this node: its Raft group over its own trees, the
/// actors that serialise its writes, and its cross-DC side; all its peer traffic is
/// addressed to the same shard on the other nodes.
async fn start_shard(
    env: &ShardEnv<'_>,
    number: u16,
    log: storage::LogStore,
    sm: storage::StateMachineStore,
) -> anyhow::Result<(Arc<CrossDc>, ractor::ActorRef<()>)> {
    let (config, info) = (env.config, env.info);
    let peers = env.peers.for_shard(number);
    let reader = sm.reader();
    let raft = Raft::new(
        info.id,
        raft_config(config, &info.dc)?,
        Network { peers: peers.clone(), backoff: Duration::from_millis(config.raft.heartbeat_interval_ms) },
        log.with_payload_bytes_max(config.raft_payload_bytes_max()),
        sm,
    )
    .await
    .with_context(|| format!("start raft of shard {number}"))?;
    let read_index = Arc::new(ReadIndex::new(read_index::Source {
        me: info.id,
        raft: raft.clone(),
        peers: peers.clone(),
        request_timeout: Duration::from_millis(config.limits.request_timeout_ms),
        leader_wait: Duration::from_millis(config.raft.election_timeout_max_ms.saturating_mul(2)),
        rounds: env.metrics.read_index_rounds.with_label_values(&[&number.to_string()]),
        reads: env.metrics.read_index_reads.with_label_values(&[&number.to_string()]),
    }));
    let (actors, supervisor, proposer) = start_actors(config, number, &raft, &reader, &read_index, env.metrics).await?;
    let parts = ShardParts {
        number,
        dc: info.dc.clone(),
        me: info.id,
        config: config.clone(),
        raft,
        sm: reader,
        actors,
        peers: peers.clone(),
        metrics: env.metrics.clone(),
        disk: env.disk.clone(),
        proposer,
        read_index,
    };
    let shard = Shard::new(parts);
    Ok((CrossDc::new(shard, env.hlc.clone(), peers, env.faults.clone(), env.metrics.clone()), supervisor))
}

/// Starts every part of a node, in dependency order: storage, transport, each shard's
/// Raft group, actors and cross-DC links, DNS, HTTP; then bootstraps each shard if this is
/// the DC's first start.
pub async fn start(config: ClusterConfig, opts: NodeOptions) -> anyhow::Result<Running> {
    let info = config.node(&opts.name).ok_or_else(|| anyhow::anyhow!("unknown node '{}'; valid nodes: {}", opts.name, config.node_names().join(", ")))?;
    let config = Arc::new(config);
    let peer_listener = bind(info.peer, "peer").await?;
    let http_listener = bind(info.http, "http").await?;
    let admin_listener = bind(info.admin, "admin").await?;
    let st = &config.storage;
    let sled = storage::SledOptions {
        durability: st.durability,
        cache_bytes: st.sled_cache_bytes_max,
        segment_bytes: st.sled_segment_bytes,
        compression_level: st.sled_compression_level,
        compress_updates: st.sled_compress_updates,
    };
    let disk = storage::Disk::default();
    let stores =
        storage::open_shards(&opts.data_dir, &info.dc, config.spread(), sled, config.limits.cache_entities_max, disk.clone()).context("open storage")?;
    if opts.test_hooks {
        crate::escrow_journal::enable(&opts.data_dir).context("open the escrow journal")?;
    }
    let faults = Faults::default();
    let security = security(&opts, &info.name, info.id)?;
    let wan = transport::Wan::new(&config, &info.dc);
    let peers = Peers::new(&config, info.id, faults.clone(), security.clone(), &wan);
    let metrics = Metrics::new(&info.name, &info.dc);
    let hlc = Arc::new(Hlc::default());
    let env = ShardEnv { config: &config, info: &info, peers: &peers, faults: &faults, hlc: &hlc, metrics: &metrics, disk: &disk };
    let (mut hosted, mut supervisors) = (Vec::new(), Vec::new());
    for (number, (log, sm)) in (0u16..).zip(stores) {
        let (cross, supervisor) = start_shard(&env, number, log, sm).await?;
        hosted.push(cross);
        supervisors.push(supervisor);
    }
    let shards = Arc::new(Shards::new(hosted));
    let (shard, cross) = (shards.first().shard.clone(), shards.first().clone());

    let l = &config.limits;
    let conns = ConnLimits { total_max: l.peer_conns_max, per_source_max: l.peer_conns_per_source_max };
    let door = Door::counted("peer", conns, Duration::from_millis(l.peer_idle_timeout_ms), metrics.door());
    let limits = ServerLimits { frame_bytes_max: l.peer_frame_bytes_max, inflight_per_connection_max: l.peer_inflight_max, door };
    let admission = Admission { security, directory: Arc::new(PeerDirectory::new(&config)) };
    let handler = Arc::new(peer::Handler { shards: shards.clone() });
    let mut tasks = vec![
        tokio::spawn(transport::serve(peer_listener, handler, faults.clone(), wan.clone(), limits, admission)),
        tokio::spawn(peers.addresses().clone().refresh_loop()),
        tokio::spawn(crate::shards::fenced_leader_loop(shards.clone())),
        tokio::spawn(crate::shards::replace_dead_loop(shards.clone())),
        tokio::spawn(crate::shards::rebalance_loop(shards.clone())),
        tokio::spawn(crate::runtime_probe::run(metrics.clone())),
    ];
    for c in shards.all() {
        tasks.push(tokio::spawn(bootstrap(c.shard.clone())));
        tasks.push(tokio::spawn(background::snapshot_loop(c.shard.clone())));
        tasks.push(tokio::spawn(background::expiry_loop(c.shard.clone(), hlc.clone())));
        tasks.push(tokio::spawn(background::leader_balance_loop(c.shard.clone())));
        tasks.push(tokio::spawn(background::role_log_loop(c.shard.clone())));
        tasks.push(tokio::spawn(background::membership_check_loop(c.shard.clone())));
        tasks.extend(replication::spawn(c.clone()));
    }
    let memory = Arc::new(MemoryBound::new(config.limits.memory_bytes_max));
    tasks.push(tokio::spawn(crate::memory::watch(memory.clone(), Arc::new(memory_releases(&shards)))));
    let dns = DnsThread::spawn(info.dns, Arc::new(ClusterView::new(cross.clone())), config.dns.rate_limit(), config.dns.udp_workers)
        .with_context(|| format!("start dns on {}", info.dns))?;

    let state = Arc::new(ApiState {
        info: info.clone(),
        config: config.clone(),
        shop: Shop::new(shards.clone(), hlc.clone(), memory.clone()),
        memory,
        shards,
        shard,
        cross,
        hlc,
        metrics,
        faults,
        wan,
        test_hooks: opts.test_hooks,
        dns: Mutex::new(Some(dns)),
    });
    let http_addr = http_listener.local_addr()?;
    tasks.push(tokio::spawn(crate::api::serve(http_listener, state.clone())));
    let admin_token = opts.admin_token.map(Arc::<str>::from);
    if admin_token.is_none() {
        tracing::warn!(admin = %info.admin, "no admin token: the admin API refuses every call");
    }
    tasks.push(tokio::spawn(crate::api::serve_admin(admin_listener, state.clone(), admin_token)));
    tracing::info!(node = %info.name, dc = %info.dc, id = info.id, shards = config.cluster.shards, http = %http_addr, peer = %info.peer, admin = %info.admin, "node started");
    Ok(Running { state, http_addr, tasks, supervisors })
}

/// What the memory bound may drop: each hosted shard's hot entities, then the allocator's
/// free pages (last, so that it gets the caches' memory too).
fn memory_releases(shards: &Shards) -> Vec<Release> {
    let mut releases: Vec<Release> = shards
        .all()
        .iter()
        .map(|c| {
            let sm = c.shard.sm.clone();
            Box::new(move || sm.drop_cache()) as Release
        })
        .collect();
    releases.push(Box::new(crate::memory::release_allocator));
    releases
}

/// A fresh DC forms by itself: every node whose store is empty proposes the configured
/// members — unless a peer of the DC knows a leader: then the DC exists, and this node
/// (new, or wiped) waits for the leader to send it the log or a snapshot. Had it
/// initialised itself, it would hold the membership with an empty log, campaign, never
/// win, and depose the leader with every higher term it reached (openraft 0.9 has no
/// pre-vote), again and again until caught up. openraft writes that membership as log entry 0 with the same id on every
/// node, so several nodes doing it is harmless, and an initialised node refuses. With
/// several shards the first leaders are spread: initialising starts an election at once,
/// so a shard's preferred node does it first and the others only after a grace of two
/// election timeouts, if they have not heard from it by then.
async fn bootstrap(shard: Arc<Shard>) {
    match shard.raft.is_initialized().await {
        Ok(false) => {}
        Ok(true) => return rejoin_quietly(&shard).await,
        Err(_) => return,
    }
    if !shard.placed_here() {
        // Not one of the shard's first replicas: one comes here only by a membership change.
        return;
    }
    if shard.dc_has_leader().await {
        tracing::info!(dc = %shard.dc, shard = shard.number, "empty store in a DC that has a leader: waiting for it to catch this node up");
        return;
    }
    if shard.config.cluster.shards > 1 && shard.preferred_leader() != Some(shard.me) {
        shard.raft.runtime_config().elect(false);
        tokio::time::sleep(Duration::from_millis(2 * shard.config.raft.election_timeout_max_ms)).await;
        shard.resume_elections();
        if shard.raft.is_initialized().await.unwrap_or(true) {
            return;
        }
    }
    match shard.raft.initialize(shard.configured_members()).await {
        Ok(()) => tracing::info!(dc = %shard.dc, shard = shard.number, "bootstrapped datacentre membership"),
        Err(e) => tracing::debug!(error = %e, "bootstrap skipped"),
    }
}

/// A restarted node holds back its own election timer for two election timeouts, so it
/// hears the current leader's heartbeat before it could depose it with a higher term
/// (openraft 0.9 has no pre-vote). It still votes, and a DC whose every node restarted
/// elects a leader once the grace ends.
async fn rejoin_quietly(shard: &Shard) {
    shard.raft.runtime_config().elect(false);
    tokio::time::sleep(Duration::from_millis(2 * shard.config.raft.election_timeout_max_ms)).await;
    shard.resume_elections();
}

impl Running {
    /// Hands over the shards this node leads, stops serving, then Raft (which flushes
    /// what it has), then the actors.
    pub async fn shutdown(self) {
        // Leadership first, while this node still serves and hears its peers: the shards
        // it leads go on with one short election instead of a timeout of silence.
        let handovers = self.state.shards.all().iter().filter(|c| c.shard.is_leader()).map(|c| async move {
            if let Some(to) = c.shard.handover_targets().first() {
                if c.shard.hand_over(*to).await.is_ok() {
                    c.shard.proposals_answered().await;
                }
            }
        });
        futures::future::join_all(handovers).await;
        for t in &self.tasks {
            t.abort();
        }
        let dns = self.state.dns.lock().expect("dns lock").take();
        if let Some(dns) = dns {
            dns.shutdown().await;
        }
        for c in self.state.shards.all() {
            if let Err(e) = c.shard.raft.shutdown().await {
                tracing::warn!(shard = c.shard.number, error = %e, "raft shutdown");
            }
        }
        for s in &self.supervisors {
            s.stop(None);
        }
        tracing::info!(node = %self.state.info.name, "node stopped");
    }
}
