//! The invariants the chaos checker proves, each a function from the recorded data to one report
//! section; [`check`] runs them all and decides the verdict.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::history::{order_origin, validate_record, FinalState, Nemesis, Op, Outcome, Record};
use super::linearizable::{self, Limits, LinOp, Step, Verdict};
use super::report::*;

/// Knobs of one check. Defaults suit a few-minute run on one machine.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Fewer ok operations than this and the run is inconclusive (etcd's rule: a run in
    /// which load did not flow proves nothing).
    pub min_ok_ops: usize,
    /// Search time per (DC, SKU) key; explaining a failure may take as long again.
    pub lin_key_budget_ms: u64,
    /// Memoised states per key search: bounds memory as the budget bounds time.
    pub lin_cache_entries_max: usize,
    /// Convergence must be reported within this many ms of the heal, if set.
    pub convergence_ms_max: Option<u64>,
    /// The longest tolerated gap from a leader kill to the next ok write, if set.
    pub unavailability_ms_max: Option<u64>,
    /// Rebalancing moves stock between DCs (`sent`), which `by_dc` does not show; when
    /// it is off (and no grant was journaled) each DC must also have sold only its own
    /// stock.
    pub rebalancing: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            min_ok_ops: 50,
            lin_key_budget_ms: 10_000,
            lin_cache_entries_max: 2_000_000,
            convergence_ms_max: None,
            unavailability_ms_max: None,
            rebalancing: false,
        }
    }
}

/// Checks a history and the final state against every invariant.
pub fn check(history: &[Record], final_state: &FinalState, opts: &CheckOptions) -> CheckReport {
    let (records, input_errors) = sound_records(history);
    let by_id: HashMap<u64, &Record> = records.iter().map(|r| (r.id, *r)).collect();
    let acked = acknowledged_orders(&records);
    let ops = count_ops(&records);
    let load = LoadFlow { flowed: ops.ok >= opts.min_ok_ops, ok_ops: ops.ok, min_ok_ops: opts.min_ok_ops };
    let mut report = CheckReport {
        valid: false,
        verdict: RunVerdict::Inconclusive,
        reasons: vec![],
        ops,
        load,
        input_errors,
        lost_orders: check_lost_orders(&records, &acked, final_state),
        oversell: check_oversell(&records, &acked, final_state, opts),
        convergence: check_convergence(final_state, opts),
        linearizability: check_linearizability(&records, &by_id, final_state, opts),
        duplicates: check_duplicates(&records, &acked, final_state),
        availability: check_availability(&records, &final_state.nemesis, opts),
        roaming: check_roaming(&records, &acked),
        wrongly_refused: check_wrongly_refused(&records),
        sessions: super::sessions::check_sessions(&records, final_state),
    };
    decide(&mut report);
    report
}

/// Invalid if any invariant broke; otherwise inconclusive if the run proved too little.
fn decide(r: &mut CheckReport) {
    let lo = &r.lost_orders;
    let mut invalid = vec![];
    if !lo.ok {
        invalid.push(format!("acknowledged orders lost: {} lost, {} stale reads", lo.lost.len(), lo.stale_reads.len()));
    }
    if !r.oversell.ok {
        invalid.push(format!("oversell: {} violation(s)", r.oversell.violations.len()));
    }
    if !r.convergence.ok {
        invalid.push(format!("convergence: {}", r.convergence.problems.join("; ")));
    }
    if r.linearizability.illegal_keys > 0 {
        invalid.push(format!("linearizability: {} of {} keys illegal", r.linearizability.illegal_keys, r.linearizability.keys));
    }
    if !r.duplicates.ok {
        invalid.push(format!("duplicates: {} idempotency key(s) with several live orders", r.duplicates.violations.len()));
    }
    if !r.roaming.ok {
        invalid.push(format!("read-your-writes across DCs: {} violation(s)", r.roaming.violations.len()));
    }
    if !r.sessions.ok {
        invalid.push(format!("sessions: {} last-writer-wins violation(s)", r.sessions.violations.len()));
    }
    if !r.wrongly_refused.ok {
        invalid.push(format!("{} valid request(s) answered 400 or 500", r.wrongly_refused.violations.len()));
    }
    if !r.availability.ok {
        invalid.push(format!("availability: longest unavailability over {} ms", r.availability.bound_ms.unwrap_or(0)));
    }
    let mut inconclusive = vec![];
    if !r.load.flowed {
        inconclusive.push(format!("load did not flow: {} of {} required ok ops", r.load.ok_ops, r.load.min_ok_ops));
    }
    if !lo.unverified.is_empty() {
        inconclusive.push(format!("{} acknowledged order(s) not queried in every DC", lo.unverified.len()));
    }
    if !r.linearizability.unchecked_keys.is_empty() {
        let keys = &r.linearizability.unchecked_keys;
        inconclusive.push(format!(
            "linearizability: {} key(s) not checked, their stock moved by more than the nodes' journals hold ({})",
            keys.len(),
            keys.join(", ")
        ));
    }
    if r.linearizability.timed_out_keys > 0 {
        inconclusive.push(format!("linearizability: {} of {} keys timed out", r.linearizability.timed_out_keys, r.linearizability.keys));
    }
    if r.sessions.unverified > 0 {
        inconclusive.push(format!("{} session(s) without a final answer from every DC", r.sessions.unverified));
    }
    if !r.input_errors.is_empty() {
        inconclusive.push(format!("{} record(s) broke the input rules and were left out", r.input_errors.len()));
    }
    r.verdict = match (invalid.is_empty(), inconclusive.is_empty()) {
        (false, _) => RunVerdict::Invalid,
        (true, false) => RunVerdict::Inconclusive,
        (true, true) => RunVerdict::Valid,
    };
    r.valid = r.verdict == RunVerdict::Valid;
    r.reasons = invalid.into_iter().chain(inconclusive).collect();
}

