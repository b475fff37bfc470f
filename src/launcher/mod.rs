//! `agora cluster …`: launch a whole multi-DC cluster on this machine and drive it.
//!
//! - [`state`]: the state dir (`.agora/`): effective config, metadata, pid files, logs, data.
//! - [`process`]: nodes as local processes on 127.x addresses.
//! - [`netns`]: one network namespace per node, a bridge per DC, routers and a WAN bridge.
//! - [`docker`]: containers from a `FROM scratch` image, a network per DC plus a WAN network.
//! - [`table`]: node status from the HTTP API, the status table.
//! - [`partition`]: partitions (iptables DROP) and WAN latency by tc netem.
//! - [`wan`]: WAN latency by the nodes' own peer transport (`[wan]`, `PUT /v1/admin/wan`).
//! - [`manifests`]: docker compose and Kubernetes files generated from a cluster file.
//!
//! Nodes are always found through their pid files, never by process name, so two clusters
//! (two state dirs) on one machine never touch each other.

pub mod budget;
pub mod docker;
pub mod grow;
pub mod manifests;
pub mod netns;
pub mod partition;
pub mod process;
pub mod state;
pub mod table;
pub mod wan;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::config::{ClusterConfig, NodeInfo};
use state::{Meta, StateDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Local processes on the config's loopback IPs.
    Process,
    /// One Linux network namespace per node (root), IPs 10.77.<dc>.<n>.
    Netns,
    /// One container per node (docker engine), IPs 10.78.<dc>.<n>.
    Docker,
}

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// State directory for data dirs, logs and pid files [default: $AGORA_STATE_DIR, else .agora]
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: ClusterCmd,
}

