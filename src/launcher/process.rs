//! Process backend: every node is a child process of the launcher on its loopback IP
//! (127.0.0.0/8 needs no setup on Linux). The netns backend reuses [`spawn_node`] with an
//! `ip netns exec` prefix.

use std::fs::OpenOptions;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::state::StateDir;
use super::Runtime;
use crate::config::ClusterConfig;

pub struct Process;

/// Bound on the time from spawning a node to its exec of agora (a loaded machine is slow).
const EXEC_WAIT: Duration = Duration::from_secs(10);

/// Starts `agora node` for `node` (after `prefix`, e.g. `ip netns exec NS`), with its log
/// in the state dir, and records its pid. `ip netns exec` execs the node, so the pid is
/// the node's own.
/// Fails if a port `n` would listen on is taken here.
pub fn check_node_free(n: &crate::config::NodeInfo) -> Result<()> {
    for (what, addr) in [("http", n.http), ("peer", n.peer), ("dns", n.dns)] {
        if let Err(e) = TcpListener::bind(addr) {
            bail!("{}'s {what} address {addr} is taken ({e}); nothing was started", n.name);
        }
    }
    if let Err(e) = UdpSocket::bind(n.dns) {
        bail!("{}'s dns address {} (udp) is taken ({e}); nothing was started", n.name, n.dns);
    }
    Ok(())
}

pub fn spawn_node(st: &StateDir, prefix: &[String], node: &str) -> Result<i32> {
    let exe = std::env::current_exe().context("find the agora binary")?;
    let meta = st.read_meta()?;
    let log_path = st.log_path(node);
    let log = OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("open {}", log_path.display()))?;
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["node", "--node", node, "--config"])
        .arg(st.config_path())
        .arg("--data-dir")
        .arg(st.data_dir(node))
        .arg("--certs")
        .arg(st.certs_dir())
        .args(meta.as_ref().filter(|m| m.test_hooks).map(|_| "--enable-test-hooks"))
        // Logs go to a file that people grep: no colour codes.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C in the launcher's terminal does not reach the nodes.
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("start {node}"))?;
    let pid = child.id() as i32;
    st.write_pid(node, pid)?;
    wait_exec(st, &mut child, node)?;
    if let Some((cpus, m)) = meta.and_then(|m| Some((m.cpus?, m))) {
        let period_ms = m.cpu_period_ms.unwrap_or(super::budget::PERIOD_MS_DEFAULT);
        super::budget::apply(node, pid, cpus, period_ms).with_context(|| format!("put {node} under a budget of {cpus} CPUs per {period_ms} ms"))?;
    }
    Ok(pid)
}

/// Between fork and exec the child still looks like the launcher, and would not pass as
/// the node its pid file names: wait until it does, so every later check is reliable.
fn wait_exec(st: &StateDir, child: &mut std::process::Child, node: &str) -> Result<()> {
    let start = Instant::now();
    while st.live_pid(node).is_none() {
        if let Some(status) = child.try_wait()? {
            bail!("{node} exited during start-up ({status}); last lines of its log:\n{}", st.tail_log(node, 20));
        }
        if start.elapsed() > EXEC_WAIT {
            bail!("{node} (pid {}) did not start within {EXEC_WAIT:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

impl Runtime for Process {
    /// Every TCP port (HTTP, peer, DNS) and the DNS UDP port must be free before anything starts.
    fn check_free(&self, cfg: &ClusterConfig) -> Result<()> {
        cfg.nodes().iter().try_for_each(check_node_free)
    }

    fn start(&self, st: &StateDir, _cfg: &ClusterConfig, node: &str) -> Result<()> {
        spawn_node(st, &[], node).map(|_| ())
    }

    fn destroy(&self, _st: &StateDir) -> Result<()> {
        Ok(())
    }

    fn supports_faults(&self) -> Result<()> {
        bail!("the process backend shares the host's loopback: partitions and latency need `agora cluster up --backend netns` or `--backend docker`")
    }

    fn net_prefix(&self, _st: &StateDir, _node: &str) -> Result<Vec<String>> {
        self.supports_faults().map(|_| Vec::new())
    }

    fn set_latency(&self, _st: &StateDir, _cfg: &ClusterConfig, _ms: u64) -> Result<()> {
        self.supports_faults()
    }
}
