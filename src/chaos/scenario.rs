//! Scenario files (`chaos/scenarios/*.toml`): topology, backend, workload, the nemesis
//! schedule, duration and seed. The same seed replays the same fault schedule and the
//! same client choices.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::launcher::Backend;
use crate::storage::DiskFault;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Part of the quick set that `agora chaos all --smoke` (and the test suite) runs.
    #[serde(default)]
    pub smoke: bool,
    pub backend: Backend,
    /// Cluster file, relative to the repository root (default: chaos/cluster.toml).
    #[serde(default = "default_config")]
    pub config: PathBuf,
    /// Seconds of load, faults included.
    pub duration_s: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// After the last fault is undone: how long the DCs get to converge.
    #[serde(default = "default_converge")]
    pub converge_within_s: f64,
    #[serde(default)]
    pub workload: WorkloadSpec,
    #[serde(default)]
    pub nemesis: Vec<Step>,
}

fn default_config() -> PathBuf {
    PathBuf::from("chaos/cluster.toml")
}
fn default_seed() -> u64 {
    1
}
fn default_converge() -> f64 {
    20.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSpec {
    pub clients_per_dc: usize,
    /// Operations per second per client (each client has one call in flight at most).
    pub rate_per_client: f64,
    pub skus: usize,
    /// Units each DC restocks of each SKU before the run.
    pub stock_per_dc: u64,
    /// Relative weights of the operations.
    pub order: u32,
    pub cancel: u32,
    pub read_inventory: u32,
    pub read_order: u32,
    pub restock: u32,
    pub read_session: u32,
    /// Logout of the client's session (it logs in again at its next step).
    pub logout: u32,
    /// Per-call timeout: a call that takes longer has an unknown outcome.
    pub timeout_ms: u64,
    /// Share of calls (0..=1) a client sends to another DC than its home, as DNS names
    /// it; 0 keeps every client at home for good.
    pub roam_share: f64,
    /// A roaming client moves home for good once its home DC has been left out of every
    /// other DC's DNS answer this long.
    pub move_after_ms: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            clients_per_dc: 2,
            rate_per_client: 20.0,
            skus: 2,
            stock_per_dc: 150,
            order: 60,
            cancel: 10,
            read_inventory: 20,
            read_order: 5,
            restock: 5,
            read_session: 5,
            logout: 1,
            timeout_ms: 2000,
            roam_share: 0.2,
            move_after_ms: 3000,
        }
    }
}

/// One fault: what, when (seconds after the load starts), on what, and for how long
/// before it is undone (a killed node restarted, a paused one resumed, a cut healed).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub at_s: f64,
    pub action: Action,
    /// A DC (`dc1`) or a node (`dc1-n2`); a random DC (by the seed) when absent.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default = "default_hold")]
    pub hold_s: f64,
    /// For `latency`.
    #[serde(default)]
    pub ms: u64,
    /// For `clock-skew`: how far the node's clock runs ahead (negative: behind), in ms.
    #[serde(default)]
    pub skew_ms: i64,
    /// For `disk-fault`: `sync-error` (EIO) or `full` (ENOSPC).
    #[serde(default)]
    pub disk: Option<DiskFault>,
}

fn default_hold() -> f64 {
    5.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// SIGKILL a random node of the DC, restart it after `hold_s`.
    KillRandom,
    /// SIGKILL the DC's leader, restart it after `hold_s`.
    KillLeader,
    /// Restart the DC's leader gracefully (`agora cluster restart`: SIGTERM, so it hands
    /// over what it leads first, then start), counted like a kill.
    RestartLeader,
    /// SIGSTOP the DC's leader, SIGCONT after `hold_s`.
    PauseLeader,
    /// Cut the DC's leader off from every other node.
    IsolateLeader,
    /// Cut one node of the DC (a minority) from the rest of its DC.
    SplitDc,
    /// Cut the DC off from the other DCs.
    CutDc,
    /// Cut every DC apart.
    CutAll,
    /// Restart every node of the cluster, one after the other.
    RollingRestart,
    /// Delay between DCs for `hold_s` (`agora cluster latency`: the nodes' transport, or
    /// tc netem for a cluster started with `--wan-via netem`).
    Latency,
    /// Run a node's clock `skew_ms` ahead or behind (the target node, else the DC's
    /// leader) for `hold_s`, through its test hook.
    ClockSkew,
    /// Fail every disk sync of a node (the target node, else the DC's leader) with `disk`,
    /// through its test hook; after `hold_s` the node is restarted, the only way back
    /// from a failed sync.
    DiskFault,
    /// Take a node (the target node, else a random one of the DC) out of its DC with
    /// `agora cluster remove-node` — with shards on subsets, its replicas move to other
    /// nodes first — and after `hold_s` back in with `add-node` (replicas move onto it).
    /// A membership change refused meanwhile (a partition, an election) is retried.
    MoveReplicas,
}

impl Action {
    pub fn needs_network(self) -> bool {
        matches!(self, Action::IsolateLeader | Action::SplitDc | Action::CutDc | Action::CutAll)
    }
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let s: Scenario = toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        s.validate().with_context(|| format!("check {}", path.display()))?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !(self.duration_s > 0.0) {
            bail!("duration_s must be > 0");
        }
        let w = &self.workload;
        if w.clients_per_dc == 0 || w.skus == 0 || !(w.rate_per_client > 0.0) || w.timeout_ms == 0 {
            bail!("workload: clients_per_dc, skus, rate_per_client and timeout_ms must be > 0");
        }
        if w.order + w.cancel + w.read_inventory + w.read_order + w.restock + w.read_session == 0 {
            bail!("workload: at least one operation needs a weight");
        }
        if !(0.0..=1.0).contains(&w.roam_share) {
            bail!("workload: roam_share must be within 0..=1");
        }
        for (i, s) in self.nemesis.iter().enumerate() {
            if s.at_s < 0.0 || s.at_s + s.hold_s > self.duration_s {
                bail!("nemesis[{i}]: at_s + hold_s must fall within duration_s");
            }
            if s.action == Action::ClockSkew && (s.skew_ms == 0 || s.skew_ms.checked_abs().is_none_or(|a| a > crate::hlc::SKEW_MS_MAX)) {
                bail!("nemesis[{i}]: clock-skew needs skew_ms, non-zero and within ±{} ms", crate::hlc::SKEW_MS_MAX);
            }
            if matches!(s.action, Action::ClockSkew | Action::DiskFault) && self.backend == Backend::Docker {
                bail!("nemesis[{i}]: {:?} needs test hooks, which the docker backend's nodes do not start with", s.action);
            }
            if s.action == Action::DiskFault && !matches!(s.disk, Some(DiskFault::SyncError | DiskFault::Full)) {
                bail!("nemesis[{i}]: disk-fault needs disk = \"sync-error\" or \"full\"");
            }
            if s.action.needs_network() && self.backend == Backend::Process {
                bail!("nemesis[{i}]: {:?} needs real networks: use backend = \"netns\" or \"docker\"", s.action);
            }
        }
        Ok(())
    }
}
