//! The cluster file (`cluster/*.toml`): datacentres, nodes, ports, timeouts and limits.
//!
//! Parsed with `deny_unknown_fields` and checked by [`ClusterConfig::validate`] at start-up,
//! so a typo or an inconsistent topology stops the node with a message naming the field.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The embedded default: DESIGN §1's 3 DCs × 3 nodes on 127.0.{1,2,3}.{1,2,3}.
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
}

impl Default for Ports {
    fn default() -> Self {
        Ports { http: 8080, peer: 7070, dns: 8553 }
    }
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
    /// Entries kept in the log behind a snapshot, so slightly lagging followers catch up
    /// from the log instead of a snapshot.
    pub logs_to_keep_after_snapshot: u64,
    pub install_snapshot_timeout_ms: u64,
    pub snapshot_chunk_bytes_max: u64,
    /// Raft entries the leader has proposed and not yet applied; requests arriving while
    /// all are out share the next entry (one log append and fsync for all of them).
    pub proposals_inflight_max: usize,
    /// Client requests in one Raft entry at most.
    pub proposal_batch_len_max: usize,
    /// How far beyond this node's current term a Raft request's term may be; further is
    /// refused before openraft sees it (a term near `u64::MAX` made openraft overflow at
    /// the next election, and again after every restart). An honest node cut off from its
    /// DC raises its term once per election timeout (openraft 0.9 has no pre-vote): the
    /// default, 1,000,000, covers about 4.6 days of that at a 400 ms timeout.
    pub term_jump_max: u64,
    /// Largest snapshot a node accepts from its leader (bytes, summed over its chunks).
    /// Received snapshots are held in memory while they arrive.
    pub snapshot_bytes_max: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_logs_since_last: 5000,
            logs_to_keep_after_snapshot: 1000,
            install_snapshot_timeout_ms: 10_000,
            snapshot_chunk_bytes_max: 1 << 20,
            proposals_inflight_max: 1,
            proposal_batch_len_max: 256,
            term_jump_max: 1_000_000,
            snapshot_bytes_max: 2 << 30,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    pub durability: Durability,
    /// sled's page cache bound.
    pub sled_cache_bytes_max: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection { durability: Durability::Fsync, sled_cache_bytes_max: 256 << 20 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub body_bytes_max: usize,
    pub request_timeout_ms: u64,
    pub peer_request_timeout_ms: u64,
    pub peer_inflight_max: usize,
    pub peer_frame_bytes_max: usize,
    pub peer_backoff_max_ms: u64,
    pub cache_entities_max: usize,
    pub mailbox_len_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes_max: 16 * 1024,
            request_timeout_ms: 5000,
            peer_request_timeout_ms: 3000,
            peer_inflight_max: 1024,
            peer_frame_bytes_max: 64 << 20,
            peer_backoff_max_ms: 2000,
            cache_entities_max: 100_000,
            mailbox_len_max: 10_000,
        }
    }
}

/// Cross-DC replication, link health and rebalancing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    /// Events per shipped batch.
    pub batch_len_max: usize,
    /// Events kept for DCs that have not acknowledged them; a DC further behind catches
    /// up from a snapshot of the origin's state.
    pub outbox_len_max: u64,
    /// How often every node probes the other DCs, and the leader sends an empty batch
    /// when it has nothing to ship.
    pub probe_interval_ms: u64,
    /// A DC not heard from for this long counts as unreachable (status, DNS).
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
            outbox_len_max: 100_000,
            probe_interval_ms: 300,
            dc_unhealthy_after_ms: 2000,
            low_water_units: 10,
            reserve_units: 10,
            max_clock_offset_ms: 500,
            grant_units_max: 100,
            grant_interval_ms: 1000,
        }
    }
}

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
    pub ip: IpAddr,
    #[serde(default)]
    pub http_port: Option<u16>,
    #[serde(default)]
    pub peer_port: Option<u16>,
    #[serde(default)]
    pub dns_port: Option<u16>,
}

/// One node as the rest of the code sees it: names and resolved addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub name: String,
    pub dc: String,
    pub http: SocketAddr,
    pub peer: SocketAddr,
    pub dns: SocketAddr,
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
        self.check_raft()?;
        self.check_limits()?;
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
            if ![1, 3, 5].contains(&dc.nodes.len()) {
                return Err(invalid(format!("{field}.nodes"), format!("a DC has 1, 3 or 5 nodes, not {}", dc.nodes.len())));
            }
            if let Some(subnet) = &dc.subnet {
                let (net, len) = parse_cidr(subnet).map_err(|m| invalid(format!("{field}.subnet"), m))?;
                for (j, n) in dc.nodes.iter().enumerate() {
                    if !cidr_contains(net, len, n.ip) {
                        return Err(invalid(format!("{field}.nodes[{j}].ip"), format!("{} is outside the DC's subnet {subnet}", n.ip)));
                    }
                }
            }
        }
        self.check_nodes()
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
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be > 0"));
            }
        }
        let r = &self.replication;
        for (field, v) in [
            ("replication.batch_len_max", r.batch_len_max as u64),
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
        if r.dc_unhealthy_after_ms <= r.probe_interval_ms {
            return Err(invalid("replication.dc_unhealthy_after_ms", "must be greater than probe_interval_ms"));
        }
        if l.peer_frame_bytes_max < 64 * 1024 {
            return Err(invalid("limits.peer_frame_bytes_max", "must be at least 65536"));
        }
        Ok(())
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
                let info = self.info(dc, n);
                for (what, addr) in [("http", info.http), ("peer", info.peer), ("dns", info.dns)] {
                    if addr.port() == 0 {
                        return Err(invalid(format!("{field}.{what}_port"), "port 0 is not allowed"));
                    }
                    // DNS uses UDP as well, but its TCP listener clashes the same way.
                    if !addrs.insert(addr) {
                        return Err(invalid(format!("{field}.{what}_port"), format!("port clash: {addr} is used twice")));
                    }
                }
            }
        }
        Ok(())
    }

    fn info(&self, dc: &DcConfig, n: &NodeConfig) -> NodeInfo {
        NodeInfo {
            id: n.id,
            name: n.name.clone(),
            dc: dc.name.clone(),
            http: SocketAddr::new(n.ip, n.http_port.unwrap_or(self.ports.http)),
            peer: SocketAddr::new(n.ip, n.peer_port.unwrap_or(self.ports.peer)),
            dns: SocketAddr::new(n.ip, n.dns_port.unwrap_or(self.ports.dns)),
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
        check_err(|t| t.replace("election_timeout_min_ms = 400", "election_timeout_min_ms = 50"), "raft.election_timeout_min_ms");
        check_err(|t| t.replace("name = \"dc2\"", "name = \"DC 2\""), "dc[1].name");
        check_err(|t| t.replace("durability = \"fsync\"", "durability = \"maybe\""), "durability");
    }
}
