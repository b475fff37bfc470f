//! Docker backend: one container per node from the `FROM scratch` image (`agora:latest`,
//! built by `scripts/docker-build`), on a network per DC plus a WAN network, started with
//! docker compose from a file generated into the state dir (project `agora-<tag>`).
//!
//! Address plan 10.78.<dc>.<n> on the DC networks and 10.78.0.<10·dc+n> on the WAN. Docker
//! isolates its networks from each other, so traffic between DCs goes over the WAN network:
//! after a container starts, the launcher gives it a /32 route to every node of the other
//! DCs via that node's WAN address. Scratch images have no tools, so routes, firewall rules
//! and qdiscs are set from the host in the container's namespace (`nsenter -t PID -n`).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::manifests::{self, ComposeFlavor};
use super::state::{Meta, StateDir};
use super::{exec, exec_args, exec_stdin, position, readdress, Runtime};
use crate::config::ClusterConfig;

pub const NET_A: u8 = 10;
pub const NET_B: u8 = 78;
/// Image name; `scripts/docker-build` builds it.
pub const IMAGE: &str = "agora:latest";

/// The node's address on the WAN network.
pub fn wan_ip(cfg: &ClusterConfig, node: &str) -> Option<Ipv4Addr> {
    let (d, k) = position(cfg, node)?;
    Some(Ipv4Addr::new(NET_A, NET_B, 0, u8::try_from(d * 10 + k).ok()?))
}

/// The WAN network's subnet and the host's (gateway) address on it.
pub fn wan_subnet() -> (String, String) {
    (format!("{NET_A}.{NET_B}.0.0/24"), format!("{NET_A}.{NET_B}.0.254"))
}

/// `docker compose` (plugin) where it exists, else the standalone `docker-compose`.
pub fn compose_command() -> Command {
    let plugin = Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    if plugin {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    }
}

fn container_pid(container: &str) -> Result<i32> {
    let out = exec_args(&["docker", "inspect", "-f", "{{.State.Pid}}", container])?;
    let pid: i32 = out.trim().parse().context("parse container pid")?;
    if pid == 0 {
        bail!("container {container} is not running");
    }
    Ok(pid)
}

/// Gives the node (container init `pid`) a /32 route to every node of the other DCs via
/// that node's WAN address.
fn route_wan(cfg: &ClusterConfig, node: &str, pid: i32) -> Result<()> {
    let me = cfg.node(node).context("node")?;
    let mut batch = String::new();
    for peer in cfg.nodes().into_iter().filter(|n| n.dc != me.dc) {
        let via = wan_ip(cfg, &peer.name).context("wan address")?;
        batch += &format!("route replace {}/32 via {via}\n", peer.http.ip());
    }
    exec_stdin(Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "ip", "-batch", "-"]), &batch)
        .with_context(|| format!("route {node}'s traffic between DCs"))
        .map(|_| ())
}

pub struct Docker {
    project: String,
}

impl Docker {
    pub fn new(st: &StateDir) -> Docker {
        Docker { project: format!("agora-{}", st.tag()) }
    }

    fn container(&self, node: &str) -> String {
        format!("{}-{node}", self.project)
    }

    fn compose_file(st: &StateDir) -> std::path::PathBuf {
        st.root.join("docker-compose.yml")
    }

    fn compose(&self, st: &StateDir) -> Command {
        let mut cmd = compose_command();
        cmd.arg("-p").arg(&self.project).arg("-f").arg(Self::compose_file(st));
        cmd
    }

