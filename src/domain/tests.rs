//! Rules and merge laws, checked on in-memory state.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::apply::{apply, MemState};
use super::command::{Command, Outcome, Rejection, Request};
use super::event::{Change, Event};
use super::model::{Inventory, OrderStatus, StockRow};
use super::validate;

fn req(cmd: Command) -> Request {
    Request::new(cmd, None)
}
fn session(dc: &str, token: &str) -> Request {
    req(Command::CreateSession { token: token.into(), user: "alice".into(), dc: dc.into(), hlc: 1 })
}
fn restock(dc: &str, sku: &str, add: u64) -> Request {
    req(Command::Restock { sku: sku.into(), add, dc: dc.into(), hlc: 1 })
}
fn order(dc: &str, id: &str, qty: u32, key: Option<&str>, hlc: u64) -> Request {
    let cmd = Command::PlaceOrder { id: id.into(), session: "t1".into(), sku: "sku1".into(), qty, dc: dc.into(), hlc, refresh_session: false };
    Request::new(cmd, key.map(String::from))
}
fn cancel(dc: &str, id: &str) -> Request {
    cancel_as(dc, id, "t1")
}
fn cancel_as(dc: &str, id: &str, session: &str) -> Request {
    req(Command::CancelOrder { id: id.into(), dc: dc.into(), session: session.into(), hlc: 1 })
}
fn expire(dc: &str, idempotency_before: u64, sessions_before: u64, max: u32, hlc: u64) -> Request {
    req(Command::Expire { idempotency_before, sessions_before, batch_len_max: max, dc: dc.into(), hlc })
}

#[test]
fn order_takes_stock_and_cancel_returns_it() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &session("dc1", "t1"));
    apply(&mut s, &restock("dc1", "sku1", 5));
    assert!(matches!(apply(&mut s, &order("dc1", "o1", 3, None, 2)), Outcome::Order(_)));
    assert_eq!(apply(&mut s, &order("dc1", "o2", 3, None, 3)), Outcome::Rejected(Rejection::SoldOut { available: 2, requested: 3 }));
    assert!(matches!(apply(&mut s, &cancel("dc1", "o1")), Outcome::Order(o) if o.status == OrderStatus::Cancelled));
    assert_eq!(apply(&mut s, &cancel("dc1", "o1")), Outcome::Rejected(Rejection::AlreadyCancelled));
    assert_eq!(s.inventory["sku1"].available("dc1"), 5);
}

#[test]
fn rejections() {
    let mut s = MemState::new("dc1");
    assert_eq!(apply(&mut s, &order("dc1", "o1", 1, None, 1)), Outcome::Rejected(Rejection::UnknownSession));
    apply(&mut s, &session("dc1", "t1"));
    assert_eq!(apply(&mut s, &order("dc1", "o1", 1, None, 1)), Outcome::Rejected(Rejection::UnknownSku));
    assert_eq!(apply(&mut s, &cancel("dc1", "nope")), Outcome::Rejected(Rejection::UnknownOrder));
    assert!(matches!(apply(&mut s, &order("dc1", "o1", 0, None, 1)), Outcome::Rejected(Rejection::Invalid(_))));
    // A DC changes only what it owns.
    assert!(matches!(apply(&mut s, &restock("dc2", "sku1", 5)), Outcome::Rejected(Rejection::Invalid(_))));
    apply(&mut s, &req(Command::DeleteSession { token: "t1".into(), dc: "dc1".into(), hlc: 5 }));
    apply(&mut s, &restock("dc1", "sku1", 5));
    assert_eq!(apply(&mut s, &order("dc1", "o1", 1, None, 6)), Outcome::Rejected(Rejection::UnknownSession));
}

#[test]
fn idempotency_key_returns_first_result() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &session("dc1", "t1"));
    apply(&mut s, &restock("dc1", "sku1", 5));
    let first = apply(&mut s, &order("dc1", "o1", 2, Some("k"), 2));
    // A retry carries a fresh id but the same key: it gets the first order back.
    assert_eq!(apply(&mut s, &order("dc1", "o2", 2, Some("k"), 3)), first);
    assert_eq!(s.orders.len(), 1);
    assert_eq!(apply(&mut s, &order("dc1", "o3", 1, Some("k"), 4)), Outcome::Rejected(Rejection::IdempotencyMismatch));
}

#[test]
fn a_key_claim_holds_for_its_first_request_only() {
    let claim = |sku: &str, qty: u32, hlc: u64| {
        let cmd = Command::ClaimOrderKey { scope: super::command::order_key_scope("t1", "k"), sku: sku.into(), qty, dc: "dc1".into(), hlc };
        Request::new(cmd, Some("k".into()))
    };
    let mut s = MemState::new("dc1");
    assert_eq!(apply(&mut s, &claim("sku2", 1, 5)), Outcome::KeyClaimed);
    // The same request again (a retry, through any node): the claim still holds for it.
    assert_eq!(apply(&mut s, &claim("sku2", 1, 6)), Outcome::KeyClaimed);
    // Another request with the key: refused, a claim as much as an order of this shard.
    assert_eq!(apply(&mut s, &claim("sku3", 1, 7)), Outcome::Rejected(Rejection::IdempotencyMismatch));
    apply(&mut s, &session("dc1", "t1"));
    apply(&mut s, &restock("dc1", "sku1", 5));
    assert_eq!(apply(&mut s, &order("dc1", "o1", 1, Some("k"), 8)), Outcome::Rejected(Rejection::IdempotencyMismatch));
    assert!(s.orders.is_empty());
    // It expires with the idempotency records.
    assert!(matches!(apply(&mut s, &expire("dc1", 6, 0, 10, 9)), Outcome::Expired { idempotency: 1, .. }));
    assert!(matches!(apply(&mut s, &order("dc1", "o2", 1, Some("k"), 10)), Outcome::Order(_)));
    // Only for an order's key, and only from this DC.
    let mut bad = claim("sku2", 1, 11);
    bad.cmd = Command::ClaimOrderKey { scope: "session/k".into(), sku: "sku2".into(), qty: 1, dc: "dc1".into(), hlc: 11 };
    assert!(matches!(apply(&mut s, &Request::new(bad.cmd, Some("j".into()))), Outcome::Rejected(Rejection::Invalid(_))));
    assert!(!s.idempotency.contains_key("session/k"), "an invalid claim records nothing under another kind's scope");
    let foreign = Command::ClaimOrderKey { scope: "order/t1/j".into(), sku: "sku2".into(), qty: 1, dc: "dc2".into(), hlc: 11 };
    assert!(matches!(apply(&mut s, &Request::new(foreign, Some("j".into()))), Outcome::Rejected(Rejection::Invalid(_))));
}

