//! The checker is trusted only after it fails on bad histories: one test per kind of
//! violation, valid histories that must pass (concurrency, unknown outcomes), a property
//! test over random model-consistent histories, and the search's time bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::checker::lin_keys;
use super::history::*;
use super::linearizable::{check_ops, Limits, Verdict};
use super::report::{human, CheckReport, RunVerdict};
use super::{check, CheckOptions};

// ---- building histories ----

fn rec(id: u64, dc: &str, span: (u64, Option<u64>), outcome: Outcome, status: u16, op: Op) -> Record {
    Record { id, client: format!("c{id}"), node: format!("{dc}-n1"), dc: dc.into(), op, invoke_ns: span.0, complete_ns: span.1, outcome, status, error: None }
}
fn ok(id: u64, dc: &str, t0: u64, t1: u64, op: Op) -> Record {
    rec(id, dc, (t0, Some(t1)), Outcome::Ok, 200, op)
}
fn fail(id: u64, dc: &str, t0: u64, t1: u64, op: Op) -> Record {
    rec(id, dc, (t0, Some(t1)), Outcome::Fail, 409, op)
}
fn unknown(id: u64, dc: &str, t0: u64, op: Op) -> Record {
    rec(id, dc, (t0, None), Outcome::Unknown, 503, op)
}
fn restock(sku: &str, add: u64, after: u64) -> Op {
    Op::Restock { sku: sku.into(), add, available_after: Some(after) }
}
fn restock_sent(sku: &str, add: u64) -> Op {
    Op::Restock { sku: sku.into(), add, available_after: None }
}
fn order(sku: &str, qty: u64, id: &str) -> Op {
    Op::Order { sku: sku.into(), qty, session: "t1".into(), idempotency_key: None, order_id: Some(id.into()), sold_out: None }
}
fn order_sent(sku: &str, qty: u64) -> Op {
    Op::Order { sku: sku.into(), qty, session: "t1".into(), idempotency_key: None, order_id: None, sold_out: None }
}
fn keyed(op: Op, key: &str) -> Op {
    match op {
        Op::Order { sku, qty, session, order_id, sold_out, .. } => Op::Order { sku, qty, session, idempotency_key: Some(key.into()), order_id, sold_out },
        other => other,
    }
}
fn sold_out(sku: &str, qty: u64, available: u64) -> Op {
    Op::Order { sku: sku.into(), qty, session: "t1".into(), idempotency_key: None, order_id: None, sold_out: Some(SoldOut { available }) }
}
fn read(sku: &str, available: u64) -> Op {
    Op::ReadInventory { sku: sku.into(), available: Some(available) }
}
fn cancel(order_id: &str, qty: u64, sku: &str) -> Op {
    let order_dc = order_origin(order_id).unwrap_or_default().to_string();
    Op::Cancel { order_id: order_id.into(), order_dc, qty, sku: sku.into(), session: None }
}

/// A healthy final state for `dcs`: every acknowledged order present everywhere, one
/// digest, counters that add up.
fn healthy(history: &[Record], dcs: &[&str]) -> FinalState {
    let mut skus: BTreeMap<String, SkuState> = BTreeMap::new();
    for r in history {
        if let (Op::Order { sku, order_id: Some(id), .. }, Outcome::Ok) = (&r.op, r.outcome) {
            skus.entry(sku.clone()).or_default().orders_present.push(id.clone());
        }
    }
    let sessions = final_sessions(history);
    let dc = |_: &&str| DcState { digest: "d1".into(), converged_after_ms: Some(120), skus: skus.clone(), sessions: sessions.clone() };
    FinalState { dcs: dcs.iter().map(|d| (d.to_string(), dc(d))).collect(), nemesis: Nemesis::default(), escrow: Escrow::default() }
}

/// Every acknowledged session as LWW leaves it: gone if a logout was acknowledged, else
/// the largest version answered (or a first one, for histories without versions).
fn final_sessions(history: &[Record]) -> BTreeMap<String, Option<SessionVersion>> {
    let mut out: BTreeMap<String, Option<SessionVersion>> = BTreeMap::new();
    for r in history.iter().filter(|r| r.outcome == Outcome::Ok) {
        if let Op::Session { token: Some(t), .. } = &r.op {
            out.insert(t.clone(), Some(SessionVersion { hlc: 1, dc: r.dc.clone() }));
        }
    }
    for r in history.iter().filter(|r| r.outcome == Outcome::Ok) {
        match &r.op {
            Op::Session { token: Some(t), version: Some(v), .. } | Op::ReadSession { token: t, version: Some(v), .. } => {
                if let Some(Some(f)) = out.get_mut(t) {
                    *f = f.clone().max(v.clone());
                }
            }
            _ => {}
        }
    }
    for r in history.iter().filter(|r| r.outcome == Outcome::Ok) {
        if let Op::Logout { token } = &r.op {
            out.insert(token.clone(), None);
        }
    }
    out
}

fn opts() -> CheckOptions {
    CheckOptions { min_ok_ops: 1, lin_key_budget_ms: 5_000, ..CheckOptions::default() }
}

/// The names of the sections that failed, in report order.
fn failing(r: &CheckReport) -> Vec<&'static str> {
    let sections = [
        ("lost_orders", r.lost_orders.ok),
        ("oversell", r.oversell.ok),
        ("convergence", r.convergence.ok),
        ("linearizability", r.linearizability.ok),
        ("duplicates", r.duplicates.ok),
        ("availability", r.availability.ok),
        ("roaming", r.roaming.ok),
        ("wrongly_refused", r.wrongly_refused.ok),
        ("sessions", r.sessions.ok),
    ];
    sections.iter().filter(|(_, ok)| !ok).map(|(name, _)| *name).collect()
}

