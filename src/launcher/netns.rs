//! Netns backend (Linux, root): every node in its own network namespace, on the address
//! plan 10.77.<dc>.<n>. Each DC has a router namespace holding the DC's bridge (`lan`,
//! gateway 10.77.<dc>.254); the routers meet on a WAN bridge (10.77.0.0/24) in a namespace
//! of its own, and the host joins that bridge at 10.77.0.254 so the launcher, curl and
//! tests reach every node. Nothing but one veth (`ag-<tag>`) and its routes sits in the
//! host's namespace: the bridges stay out of reach of the host's (docker's) firewall.
//!
//! ```text
//!  host 10.77.0.254 ── [wan bridge] ── r-dc1 (10.77.0.1) ── [lan 10.77.1.254] ── dc1-n1 10.77.1.1 …
//!                                   └─ r-dc2 (10.77.0.2) ── [lan 10.77.2.254] ── dc2-n1 10.77.2.1 …
//! ```
//! WAN latency is netem on each router's WAN port: traffic between DCs (and to the host)
//! is delayed once per direction.

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::state::{Meta, StateDir};
use super::{exec, exec_args, position, process, readdress, Runtime};
use crate::config::ClusterConfig;

const NET_A: u8 = 10;
const NET_B: u8 = 77;

pub struct Netns {
    tag: String,
}

impl Netns {
    pub fn new(st: &StateDir) -> Netns {
        Netns { tag: st.tag() }
    }

    fn prefix(&self) -> String {
        format!("agora-{}-", self.tag)
    }
    fn node_ns(&self, node: &str) -> String {
        format!("{}{node}", self.prefix())
    }
    fn router_ns(&self, dc: &str) -> String {
        format!("{}r-{dc}", self.prefix())
    }
    fn wan_ns(&self) -> String {
        format!("{}wan", self.prefix())
    }
    /// The host's end of the WAN link (interface names are at most 15 bytes).
    fn host_link(&self) -> String {
        format!("ag-{}", self.tag)
    }

    fn add_ns(&self, name: &str) -> Result<()> {
        exec_args(&["ip", "netns", "add", name])?;
        exec_args(&["ip", "-n", name, "link", "set", "lo", "up"]).map(|_| ())
    }

    fn create_wan(&self) -> Result<()> {
        let (wan, host) = (self.wan_ns(), self.host_link());
        self.add_ns(&wan)?;
        exec_args(&["ip", "-n", &wan, "link", "add", "wan", "type", "bridge"])?;
        exec_args(&["ip", "-n", &wan, "link", "set", "wan", "up"])?;
        exec_args(&["ip", "link", "add", &host, "type", "veth", "peer", "name", "host", "netns", &wan])?;
        exec_args(&["ip", "-n", &wan, "link", "set", "host", "master", "wan", "up"])?;
        exec_args(&["ip", "addr", "add", &format!("{NET_A}.{NET_B}.0.254/24"), "dev", &host])?;
        exec_args(&["ip", "link", "set", &host, "up"]).map(|_| ())
    }

