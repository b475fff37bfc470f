//! The cluster file (`cluster/*.toml`): datacentres, nodes, ports, timeouts and limits.
//!
//! Parsed with `deny_unknown_fields` and checked by [`ClusterConfig::validate`] at start-up,
//! so a typo or an inconsistent topology stops the node with a message naming the field.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The embedded default: 3 DCs × 3 nodes on 127.0.{1,2,3}.{1,2,3}.
pub const DEFAULT_TOML: &str = include_str!("../cluster/local.toml");

pub type NodeId = u64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config: {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    #[serde(default)]
    pub ports: Ports,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub replication: ReplicationSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub dns: DnsSection,
    /// Written out only when set: the committed deployment files need no `[wan]`.
    #[serde(default, skip_serializing_if = "WanSection::is_off")]
    pub wan: WanSection,
    #[serde(rename = "dc")]
    pub dcs: Vec<DcConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    #[serde(default = "default_zone")]
    pub zone: String,
    #[serde(default = "default_dns_ttl")]
    pub dns_ttl_s: u32,
    /// Raft groups per DC. Every DC has the same number, so an entity (session by token,
    /// inventory and orders by SKU) lives in the same shard in every DC. Fixed for the
    /// life of a cluster: changing it moves every entity.
    #[serde(default = "default_shards", skip_serializing_if = "is_one_shard")]
    pub shards: u16,
    /// Nodes holding a replica of each shard but shard 0, when fewer than a DC's nodes:
    /// shard k's replicas are the DC's nodes k, k+1, … (from 0, mod the DC's size) at its
    /// first start, so a DC grows by adding nodes rather than copies. 0 (the default):
    /// every node holds every shard. Shard 0 is always on every node: it holds only the
    /// DC's own settings then, which every node's DNS answers read (`spread`). Fixed for
    /// the life of a cluster, like `shards`.
    #[serde(default, skip_serializing_if = "is_zero_u16")]
    pub replicas: u16,
    /// With shards on subsets (`replicas`): a node that has failed every probe of its DC
    /// for this long counts as dead, and the leader of each shard it held moves that
    /// replica to a healthy node holding none of the shard, so the shard is back to
    /// `replicas` copies. 0: never (the operator removes the node). The node itself stays
    /// a member of its DC; back, it holds the shards it was not moved off.
    #[serde(default = "default_move_after_s", skip_serializing_if = "is_default_move_after_s")]
    pub replace_dead_after_s: u32,
    /// With shards on subsets: once the DC's replica counts have been uneven (a healthy
    /// node holding two fewer than the most loaded, or a shard short of `replicas`
    /// copies) in the same way for this long, shard 0's leader moves one replica onto
    /// the node holding the fewest, and so on, so that a node back from the dead or a
    /// shard that lost a copy is evened out without an operator. 0: never.
    #[serde(default = "default_move_after_s", skip_serializing_if = "is_default_move_after_s")]
    pub rebalance_after_s: u32,
}

/// For both automatic moves: long enough that a restart or a short partition moves
/// nothing (copying a shard costs its size in network and disk), short enough that a
/// lost machine leaves its shards on two copies for minutes, not until an operator
/// notices.
pub const MOVE_AFTER_S_DEFAULT: u32 = 300;

/// At most a week: a longer wait is `0`, never.
const MOVE_AFTER_S_MAX: u32 = 7 * 24 * 3600;

fn default_move_after_s() -> u32 {
    MOVE_AFTER_S_DEFAULT
}
fn is_default_move_after_s(n: &u32) -> bool {
    *n == MOVE_AFTER_S_DEFAULT
}

fn is_zero_u16(n: &u16) -> bool {
    *n == 0
}

/// Cross-DC batches one leader may have in flight to one DC at most: each holds up to
/// `batch_len_max` events in memory until it is answered.
pub const BATCHES_INFLIGHT_MAX: usize = 64;

/// The most shards a DC may have.
pub const SHARDS_MAX: u16 = 64;

/// The most nodes a DC may have when its shards live on subsets of them (`replicas`).
pub const DC_NODES_MAX: usize = 15;

fn default_shards() -> u16 {
    1
}
fn is_one_shard(n: &u16) -> bool {
    *n == 1
}

fn default_zone() -> String {
    "agora.test.".into()
}
fn default_dns_ttl() -> u32 {
    5
}

/// Ports shared by every node; a node may override them (tests and one-IP hosts do).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub http: u16,
    pub peer: u16,
    pub dns: u16,
    /// The admin API (membership, drain, weights, test hooks), apart from the shop's.
    #[serde(default = "default_admin_port")]
    pub admin: u16,
}

fn default_admin_port() -> u16 {
    9090
}

impl Default for Ports {
    fn default() -> Self {
        Ports { http: 8080, peer: 7070, dns: 8553, admin: default_admin_port() }
    }
}

/// Where the admin API listens. It always wants the admin token; the address decides who
/// can try.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminListen {
    /// 127.0.0.1 — or the node's own address when that is a loopback one (a local
    /// cluster, where every node has its own 127.x address): only this host can reach it.
    #[default]
    Loopback,
    /// The node's address: operators and the launcher reach it from other hosts,
    /// containers or namespaces.
    Node,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub listen: AdminListen,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one: the DC's
    /// first node; its second and third wait 1.25 and 1.5 times as long, so their builds
    /// rarely overlap, and whichever node leads waits twice as long as it would otherwise.
    pub snapshot_logs_since_last: u64,
    /// And not before the client writes since the last snapshot reach this percentage of
    /// the state's records (staggered the same way): a build copies the whole state, so
    /// spacing builds in proportion to it keeps their cost per write constant as it grows.
    /// 0: entries alone decide (the cost per write then grows with the state).
    pub snapshot_state_ratio_percent: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers catch up
    /// from the log instead of a snapshot.
    pub logs_to_keep_after_snapshot: u64,
    /// How long a leader waits for the answer to a snapshot chunk; the last one's answer
    /// comes once the snapshot is installed, which takes minutes for a large state (4 M
    /// records took 112 s on a 2-core machine). Past it, the
    /// leader sends the snapshot again from the start, so it must exceed the install. A
    /// peer that falls silent is noticed sooner, by the transport's pings.
    pub install_snapshot_timeout_ms: u64,
    pub snapshot_chunk_bytes_max: u64,
    /// Raft entries the leader has proposed and not yet applied; requests arriving while
    /// all are out share the next entry (one log append and fsync for all of them).
    pub proposals_inflight_max: usize,
    /// Client requests in one Raft entry at most.
    pub proposal_batch_len_max: usize,
    /// Requests waiting in the leader's proposer for a Raft entry. While the DC has no
    /// quorum nothing leaves: past this many, a write is answered 503 at once.
    pub proposal_queue_len_max: usize,
    /// How far beyond this node's current term a Raft request's term may be; further is
    /// refused before openraft sees it (a term near `u64::MAX` made openraft overflow at
    /// the next election, and again after every restart). An honest node cut off from its
    /// DC raises its term once per election timeout (openraft 0.9 has no pre-vote): the
    /// default, 1,000,000, covers about 4.6 days of that at a 400 ms timeout.
    pub term_jump_max: u64,
    /// Largest snapshot a node accepts from its leader (bytes, summed over its chunks).
    /// Received snapshots are written to a file as they arrive, never held in memory.
    pub snapshot_bytes_max: u64,
    /// With several shards, how often a shard's leader checks whether the node meant to
    /// lead it (see `Shard::preferred_leader`) is back and caught up, and if so hands
    /// leadership to it: leaders spread over the DC again after failovers. 0: never.
    pub leader_balance_interval_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_logs_since_last: 5000,
            snapshot_state_ratio_percent: 25,
            logs_to_keep_after_snapshot: 1000,
            install_snapshot_timeout_ms: 900_000,
            snapshot_chunk_bytes_max: 1 << 20,
            proposals_inflight_max: 1,
            proposal_batch_len_max: 256,
            proposal_queue_len_max: 10_000,
            term_jump_max: 1_000_000,
            snapshot_bytes_max: 2 << 30,
            leader_balance_interval_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// sled flush, then fdatasync of sled's file: survives power loss.
    Fsync,
    /// sled flush only (sync_file_range): survives a process crash, not power loss.
    Flush,
}