/// Data-driven: runs the checker and compares the failing sections; prints the human
/// report on a mismatch.
fn must_fail_in(history: &[Record], state: &FinalState, expected: &[&str]) -> CheckReport {
    let report = check(history, state, &opts());
    assert_eq!(failing(&report), expected, "\n{}", human(&report));
    let verdict = if expected.is_empty() { RunVerdict::Valid } else { RunVerdict::Invalid };
    assert_eq!(report.verdict, verdict, "\n{}", human(&report));
    assert_eq!(report.exit_code(), if expected.is_empty() { 0 } else { 1 });
    report
}

fn must_be_valid(history: &[Record]) -> CheckReport {
    must_fail_in(history, &healthy(history, &["dc1", "dc2"]), &[])
}

/// The (kind, culprit id) of the only illegal key.
fn lin_failure(r: &CheckReport) -> (String, Option<u64>) {
    let failures: Vec<_> = r.linearizability.results.iter().filter_map(|k| k.failure.as_ref()).collect();
    assert_eq!(failures.len(), 1, "\n{}", human(r));
    (failures[0].kind.clone(), failures[0].culprit.as_ref().map(|c| c.id))
}

// ---- the checker fails on bad histories ----

fn session_ok(id: u64, dc: &str, t0: u64, t1: u64, token: &str) -> Record {
    ok(id, dc, t0, t1, Op::Session { user: "u".into(), token: Some(token.into()), version: None })
}
fn version(hlc: u64, dc: &str) -> SessionVersion {
    SessionVersion { hlc, dc: dc.into() }
}
fn session_at(id: u64, dc: &str, t0: u64, t1: u64, token: &str, hlc: u64) -> Record {
    ok(id, dc, t0, t1, Op::Session { user: "u".into(), token: Some(token.into()), version: Some(version(hlc, dc)) })
}
fn read_version(id: u64, dc: &str, t0: u64, t1: u64, token: &str, v: SessionVersion) -> Record {
    ok(id, dc, t0, t1, Op::ReadSession { token: token.into(), user: Some("u".into()), version: Some(v) })
}
fn logout(id: u64, dc: &str, t0: u64, t1: u64, token: &str) -> Record {
    rec(id, dc, (t0, Some(t1)), Outcome::Ok, 204, Op::Logout { token: token.into() })
}
fn read_order(id: &str) -> Op {
    Op::ReadOrder { order_id: id.into(), order_status: None }
}
fn read_session(token: &str) -> Op {
    Op::ReadSession { token: token.into(), user: None, version: None }
}
fn cancel_with(order_id: &str, qty: u64, sku: &str, session: &str) -> Op {
    match cancel(order_id, qty, sku) {
        Op::Cancel { order_id, order_dc, qty, sku, .. } => Op::Cancel { order_id, order_dc, qty, sku, session: Some(session.into()) },
        other => other,
    }
}
/// A session from dc1 and an order placed with it in dc2, both acknowledged by t=30.
fn roamed() -> Vec<Record> {
    vec![session_ok(1, "dc1", 0, 5, "t1"), ok(2, "dc2", 0, 10, restock("s", 5, 5)), ok(3, "dc2", 20, 30, order("s", 1, "dc2-a"))]
}

#[test]
fn availability_is_reported_per_dc_before_during_and_after_a_fault() {
    let s = 1_000_000_000u64;
    // dc1: 2 ok calls a second throughout except during the fault, where half fail; dc2: steady.
    let mut h = vec![];
    let mut id = 0;
    for t in 0..30u64 {
        for (dc, bad) in [("dc1", (10..20).contains(&t) && t % 2 == 0), ("dc2", false)] {
            id += 1;
            let at = t * s / 2;
            h.push(if bad {
                unknown(id, dc, at, read("s", 0))
            } else {
                ok(id, dc, at, at + 1000, Op::ReadOrder { order_id: "x".into(), order_status: Some("placed".into()) })
            });
        }
    }
    let mut state = healthy(&h, &["dc1", "dc2"]);
    state.nemesis.faults.push(FaultWindow { name: "kill dc1 leader".into(), start_ns: 5 * s, end_ns: 10 * s });
    let r = check(&h, &state, &opts());
    let w = &r.availability.windows[0];
    let get = |dc: &str, phase: &str| w.phases.iter().find(|p| p.dc == dc && p.phase == phase).cloned().expect("phase");
    let (before, during, after) = (get("dc1", "before"), get("dc1", "during"), get("dc1", "after"));
    assert_eq!((before.invoked, before.ok), (10, 10));
    // The fault's end is inside it (t = 10 s, ok): 11 calls, 5 lost.
    assert_eq!((during.invoked, during.ok), (11, 6), "{during:?}");
    assert!((during.success_rate - 6.0 / 11.0).abs() < 1e-9);
    assert!((before.ok_per_s - 2.0).abs() < 1e-9 && (during.ok_per_s - 1.2).abs() < 1e-9, "{before:?} {during:?}");
    assert_eq!(after.invoked, 9, "after is clipped to the history: {after:?}");
    assert_eq!(get("dc2", "during").success_rate, 1.0);
    let text = human(&r);
    assert!(text.contains("dc1: before 2.0 ok/s 100.0 % | during 1.2 ok/s 54.5 %"), "{text}");
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(json["availability"]["windows"][0]["phases"][0]["phase"], "before");
}