#[test]
fn a_batch_applies_its_requests_in_order_each_to_its_own_outcome() {
    let requests = vec![
        session("dc1", "t1"),
        restock("dc1", "sku1", 3),
        order("dc1", "o1", 2, None, 2),
        order("dc1", "o2", 2, None, 3),
        order("dc1", "o3", 1, Some("k"), 4),
    ];
    let one_by_one = {
        let mut s = MemState::new("dc1");
        let outs: Vec<Outcome> = requests.iter().map(|r| apply(&mut s, r)).collect();
        (outs, s)
    };
    let mut s = MemState::new("dc1");
    let batch = req(Command::Batch { requests });
    let Outcome::Batch(outs) = apply(&mut s, &batch) else { panic!("a batch answers a batch") };
    assert_eq!(outs, one_by_one.0);
    // The second order saw the first one's effect: sold out, inside the same entry.
    assert_eq!(outs[3], Outcome::Rejected(Rejection::SoldOut { available: 1, requested: 2 }));
    assert_eq!(s.inventory, one_by_one.1.inventory);
    assert_eq!(s.orders, one_by_one.1.orders);
    assert_eq!(s.inventory["sku1"].available("dc1"), 0);
}

#[test]
fn a_batch_inside_a_batch_is_refused_whole() {
    let mut s = MemState::new("dc1");
    let inner = req(Command::Batch { requests: vec![session("dc1", "t1")] });
    let outer = req(Command::Batch { requests: vec![session("dc1", "t2"), inner] });
    assert!(matches!(apply(&mut s, &outer), Outcome::Rejected(Rejection::Invalid(_))));
    assert!(s.sessions.is_empty());
}

/// Ships every event `from` has emitted to `to`, in one batch starting at `to`'s cursor.
fn sync(from: &MemState, to: &mut MemState) {
    let events = from.outbox.clone();
    apply(to, &req(Command::ApplyRemote { origin: from.dc.clone(), events }));
}

fn sync_all(dcs: &mut [MemState]) {
    // Two rounds: the second carries what merging the first produced (cancelled duplicates).
    for _ in 0..3 {
        for i in 0..dcs.len() {
            for j in 0..dcs.len() {
                if i != j {
                    let from = dcs[i].clone();
                    sync(&from, &mut dcs[j]);
                }
            }
        }
    }
}

