//! The checker's input: the history of client operations (JSON lines) and the final state
//! gathered after healing (one JSON document). The workload and nemeses write these; the
//! checker only reads them, so this file is the contract between the two.
//!
//! # History: one [`Record`] per line
//!
//! ```text
//! {"id":1,"client":"c1","node":"dc1-n2","dc":"dc1","op":{"kind":"restock","sku":"s1","add":10,"available_after":10},"invoke_ns":1000,"complete_ns":2000,"outcome":"ok","status":200}
//! {"id":2,"client":"c2","node":"dc1-n1","dc":"dc1","op":{"kind":"order","sku":"s1","qty":2,"session":"t9","idempotency_key":"k2","order_id":"dc1-7f3a"},"invoke_ns":2500,"complete_ns":3100,"outcome":"ok","status":201}
//! {"id":3,"client":"c3","node":"dc2-n1","dc":"dc2","op":{"kind":"read_inventory","sku":"s1"},"invoke_ns":2600,"complete_ns":null,"outcome":"unknown","status":503}
//! ```
//!
//! Blank lines are skipped; unknown top-level fields are ignored (the workload may add
//! diagnostics such as an error message), but unknown fields *inside* `op` are rejected,
//! because a misspelt result field would silently weaken the check.

use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;

use serde::{Deserialize, Serialize};

/// One client operation, from its call to its answer (or to the moment the client gave up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unique in the history; the checker names operations by this id.
    pub id: u64,
    /// The logical client (one outstanding operation at a time per client is expected but
    /// not required).
    pub client: String,
    /// The node the request was sent to, e.g. `dc1-n2`.
    pub node: String,
    /// The DC of `node`, e.g. `dc1`.
    pub dc: String,
    /// What was asked and, in its optional fields, what was answered.
    pub op: Op,
    /// Client clock (monotonic, one clock for the whole run) just before sending.
    pub invoke_ns: u64,
    /// Client clock when the answer arrived; required for `ok` and `fail`, and ignored
    /// for `unknown` (such an operation has no return time).
    #[serde(default)]
    pub complete_ns: Option<u64>,
    pub outcome: Outcome,
    /// HTTP status of the answer, 0 if there was none (timeout, connection error).
    pub status: u16,
    /// For an error answer, its `code: message`, so that a report can say why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How an operation ended, as far as the client can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 2xx: it happened, and the result fields of `op` are filled.
    Ok,
    /// A definite refusal (4xx such as 409 sold_out, 404, 401): it did not happen.
    Fail,
    /// Timeout, 503, connection error: it may or may not have happened (Jepsen's `:info`).
    Unknown,
}