/// The zstd levels sled's pages may be compressed at (0: not compressed).
pub const SLED_COMPRESSION_LEVELS: std::ops::RangeInclusive<i8> = -7..=22;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    pub durability: Durability,
    /// sled's page cache bound.
    pub sled_cache_bytes_max: u64,
    /// sled's segment size (a power of two; 0: sled's default, 512 KiB). Fixed when the
    /// data dir is created: sled refuses to open a dir with another one.
    pub sled_segment_bytes: usize,
    /// zstd level of sled's pages, 0 for none; 1 by default (a fifth of the disk). 1–22
    /// are zstd's levels, -1 to -7 its fast ones (less CPU per write, more disk).
    /// Whether pages are compressed is fixed when the data dir is created (a dir keeps it, with a warning at start if
    /// the config differs); the level may change at any restart.
    pub sled_compression_level: i8,
    /// With compressed pages, whether each update to a page is compressed too (true,
    /// the default: the least disk), or stored as it is until the page is next written
    /// whole (false: less CPU per write, more disk). May change at any restart: a data
    /// dir reads both.
    pub sled_compress_updates: bool,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            durability: Durability::Fsync,
            sled_cache_bytes_max: 256 << 20,
            sled_segment_bytes: 0,
            sled_compression_level: 1,
            sled_compress_updates: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub body_bytes_max: usize,
    pub request_timeout_ms: u64,
    /// A peer request's timeout unless it sets its own, and how long a connection with
    /// requests waiting may hear nothing from the peer, pings included, before it is
    /// dropped and they fail.
    pub peer_request_timeout_ms: u64,
    pub peer_inflight_max: usize,
    pub peer_frame_bytes_max: usize,
    pub peer_backoff_max_ms: u64,
    pub cache_entities_max: usize,
    pub mailbox_len_max: usize,
    /// How long an `Idempotency-Key` keeps returning the first result (and a retry in
    /// another DC is recognised as a duplicate); after that the key is free again.
    pub idempotency_ttl_s: u64,
    /// A session unused (no order placed with it) for this long is expired: a tombstone
    /// written by the DC that wrote its last version, replicated like a logout.
    pub session_ttl_s: u64,
    /// How often the leader proposes an expiry pass.
    pub expiry_interval_ms: u64,
    /// Records of each kind one expiry pass removes at most (oldest first), so a pass
    /// stays a small Raft entry that never stalls applies.
    pub expiry_batch_len_max: u32,
    /// Open HTTP connections at most, and from one source IP at most; more are closed
    /// as soon as they are accepted.
    pub http_conns_max: usize,
    pub http_conns_per_source_max: usize,
    /// An HTTP connection that sends nothing for this long is closed (keep-alive idle).
    pub http_idle_timeout_ms: u64,
    /// A request's headers must have arrived this long after its first byte.
    pub http_header_timeout_ms: u64,
    /// A whole request, from headers to answer (the admin routes excepted: a membership
    /// change waits for a learner to catch up).
    pub http_request_timeout_ms: u64,
    /// Open peer connections at most, and from one source IP at most.
    pub peer_conns_max: usize,
    pub peer_conns_per_source_max: usize,
    /// A peer connection that sends nothing for this long is closed; the sending side
    /// reconnects on its next request.
    pub peer_idle_timeout_ms: u64,
    /// The resident memory the node keeps under: near it, it drops its caches; at it, it
    /// refuses client writes (503 `memory_pressure`) until back under it. Must leave
    /// `MEMORY_HEADROOM_BYTES` above sled's cache.
    pub memory_bytes_max: u64,
}

/// What a node needs besides sled's cache, at least: a node of one DC under load measured
/// 280–330 MiB besides its 256 MiB cache at rest (writes refused) after about 1.3 M orders. A
/// bound below what the node holds at rest would refuse writes for good.
pub const MEMORY_HEADROOM_BYTES: u64 = 384 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes_max: 16 * 1024,
            request_timeout_ms: 5000,
            peer_request_timeout_ms: 3000,
            peer_inflight_max: 1024,
            peer_frame_bytes_max: 64 << 20,
            peer_backoff_max_ms: 200,
            cache_entities_max: 100_000,
            mailbox_len_max: 10_000,
            idempotency_ttl_s: 24 * 3600,
            session_ttl_s: 24 * 3600,
            expiry_interval_ms: 10_000,
            expiry_batch_len_max: 1000,
            http_conns_max: 8192,
            http_conns_per_source_max: 512,
            http_idle_timeout_ms: 60_000,
            http_header_timeout_ms: 10_000,
            http_request_timeout_ms: 10_000,
            peer_conns_max: 1024,
            peer_conns_per_source_max: 64,
            peer_idle_timeout_ms: 60_000,
            memory_bytes_max: 1 << 30,
        }
    }
}