    /// DC `d` (1-based): its router, its bridge, and the routes to it and from it.
    fn create_dc(&self, cfg: &ClusterConfig, d: usize) -> Result<()> {
        let dc = &cfg.dcs[d - 1].name;
        let (r, wan) = (self.router_ns(dc), self.wan_ns());
        self.add_ns(&r)?;
        let port = format!("r{d}");
        exec_args(&["ip", "-n", &r, "link", "add", "wan0", "type", "veth", "peer", "name", &port, "netns", &wan])?;
        exec_args(&["ip", "-n", &wan, "link", "set", &port, "master", "wan", "up"])?;
        exec_args(&["ip", "-n", &r, "addr", "add", &format!("{NET_A}.{NET_B}.0.{d}/24"), "dev", "wan0"])?;
        exec_args(&["ip", "-n", &r, "link", "set", "wan0", "up"])?;
        exec_args(&["ip", "-n", &r, "link", "add", "lan", "type", "bridge"])?;
        exec_args(&["ip", "-n", &r, "addr", "add", &format!("{NET_A}.{NET_B}.{d}.254/24"), "dev", "lan"])?;
        exec_args(&["ip", "-n", &r, "link", "set", "lan", "up"])?;
        exec_args(&["ip", "netns", "exec", &r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let host = self.host_link();
        exec_args(&["ip", "route", "add", &format!("{NET_A}.{NET_B}.{d}.0/24"), "via", &format!("{NET_A}.{NET_B}.0.{d}"), "dev", &host])?;
        for other in (1..=cfg.dcs.len()).filter(|o| *o != d) {
            exec_args(&["ip", "-n", &r, "route", "add", &format!("{NET_A}.{NET_B}.{other}.0/24"), "via", &format!("{NET_A}.{NET_B}.0.{other}")])?;
        }
        for n in &cfg.dcs[d - 1].nodes {
            self.create_node(cfg, &n.name)?;
        }
        Ok(())
    }

    fn create_node(&self, cfg: &ClusterConfig, node: &str) -> Result<()> {
        let (d, k) = position(cfg, node).context("node position")?;
        let info = cfg.node(node).context("node")?;
        let (ns, r) = (self.node_ns(node), self.router_ns(&cfg.dcs[d - 1].name));
        self.add_ns(&ns)?;
        let port = format!("n{k}");
        exec_args(&["ip", "-n", &r, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        exec_args(&["ip", "-n", &r, "link", "set", &port, "master", "lan", "up"])?;
        exec_args(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", info.http.ip()), "dev", "eth0"])?;
        exec_args(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        exec_args(&["ip", "-n", &ns, "route", "add", "default", "via", &format!("{NET_A}.{NET_B}.{d}.254")]).map(|_| ())
    }

    /// Namespaces of this state dir, found by their name prefix (which holds its tag).
    fn namespaces(&self) -> Result<Vec<String>> {
        let list = exec_args(&["ip", "netns", "list"])?;
        Ok(list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(&self.prefix())).map(String::from).collect())
    }
}

pub fn must_be_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the {what} backend needs root (it creates network namespaces and firewall rules)");
    }
    Ok(())
}

impl Runtime for Netns {
    fn derive_config(&self, user: &ClusterConfig) -> Result<ClusterConfig> {
        readdress(user, NET_A, NET_B)
    }

    /// The address plan must be free on the host: another netns cluster (another state
    /// dir) would own it.
    fn check_free(&self, _cfg: &ClusterConfig) -> Result<()> {
        must_be_root("netns")?;
        let used = exec_args(&["ip", "-o", "addr", "show", "to", &format!("{NET_A}.{NET_B}.0.0/16")])?;
        if !used.trim().is_empty() {
            bail!(
                "{NET_A}.{NET_B}.0.0/16 is already in use on this host (another netns cluster?): {}; nothing was started",
                used.split_whitespace().nth(1).unwrap_or("?")
            );
        }
        Ok(())
    }

    fn create(&self, _st: &StateDir, cfg: &ClusterConfig, _meta: &Meta) -> Result<()> {
        self.create_wan().context("create the WAN bridge")?;
        for d in 1..=cfg.dcs.len() {
            self.create_dc(cfg, d).with_context(|| format!("create {}'s namespaces", cfg.dcs[d - 1].name))?;
        }
        Ok(())
    }

    fn start(&self, st: &StateDir, _cfg: &ClusterConfig, node: &str) -> Result<()> {
        process::spawn_node(st, &self.net_prefix(st, node)?, node).map(|_| ())
    }

    /// Deleting the namespaces deletes their links, bridges, rules and qdiscs, and the
    /// host's end of the WAN link with its routes.
    fn destroy(&self, _st: &StateDir) -> Result<()> {
        for ns in self.namespaces()? {
            exec_args(&["ip", "netns", "del", &ns])?;
        }
        // Normally gone with the WAN namespace; a crash between the two steps of its creation leaves it.
        let _ = exec(Command::new("ip").args(["link", "del", &self.host_link()]));
        Ok(())
    }

    fn net_prefix(&self, _st: &StateDir, node: &str) -> Result<Vec<String>> {
        Ok(["ip", "netns", "exec", &self.node_ns(node)].map(String::from).to_vec())
    }

    fn set_latency(&self, _st: &StateDir, cfg: &ClusterConfig, ms: u64) -> Result<()> {
        for dc in &cfg.dcs {
            let prefix: Vec<String> = ["ip", "netns", "exec", &self.router_ns(&dc.name)].map(String::from).to_vec();
            super::partition::set_netem(&prefix, "wan0", ms).with_context(|| format!("set latency on {}'s router", dc.name))?;
        }
        Ok(())
    }
}
