//! The operators' console: what one node can see of the whole cluster, for the page at
//! `/ui` and `GET /v1/console`.
//!
//! Every second a round asks every configured node for its `/v1/cluster/status` and
//! `/metrics` over HTTP (the same port a client uses, so a node this one cannot reach
//! shows as down *from here*), and every [`DIGEST_EVERY`] rounds one node per DC (its
//! leader when known) for `/v1/cluster/digest`. Rounds run only while someone has looked
//! at this node's console in the last [`VIEW_KEEPALIVE`]: nine nodes polling each other
//! every second would be work nobody reads. Unwatched, a DC leader still compares the
//! digests every [`DIGEST_EVERY`] seconds, for `agora_digests_diverged_seconds`.
//! History is bounded: [`rates::HISTORY_LEN`] points per DC.

pub mod promtext;
pub mod rates;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};

use crate::cluster_view::ClusterView;
use crate::config::ClusterConfig;
use crate::config::NodeInfo;
use crate::dns::DnsView;
use crate::replication::CrossDc;
use rates::{OrderCounters, Rates};

/// Time between rounds.
pub const ROUND: Duration = Duration::from_secs(1);
/// Digests scan the whole state: asked for every this many rounds only.
pub const DIGEST_EVERY: u32 = 5;
/// A follower keeps sampling this long after its console was last asked for.
pub const VIEW_KEEPALIVE: Duration = Duration::from_secs(60);
/// One fetch from another node; below the round so a dead node never delays the next.
const FETCH_TIMEOUT: Duration = Duration::from_millis(800);
/// A metrics body larger than this is not read (another node's answer: bounded).
const BODY_BYTES_MAX: usize = 4 << 20;

/// What one node answered in the last round (or why it did not).
#[derive(Debug, Clone)]
struct NodeSample {
    status: Result<Value, String>,
}

/// A DC's digest and which node gave it.
#[derive(Debug, Clone)]
struct DigestSample {
    node: String,
    all: String,
}

#[derive(Default)]
struct Seen {
    /// When the last round ended (monotonic) and its wall clock.
    at: Option<Instant>,
    at_ms: u64,
    rounds: u64,
    nodes: BTreeMap<String, NodeSample>,
    digests: BTreeMap<String, DigestSample>,
    digests_at: Option<Instant>,
    /// Since when the DCs' digests differ (None: equal at the last comparison).
    diverged_since: Option<Instant>,
}

pub struct Console {
    info: NodeInfo,
    config: Arc<ClusterConfig>,
    cross: Arc<CrossDc>,
    http: reqwest::Client,
    view: ClusterView,
    // std Mutexes: held to copy or update, never across an await.
    seen: Mutex<Seen>,
    rates: Mutex<Rates>,
    viewed_at: Mutex<Option<Instant>>,
    /// One round at a time (the loop and a request that finds the data stale).
    round_lock: tokio::sync::Mutex<()>,
}

impl Console {
    pub fn new(info: NodeInfo, cross: Arc<CrossDc>) -> Arc<Console> {
        let mut http = reqwest::Client::builder().timeout(FETCH_TIMEOUT).pool_max_idle_per_host(1);
        // On loopback every node would otherwise connect from 127.0.0.1 and share that
        // source's connection cap at the others' doors.
        if info.http.ip().is_loopback() {
            http = http.local_address(info.http.ip());
        }
        let http = http.build().expect("http client");
        Arc::new(Console {
            view: ClusterView::new(cross.clone()),
            config: cross.shard.config.clone(),
            info,
            cross,
            http,
            seen: Default::default(),
            rates: Default::default(),
            viewed_at: Default::default(),
            round_lock: Default::default(),
        })
    }