#[test]
fn a_valid_request_answered_400_or_500_is_caught() {
    let mut h = roamed();
    // Refusals the rules or the cluster may give are not defects: sold out, no quorum.
    h.push(fail(4, "dc1", 30, 31, sold_out("a", 1, 0)));
    h.push(rec(5, "dc1", (32, Some(33)), Outcome::Fail, 503, order_sent("a", 1)));
    must_be_valid(&h);
    h.push(rec(6, "dc2", (34, Some(35)), Outcome::Fail, 400, order_sent("a", 1)));
    h.push(rec(7, "dc2", (36, Some(37)), Outcome::Fail, 500, read("a", 0)));
    // The workload records a 500 to a write as unknown (it may have been applied): still a defect.
    h.push(rec(8, "dc2", (38, Some(39)), Outcome::Unknown, 500, order_sent("a", 1)));
    let r = must_fail_in(&h, &healthy(&h, &["dc1", "dc2"]), &["wrongly_refused"]);
    assert_eq!(r.wrongly_refused.violations.iter().map(|o| o.id).collect::<Vec<_>>(), [6, 7, 8]);
    assert!(human(&r).contains("refused as malformed (400) or failed (500): 3 of"), "{}", human(&r));
}

#[test]
fn an_acknowledged_order_not_found_in_another_dc_breaks_read_your_writes() {
    let mut h = roamed();
    // Before the acknowledgement returned, a miss proves nothing; 503 owner_unreachable is allowed.
    h.push(rec(4, "dc1", (25, Some(26)), Outcome::Fail, 404, read_order("dc2-a")));
    h.push(rec(5, "dc1", (40, None), Outcome::Unknown, 503, read_order("dc2-a")));
    must_be_valid(&h);
    h.push(rec(6, "dc1", (40, Some(50)), Outcome::Fail, 404, read_order("dc2-a")));
    let r = must_fail_in(&h, &healthy(&h, &["dc1", "dc2"]), &["roaming"]);
    assert_eq!(r.roaming.violations.len(), 1);
    assert_eq!((r.roaming.violations[0].kind.as_str(), r.roaming.violations[0].op.id, r.roaming.violations[0].acknowledged_by), ("order_not_found", 6, 3));
    assert!(human(&r).contains("order_not_found dc2-a"), "{}", human(&r));
}

#[test]
fn an_acknowledged_session_not_found_or_refused_elsewhere_breaks_read_your_writes() {
    let mut h = roamed();
    h.push(rec(4, "dc3", (40, Some(50)), Outcome::Fail, 404, read_session("t1")));
    h.push(rec(5, "dc3", (40, Some(50)), Outcome::Fail, 401, order_sent("s", 1)));
    // A token nobody was given is rightly unknown.
    h.push(rec(6, "dc3", (40, Some(50)), Outcome::Fail, 404, read_session("t9")));
    let r = must_fail_in(&h, &healthy(&h, &["dc1", "dc2", "dc3"]), &["roaming"]);
    let kinds: Vec<(&str, u64)> = r.roaming.violations.iter().map(|v| (v.kind.as_str(), v.op.id)).collect();
    assert_eq!(kinds, [("session_not_found", 4), ("session_refused", 5)]);
}

#[test]
fn a_cancel_of_an_own_order_refused_anywhere_is_caught() {
    for (status, code) in [(404, "not_found"), (409, "foreign_order"), (401, "unknown_session"), (403, "forbidden")] {
        let mut h = roamed();
        h.push(rec(4, "dc1", (40, Some(50)), Outcome::Fail, status, cancel_with("dc2-a", 1, "s", "t1")));
        let r = must_fail_in(&h, &healthy(&h, &["dc1", "dc2"]), &["roaming"]);
        assert_eq!(r.roaming.violations[0].kind, "cancel_refused", "{code}");
    }
    // Allowed: another session's cancel refused; already_cancelled after a cancel that may
    // have happened; a queued cancel (202, unknown).
    let mut h = roamed();
    h.push(rec(4, "dc1", (40, Some(50)), Outcome::Fail, 403, cancel_with("dc2-a", 1, "s", "t2")));
    h.push(rec(5, "dc1", (60, None), Outcome::Unknown, 202, cancel_with("dc2-a", 1, "s", "t1")));
    h.push(rec(6, "dc2", (70, Some(80)), Outcome::Fail, 409, cancel_with("dc2-a", 1, "s", "t1")));
    must_be_valid(&h);
}

#[test]
fn lost_acknowledged_order_is_reported() {
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5)), ok(2, "dc1", 20, 30, order("s", 1, "dc1-a"))];
    let mut state = healthy(&h, &["dc1", "dc2"]);
    let dc2 = state.dcs.get_mut("dc2").and_then(|d| d.skus.get_mut("s")).expect("dc2 has s");
    dc2.orders_present.clear();
    dc2.orders_missing.push("dc1-a".into());
    let r = must_fail_in(&h, &state, &["lost_orders"]);
    assert_eq!(r.lost_orders.lost.len(), 1);
    assert_eq!(r.lost_orders.lost[0].dcs, ["dc2"]);
    assert_eq!(r.lost_orders.lost[0].acknowledged_by.id, 2);
    assert!(human(&r).contains("lost dc1-a (s) in dc2"), "{}", human(&r));
}

#[test]
fn order_not_found_in_its_own_dc_after_ack_is_a_stale_order_read() {
    let mut h = vec![ok(1, "dc1", 0, 10, restock("s", 5, 5)), ok(2, "dc1", 20, 30, order("s", 1, "dc1-a"))];
    h.push(rec(3, "dc1", (40, Some(50)), Outcome::Fail, 404, Op::ReadOrder { order_id: "dc1-a".into(), order_status: None }));
    let r = must_fail_in(&h, &healthy(&h, &["dc1", "dc2"]), &["lost_orders", "roaming"]);
    assert_eq!(r.lost_orders.stale_reads.len(), 1);
    assert_eq!(r.lost_orders.stale_reads[0].read.id, 3);
}