/// The operation, tagged by `kind`. Fields marked *result* come from the response: they
/// are required when `outcome` is `ok` (except where said otherwise) and ignored for
/// `unknown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// `POST /v1/sessions`.
    Session {
        user: String,
        /// Result: the session token.
        #[serde(default)]
        token: Option<String>,
        /// Result: the version written (absent in histories recorded before versions
        /// were answered).
        #[serde(default)]
        version: Option<SessionVersion>,
    },
    /// `DELETE /v1/sessions/{token}` (logout); `ok` is 204.
    Logout { token: String },
    /// `PUT /v1/inventory/{sku}`. Must not be retried with an idempotency key in checked
    /// runs: a replay would look like a second restock.
    Restock {
        sku: String,
        add: u64,
        /// Result: this DC's `available` from the response, after the restock.
        #[serde(default)]
        available_after: Option<u64>,
    },
    /// `POST /v1/orders`.
    Order {
        sku: String,
        qty: u64,
        /// The session token sent with the order.
        session: String,
        /// The `Idempotency-Key` header, if one was sent.
        #[serde(default)]
        idempotency_key: Option<String>,
        /// Result on `ok`: the order id, which names its origin DC as `<dc>-<suffix>`.
        #[serde(default)]
        order_id: Option<String>,
        /// Result on a 409 `sold_out` (outcome `fail`): this DC's `available` at the
        /// decision. A definite answer about the stock, so the search checks it.
        #[serde(default)]
        sold_out: Option<SoldOut>,
    },
    /// `POST /v1/orders/{id}/cancel`. No result field: `ok` means the units were released
    /// (a keyed retry answers ok again; the checker releases once per order id).
    Cancel {
        order_id: String,
        /// The DC that owns the order (the prefix of its id).
        order_dc: String,
        /// The order's quantity, released on success.
        qty: u64,
        sku: String,
        /// The session sent in the body, if recorded: a cancel with the session that
        /// placed the order must never be refused (401, 403, 404, 409).
        #[serde(default)]
        session: Option<String>,
    },
    /// `GET /v1/inventory/{sku}` (linearizable, the default).
    ReadInventory {
        sku: String,
        /// Result: this DC's `available`.
        #[serde(default)]
        available: Option<u64>,
    },
    /// `GET /v1/orders/{id}`; `fail` with status 404 means "not found".
    ReadOrder {
        order_id: String,
        /// Result: the order's status (`placed`, `cancelled`, …).
        #[serde(default)]
        order_status: Option<String>,
    },
    /// `GET /v1/sessions/{token}`; `fail` with status 404 means "not found".
    ReadSession {
        token: String,
        /// Result: the session's user.
        #[serde(default)]
        user: Option<String>,
        /// Result: the version read.
        #[serde(default)]
        version: Option<SessionVersion>,
    },
}

/// A live version of a session (its `dc` and `hlc` fields): the last-writer-wins order
/// is by HLC, then DC name. A logged-out session has no version (404).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionVersion {
    pub hlc: u64,
    pub dc: String,
}

impl SessionVersion {
    /// The version a session answer (`{"token","user","dc","hlc"}`) names, if it is one.
    pub fn of_answer(body: &serde_json::Value) -> Option<SessionVersion> {
        Some(SessionVersion { hlc: body["hlc"].as_u64()?, dc: body["dc"].as_str()?.to_string() })
    }
}

impl std::fmt::Display for SessionVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.hlc, self.dc)
    }
}

/// The body of a 409 `sold_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoldOut {
    pub available: u64,
}

impl Op {
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Session { .. } => "session",
            Op::Logout { .. } => "logout",
            Op::Restock { .. } => "restock",
            Op::Order { .. } => "order",
            Op::Cancel { .. } => "cancel",
            Op::ReadInventory { .. } => "read_inventory",
            Op::ReadOrder { .. } => "read_order",
            Op::ReadSession { .. } => "read_session",
        }
    }

    /// Writes count for "the first ok write after a leader kill".
    pub fn is_write(&self) -> bool {
        matches!(self, Op::Session { .. } | Op::Logout { .. } | Op::Restock { .. } | Op::Order { .. } | Op::Cancel { .. })
    }

    /// A one-line description for reports, e.g. `order s1 x2 -> dc1-7f3a`.
    pub fn describe(&self) -> String {
        match self {
            Op::Session { user, token, version } => format!("session {user} -> {} {}", opt(token), opt(version)),
            Op::Logout { token } => format!("logout {token}"),
            Op::Restock { sku, add, available_after } => format!("restock {sku} +{add} -> available {}", opt(available_after)),
            Op::Order { sku, qty, order_id, sold_out: Some(s), .. } => format!("order {sku} x{qty} -> sold_out available {} {}", s.available, opt(order_id)),
            Op::Order { sku, qty, order_id, .. } => format!("order {sku} x{qty} -> {}", opt(order_id)),
            Op::Cancel { order_id, qty, sku, .. } => format!("cancel {order_id} ({sku} x{qty})"),
            Op::ReadInventory { sku, available } => format!("read_inventory {sku} -> {}", opt(available)),
            Op::ReadOrder { order_id, order_status } => format!("read_order {order_id} -> {}", opt(order_status)),
            Op::ReadSession { token, user, version } => format!("read_session {token} -> {} {}", opt(user), opt(version)),
        }
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "?".to_string(), |v| v.to_string())
}

