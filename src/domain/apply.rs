//! The rules: how one command changes the state. Deterministic, no I/O, no clock.

use std::collections::BTreeMap;

use super::command::{Command, IdempotencyRecord, Outcome, Rejection, Request};
use super::model::{Inventory, Order, OrderStatus, Session};
use super::validate;

/// Typed access to the state; implemented over sled (the state machine) and in memory.
pub trait State {
    fn session(&self, token: &str) -> Option<Session>;
    fn inventory(&self, sku: &str) -> Option<Inventory>;
    fn order(&self, id: &str) -> Option<Order>;
    fn idempotency(&self, key: &str) -> Option<IdempotencyRecord>;
    fn put_session(&mut self, s: Session);
    fn put_inventory(&mut self, i: Inventory);
    fn put_order(&mut self, o: Order);
    fn put_idempotency(&mut self, key: &str, r: IdempotencyRecord);
}

/// Applies one command; a retried idempotent request gets its first result back.
pub fn apply(state: &mut impl State, req: &Request) -> Outcome {
    let cmd = &req.cmd;
    let Some((key, fingerprint)) = req.idempotency() else {
        return execute(state, cmd);
    };
    if let Some(first) = state.idempotency(&key) {
        return if first.fingerprint == fingerprint {
            first.outcome
        } else {
            Outcome::Rejected(Rejection::IdempotencyMismatch)
        };
    }
    let outcome = execute(state, cmd);
    state.put_idempotency(
        &key,
        IdempotencyRecord {
            fingerprint,
            outcome: outcome.clone(),
        },
    );
    outcome
}

fn execute(state: &mut impl State, cmd: &Command) -> Outcome {
    if let Err(msg) = check(cmd) {
        return Outcome::Rejected(Rejection::Invalid(msg));
    }
    match cmd {
        Command::CreateSession { token, user, dc, at_ms } => create_session(state, token, user, dc, *at_ms),
        Command::DeleteSession { token } => delete_session(state, token),
        Command::Restock { sku, add, dc } => restock(state, sku, *add, dc),
        Command::PlaceOrder {
            id,
            session,
            sku,
            qty,
            dc,
            at_ms,
        } => place_order(state, id, session, sku, *qty, dc, *at_ms),
        Command::CancelOrder { id } => cancel_order(state, id),
    }
}

/// The API validated these already; checking again keeps a bad peer from writing them.
fn check(cmd: &Command) -> Result<(), String> {
    match cmd {
        Command::CreateSession { token, user, .. } => validate::name("token", token).and(validate::name("user", user)),
        Command::DeleteSession { token } => validate::name("token", token),
        Command::Restock { sku, add, .. } => validate::name("sku", sku).and(validate::restock_add(*add as i64).map(|_| ())),
        Command::PlaceOrder { id, session, sku, qty, .. } => validate::name("id", id)
            .and(validate::name("session", session))
            .and(validate::name("sku", sku))
            .and(validate::qty(*qty as i64).map(|_| ())),
        Command::CancelOrder { id } => validate::name("id", id),
    }
}

fn create_session(state: &mut impl State, token: &str, user: &str, dc: &str, at_ms: u64) -> Outcome {
    // Applying the same proposal twice (a client_write retried across a leader change)
    // returns the session it created the first time.
    if let Some(existing) = state.session(token) {
        return Outcome::Session(existing);
    }
    let s = Session {
        token: token.into(),
        user: user.into(),
        dc: dc.into(),
        created_ms: at_ms,
        deleted: false,
    };
    state.put_session(s.clone());
    Outcome::Session(s)
}

fn delete_session(state: &mut impl State, token: &str) -> Outcome {
    match state.session(token) {
        Some(mut s) if !s.deleted => {
            s.deleted = true;
            state.put_session(s);
            Outcome::SessionDeleted
        }
        _ => Outcome::Rejected(Rejection::UnknownSession),
    }
}