/// Records that keep the input rules, and one message per record that does not: a
/// history built in memory gets the same scrutiny as one read from a file.
fn sound_records(history: &[Record]) -> (Vec<&Record>, Vec<String>) {
    let mut seen = HashSet::new();
    let mut errors = vec![];
    let mut sound = vec![];
    for r in history {
        match validate_record(r) {
            Err(e) => errors.push(format!("op {}: {e}", r.id)),
            Ok(()) if !seen.insert(r.id) => errors.push(format!("op {}: duplicate id", r.id)),
            Ok(()) => sound.push(r),
        }
    }
    (sound, errors)
}

fn count_ops(records: &[&Record]) -> OpCounts {
    let n = |o: Outcome| records.iter().filter(|r| r.outcome == o).count();
    OpCounts { total: records.len(), ok: n(Outcome::Ok), fail: n(Outcome::Fail), unknown: n(Outcome::Unknown) }
}

pub(crate) fn op_ref(r: &Record) -> OpRef {
    let mut outcome = format!("{:?} {}", r.outcome, r.status).to_lowercase();
    if let Some(e) = &r.error {
        outcome = format!("{outcome} ({e})");
    }
    OpRef { id: r.id, client: r.client.clone(), node: r.node.clone(), op: r.op.describe(), outcome, invoke_ns: r.invoke_ns, complete_ns: r.complete_ns }
}

/// An acknowledged order: its id, and the first ok operation that returned it (a keyed
/// retry returns the same id again).
struct Acked<'a> {
    record: &'a Record,
    sku: &'a str,
    qty: u64,
    session: &'a str,
    key: Option<&'a str>,
}

fn acknowledged_orders<'a>(records: &[&'a Record]) -> BTreeMap<&'a str, Acked<'a>> {
    let mut acked: BTreeMap<&str, Acked> = BTreeMap::new();
    for r in records.iter().filter(|r| r.outcome == Outcome::Ok) {
        if let Op::Order { sku, qty, session, idempotency_key, order_id: Some(id), .. } = &r.op {
            let first = acked.get(id.as_str()).is_none_or(|a| a.record.complete_ns > r.complete_ns);
            if first {
                acked.insert(id, Acked { record: r, sku, qty: *qty, session, key: idempotency_key.as_deref() });
            }
        }
    }
    acked
}

/// Order ids the final state shows cancelled, or that an ok cancel (or, if
/// `count_unknown`, a possibly applied one) released.
fn cancelled_orders<'a>(records: &[&'a Record], final_state: &'a FinalState, count_unknown: bool) -> HashSet<&'a str> {
    let in_final = final_state.dcs.values().flat_map(|d| d.skus.values()).flat_map(|s| s.orders_cancelled.iter().map(String::as_str));
    let by_ops = records.iter().filter(|r| r.outcome == Outcome::Ok || (count_unknown && r.outcome == Outcome::Unknown)).filter_map(|r| match &r.op {
        Op::Cancel { order_id, .. } => Some(order_id.as_str()),
        _ => None,
    });
    in_final.chain(by_ops).collect()
}

/// Invariant 1: every acknowledged order is present in every DC; and a read in the
/// order's own DC (linearizable) never misses it once it was acknowledged.
fn check_lost_orders(records: &[&Record], acked: &BTreeMap<&str, Acked>, final_state: &FinalState) -> LostOrders {
    let found = |lists: fn(&super::history::SkuState) -> &Vec<String>| -> BTreeMap<&str, HashSet<&str>> {
        final_state.dcs.iter().map(|(dc, d)| (dc.as_str(), d.skus.values().flat_map(|s| lists(s).iter().map(String::as_str)).collect())).collect()
    };
    let (present, missing) = (found(|s| &s.orders_present), found(|s| &s.orders_missing));
    let (mut lost, mut unverified, mut everywhere) = (vec![], vec![], 0);
    for (id, a) in acked {
        let not_in = |set: &BTreeMap<&str, HashSet<&str>>, want: bool| -> Vec<String> {
            present.keys().filter(|dc| !present[*dc].contains(id) && set[*dc].contains(id) == want).map(|dc| dc.to_string()).collect()
        };
        let (gone, unknown) = (not_in(&missing, true), not_in(&missing, false));
        everywhere += usize::from(gone.is_empty() && unknown.is_empty());
        let entry = |dcs| MissingOrder { order_id: id.to_string(), sku: a.sku.to_string(), dcs, acknowledged_by: op_ref(a.record) };
        if !gone.is_empty() {
            lost.push(entry(gone));
        }
        if !unknown.is_empty() {
            unverified.push(entry(unknown));
        }
    }
    let stale_reads = stale_order_reads(records, acked);
    LostOrders { ok: lost.is_empty() && stale_reads.is_empty(), acknowledged: acked.len(), present_everywhere: everywhere, lost, unverified, stale_reads }
}