#[test]
fn oversell_in_a_dc_view_is_reported() {
    let h = [ok(1, "dc1", 0, 10, restock("s", 10, 10))];
    let mut state = healthy(&h, &["dc1", "dc2"]);
    let counters = |stocked, sold| Counters { available: 0, stocked, sold, released: 0 };
    let by_dc = BTreeMap::from([("dc1".to_string(), counters(10, 11)), ("dc2".to_string(), counters(0, 0))]);
    state.dcs.get_mut("dc2").expect("dc2").skus.insert("s".into(), SkuState { inventory: InventoryView { by_dc, total: 0 }, ..SkuState::default() });
    let r = must_fail_in(&h, &state, &["oversell"]);
    // Both the cluster-wide sum and dc1's own stock (rebalancing off) are over.
    assert_eq!(r.oversell.violations.len(), 2, "{:?}", r.oversell.violations);
    assert!(r.oversell.violations.iter().any(|v| v.message.contains("Σsold 11 − Σreleased 0 > Σstocked 10")));
}

#[test]
fn oversell_by_acknowledged_orders_is_reported() {
    // One unit, sold once in each DC: each DC's key is fine on its own only if dc2 had
    // stock, which it had not; the history check sees 2 units sold of 1.
    let h = [ok(1, "dc1", 0, 10, restock("s", 1, 1)), ok(2, "dc1", 20, 30, order("s", 1, "dc1-a")), ok(3, "dc2", 20, 30, order("s", 1, "dc2-b"))];
    let r = must_fail_in(&h, &healthy(&h, &["dc1", "dc2"]), &["oversell", "linearizability"]);
    assert!(r.oversell.violations[0].message.contains("hold 2 units but at most 1"), "{:?}", r.oversell.violations);
}

#[test]
fn stale_read_is_reported_as_such() {
    // The order completed before the read was called, yet the read shows the old stock.
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5)), ok(2, "dc1", 20, 30, order("s", 2, "dc1-a")), ok(3, "dc1", 40, 50, read("s", 5))];
    let r = must_fail_in(&h, &healthy(&h, &["dc1"]), &["linearizability"]);
    assert_eq!(lin_failure(&r), ("stale_read".to_string(), Some(3)));
    let text = human(&r);
    assert!(text.contains("stale_read at #3 read_inventory s -> 5"), "{text}");
}

#[test]
fn sequential_orders_beyond_stock_are_not_linearizable() {
    let h = [ok(1, "dc1", 0, 10, restock("s", 1, 1)), ok(2, "dc1", 20, 30, order("s", 1, "dc1-a")), ok(3, "dc1", 40, 50, order("s", 1, "dc1-b"))];
    let r = must_fail_in(&h, &healthy(&h, &["dc1"]), &["oversell", "linearizability"]);
    assert_eq!(lin_failure(&r), ("non_linearizable".to_string(), Some(3)));
    let involved: Vec<u64> = r.linearizability.results[0].failure.as_ref().map(|f| f.involved.iter().map(|o| o.id).collect()).unwrap_or_default();
    assert_eq!(involved, [1, 2, 3]);
}

#[test]
fn wrong_restock_result_and_wrong_sold_out_are_not_linearizable() {
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5)), ok(2, "dc1", 20, 30, restock("s", 1, 7))];
    assert_eq!(lin_failure(&must_fail_in(&h, &healthy(&h, &["dc1"]), &["linearizability"])).1, Some(2));
    // Sold out while 5 units were there, or with a wrong count.
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5)), fail(2, "dc1", 20, 30, sold_out("s", 2, 5))];
    assert_eq!(lin_failure(&must_fail_in(&h, &healthy(&h, &["dc1"]), &["linearizability"])).1, Some(2));
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5)), fail(2, "dc1", 20, 30, sold_out("s", 9, 4))];
    assert_eq!(lin_failure(&must_fail_in(&h, &healthy(&h, &["dc1"]), &["linearizability"])).1, Some(2));
}

#[test]
fn an_unknown_write_cannot_take_effect_and_then_vanish() {
    let h = [
        ok(1, "dc1", 0, 10, restock("s", 5, 5)),
        unknown(2, "dc1", 20, restock_sent("s", 3)),
        ok(3, "dc1", 30, 40, read("s", 8)),
        ok(4, "dc1", 50, 60, read("s", 5)),
    ];
    let r = must_fail_in(&h, &healthy(&h, &["dc1"]), &["linearizability"]);
    assert_eq!(lin_failure(&r), ("stale_read".to_string(), Some(4)));
}

#[test]
fn divergent_digests_are_reported() {
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5))];
    let mut state = healthy(&h, &["dc1", "dc2", "dc3"]);
    state.dcs.get_mut("dc3").expect("dc3").digest = "d2".into();
    let r = must_fail_in(&h, &state, &["convergence"]);
    assert_eq!(r.convergence.distinct_digests, 2);
    assert!(r.convergence.problems[0].contains("dc1,dc2 = d1; dc3 = d2"), "{:?}", r.convergence.problems);
}

#[test]
fn convergence_over_the_bound_is_reported() {
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5))];
    let r = check(&h, &healthy(&h, &["dc1", "dc2"]), &CheckOptions { convergence_ms_max: Some(100), ..opts() });
    assert_eq!(failing(&r), ["convergence"]);
}

#[test]
fn duplicate_live_orders_for_one_key_are_reported() {
    // A retry that landed in dc2 before dc1's order was replicated, and no merge cancel.
    let h = [
        ok(1, "dc1", 0, 10, restock("s", 5, 5)),
        ok(2, "dc2", 0, 10, restock("s", 5, 5)),
        ok(3, "dc1", 20, 30, keyed(order("s", 1, "dc1-a"), "k1")),
        ok(4, "dc2", 40, 50, keyed(order("s", 1, "dc2-b"), "k1")),
    ];
    let r = must_fail_in(&h, &healthy(&h, &["dc1", "dc2"]), &["duplicates"]);
    assert_eq!(r.duplicates.violations[0].order_ids, ["dc1-a", "dc2-b"]);
    assert_eq!(r.duplicates.violations[0].ops, [3, 4]);
    // Once merge cancelled the later one (and released its unit, seen by a read), all is well.
    let mut h = h.to_vec();
    h.push(ok(5, "dc2", 900, 910, read("s", 5)));
    let mut state = healthy(&h, &["dc1", "dc2"]);
    for d in state.dcs.values_mut() {
        d.skus.get_mut("s").expect("s").orders_cancelled.push("dc2-b".into());
    }
    must_fail_in(&h, &state, &[]);
}