/// The DC that created an order, from its id (`dc1-7f3a` → `dc1`).
pub fn order_origin(order_id: &str) -> Option<&str> {
    order_id.rsplit_once('-').map(|(dc, _)| dc)
}

/// State gathered from every DC after the faults healed, plus the nemesis timeline.
///
/// ```text
/// {"dcs": {
///    "dc1": {"digest": "9f2c…", "converged_after_ms": 850,
///            "skus": {"s1": {"inventory": {"by_dc": {"dc1": {"available": 8, "stocked": 10, "sold": 2, "released": 0}}, "total": 8},
///                            "orders_present": ["dc1-7f3a"], "orders_cancelled": [], "orders_missing": []}}},
///    "dc2": {…}},
///  "nemesis": {"faults": [{"name": "partition dc1|dc2,dc3", "start_ns": 5000000000, "end_ns": 65000000000}],
///              "leader_kills": [{"dc": "dc1", "node": "dc1-n1", "at_ns": 9000000000}]}}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinalState {
    /// Keyed by DC name; every DC of the cluster must be present.
    pub dcs: BTreeMap<String, DcState>,
    #[serde(default)]
    pub nemesis: Nemesis,
    /// Stock that moved between DCs by itself (rebalancing grants), from the nodes'
    /// escrow journals.
    #[serde(default)]
    pub escrow: Escrow,
}

/// The grants the nodes journaled, one per (Raft entry, SKU), on the history's clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Escrow {
    pub moves: Vec<EscrowMove>,
    /// Nodes whose journal could not be read or was cut at its size bound: moves may be
    /// missing (the checker then lets the difference take effect at any time).
    #[serde(default)]
    pub incomplete: Vec<String>,
}

/// `dc`'s `available` of `sku` changed by `delta` (a grant given: negative; received:
/// positive) at some instant within [`not_before_ns`, `by_ns`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscrowMove {
    pub dc: String,
    pub sku: String,
    pub delta: i64,
    /// When its Raft entry was proposed, or a bound below it; 0 if unknown.
    pub not_before_ns: u64,
    /// When the first node of `dc` had applied it.
    pub by_ns: u64,
    /// Its Raft entry and place there (`term.index.seq`), for reports.
    #[serde(default)]
    pub entry: String,
}

/// One DC's state after healing (read from any one healthy node of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DcState {
    /// `GET /v1/cluster/digest` → `all`.
    pub digest: String,
    /// Milliseconds from the heal until this DC's digest first matched the others, if it
    /// did before the gatherer gave up.
    #[serde(default)]
    pub converged_after_ms: Option<u64>,
    /// Keyed by SKU: every SKU the workload touched.
    #[serde(default)]
    pub skus: BTreeMap<String, SkuState>,
    /// Keyed by token: every session the history acknowledged, as this DC answers it
    /// (`null`: 404, logged out or unknown). A token whose read failed is left out.
    #[serde(default)]
    pub sessions: BTreeMap<String, Option<SessionVersion>>,
}

/// One SKU as one DC sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuState {
    pub inventory: InventoryView,
    /// Order ids of this SKU that `GET /v1/orders/{id}` found in this DC. The gatherer
    /// queries at least every order id the history acknowledged.
    #[serde(default)]
    pub orders_present: Vec<String>,
    /// The subset of `orders_present` whose status is `cancelled`.
    #[serde(default)]
    pub orders_cancelled: Vec<String>,
    /// Order ids queried here that answered 404.
    #[serde(default)]
    pub orders_missing: Vec<String>,
}

/// `GET /v1/inventory/{sku}` → `by_dc` and `total`. Signed, so that a negative number a
/// buggy node might print is reported rather than rejected as malformed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InventoryView {
    pub by_dc: BTreeMap<String, Counters>,
    pub total: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub available: i64,
    pub stocked: i64,
    pub sold: i64,
    pub released: i64,
}

