//! The workload: clients in every DC that find their DC's nodes through the cluster's own
//! DNS (`dcN.shop.<zone>`), fail over between them, and record every call — invoke and
//! completion times, node, result — as the history the checker reads.
//!
//! Clients never retry a write (a retry is a new operation): the rule under which the
//! checker's per-(DC, SKU) linearizability model holds. With `roam_share` above 0, clients also follow the shop's DNS name as real
//! clients do: they ask `shop.<zone>` of the other DCs' servers, send that share of
//! their calls to a DC other than their home (its leader, as DNS names it), and move
//! home for good once every other DC has left their home out of its answers for
//! `move_after_ms` (their home failed). Their sessions and orders then live in one DC
//! and are used from another — what the checker's read-your-writes rule checks.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Message, Query};
use hickory_server::proto::rr::{Name, RData, RecordType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::control::Control;
use super::history::{Op, Outcome, Record, SessionVersion, SoldOut};
use super::scenario::WorkloadSpec;
use crate::config::NodeInfo;

/// One clock for the whole run: nanoseconds since the start.
#[derive(Clone)]
pub struct Clock {
    start: tokio::time::Instant,
    /// `CLOCK_MONOTONIC` at the start, to read the nodes' escrow journals on this clock.
    start_monotonic_ns: u64,
}

impl Clock {
    pub fn new() -> Self {
        Clock { start: tokio::time::Instant::now(), start_monotonic_ns: crate::escrow_journal::monotonic_ns() }
    }
    /// A `CLOCK_MONOTONIC` time (from a node's journal) on this clock; 0 before the start.
    pub fn from_monotonic_ns(&self, ns: u64) -> u64 {
        ns.saturating_sub(self.start_monotonic_ns)
    }
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    pub fn at(&self, secs: f64) -> tokio::time::Instant {
        self.start + Duration::from_secs_f64(secs)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Collects records from every client.
#[derive(Clone)]
pub struct Recorder {
    next_id: Arc<AtomicU64>,
    records: Arc<Mutex<Vec<Record>>>,
    clock: Clock,
}

impl Recorder {
    pub fn new(clock: Clock) -> Self {
        Recorder { next_id: Arc::new(AtomicU64::new(1)), records: Default::default(), clock }
    }
    pub async fn take(&self) -> Vec<Record> {
        let mut r = std::mem::take(&mut *self.records.lock().await);
        r.sort_by_key(|r| r.id);
        r
    }
    async fn push(&self, rec: Record) {
        self.records.lock().await.push(rec);
    }
}

/// The answer to one HTTP call.
struct Reply {
    status: u16,
    body: Value,
    outcome: Outcome,
}

/// 2xx happened; 4xx did not; a 503 happened or not as its code says: `no_quorum`,
/// `overloaded`, `unreachable` and `node_stopped` are refused before anything is
/// proposed, `timeout` and `unknown_outcome` may have been applied.
fn outcome_of(status: u16, body: &Value) -> Outcome {
    match status {
        // Accepted, not done: may or may not happen.
        202 => Outcome::Unknown,
        200..=299 => Outcome::Ok,
        400..=499 => Outcome::Fail,
        503 if matches!(body["error"]["code"].as_str(), Some("no_quorum" | "overloaded" | "unreachable" | "owner_unreachable" | "node_stopped")) => {
            Outcome::Fail
        }
        _ => Outcome::Unknown,
    }
}

struct Client {
    name: String,
    dc: String,
    spec: WorkloadSpec,
    skus: Vec<String>,
    control: Arc<Control>,
    http: reqwest::Client,
    rec: Recorder,
    rng: StdRng,
    nodes: Vec<NodeInfo>,
    next_node: usize,
    resolved_at: Option<Instant>,
    /// Roaming: the healthy DCs' addresses as other DCs' DNS servers answer `shop.<zone>`.
    shop: Vec<NodeInfo>,
    shop_at: Option<Instant>,
    /// Since when every other DC's answer has left the home DC out.
    home_missing_since: Option<Instant>,
    session: Option<String>,
    /// Tokens this client logged out (the latest few), read again now and then: a DC that
    /// acknowledged a logout must never show that session live again.
    gone: Vec<String>,
    /// Orders this client placed and saw acknowledged: (id, sku, qty, still live).
    orders: Vec<(String, String, u64, bool)>,
    seq: u64,
}

impl Client {
    async fn call(&mut self, node: &NodeInfo, method: reqwest::Method, path: &str, body: Option<Value>) -> Reply {
        self.call_keyed(node, method, path, body, None).await
    }

    async fn call_keyed(&mut self, node: &NodeInfo, method: reqwest::Method, path: &str, body: Option<Value>, key: Option<&str>) -> Reply {
        let mut req = self.http.request(method, format!("http://{}{path}", node.http));
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.json().await.unwrap_or(Value::Null);
                Reply { outcome: outcome_of(status, &body), status, body }
            }
            // Refused connection: the request never left this machine.
            Err(e) if e.is_connect() => Reply { status: 0, body: Value::Null, outcome: Outcome::Fail },
            Err(_) => Reply { status: 0, body: Value::Null, outcome: Outcome::Unknown },
        }
    }

    /// This DC's nodes as its DNS names them (`dcN.shop.<zone>`), refreshed every few
    /// seconds; the config's list when no DNS server answers.
    async fn pick_node(&mut self) -> NodeInfo {
        if self.spec.roam_share > 0.0 {
            self.follow_shop_dns().await;
            if self.rng.gen_bool(self.spec.roam_share.min(1.0)) {
                let away: Vec<NodeInfo> = self.shop.iter().filter(|n| n.dc != self.dc).cloned().collect();
                if !away.is_empty() {
                    return away[self.rng.gen_range(0..away.len())].clone();
                }
            }
        }
        if self.resolved_at.is_none_or(|t| t.elapsed() > Duration::from_secs(3)) || self.nodes.is_empty() {
            self.nodes = resolve_dc(&self.control, &self.dc).await;
            self.resolved_at = Some(Instant::now());
        }
        self.next_node = (self.next_node + 1) % self.nodes.len();
        self.nodes[self.next_node].clone()
    }

    /// Asks `shop.<zone>` of one server in each other DC (every 3 s, every second while
    /// home looks down, or after a lost call), keeps the union as the roaming targets, and
    /// moves home for good to the first DC answered once home has been missing from every
    /// answer for `move_after_ms`.
    async fn follow_shop_dns(&mut self) {
        let every = if self.home_missing_since.is_some() { Duration::from_secs(1) } else { Duration::from_secs(3) };
        if self.shop_at.is_some_and(|t| t.elapsed() < every) && self.resolved_at.is_some() {
            return;
        }
        self.shop_at = Some(Instant::now());
        let name = format!("shop.{}", self.control.config.cluster.zone);
        let all: Vec<NodeInfo> = self.control.config.dc_names().iter().flat_map(|d| self.control.nodes(d)).collect();
        let (mut seen, mut answered, mut home_named) = (Vec::<NodeInfo>::new(), 0, false);
        for dc in self.control.config.dc_names().into_iter().filter(|d| *d != self.dc) {
            let servers = self.control.nodes(&dc);
            let start = self.rng.gen_range(0..servers.len().max(1));
            for server in servers.iter().cycle().skip(start).take(servers.len()) {
                if let Some(ips) = query_a(server.dns, &name).await {
                    answered += 1;
                    for n in all.iter().filter(|n| ips.contains(&n.http.ip())) {
                        home_named |= n.dc == self.dc;
                        if !seen.iter().any(|s| s.name == n.name) {
                            seen.push(n.clone());
                        }
                    }
                    break;
                }
            }
        }
        self.shop = seen;
        if answered == 0 || home_named {
            self.home_missing_since = None;
            return;
        }
        let since = *self.home_missing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= Duration::from_millis(self.spec.move_after_ms) {
            if let Some(new_home) = self.shop.iter().map(|n| n.dc.clone()).find(|d| *d != self.dc) {
                tracing::info!(client = %self.name, from = %self.dc, to = %new_home, "home DC left every DNS answer; moving for good");
                self.dc = new_home;
                self.home_missing_since = None;
                self.resolved_at = None;
                self.nodes.clear();
            }
        }
    }

    /// An id and invoke time, taken just before the call is sent.
    fn begin(&self) -> (u64, u64) {
        (self.rec.next_id.fetch_add(1, Ordering::Relaxed), self.rec.clock.now_ns())
    }

    /// Records a finished call; an unknown outcome has no completion time.
    async fn finish(&mut self, (id, invoke_ns): (u64, u64), node: NodeInfo, reply: &Reply, op: Op) -> Outcome {
        let complete_ns = (reply.outcome != Outcome::Unknown).then(|| self.rec.clock.now_ns());
        if reply.outcome == Outcome::Unknown {
            // Lost in a fault: ask DNS again before the next call.
            self.resolved_at = None;
        }
        let error = reply.body["error"]
            .is_object()
            .then(|| format!("{}: {}", reply.body["error"]["code"].as_str().unwrap_or("?"), reply.body["error"]["message"].as_str().unwrap_or("?")));
        let rec = Record {
            id,
            client: self.name.clone(),
            node: node.name,
            dc: node.dc,
            op,
            invoke_ns,
            complete_ns,
            outcome: reply.outcome,
            status: reply.status,
            error,
        };
        self.rec.push(rec).await;
        reply.outcome
    }

    async fn restock(&mut self, sku: String, add: u64) -> Outcome {
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call(&node, reqwest::Method::PUT, &format!("/v1/inventory/{sku}"), Some(json!({"add": add}))).await;
        let op = Op::Restock { sku, add, available_after: reply.body["available"].as_u64() };
        self.finish(begun, node, &reply, op).await
    }

    async fn session(&mut self) -> Outcome {
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call(&node, reqwest::Method::POST, "/v1/sessions", Some(json!({"user": self.name}))).await;
        let token = reply.body["token"].as_str().map(String::from);
        if reply.outcome == Outcome::Ok {
            self.session = token.clone();
        }
        let op = Op::Session { user: self.name.clone(), token, version: SessionVersion::of_answer(&reply.body) };
        self.finish(begun, node, &reply, op).await
    }

    /// Logs the session out. Unless refused, the session is done with (even an unknown
    /// outcome may have deleted it): the next step opens another, and the orders placed
    /// with it are no longer cancellable by this client.
    async fn logout(&mut self) {
        let Some(token) = self.session.clone() else { return };
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call(&node, reqwest::Method::DELETE, &format!("/v1/sessions/{token}"), None).await;
        if reply.outcome != Outcome::Fail {
            self.session = None;
            self.orders.iter_mut().for_each(|o| o.3 = false);
            self.gone.push(token.clone());
            if self.gone.len() > GONE_KEPT {
                self.gone.remove(0);
            }
        }
        self.finish(begun, node, &reply, Op::Logout { token }).await;
    }

    async fn order(&mut self) {
        let Some(session) = self.session.clone() else { return };
        let sku = self.skus[self.rng.gen_range(0..self.skus.len())].clone();
        let qty = self.rng.gen_range(1..=2u64);
        self.seq += 1;
        let key = format!("{}-{}", self.name, self.seq);
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call_keyed(&node, reqwest::Method::POST, "/v1/orders", Some(json!({"session": session, "sku": sku, "qty": qty})), Some(&key)).await;
        let order_id = reply.body["id"].as_str().map(String::from);
        let sold_out = (reply.body["error"]["code"] == "sold_out").then(|| SoldOut { available: reply.body["error"]["available"].as_u64().unwrap_or(0) });
        if let (Outcome::Ok, Some(id)) = (reply.outcome, &order_id) {
            self.orders.push((id.clone(), sku.clone(), qty, true));
        }
        let op = Op::Order { sku, qty, session, idempotency_key: Some(key), order_id, sold_out };
        self.finish(begun, node, &reply, op).await;
    }

    async fn cancel(&mut self) {
        let live: Vec<usize> = (0..self.orders.len()).filter(|i| self.orders[*i].3).collect();
        let Some(&i) = live.get(self.rng.gen_range(0..live.len().max(1))) else { return };
        let (order_id, sku, qty, _) = self.orders[i].clone();
        // The session that placed it: the only one allowed to cancel it.
        let Some(session) = self.session.clone() else { return };
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call(&node, reqwest::Method::POST, &format!("/v1/orders/{order_id}/cancel"), Some(json!({"session": session.clone()}))).await;
        if reply.outcome != Outcome::Fail {
            // Ok, or unknown: either way it is not ours to cancel again.
            self.orders[i].3 = false;
        }
        let order_dc = super::history::order_origin(&order_id).unwrap_or_default().to_string();
        let op = Op::Cancel { order_id, order_dc, qty, sku, session: Some(session) };
        self.finish(begun, node, &reply, op).await;
    }

    async fn read_inventory(&mut self) {
        let sku = self.skus[self.rng.gen_range(0..self.skus.len())].clone();
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call(&node, reqwest::Method::GET, &format!("/v1/inventory/{sku}"), None).await;
        let op = Op::ReadInventory { sku, available: reply.body["available"].as_u64() };
        self.finish(begun, node, &reply, op).await;
    }

    async fn read_order(&mut self) {
        let Some((order_id, ..)) = self.orders.get(self.rng.gen_range(0..self.orders.len().max(1))).cloned() else { return };
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call(&node, reqwest::Method::GET, &format!("/v1/orders/{order_id}"), None).await;
        let op = Op::ReadOrder { order_id, order_status: reply.body["status"].as_str().map(String::from) };
        self.finish(begun, node, &reply, op).await;
    }

    /// Reads the live session, or (one time in four, if there is one) a logged-out one.
    async fn read_session(&mut self) {
        let old = (!self.gone.is_empty() && self.rng.gen_range(0..4) == 0).then(|| self.gone[self.rng.gen_range(0..self.gone.len())].clone());
        let Some(token) = old.or_else(|| self.session.clone()) else { return };
        let node = self.pick_node().await;
        let begun = self.begin();
        let reply = self.call(&node, reqwest::Method::GET, &format!("/v1/sessions/{token}"), None).await;
        let op = Op::ReadSession { token, user: reply.body["user"].as_str().map(String::from), version: SessionVersion::of_answer(&reply.body) };
        self.finish(begun, node, &reply, op).await;
    }

    async fn step(&mut self) {
        if self.session.is_none() {
            // Logged out: log in again first.
            self.session().await;
            return;
        }
        let w = &self.spec;
        let total = w.order + w.cancel + w.read_inventory + w.read_order + w.restock + w.read_session + w.logout;
        let mut pick = self.rng.gen_range(0..total);
        let kinds = [(w.order, 0), (w.cancel, 1), (w.read_inventory, 2), (w.read_order, 3), (w.restock, 4), (w.read_session, 5), (w.logout, 6)];
        for (weight, kind) in kinds {
            if pick < weight {
                return match kind {
                    0 => self.order().await,
                    1 => self.cancel().await,
                    2 => self.read_inventory().await,
                    3 => self.read_order().await,
                    5 => self.read_session().await,
                    6 => self.logout().await,
                    _ => {
                        let sku = self.skus[self.rng.gen_range(0..self.skus.len())].clone();
                        let add = self.rng.gen_range(1..=10);
                        self.restock(sku, add).await;
                    }
                };
            }
            pick -= weight;
        }
    }
}

/// Logged-out tokens a client keeps to read again.
const GONE_KEPT: usize = 4;

/// Asks the DC's DNS servers for `dcN.shop.<zone>` and maps the answer to nodes.
async fn resolve_dc(control: &Control, dc: &str) -> Vec<NodeInfo> {
    let nodes = control.nodes(dc);
    let name = format!("{dc}.shop.{}", control.config.cluster.zone);
    for server in nodes.iter().map(|n| n.dns) {
        if let Some(ips) = query_a(server, &name).await {
            let found: Vec<NodeInfo> = nodes.iter().filter(|n| ips.contains(&n.http.ip())).cloned().collect();
            if !found.is_empty() {
                return found;
            }
        }
    }
    nodes
}

async fn query_a(server: SocketAddr, name: &str) -> Option<Vec<IpAddr>> {
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    let bytes = msg.to_vec().ok()?;
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.ok()?;
    sock.send_to(&bytes, server).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await.ok()?.ok()?;
    let reply = Message::from_vec(&buf[..len]).ok()?;
    Some(reply.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(IpAddr::V4(a.0)) } else { None }).collect())
}