fn stale_order_reads(records: &[&Record], acked: &BTreeMap<&str, Acked>) -> Vec<StaleOrderRead> {
    let mut out = vec![];
    for r in records.iter().filter(|r| r.outcome == Outcome::Fail && r.status == 404) {
        let Op::ReadOrder { order_id, .. } = &r.op else { continue };
        let Some(a) = acked.get(order_id.as_str()) else { continue };
        // Only the owner DC must see it at once; other DCs receive it asynchronously.
        let acked_before = a.record.complete_ns.is_some_and(|c| c < r.invoke_ns);
        if order_origin(order_id) == Some(r.dc.as_str()) && acked_before {
            out.push(StaleOrderRead { order_id: order_id.clone(), read: op_ref(r), acknowledged_by: a.record.id });
        }
    }
    out
}

/// Invariant 6, read-your-writes wherever the client goes: once an order or a session
/// was acknowledged, no DC may answer as if it did not exist — a read of the order or
/// session is never 404, an order with the session never 401, and a cancel with the
/// session that placed the order is never refused (401, 403, 404 or 409), unless an
/// earlier cancel of that order may have happened or merge may have cancelled it (a
/// keyed order acknowledged in two DCs). A DC that cannot ask the owner answers 503
/// `owner_unreachable`, which is allowed. Only calls made after the acknowledgement
/// returned count.
fn check_roaming(records: &[&Record], acked: &BTreeMap<&str, Acked>) -> Roaming {
    let mut sessions: HashMap<&str, &Record> = HashMap::new();
    for r in records.iter().filter(|r| r.outcome == Outcome::Ok) {
        if let Op::Session { token: Some(t), .. } = &r.op {
            let first = sessions.get(t.as_str()).is_none_or(|a| a.complete_ns > r.complete_ns);
            if first {
                sessions.insert(t, r);
            }
        }
    }
    let cross = cross_dc_keys(records);
    let before = |ack: &Record, r: &Record| ack.complete_ns.is_some_and(|c| c < r.invoke_ns);
    // Cancels that may have happened, by order id: (invoke of the earliest).
    let maybe_cancelled = earliest_invoke(records, |op| match op {
        Op::Cancel { order_id, .. } => Some(order_id),
        _ => None,
    });
    // Logouts that may have happened, by token: after one, a session may rightly be unknown.
    let maybe_logged_out = earliest_invoke(records, |op| match op {
        Op::Logout { token } => Some(token),
        _ => None,
    });
    let (mut checked, mut elsewhere, mut violations) = (0, 0, vec![]);
    for r in records {
        let session = match &r.op {
            Op::ReadSession { token, .. } => Some(token.as_str()),
            Op::Order { session, .. } => Some(session.as_str()),
            Op::Cancel { session, .. } => session.as_deref(),
            _ => None,
        };
        if session.and_then(|s| maybe_logged_out.get(s)).is_some_and(|t| r.complete_ns.is_none_or(|c| *t < c)) {
            continue;
        }
        let (subject, ack, kind): (&str, Option<&Record>, &str) = match &r.op {
            Op::ReadOrder { order_id, .. } => (order_id, acked.get(order_id.as_str()).map(|a| a.record), "order_not_found"),
            Op::ReadSession { token, .. } => (token, sessions.get(token.as_str()).copied(), "session_not_found"),
            Op::Order { session, .. } => (session, sessions.get(session.as_str()).copied(), "session_refused"),
            Op::Cancel { order_id, session, .. } => {
                let a = acked.get(order_id.as_str());
                // Only a cancel with the order's own session must succeed (when it is known).
                let own = a.filter(|a| session.as_deref().is_none_or(|s| s == a.session));
                (order_id, own.map(|a| a.record), "cancel_refused")
            }
            _ => continue,
        };
        let Some(ack) = ack.filter(|a| before(a, r)) else { continue };
        checked += 1;
        elsewhere += usize::from(ack.dc != r.dc);
        let refused = r.outcome == Outcome::Fail
            && match &r.op {
                Op::ReadOrder { .. } | Op::ReadSession { .. } => r.status == 404,
                Op::Order { .. } => r.status == 401,
                Op::Cancel { order_id, .. } => {
                    let a = &acked[order_id.as_str()];
                    let merged_away = a.key.is_some_and(|k| cross.contains(&(a.session, k)));
                    let earlier = maybe_cancelled.get(order_id.as_str()).is_some_and(|t| *t < r.invoke_ns);
                    matches!(r.status, 401 | 403 | 404 | 409) && !(r.status == 409 && (merged_away || earlier))
                }
                _ => false,
            };
        if refused {
            violations.push(RoamViolation { kind: kind.into(), subject: subject.to_string(), op: op_ref(r), acknowledged_by: ack.id });
        }
    }
    Roaming { ok: violations.is_empty(), checked, elsewhere, violations }
}

