//! Drives the cluster of a chaos run through `agora cluster … --state-dir DIR` (the
//! launcher), and reads the nodes' HTTP API. Dropping it takes the cluster down, so a
//! failed run leaves nothing behind (its data dirs and logs stay for inspection).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::{ClusterConfig, NodeInfo};
use crate::launcher::Backend;

pub struct Control {
    pub state_dir: PathBuf,
    pub config: ClusterConfig,
    pub http: reqwest::Client,
    /// The cluster's admin token, read once it is up.
    admin_token: String,
    up: bool,
}

fn agora() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("find the agora binary")
}

impl Control {
    /// `agora cluster up` with a fresh state dir; reads back the config the nodes run with.
    pub fn up(state_dir: &Path, config: &Path, backend: Backend) -> anyhow::Result<Control> {
        std::fs::create_dir_all(state_dir)?;
        let config_file = config;
        let config = ClusterConfig::load(Some(config_file))?;
        let mut c = Control { state_dir: state_dir.to_path_buf(), config, http: reqwest::Client::new(), admin_token: String::new(), up: false };
        // Test hooks on: the clock-skew nemesis sets a node's clock through them.
        *RUNNING.lock().expect("running lock") = Some(state_dir.to_path_buf());
        c.cluster(&["up", "--wipe", "--enable-test-hooks", "--config", &config_file.display().to_string(), "--backend", &backend.to_string()])?;
        c.up = true;
        c.admin_token = crate::certs::read_token(&crate::certs::token_path(&state_dir.join("certs")))?;
        c.config = ClusterConfig::load(Some(&state_dir.join("cluster.toml"))).context("read the running cluster's config")?;
        c.http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
        Ok(c)
    }

    /// Runs one `agora cluster` subcommand; its output goes to the state dir's log.
    pub fn cluster(&self, args: &[&str]) -> anyhow::Result<()> {
        cluster_in(&self.state_dir, args)
    }

    pub fn down(&mut self) -> anyhow::Result<()> {
        // Ours, whether or not it came up: nothing for a signal to take down any more.
        let mut running = RUNNING.lock().expect("running lock");
        if running.as_deref() == Some(self.state_dir.as_path()) {
            *running = None;
        }
        drop(running);
        if self.up {
            self.up = false;
            self.cluster(&["down"])?;
        }
        Ok(())
    }

    pub fn nodes(&self, dc: &str) -> Vec<NodeInfo> {
        self.config.dc_nodes(dc)
    }

    pub fn url(&self, node: &NodeInfo) -> String {
        format!("http://{}", node.http)
    }

    pub async fn get(&self, node: &NodeInfo, path: &str) -> Option<Value> {
        self.get_answer(node, path).await.filter(|(status, _)| (200..300).contains(status)).map(|(_, v)| v)
    }

    /// A GET of `node`'s admin API (with the cluster's admin token); its body if 2xx.
    pub async fn admin_get(&self, node: &NodeInfo, path: &str) -> Option<Value> {
        let req = self.http.get(format!("http://{}{path}", node.admin)).bearer_auth(&self.admin_token);
        answer(req).await.filter(|(status, _)| (200..300).contains(status)).map(|(_, v)| v)
    }

    /// Any answer with its status (an error body too); `None` if none came.
    pub async fn get_answer(&self, node: &NodeInfo, path: &str) -> Option<(u16, Value)> {
        answer(self.http.get(format!("{}{path}", self.url(node)))).await
    }

    /// The leader of `dc`: the node that leads most of its shards.
    pub async fn leader(&self, dc: &str) -> Option<String> {
        // Each node says which shards it leads; the one that leads most is "the leader"
        // (with one shard, shard 0's). Nodes that do not answer lead nothing we can see.
        let mut best: Option<(usize, String)> = None;
        let mut named = None;
        for n in self.nodes(dc) {
            let Some(s) = self.get(&n, "/v1/cluster/status").await else { continue };
            named = named.or_else(|| s["leader"].as_str().map(String::from));
            let led = s["shards"].as_array().map_or(0, |all| all.iter().filter(|x| x["role"] == "leader").count());
            if led > 0 && best.as_ref().is_none_or(|(most, _)| led > *most) {
                best = Some((led, n.name));
            }
        }
        best.map(|(_, n)| n).or(named)
    }

    /// A node of `dc` that answers.
    pub async fn any_node(&self, dc: &str) -> Option<NodeInfo> {
        for n in self.nodes(dc) {
            if self.get(&n, "/healthz").await.is_some() {
                return Some(n);
            }
        }
        None
    }
}

/// Sends `req`: the answer's status and JSON body (`null` if it has none).
async fn answer(req: reqwest::RequestBuilder) -> Option<(u16, Value)> {
    let r = req.send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

/// Runs `agora cluster ARGS --state-dir STATE_DIR`, its output into the state dir's log.
fn cluster_in(state_dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let log_path = state_dir.join("chaos-cluster.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let status = Command::new(agora()?)
        .arg("cluster")
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("run agora cluster {}", args.join(" ")))?;
    if !status.success() {
        bail!("agora cluster {} failed (see {})", args.join(" "), log_path.display());
    }
    Ok(())
}

/// The state dir of the cluster a `Control` has up, for [`take_down_running`].
static RUNNING: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Takes down the cluster that is up, if any: for a runner stopped by a signal, whose
/// `Control` (shared with its tasks) would otherwise never be dropped, leaving the
/// nodes running.
pub fn take_down_running() {
    let Some(dir) = RUNNING.lock().expect("running lock").take() else { return };
    eprintln!("agora chaos: stopped; taking the cluster in {} down", dir.display());
    if let Err(e) = cluster_in(&dir, &["down"]) {
        eprintln!("agora chaos: taking the cluster down failed: {e:#}");
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("agora chaos: taking the cluster down failed: {e:#}");
        }
    }
}