pub struct Workload {
    pub spec: WorkloadSpec,
    pub skus: Vec<String>,
    pub seed: u64,
}

impl Workload {
    /// Stocks every SKU in every DC and opens each client's session (both recorded: the
    /// checker's model starts from zero), then runs the clients until `until`.
    pub async fn run(&self, control: Arc<Control>, rec: Recorder, until: tokio::time::Instant) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_millis(self.spec.timeout_ms)).build()?;
        let mut clients = Vec::new();
        for (d, dc) in control.config.dc_names().into_iter().enumerate() {
            for c in 0..self.spec.clients_per_dc {
                let seed = self.seed.wrapping_mul(7919).wrapping_add((d * 100 + c) as u64);
                clients.push(Client {
                    name: format!("{dc}-c{c}"),
                    dc: dc.clone(),
                    spec: self.spec.clone(),
                    skus: self.skus.clone(),
                    control: control.clone(),
                    http: http.clone(),
                    rec: rec.clone(),
                    rng: StdRng::seed_from_u64(seed),
                    nodes: Vec::new(),
                    next_node: c,
                    resolved_at: None,
                    shop: Vec::new(),
                    shop_at: None,
                    home_missing_since: None,
                    session: None,
                    gone: Vec::new(),
                    orders: Vec::new(),
                    seq: 0,
                });
            }
        }
        // One client per DC stocks that DC before anyone buys.
        for client in clients.iter_mut().filter(|c| c.name.ends_with("-c0")) {
            // At home, whatever the roaming share.
            client.spec.roam_share = 0.0;
            for sku in self.skus.clone() {
                while client.restock(sku.clone(), self.spec.stock_per_dc).await == Outcome::Unknown {}
            }
            client.spec.roam_share = self.spec.roam_share;
        }
        let period = Duration::from_secs_f64(1.0 / self.spec.rate_per_client);
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                tokio::spawn(async move {
                    while c.session.is_none() && tokio::time::Instant::now() < until {
                        c.session().await;
                    }
                    let mut next = tokio::time::Instant::now();
                    while next < until {
                        tokio::time::sleep_until(next).await;
                        next += period;
                        c.step().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        Ok(())
    }
}