/// Cross-DC replication, link health and rebalancing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    /// Events per shipped batch.
    pub batch_len_max: usize,
    /// Batches a leader keeps in flight to another DC: the next leaves as soon as there
    /// are events for it, not once the last is acknowledged (which takes a Raft commit
    /// there). The receiver applies them in seq order; one that arrives early applies
    /// nothing and is sent again.
    pub batches_inflight_max: usize,
    /// Events kept for DCs that have not acknowledged them; a DC further behind catches
    /// up from a snapshot of the origin's state.
    pub outbox_len_max: u64,
    /// How often every node probes the other DCs, and the leader sends an empty batch
    /// when it has nothing to ship.
    pub probe_interval_ms: u64,
    /// A DC not heard from for this long counts as unreachable (status, DNS). A DC
    /// whose every node failed its probe (at least three probes in a row; refused
    /// connections are retried at once) counts as unreachable before that.
    pub dc_unhealthy_after_ms: u64,
    /// Below this many units of its own allowance a DC asks the others for more.
    pub low_water_units: u64,
    /// A DC grants only what it holds above this reserve.
    pub reserve_units: u64,
    /// Timestamps another node sends (replicated events and what they carry, forwarded
    /// commands) may be at most this far ahead of this node's clock; later ones are
    /// refused before anything is applied or observed (as CockroachDB's --max-offset).
    pub max_clock_offset_ms: u64,
    /// Units one AskStock can obtain at most.
    pub grant_units_max: u64,
    /// One grant per asking DC and SKU per this interval at most.
    pub grant_interval_ms: u64,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            batch_len_max: 512,
            batches_inflight_max: 4,
            outbox_len_max: 100_000,
            probe_interval_ms: 100,
            dc_unhealthy_after_ms: 900,
            low_water_units: 10,
            reserve_units: 10,
            max_clock_offset_ms: 500,
            grant_units_max: 100,
            grant_interval_ms: 1000,
        }
    }
}

/// The embedded DNS server's defences (zone and TTL are in `[cluster]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    /// UDP responses per second per source netblock (IPv4 /24, IPv6 /56), and the burst
    /// a netblock may send at once; TCP is not limited.
    pub rrl_responses_per_s: u32,
    /// Every Nth rate-limited UDP response is sent empty and truncated (TC=1) so a real
    /// resolver retries over TCP; the others are dropped. 0 drops them all.
    pub rrl_slip: u32,
    /// Source netblocks the rate limiter tracks at most.
    pub rrl_sources_max: usize,
    /// Threads answering UDP, each on its own socket; 0: one per core but one (at least
    /// one, at most four).
    pub udp_workers: usize,
}

impl Default for DnsSection {
    fn default() -> Self {
        let d = crate::dns::RateLimit::default();
        DnsSection { rrl_responses_per_s: d.responses_per_s, rrl_slip: d.slip, rrl_sources_max: d.sources_max, udp_workers: 0 }
    }
}

impl WanSection {
    pub fn is_off(&self) -> bool {
        *self == WanSection::default()
    }

    /// Latencies in bounds, links between two distinct DCs of the cluster.
    pub fn check(&self, dcs: &[String]) -> Result<(), ConfigError> {
        if !(1..=1_000_000).contains(&self.queue_len_max) {
            return Err(invalid("wan.queue_len_max", "must be between 1 and 1000000"));
        }
        let delays = [("wan.latency_ms", self.latency_ms), ("wan.jitter_ms", self.jitter_ms)];
        let link_delays = self
            .links
            .iter()
            .enumerate()
            .flat_map(|(i, l)| [(format!("wan.link[{i}].latency_ms"), l.latency_ms), (format!("wan.link[{i}].jitter_ms"), l.jitter_ms)]);
        for (field, ms) in delays.into_iter().map(|(f, ms)| (f.to_string(), ms)).chain(link_delays) {
            if ms > WAN_DELAY_MS_MAX {
                return Err(invalid(field, format!("must be at most {WAN_DELAY_MS_MAX}")));
            }
        }
        for (i, l) in self.links.iter().enumerate() {
            if let Some(unknown) = l.dcs.iter().find(|d| !dcs.contains(d)) {
                return Err(invalid(format!("wan.link[{i}].dcs"), format!("unknown datacentre '{unknown}'")));
            }
            if l.dcs[0] == l.dcs[1] {
                return Err(invalid(format!("wan.link[{i}].dcs"), "names two different DCs"));
            }
        }
        Ok(())
    }
}

impl DnsSection {
    pub fn rate_limit(&self) -> crate::dns::RateLimit {
        crate::dns::RateLimit { responses_per_s: self.rrl_responses_per_s, slip: self.rrl_slip, sources_max: self.rrl_sources_max }
    }
}

/// WAN emulation: a delay the peer transport adds to every frame sent to another DC's
/// node, in each direction (a round trip takes twice `latency_ms`). For testing and
/// measuring on machines without netem; 0 (the default) adds nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WanSection {
    /// One-way latency between any two DCs, in ms.
    pub latency_ms: u64,
    /// Each frame's delay is `latency_ms` ± up to this much (uniform), in ms.
    pub jitter_ms: u64,
    /// Frames waiting for their delay on one connection at most; more are refused.
    pub queue_len_max: usize,
    /// Pairs of DCs with a latency of their own.
    #[serde(rename = "link")]
    pub links: Vec<WanLink>,
}

impl Default for WanSection {
    fn default() -> Self {
        WanSection { latency_ms: 0, jitter_ms: 0, queue_len_max: 4096, links: Vec::new() }
    }
}

/// `[[wan.link]] dcs = ["dc1", "dc3"]`: the latency between these two DCs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanLink {
    pub dcs: [String; 2],
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub jitter_ms: u64,
}

/// The longest WAN latency or jitter the cluster file may set: a minute.
pub const WAN_DELAY_MS_MAX: u64 = 60_000;

/// Most source netblocks the DNS rate limiter may track (a few tens of MB).
const RRL_SOURCES_MAX_LIMIT: usize = 1_000_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DcConfig {
    pub name: String,
    /// Addresses of this DC's nodes (and clients nearest to it): `a.b.c.d/len`.
    #[serde(default)]
    pub subnet: Option<String>,
    pub nodes: Vec<NodeConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Raft node id, unique in the cluster and stable for the node's life.
    pub id: NodeId,
    pub name: String,
    /// The node's address: where it listens and where the others reach it. A node gives
    /// either `ip` or `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// A DNS name the others reach the node by (a StatefulSet's stable pod name, a compose
    /// service), resolved again at every connection, so a node that comes back with a new
    /// address is found. The node listens on `bind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Where a node named by `host` listens; 0.0.0.0 (every interface) when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<IpAddr>,
    #[serde(default)]
    pub http_port: Option<u16>,
    #[serde(default)]
    pub peer_port: Option<u16>,
    #[serde(default)]
    pub dns_port: Option<u16>,
    #[serde(default)]
    pub admin_port: Option<u16>,
}

