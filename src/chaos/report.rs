//! What the checker found: [`CheckReport`] (serialised as the JSON report) and [`human`],
//! the short text a person reads first. Every figure is "x of N".

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::linearizable::Verdict;

/// The whole verdict of one run. `valid` is true only when every invariant held *and* the
/// run proved something (load flowed, every key's search finished, the input was sound).
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub valid: bool,
    pub verdict: RunVerdict,
    /// One line per reason the run is invalid or inconclusive.
    pub reasons: Vec<String>,
    pub ops: OpCounts,
    pub load: LoadFlow,
    /// Records that broke the input rules; they were left out of every check.
    pub input_errors: Vec<String>,
    pub lost_orders: LostOrders,
    pub oversell: Oversell,
    pub convergence: Convergence,
    pub linearizability: Linearizability,
    pub duplicates: Duplicates,
    pub availability: Availability,
    pub roaming: Roaming,
    pub wrongly_refused: WronglyRefused,
    pub sessions: SessionLww,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunVerdict {
    Valid,
    /// At least one invariant was broken.
    Invalid,
    /// Nothing was broken, but the run does not prove enough to pass.
    Inconclusive,
}

impl CheckReport {
    /// 0 valid, 1 invalid, 2 inconclusive: for the caller to exit with.
    pub fn exit_code(&self) -> i32 {
        match self.verdict {
            RunVerdict::Valid => 0,
            RunVerdict::Invalid => 1,
            RunVerdict::Inconclusive => 2,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct OpCounts {
    pub total: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
}

/// etcd's rule: a run in which little succeeded proves little.
#[derive(Debug, Clone, Serialize)]
pub struct LoadFlow {
    pub flowed: bool,
    pub ok_ops: usize,
    pub min_ok_ops: usize,
}

/// An operation as reports show it.
#[derive(Debug, Clone, Serialize)]
pub struct OpRef {
    pub id: u64,
    pub client: String,
    pub node: String,
    pub op: String,
    pub outcome: String,
    pub invoke_ns: u64,
    pub complete_ns: Option<u64>,
}

/// Invariant 1: every acknowledged order exists in every DC after healing.
#[derive(Debug, Clone, Serialize)]
pub struct LostOrders {
    pub ok: bool,
    /// Distinct order ids acknowledged (2xx).
    pub acknowledged: usize,
    pub present_everywhere: usize,
    /// Reported missing (404) by at least one DC.
    pub lost: Vec<MissingOrder>,
    /// Not queried in at least one DC: not proven present, so it fails the invariant too.
    pub unverified: Vec<MissingOrder>,
    /// A read in the order's own DC that answered 404 after the order was acknowledged.
    pub stale_reads: Vec<StaleOrderRead>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MissingOrder {
    pub order_id: String,
    pub sku: String,
    pub dcs: Vec<String>,
    pub acknowledged_by: OpRef,
}

#[derive(Debug, Clone, Serialize)]
pub struct StaleOrderRead {
    pub order_id: String,
    pub read: OpRef,
    pub acknowledged_by: u64,
}

/// Invariant 2: no unit sold that was not stocked.
#[derive(Debug, Clone, Serialize)]
pub struct Oversell {
    pub ok: bool,
    pub skus: usize,
    /// (DC view, SKU) pairs checked, plus one history check per SKU.
    pub checks: usize,
    pub violations: Vec<OversellViolation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OversellViolation {
    pub sku: String,
    /// `dc1's view`, `dc1's view, dc2's counters` or `history`.
    pub view: String,
    pub message: String,
}

/// Invariant 3: all DCs reach one digest.
#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    pub ok: bool,
    pub dcs: usize,
    pub distinct_digests: usize,
    /// Digest → the DCs that reported it.
    pub digests: BTreeMap<String, Vec<String>>,
    pub converged_after_ms: BTreeMap<String, Option<u64>>,
    /// The slowest DC, when all converged.
    pub max_converged_after_ms: Option<u64>,
    pub bound_ms: Option<u64>,
    pub problems: Vec<String>,
}

/// Invariant 4: per (DC, SKU), inventory operations are linearizable.
#[derive(Debug, Clone, Serialize)]
pub struct Linearizability {
    pub ok: bool,
    pub keys: usize,
    pub ok_keys: usize,
    pub illegal_keys: usize,
    pub timed_out_keys: usize,
    /// Rebalancing grants placed in the model from the nodes' escrow journals.
    pub grants: usize,
    /// Keys not checked: their final counters show stock moved that the journals lack.
    pub unchecked_keys: Vec<String>,
    pub results: Vec<KeyReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyReport {
    pub dc: String,
    pub sku: String,
    pub ops: usize,
    pub verdict: Verdict,
    pub elapsed_ms: u64,
    pub failure: Option<KeyFailure>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyFailure {
    /// `stale_read` when the operation no linearization can explain is a read, else
    /// `non_linearizable`.
    pub kind: String,
    pub culprit: Option<OpRef>,
    /// Size of the shortest failing prefix (operations called before the culprit returned).
    pub prefix_ops: usize,
    /// The culprit, the operations concurrent with it and the last ones before it.
    pub involved: Vec<OpRef>,
}

/// Two live orders from one session + idempotency key.
#[derive(Debug, Clone, Serialize)]
pub struct Duplicates {
    pub ok: bool,
    /// (session, idempotency key) pairs with an acknowledged order.
    pub keyed_groups: usize,
    pub violations: Vec<DuplicateGroup>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DuplicateGroup {
    pub session: String,
    pub idempotency_key: String,
    /// Distinct live order ids acknowledged for the key.
    pub order_ids: Vec<String>,
    pub ops: Vec<u64>,
}

/// Invariant 6: read-your-writes across DCs for acknowledged orders and sessions.
#[derive(Debug, Clone, Serialize)]
pub struct WronglyRefused {
    pub ok: bool,
    /// Answers checked (every answered call).
    pub checked: usize,
    /// Calls answered 400 (a valid request refused as malformed) or 500 (the node failed).
    pub violations: Vec<OpRef>,
}

/// Invariant 7: sessions as last-writer-wins registers (see `chaos::sessions`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionLww {
    pub ok: bool,
    /// Sessions acknowledged in the history.
    pub sessions: usize,
    /// Of those, sessions whose logout was acknowledged.
    pub logged_out: usize,
    /// Session reads answered with a version.
    pub reads_checked: usize,
    /// Sessions some DC gave no definite final answer for.
    pub unverified: usize,
    pub violations: Vec<SessionViolation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionViolation {
    /// `lost`, `logout_undone`, `not_last_writer`, `went_back` or `diverged`.
    pub kind: String,
    pub token: String,
    pub detail: String,
    /// The operation the violation is about, if one.
    pub op: Option<OpRef>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Roaming {
    pub ok: bool,
    /// Calls about an order or session acknowledged before they were made.
    pub checked: usize,
    /// Of those, calls sent to another DC than the one that acknowledged it.
    pub elsewhere: usize,
    pub violations: Vec<RoamViolation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoamViolation {
    /// `order_not_found`, `session_not_found`, `session_refused` or `cancel_refused`.
    pub kind: String,
    /// The order id or session token.
    pub subject: String,
    pub op: OpRef,
    /// The operation that acknowledged the order or session.
    pub acknowledged_by: u64,
}

/// Invariant 5: served share per fault window, unavailability after leader kills.
#[derive(Debug, Clone, Serialize)]
pub struct Availability {
    pub ok: bool,
    pub windows: Vec<WindowStats>,
    pub leader_kills: Vec<KillStats>,
    pub longest_unavailable_ms: Option<u64>,
    pub bound_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowStats {
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Operations called inside the window.
    pub invoked: usize,
    pub ok: usize,
    /// Definite refusals: the system answered, so they count as served.
    pub fail: usize,
    pub unknown: usize,
    /// Answered about the request itself: ok, or refused for its own reason (4xx).
    pub served: usize,
    /// served / invoked, 1.0 when nothing was invoked.
    pub served_share: f64,
    /// Per DC: before, during and after the fault.
    pub phases: Vec<PhaseStats>,
}

/// One DC's calls in one phase around a fault (etcd-style availability).
#[derive(Debug, Clone, Serialize)]
pub struct PhaseStats {
    pub dc: String,
    /// `before`, `during` or `after`.
    pub phase: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub invoked: usize,
    pub ok: usize,
    /// Ok calls per second of the phase.
    pub ok_per_s: f64,
    /// ok / invoked (1.0 when nothing was invoked).
    pub success_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KillStats {
    pub dc: String,
    pub node: String,
    pub at_ns: u64,
    /// The first write called at or after the kill, in that DC, that succeeded.
    pub first_ok_write: Option<u64>,
    /// From the kill to that write's completion; `None` if no write succeeded afterwards.
    pub unavailable_ms: Option<u64>,
}

/// The short report: verdict, one line per invariant, then the offenders (capped).
pub fn human(r: &CheckReport) -> String {
    const SHOWN_MAX: usize = 10;
    let mut s = String::new();
    let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
    let _ = writeln!(s, "chaos check: {:?}  (ops {}: ok {}, fail {}, unknown {})", r.verdict, r.ops.total, r.ops.ok, r.ops.fail, r.ops.unknown);
    for reason in &r.reasons {
        let _ = writeln!(s, "  - {reason}");
    }
    let _ = writeln!(s, "{} load: {} ok ops (at least {} required)", mark(r.load.flowed), r.load.ok_ops, r.load.min_ok_ops);
    let lo = &r.lost_orders;
    let lo_mark = if lo.ok && !lo.unverified.is_empty() { "??  " } else { mark(lo.ok) };
    let _ = writeln!(
        s,
        "{} acknowledged orders present everywhere: {} of {} (lost {}, unverified {}, stale reads {})",
        lo_mark,
        lo.present_everywhere,
        lo.acknowledged,
        lo.lost.len(),
        lo.unverified.len(),
        lo.stale_reads.len()
    );
    for m in lo.lost.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       lost {} ({}) in {}: acknowledged by {}", m.order_id, m.sku, m.dcs.join(","), op_line(&m.acknowledged_by));
    }
    for m in lo.unverified.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       unverified {} ({}) in {}", m.order_id, m.sku, m.dcs.join(","));
    }
    for m in lo.stale_reads.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       {} not found by {} after op {} acknowledged it", m.order_id, op_line(&m.read), m.acknowledged_by);
    }
    let o = &r.oversell;
    let _ = writeln!(s, "{} no oversell: {} of {} checks over {} SKUs", mark(o.ok), o.checks - o.violations.len().min(o.checks), o.checks, o.skus);
    for v in o.violations.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       {} ({}): {}", v.sku, v.view, v.message);
    }
    human_convergence(&mut s, &r.convergence, mark(r.convergence.ok));
    let lin = &r.linearizability;
    // A key that timed out proved nothing: not a failure, not a pass either.
    let lin_mark = if lin.ok && (lin.timed_out_keys > 0 || !lin.unchecked_keys.is_empty()) { "??  " } else { mark(lin.ok) };
    human_linearizability(&mut s, lin, lin_mark, SHOWN_MAX);
    let d = &r.duplicates;
    let _ = writeln!(s, "{} duplicates: {} of {} keyed orders have several live orders", mark(d.ok), d.violations.len(), d.keyed_groups);
    for g in d.violations.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       session {} key {}: {} (ops {:?})", g.session, g.idempotency_key, g.order_ids.join(", "), g.ops);
    }
    let ro = &r.roaming;
    let _ = writeln!(
        s,
        "{} read-your-writes across DCs: {} violation(s) in {} calls about acknowledged orders and sessions ({} in another DC)",
        mark(ro.ok),
        ro.violations.len(),
        ro.checked,
        ro.elsewhere
    );
    for v in ro.violations.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       {} {}: {} after op {} acknowledged it", v.kind, v.subject, op_line(&v.op), v.acknowledged_by);
    }
    let se = &r.sessions;
    let se_mark = if se.ok && se.unverified > 0 { "??  " } else { mark(se.ok) };
    let _ = writeln!(
        s,
        "{} sessions last-writer-wins: {} violation(s) over {} sessions ({} logged out, {} reads, unverified {})",
        se_mark,
        se.violations.len(),
        se.sessions,
        se.logged_out,
        se.reads_checked,
        se.unverified
    );
    for v in se.violations.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       {} {}: {}{}", v.kind, v.token, v.detail, v.op.as_ref().map_or(String::new(), |op| format!(" ({})", op_line(op))));
    }
    let w = &r.wrongly_refused;
    let _ = writeln!(s, "{} valid requests refused as malformed (400) or failed (500): {} of {} answers", mark(w.ok), w.violations.len(), w.checked);
    for op in w.violations.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "       {}", op_line(op));
    }
    human_availability(&mut s, &r.availability, mark(r.availability.ok));
    for e in r.input_errors.iter().take(SHOWN_MAX) {
        let _ = writeln!(s, "input error: {e}");
    }
    s
}

fn human_convergence(s: &mut String, c: &Convergence, mark: &str) {
    let after = c.max_converged_after_ms.map_or("-".to_string(), |ms| format!("{ms} ms"));
    let _ = writeln!(s, "{mark} convergence: {} distinct digest(s) over {} DCs, converged after {after}", c.distinct_digests, c.dcs);
    for p in &c.problems {
        let _ = writeln!(s, "       {p}");
    }
}

fn human_linearizability(s: &mut String, l: &Linearizability, mark: &str, shown_max: usize) {
    let _ = writeln!(
        s,
        "{mark} linearizable (dc, sku) keys: {} of {} (illegal {}, timed out {}; {} rebalancing grants placed, {} keys not checked)",
        l.ok_keys,
        l.keys + l.unchecked_keys.len(),
        l.illegal_keys,
        l.timed_out_keys,
        l.grants,
        l.unchecked_keys.len()
    );
    for k in l.results.iter().filter(|k| k.verdict != Verdict::Ok).take(shown_max) {
        let Some(f) = &k.failure else {
            let _ = writeln!(s, "       {}/{}: timed out after {} ms over {} ops", k.dc, k.sku, k.elapsed_ms, k.ops);
            continue;
        };
        let culprit = f.culprit.as_ref().map_or("(not found in time)".to_string(), op_line);
        let _ = writeln!(s, "       {}/{}: {} at {}; shortest failing prefix {} ops, involved:", k.dc, k.sku, f.kind, culprit, f.prefix_ops);
        for op in f.involved.iter().take(shown_max) {
            let _ = writeln!(s, "         {}", op_line(op));
        }
    }
}

fn human_availability(s: &mut String, a: &Availability, mark: &str) {
    let longest = a.longest_unavailable_ms.map_or("-".to_string(), |ms| format!("{ms} ms"));
    let _ = writeln!(s, "{mark} availability: {} fault window(s), {} leader kill(s), longest unavailability {longest}", a.windows.len(), a.leader_kills.len());
    for w in &a.windows {
        let _ = writeln!(s, "       {}: served {} of {} ({:.1} %), unknown {}", w.name, w.served, w.invoked, w.served_share * 100.0, w.unknown);
        let mut dcs: Vec<&str> = w.phases.iter().map(|p| p.dc.as_str()).collect();
        dcs.dedup();
        for dc in dcs {
            let cells: Vec<String> =
                w.phases.iter().filter(|p| p.dc == dc).map(|p| format!("{} {:.1} ok/s {:.1} %", p.phase, p.ok_per_s, p.success_rate * 100.0)).collect();
            let _ = writeln!(s, "         {dc}: {}", cells.join(" | "));
        }
    }
    for k in &a.leader_kills {
        let gap =
            k.unavailable_ms.map_or("no ok write afterwards".to_string(), |ms| format!("{ms} ms to first ok write (op {})", k.first_ok_write.unwrap_or(0)));
        let _ = writeln!(s, "       kill {} ({}): {gap}", k.node, k.dc);
    }
}

fn op_line(op: &OpRef) -> String {
    let done = op.complete_ns.map_or("-".to_string(), |c| c.to_string());
    format!("#{} {} on {} [{}..{}] {}", op.id, op.op, op.node, op.invoke_ns, done, op.outcome)
}