    /// Records the container's pid and routes its traffic to other DCs over the WAN. Right
    /// after `docker start` the init may still be runc's, not agora: wait for the exec.
    fn adopt(&self, st: &StateDir, cfg: &ClusterConfig, node: &str) -> Result<()> {
        let pid = container_pid(&self.container(node))?;
        st.write_pid(node, pid)?;
        let start = std::time::Instant::now();
        while st.live_pid(node).is_none() {
            if !super::state::pid_alive(pid) || start.elapsed() > std::time::Duration::from_secs(10) {
                bail!("{node}'s container did not start agora; see `agora cluster logs {node}`");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        route_wan(cfg, node, pid)
    }

    /// Docker notices a killed container's exit a little after the process is gone, and
    /// `docker start` on a container it still thinks is running does nothing.
    fn wait_stopped(&self, node: &str) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let running = exec_args(&["docker", "inspect", "-f", "{{.State.Running}}", &self.container(node)])?;
            if running.trim() == "false" {
                return Ok(());
            }
            if start.elapsed() > std::time::Duration::from_secs(10) {
                bail!("{node}'s container still runs 10 s after its process was stopped");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Names of this project's containers or networks, by compose's project label.
    fn labelled(&self, what: &str) -> Result<Vec<String>> {
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let args: Vec<&str> = match what {
            "container" => vec!["docker", "ps", "-aq", "--filter", &filter],
            _ => vec!["docker", "network", "ls", "-q", "--filter", &filter],
        };
        Ok(exec_args(&args)?.split_whitespace().map(String::from).collect())
    }
}

impl Runtime for Docker {
    fn derive_config(&self, user: &ClusterConfig) -> Result<ClusterConfig> {
        readdress(user, NET_A, NET_B)
    }

    fn check_free(&self, _cfg: &ClusterConfig) -> Result<()> {
        super::netns::must_be_root("docker")?;
        if exec_args(&["docker", "image", "inspect", IMAGE]).is_err() {
            bail!("docker image {IMAGE} not found (or no docker engine): build it with scripts/docker-build; nothing was started");
        }
        Ok(())
    }

    fn create(&self, st: &StateDir, cfg: &ClusterConfig, meta: &Meta) -> Result<()> {
        let flavor = ComposeFlavor::Launcher { state_dir: st.root.clone(), container_prefix: format!("{}-", self.project), test_hooks: meta.test_hooks };
        std::fs::write(Self::compose_file(st), manifests::compose_yaml(cfg, &flavor)?).context("write docker-compose.yml")?;
        for n in cfg.node_names() {
            std::fs::create_dir_all(st.data_dir(&n)).context("create data dir")?;
        }
        Ok(())
    }

    fn start_all(&self, st: &StateDir, cfg: &ClusterConfig) -> Result<()> {
        exec(self.compose(st).args(["up", "-d", "--no-build"])).context("docker compose up (is the subnet 10.78.0.0/16 free?)")?;
        cfg.node_names().iter().try_for_each(|n| self.adopt(st, cfg, n))
    }

    fn start(&self, st: &StateDir, cfg: &ClusterConfig, node: &str) -> Result<()> {
        self.wait_stopped(node)?;
        exec_args(&["docker", "start", &self.container(node)])?;
        self.adopt(st, cfg, node)
    }

    /// Removes the project's containers and networks by label, so it works even when the
    /// compose file is gone (a crash during `up`).
    fn destroy(&self, _st: &StateDir) -> Result<()> {
        let containers = self.labelled("container")?;
        if !containers.is_empty() {
            exec(Command::new("docker").args(["rm", "-f"]).args(&containers))?;
        }
        let networks = self.labelled("network")?;
        if !networks.is_empty() {
            exec(Command::new("docker").args(["network", "rm"]).args(&networks))?;
        }
        Ok(())
    }

    fn net_prefix(&self, st: &StateDir, node: &str) -> Result<Vec<String>> {
        let pid = st.live_pid(node).with_context(|| format!("{node} is not running"))?;
        Ok(vec!["nsenter".into(), "-t".into(), pid.to_string(), "-n".into()])
    }

    fn node_addrs(&self, cfg: &ClusterConfig, node: &str) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = cfg.node(node).map(|n| vec![n.http.ip()]).unwrap_or_default();
        v.extend(wan_ip(cfg, node).map(IpAddr::V4));
        v
    }

    /// netem on each running container's WAN interface (found by its address).
    fn set_latency(&self, st: &StateDir, cfg: &ClusterConfig, ms: u64) -> Result<()> {
        for node in cfg.node_names() {
            let Ok(prefix) = self.net_prefix(st, &node) else { continue };
            let wan = wan_ip(cfg, &node).context("wan address")?.to_string();
            let mut show = super::partition::command(&prefix, &["ip", "-o", "-4", "addr", "show", "to", &wan]);
            let out = exec(&mut show)?;
            let dev = out.split_whitespace().nth(1).with_context(|| format!("{node} has no WAN interface"))?.to_string();
            super::partition::set_netem(&prefix, &dev, ms).with_context(|| format!("set latency on {node}"))?;
        }
        Ok(())
    }

    fn tail_log(&self, _st: &StateDir, node: &str, lines: usize) -> String {
        let out = Command::new("docker").args(["logs", "--tail", &lines.to_string(), &self.container(node)]).output();
        // The node logs to stderr, which `docker logs` replays on its stderr.
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)).unwrap_or_default()
    }

    fn print_log(&self, _st: &StateDir, node: &str, lines: usize, follow: bool) -> Result<()> {
        let mut cmd = Command::new("docker");
        cmd.args(["logs", "--tail", &lines.to_string()]);
        if follow {
            cmd.arg("-f");
        }
        let status = cmd.arg(self.container(node)).status().context("run docker logs")?;
        if !status.success() {
            bail!("docker logs failed for {node}");
        }
        Ok(())
    }
}