#[derive(clap::Args)]
pub struct UpArgs {
    /// Cluster file (default: the embedded 3 DC × 3 node topology).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "process")]
    pub backend: Backend,
    /// Delete data dirs and logs of a previous run first.
    #[arg(long)]
    pub wipe: bool,
    /// One-way delay between DCs, in ms.
    #[arg(long, value_name = "MS")]
    pub wan_latency: Option<u64>,
    /// Each frame's delay varies by up to ± this, in ms (`--wan-via transport` only).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub wan_jitter: u64,
    /// What delays traffic between DCs: the nodes' peer transport (every backend, any
    /// kernel) or tc netem (netns and docker backends, kernels with sch_netem).
    #[arg(long, value_enum, default_value = "transport")]
    pub wan_via: wan::WanVia,
    /// How long to wait for every node to answer and every DC to elect a leader.
    #[arg(long, default_value_t = 90)]
    pub timeout_s: u64,
    /// Start the nodes with their test hooks on (`agora cluster clock`, fault rules, actor
    /// crashes through the admin API): for chaos runs, never for a shop (process and
    /// netns backends).
    #[arg(long)]
    pub enable_test_hooks: bool,
    /// Each node's CPU budget, in CPUs (e.g. 0.25), through a cgroup v1 cpu controller
    /// group per node: how one machine stands in for several (process and netns
    /// backends, root).
    #[arg(long, value_name = "CPUS")]
    pub cpus: Option<f64>,
    /// The period over which `--cpus` is counted, in ms. With 100 ms (docker's and
    /// Kubernetes' default) a node at 0.25 CPU that spent its 25 ms is frozen for the
    /// other 75 ms, and every Raft round trip to it waits; a shorter period spreads the
    /// same budget finely, closer to a slower machine that never stops.
    #[arg(long, value_name = "MS", default_value_t = budget::PERIOD_MS_DEFAULT, requires = "cpus")]
    pub cpu_period_ms: u64,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Start every node of the topology and wait for a leader in each DC.
    Up(UpArgs),
    /// Stop every node and remove the namespaces, links, rules, containers and networks made by `up`.
    Down {
        /// Also delete data dirs and logs.
        #[arg(long)]
        wipe: bool,
    },
    /// Live table from the nodes: role, term, commit index, health.
    Status {
        /// Print JSON (one object per node) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// SIGKILL a node (by its pid file).
    Kill { node: String },
    /// Stop a node if it runs, then start it again on the same data dir.
    Restart { node: String },
    /// SIGSTOP a node.
    Pause { node: String },
    /// SIGCONT a paused node.
    Resume { node: String },
    /// Print a node's log.
    Logs {
        node: String,
        /// Keep printing what the node logs.
        #[arg(short, long)]
        follow: bool,
        /// How many lines of the end of the log to print first.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// Drop packets between nodes or DCs (netns and docker backends).
    #[command(long_about = partition::PARTITION_HELP)]
    Partition {
        /// Node or DC names, or comma-separated lists of them: one group each.
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Remove every partition.
    Heal,
    /// Take a DC out of the DNS answers on every DC (a replicated operator setting).
    Drain { dc: String },
    /// Put a drained DC back into the DNS answers.
    Undrain { dc: String },
    /// Set a DC's share of the DNS rotation (0 takes it out, like a drain; at most 100).
    Weight { dc: String, weight: u32 },
    /// Add a node of the cluster file back to every Raft group (shard) of its DC: a learner
    /// that catches up, then a voter.
    AddNode { node: String },
    /// Add nodes the cluster file does not name to a DC (process backend): they join the
    /// file with the DC's next names, ids and addresses and get certificates, every
    /// running node restarts on the new file in turn, then they start and join the DC's
    /// shards as `add-node` makes them.
    Grow {
        dc: String,
        /// How many nodes (a DC whose every node holds every shard has 1, 3 or 5).
        #[arg(long, default_value_t = 1)]
        nodes: usize,
    },
    /// Take a node out of every Raft group of its DC (refused when fewer voters than a
    /// quorum of the DC's nodes would remain, unless --force).
    RemoveNode {
        node: String,
        #[arg(long)]
        force: bool,
    },
    /// Make a node's clock run SKEW_MS ahead (negative: behind); 0 puts it back. Needs
    /// `up --enable-test-hooks`.
    Clock {
        node: String,
        #[arg(allow_hyphen_values = true)]
        skew_ms: i64,
    },
    /// Make every disk sync of a node fail (`sync-error`: EIO, `full`: ENOSPC) or stop
    /// failing (`none`); a node whose sync failed acknowledges nothing until restarted.
    /// Needs `up --enable-test-hooks`.
    Disk { node: String, fault: crate::storage::DiskFault },
    /// Set the one-way delay between DCs on the running cluster, in ms (0 removes it), by
    /// what `up --wan-via` chose.
    Latency(wan::LatencyArgs),
    /// Write Kubernetes manifests (StatefulSet, headless Service, ConfigMap per DC).
    K8s(manifests::K8sArgs),
    /// Write a docker compose file for a cluster file.
    Compose(manifests::ComposeArgs),
}

/// What differs between backends; the commands in this module are written once on top.
pub trait Runtime {
    /// The config the nodes run with: the user's, or a copy on addresses of this backend.
    fn derive_config(&self, user: &ClusterConfig) -> Result<ClusterConfig> {
        // Processes on this host: the launcher reaches each node where it listens, and no
        // node may listen on every interface.
        if let Some(n) = user.dcs.iter().flat_map(|dc| &dc.nodes).find(|n| n.ip.is_none() && n.bind.is_none()) {
            bail!("node {}: named by host, it needs a bind address to run as a process here (or give it an ip)", n.name);
        }
        Ok(user.clone())
    }
    /// Fails, changing nothing, if the cluster cannot start here (port or subnet taken).
    fn check_free(&self, cfg: &ClusterConfig) -> Result<()>;
    /// Creates networks (namespaces, bridges, docker networks) before the nodes start.
    fn create(&self, _st: &StateDir, _cfg: &ClusterConfig, _meta: &Meta) -> Result<()> {
        Ok(())
    }
    fn start_all(&self, st: &StateDir, cfg: &ClusterConfig) -> Result<()> {
        cfg.node_names().iter().try_for_each(|n| self.start(st, cfg, n))
    }
    /// Starts one node and writes its pid file.
    fn start(&self, st: &StateDir, cfg: &ClusterConfig, node: &str) -> Result<()>;
    /// Removes everything `create` and `start` made, leftovers of a crash included.
    fn destroy(&self, st: &StateDir) -> Result<()>;
    /// Fails if this backend cannot cut or delay traffic between nodes.
    fn supports_faults(&self) -> Result<()> {
        Ok(())
    }
    /// The command prefix that runs a program in the node's network namespace.
    fn net_prefix(&self, st: &StateDir, node: &str) -> Result<Vec<String>>;
    /// Every address of the node, which a partition drops.
    fn node_addrs(&self, cfg: &ClusterConfig, node: &str) -> Vec<IpAddr> {
        cfg.node(node).map(|n| vec![n.http.ip()]).unwrap_or_default()
    }
    fn set_latency(&self, st: &StateDir, cfg: &ClusterConfig, ms: u64) -> Result<()>;
    fn tail_log(&self, st: &StateDir, node: &str, lines: usize) -> String {
        st.tail_log(node, lines)
    }
    fn print_log(&self, st: &StateDir, node: &str, lines: usize, follow: bool) -> Result<()> {
        st.print_log(node, lines, follow)
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Backend::Process => "process",
            Backend::Netns => "netns",
            Backend::Docker => "docker",
        };
        f.write_str(name)
    }
}

pub fn runtime(backend: Backend, st: &StateDir) -> Box<dyn Runtime> {
    match backend {
        Backend::Process => Box::new(process::Process),
        Backend::Netns => Box::new(netns::Netns::new(st)),
        Backend::Docker => Box::new(docker::Docker::new(st)),
    }
}

/// A cluster recorded in a state dir: the commands other than `up` work on this.
struct Cluster {
    st: StateDir,
    cfg: ClusterConfig,
    meta: Meta,
    rt: Box<dyn Runtime>,
}

impl Cluster {
    fn open(st: StateDir) -> Result<Cluster> {
        let meta = st.must_meta()?;
        let cfg = ClusterConfig::load(Some(&st.config_path())).context("load the cluster's config from the state dir")?;
        let rt = runtime(meta.backend, &st);
        Ok(Cluster { st, cfg, meta, rt })
    }

    /// The node, or an error listing the valid names.
    fn node(&self, name: &str) -> Result<NodeInfo> {
        self.cfg.node(name).ok_or_else(|| anyhow::anyhow!("unknown node '{name}'; valid nodes: {}", self.cfg.node_names().join(", ")))
    }

    fn live_pid(&self, name: &str) -> Result<i32> {
        self.node(name)?;
        self.st.live_pid(name).ok_or_else(|| anyhow::anyhow!("{name} is not running"))
    }

    fn live_nodes(&self) -> Vec<String> {
        self.cfg.node_names().into_iter().filter(|n| self.st.live_pid(n).is_some()).collect()
    }

    /// Starts a node, then re-applies the faults that concern it (a container's network
    /// namespace is new after a restart).
    fn start_node(&self, name: &str) -> Result<()> {
        self.rt.start(&self.st, &self.cfg, name)?;
        if self.meta.wan_via == wan::WanVia::Netem && self.meta.wan_latency_ms > 0 {
            self.rt.set_latency(&self.st, &self.cfg, self.meta.wan_latency_ms)?;
        }
        if !self.meta.cuts.is_empty() {
            self.apply_cuts(name, &self.rt.net_prefix(&self.st, name)?)?;
        }
        Ok(())
    }

    /// Replaces the node's drop rules with those of the current cuts.
    fn apply_cuts(&self, name: &str, prefix: &[String]) -> Result<()> {
        let addrs: Vec<IpAddr> = partition::cut_peers(&self.meta.cuts, name).flat_map(|peer| self.rt.node_addrs(&self.cfg, peer)).collect();
        partition::load_filter(prefix, &partition::filter_table(&addrs)).with_context(|| format!("set partition rules of {name}"))
    }

    /// Rules for every node whose network namespace exists now; a stopped container gets
    /// its rules when it starts again.
    fn apply_all_cuts(&self) -> Result<()> {
        for name in self.cfg.node_names() {
            if let Ok(prefix) = self.rt.net_prefix(&self.st, &name) {
                self.apply_cuts(&name, &prefix)?;
            }
        }
        Ok(())
    }

    /// Stops every node (SIGTERM, then SIGKILL), removes what the backend made, forgets the run.
    fn teardown(&self) -> Result<()> {
        for name in self.cfg.node_names() {
            if let Some(pid) = self.st.live_pid(&name) {
                state::stop_pid(pid, Duration::from_secs(5)).with_context(|| format!("stop {name}"))?;
            }
            budget::remove(&name);
        }
        self.rt.destroy(&self.st)?;
        self.st.clear_run()
    }

    async fn views(&self) -> Vec<table::NodeView> {
        table::collect(&table::http_client(), &self.st, &self.cfg).await
    }

    /// Polls until every node answers and every DC has a leader, or fails with the log of
    /// the first node that died.
    async fn wait_ready(&self, deadline: Duration, nodes: &[String]) -> Result<()> {
        let http = table::http_client();
        let bar = progress(nodes.len() as u64);
        let start = Instant::now();
        loop {
            self.check_alive(nodes)?;
            let views = table::collect(&http, &self.st, &self.cfg).await;
            // Ready: every node answers and knows its leader, and each DC agrees on one.
            let healthy = views.iter().filter(|v| nodes.contains(&v.node) && v.healthy()).count();
            let leaders = table::dcs_with_leader(&views).len();
            bar.set_position(healthy as u64);
            bar.set_message(format!("nodes up with a leader; {leaders} of {} DCs have elected one", self.cfg.dcs.len()));
            if healthy == nodes.len() && leaders == self.cfg.dcs.len() {
                bar.finish_and_clear();
                return Ok(());
            }
            if start.elapsed() > deadline {
                bar.abandon();
                bail!("timed out after {deadline:?}: {}", table::summary(&views, self.cfg.dcs.len()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn check_alive(&self, nodes: &[String]) -> Result<()> {
        for name in nodes {
            if self.st.live_pid(name).is_none() {
                let tail = self.rt.tail_log(&self.st, name, 20);
                bail!("{name} exited during start-up; last lines of its log:\n{tail}");
            }
        }
        Ok(())
    }

    async fn print_status(&self) {
        let views = self.views().await;
        print!("{}", table::render(&views));
        println!("{}", table::summary(&views, self.cfg.dcs.len()));
        if !self.meta.cuts.is_empty() {
            println!("partitioned: {} node pairs cut (`agora cluster heal` removes them)", self.meta.cuts.len());
        }
        if let Some(line) = wan::describe(&self.cfg, &self.meta) {
            println!("{line}");
        }
    }
}

/// Progress on stderr; indicatif draws nothing when stderr is not a terminal.
fn progress(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} {msg} [{elapsed}]").expect("valid progress template");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub async fn run(args: ClusterArgs) -> Result<()> {
    let st = StateDir::resolve(args.state_dir)?;
    match args.cmd {
        ClusterCmd::Up(a) => up(st, a).await,
        ClusterCmd::K8s(a) => manifests::write_k8s(&a),
        ClusterCmd::Compose(a) => manifests::write_compose(&a),
        ClusterCmd::Down { wipe } => down(st, wipe),
        cmd => drive(Cluster::open(st)?, cmd).await,
    }
}

/// Sends an operator setting for `dc` to the first node that answers; the cluster
/// replicates it to every DC.
async fn dc_settings(c: &Cluster, dc: &str, body: serde_json::Value) -> Result<()> {
    if !c.cfg.dc_names().iter().any(|d| d == dc) {
        anyhow::bail!("unknown datacentre '{dc}'; valid: {}", c.cfg.dc_names().join(", "));
    }
    let answer = admin_any(c, &c.cfg.nodes(), reqwest::Method::PUT, &format!("/v1/admin/dcs/{dc}"), Some(body)).await?;
    println!("{answer}");
    Ok(())
}

/// Adds `node` to (or, `remove`, takes it out of) every Raft group of its DC, through the
/// admin API of another node of that DC (which forwards to each group's leader).
async fn membership(c: &Cluster, node: &str, remove: bool, force: bool) -> Result<()> {
    let target = c.node(node)?;
    let others: Vec<NodeInfo> = c.cfg.dc_nodes(&target.dc).into_iter().filter(|n| n.name != node).collect();
    anyhow::ensure!(!others.is_empty(), "{} has no other node to ask", target.dc);
    let answer = if remove {
        let query = if force { "?force=true" } else { "" };
        admin_any(c, &others, reqwest::Method::DELETE, &format!("/v1/admin/nodes/{node}{query}"), None).await?
    } else {
        admin_any(c, &others, reqwest::Method::POST, "/v1/admin/nodes", Some(serde_json::json!({ "node": node }))).await?
    };
    println!("{answer}");
    Ok(())
}

/// Sends one admin request to the first of `nodes` that takes it; its answer's body.
async fn admin_any(c: &Cluster, nodes: &[NodeInfo], method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> Result<String> {
    // Membership changes wait for a learner to catch up: longer than a status probe.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).no_proxy().build().context("build http client")?;
    let token = crate::certs::read_token(&crate::certs::token_path(&c.st.certs_dir()))?;
    let mut last = None;
    for n in nodes {
        let mut req = http.request(method.clone(), format!("http://{}{path}", n.admin)).bearer_auth(&token);
        if let Some(b) = &body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => return Ok(r.text().await.unwrap_or_default()),
            // The request itself was refused: another node would say the same.
            Ok(r) if r.status().is_client_error() => anyhow::bail!("{}: {} {}", n.name, r.status(), r.text().await.unwrap_or_default()),
            Ok(r) => last = Some(format!("{}: {} {}", n.name, r.status(), r.text().await.unwrap_or_default())),
            Err(e) => last = Some(format!("{}: {e}", n.name)),
        }
    }
    anyhow::bail!("no node took it (last answer: {})", last.unwrap_or_default())
}

/// Sets a node's clock skew through its admin API (a test hook).
/// A test hook of `node`'s admin API: PUT `body` to `path`.
async fn put_hook(c: &Cluster, node: &str, path: &str, body: serde_json::Value) -> Result<()> {
    let n = c.node(node)?;
    let token = crate::certs::read_token(&crate::certs::token_path(&c.st.certs_dir()))?;
    let r = table::http_client()
        .put(format!("http://{}{path}", n.admin))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("reach {node}'s admin API"))?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{node}: {status} {text} (start the cluster with `up --enable-test-hooks`)");
    }
    Ok(())
}

async fn clock(c: &Cluster, node: &str, skew_ms: i64) -> Result<()> {
    put_hook(c, node, "/v1/admin/clock", serde_json::json!({ "skew_ms": skew_ms })).await?;
    println!("{node}: clock skew {skew_ms} ms");
    Ok(())
}

async fn disk(c: &Cluster, node: &str, fault: crate::storage::DiskFault) -> Result<()> {
    put_hook(c, node, "/v1/admin/disk", serde_json::json!({ "fault": fault })).await?;
    println!("{node}: disk fault {fault:?}");
    Ok(())
}

/// The commands that act on a cluster that `up` started.
async fn drive(c: Cluster, cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Status { json } if json => println!("{}", serde_json::to_string_pretty(&c.views().await)?),
        ClusterCmd::Status { .. } => c.print_status().await,
        ClusterCmd::Kill { node } => signal_node(&c, &node, libc::SIGKILL)?,
        ClusterCmd::Pause { node } => signal_node(&c, &node, libc::SIGSTOP)?,
        ClusterCmd::Resume { node } => signal_node(&c, &node, libc::SIGCONT)?,
        ClusterCmd::Restart { node } => restart(&c, &node).await?,
        ClusterCmd::Logs { node, follow, lines } => {
            c.node(&node)?;
            c.rt.print_log(&c.st, &node, lines, follow)?;
        }
        ClusterCmd::Partition { targets } => partition(c, &targets)?,
        ClusterCmd::Heal => heal(c)?,
        ClusterCmd::Latency(a) => wan::latency(c, &a).await?,
        ClusterCmd::Clock { node, skew_ms } => clock(&c, &node, skew_ms).await?,
        ClusterCmd::Disk { node, fault } => disk(&c, &node, fault).await?,
        ClusterCmd::Drain { dc } => dc_settings(&c, &dc, serde_json::json!({"drained": true})).await?,
        ClusterCmd::Undrain { dc } => dc_settings(&c, &dc, serde_json::json!({"drained": false})).await?,
        ClusterCmd::Weight { dc, weight } => dc_settings(&c, &dc, serde_json::json!({"weight": weight})).await?,
        ClusterCmd::AddNode { node } => membership(&c, &node, false, false).await?,
        ClusterCmd::Grow { dc, nodes } => grow_dc(c, &dc, nodes).await?,
        ClusterCmd::RemoveNode { node, force } => membership(&c, &node, true, force).await?,
        ClusterCmd::Up(_) | ClusterCmd::Down { .. } | ClusterCmd::K8s(_) | ClusterCmd::Compose(_) => {
            unreachable!("handled in run")
        }
    }
    Ok(())
}

async fn up(st: StateDir, a: UpArgs) -> Result<()> {
    if let Some(meta) = st.read_meta()? {
        if !clean_leftovers(&st, meta)? {
            return Ok(());
        }
    }
    let rt = runtime(a.backend, &st);
    let cfg = rt.derive_config(&ClusterConfig::load(a.config.as_deref())?)?;
    let mut cfg = cfg;
    let wan_latency_ms = a.wan_latency.unwrap_or(0);
    match a.wan_via {
        wan::WanVia::Netem if wan_latency_ms > 0 || a.wan_jitter > 0 => {
            rt.supports_faults()?;
            anyhow::ensure!(a.wan_jitter == 0, "--wan-jitter needs --wan-via transport");
        }
        wan::WanVia::Netem => {}
        // The nodes start with the delay in their cluster file, restarts included.
        wan::WanVia::Transport => wan::configure(&mut cfg, wan_latency_ms, a.wan_jitter, None)?,
    }
    rt.check_free(&cfg)?;
    if a.wipe {
        st.wipe()?;
    }
    st.create_dirs()?;
    write_cluster_files(&st, &cfg)?;
    if let Some(cpus) = a.cpus {
        anyhow::ensure!(!matches!(a.backend, Backend::Docker), "--cpus: use the process or netns backend");
        budget::check(cpus, a.cpu_period_ms)?;
    }
    let cpu_period_ms = a.cpus.map(|_| a.cpu_period_ms);
    let meta =
        Meta { backend: a.backend, wan_latency_ms, wan_via: a.wan_via, test_hooks: a.enable_test_hooks, cuts: BTreeSet::new(), cpus: a.cpus, cpu_period_ms };
    // Written before anything is created: from here on, a crash is cleaned by the next `up`.
    st.write_meta(&meta)?;
    let c = Cluster { st, cfg, meta, rt };
    if let Err(e) = start_cluster(&c, Duration::from_secs(a.timeout_s)).await {
        eprintln!("agora: start failed, stopping what was started (logs are kept in {})", c.st.root.join("logs").display());
        if let Err(t) = c.teardown() {
            eprintln!("agora: clean-up after the failed start: {t:#}");
        }
        return Err(e);
    }
    println!("cluster up: {} nodes in {} DCs ({} backend, state in {})", c.cfg.nodes().len(), c.cfg.dcs.len(), c.meta.backend, c.st.root.display());
    c.print_status().await;
    print!("{}", table::hints(&c.cfg, &c.st.certs_dir()));
    Ok(())
}

/// With a previous run recorded: says so and returns false if any of its nodes still
/// runs; otherwise removes its leftovers and returns true.
fn clean_leftovers(st: &StateDir, meta: state::Meta) -> Result<bool> {
    let backend = meta.backend;
    let Ok(cfg) = ClusterConfig::load(Some(&st.config_path())) else {
        // Crashed before the config was written: nothing of it can run.
        runtime(backend, st).destroy(st)?;
        st.clear_run()?;
        return Ok(true);
    };
    let c = Cluster { st: st.clone(), cfg, meta, rt: runtime(backend, st) };
    let live = c.live_nodes();
    if !live.is_empty() {
        println!(
            "a cluster is already running in {} ({backend} backend, {} of {} nodes up): nothing started.\n\
             See `agora cluster status`, or stop it with `agora cluster down`.",
            st.root.display(),
            live.len(),
            c.cfg.nodes().len()
        );
        return Ok(false);
    }
    eprintln!("cleaning up the leftovers of a previous run ({backend} backend)");
    c.teardown()?;
    Ok(true)
}

async fn start_cluster(c: &Cluster, deadline: Duration) -> Result<()> {
    eprintln!("creating the {} cluster …", c.meta.backend);
    c.rt.create(&c.st, &c.cfg, &c.meta)?;
    c.rt.start_all(&c.st, &c.cfg)?;
    if c.meta.wan_via == wan::WanVia::Netem && c.meta.wan_latency_ms > 0 {
        c.rt.set_latency(&c.st, &c.cfg, c.meta.wan_latency_ms)?;
    }
    eprintln!("started {} nodes; waiting for them to answer and for a leader in each DC …", c.cfg.nodes().len());
    c.wait_ready(deadline, &c.cfg.node_names()).await
}

fn down(st: StateDir, wipe: bool) -> Result<()> {
    match st.read_meta()? {
        Some(meta) => {
            let backend = meta.backend;
            match Cluster::open(st.clone()) {
                Ok(c) => c.teardown()?,
                // No readable config: no node can have started; remove the networks.
                Err(_) => {
                    runtime(backend, &st).destroy(&st)?;
                    st.clear_run()?;
                }
            }
            println!("cluster in {} is down", st.root.display());
        }
        None => println!("no cluster running in {}", st.root.display()),
    }
    if wipe {
        st.wipe()?;
        println!("data and logs deleted");
    }
    Ok(())
}

fn signal_node(c: &Cluster, node: &str, sig: libc::c_int) -> Result<()> {
    let pid = c.live_pid(node)?;
    state::signal(pid, sig)?;
    let what = match sig {
        libc::SIGKILL => {
            if !state::wait_gone(pid, Duration::from_secs(10)) {
                bail!("{node} (pid {pid}) is still there 10 s after SIGKILL");
            }
            "killed"
        }
        libc::SIGSTOP => "paused",
        _ => "resumed",
    };
    println!("{node} (pid {pid}) {what}");
    Ok(())
}

async fn restart(c: &Cluster, node: &str) -> Result<()> {
    c.node(node)?;
    if let Some(pid) = c.st.live_pid(node) {
        state::stop_pid(pid, Duration::from_secs(5)).with_context(|| format!("stop {node}"))?;
    }
    c.start_node(node)?;
    let nodes = [node.to_string()];
    // The node's DC may have no leader without it (two nodes down): wait only for it to answer.
    let start = Instant::now();
    let http = table::http_client();
    loop {
        c.check_alive(&nodes)?;
        let info = c.node(node)?;
        if http.get(format!("http://{}/healthz", info.http)).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{node} did not answer within 30 s; see `agora cluster logs {node}`");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{node} restarted (pid {})", c.st.read_pid(node).unwrap_or(0));
    Ok(())
}

/// Waits (up to 60 s) until `node` answers and, in every shard it holds, knows a leader
/// and has applied what it knows committed: restarting the next node before would leave
/// a shard short of an up-to-date majority.
async fn wait_serving(c: &Cluster, node: &str) -> Result<()> {
    let info = c.node(node)?;
    let http = table::http_client();
    let start = Instant::now();
    loop {
        c.check_alive(&[node.to_string()])?;
        let status: Option<serde_json::Value> = match http.get(format!("http://{}/v1/cluster/status", info.http)).send().await {
            Ok(r) if r.status().is_success() => r.json().await.ok(),
            _ => None,
        };
        let serving = |s: &serde_json::Value| s["hosted"] != true || (s["leader"].is_string() && s["applied_index"].as_u64() >= s["commit_index"].as_u64());
        if status.as_ref().and_then(|s| s["shards"].as_array()).is_some_and(|shards| shards.iter().all(serving)) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{node} did not serve every shard it holds within 60 s; see `agora cluster logs {node}`");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster file the nodes run with, in the state dir, and a certificate of the
/// cluster's CA for each of its nodes: the CA is made once per state dir, and a node that
/// already has a valid certificate keeps it (later `up`s, `grow`).
fn write_cluster_files(st: &StateDir, cfg: &ClusterConfig) -> Result<()> {
    std::fs::write(st.config_path(), toml::to_string(cfg).context("serialize config")?).context("write cluster.toml")?;
    crate::certs::create(&st.certs_dir(), cfg, false, crate::certs::Validity::default()).context("create the cluster's certificates")?;
    Ok(())
}

/// `agora cluster grow` (see `grow.rs`).
async fn grow_dc(c: Cluster, dc: &str, count: usize) -> Result<()> {
    anyhow::ensure!(
        c.meta.backend == Backend::Process,
        "grow: the process backend only (netns and docker nodes get their networks at `up`: add the node to the cluster file and `up` again)"
    );
    let (cfg, added) = grow::grown(&c.cfg, dc, count)?;
    for n in &added {
        process::check_node_free(&cfg.node(n).context("a grown node")?)?;
    }
    write_cluster_files(&c.st, &cfg)?;
    println!("{} added to {dc} in {}", added.join(", "), c.st.config_path().display());
    let c = Cluster::open(c.st)?;
    let resume = format!(
        "the cluster file names {0} now: restart the nodes not yet restarted (`agora cluster restart NODE`), start {0} the same way, then `agora cluster add-node` each",
        added.join(", ")
    );
    for node in c.live_nodes().into_iter().filter(|n| !added.contains(n)) {
        let restarted = async {
            restart(&c, &node).await?;
            wait_serving(&c, &node).await
        };
        restarted.await.with_context(|| resume.clone())?;
    }
    for node in &added {
        c.start_node(node).with_context(|| resume.clone())?;
        wait_serving(&c, node).await.with_context(|| resume.clone())?;
    }
    for node in &added {
        membership(&c, node, false, false).await.with_context(|| resume.clone())?;
    }
    Ok(())
}

fn partition(mut c: Cluster, targets: &[String]) -> Result<()> {
    let new = partition::cuts(&c.cfg, targets)?;
    c.rt.supports_faults()?; // refuses on the process backend before anything changes
    c.meta.cuts.extend(new);
    c.st.write_meta(&c.meta)?;
    c.apply_all_cuts()?;
    println!("partitioned: {} node pairs cut", c.meta.cuts.len());
    Ok(())
}

fn heal(mut c: Cluster) -> Result<()> {
    c.rt.supports_faults()?;
    c.meta.cuts.clear();
    c.st.write_meta(&c.meta)?;
    c.apply_all_cuts()?;
    println!("healed: every node reaches every other node");
    Ok(())
}

/// Runs a command to completion; its stderr becomes the error.
pub fn exec(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`exec`] of a command given as words.
pub fn exec_args(args: &[&str]) -> Result<String> {
    exec(std::process::Command::new(args[0]).args(&args[1..]))
}

/// The user's topology (same names, ids and ports) on `A.B.<dc>.<n>` addresses, with the
/// matching /24 subnet per DC: the netns and docker backends cannot use 127.x, which is
/// local to each namespace.
pub fn readdress(user: &ClusterConfig, a: u8, b: u8) -> Result<ClusterConfig> {
    let mut cfg = user.clone();
    for (i, dc) in cfg.dcs.iter_mut().enumerate() {
        let d = u8::try_from(i + 1).ok().filter(|d| *d < 250).context("too many DCs for this backend's address plan")?;
        dc.subnet = Some(format!("{a}.{b}.{d}.0/24"));
        for (j, n) in dc.nodes.iter_mut().enumerate() {
            n.ip = Some(IpAddr::V4(std::net::Ipv4Addr::new(a, b, d, j as u8 + 1)));
            (n.host, n.bind) = (None, None);
        }
    }
    // Nodes in namespaces or containers: the launcher (and operators) on the host reach
    // their admin API at the node's address, with the admin token.
    cfg.admin.listen = crate::config::AdminListen::Node;
    cfg.validate().context("readdressed config")?;
    Ok(cfg)
}

/// 1-based positions of a node: its DC's and its own inside the DC.
pub fn position(cfg: &ClusterConfig, node: &str) -> Option<(usize, usize)> {
    cfg.dcs.iter().enumerate().find_map(|(i, dc)| dc.nodes.iter().position(|n| n.name == node).map(|j| (i + 1, j + 1)))
}

/// [`exec`] with `input` on the command's stdin.
pub fn exec_stdin(cmd: &mut std::process::Command, input: &str) -> Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("run {cmd:?}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