#[test]
fn a_retry_in_another_dc_leaves_one_live_order() {
    let mut dcs = [MemState::new("dc1"), MemState::new("dc2")];
    apply(&mut dcs[0], &session("dc1", "t1"));
    sync_all(&mut dcs);
    for (i, d) in ["dc1", "dc2"].iter().enumerate() {
        apply(&mut dcs[i], &restock(d, "sku1", 10));
    }
    // The same request, with the same key, lands in both DCs before they talk.
    assert!(matches!(apply(&mut dcs[0], &order("dc1", "o-dc1", 2, Some("k"), 10)), Outcome::Order(_)));
    assert!(matches!(apply(&mut dcs[1], &order("dc2", "o-dc2", 2, Some("k"), 11)), Outcome::Order(_)));
    sync_all(&mut dcs);
    assert_eq!(dcs[0].entities(), dcs[1].entities());
    let live: Vec<_> = dcs[0].orders.values().filter(|o| o.status == OrderStatus::Placed).collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, "o-dc1", "the earlier order stays");
    assert_eq!(dcs[1].inventory["sku1"].available("dc2"), 10, "the duplicate's units are released");
    // A later retry in dc2 gets the surviving order.
    match apply(&mut dcs[1], &order("dc2", "o-dc2-again", 2, Some("k"), 12)) {
        Outcome::Order(o) => assert_eq!(o.id, "o-dc1"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicated_and_reordered_batches_are_applied_once_in_order() {
    let mut a = MemState::new("dc1");
    for i in 0..5 {
        apply(&mut a, &session("dc1", &format!("t{i}")));
    }
    let mut b = MemState::new("dc2");
    let ev = a.outbox.clone();
    let remote = |events: Vec<_>| req(Command::ApplyRemote { origin: "dc1".into(), events });
    assert_eq!(apply(&mut b, &remote(ev[2..].to_vec())), Outcome::Replicated { cursor: 0 }, "a gap stops the batch");
    assert_eq!(apply(&mut b, &remote(ev[..3].to_vec())), Outcome::Replicated { cursor: 3 });
    assert_eq!(apply(&mut b, &remote(ev.clone())), Outcome::Replicated { cursor: 5 });
    assert_eq!(apply(&mut b, &remote(ev)), Outcome::Replicated { cursor: 5 });
    assert_eq!(b.sessions, a.sessions);
    // Events claiming another origin in the batch are refused outright.
    let mut forged = a.outbox.clone();
    forged[0].origin = "dc3".into();
    assert!(matches!(apply(&mut b, &remote(forged)), Outcome::Rejected(Rejection::Invalid(_))));
}

#[derive(Debug, Clone)]
enum Op {
    Session(usize),
    Logout(usize, usize),
    Restock(usize, u64),
    Order(usize, u32, Option<u8>, bool),
    /// An expiry pass in a DC: sessions unused for 300 HLC units (idempotency records are
    /// kept: the check below is about duplicates within their TTL).
    Expire(usize),
    Cancel(usize, usize),
    Grant(usize, usize, u64),
    Deliver(usize, usize, usize, usize),
    ForeignCancel(usize, usize),
    Drain(usize, usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize).prop_map(Op::Session),
        (0..3usize, 0..8usize).prop_map(|(d, t)| Op::Logout(d, t)),
        (0..3usize, 1..20u64).prop_map(|(d, n)| Op::Restock(d, n)),
        (0..3usize, 1..6u32, proptest::option::of(0..3u8), any::<bool>()).prop_map(|(d, q, k, r)| Op::Order(d, q, k, r)),
        (0..3usize).prop_map(Op::Expire),
        (0..3usize, 0..30usize).prop_map(|(d, o)| Op::Cancel(d, o)),
        (0..3usize, 0..3usize, 1..10u64).prop_map(|(f, t, n)| Op::Grant(f, t, n)),
        (0..3usize, 0..30usize).prop_map(|(d, o)| Op::ForeignCancel(d, o)),
        (0..3usize, 0..3usize, any::<bool>()).prop_map(|(d, t, on)| Op::Drain(d, t, on)),
        // Deliver a slice of one DC's outbox to another: partial, duplicated, out of order.
        (0..3usize, 0..3usize, 0..40usize, 0..40usize).prop_map(|(f, t, a, b)| Op::Deliver(f, t, a, b)),
    ]
}

const DCS: [&str; 3] = ["dc1", "dc2", "dc3"];

fn run(dcs: &mut [MemState], op: &Op, step: usize) {
    let hlc = step as u64 * 10;
    let tokens = |d: &MemState| d.sessions.keys().cloned().collect::<Vec<_>>();
    match op.clone() {
        Op::Session(d) => {
            apply(&mut dcs[d], &req(Command::CreateSession { token: format!("t{step}"), user: "u".into(), dc: DCS[d].into(), hlc }));
        }
        Op::Logout(d, t) => {
            if let Some(token) = tokens(&dcs[d]).get(t).cloned() {
                apply(&mut dcs[d], &req(Command::DeleteSession { token, dc: DCS[d].into(), hlc }));
            }
        }
        Op::Restock(d, n) => {
            apply(&mut dcs[d], &restock(DCS[d], "sku1", n));
        }
        Op::Order(d, qty, key, refresh) => {
            let session = "t0".to_string();
            let cmd =
                Command::PlaceOrder { id: format!("{}-o{step}", DCS[d]), session, sku: "sku1".into(), qty, dc: DCS[d].into(), hlc, refresh_session: refresh };
            apply(&mut dcs[d], &Request::new(cmd, key.map(|k| format!("k{k}"))));
        }
        Op::Cancel(d, o) => {
            if let Some(id) = dcs[d].orders.keys().nth(o).cloned() {
                let session = dcs[d].orders[&id].session.clone();
                apply(&mut dcs[d], &cancel_as(DCS[d], &id, &session));
            }
        }
        Op::Expire(d) => {
            apply(&mut dcs[d], &expire(DCS[d], 0, hlc.saturating_sub(300), 2, hlc));
        }
        Op::Grant(f, t, n) if f != t => {
            apply(&mut dcs[f], &req(Command::Grant { sku: "sku1".into(), qty: n, from: DCS[f].into(), to: DCS[t].into(), hlc }));
        }
        Op::Drain(d, t, on) => {
            apply(&mut dcs[d], &req(Command::SetDcSettings { target: DCS[t].into(), drained: on, weight: 1, dc: DCS[d].into(), hlc }));
        }
        Op::ForeignCancel(d, o) => {
            if let Some(order) = dcs[d].orders.values().filter(|x| x.dc != DCS[d]).nth(o).cloned() {
                apply(&mut dcs[d], &req(Command::RequestCancel { id: order.id, owner: order.dc, dc: DCS[d].into(), hlc, session: order.session }));
            }
        }
        Op::Deliver(f, t, a, b) if f != t => {
            let ev = &dcs[f].outbox;
            let (lo, hi) = (a.min(b).min(ev.len()), a.max(b).min(ev.len()));
            let events = ev[lo..hi].to_vec();
            apply(&mut dcs[t], &req(Command::ApplyRemote { origin: DCS[f].into(), events }));
        }
        _ => {}
    }
}

/// No DC's view ever shows more sold than it could have had, nor the cluster as a whole.
fn check_no_oversell(d: &MemState) -> Result<(), TestCaseError> {
    if let Some(inv) = d.inventory.get("sku1") {
        let sum = |m: &std::collections::BTreeMap<String, u64>| m.values().sum::<u64>();
        prop_assert!(sum(&inv.sold) <= sum(&inv.stocked) + sum(&inv.released), "{}: sold beyond stock: {inv:?}", d.dc);
        let own_sold = inv.sold.get(&d.dc).copied().unwrap_or(0);
        let own_in = inv.stocked.get(&d.dc).copied().unwrap_or(0)
            + inv.released.get(&d.dc).copied().unwrap_or(0)
            + inv.sent.iter().filter(|(f, _)| **f != d.dc).map(|(_, to)| to.get(&d.dc).copied().unwrap_or(0)).sum::<u64>();
        let own_out = inv.sent.get(&d.dc).map(|t| t.values().sum::<u64>()).unwrap_or(0);
        prop_assert!(own_sold + own_out <= own_in, "{}: own allowance overdrawn: {inv:?}", d.dc);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any interleaving of local writes and partial, duplicated, reordered deliveries
    /// converges to one state once everything is delivered, and no view ever oversells.
    #[test]
    fn dcs_converge_and_never_oversell(ops in proptest::collection::vec(op(), 1..120)) {
        let mut dcs: Vec<MemState> = DCS.iter().map(|d| MemState::new(d)).collect();
        apply(&mut dcs[0], &session("dc1", "t0"));
        for (step, op) in ops.iter().enumerate() {
            run(&mut dcs, op, step + 1);
            for d in &dcs {
                check_no_oversell(d)?;
            }
        }
        sync_all(&mut dcs);
        prop_assert_eq!(dcs[0].entities(), dcs[1].entities());
        prop_assert_eq!(dcs[1].entities(), dcs[2].entities());
        for d in &dcs {
            check_no_oversell(d)?;
            // After convergence, at most one live order per (session, key).
            let mut live_keys: Vec<_> = d.orders.values().filter(|o| o.status == OrderStatus::Placed).filter_map(|o| o.idempotency_key.clone()).collect();
            let n = live_keys.len();
            live_keys.sort();
            live_keys.dedup();
            prop_assert_eq!(n, live_keys.len(), "duplicate live orders for one key in {}", d.dc);
        }
    }
}

// ---- Expiry and cancel authorisation ----

fn session_at(dc: &str, token: &str, hlc: u64) -> Request {
    req(Command::CreateSession { token: token.into(), user: "alice".into(), dc: dc.into(), hlc })
}
fn keyed_order(dc: &str, id: &str, key: &str, hlc: u64, refresh: bool) -> Request {
    let cmd = Command::PlaceOrder { id: id.into(), session: "t1".into(), sku: "sku1".into(), qty: 1, dc: dc.into(), hlc, refresh_session: refresh };
    Request::new(cmd, Some(key.into()))
}
fn order_id(o: &Outcome) -> String {
    match o {
        Outcome::Order(o) => o.id.clone(),
        other => panic!("not an order: {other:?}"),
    }
}

/// Two replicas applying the same commands, expiry passes included, hold the same state.
#[test]
fn expiry_is_deterministic_across_replicas() {
    let mut cmds = vec![session_at("dc1", "t1", 1), session_at("dc1", "t2", 2), restock("dc1", "sku1", 100)];
    for i in 0..20u64 {
        cmds.push(keyed_order("dc1", &format!("o{i}"), &format!("k{i}"), 10 + i * 10, i % 5 == 0));
        if i % 4 == 3 {
            cmds.push(expire("dc1", i * 10, i * 10, 3, 10 + i * 10));
        }
    }
    let run = || {
        let mut s = MemState::new("dc1");
        let outs: Vec<Outcome> = cmds.iter().map(|c| apply(&mut s, c)).collect();
        (outs, s)
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert!(a.0.iter().any(|o| matches!(o, Outcome::Expired { idempotency, .. } if *idempotency > 0)), "some records expired");
}

#[test]
fn idempotency_records_older_than_the_ttl_go_and_newer_stay() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &session("dc1", "t1"));
    apply(&mut s, &restock("dc1", "sku1", 10));
    let old = apply(&mut s, &keyed_order("dc1", "o1", "old", 10, false));
    let new = apply(&mut s, &keyed_order("dc1", "o2", "new", 30, false));
    // Cutoff 20: the record of "old" (hlc 10) is due, the one of "new" (hlc 30) is not.
    assert_eq!(apply(&mut s, &expire("dc1", 20, 0, 100, 40)), Outcome::Expired { idempotency: 1, duplicates: 1, sessions: 0 });
    assert!(s.idempotency.keys().all(|k| k.ends_with("/new")), "{:?}", s.idempotency.keys());
    assert_eq!(s.duplicates.len(), 1);
    assert_eq!(s.expiry.len(), 3, "the index holds exactly the records that remain (and the session)");
    // Within the TTL a retry gets the first order; after it, the key places a new one.
    assert_eq!(apply(&mut s, &keyed_order("dc1", "o3", "new", 50, false)), new);
    let again = apply(&mut s, &keyed_order("dc1", "o4", "old", 50, false));
    assert_eq!(order_id(&again), "o4");
    assert_ne!(again, old);
    assert_eq!(s.orders.len(), 3, "order records are the shop's data: they stay");
}

#[test]
fn an_expiry_pass_is_bounded_and_takes_the_oldest_first() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &session("dc1", "t1"));
    apply(&mut s, &restock("dc1", "sku1", 100));
    // Keys named against their age, so name order is not age order.
    for i in 0..10u64 {
        apply(&mut s, &keyed_order("dc1", &format!("o{i}"), &format!("k{}", 9 - i), 100 + i, false));
    }
    assert_eq!(apply(&mut s, &expire("dc1", 1000, 0, 3, 2000)), Outcome::Expired { idempotency: 3, duplicates: 3, sessions: 0 });
    let left: Vec<u64> = s.idempotency.values().map(|r| r.hlc).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(left, (103..110).collect::<Vec<_>>(), "the three oldest went");
    for _ in 0..3 {
        apply(&mut s, &expire("dc1", 1000, 0, 3, 2000));
    }
    assert!(s.idempotency.is_empty() && s.duplicates.is_empty());
    assert_eq!(s.expiry.len(), 1, "only the live session's entry is left: {:?}", s.expiry);
    assert_eq!(apply(&mut s, &expire("dc1", 1000, 0, 3, 2000)), Outcome::Expired { idempotency: 0, duplicates: 0, sessions: 0 });
}