fn restock(state: &mut impl State, sku: &str, add: u64, dc: &str) -> Outcome {
    let mut inv = state.inventory(sku).unwrap_or_else(|| Inventory::new(sku));
    Inventory::add(&mut inv.stocked, dc, add);
    state.put_inventory(inv.clone());
    Outcome::Inventory(inv)
}

fn place_order(state: &mut impl State, id: &str, session: &str, sku: &str, qty: u32, dc: &str, at_ms: u64) -> Outcome {
    if let Some(existing) = state.order(id) {
        return Outcome::Order(existing);
    }
    let Some(sess) = state.session(session).filter(|s| !s.deleted) else {
        return Outcome::Rejected(Rejection::UnknownSession);
    };
    let Some(mut inv) = state.inventory(sku) else {
        return Outcome::Rejected(Rejection::UnknownSku);
    };
    let available = inv.available(dc);
    if available < qty as u64 {
        return Outcome::Rejected(Rejection::SoldOut { available, requested: qty });
    }
    Inventory::add(&mut inv.sold, dc, qty as u64);
    let order = Order {
        id: id.into(),
        session: session.into(),
        user: sess.user,
        sku: sku.into(),
        qty,
        status: OrderStatus::Placed,
        dc: dc.into(),
        created_ms: at_ms,
    };
    state.put_inventory(inv);
    state.put_order(order.clone());
    Outcome::Order(order)
}

fn cancel_order(state: &mut impl State, id: &str) -> Outcome {
    let Some(mut order) = state.order(id) else {
        return Outcome::Rejected(Rejection::UnknownOrder);
    };
    if order.status == OrderStatus::Cancelled {
        return Outcome::Rejected(Rejection::AlreadyCancelled);
    }
    let mut inv = state.inventory(&order.sku).unwrap_or_else(|| Inventory::new(&order.sku));
    Inventory::add(&mut inv.released, &order.dc, order.qty as u64);
    order.status = OrderStatus::Cancelled;
    state.put_inventory(inv);
    state.put_order(order.clone());
    Outcome::Order(order)
}

/// In-memory state, for tests and property checks of the rules.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemState {
    pub sessions: BTreeMap<String, Session>,
    pub inventory: BTreeMap<String, Inventory>,
    pub orders: BTreeMap<String, Order>,
    pub idempotency: BTreeMap<String, IdempotencyRecord>,
}