#[test]
fn too_little_load_is_inconclusive() {
    let h = [ok(1, "dc1", 0, 10, restock("s", 5, 5))];
    let r = check(&h, &healthy(&h, &["dc1"]), &CheckOptions::default());
    assert_eq!((r.verdict, r.valid, r.exit_code()), (RunVerdict::Inconclusive, false, 2));
    assert!(r.reasons[0].contains("1 of 50 required ok ops"), "{:?}", r.reasons);
}

// ---- valid histories pass ----

#[test]
fn concurrent_operations_are_valid() {
    must_be_valid(&[
        ok(1, "dc1", 0, 10, restock("s", 2, 2)),
        ok(2, "dc1", 20, 60, order("s", 1, "dc1-a")),
        ok(3, "dc1", 30, 40, read("s", 2)),
        ok(4, "dc1", 50, 70, read("s", 1)),
        // Two concurrent restocks may be answered in either order.
        ok(5, "dc1", 100, 200, restock("s", 10, 21)),
        ok(6, "dc1", 110, 190, restock("s", 10, 11)),
        // dc2 is another key, with its own stock.
        ok(7, "dc2", 0, 10, restock("s", 3, 3)),
        fail(8, "dc2", 20, 30, sold_out("s", 4, 3)),
    ]);
}

#[test]
fn unknown_writes_may_take_effect_or_not() {
    let base = || vec![ok(1, "dc1", 0, 10, restock("s", 5, 5)), unknown(2, "dc1", 20, restock_sent("s", 3))];
    for later in [[5, 5], [5, 8], [8, 8]] {
        let mut h = base();
        h.push(ok(3, "dc1", 30, 40, read("s", later[0])));
        h.push(ok(4, "dc1", 50, 60, read("s", later[1])));
        must_be_valid(&h);
    }
}

#[test]
fn an_unknown_order_may_take_effect_late() {
    must_be_valid(&[
        ok(1, "dc1", 0, 10, restock("s", 5, 5)),
        unknown(2, "dc1", 20, order_sent("s", 2)),
        ok(3, "dc1", 30, 40, read("s", 5)),
        ok(4, "dc1", 1_000, 1_010, read("s", 5)),
        ok(5, "dc1", 5_000, 5_010, read("s", 3)),
        fail(6, "dc1", 6_000, 6_010, sold_out("s", 4, 3)),
    ]);
}

#[test]
fn keyed_retries_and_cancels_take_effect_once() {
    must_be_valid(&[
        ok(1, "dc1", 0, 10, restock("s", 5, 5)),
        unknown(2, "dc1", 20, keyed(order_sent("s", 2), "k")),
        // The retry gets the first order back: stock drops once.
        ok(3, "dc1", 30, 40, keyed(order("s", 2, "dc1-a"), "k")),
        ok(4, "dc1", 50, 60, read("s", 3)),
        ok(5, "dc1", 70, 80, cancel("dc1-a", 2, "s")),
        // A keyed retry of the cancel answers ok again but releases nothing more.
        ok(6, "dc1", 90, 100, cancel("dc1-a", 2, "s")),
        ok(7, "dc1", 110, 120, read("s", 5)),
    ]);
}

#[test]
fn examples_in_the_format_doc_parse() {
    let history = r#"{"id":1,"client":"c1","node":"dc1-n2","dc":"dc1","op":{"kind":"restock","sku":"s1","add":10,"available_after":10},"invoke_ns":1000,"complete_ns":2000,"outcome":"ok","status":200}
{"id":2,"client":"c2","node":"dc1-n1","dc":"dc1","op":{"kind":"order","sku":"s1","qty":2,"session":"t9","idempotency_key":"k2","order_id":"dc1-7f3a"},"invoke_ns":2500,"complete_ns":3100,"outcome":"ok","status":201}

{"id":3,"client":"c3","node":"dc2-n1","dc":"dc2","op":{"kind":"read_inventory","sku":"s1"},"invoke_ns":2600,"complete_ns":null,"outcome":"unknown","status":503}
"#;
    let records = read_history(history.as_bytes(), "history.jsonl").expect("example history parses");
    assert_eq!(records.len(), 3);
    let state = r#"{"dcs": {
      "dc1": {"digest": "9f2c", "converged_after_ms": 850,
              "skus": {"s1": {"inventory": {"by_dc": {"dc1": {"available": 8, "stocked": 10, "sold": 2, "released": 0}}, "total": 8},
                              "orders_present": ["dc1-7f3a"], "orders_cancelled": [], "orders_missing": []}}}},
      "nemesis": {"faults": [{"name": "partition dc1|dc2,dc3", "start_ns": 2000, "end_ns": 3000}],
                  "leader_kills": [{"dc": "dc1", "node": "dc1-n1", "at_ns": 2200}]}}"#;
    let state = read_final_state(state.as_bytes(), "final.json").expect("example final state parses");
    let r = check(&records, &state, &opts());
    assert_eq!(r.verdict, RunVerdict::Valid, "{}", human(&r));
    assert_eq!((r.availability.windows[0].invoked, r.availability.windows[0].ok), (2, 1));
    assert_eq!(r.availability.leader_kills[0].first_ok_write, Some(2));
    let json = serde_json::to_value(&r).expect("report serialises");
    assert_eq!(json["linearizability"]["results"][0]["verdict"], "ok");
}