/// The earliest call, by the subject `of` names, of the operations that may have taken
/// effect (any outcome but a definite refusal).
fn earliest_invoke<'a>(records: &[&'a Record], of: impl Fn(&'a Op) -> Option<&'a String>) -> HashMap<&'a str, u64> {
    let mut out: HashMap<&str, u64> = HashMap::new();
    for r in records.iter().filter(|r| r.outcome != Outcome::Fail) {
        if let Some(subject) = of(&r.op) {
            let e = out.entry(subject.as_str()).or_insert(r.invoke_ns);
            *e = (*e).min(r.invoke_ns);
        }
    }
    out
}

/// The workload sends only well-formed requests, so a 400 means a node refused a valid
/// request as malformed (e.g. over a disagreement between clocks, which is the cluster's
/// problem, not the client's), and a 500 that it failed. Both are defects, whatever
/// outcome the workload gave the call (a 500 may or may not have been applied, so it is
/// recorded as unknown).
fn check_wrongly_refused(records: &[&Record]) -> WronglyRefused {
    let answered: Vec<&&Record> = records.iter().filter(|r| r.status != 0).collect();
    let violations: Vec<OpRef> = answered.iter().filter(|r| matches!(r.status, 400 | 500)).map(|r| op_ref(r)).collect();
    WronglyRefused { ok: violations.is_empty(), checked: answered.len(), violations }
}

/// Invariant 2: in every DC's view, Σsold − Σreleased ≤ Σstocked and nothing is
/// negative; without rebalancing, each DC sold only its own stock; and the history's live
/// acknowledged orders fit in what was (at most) restocked.
fn check_oversell(records: &[&Record], acked: &BTreeMap<&str, Acked>, final_state: &FinalState, opts: &CheckOptions) -> Oversell {
    let mut violations = vec![];
    let mut checks = 0;
    // Journaled grants prove rebalancing ran, whatever the options say.
    let rebalancing = opts.rebalancing || !final_state.escrow.moves.is_empty();
    for (view_dc, d) in &final_state.dcs {
        for (sku, s) in &d.skus {
            checks += 1;
            view_violations(sku, view_dc, &s.inventory.by_dc, rebalancing, &mut violations);
        }
    }
    let mut skus: BTreeSet<&str> = final_state.dcs.values().flat_map(|d| d.skus.keys().map(String::as_str)).collect();
    skus.extend(acked.values().map(|a| a.sku));
    skus.extend(records.iter().filter_map(|r| match &r.op {
        Op::Restock { sku, .. } => Some(sku.as_str()),
        _ => None,
    }));
    let cancelled = cancelled_orders(records, final_state, true);
    for sku in &skus {
        checks += 1;
        let (sold, stocked) = (live_acked_qty(acked, &cancelled, sku), restocked_at_most(records, sku));
        if sold > stocked {
            let message = format!("live acknowledged orders hold {sold} units but at most {stocked} were restocked (ok + unknown restocks)");
            violations.push(OversellViolation { sku: sku.to_string(), view: "history".into(), message });
        }
    }
    Oversell { ok: violations.is_empty(), skus: skus.len(), checks, violations }
}

fn view_violations(sku: &str, view_dc: &str, by_dc: &BTreeMap<String, super::history::Counters>, rebalancing: bool, out: &mut Vec<OversellViolation>) {
    let mut push = |view: String, message: String| out.push(OversellViolation { sku: sku.to_string(), view, message });
    let (mut stocked, mut sold, mut released) = (0i128, 0i128, 0i128);
    for (dc, c) in by_dc {
        let view = format!("{view_dc}'s view of {dc}");
        if c.available < 0 || c.stocked < 0 || c.sold < 0 || c.released < 0 {
            push(view.clone(), format!("negative counter: {c:?}"));
        }
        // i128: a buggy node's extreme numbers must be reported, not overflow.
        if !rebalancing && c.sold as i128 - c.released as i128 > c.stocked as i128 {
            push(view, format!("sold {} − released {} > stocked {} with rebalancing off", c.sold, c.released, c.stocked));
        }
        (stocked, sold, released) = (stocked + c.stocked as i128, sold + c.sold as i128, released + c.released as i128);
    }
    if sold - released > stocked {
        push(format!("{view_dc}'s view"), format!("Σsold {sold} − Σreleased {released} > Σstocked {stocked}"));
    }
}