#[test]
fn sessions_expire_in_the_dc_that_wrote_them_and_use_refreshes_them() {
    let mut dcs = [MemState::new("dc1"), MemState::new("dc2")];
    apply(&mut dcs[0], &session_at("dc1", "t1", 10));
    apply(&mut dcs[0], &session_at("dc1", "idle", 10));
    apply(&mut dcs[1], &session_at("dc2", "far", 10));
    apply(&mut dcs[0], &restock("dc1", "sku1", 10));
    sync_all(&mut dcs);
    // t1 is used at 100 (refreshed); "idle" is not.
    let placed = apply(&mut dcs[0], &keyed_order("dc1", "o1", "k", 100, true));
    assert!(matches!(placed, Outcome::Order(_)));
    assert_eq!(dcs[0].sessions["t1"].hlc, 100);
    sync_all(&mut dcs);
    // Cutoff 50 in dc1: only "idle" is due. dc2's session is dc2's to expire, not dc1's.
    let out = apply(&mut dcs[0], &expire("dc1", 0, 50, 100, 120));
    assert_eq!(out, Outcome::Expired { idempotency: 0, duplicates: 0, sessions: 1 });
    assert!(dcs[0].sessions["idle"].deleted && !dcs[0].sessions["t1"].deleted && !dcs[0].sessions["far"].deleted);
    apply(&mut dcs[1], &expire("dc2", 0, 50, 100, 120));
    sync_all(&mut dcs);
    assert_eq!(dcs[0].entities(), dcs[1].entities(), "every DC converges on the tombstones");
    assert!(dcs[1].sessions["idle"].deleted && dcs[1].sessions["far"].deleted && !dcs[1].sessions["t1"].deleted);
    // An expired session is unknown everywhere: it can neither order nor cancel.
    apply(&mut dcs[1], &restock("dc2", "sku1", 10));
    let cmd = Command::PlaceOrder { id: "o2".into(), session: "idle".into(), sku: "sku1".into(), qty: 1, dc: "dc2".into(), hlc: 130, refresh_session: true };
    assert_eq!(apply(&mut dcs[1], &req(cmd)), Outcome::Rejected(Rejection::UnknownSession));
    // Later, t1 expires too (its refreshed version is older than the new cutoff).
    apply(&mut dcs[0], &expire("dc1", 0, 150, 100, 160));
    assert!(dcs[0].sessions["t1"].deleted);
}