/// One node as the rest of the code sees it: names and addresses. For a node named by
/// `host`, the addresses are where it listens (its bind address) and `host` is how the
/// others reach it: see [`NodeInfo::authority`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: String,
    pub dc: String,
    pub host: Option<String>,
    pub http: SocketAddr,
    pub peer: SocketAddr,
    pub dns: SocketAddr,
    pub admin: SocketAddr,
}

impl NodeInfo {
    /// How the others reach one of this node's listeners: `host:port` for a node named by
    /// host, else `ip:port`. It is an URL's authority, and `TcpStream::connect` resolves it.
    pub fn authority(&self, listener: SocketAddr) -> String {
        match &self.host {
            Some(host) => format!("{host}:{}", listener.port()),
            None => listener.to_string(),
        }
    }

    /// The URL of the node's shop HTTP API.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.authority(self.http))
    }
}

impl ClusterConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.into(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml(DEFAULT_TOML, "embedded default"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                Self::from_toml(&text, &p.display().to_string())
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("cluster.name", &self.cluster.name)?;
        if !self.cluster.zone.ends_with('.') || self.cluster.zone.len() < 2 {
            return Err(invalid("cluster.zone", "must be a fully qualified name ending in '.'"));
        }
        if !(1..=SHARDS_MAX).contains(&self.cluster.shards) {
            return Err(invalid("cluster.shards", format!("must be 1..={SHARDS_MAX}")));
        }
        if ![0, 1, 3, 5].contains(&self.cluster.replicas) {
            return Err(invalid("cluster.replicas", "must be 0 (every node holds every shard), 1, 3 or 5"));
        }
        for (field, value) in [("replace_dead_after_s", self.cluster.replace_dead_after_s), ("rebalance_after_s", self.cluster.rebalance_after_s)] {
            if value > MOVE_AFTER_S_MAX {
                return Err(invalid(format!("cluster.{field}"), format!("must be 0 (never) or at most {MOVE_AFTER_S_MAX} s")));
            }
        }
        self.check_raft()?;
        self.check_storage()?;
        self.check_limits()?;
        self.check_dns()?;
        if self.dcs.is_empty() {
            return Err(invalid("dc", "at least one datacentre is required"));
        }
        let mut dc_names = BTreeSet::new();
        for (i, dc) in self.dcs.iter().enumerate() {
            let field = format!("dc[{i}]");
            check_name(&format!("{field}.name"), &dc.name)?;
            if !dc_names.insert(dc.name.as_str()) {
                return Err(invalid(format!("{field}.name"), format!("duplicate datacentre '{}'", dc.name)));
            }
            // Every node holds shard 0, and without `replicas` every shard: a Raft group of
            // 1, 3 or 5. With shards on subsets, a DC grows by any number of nodes.
            let sizes_ok = match self.cluster.replicas {
                0 => [1, 3, 5].contains(&dc.nodes.len()),
                _ => (1..=DC_NODES_MAX).contains(&dc.nodes.len()),
            };
            if !sizes_ok {
                let allowed = if self.cluster.replicas == 0 { "1, 3 or 5 (any number up to 15 with cluster.replicas set)" } else { "1 to 15" };
                return Err(invalid(format!("{field}.nodes"), format!("a DC has {allowed} nodes, not {}", dc.nodes.len())));
            }
            if let Some(subnet) = &dc.subnet {
                let (net, len) = parse_cidr(subnet).map_err(|m| invalid(format!("{field}.subnet"), m))?;
                // Nodes named by host get their addresses at start: only fixed ones are checked.
                for (j, ip) in dc.nodes.iter().enumerate().filter_map(|(j, n)| n.ip.map(|ip| (j, ip))) {
                    if !cidr_contains(net, len, ip) {
                        return Err(invalid(format!("{field}.nodes[{j}].ip"), format!("{ip} is outside the DC's subnet {subnet}")));
                    }
                }
            }
        }
        self.check_nodes()?;
        self.wan.check(&self.dc_names())
    }

    /// What sled accepts, checked here so that a bad value is a config error at start,
    /// not a failure to open the data dir.
    fn check_storage(&self) -> Result<(), ConfigError> {
        let st = &self.storage;
        if st.sled_segment_bytes != 0 && !(st.sled_segment_bytes.is_power_of_two() && (256..=1 << 24).contains(&st.sled_segment_bytes)) {
            return Err(invalid("storage.sled_segment_bytes", "must be 0 (sled's default) or a power of two from 256 to 16 MiB"));
        }
        if !SLED_COMPRESSION_LEVELS.contains(&st.sled_compression_level) {
            return Err(invalid("storage.sled_compression_level", "must be 0 (off), a zstd level from 1 to 22, or a fast one from -1 to -7"));
        }
        Ok(())
    }

    fn check_raft(&self) -> Result<(), ConfigError> {
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return Err(invalid("raft.heartbeat_interval_ms", "must be > 0"));
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err(invalid("raft.election_timeout_min_ms", "must be greater than heartbeat_interval_ms"));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid("raft.election_timeout_max_ms", "must be greater than election_timeout_min_ms"));
        }
        if r.snapshot_logs_since_last == 0 {
            return Err(invalid("raft.snapshot_logs_since_last", "must be > 0"));
        }
        if r.proposals_inflight_max == 0 {
            return Err(invalid("raft.proposals_inflight_max", "must be > 0"));
        }
        if r.proposal_batch_len_max == 0 {
            return Err(invalid("raft.proposal_batch_len_max", "must be > 0"));
        }
        if r.proposal_queue_len_max < r.proposal_batch_len_max {
            return Err(invalid("raft.proposal_queue_len_max", "must be at least proposal_batch_len_max"));
        }
        if r.term_jump_max == 0 {
            return Err(invalid("raft.term_jump_max", "must be > 0"));
        }
        if r.snapshot_bytes_max < 4096 {
            return Err(invalid("raft.snapshot_bytes_max", "must be at least 4096"));
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let positive = [
            ("limits.body_bytes_max", l.body_bytes_max as u64),
            ("limits.request_timeout_ms", l.request_timeout_ms),
            ("limits.peer_request_timeout_ms", l.peer_request_timeout_ms),
            ("limits.peer_inflight_max", l.peer_inflight_max as u64),
            ("limits.peer_backoff_max_ms", l.peer_backoff_max_ms),
            ("limits.cache_entities_max", l.cache_entities_max as u64),
            ("limits.mailbox_len_max", l.mailbox_len_max as u64),
            ("limits.idempotency_ttl_s", l.idempotency_ttl_s),
            ("limits.session_ttl_s", l.session_ttl_s),
            ("limits.expiry_interval_ms", l.expiry_interval_ms),
            ("limits.expiry_batch_len_max", l.expiry_batch_len_max as u64),
            ("limits.http_conns_max", l.http_conns_max as u64),
            ("limits.http_conns_per_source_max", l.http_conns_per_source_max as u64),
            ("limits.http_idle_timeout_ms", l.http_idle_timeout_ms),
            ("limits.http_header_timeout_ms", l.http_header_timeout_ms),
            ("limits.http_request_timeout_ms", l.http_request_timeout_ms),
            ("limits.peer_conns_max", l.peer_conns_max as u64),
            ("limits.peer_conns_per_source_max", l.peer_conns_per_source_max as u64),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be > 0"));
            }
        }
        let r = &self.replication;
        for (field, v) in [
            ("replication.batch_len_max", r.batch_len_max as u64),
            ("replication.batches_inflight_max", r.batches_inflight_max as u64),
            ("replication.outbox_len_max", r.outbox_len_max),
            ("replication.probe_interval_ms", r.probe_interval_ms),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be > 0"));
            }
        }
        if r.batch_len_max > crate::domain::apply::REMOTE_BATCH_LEN_MAX {
            return Err(invalid("replication.batch_len_max", format!("must be at most {}", crate::domain::apply::REMOTE_BATCH_LEN_MAX)));
        }
        if r.batches_inflight_max > BATCHES_INFLIGHT_MAX {
            return Err(invalid("replication.batches_inflight_max", format!("must be at most {BATCHES_INFLIGHT_MAX}")));
        }
        if r.dc_unhealthy_after_ms <= r.probe_interval_ms {
            return Err(invalid("replication.dc_unhealthy_after_ms", "must be greater than probe_interval_ms"));
        }
        // Milliseconds in 48 bits of an HLC: a longer TTL would never expire anything.
        const TTL_S_MAX: u64 = 100 * 365 * 24 * 3600;
        for (field, v) in [("limits.idempotency_ttl_s", l.idempotency_ttl_s), ("limits.session_ttl_s", l.session_ttl_s)] {
            if v > TTL_S_MAX {
                return Err(invalid(field, format!("must be at most {TTL_S_MAX} (100 years)")));
            }
        }
        let memory_min = self.storage.sled_cache_bytes_max.saturating_add(MEMORY_HEADROOM_BYTES);
        if l.memory_bytes_max < memory_min {
            return Err(invalid(
                "limits.memory_bytes_max",
                format!("must be at least storage.sled_cache_bytes_max + {} MiB: {memory_min}", MEMORY_HEADROOM_BYTES >> 20),
            ));
        }
        if l.expiry_batch_len_max > 100_000 {
            return Err(invalid("limits.expiry_batch_len_max", "must be at most 100000 (one pass is one Raft entry)"));
        }
        self.check_door()?;
        self.check_frame()
    }

    /// Connection caps and timeouts at the HTTP and peer ports.
    fn check_door(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.http_conns_per_source_max > l.http_conns_max {
            return Err(invalid("limits.http_conns_per_source_max", "must be at most http_conns_max"));
        }
        if l.peer_conns_per_source_max > l.peer_conns_max {
            return Err(invalid("limits.peer_conns_per_source_max", "must be at most peer_conns_max"));
        }
        if l.http_request_timeout_ms < l.request_timeout_ms {
            return Err(invalid("limits.http_request_timeout_ms", "must be at least request_timeout_ms (the node's own timeouts answer first)"));
        }
        if l.http_idle_timeout_ms <= l.http_request_timeout_ms {
            return Err(invalid("limits.http_idle_timeout_ms", "must be greater than http_request_timeout_ms"));
        }
        if l.http_header_timeout_ms > l.http_idle_timeout_ms {
            return Err(invalid("limits.http_header_timeout_ms", "must be at most http_idle_timeout_ms"));
        }
        // Idle peer connections carry Raft heartbeats and cross-DC probes: a timeout
        // near their interval would cut live links and race requests with the close.
        let chatty = self.raft.heartbeat_interval_ms.max(self.replication.probe_interval_ms);
        if l.peer_idle_timeout_ms < 10 * chatty {
            return Err(invalid(
                "limits.peer_idle_timeout_ms",
                format!("must be at least 10 times the Raft heartbeat and probe intervals ({} ms)", 10 * chatty),
            ));
        }
        if l.peer_idle_timeout_ms <= l.peer_request_timeout_ms {
            return Err(invalid("limits.peer_idle_timeout_ms", "must be greater than peer_request_timeout_ms"));
        }
        Ok(())
    }

    fn check_dns(&self) -> Result<(), ConfigError> {
        let d = &self.dns;
        if d.rrl_responses_per_s == 0 {
            return Err(invalid("dns.rrl_responses_per_s", "must be > 0"));
        }
        if !(2..=RRL_SOURCES_MAX_LIMIT).contains(&d.rrl_sources_max) {
            return Err(invalid("dns.rrl_sources_max", format!("must be between 2 and {RRL_SOURCES_MAX_LIMIT}")));
        }
        if d.udp_workers > crate::dns::UDP_WORKERS_MAX {
            return Err(invalid("dns.udp_workers", format!("must be at most {}", crate::dns::UDP_WORKERS_MAX)));
        }
        Ok(())
    }

    /// The frame limit must carry the largest message the configuration makes: a snapshot
    /// chunk, a cross-DC batch, one Raft entry (a batch of client requests, or a remote
    /// batch applied through the log).
    fn check_frame(&self) -> Result<(), ConfigError> {
        use crate::transport::frame::{EVENT_BYTES_MAX, FRAME_BYTES_MAX, FRAME_OVERHEAD_BYTES};
        let frame = self.limits.peer_frame_bytes_max;
        if frame < 64 * 1024 {
            return Err(invalid("limits.peer_frame_bytes_max", "must be at least 65536"));
        }
        if frame > FRAME_BYTES_MAX {
            return Err(invalid("limits.peer_frame_bytes_max", format!("must be at most {FRAME_BYTES_MAX} (the decoder's bound)")));
        }
        let chunk = usize::try_from(self.raft.snapshot_chunk_bytes_max).unwrap_or(usize::MAX);
        if chunk.saturating_add(FRAME_OVERHEAD_BYTES) > frame {
            return Err(invalid("limits.peer_frame_bytes_max", format!("must hold a snapshot chunk: raft.snapshot_chunk_bytes_max + {FRAME_OVERHEAD_BYTES}")));
        }
        let entry = self.raft_entry_bytes_max();
        let batch = self.replication.batch_len_max.saturating_mul(EVENT_BYTES_MAX).saturating_add(FRAME_OVERHEAD_BYTES);
        if entry.max(batch).saturating_add(FRAME_OVERHEAD_BYTES) > frame {
            return Err(invalid(
                "limits.peer_frame_bytes_max",
                format!(
                    "must hold {} bytes: a Raft entry of raft.proposal_batch_len_max requests or a cross-DC batch of replication.batch_len_max events",
                    entry.max(batch) + FRAME_OVERHEAD_BYTES
                ),
            ));
        }
        Ok(())
    }

    /// The largest Raft entry the configuration makes: a batch of client requests, or a
    /// cross-DC batch (or a page of another DC's state, no larger).
    pub fn raft_entry_bytes_max(&self) -> usize {
        use crate::transport::frame::{EVENT_BYTES_MAX, REQUEST_BYTES_MAX};
        let requests = self.raft.proposal_batch_len_max.saturating_mul(REQUEST_BYTES_MAX);
        let events = self.replication.batch_len_max.saturating_mul(EVENT_BYTES_MAX);
        requests.max(events)
    }

    /// Bytes of Raft entries one AppendEntries may carry: a frame, less the room for what
    /// surrounds them. The log reader stops a request's entries there, whatever range
    /// openraft asks for.
    pub fn raft_payload_bytes_max(&self) -> usize {
        self.limits.peer_frame_bytes_max.saturating_sub(crate::transport::frame::FRAME_OVERHEAD_BYTES)
    }

    /// Raft entries per AppendEntries, so that one of the largest entries still fits in a
    /// frame (openraft's default is 300).
    pub fn raft_payload_entries_max(&self) -> u64 {
        ((self.raft_payload_bytes_max() / self.raft_entry_bytes_max().max(1)) as u64).clamp(1, 300)
    }

    /// Unique ids, names and listen addresses across the whole cluster.
    fn check_nodes(&self) -> Result<(), ConfigError> {
        let mut ids = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, dc) in self.dcs.iter().enumerate() {
            for (j, n) in dc.nodes.iter().enumerate() {
                let field = format!("dc[{i}].nodes[{j}]");
                check_name(&format!("{field}.name"), &n.name)?;
                if n.id == 0 {
                    return Err(invalid(format!("{field}.id"), "must be > 0"));
                }
                if !ids.insert(n.id) {
                    return Err(invalid(format!("{field}.id"), format!("duplicate node id {}", n.id)));
                }
                if !names.insert(n.name.as_str()) {
                    return Err(invalid(format!("{field}.name"), format!("duplicate node '{}'", n.name)));
                }
                check_address(&field, n)?;
                let info = self.info(dc, n);
                let mut listeners = vec![("http", info.http), ("peer", info.peer), ("dns", info.dns)];
                // On its own host's 127.0.0.1, a node's admin port clashes with no other node.
                if info.admin.ip() == info.http.ip() {
                    listeners.push(("admin", info.admin));
                }
                for (what, addr) in listeners {
                    if addr.port() == 0 {
                        return Err(invalid(format!("{field}.{what}_port"), "port 0 is not allowed"));
                    }
                    // A node listening on every interface (named by host, no bind) has a
                    // machine of its own (a pod, a container): only set addresses can clash.
                    // DNS uses UDP as well, but its TCP listener clashes the same way.
                    if !addr.ip().is_unspecified() && !addrs.insert(addr) {
                        return Err(invalid(format!("{field}.{what}_port"), format!("port clash: {addr} is used twice")));
                    }
                }
            }
        }
        Ok(())
    }

    fn info(&self, dc: &DcConfig, n: &NodeConfig) -> NodeInfo {
        let ip = n.ip.or(n.bind).unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        NodeInfo {
            id: n.id,
            name: n.name.clone(),
            dc: dc.name.clone(),
            host: n.host.clone(),
            http: SocketAddr::new(ip, n.http_port.unwrap_or(self.ports.http)),
            peer: SocketAddr::new(ip, n.peer_port.unwrap_or(self.ports.peer)),
            dns: SocketAddr::new(ip, n.dns_port.unwrap_or(self.ports.dns)),
            admin: SocketAddr::new(self.admin_ip(ip), n.admin_port.unwrap_or(self.ports.admin)),
        }
    }

    fn admin_ip(&self, node_ip: IpAddr) -> IpAddr {
        match self.admin.listen {
            AdminListen::Node => node_ip,
            AdminListen::Loopback if node_ip.is_loopback() => node_ip,
            AdminListen::Loopback if node_ip.is_ipv6() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            AdminListen::Loopback => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        }
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.dcs.iter().flat_map(|dc| dc.nodes.iter().map(move |n| self.info(dc, n))).collect()
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes().into_iter().map(|n| n.name).collect()
    }

    pub fn node(&self, name: &str) -> Option<NodeInfo> {
        self.nodes().into_iter().find(|n| n.name == name)
    }

    pub fn node_by_id(&self, id: NodeId) -> Option<NodeInfo> {
        self.nodes().into_iter().find(|n| n.id == id)
    }

    pub fn dc_names(&self) -> Vec<String> {
        self.dcs.iter().map(|d| d.name.clone()).collect()
    }

    pub fn dc_nodes(&self, dc: &str) -> Vec<NodeInfo> {
        self.nodes().into_iter().filter(|n| n.dc == dc).collect()
    }

    /// The shards entities live in: every shard, or — with shards on subsets of the
    /// nodes — all but shard 0, which is on every node and holds only the DC's settings
    /// (so that no entity pays for a replica on every node).
    pub fn spread(&self) -> crate::ids::Spread {
        let first = u16::from(self.cluster.replicas > 0 && self.cluster.shards > 1);
        crate::ids::Spread { count: self.cluster.shards, first }
    }

    /// The nodes of `dc` that hold shard `shard` when the DC first starts, the one meant
    /// to lead it first: node `shard` mod n, then the ones after it in the DC's order,
    /// `cluster.replicas` of them (all, for shard 0 or `replicas = 0`). Membership
    /// changes may move replicas later; this is only where they begin.
    pub fn shard_placement(&self, dc: &str, shard: u16) -> Vec<NodeInfo> {
        let nodes = self.dc_nodes(dc);
        let n = nodes.len();
        let wanted = usize::from(self.cluster.replicas);
        let count = if shard == 0 || wanted == 0 { n } else { wanted.min(n) };
        let start = usize::from(shard) % n.max(1);
        (0..count).map(|i| nodes[(start + i) % n].clone()).collect()
    }

    /// The DC an order id or session token names (`<dc>-<random>`), if it names a
    /// configured DC (the longest such prefix). Tokens made before tokens named their DC
    /// (bare hex) name none.
    pub fn owner_of(&self, id: &str) -> Option<String> {
        self.dcs
            .iter()
            .map(|d| &d.name)
            .filter(|d| id.len() > d.len() + 1 && id.starts_with(d.as_str()) && id.as_bytes()[d.len()] == b'-')
            .max_by_key(|d| d.len())
            .cloned()
    }
}