/// A lower bound on units still sold: acknowledged orders that no cancel (ok or unknown)
/// and no final state released, counting one order per idempotency key because merge
/// cancels the later duplicate.
fn live_acked_qty(acked: &BTreeMap<&str, Acked>, cancelled: &HashSet<&str>, sku: &str) -> u64 {
    let live = acked.iter().filter(|(id, a)| a.sku == sku && !cancelled.contains(*id)).map(|(_, a)| a);
    let mut keyed: HashMap<(&str, &str), u64> = HashMap::new();
    let mut total = 0u64;
    for a in live {
        match a.key {
            Some(k) => {
                let q = keyed.entry((a.session, k)).or_insert(a.qty);
                *q = (*q).min(a.qty);
            }
            None => total = total.saturating_add(a.qty),
        }
    }
    keyed.values().fold(total, |t, q| t.saturating_add(*q))
}

/// An upper bound on units stocked: ok and unknown restocks.
fn restocked_at_most(records: &[&Record], sku: &str) -> u64 {
    let adds = records.iter().filter(|r| r.outcome != Outcome::Fail).filter_map(|r| match &r.op {
        Op::Restock { sku: s, add, .. } if s == sku => Some(*add),
        _ => None,
    });
    adds.fold(0u64, u64::saturating_add)
}

/// Invariant 3: one digest everywhere, within the bound if one is set.
fn check_convergence(final_state: &FinalState, opts: &CheckOptions) -> Convergence {
    let mut digests: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (dc, d) in &final_state.dcs {
        digests.entry(d.digest.clone()).or_default().push(dc.clone());
    }
    let converged_after_ms: BTreeMap<String, Option<u64>> = final_state.dcs.iter().map(|(dc, d)| (dc.clone(), d.converged_after_ms)).collect();
    let all: Option<Vec<u64>> = converged_after_ms.values().copied().collect();
    let max_converged_after_ms = all.and_then(|v| v.into_iter().max());
    let mut problems = vec![];
    if digests.len() > 1 {
        let groups: Vec<String> = digests.iter().map(|(d, dcs)| format!("{} = {}", dcs.join(","), d.chars().take(12).collect::<String>())).collect();
        problems.push(format!("digests differ: {}", groups.join("; ")));
    }
    if let Some(bound) = opts.convergence_ms_max {
        match max_converged_after_ms {
            Some(ms) if ms > bound => problems.push(format!("converged after {ms} ms, over the {bound} ms bound")),
            None => problems.push(format!("not every DC reported converging within the {bound} ms bound")),
            _ => {}
        }
    }
    Convergence {
        ok: problems.is_empty(),
        dcs: final_state.dcs.len(),
        distinct_digests: digests.len(),
        digests,
        converged_after_ms,
        max_converged_after_ms,
        bound_ms: opts.convergence_ms_max,
        problems,
    }
}

/// Invariant 4: each (DC, SKU) key's operations, searched independently.
fn check_linearizability(records: &[&Record], by_id: &HashMap<u64, &Record>, final_state: &FinalState, opts: &CheckOptions) -> Linearizability {
    let budget = Duration::from_millis(opts.lin_key_budget_ms);
    let mut keys = lin_keys(records);
    let escrow = escrow_ops(final_state);
    for (key, ops) in escrow.ops {
        keys.entry(key).or_default().extend(ops);
    }
    let mut results = vec![];
    let mut unchecked = vec![];
    for ((dc, sku), ops) in keys {
        if escrow.unexplained.contains(&(dc.clone(), sku.clone())) {
            unchecked.push(format!("{dc}/{sku}"));
            continue;
        }
        let started = Instant::now();
        let verdict = linearizable::check_ops(&ops, Limits::new(budget, opts.lin_cache_entries_max));
        let failure = (verdict == Verdict::Illegal).then(|| {
            let f = linearizable::explain(&ops, Limits::new(budget, opts.lin_cache_entries_max));
            let op_ref_of = |id: &u64| by_id.get(id).map(|r| op_ref(r)).or_else(|| escrow.refs.get(id).cloned());
            let culprit = f.culprit.and_then(|id| by_id.get(&id));
            let stale = culprit.is_some_and(|r| matches!(r.op, Op::ReadInventory { .. }));
            let kind = if stale { "stale_read" } else { "non_linearizable" };
            let culprit = f.culprit.as_ref().and_then(op_ref_of);
            KeyFailure { kind: kind.into(), culprit, prefix_ops: f.prefix_ops, involved: f.involved.iter().filter_map(op_ref_of).collect() }
        });
        let elapsed_ms = started.elapsed().as_millis() as u64;
        results.push(KeyReport { dc, sku, ops: ops.len(), verdict, elapsed_ms, failure });
    }
    let n = |v: Verdict| results.iter().filter(|k| k.verdict == v).count();
    let (ok_keys, illegal_keys, timed_out_keys) = (n(Verdict::Ok), n(Verdict::Illegal), n(Verdict::TimedOut));
    Linearizability {
        ok: illegal_keys == 0,
        keys: results.len(),
        ok_keys,
        illegal_keys,
        timed_out_keys,
        grants: escrow.placed,
        unchecked_keys: unchecked,
        results,
    }
}