#[test]
fn a_refresh_in_another_dc_moves_expiry_there() {
    let mut dcs = [MemState::new("dc1"), MemState::new("dc2")];
    apply(&mut dcs[0], &session_at("dc1", "t1", 10));
    apply(&mut dcs[1], &restock("dc2", "sku1", 10));
    sync_all(&mut dcs);
    apply(&mut dcs[1], &keyed_order("dc2", "o1", "k", 100, true));
    sync_all(&mut dcs);
    // dc1 no longer writes the current version: its pass leaves it alone, dc2's expires it.
    assert_eq!(apply(&mut dcs[0], &expire("dc1", 0, 500, 100, 600)), Outcome::Expired { idempotency: 0, duplicates: 0, sessions: 0 });
    assert_eq!(apply(&mut dcs[1], &expire("dc2", 0, 500, 100, 600)), Outcome::Expired { idempotency: 0, duplicates: 0, sessions: 1 });
    sync_all(&mut dcs);
    assert!(dcs[0].sessions["t1"].deleted);
    assert_eq!(dcs[0].entities(), dcs[1].entities());
}

#[test]
fn a_retry_in_another_dc_within_the_ttl_survives_expiry_passes() {
    let mut dcs = [MemState::new("dc1"), MemState::new("dc2")];
    apply(&mut dcs[0], &session_at("dc1", "t1", 1));
    sync_all(&mut dcs);
    for (i, d) in ["dc1", "dc2"].iter().enumerate() {
        apply(&mut dcs[i], &restock(d, "sku1", 10));
    }
    apply(&mut dcs[0], &keyed_order("dc1", "o-dc1", "k", 100, false));
    apply(&mut dcs[1], &keyed_order("dc2", "o-dc2", "k", 110, false));
    // Passes whose cutoff is before the orders (within the TTL) remove nothing of them.
    for (i, d) in ["dc1", "dc2"].iter().enumerate() {
        apply(&mut dcs[i], &expire(d, 90, 0, 100, 200));
    }
    sync_all(&mut dcs);
    let live: Vec<_> = dcs[1].orders.values().filter(|o| o.status == OrderStatus::Placed).map(|o| o.id.clone()).collect();
    assert_eq!(live, vec!["o-dc1".to_string()]);
    assert_eq!(dcs[0].entities(), dcs[1].entities());
}

#[test]
fn cancel_needs_the_session_that_placed_the_order() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &session("dc1", "t1"));
    apply(&mut s, &session("dc1", "t2"));
    apply(&mut s, &restock("dc1", "sku1", 5));
    apply(&mut s, &order("dc1", "o1", 1, None, 2));
    apply(&mut s, &order("dc1", "o2", 1, None, 3));
    assert_eq!(apply(&mut s, &cancel_as("dc1", "o1", "t2")), Outcome::Rejected(Rejection::NotYourOrder));
    assert_eq!(s.orders["o1"].status, OrderStatus::Placed);
    assert!(matches!(apply(&mut s, &cancel_as("dc1", "o1", "t1")), Outcome::Order(o) if o.status == OrderStatus::Cancelled));
    // A logged-out session cancels nothing, even its own orders.
    apply(&mut s, &req(Command::DeleteSession { token: "t1".into(), dc: "dc1".into(), hlc: 9 }));
    assert_eq!(apply(&mut s, &cancel_as("dc1", "o2", "t1")), Outcome::Rejected(Rejection::UnknownSession));
}

#[test]
fn a_queued_cancel_is_applied_by_the_owner_only_with_the_right_session() {
    let mut dcs = [MemState::new("dc1"), MemState::new("dc2")];
    apply(&mut dcs[0], &session("dc1", "t1"));
    apply(&mut dcs[0], &session("dc1", "t2"));
    apply(&mut dcs[0], &restock("dc1", "sku1", 5));
    apply(&mut dcs[0], &order("dc1", "o1", 1, None, 2));
    apply(&mut dcs[0], &order("dc1", "o2", 1, None, 3));
    sync_all(&mut dcs);
    let queue = |id: &str, session: &str| req(Command::RequestCancel { id: id.into(), owner: "dc1".into(), dc: "dc2".into(), hlc: 5, session: session.into() });
    apply(&mut dcs[1], &queue("o1", "t2"));
    apply(&mut dcs[1], &queue("o2", "t1"));
    sync_all(&mut dcs);
    assert_eq!(dcs[0].orders["o1"].status, OrderStatus::Placed, "another shopper's session cancels nothing");
    assert_eq!(dcs[0].orders["o2"].status, OrderStatus::Cancelled);
    assert_eq!(dcs[0].entities(), dcs[1].entities());
}

fn arb_session() -> impl Strategy<Value = super::model::Session> {
    (0..4u64, 0..3usize, any::<bool>()).prop_map(|(hlc, dc, deleted)| super::model::Session {
        token: "t".into(),
        user: "u".into(),
        dc: DCS[dc].into(),
        hlc,
        deleted,
    })
}

proptest! {
    /// The session merge is a semilattice (so any delivery order converges), and a
    /// tombstone wins over every live version (so a refresh cannot resurrect a token).
    #[test]
    fn session_merge_is_a_semilattice_with_final_tombstones(a in arb_session(), b in arb_session(), c in arb_session()) {
        prop_assert_eq!(a.clone().merge(b.clone()), b.clone().merge(a.clone()));
        prop_assert_eq!(a.clone().merge(b.clone()).merge(c.clone()), a.clone().merge(b.clone().merge(c.clone())));
        prop_assert_eq!(a.clone().merge(a.clone()), a.clone());
        if a.deleted || b.deleted {
            prop_assert!(a.clone().merge(b.clone()).deleted);
        }
    }
}

fn remote_stock(origin: &str, seq: u64, sku: &str, row: StockRow, received: Option<BTreeMap<String, u64>>) -> Request {
    let change = match received {
        Some(received) => Change::StockV2 { sku: sku.into(), row, received },
        None => Change::Stock { sku: sku.into(), row },
    };
    req(Command::ApplyRemote { origin: origin.into(), events: vec![Event { seq, origin: origin.into(), hlc: 1, change }] })
}