#[test]
fn input_errors_name_the_line_and_field() {
    let line = |op: &str, tail: &str| format!(r#"{{"id":1,"client":"c","node":"dc1-n1","dc":"dc1","op":{op},"invoke_ns":5,{tail}}}"#);
    let cases = [
        (line(r#"{"kind":"restock","sku":"s","add":1}"#, r#""complete_ns":9,"outcome":"ok","status":200"#), "op.available_after"),
        (line(r#"{"kind":"restock","sku":"s","add":1,"avail":3}"#, r#""complete_ns":9,"outcome":"ok","status":200"#), "unknown field `avail`"),
        (line(r#"{"kind":"read_inventory","sku":"s"}"#, r#""outcome":"fail","status":404"#), "`complete_ns` is required"),
        (line(r#"{"kind":"read_inventory","sku":"s"}"#, r#""complete_ns":1,"outcome":"fail","status":404"#), "before `invoke_ns`"),
        (line(r#"{"kind":"order","sku":"s","qty":1,"session":"t","order_id":"x"}"#, r#""complete_ns":9,"outcome":"ok","status":201"#), "does not name its DC"),
        (line(r#"{"kind":"read_inventory","sku":"s"}"#, r#""complete_ns":9,"outcome":"maybe","status":0"#), "unknown variant `maybe`"),
    ];
    for (bad, expected) in cases {
        let input = format!("{}\n\n{bad}\n", line(r#"{"kind":"read_inventory","sku":"s","available":0}"#, r#""complete_ns":9,"outcome":"ok","status":200"#));
        let err = read_history(input.as_bytes(), "h.jsonl").expect_err("bad line is rejected");
        assert_eq!(err.line, 3, "{err}");
        assert!(err.to_string().contains(expected) && err.to_string().starts_with("h.jsonl line 3:"), "{err}");
    }
    // In-memory histories get the same rules: the bad record is left out, the run is inconclusive.
    let h = [ok(1, "dc1", 0, 10, restock_sent("s", 1))];
    let r = check(&h, &healthy(&h, &["dc1"]), &CheckOptions { min_ok_ops: 0, ..opts() });
    assert_eq!(r.verdict, RunVerdict::Inconclusive);
    assert!(r.input_errors[0].contains("op 1: outcome ok needs the result `op.available_after`"), "{:?}", r.input_errors);
}

// ---- the search's bound ----

#[test]
fn pathological_history_times_out_instead_of_hanging() {
    // 40 concurrent orders and a read no subset of them explains: every subset of the
    // orders is a distinct state to visit, 2^40 of them.
    let mut h = vec![ok(1, "dc1", 0, 10, restock("s", 1_000, 1_000))];
    h.extend((2..42).map(|i| ok(i, "dc1", 20 + i, 1_000, order("s", 1, &format!("dc1-o{i}")))));
    h.push(ok(100, "dc1", 30, 2_000, read("s", 999_999)));
    let started = Instant::now();
    let r = check(&h, &healthy(&h, &["dc1"]), &CheckOptions { lin_key_budget_ms: 50, ..opts() });
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!((r.linearizability.timed_out_keys, r.linearizability.illegal_keys), (1, 0));
    assert_eq!(r.verdict, RunVerdict::Inconclusive, "{}", human(&r));
}

// ---- property: model-consistent histories are linearizable ----

/// One generated call: kind (0 restock, 1 order, 2 read, 3 cancel), amount, how far its
/// call and return stray from its linearization point, and whether it is unknown (and
/// then whether it took effect).
type Gen = (u8, u64, u64, u64, bool, bool);

/// Runs the sequential model at points 100 apart, and records each call with an interval
/// around its point, so that intervals overlap at random but the model's order is a
/// valid linearization.
fn model_history(gens: &[Gen]) -> Vec<Record> {
    let (mut available, mut placed, mut h) = (0u64, Vec::<(String, u64)>::new(), Vec::new());
    for (i, &(kind, amount, before, after, is_unknown, took_effect)) in gens.iter().enumerate() {
        let (id, point) = (i as u64 + 1, 1_000 + 100 * i as u64);
        let span = (point - before, point + after);
        let effect = !is_unknown || took_effect;
        let (op, outcome) = match kind {
            0 => {
                available += if effect { amount } else { 0 };
                (restock("s", amount, available), Outcome::Ok)
            }
            1 if available >= amount => {
                if effect {
                    available -= amount;
                    placed.push((format!("dc1-o{id}"), amount));
                }
                (order("s", amount, &format!("dc1-o{id}")), Outcome::Ok)
            }
            1 => (sold_out("s", amount, available), Outcome::Fail),
            3 if !placed.is_empty() => {
                let (order_id, qty) = placed.remove(amount as usize % placed.len());
                available += if effect { qty } else { 0 };
                (cancel(&order_id, qty, "s"), Outcome::Ok)
            }
            _ => (read("s", available), Outcome::Ok),
        };
        let unknown_write = is_unknown && outcome == Outcome::Ok && op.is_write();
        h.push(if unknown_write { unknown(id, "dc1", span.0, op) } else { rec(id, "dc1", (span.0, Some(span.1)), outcome, 200, op) });
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// The other direction: calls that do not overlap have one linearization, so a read
    /// changed by any amount must be caught, and named as the stale read.
    #[test]
    fn a_wrong_read_in_a_sequential_history_is_caught(gens in proptest::collection::vec((0u8..4, 1u64..4, 0u64..40, 0u64..40, Just(false), Just(false)), 1..40), pick in any::<prop::sample::Index>(), off in 1u64..5) {
        let mut h = model_history(&gens);
        let reads: Vec<usize> = (0..h.len()).filter(|&i| matches!(h[i].op, Op::ReadInventory { .. })).collect();
        prop_assume!(!reads.is_empty());
        let i = reads[pick.index(reads.len())];
        if let Op::ReadInventory { available: Some(a), .. } = &mut h[i].op {
            *a += off;
        }
        let r = check(&h, &healthy(&h, &["dc1"]), &opts());
        prop_assert_eq!(r.linearizability.illegal_keys, 1);
        prop_assert_eq!(lin_failure(&r), ("stale_read".to_string(), Some(h[i].id)));
    }

    #[test]
    fn model_consistent_histories_are_linearizable(gens in proptest::collection::vec((0u8..4, 1u64..4, 0u64..250, 0u64..250, proptest::bool::weighted(0.2), any::<bool>()), 1..40)) {
        let h = model_history(&gens);
        let records: Vec<&Record> = h.iter().collect();
        for ((dc, sku), ops) in lin_keys(&records) {
            let verdict = check_ops(&ops, Limits::new(Duration::from_secs(20), 5_000_000));
            prop_assert_eq!(verdict, Verdict::Ok, "{}/{} not linearizable: {:#?}", dc, sku, h);
        }
    }
}

/// A long run with ~10 overlapping calls per key and 10 % unknown outcomes is judged in
/// well under its budget (the search is exponential only in what it cannot rule out).
#[test]
fn long_concurrent_history_with_unknowns_is_checked_quickly() {
    use rand::{Rng, SeedableRng};
    let seed = 7;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let gens: Vec<Gen> = (0..2_000)
        .map(|_| (rng.gen_range(0..4), rng.gen_range(1..4), rng.gen_range(0..300), rng.gen_range(0..300), rng.gen_bool(0.1), rng.gen_bool(0.5)))
        .collect();
    let h = model_history(&gens);
    let started = Instant::now();
    let r = check(&h, &healthy(&h, &["dc1"]), &CheckOptions { lin_key_budget_ms: 20_000, ..opts() });
    assert_eq!(r.linearizability.ok_keys, 1, "seed {seed}: {}", human(&r));
    assert!(started.elapsed() < Duration::from_secs(20), "seed {seed}: took {:?}", started.elapsed());
}

#[test]
fn a_cancel_sent_to_another_dc_may_apply_later_in_the_owner() {
    for seen in [3, 5] {
        must_be_valid(&[
            ok(1, "dc1", 0, 10, restock("s", 5, 5)),
            ok(2, "dc1", 20, 30, order("s", 2, "dc1-a")),
            // Queued in dc2 (202) while dc1 was unreachable: dc1 applies it when it can.
            ok(3, "dc2", 40, 50, cancel("dc1-a", 2, "s")),
            ok(4, "dc1", 60, 70, read("s", seen)),
            ok(5, "dc1", 80, 90, read("s", 5)),
        ]);
    }
}

// ---- sessions: last-writer-wins, final logouts ----

/// t1 created in dc1 and refreshed by an order in dc2 (read as 30@dc2); t2 created in
/// dc2 and logged out there.
fn sessions_history() -> Vec<Record> {
    vec![
        session_at(1, "dc1", 0, 5, "t1", 10),
        read_version(2, "dc2", 10, 12, "t1", version(30, "dc2")),
        session_at(3, "dc2", 0, 5, "t2", 20),
        logout(4, "dc2", 10, 15, "t2"),
        // A roaming read of the logged-out session: 404 is right, not a false 404.
        rec(5, "dc1", (16, Some(18)), Outcome::Fail, 404, read_session("t2")),
    ]
}

#[test]
fn sessions_that_keep_lww_and_final_logouts_are_valid() {
    let h = sessions_history();
    let r = must_be_valid(&h);
    assert_eq!((r.sessions.sessions, r.sessions.logged_out, r.sessions.reads_checked), (2, 1, 1));
    assert!(human(&r).contains("ok   sessions last-writer-wins: 0 violation(s) over 2 sessions (1 logged out"), "{}", human(&r));
}

#[test]
fn a_lost_session_or_an_undone_logout_is_caught() {
    let h = sessions_history();
    let mut lost = healthy(&h, &["dc1", "dc2"]);
    lost.dcs.get_mut("dc2").expect("dc2").sessions.insert("t1".into(), None);
    let r = must_fail_in(&h, &lost, &["sessions"]);
    let kinds: Vec<&str> = r.sessions.violations.iter().map(|v| v.kind.as_str()).collect();
    assert_eq!(kinds, ["lost", "diverged"], "{}", human(&r));

    let mut undone = healthy(&h, &["dc1", "dc2"]);
    for d in undone.dcs.values_mut() {
        d.sessions.insert("t2".into(), Some(version(20, "dc2")));
    }
    let r = must_fail_in(&h, &undone, &["sessions"]);
    assert_eq!(r.sessions.violations.iter().map(|v| (v.kind.as_str(), v.token.as_str())).collect::<Vec<_>>(), [("logout_undone", "t2"); 2]);

    // The DC that acknowledged the logout shows the session live afterwards.
    let mut h2 = h.clone();
    h2.push(read_version(6, "dc2", 20, 21, "t2", version(20, "dc2")));
    let r = must_fail_in(&h2, &healthy(&h2, &["dc1", "dc2"]), &["sessions"]);
    assert_eq!(r.sessions.violations[0].op.as_ref().map(|o| o.id), Some(6));
    // In another DC, before replication reached it, that is allowed.
    let mut h3 = h.clone();
    h3.push(read_version(6, "dc1", 20, 21, "t2", version(20, "dc2")));
    must_be_valid(&h3);
}

#[test]
fn a_smaller_version_that_wins_or_a_dc_that_goes_back_is_caught() {
    let h = sessions_history();
    // Every DC ends with the create (10@dc1) although 30@dc2 was answered: the merge did
    // not keep the largest HLC.
    let mut older = healthy(&h, &["dc1", "dc2"]);
    for d in older.dcs.values_mut() {
        d.sessions.insert("t1".into(), Some(version(10, "dc1")));
    }
    let r = must_fail_in(&h, &older, &["sessions"]);
    assert_eq!(r.sessions.violations.iter().map(|v| v.kind.as_str()).collect::<Vec<_>>(), ["not_last_writer"; 2]);
    assert!(r.sessions.violations[0].detail.contains("ends with 10@dc1, smaller than 30@dc2"), "{:?}", r.sessions.violations);

    // dc2 answered its own 30@dc2, then 10@dc1 to a later read: it went back.
    let mut h2 = h.clone();
    h2.push(read_version(6, "dc2", 20, 21, "t1", version(10, "dc1")));
    let r = must_fail_in(&h2, &healthy(&h2, &["dc1", "dc2"]), &["sessions"]);
    assert_eq!(r.sessions.violations.iter().map(|v| v.kind.as_str()).collect::<Vec<_>>(), ["went_back"]);
    // dc1 never wrote 30@dc2: an older answer there is replication not yet arrived.
    let mut h3 = h.clone();
    h3.push(read_version(6, "dc1", 20, 21, "t1", version(10, "dc1")));
    must_be_valid(&h3);
}

// ---- rebalancing grants in the linearizability model ----

/// dc1 restocks 10 units of s; a grant of 4 to another DC is journaled in [20, 30].
fn granted() -> (Vec<Record>, FinalState) {
    let h = vec![ok(1, "dc1", 0, 10, restock("s", 10, 10))];
    let mut state = healthy(&h, &["dc1", "dc2"]);
    state.escrow.moves.push(EscrowMove { dc: "dc1".into(), sku: "s".into(), delta: -4, not_before_ns: 20, by_ns: 30, entry: "1.7.0".into() });
    (h, state)
}

#[test]
fn a_journaled_grant_explains_the_stock_it_moved_and_no_earlier_or_later() {
    let (mut h, state) = granted();
    // After the grant: 6. During it: either.
    h.push(ok(2, "dc1", 40, 50, read("s", 6)));
    h.push(ok(3, "dc1", 22, 24, read("s", 10)));
    let r = must_fail_in(&h, &state, &[]);
    assert_eq!((r.linearizability.grants, r.linearizability.unchecked_keys.len()), (1, 0));
    // Without the journal the same reads are not linearizable (and a grant moved stock
    // that no counter explains).
    let mut bare = state.clone();
    bare.escrow = Escrow::default();
    must_fail_in(&h, &bare, &["linearizability"]);

    // The old stock read after the grant was applied: stale.
    let (mut h, state) = granted();
    h.push(ok(2, "dc1", 40, 50, read("s", 10)));
    let r = must_fail_in(&h, &state, &["linearizability"]);
    let text = human(&r);
    assert!(text.contains("stale_read at #2"), "{text}");
    assert!(text.contains("grant given s -4 (rebalancing, entry 1.7.0)"), "the grant is named among the operations involved:\n{text}");
    // The new stock read before the grant was proposed: it came from nowhere.
    let (mut h, state) = granted();
    h.push(ok(2, "dc1", 12, 15, read("s", 6)));
    must_fail_in(&h, &state, &["linearizability"]);
}

/// One Raft entry gave stock twice with a client's restock between the two grants (a
/// batch of requests): the restock saw the first grant and not the second. Moves are
/// placed one by one, so this is valid; as one move of the entry's sum it would not be.
#[test]
fn grants_of_one_entry_are_placed_one_by_one() {
    let h = vec![ok(1, "dc1", 0, 10, restock("s", 22, 22)), ok(2, "dc1", 15, 40, restock("s", 10, 24))];
    let mut state = healthy(&h, &["dc1", "dc2"]);
    for (seq, delta) in [(0, -8), (1, -6)] {
        state.escrow.moves.push(EscrowMove { dc: "dc1".into(), sku: "s".into(), delta, not_before_ns: 20, by_ns: 30, entry: format!("1.9.{seq}") });
    }
    must_fail_in(&h, &state, &[]);
    state.escrow.moves = vec![EscrowMove { dc: "dc1".into(), sku: "s".into(), delta: -14, not_before_ns: 20, by_ns: 30, entry: "1.9".into() }];
    must_fail_in(&h, &state, &["linearizability"]);
}

#[test]
fn a_key_whose_stock_moved_more_than_the_journals_hold_is_not_checked() {
    let (mut h, mut state) = granted();
    state.escrow = Escrow::default();
    // dc1's own counters: 10 stocked, nothing sold, 6 available: 4 went elsewhere, and
    // no journal says when.
    for d in state.dcs.values_mut() {
        let c = Counters { available: 6, stocked: 10, sold: 0, released: 0 };
        d.skus.entry("s".into()).or_default().inventory.by_dc.insert("dc1".into(), c);
    }
    h.push(ok(2, "dc1", 40, 50, read("s", 6)));
    let r = check(&h, &state, &opts());
    assert_eq!(r.verdict, RunVerdict::Inconclusive, "\n{}", human(&r));
    assert_eq!(r.linearizability.unchecked_keys, ["dc1/s"]);
    assert!(r.reasons.iter().any(|m| m.contains("1 key(s) not checked")), "{:?}", r.reasons);
    // With the move journaled the key is checked, and valid.
    state.escrow.moves.push(EscrowMove { dc: "dc1".into(), sku: "s".into(), delta: -4, not_before_ns: 20, by_ns: 30, entry: "1.7.0".into() });
    must_fail_in(&h, &state, &[]);
}