/// Model ids of escrow moves: above any history id.
const ESCROW_ID_BASE: u64 = 1 << 62;

/// Escrow moves as model operations, by (DC, SKU).
struct EscrowOps {
    ops: BTreeMap<(String, String), Vec<LinOp>>,
    /// How each reads in a failure report.
    refs: HashMap<u64, OpRef>,
    /// Moves placed in a window.
    placed: usize,
    /// Keys whose final counters show more or less moved than the journals hold.
    unexplained: BTreeSet<(String, String)>,
}

/// Rebalancing grants as operations of the DC whose stock they moved: each takes effect
/// inside its journaled window. A DC's own final counters say how much moved in all
/// (available − stocked + sold − released = received − given); a key where the journals
/// hold a different sum (a node's journal lost or cut) is not checked, since moves of
/// unknown size and time could explain anything or, left out, fail it falsely.
fn escrow_ops(final_state: &FinalState) -> EscrowOps {
    let mut out = EscrowOps { ops: BTreeMap::new(), refs: HashMap::new(), placed: 0, unexplained: BTreeSet::new() };
    let mut journaled: BTreeMap<(String, String), i128> = BTreeMap::new();
    for (n, m) in final_state.escrow.moves.iter().enumerate() {
        *journaled.entry((m.dc.clone(), m.sku.clone())).or_default() += m.delta as i128;
        let id = ESCROW_ID_BASE + n as u64;
        let (invoke_ns, return_ns) = (m.not_before_ns, m.by_ns.max(m.not_before_ns));
        let what = format!("{} {} {:+} (rebalancing, entry {})", if m.delta < 0 { "grant given" } else { "grant received" }, m.sku, m.delta, m.entry);
        out.refs.insert(
            id,
            OpRef { id, client: "escrow".into(), node: m.dc.clone(), op: what, outcome: "journaled".into(), invoke_ns, complete_ns: Some(return_ns) },
        );
        let op = LinOp { id, invoke_ns, return_ns: Some(return_ns), step: Step::Grant { delta: m.delta } };
        out.ops.entry((m.dc.clone(), m.sku.clone())).or_default().push(op);
        out.placed += 1;
    }
    for (dc, d) in &final_state.dcs {
        for (sku, state) in &d.skus {
            let Some(c) = state.inventory.by_dc.get(dc) else { continue };
            let moved = c.available as i128 - c.stocked as i128 + c.sold as i128 - c.released as i128;
            if moved != journaled.get(&(dc.clone(), sku.clone())).copied().unwrap_or(0) {
                out.unexplained.insert((dc.clone(), sku.clone()));
            }
        }
    }
    out
}

/// An operation of a key before idempotency groups are numbered.
struct KeyOp {
    op: LinOp,
    /// Operations sharing this name take effect at most once (a keyed order and its
    /// retries; the cancels of one order).
    group: Option<String>,
}

/// Splits the inventory operations by (DC, SKU) and reduces them to model steps.
///
/// - Only operations that reached a DC's own stock count: an ok order whose id names
///   another DC is a keyed retry answered from replicated state, and changes nothing here.
/// - A cancel acts on the owner DC's key; sent elsewhere (forwarded or queued), it may
///   take effect at any time after its call, so it is treated as pending there.
/// - A keyed order retried in several DCs can leave two live orders, and merge then
///   cancels one of them without any client call: each such order gets a pending
///   release, and sold-out answers of that key are not checked (they may be replays of
///   another DC's answer).
pub(crate) fn lin_keys(records: &[&Record]) -> BTreeMap<(String, String), Vec<LinOp>> {
    let cross_dc = cross_dc_keys(records);
    let mut keys: BTreeMap<(String, String), Vec<KeyOp>> = BTreeMap::new();
    for r in records {
        for (dc, sku, op) in key_ops(r, &cross_dc) {
            keys.entry((dc, sku)).or_default().push(op);
        }
    }
    keys.into_iter().map(|(k, ops)| (k, number_groups(ops))).collect()
}

fn cross_dc_keys<'a>(records: &[&'a Record]) -> HashSet<(&'a str, &'a str)> {
    let mut dcs: HashMap<(&str, &str), HashSet<&str>> = HashMap::new();
    for r in records.iter().filter(|r| r.outcome != Outcome::Fail) {
        if let Op::Order { session, idempotency_key: Some(k), .. } = &r.op {
            dcs.entry((session, k)).or_default().insert(&r.dc);
        }
    }
    dcs.into_iter().filter(|(_, d)| d.len() > 1).map(|(k, _)| k).collect()
}