fn sent(to: &str, n: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([(to.to_string(), n)])
}

/// "As a forged dc2, grant dc1 unlimited stock": a row must balance, claim from us no
/// more than we sent, and back a grant to us with what we know it received.
#[test]
fn forged_stock_rows_are_rejected() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &restock("dc1", "sku1", 5));
    let before = s.clone();
    let rejected = |s: &mut MemState, r: &Request| matches!(apply(s, r), Outcome::Rejected(Rejection::Invalid(_)));
    // Gives dc1 units it never had.
    let row = StockRow { sent: sent("dc1", u64::MAX), ..Default::default() };
    assert!(rejected(&mut s, &remote_stock("dc2", 1, "sku1", row.clone(), Some(BTreeMap::new()))));
    assert!(rejected(&mut s, &remote_stock("dc2", 1, "sku1", row, None)), "the same as a row of an older build");
    // Balances only with units dc1 never sent it.
    let row = StockRow { sent: sent("dc1", 1000), ..Default::default() };
    assert!(rejected(&mut s, &remote_stock("dc2", 1, "sku1", row.clone(), Some(sent("dc1", 1000)))));
    // Balances with units from dc3 that dc1 has not seen dc3 send.
    assert!(rejected(&mut s, &remote_stock("dc2", 1, "sku1", row, Some(sent("dc3", 1000)))));
    // Overflowing sums.
    let row = StockRow { stocked: u64::MAX, sent: BTreeMap::from([("dc1".into(), u64::MAX), ("dc3".into(), u64::MAX)]), ..Default::default() };
    assert!(rejected(&mut s, &remote_stock("dc2", 1, "sku1", row, Some(BTreeMap::new()))));
    assert_eq!(s, before, "nothing changed");
    assert_eq!(s.inventory["sku1"].available("dc1"), 5);
    // An honest row: dc2 stocked 10 and gave dc1 4.
    let row = StockRow { stocked: 10, sent: sent("dc1", 4), ..Default::default() };
    assert_eq!(apply(&mut s, &remote_stock("dc2", 1, "sku1", row, Some(BTreeMap::new()))), Outcome::Replicated { cursor: 1 });
    assert_eq!(s.inventory["sku1"].available("dc1"), 9);
    // Once dc3's grant to dc2 is known here, dc2 may pass it on.
    apply(&mut s, &remote_stock("dc3", 1, "sku1", StockRow { stocked: 7, sent: sent("dc2", 7), ..Default::default() }, Some(BTreeMap::new())));
    let row = StockRow { stocked: 10, sent: sent("dc1", 11), ..Default::default() };
    assert_eq!(apply(&mut s, &remote_stock("dc2", 2, "sku1", row, Some(sent("dc3", 7)))), Outcome::Replicated { cursor: 2 });
    assert_eq!(s.inventory["sku1"].available("dc1"), 16);
}

/// A bad row stops a batch right before it (what came first is applied); in a snapshot
/// of the origin's state (InstallRemote) it rejects the whole install.
#[test]
fn a_bad_row_stops_the_batch_before_it_and_rejects_an_install() {
    let mut s = MemState::new("dc1");
    let good = Event {
        seq: 1,
        origin: "dc2".into(),
        hlc: 1,
        change: Change::StockV2 { sku: "a".into(), row: StockRow { stocked: 3, ..Default::default() }, received: BTreeMap::new() },
    };
    let bad_change = Change::StockV2 { sku: "a".into(), row: StockRow { sent: sent("dc1", 9), ..Default::default() }, received: BTreeMap::new() };
    let bad = Event { seq: 2, origin: "dc2".into(), hlc: 1, change: bad_change.clone() };
    let out = apply(&mut s, &req(Command::ApplyRemote { origin: "dc2".into(), events: vec![good.clone(), bad] }));
    assert_eq!(out, Outcome::Replicated { cursor: 1 });
    assert_eq!(s.inventory["a"].stocked["dc2"], 3);
    assert_eq!(s.inventory["a"].available("dc1"), 0);
    let before = s.clone();
    let install = req(Command::InstallRemote { origin: "dc2".into(), upto: 5, changes: vec![good.change, bad_change] });
    assert!(matches!(apply(&mut s, &install), Outcome::Rejected(Rejection::Invalid(_))));
    assert_eq!(s, before);
}

#[test]
fn counters_do_not_wrap() {
    let mut s = MemState::new("dc1");
    for _ in 0..3 {
        apply(&mut s, &restock("dc1", "sku1", 1_000_000));
    }
    let mut m = BTreeMap::from([("dc1".to_string(), u64::MAX - 1)]);
    assert!(Inventory::add(&mut m, "dc1", 1).is_ok());
    assert!(Inventory::add(&mut m, "dc1", 1).is_err());
    assert_eq!(m["dc1"], u64::MAX, "left alone");
    // A view whose sums exceed u64 neither wraps nor panics.
    let mut inv = Inventory::new("sku1");
    inv.stocked.insert("dc1".into(), u64::MAX);
    inv.sent.insert("dc2".into(), sent("dc1", u64::MAX));
    inv.sent.insert("dc3".into(), sent("dc1", u64::MAX));
    assert_eq!(inv.available("dc1"), u64::MAX);
    assert_eq!(inv.total(), u64::MAX);
    // A stocked counter at the top refuses more rather than wrapping.
    s.inventory.get_mut("sku1").unwrap().stocked.insert("dc1".into(), u64::MAX);
    assert!(matches!(apply(&mut s, &req(Command::Restock { sku: "sku1".into(), add: 1, dc: "dc1".into(), hlc: 2 })), Outcome::Rejected(Rejection::Invalid(_))));
    // A session tombstone after a timestamp at the top does not wrap.
    apply(&mut s, &session("dc1", "t1"));
    s.sessions.get_mut("t1").unwrap().hlc = u64::MAX;
    assert_eq!(apply(&mut s, &req(Command::DeleteSession { token: "t1".into(), dc: "dc1".into(), hlc: 5 })), Outcome::SessionDeleted);
    assert_eq!(s.sessions["t1"].hlc, u64::MAX);
}

