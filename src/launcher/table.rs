//! What the nodes say about themselves: one [`NodeView`] per node from its HTTP API, its
//! pid file and /proc, rendered as the status table (and as JSON for scripts).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::state::{proc_state, StateDir};
use crate::config::{ClusterConfig, NodeInfo};

/// Per-request bound: a paused or cut-off node must not stall the whole table.
const PROBE_TIMEOUT_MS: u64 = 1500;

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub node: String,
    pub dc: String,
    pub ip: String,
    pub api: String,
    /// The node's admin API (its own listener; wants the admin token).
    pub admin: String,
    pub pid: Option<i32>,
    pub role: String,
    pub leader: Option<String>,
    pub term: Option<u64>,
    pub commit_index: Option<u64>,
    /// The shards this node leads, of those it holds a replica of (shard 0's role is `role`).
    pub shards_led: Option<(usize, usize)>,
    /// ok (answers and knows its leader), no-leader, paused, down, unreachable.
    pub health: String,
}

impl NodeView {
    pub fn healthy(&self) -> bool {
        self.health == "ok"
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(PROBE_TIMEOUT_MS))
        // Node addresses are private IPs of this machine: never go through a proxy.
        .no_proxy()
        .build()
        .expect("build http client")
}

async fn probe(http: &reqwest::Client, st: &StateDir, n: &NodeInfo) -> NodeView {
    let pid = st.live_pid(&n.name);
    let status: Option<Value> = match pid {
        Some(_) => match http.get(format!("http://{}/v1/cluster/status", n.http)).send().await {
            Ok(r) if r.status().is_success() => r.json().await.ok(),
            _ => None,
        },
        None => None,
    };
    let health = match (&status, pid) {
        (_, None) => "down",
        (None, Some(p)) if proc_state(p) == Some('T') => "paused",
        (None, Some(_)) => "unreachable",
        (Some(s), _) if s["leader"].is_string() => "ok",
        (Some(_), _) => "no-leader",
    };
    let s = status.unwrap_or(Value::Null);
    NodeView {
        node: n.name.clone(),
        dc: n.dc.clone(),
        ip: n.host.clone().unwrap_or_else(|| n.http.ip().to_string()),
        api: n.http_url(),
        admin: format!("http://{}", n.admin),
        pid,
        role: s["role"].as_str().unwrap_or("-").to_string(),
        leader: s["leader"].as_str().map(String::from),
        term: s["term"].as_u64(),
        commit_index: s["commit_index"].as_u64(),
        // Of the shards it holds a replica of (all of them unless `cluster.replicas`).
        shards_led: s["shards"]
            .as_array()
            .map(|all| (all.iter().filter(|x| x["role"] == "leader").count(), all.iter().filter(|x| x["hosted"] != false).count())),
        health: health.to_string(),
    }
}

/// Asks every node at once.
pub async fn collect(http: &reqwest::Client, st: &StateDir, cfg: &ClusterConfig) -> Vec<NodeView> {
    let nodes = cfg.nodes();
    futures::future::join_all(nodes.iter().map(|n| probe(http, st, n))).await
}

/// DCs whose answering nodes all name the same leader, and that leader answers as leader.
pub fn dcs_with_leader(views: &[NodeView]) -> BTreeMap<String, String> {
    let mut by_dc: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
    for v in views {
        by_dc.entry(&v.dc).or_default().push(v);
    }
    let mut out = BTreeMap::new();
    for (dc, vs) in by_dc {
        let leaders: Vec<&str> = vs.iter().filter_map(|v| v.leader.as_deref()).collect();
        let Some(&first) = leaders.first() else { continue };
        let agreed = leaders.iter().all(|l| *l == first);
        let confirmed = vs.iter().any(|v| v.node == first && v.role == "leader");
        if agreed && confirmed {
            out.insert(dc.to_string(), first.to_string());
        }
    }
    out
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

pub fn render(views: &[NodeView]) -> String {
    let mut rows = vec![["NODE", "DC", "IP", "ROLE", "LEADS", "TERM", "COMMIT", "HEALTH", "API"].map(String::from).to_vec()];
    for v in views {
        let leads = v.shards_led.map(|(led, of)| format!("{led}/{of}"));
        rows.push(vec![
            v.node.clone(),
            v.dc.clone(),
            v.ip.clone(),
            v.role.clone(),
            opt(leads),
            opt(v.term),
            opt(v.commit_index),
            v.health.clone(),
            v.api.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

pub fn summary(views: &[NodeView], dc_count: usize) -> String {
    let healthy = views.iter().filter(|v| v.healthy()).count();
    let leaders = dcs_with_leader(views).len();
    format!("{healthy} of {} nodes healthy; {leaders} of {dc_count} DCs have a leader", views.len())
}

/// Ready-to-paste commands against the first node of each DC.
pub fn hints(cfg: &ClusterConfig, certs: &std::path::Path) -> String {
    let mut s = String::from("Try it:\n");
    if let Some(n) = cfg.nodes().first() {
        let api = format!("http://{}", n.http);
        s += &format!("  curl -s {api}/v1/cluster/status\n");
        s += &format!("  curl -s -X POST {api}/v1/sessions -H 'content-type: application/json' -d '{{\"user\":\"alice\"}}'\n");
        s += &format!("  curl -s -X PUT {api}/v1/inventory/sku-1 -H 'content-type: application/json' -d '{{\"add\":100}}'\n");
        s += &format!("  curl -s -X POST {api}/v1/orders -H 'content-type: application/json' -d '{{\"session\":\"TOKEN\",\"sku\":\"sku-1\",\"qty\":1}}'\n");
        s += &format!("  dig @{} -p {} shop.{} +short\n", n.dns.ip(), n.dns.port(), cfg.cluster.zone.trim_end_matches('.'));
        s += &format!(
            "  curl -s -H \"authorization: Bearer $(cat {})\" http://{}/v1/admin/dcs   # admin API\n",
            crate::certs::token_path(certs).display(),
            n.admin
        );
    }
    for dc in &cfg.dcs {
        if let Some(n) = cfg.dc_nodes(&dc.name).first() {
            s += &format!("  dig @{} -p {} leader.{}.{} +short\n", n.dns.ip(), n.dns.port(), dc.name, cfg.cluster.zone.trim_end_matches('.'));
        }
    }
    s
}