/// A node gives `ip` or `host` (a DNS name), not both; `bind` goes with `host` only.
fn check_address(field: &str, n: &NodeConfig) -> Result<(), ConfigError> {
    match (&n.ip, &n.host) {
        (Some(_), Some(_)) => Err(invalid(format!("{field}.host"), "give ip or host, not both")),
        (None, None) => Err(invalid(format!("{field}.ip"), "a node needs an ip or a host")),
        (Some(_), None) if n.bind.is_some() => Err(invalid(format!("{field}.bind"), "bind goes with host (a node with an ip listens on it)")),
        (Some(_), None) => Ok(()),
        (None, Some(host)) if is_host_name(host) => Ok(()),
        (None, Some(host)) => {
            Err(invalid(format!("{field}.host"), format!("'{host}' is not a DNS name (labels of a-z, 0-9 and '-', dot-separated, 253 chars at most)")))
        }
    }
}

/// A DNS host name: dot-separated labels of 1-63 letters, digits and '-', not starting
/// or ending with '-', 253 characters at most (a final dot allowed).
fn is_host_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok =
        |l: &str| (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-');
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

/// Names (cluster, DC, node) go into URLs, ids, file names and DNS labels.
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty() && name.len() <= 63 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("'{name}' must be 1-63 chars of a-z, 0-9 and '-', not starting with '-'")))
    }
}

pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = s.split_once('/').ok_or_else(|| format!("'{s}' is not a.b.c.d/len"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("'{ip}' is not an IP address"))?;
    let len: u8 = len.parse().map_err(|_| format!("'{len}' is not a prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} is over {max}"));
    }
    Ok((ip, len))
}

pub fn cidr_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(edit: impl Fn(&str) -> String, expected: &str) {
        let text = edit(DEFAULT_TOML);
        let err = ClusterConfig::from_toml(&text, "test").expect_err("config should be rejected");
        assert!(err.to_string().contains(expected), "error {err:?} should mention {expected:?}");
    }

    #[test]
    fn embedded_default_is_three_by_three() {
        let c = ClusterConfig::load(None).unwrap();
        assert_eq!(c.dcs.len(), 3);
        assert_eq!(c.nodes().len(), 9);
        let n = c.node("dc2-n3").unwrap();
        assert_eq!(n.http.to_string(), "127.0.2.3:8080");
        assert_eq!(n.peer.to_string(), "127.0.2.3:7070");
    }

    #[test]
    fn shipped_files_are_valid() {
        for f in ["local.toml", "single-dc.toml", "five-node.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster").join(f);
            ClusterConfig::load(Some(&path)).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn bad_configs_name_the_problem() {
        check_err(|t| t.replace("name = \"dc1-n2\"", "name = \"dc1-n1\""), "duplicate node 'dc1-n1'");
        check_err(|t| t.replace("id = 102", "id = 101"), "duplicate node id 101");
        check_err(|t| t.replace("127.0.1.3\" }", "127.0.9.3\" }"), "dc[0].nodes[2].ip");
        check_err(|t| t.replace("ip = \"127.0.1.2\" }", "ip = \"127.0.1.1\" }"), "port clash");
        check_err(|t| t.replace("dns_ttl_s = 5", "dns_ttl_s = 5\ncolour = 1"), "unknown field `colour`");
        check_err(|t| t.replace("election_timeout_min_ms = 200", "election_timeout_min_ms = 40"), "raft.election_timeout_min_ms");
        check_err(|t| t.replace("name = \"dc2\"", "name = \"DC 2\""), "dc[1].name");
        check_err(|t| t.replace("durability = \"fsync\"", "durability = \"maybe\""), "durability");
        check_err(|t| t.replace("sled_compression_level = 1", "sled_compression_level = 23"), "storage.sled_compression_level");
        check_err(|t| t.replace("sled_compression_level = 1", "sled_compression_level = -8"), "storage.sled_compression_level");
        check_err(|t| t.replace("durability = \"fsync\"", "durability = \"fsync\"\nsled_segment_bytes = 1000"), "storage.sled_segment_bytes");
        check_err(|t| t.replace("rrl_responses_per_s = 1000", "rrl_responses_per_s = 0"), "dns.rrl_responses_per_s");
        check_err(|t| t.replace("rrl_sources_max = 20000", "rrl_sources_max = 1"), "dns.rrl_sources_max");
        check_err(|t| t.replace("udp_workers = 0", "udp_workers = 17"), "dns.udp_workers");
        check_err(|t| t.replace("rrl_slip = 2", "rrl_slip = 2\nrrl_window_s = 1"), "unknown field `rrl_window_s`");
        check_err(|t| t.replace("session_ttl_s = 86400", "session_ttl_s = 0"), "limits.session_ttl_s");
        check_err(|t| t.replace("idempotency_ttl_s = 86400", "idempotency_ttl_s = 99999999999"), "limits.idempotency_ttl_s");
        check_err(|t| t.replace("expiry_batch_len_max = 1000", "expiry_batch_len_max = 0"), "limits.expiry_batch_len_max");
        check_err(|t| t.replace("memory_bytes_max = 1073741824", "memory_bytes_max = 300000000"), "limits.memory_bytes_max");
        check_err(|t| t.replace("memory_bytes_max = 1073741824", "memory_bytes_max = 671088639"), "sled_cache_bytes_max + 384 MiB");
    }

    #[test]
    fn shards_are_placed_on_replicas_in_turn() {
        let text = DEFAULT_TOML.replace("[cluster]", "[cluster]\nshards = 4\nreplicas = 1");
        let c = ClusterConfig::from_toml(&text, "test").unwrap();
        let names = |shard| c.shard_placement("dc2", shard).into_iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(names(0), ["dc2-n1", "dc2-n2", "dc2-n3"], "shard 0 on every node");
        assert_eq!(names(1), ["dc2-n2"]);
        assert_eq!(names(2), ["dc2-n3"]);
        assert_eq!(names(3), ["dc2-n1"]);
        // As many replicas as nodes, or none asked: every node, the preferred leader first.
        for replicas in ["replicas = 3", "replicas = 0"] {
            let c = ClusterConfig::from_toml(&text.replace("replicas = 1", replicas), "test").unwrap();
            let names: Vec<String> = c.shard_placement("dc1", 2).into_iter().map(|n| n.name).collect();
            assert_eq!(names, ["dc1-n3", "dc1-n1", "dc1-n2"], "{replicas}");
        }
        check_err(|t| t.replace("[cluster]", "[cluster]\nreplicas = 2"), "cluster.replicas");
        check_err(|t| t.replace("[cluster]", "[cluster]\nreplace_dead_after_s = 604801"), "cluster.replace_dead_after_s");
        check_err(|t| t.replace("[cluster]", "[cluster]\nrebalance_after_s = 604801"), "cluster.rebalance_after_s");
    }

    #[test]
    fn nodes_named_by_host_listen_on_bind_and_are_reached_by_name() {
        let text = DEFAULT_TOML
            .replace("ip = \"127.0.1.2\"", "host = \"dc1-2.agora-dc1\"")
            .replace("ip = \"127.0.1.3\"", "host = \"n3.example\", bind = \"127.0.1.3\"");
        let c = ClusterConfig::from_toml(&text, "test").unwrap();
        let (any, bound) = (c.node("dc1-n2").unwrap(), c.node("dc1-n3").unwrap());
        assert_eq!(any.http.to_string(), "0.0.0.0:8080", "no bind: every interface");
        assert_eq!(any.admin.to_string(), "127.0.0.1:9090", "the admin API stays on loopback");
        assert_eq!(any.authority(any.peer), "dc1-2.agora-dc1:7070");
        assert_eq!(any.http_url(), "http://dc1-2.agora-dc1:8080");
        assert_eq!(bound.peer.to_string(), "127.0.1.3:7070");
        assert_eq!(bound.authority(bound.peer), "n3.example:7070");
        let fixed = c.node("dc1-n1").unwrap();
        assert_eq!(fixed.authority(fixed.peer), "127.0.1.1:7070");
        // Written back out, the file keeps host and bind and has no ip for them.
        let again = ClusterConfig::from_toml(&toml::to_string(&c).unwrap(), "round trip").unwrap();
        assert_eq!(again.node("dc1-n3").unwrap(), bound);
    }

    #[test]
    fn node_addresses_are_checked() {
        let named = |host: &str| DEFAULT_TOML.replace("ip = \"127.0.1.2\"", host);
        for (edit, expected) in [
            (named("ip = \"127.0.1.2\", host = \"a.b\""), "give ip or host, not both"),
            (named("host = \"bad_name.example\""), "is not a DNS name"),
            (named("host = \"-x.example\""), "is not a DNS name"),
            (named(&format!("host = \"{}\"", "a.".repeat(130))), "is not a DNS name"),
            (DEFAULT_TOML.replace("ip = \"127.0.1.2\" }", "ip = \"127.0.1.2\", bind = \"127.0.1.2\" }"), "bind goes with host"),
        ] {
            let err = ClusterConfig::from_toml(&edit, "test").expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} should say {expected:?}");
        }
        let no_address = DEFAULT_TOML.replace("ip = \"127.0.1.2\", ", "").replace(", ip = \"127.0.1.2\"", "");
        let err = ClusterConfig::from_toml(&no_address, "test").expect_err("no address");
        assert!(err.to_string().contains("needs an ip or a host"), "{err}");
    }

    #[test]
    fn wan_latencies_are_checked() {
        // The section goes before the first DC (a TOML table after [[dc]] would nest in it).
        let wan = |section: &'static str| move |t: &str| t.replacen("[[dc]]", &format!("{section}\n\n[[dc]]"), 1);
        check_err(wan("[wan]\nlatency_ms = 60001"), "wan.latency_ms");
        check_err(wan("[wan]\nqueue_len_max = 0"), "wan.queue_len_max");
        check_err(wan("[[wan.link]]\ndcs = [\"dc1\", \"dc9\"]"), "unknown datacentre 'dc9'");
        check_err(wan("[[wan.link]]\ndcs = [\"dc2\", \"dc2\"]"), "two different DCs");
        check_err(wan("[[wan.link]]\ndcs = [\"dc1\", \"dc2\"]\njitter_ms = 70000"), "wan.link[0].jitter_ms");
        let ok = DEFAULT_TOML.replacen("[[dc]]", "[wan]\nlatency_ms = 80\n[[wan.link]]\ndcs = [\"dc1\", \"dc3\"]\nlatency_ms = 150\n\n[[dc]]", 1);
        let c = ClusterConfig::from_toml(&ok, "wan").expect("a valid [wan]");
        assert_eq!(c.wan.link("dc3", "dc1").latency_ms, 150);
        let back = ClusterConfig::from_toml(&toml::to_string(&c).unwrap(), "round trip").unwrap();
        assert_eq!(back.wan, c.wan, "[wan] survives the launcher's rewrite of the cluster file");
    }

    #[test]
    fn door_and_frame_limits_are_checked() {
        check_err(|t| t.replace("peer_idle_timeout_ms = 60000", "peer_idle_timeout_ms = 500"), "limits.peer_idle_timeout_ms");
        check_err(|t| t.replace("http_conns_per_source_max = 512", "http_conns_per_source_max = 9000"), "limits.http_conns_per_source_max");
        check_err(|t| t.replace("http_idle_timeout_ms = 60000", "http_idle_timeout_ms = 5000"), "limits.http_idle_timeout_ms");
        check_err(|t| t.replace("http_conns_max = 8192", "http_conns_max = 0"), "limits.http_conns_max");
        check_err(|t| t.replace("snapshot_chunk_bytes_max = 1048576", "snapshot_chunk_bytes_max = 67108864"), "snapshot chunk");
        check_err(
            |t| {
                t.replace("peer_frame_bytes_max = 67108864", "peer_frame_bytes_max = 300000")
                    .replace("snapshot_chunk_bytes_max = 1048576", "snapshot_chunk_bytes_max = 65536")
            },
            "cross-DC batch",
        );
        check_err(|t| t.replace("peer_frame_bytes_max = 67108864", "peer_frame_bytes_max = 134217728"), "decoder's bound");
        check_err(|t| t.replace("proposal_queue_len_max = 10000", "proposal_queue_len_max = 10"), "raft.proposal_queue_len_max");
        let c = ClusterConfig::load(None).unwrap();
        assert!(c.raft_payload_entries_max() >= 32, "{}", c.raft_payload_entries_max());
    }
}