#[test]
fn a_grant_keeps_the_reserve() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &restock("dc1", "sku1", 15));
    let grant = |qty| req(Command::GrantAboveReserve { sku: "sku1".into(), qty, from: "dc1".into(), to: "dc2".into(), hlc: 2, reserve: 10 });
    assert!(matches!(apply(&mut s, &grant(6)), Outcome::Rejected(Rejection::SoldOut { available: 5, .. })));
    assert_eq!(apply(&mut s, &grant(5)), Outcome::Granted { qty: 5 });
    assert!(matches!(apply(&mut s, &grant(1)), Outcome::Rejected(Rejection::SoldOut { .. })));
    assert_eq!(s.inventory["sku1"].available("dc1"), 10);
}

#[derive(Debug, Clone)]
struct Forgery {
    to: usize,
    stocked: u64,
    sold: u64,
    to_victim: u64,
    /// (DC, units) the forger claims to have received.
    received: Vec<(usize, u64)>,
    legacy: bool,
}

fn forgery() -> impl Strategy<Value = Forgery> {
    let big = prop_oneof![0..50u64, Just(u64::MAX), Just(1u64 << 63), 0..u64::MAX];
    (0..2usize, big.clone(), big.clone(), big.clone(), proptest::collection::vec((0..3usize, big), 0..3), any::<bool>())
        .prop_map(|(to, stocked, sold, to_victim, received, legacy)| Forgery { to, stocked, sold, to_victim, received, legacy })
}

/// The forger in these tests: dc3, an authenticated DC that lies.
const FORGER: usize = 2;

/// Delivers a forged stock row from dc3 to `f.to`, at its next seq.
fn forge(dcs: &mut [MemState], f: &Forgery) {
    let origin = DCS[FORGER];
    let victim = &mut dcs[f.to];
    let row = StockRow { stocked: f.stocked, sold: f.sold, released: 0, sent: sent(DCS[f.to], f.to_victim) };
    let received: BTreeMap<String, u64> = f.received.iter().filter(|(d, _)| *d != FORGER).map(|(d, n)| (DCS[*d].to_string(), *n)).collect();
    let seq = victim.cursors.get(origin).copied().unwrap_or(0) + 1;
    apply(victim, &remote_stock(origin, seq, "sku1", row, (!f.legacy).then_some(received)));
}