fn key_ops(r: &Record, cross_dc: &HashSet<(&str, &str)>) -> Vec<(String, String, KeyOp)> {
    let pending = r.outcome == Outcome::Unknown;
    let lin = |step: Step, pending: bool| LinOp { id: r.id, invoke_ns: r.invoke_ns, return_ns: if pending { None } else { r.complete_ns }, step };
    let here = |sku: &str, op: LinOp, group: Option<String>| (r.dc.clone(), sku.to_string(), KeyOp { op, group });
    match (&r.op, r.outcome) {
        (_, Outcome::Fail) if !matches!(r.op, Op::Order { sold_out: Some(_), .. }) => vec![],
        (Op::Restock { sku, add, available_after }, _) => {
            vec![here(sku, lin(Step::Restock { add: *add, available_after: if pending { None } else { *available_after } }, pending), None)]
        }
        (Op::ReadInventory { sku, available: Some(a) }, Outcome::Ok) => vec![here(sku, lin(Step::Read { available: *a }, false), None)],
        (Op::Cancel { order_id, order_dc, qty, sku, .. }, _) => {
            let foreign = *order_dc != r.dc;
            let op = KeyOp { op: lin(Step::Cancel { qty: *qty, group: None }, pending || foreign), group: Some(format!("cancel {order_id}")) };
            vec![(order_dc.clone(), sku.clone(), op)]
        }
        (Op::Order { sku, qty, session, idempotency_key, order_id, sold_out }, outcome) => {
            let cross = idempotency_key.as_deref().is_some_and(|k| cross_dc.contains(&(session.as_str(), k)));
            let group = idempotency_key.as_ref().map(|k| format!("order {session} {k}"));
            let mut out = vec![];
            match (outcome, sold_out) {
                (Outcome::Fail, Some(s)) if !cross => out.push(here(sku, lin(Step::SoldOut { qty: *qty, available: s.available, group: None }, false), group)),
                (Outcome::Fail, _) => {}
                (Outcome::Ok, _) if order_id.as_deref().and_then(order_origin) != Some(r.dc.as_str()) => {}
                _ => out.push(here(sku, lin(Step::Order { qty: *qty, group: None }, pending), group)),
            }
            if cross && !out.is_empty() {
                let release = order_id.as_ref().map_or(format!("cancel op {}", r.id), |id| format!("cancel {id}"));
                out.push(here(sku, lin(Step::Cancel { qty: *qty, group: None }, true), Some(release)));
            }
            out
        }
        _ => vec![],
    }
}

/// Numbers the groups that occur more than once in a key; a group of one needs no
/// tracking, and fewer groups keep the memoised states small.
fn number_groups(ops: Vec<KeyOp>) -> Vec<LinOp> {
    let mut count: HashMap<String, usize> = HashMap::new();
    for o in &ops {
        if let Some(g) = &o.group {
            *count.entry(g.clone()).or_default() += 1;
        }
    }
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(ops.len());
    for KeyOp { mut op, group } in ops {
        let shared = group.as_ref().is_some_and(|g| count[g] > 1);
        if shared && matches!(op.step, Step::SoldOut { .. }) {
            // It may replay the sold-out answer an earlier unknown call got, from a state
            // the search cannot place; checking it could raise a false alarm.
            continue;
        }
        let g = group.filter(|g| count[g] > 1).map(|g| {
            let next = index.len();
            *index.entry(g).or_insert(next)
        });
        match &mut op.step {
            Step::Order { group, .. } | Step::SoldOut { group, .. } | Step::Cancel { group, .. } => *group = g,
            _ => {}
        }
        out.push(op);
    }
    out
}

/// Two live orders for one (session, idempotency key): a retry applied twice.
fn check_duplicates(records: &[&Record], acked: &BTreeMap<&str, Acked>, final_state: &FinalState) -> Duplicates {
    // Only definite cancels count here: an unknown cancel must not hide a duplicate.
    let cancelled = cancelled_orders(records, final_state, false);
    let mut groups: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for (id, a) in acked {
        if let Some(k) = a.key {
            groups.entry((a.session, k)).or_default().push(id);
        }
    }
    let keyed_groups = groups.len();
    let mut violations = vec![];
    for ((session, key), ids) in groups {
        let live: Vec<&str> = ids.into_iter().filter(|id| !cancelled.contains(id)).collect();
        if live.len() > 1 {
            let ops = live.iter().map(|id| acked[id].record.id).collect();
            violations.push(DuplicateGroup {
                session: session.into(),
                idempotency_key: key.into(),
                order_ids: live.iter().map(|s| s.to_string()).collect(),
                ops,
            });
        }
    }
    Duplicates { ok: violations.is_empty(), keyed_groups, violations }
}