impl State for MemState {
    fn session(&self, token: &str) -> Option<Session> {
        self.sessions.get(token).cloned()
    }
    fn inventory(&self, sku: &str) -> Option<Inventory> {
        self.inventory.get(sku).cloned()
    }
    fn order(&self, id: &str) -> Option<Order> {
        self.orders.get(id).cloned()
    }
    fn idempotency(&self, key: &str) -> Option<IdempotencyRecord> {
        self.idempotency.get(key).cloned()
    }
    fn put_session(&mut self, s: Session) {
        self.sessions.insert(s.token.clone(), s);
    }
    fn put_inventory(&mut self, i: Inventory) {
        self.inventory.insert(i.sku.clone(), i);
    }
    fn put_order(&mut self, o: Order) {
        self.orders.insert(o.id.clone(), o);
    }
    fn put_idempotency(&mut self, key: &str, r: IdempotencyRecord) {
        self.idempotency.insert(key.into(), r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(cmd: Command) -> Request {
        Request::new(cmd, None)
    }
    fn session(token: &str) -> Request {
        req(Command::CreateSession {
            token: token.into(),
            user: "alice".into(),
            dc: "dc1".into(),
            at_ms: 1,
        })
    }
    fn restock(sku: &str, add: u64) -> Request {
        req(Command::Restock {
            sku: sku.into(),
            add,
            dc: "dc1".into(),
        })
    }
    fn order(id: &str, qty: u32, key: Option<&str>) -> Request {
        Request::new(
            Command::PlaceOrder {
                id: id.into(),
                session: "t1".into(),
                sku: "sku1".into(),
                qty,
                dc: "dc1".into(),
                at_ms: 2,
            },
            key.map(String::from),
        )
    }
    fn cancel(id: &str) -> Request {
        req(Command::CancelOrder { id: id.into() })
    }

    #[test]
    fn order_takes_stock_and_cancel_returns_it() {
        let mut s = MemState::default();
        apply(&mut s, &session("t1"));
        apply(&mut s, &restock("sku1", 5));
        assert!(matches!(apply(&mut s, &order("o1", 3, None)), Outcome::Order(_)));
        assert_eq!(
            apply(&mut s, &order("o2", 3, None)),
            Outcome::Rejected(Rejection::SoldOut { available: 2, requested: 3 })
        );
        assert!(matches!(apply(&mut s, &cancel("o1")), Outcome::Order(o) if o.status == OrderStatus::Cancelled));
        assert_eq!(apply(&mut s, &cancel("o1")), Outcome::Rejected(Rejection::AlreadyCancelled));
        assert_eq!(s.inventory["sku1"].available("dc1"), 5);
    }

    #[test]
    fn rejections() {
        let mut s = MemState::default();
        assert_eq!(apply(&mut s, &order("o1", 1, None)), Outcome::Rejected(Rejection::UnknownSession));
        apply(&mut s, &session("t1"));
        assert_eq!(apply(&mut s, &order("o1", 1, None)), Outcome::Rejected(Rejection::UnknownSku));
        assert_eq!(apply(&mut s, &cancel("nope")), Outcome::Rejected(Rejection::UnknownOrder));
        assert!(matches!(apply(&mut s, &order("o1", 0, None)), Outcome::Rejected(Rejection::Invalid(_))));
        apply(&mut s, &req(Command::DeleteSession { token: "t1".into() }));
        apply(&mut s, &restock("sku1", 5));
        assert_eq!(apply(&mut s, &order("o1", 1, None)), Outcome::Rejected(Rejection::UnknownSession));
        assert_eq!(
            apply(&mut s, &req(Command::DeleteSession { token: "t1".into() })),
            Outcome::Rejected(Rejection::UnknownSession)
        );
    }

    #[test]
    fn idempotency_key_returns_first_result() {
        let mut s = MemState::default();
        apply(&mut s, &session("t1"));
        apply(&mut s, &restock("sku1", 5));
        let first = apply(&mut s, &order("o1", 2, Some("k")));
        // A retry carries a fresh id but the same key: it gets the first order back.
        assert_eq!(apply(&mut s, &order("o2", 2, Some("k"))), first);
        assert_eq!(s.orders.len(), 1);
        assert_eq!(apply(&mut s, &order("o3", 1, Some("k"))), Outcome::Rejected(Rejection::IdempotencyMismatch));
    }

    proptest! {
        /// Whatever mix of orders, cancels and restocks arrives, stock never goes negative
        /// and units are conserved: stocked = available + sold − released.
        #[test]
        fn stock_is_conserved(ops in proptest::collection::vec((0u8..3, 1u32..20, 0usize..10), 1..200)) {
            let mut s = MemState::default();
            apply(&mut s, &session("t1"));
            apply(&mut s, &restock("sku1", 10));
            for (i, (kind, qty, target)) in ops.into_iter().enumerate() {
                let cmd = match kind {
                    0 => order(&format!("o{i}"), qty, None),
                    1 => cancel(&format!("o{}", i.saturating_sub(target))),
                    _ => restock("sku1", qty as u64),
                };
                apply(&mut s, &cmd);
                let inv = &s.inventory["sku1"];
                let sold = inv.sold.get("dc1").copied().unwrap_or(0);
                let released = inv.released.get("dc1").copied().unwrap_or(0);
                prop_assert!(released <= sold);
                prop_assert_eq!(inv.stocked["dc1"], inv.available("dc1") + sold - released);
                let live: u64 = s.orders.values().filter(|o| o.status == OrderStatus::Placed).map(|o| o.qty as u64).sum();
                prop_assert_eq!(live, sold - released);
            }
        }
    }
}