/// Every DC's own allowance, in its own view, never below zero; and what the forger gave
/// each honest DC, in that DC's view, never beyond what it claims to have stocked and
/// released plus what the honest DCs truly sent it (each DC's own record): no phantom
/// units. (Its claimed stock is its prerogative, like a restock; telling two DCs
/// different stories is not caught by either — see ARCHITECTURE.md.)
fn check_no_phantom(dcs: &[MemState]) -> Result<(), TestCaseError> {
    let counter = |m: &BTreeMap<String, u64>, dc: &str| m.get(dc).copied().unwrap_or(0) as u128;
    let sent_by = |inv: &Inventory, from: &str, to: &str| inv.sent.get(from).map(|t| counter(t, to)).unwrap_or(0);
    let truly_received: u128 = (0..2).filter_map(|g| dcs[g].inventory.get("sku1").map(|inv| sent_by(inv, DCS[g], DCS[FORGER]))).sum();
    for (i, d) in dcs.iter().enumerate() {
        let Some(inv) = d.inventory.get("sku1") else { continue };
        prop_assert!(inv.check_own(&d.dc).is_ok(), "{}: own allowance overdrawn: {inv:?}", d.dc);
        if i == FORGER {
            continue;
        }
        let given = sent_by(inv, DCS[FORGER], &d.dc);
        let backing = counter(&inv.stocked, DCS[FORGER]) + counter(&inv.released, DCS[FORGER]) + truly_received;
        prop_assert!(given <= backing, "{}: {given} phantom units from {}: {inv:?}", d.dc, DCS[FORGER]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Honest traffic mixed with forged stock rows (grants out of nothing, claims of
    /// units never received, overflowing counters, rows of older builds): no DC's own
    /// allowance is ever overdrawn, and no DC is credited units its granter never held.
    #[test]
    fn forged_rows_never_oversell(ops in proptest::collection::vec(prop_oneof![op().prop_map(Ok), forgery().prop_map(Err)], 1..120)) {
        let mut dcs: Vec<MemState> = DCS.iter().map(|d| MemState::new(d)).collect();
        apply(&mut dcs[0], &session("dc1", "t0"));
        for (step, op) in ops.iter().enumerate() {
            match op {
                Ok(op) => run(&mut dcs, op, step + 1),
                Err(f) => forge(&mut dcs, f),
            }
            // Sell what each DC believes it holds: a phantom grant would be sold here.
            for (i, d) in dcs.iter_mut().enumerate() {
                let avail = d.inventory.get("sku1").map(|inv| inv.available(DCS[i])).unwrap_or(0);
                if avail > 0 && step % 5 == 0 {
                    let qty = u32::try_from(avail.min(u64::from(validate::QTY_MAX))).expect("at most QTY_MAX");
                    let cmd = Command::PlaceOrder { id: format!("{}-sweep{step}", DCS[i]), session: "t0".into(), sku: "sku1".into(), qty, dc: DCS[i].into(), hlc: step as u64, refresh_session: false };
                    apply(d, &req(cmd));
                }
            }
            check_no_phantom(&dcs)?;
        }
    }
}

/// An order placed in dc1 with a session dc2 created, carried in the entry as dc2 answered
/// a lookup: merged like a replicated version, so dc1 converges with dc2's later events.
#[test]
fn an_order_with_a_session_from_another_dc_carries_and_merges_its_record() {
    let mut dc2 = MemState::new("dc2");
    apply(&mut dc2, &session("dc2", "t1"));
    let record = dc2.sessions["t1"].clone();
    let mut dc1 = MemState::new("dc1");
    apply(&mut dc1, &restock("dc1", "sku1", 5));
    let with = |record, id: &str, hlc| {
        req(Command::PlaceOrderWithSession {
            record,
            id: id.into(),
            session: "t1".into(),
            sku: "sku1".into(),
            qty: 1,
            dc: "dc1".into(),
            hlc,
            refresh_session: false,
        })
    };
    assert!(matches!(apply(&mut dc1, &with(record.clone(), "o1", 2)), Outcome::Order(o) if o.user == "alice"));
    assert_eq!(dc1.sessions["t1"], record, "the owner's version, not one of dc1's own (dc1 does not ship it)");
    assert!(!dc1.expiry.iter().any(|k| k.starts_with(b"e/s")), "dc1 does not expire a session dc2 wrote");
    // A cancel in dc1 now finds the session.
    assert!(matches!(apply(&mut dc1, &cancel("dc1", "o1")), Outcome::Order(o) if o.status == OrderStatus::Cancelled));
    // dc2 logs out meanwhile; the tombstone wins over a later, stale record.
    apply(&mut dc2, &req(Command::DeleteSession { token: "t1".into(), dc: "dc2".into(), hlc: 5 }));
    let events: Vec<_> = dc2.outbox.clone();
    apply(&mut dc1, &req(Command::ApplyRemote { origin: "dc2".into(), events }));
    assert_eq!(apply(&mut dc1, &with(record.clone(), "o2", 6)), Outcome::Rejected(Rejection::UnknownSession));
    assert!(dc1.sessions["t1"].deleted);
    // A record for another token than the order's is refused outright.
    let mut other = record;
    other.token = "t2".into();
    assert!(matches!(apply(&mut dc1, &with(other, "o3", 7)), Outcome::Rejected(Rejection::Invalid(_))));
}

/// In a DC of several shards an order may live in another shard than its session: the
/// proposer checked the session there and names its user, so the entry places the order
/// without one here; the refresh that use gives the session comes on its own, and only
/// moves a live session forward.
#[test]
fn a_checked_order_needs_no_session_here_and_a_refresh_only_moves_a_live_one_forward() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &restock("dc1", "sku1", 5));
    let checked = |id: &str| {
        let cmd = Command::PlaceOrderChecked { id: id.into(), session: "t9".into(), user: "bob".into(), sku: "sku1".into(), qty: 1, dc: "dc1".into(), hlc: 5 };
        req(cmd)
    };
    match apply(&mut s, &checked("dc1-a")) {
        Outcome::Order(o) => assert_eq!((o.user.as_str(), o.session.as_str()), ("bob", "t9")),
        other => panic!("{other:?}"),
    }
    assert!(s.sessions.get("t9").is_none(), "no copy of the session is made here");
    // A plain order with the same unknown session is still refused.
    let plain = Command::PlaceOrder { id: "dc1-b".into(), session: "t9".into(), sku: "sku1".into(), qty: 1, dc: "dc1".into(), hlc: 6, refresh_session: false };
    assert_eq!(apply(&mut s, &req(plain)), Outcome::Rejected(Rejection::UnknownSession));
    // An empty user is bad input, refused before anything changes.
    let bad =
        Command::PlaceOrderChecked { id: "dc1-c".into(), session: "t9".into(), user: String::new(), sku: "sku1".into(), qty: 1, dc: "dc1".into(), hlc: 7 };
    assert!(matches!(apply(&mut s, &req(bad)), Outcome::Rejected(Rejection::Invalid(_))));

    let refresh = |hlc| req(Command::RefreshSession { token: "t1".into(), dc: "dc1".into(), hlc });
    assert_eq!(apply(&mut s, &refresh(10)), Outcome::Rejected(Rejection::UnknownSession), "nothing to refresh");
    apply(&mut s, &session("dc1", "t1"));
    match apply(&mut s, &refresh(10)) {
        Outcome::Session(x) => assert_eq!(x.hlc, 10),
        other => panic!("{other:?}"),
    }
    match apply(&mut s, &refresh(4)) {
        Outcome::Session(x) => assert_eq!(x.hlc, 10, "an older refresh changes nothing"),
        other => panic!("{other:?}"),
    }
}

/// A logout recorded in the order's shard (`RevokeSession`) refuses every later order
/// with that session there, whatever the proposer's copy said; it is recorded once,
/// holds no entity (nothing shipped, no session copy), and expires with the sessions'
/// cutoff.
#[test]
fn a_revoked_session_orders_nothing_until_its_revocation_expires() {
    let mut s = MemState::new("dc1");
    apply(&mut s, &restock("dc1", "sku1", 10));
    let checked = |id: &str, session: &str| {
        req(Command::PlaceOrderChecked { id: id.into(), session: session.into(), user: "bob".into(), sku: "sku1".into(), qty: 1, dc: "dc1".into(), hlc: 50 })
    };
    let revoke = |hlc| req(Command::RevokeSession { token: "t9".into(), dc: "dc1".into(), hlc });
    assert!(matches!(apply(&mut s, &checked("dc1-a", "t9")), Outcome::Order(_)));
    let shipped = s.outbox.len();
    assert_eq!(apply(&mut s, &revoke(40)), Outcome::SessionDeleted);
    assert_eq!(apply(&mut s, &revoke(45)), Outcome::SessionDeleted, "a retried logout");
    assert_eq!((s.revoked.get("t9"), s.outbox.len(), s.sessions.get("t9")), (Some(&40), shipped, None), "recorded once, at the first");
    assert_eq!(apply(&mut s, &checked("dc1-b", "t9")), Outcome::Rejected(Rejection::UnknownSession));
    assert!(matches!(apply(&mut s, &checked("dc1-c", "t8")), Outcome::Order(_)), "another session still orders");
    assert_eq!(s.inventory["sku1"].available("dc1"), 8);
    // Another DC cannot plant one here.
    assert!(matches!(apply(&mut s, &req(Command::RevokeSession { token: "t7".into(), dc: "dc2".into(), hlc: 1 })), Outcome::Rejected(Rejection::Invalid(_))));
    // Kept while the sessions' cutoff is at or before it, gone after.
    apply(&mut s, &expire("dc1", 0, 40, 10, 60));
    assert!(s.revoked.contains_key("t9"));
    apply(&mut s, &expire("dc1", 0, 41, 10, 61));
    assert!(!s.revoked.contains_key("t9") && s.expiry.is_empty(), "{:?} {:?}", s.revoked, s.expiry);
    assert!(matches!(apply(&mut s, &checked("dc1-d", "t9")), Outcome::Order(_)));
}