    /// Samples every [`ROUND`] while the console is watched; unwatched, a DC leader
    /// only compares digests every [`DIGEST_EVERY`] rounds (for `/metrics`).
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tick.tick().await;
            // Counts rounds modulo the digest cadence: stays below DIGEST_EVERY.
            ticks = (ticks + 1) % DIGEST_EVERY;
            let watched = self.viewed_at.lock().expect("console lock").is_some_and(|t| t.elapsed() < VIEW_KEEPALIVE);
            if watched {
                self.round().await;
            } else if self.cross.shard.is_leader() && ticks == 0 {
                self.digest_round().await;
            }
        }
    }

    /// The console's JSON; runs a round first when the last one is stale (the first
    /// look at a follower's console).
    pub async fn snapshot(&self) -> Value {
        *self.viewed_at.lock().expect("console lock") = Some(Instant::now());
        let stale = self.seen.lock().expect("console lock").at.is_none_or(|t| t.elapsed() > ROUND * 3);
        if stale {
            self.round().await;
        }
        self.to_json()
    }

    async fn round(&self) {
        let _one = self.round_lock.lock().await;
        let nodes = self.config.nodes();
        let fetched = join_all(nodes.iter().map(|n| self.fetch_node(n))).await;
        let mut counters: BTreeMap<String, Vec<(String, OrderCounters)>> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for (n, (status, metrics)) in nodes.iter().zip(fetched) {
            if let Some(c) = metrics {
                counters.entry(n.dc.clone()).or_default().push((n.name.clone(), c));
            }
            samples.insert(n.name.clone(), NodeSample { status });
        }
        let at_ms = crate::hlc::wall_ms();
        self.rates.lock().expect("console lock").record(at_ms, &counters);
        let rounds = {
            let mut seen = self.seen.lock().expect("console lock");
            seen.nodes = samples;
            seen.at = Some(Instant::now());
            seen.at_ms = at_ms;
            seen.rounds = seen.rounds.saturating_add(1);
            seen.rounds
        };
        if rounds % u64::from(DIGEST_EVERY) == 1 {
            self.digest_round().await;
        }
    }

    async fn fetch_node(&self, n: &NodeInfo) -> (Result<Value, String>, Option<OrderCounters>) {
        let base = n.http_url();
        let (status, metrics) = tokio::join!(self.get_text(format!("{base}/v1/cluster/status")), self.get_text(format!("{base}/metrics")));
        let status = status.and_then(|t| serde_json::from_str(&t).map_err(|e| format!("bad status: {e}")));
        (status, metrics.ok().map(|t| OrderCounters::from_metrics(&t)))
    }

    async fn get_text(&self, url: String) -> Result<String, String> {
        let resp = self.http.get(url).send().await.map_err(|e| short_error(&e))?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|l| l > BODY_BYTES_MAX as u64) {
            return Err("answer too large".into());
        }
        let bytes = resp.bytes().await.map_err(|e| short_error(&e))?;
        if bytes.len() > BODY_BYTES_MAX {
            return Err("answer too large".into());
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| "answer is not UTF-8".into())
    }

    /// One digest per DC, from its leader (else any node that answered); compared.
    async fn digest_round(&self) {
        let askees: Vec<(String, NodeInfo)> = {
            let seen = self.seen.lock().expect("console lock");
            self.config.dc_names().into_iter().filter_map(|dc| Some((dc.clone(), digest_source(self, &seen, &dc)?))).collect()
        };
        let answers = join_all(askees.iter().map(|(_, n)| self.get_text(format!("{}/v1/cluster/digest?recent=true", n.http_url())))).await;
        let mut digests = BTreeMap::new();
        for ((dc, n), a) in askees.into_iter().zip(answers) {
            let all = a.ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()).and_then(|v| v["all"].as_str().map(str::to_string));
            if let Some(all) = all {
                digests.insert(dc, DigestSample { node: n.name, all });
            }
        }
        let mut seen = self.seen.lock().expect("console lock");
        let equal = digests.values().all(|d| digests.values().next().is_some_and(|f| f.all == d.all));
        seen.diverged_since = if equal { None } else { seen.diverged_since.or(Some(Instant::now())) };
        seen.digests = digests;
        seen.digests_at = Some(Instant::now());
    }

    /// Seconds the DCs' digests have differed, while digests are being compared here
    /// (`None`: no comparison in the last [`DIGEST_EVERY`] × 3 rounds).
    pub fn diverged_seconds(&self) -> Option<f64> {
        let seen = self.seen.lock().expect("console lock");
        let fresh = seen.digests_at.is_some_and(|t| t.elapsed() < ROUND * DIGEST_EVERY * 3);
        fresh.then(|| seen.diverged_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0))
    }

    fn to_json(&self) -> Value {
        let (config, info) = (&self.config, &self.info);
        let seen = self.seen.lock().expect("console lock");
        let rates = self.rates.lock().expect("console lock");
        let dns = self.view.snapshot();
        let (answer, fail_open) = crate::dns::shop_answer(&dns);
        let dcs: Vec<Value> = config
            .dc_names()
            .into_iter()
            .map(|dc| {
                let settings = dns.dcs.iter().find(|d| d.name == dc);
                let nodes: Vec<Value> = config.dc_nodes(&dc).iter().map(|n| node_json(n, seen.nodes.get(&n.name))).collect();
                json!({
                    "name": dc,
                    "local": dc == info.dc,
                    "health": dc_health(&nodes),
                    "healthy_from_here": settings.is_some_and(|d| d.healthy),
                    "drained": settings.is_some_and(|d| d.drained),
                    "weight": settings.map(|d| d.weight),
                    "nodes": nodes,
                    "digest": seen.digests.get(&dc).map(|d| json!({"all": d.all, "node": d.node})),
                    "history": rates.history(&dc),
                })
            })
            .collect();
        let (links_down, has_leader) = self.own_links();
        json!({
            "node": info.name,
            "dc": info.dc,
            "at_ms": seen.at_ms,
            "sample_age_ms": seen.at.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            "round_ms": ROUND.as_millis() as u64,
            "self": {"leader_known": has_leader, "links_down": links_down},
            "dcs": dcs,
            "links": links_json(config, &seen),
            "dns": {
                "name": format!("shop.{}", dns.zone.trim_end_matches('.')),
                "answer": answer.iter().map(|(dc, ip)| json!({"dc": dc, "ip": ip.to_string()})).collect::<Vec<_>>(),
                "fail_open": fail_open,
            },
            "digests": {
                "compared": seen.digests.keys().collect::<Vec<_>>(),
                "converged": seen.digests_at.map(|_| seen.diverged_since.is_none()),
                "diverged_for_s": seen.diverged_since.map(|t| t.elapsed().as_secs_f64()),
                "age_ms": seen.digests_at.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            },
        })
    }

    /// This node's own view: the DCs it has lost contact with, and whether it knows a leader.
    fn own_links(&self) -> (Vec<String>, bool) {
        let down = self.config.dc_names().into_iter().filter(|dc| *dc != self.info.dc && !self.cross.links.reachable(dc)).collect();
        (down, self.cross.shard.leader().is_some())
    }
}