/// Invariant 5: what share of the calls made during each fault were served, and how long
/// each DC took to accept a write after its leader was killed.
fn check_availability(records: &[&Record], nemesis: &Nemesis, opts: &CheckOptions) -> Availability {
    let windows: Vec<WindowStats> = nemesis.faults.iter().map(|w| window_stats(records, &w.name, w.start_ns, w.end_ns)).collect();
    let leader_kills: Vec<KillStats> = nemesis.leader_kills.iter().map(|k| kill_stats(records, &k.dc, &k.node, k.at_ns)).collect();
    let longest_unavailable_ms = leader_kills.iter().filter_map(|k| k.unavailable_ms).max();
    let ok = opts.unavailability_ms_max.is_none_or(|bound| leader_kills.iter().all(|k| k.unavailable_ms.is_some_and(|ms| ms <= bound)));
    Availability { ok, windows, leader_kills, longest_unavailable_ms, bound_ms: opts.unavailability_ms_max }
}

fn window_stats(records: &[&Record], name: &str, start_ns: u64, end_ns: u64) -> WindowStats {
    let inside: Vec<&&Record> = records.iter().filter(|r| (start_ns..=end_ns).contains(&r.invoke_ns)).collect();
    let n = |o: Outcome| inside.iter().filter(|r| r.outcome == o).count();
    let (ok, fail, unknown) = (n(Outcome::Ok), n(Outcome::Fail), n(Outcome::Unknown));
    // Served: answered about the request itself — done, or refused for a reason of its own
    // (4xx such as sold out). A refused connection or a 503 (no quorum) was not served.
    let served = inside.iter().filter(|r| r.outcome == Outcome::Ok || (r.outcome == Outcome::Fail && (400..500).contains(&r.status))).count();
    let served_share = if inside.is_empty() { 1.0 } else { served as f64 / inside.len() as f64 };
    WindowStats {
        name: name.to_string(),
        start_ns,
        end_ns,
        invoked: inside.len(),
        ok,
        fail,
        unknown,
        served,
        served_share,
        phases: phase_stats(records, start_ns, end_ns),
    }
}

/// The fault's own window is closed at both ends (as `window_stats` counts it); the
/// phases around it leave those instants out.
fn in_phase(phase: &str, from: u64, to: u64, t: u64) -> bool {
    match phase {
        "before" => (from..to).contains(&t),
        "during" => (from..=to).contains(&t),
        _ => t > from && t <= to,
    }
}

/// Throughput and success rate per DC before, during and after a fault, as etcd's
/// robustness tests report availability: "before" and "after" are as long as the fault
/// (clipped to the history), so the three are comparable. A call counts in the DC it was
/// sent to, in the phase it was invoked in; `ok_per_s` counts ok calls per second.
fn phase_stats(records: &[&Record], start_ns: u64, end_ns: u64) -> Vec<PhaseStats> {
    let len = end_ns.saturating_sub(start_ns).max(1);
    let last = records.iter().map(|r| r.complete_ns.unwrap_or(r.invoke_ns)).max().unwrap_or(end_ns);
    let phases = [("before", start_ns.saturating_sub(len), start_ns), ("during", start_ns, end_ns), ("after", end_ns, (end_ns + len).min(last.max(end_ns)))];
    let dcs: BTreeSet<&str> = records.iter().map(|r| r.dc.as_str()).collect();
    let mut out = vec![];
    for dc in dcs {
        for (phase, from, to) in phases {
            let inside: Vec<&&Record> = records.iter().filter(|r| r.dc == dc && in_phase(phase, from, to, r.invoke_ns)).collect();
            let ok = inside.iter().filter(|r| r.outcome == Outcome::Ok).count();
            let secs = to.saturating_sub(from) as f64 / 1e9;
            out.push(PhaseStats {
                dc: dc.to_string(),
                phase: phase.to_string(),
                start_ns: from,
                end_ns: to,
                invoked: inside.len(),
                ok,
                ok_per_s: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
                success_rate: if inside.is_empty() { 1.0 } else { ok as f64 / inside.len() as f64 },
            });
        }
    }
    out
}

fn kill_stats(records: &[&Record], dc: &str, node: &str, at_ns: u64) -> KillStats {
    // Writes called before the kill may complete just after it without proving that a new
    // leader exists, so only calls made after the kill count. A write refused for its own
    // reason (4xx: sold out, unknown order) counts too: Agora decides those on the leader
    // (a rejection is confirmed with a read index), and once stock runs out they are most
    // of what a DC answers.
    let answered = |r: &Record| r.outcome == Outcome::Ok || (r.outcome == Outcome::Fail && (400..500).contains(&r.status));
    let first =
        records.iter().filter(|r| r.dc == dc && answered(r) && r.op.is_write() && r.invoke_ns >= at_ns).filter_map(|r| r.complete_ns.map(|c| (c, r.id))).min();
    KillStats {
        dc: dc.to_string(),
        node: node.to_string(),
        at_ns,
        first_ok_write: first.map(|(_, id)| id),
        unavailable_ms: first.map(|(c, _)| c.saturating_sub(at_ns) / 1_000_000),
    }
}