/// What the nemeses did, on the same clock as the history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nemesis {
    #[serde(default)]
    pub faults: Vec<FaultWindow>,
    #[serde(default)]
    pub leader_kills: Vec<LeaderKill>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultWindow {
    /// Free text, e.g. `kill dc1 leader` or `partition dc1|dc2,dc3`.
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderKill {
    pub dc: String,
    pub node: String,
    pub at_ns: u64,
}

/// Bad input, naming where it is. `line` is 1-based; 0 when the error is not tied to a
/// line (e.g. the final-state document as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name} line {line}: {message}")]
pub struct InputError {
    pub source_name: String,
    pub line: usize,
    pub message: String,
}

/// Reads a JSON-lines history and validates every record (see [`validate_record`]).
pub fn read_history(input: impl BufRead, source_name: &str) -> Result<Vec<Record>, InputError> {
    let err = |line: usize, message: String| InputError { source_name: source_name.to_string(), line, message };
    let mut records = Vec::new();
    let mut ids = HashSet::new();
    for (index, line) in input.lines().enumerate() {
        let n = index + 1;
        let line = line.map_err(|e| err(n, format!("read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(&line).map_err(|e| err(n, format!("bad record: {e}")))?;
        validate_record(&record).map_err(|m| err(n, format!("op {}: {m}", record.id)))?;
        if !ids.insert(record.id) {
            return Err(err(n, format!("duplicate id {}", record.id)));
        }
        records.push(record);
    }
    Ok(records)
}

/// Reads the final-state document.
pub fn read_final_state(input: impl std::io::Read, source_name: &str) -> Result<FinalState, InputError> {
    let state: FinalState = serde_json::from_reader(input).map_err(|e| InputError {
        source_name: source_name.to_string(),
        line: e.line(),
        message: format!("bad final state: {e}"),
    })?;
    if state.dcs.is_empty() {
        return Err(InputError { source_name: source_name.to_string(), line: 0, message: "`dcs` is empty".into() });
    }
    Ok(state)
}

/// The rules a record must keep beyond its JSON shape; the message names the field.
pub fn validate_record(r: &Record) -> Result<(), String> {
    match (r.outcome, r.complete_ns) {
        (Outcome::Ok | Outcome::Fail, None) => return Err(format!("`complete_ns` is required when outcome is {:?}", r.outcome)),
        (_, Some(c)) if c < r.invoke_ns => return Err(format!("`complete_ns` {c} is before `invoke_ns` {}", r.invoke_ns)),
        _ => {}
    }
    if r.outcome == Outcome::Ok {
        validate_ok_result(&r.op)?;
    }
    match &r.op {
        Op::Order { sold_out: Some(_), .. } if r.outcome != Outcome::Fail => Err("`op.sold_out` needs outcome fail".into()),
        Op::Order { qty: 0, .. } => Err("`op.qty` is 0".into()),
        Op::Cancel { order_id, order_dc, .. } if order_origin(order_id) != Some(order_dc.as_str()) => {
            Err(format!("`op.order_dc` {order_dc} does not match the origin of `op.order_id` {order_id}"))
        }
        _ => Ok(()),
    }
}

fn validate_ok_result(op: &Op) -> Result<(), String> {
    let missing = match op {
        Op::Session { token: None, .. } => Some("token"),
        Op::Restock { available_after: None, .. } => Some("available_after"),
        Op::Order { order_id: None, .. } => Some("order_id"),
        Op::ReadInventory { available: None, .. } => Some("available"),
        Op::ReadOrder { order_status: None, .. } => Some("order_status"),
        Op::ReadSession { user: None, .. } => Some("user"),
        _ => None,
    };
    match (missing, op) {
        (Some(field), _) => Err(format!("outcome ok needs the result `op.{field}`")),
        (None, Op::Order { order_id: Some(id), .. }) if order_origin(id).is_none() => Err(format!("`op.order_id` {id} does not name its DC (`<dc>-<suffix>`)")),
        _ => Ok(()),
    }
}