/// Where to ask a DC's digest: its leader as this node knows it (Raft for its own DC,
/// the probes for the others), else a node that answered the last round.
fn digest_source(console: &Console, seen: &Seen, dc: &str) -> Option<NodeInfo> {
    let members = console.config.dc_nodes(dc);
    let leader = if dc == console.info.dc { console.cross.shard.leader() } else { console.cross.links.get(dc).remote_leader };
    let answered = |n: &&NodeInfo| seen.nodes.get(&n.name).is_some_and(|s| s.status.is_ok());
    leader.and_then(|id| members.iter().find(|m| m.id == id).cloned()).or_else(|| members.iter().find(answered).cloned())
}

fn node_json(n: &NodeInfo, sample: Option<&NodeSample>) -> Value {
    let mut v = json!({"name": n.name, "http": n.authority(n.http)});
    match sample.map(|s| &s.status) {
        Some(Ok(st)) => {
            v["state"] = json!(if st["leader"].is_string() { "up" } else { "no_leader" });
            // Role, term and indexes are shard 0's; with shards, how many this node leads.
            for k in ["role", "term", "commit_index", "applied_index", "leader"] {
                v[k] = st[k].clone();
            }
            if let Some(shards) = st["shards"].as_array() {
                v["shards"] = json!(shards.len());
                v["leads"] = json!(shards.iter().filter(|s| s["role"] == "leader").count());
                v["hosted"] = json!(shards.iter().filter(|s| s["hosted"] != false).count());
            }
        }
        Some(Err(e)) => {
            v["state"] = json!("down");
            v["error"] = json!(e);
        }
        None => v["state"] = json!("unknown"),
    }
    v
}

/// `up`: a node answers and knows a leader; `no_leader`: nodes answer but know none;
/// `down`: no node answered this node; `unknown`: not sampled yet.
fn dc_health(nodes: &[Value]) -> &'static str {
    let state = |s: &str| nodes.iter().any(|n| n["state"] == s);
    if state("up") {
        "up"
    } else if state("no_leader") {
        "no_leader"
    } else if state("down") {
        "down"
    } else {
        "unknown"
    }
}

/// Every ordered pair of DCs, as the origin's leader sees it: whether it hears from the
/// other DC, and how far that DC is behind the origin's events.
fn links_json(config: &ClusterConfig, seen: &Seen) -> Vec<Value> {
    let dcs = config.dc_names();
    let mut out = Vec::new();
    for from in &dcs {
        let leader_status = config.dc_nodes(from).iter().find_map(|n| {
            let st = seen.nodes.get(&n.name)?.status.as_ref().ok()?;
            (st["role"] == "leader").then(|| st.clone())
        });
        for to in dcs.iter().filter(|d| *d != from) {
            let link = leader_status.as_ref().and_then(|st| st["dcs"].as_array()?.iter().find(|d| d["name"] == to.as_str()).cloned());
            out.push(match link {
                Some(l) => json!({
                    "from": from, "to": to,
                    "state": if l["reachable"] == true { "up" } else { "cut" },
                    "lag_events": l["lag_events"], "lag_ms": l["lag_ms"], "last_contact_ms": l["last_contact_ms"],
                }),
                None => json!({"from": from, "to": to, "state": "unknown"}),
            });
        }
    }
    out
}

/// reqwest's errors chain causes; the first line is enough for the page.
fn short_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else {
        e.to_string().lines().next().unwrap_or("error").to_string()
    }
}
