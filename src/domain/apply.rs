//! The rules: how one command changes the state. Deterministic, no I/O, no clock.
//!
//! Local commands change only what this DC owns (its sessions, its counters, its orders)
//! and `emit` the new values for the other DCs. Remote events are merged with the
//! entity merges of `model`, in origin order, exactly once per the origin's cursor.

use std::collections::{BTreeMap, BTreeSet};

use super::command::{order_key_scope, Command, DuplicateSet, IdempotencyRecord, Outcome, Rejection, Request};
use super::event::{Change, Event};
use super::model::{DcSettings, Inventory, Order, OrderStatus, Session};
use super::validate;

/// Upper bound on events in one `ApplyRemote`.
pub const REMOTE_BATCH_LEN_MAX: usize = 10_000;

/// The records that expire, each with its own ordered index of (HLC, name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryKind {
    /// `Idempotency-Key` records.
    Idempotency,
    /// Duplicate-order indexes (session + key → order ids).
    Duplicates,
    /// Live sessions whose current version this DC wrote.
    Session,
    /// Logouts recorded outside the session's shard (`Command::RevokeSession`).
    Revocation,
}

impl ExpiryKind {
    fn tag(self) -> u8 {
        match self {
            ExpiryKind::Idempotency => b'k',
            ExpiryKind::Duplicates => b'd',
            ExpiryKind::Session => b's',
            ExpiryKind::Revocation => b'v',
        }
    }
}

/// Key of an expiry index entry: `e/`, the kind, the HLC big-endian, the name. Byte order
/// is (HLC, name) order, so a range scan yields the oldest first, the same on every replica.
pub fn expiry_key(kind: ExpiryKind, hlc: u64, name: &str) -> Vec<u8> {
    [EXPIRY_PREFIX, &[kind.tag()], &hlc.to_be_bytes(), name.as_bytes()].concat()
}

/// The range of `kind`'s index entries older than `before`.
pub fn expiry_range(kind: ExpiryKind, before: u64) -> std::ops::Range<Vec<u8>> {
    let lo = [EXPIRY_PREFIX, &[kind.tag()], &0u64.to_be_bytes()].concat();
    let hi = [EXPIRY_PREFIX, &[kind.tag()], &before.to_be_bytes()].concat();
    lo..hi
}

/// (HLC, name) of an index key made by [`expiry_key`].
pub fn parse_expiry_key(key: &[u8]) -> (u64, String) {
    let at = EXPIRY_PREFIX.len() + 1;
    let hlc = u64::from_be_bytes(key[at..at + 8].try_into().expect("expiry key holds an hlc"));
    (hlc, String::from_utf8_lossy(&key[at + 8..]).into_owned())
}

pub const EXPIRY_PREFIX: &[u8] = b"e/";

/// Typed access to the state; implemented over sled (the state machine) and in memory.
pub trait State {
    /// The DC this replica belongs to.
    fn local_dc(&self) -> String;
    /// Whether the session `token` names lives in this state (in a DC of several shards,
    /// it lives in its token's shard only). Where it does not, its liveness is checked by
    /// whoever proposes a command that needs it.
    fn holds_session(&self, _token: &str) -> bool {
        true
    }
    fn session(&self, token: &str) -> Option<Session>;
    fn inventory(&self, sku: &str) -> Option<Inventory>;
    fn order(&self, id: &str) -> Option<Order>;
    fn idempotency(&self, key: &str) -> Option<IdempotencyRecord>;
    /// Orders (from any DC) placed with one session + idempotency key.
    fn duplicates(&self, scope: &str) -> Option<DuplicateSet>;
    fn cursor(&self, origin: &str) -> u64;
    fn settings(&self, dc: &str) -> Option<DcSettings>;
    fn put_settings(&mut self, s: DcSettings);
    fn put_session(&mut self, s: Session);
    fn put_inventory(&mut self, i: Inventory);
    fn put_order(&mut self, o: Order);
    fn put_idempotency(&mut self, key: &str, r: IdempotencyRecord);
    fn remove_idempotency(&mut self, key: &str);
    fn put_duplicates(&mut self, scope: &str, d: DuplicateSet);
    fn remove_duplicates(&mut self, scope: &str);
    /// Whether a logout of `token` is recorded here, though the session lives in another
    /// shard (`Command::RevokeSession`).
    fn revoked(&self, token: &str) -> bool;
    fn put_revoked(&mut self, token: &str, hlc: u64);
    fn remove_revoked(&mut self, token: &str);
    /// Adds or removes one entry of an expiry index (raw key from [`expiry_key`]).
    fn put_expiry(&mut self, key: Vec<u8>);
    fn remove_expiry(&mut self, key: Vec<u8>);
    /// The first `max` index keys in `range`, in byte order.
    fn expiry_keys(&self, range: std::ops::Range<Vec<u8>>, max: usize) -> Vec<Vec<u8>>;
    fn set_cursor(&mut self, origin: &str, seq: u64);
    /// Appends a change this DC made to its outbound stream (assigning the next seq).
    fn emit(&mut self, hlc: u64, change: Change);
    fn trim_outbox(&mut self, upto: u64);
    /// Whether [`State::escrow_moved`] records anything: only then are the moves
    /// worked out (the escrow journal test hook). Off by default.
    fn journals_escrow(&self) -> bool {
        false
    }
    /// This DC's `available` of `sku` changed by `delta` through a grant, given or
    /// received, which no client call made. Called only when [`State::journals_escrow`].
    fn escrow_moved(&mut self, _sku: &str, _delta: i64) {}
}

/// Applies one request; a retried idempotent request gets its first result back.
pub fn apply(state: &mut impl State, req: &Request) -> Outcome {
    let cmd = &req.cmd;
    let Some((key, fingerprint)) = req.idempotency() else {
        return execute(state, cmd, None);
    };
    if let Some(first) = state.idempotency(&key) {
        return if first.fingerprint == fingerprint { first.outcome } else { Outcome::Rejected(Rejection::IdempotencyMismatch) };
    }
    let outcome = execute(state, cmd, req.idempotency_key.as_deref());
    let hlc = cmd.hlc().unwrap_or(0);
    state.put_expiry(expiry_key(ExpiryKind::Idempotency, hlc, &key));
    state.put_idempotency(&key, IdempotencyRecord { fingerprint, outcome: outcome.clone(), hlc });
    outcome
}

/// Writes a session version, keeping the index of sessions this DC expires: live ones
/// whose current version it wrote, by that version's HLC.
fn store_session(state: &mut impl State, s: Session) {
    let local = state.local_dc();
    let old = state.session(&s.token);
    if old.as_ref() == Some(&s) {
        return;
    }
    if let Some(old) = old.filter(|o| !o.deleted && o.dc == local) {
        state.remove_expiry(expiry_key(ExpiryKind::Session, old.hlc, &old.token));
    }
    if !s.deleted && s.dc == local {
        state.put_expiry(expiry_key(ExpiryKind::Session, s.hlc, &s.token));
    }
    state.put_session(s);
}

/// Writes a duplicate-order index; a new one enters the expiry index at its first HLC.
fn store_duplicates(state: &mut impl State, scope: &str, d: DuplicateSet) {
    if state.duplicates(scope).is_none() {
        state.put_expiry(expiry_key(ExpiryKind::Duplicates, d.hlc, scope));
    }
    state.put_duplicates(scope, d);
}

/// The entries of `kind` older than `before`, oldest first, at most `max`.
fn due(state: &impl State, kind: ExpiryKind, before: u64, max: usize) -> Vec<(Vec<u8>, u64, String)> {
    if max == 0 {
        return Vec::new();
    }
    state
        .expiry_keys(expiry_range(kind, before), max)
        .into_iter()
        .map(|k| {
            let (hlc, name) = parse_expiry_key(&k);
            (k, hlc, name)
        })
        .collect()
}

/// One expiry pass: bounded (at most `max` records of each kind), oldest first, and a
/// function of the state and the command only, so every replica removes the same records.
fn expire(state: &mut impl State, idempotency_before: u64, sessions_before: u64, max: usize, dc: &str, hlc: u64) -> Outcome {
    let mut counts = (0u32, 0u32, 0u32);
    for (k, _, key) in due(state, ExpiryKind::Idempotency, idempotency_before, max) {
        state.remove_expiry(k);
        state.remove_idempotency(&key);
        counts.0 += 1;
    }
    for (k, _, scope) in due(state, ExpiryKind::Duplicates, idempotency_before, max) {
        state.remove_expiry(k);
        state.remove_duplicates(&scope);
        counts.1 += 1;
    }
    // A revocation outlives every copy of the session that could still look live: such
    // a copy's version is older than the logout, so it is past its TTL by now.
    for (k, _, token) in due(state, ExpiryKind::Revocation, sessions_before, max) {
        state.remove_expiry(k);
        state.remove_revoked(&token);
    }
    for (k, at, token) in due(state, ExpiryKind::Session, sessions_before, max) {
        match state.session(&token).filter(|s| !s.deleted && s.dc == dc && s.hlc == at) {
            // Unused for the TTL: a tombstone, shipped to every DC like a logout.
            Some(mut s) => {
                s.hlc = hlc.max(s.hlc + 1);
                s.deleted = true;
                store_session(state, s.clone());
                state.emit(hlc, Change::Session(s));
                counts.2 += 1;
            }
            // An entry that no longer matches the session (cannot happen: every write
            // goes through `store_session`); drop it rather than loop on it.
            None => state.remove_expiry(k),
        }
    }
    Outcome::Expired { idempotency: counts.0, duplicates: counts.1, sessions: counts.2 }
}

fn execute(state: &mut impl State, cmd: &Command, key: Option<&str>) -> Outcome {
    if let Err(msg) = check(state, cmd) {
        return Outcome::Rejected(Rejection::Invalid(msg));
    }
    match cmd {
        Command::CreateSession { token, user, dc, hlc } => create_session(state, token, user, dc, *hlc),
        Command::DeleteSession { token, dc, hlc } => delete_session(state, token, dc, *hlc),
        Command::Restock { sku, add, dc, hlc } => restock(state, sku, *add, dc, *hlc),
        Command::PlaceOrder { id, session, sku, qty, dc, hlc, refresh_session } => {
            let o = NewOrder { id, session, sku, qty: *qty, dc, hlc: *hlc, key, refresh_session: *refresh_session, checked_user: None };
            place_order(state, o)
        }
        // A logout recorded here since the proposer looked at the session wins.
        Command::PlaceOrderChecked { session, .. } if state.revoked(session) => Outcome::Rejected(Rejection::UnknownSession),
        Command::PlaceOrderChecked { id, session, user, sku, qty, dc, hlc } => {
            let o = NewOrder { id, session, sku, qty: *qty, dc, hlc: *hlc, key, refresh_session: false, checked_user: Some(user) };
            place_order(state, o)
        }
        Command::RefreshSession { token, dc, hlc } => refresh_session(state, token, dc, *hlc),
        Command::RevokeSession { token, hlc, .. } => revoke_session(state, token, *hlc),
        Command::PlaceOrderWithSession { record, id, session, sku, qty, dc, hlc, refresh_session } => {
            // The owner's version of the session, merged like a replicated one (not ours to
            // ship: the owner does); then the order, exactly as `PlaceOrder`.
            let merged = state.session(&record.token).map(|old| old.merge(record.clone())).unwrap_or_else(|| record.clone());
            store_session(state, merged);
            let o = NewOrder { id, session, sku, qty: *qty, dc, hlc: *hlc, key, refresh_session: *refresh_session, checked_user: None };
            place_order(state, o)
        }
        Command::DeleteSessionWithRecord { record, token, dc, hlc } => {
            let merged = state.session(&record.token).map(|old| old.merge(record.clone())).unwrap_or_else(|| record.clone());
            store_session(state, merged);
            delete_session(state, token, dc, *hlc)
        }
        Command::CancelOrder { id, dc, session, .. } => cancel_order(state, id, dc, session),
        Command::Grant { sku, qty, from, to, hlc } => grant(state, sku, *qty, from, to, *hlc, 0),
        Command::GrantAboveReserve { sku, qty, from, to, hlc, reserve } => grant(state, sku, *qty, from, to, *hlc, *reserve),
        // The claim is its idempotency record, which `apply` writes.
        Command::ClaimOrderKey { .. } => Outcome::KeyClaimed,
        Command::RequestCancel { id, owner, hlc, session, .. } => {
            state.emit(*hlc, Change::CancelRequest { id: id.clone(), owner: owner.clone(), session: session.clone() });
            Outcome::CancelQueued { owner: owner.clone() }
        }
        Command::ApplyRemote { origin, events } => apply_remote(state, origin, events),
        Command::Batch { requests } => Outcome::Batch(requests.iter().map(|r| apply(state, r)).collect()),
        Command::InstallRemote { origin, upto, changes } => install_remote(state, origin, *upto, changes),
        Command::SetDcSettings { target, drained, weight, dc, hlc } => {
            let s = DcSettings { dc: target.clone(), drained: *drained, weight: *weight, hlc: *hlc, by: dc.clone() };
            let merged = state.settings(target).map(|old| old.merge(s.clone())).unwrap_or(s);
            state.put_settings(merged.clone());
            state.emit(*hlc, Change::Settings(merged.clone()));
            Outcome::Settings(merged)
        }
        Command::TrimOutbox { upto } => {
            state.trim_outbox(*upto);
            Outcome::Trimmed
        }
        Command::Expire { idempotency_before, sessions_before, batch_len_max, dc, hlc } => {
            // A u32 always fits in usize on the 64-bit targets Agora builds for; saturate otherwise.
            expire(state, *idempotency_before, *sessions_before, usize::try_from(*batch_len_max).unwrap_or(usize::MAX), dc, *hlc)
        }
    }
}

/// The API validated these already; checking again keeps a bad peer from writing them.
/// Local commands must come from this DC: a DC changes only what it owns.
fn check(state: &impl State, cmd: &Command) -> Result<(), String> {
    let local = state.local_dc();
    let own = |dc: &str| if dc == local { Ok(()) } else { Err(format!("command for {dc} proposed in {local}")) };
    match cmd {
        Command::CreateSession { token, user, dc, .. } => validate::name("token", token).and(validate::name("user", user)).and(own(dc)),
        Command::DeleteSession { token, dc, .. } => validate::name("token", token).and(own(dc)),
        Command::Restock { sku, add, dc, .. } => validate::name("sku", sku).and(validate::restock_add(*add as i64).map(|_| ())).and(own(dc)),
        Command::PlaceOrder { id, session, sku, qty, dc, .. } => validate::name("id", id)
            .and(validate::name("session", session))
            .and(validate::name("sku", sku))
            .and(validate::qty(*qty as i64).map(|_| ()))
            .and(own(dc)),
        Command::PlaceOrderWithSession { record, session, .. } if record.token != *session => Err("the session record is not the order's session".into()),
        Command::PlaceOrderWithSession { record, id, session, sku, qty, dc, .. } => validate::name("id", id)
            .and(validate::name("session", session))
            .and(validate::name("user", &record.user))
            .and(validate::name("dc", &record.dc))
            .and(validate::name("sku", sku))
            .and(validate::qty(*qty as i64).map(|_| ()))
            .and(own(dc)),
        Command::PlaceOrderChecked { id, session, user, sku, qty, dc, .. } => validate::name("id", id)
            .and(validate::name("session", session))
            .and(validate::name("user", user))
            .and(validate::name("sku", sku))
            .and(validate::qty(*qty as i64).map(|_| ()))
            .and(own(dc)),
        Command::RefreshSession { token, dc, .. } | Command::RevokeSession { token, dc, .. } => validate::name("token", token).and(own(dc)),
        Command::CancelOrder { id, dc, session, .. } => validate::name("id", id).and(validate::name("session", session)).and(own(dc)),
        Command::ClaimOrderKey { scope, .. } if !scope.starts_with("order/") => Err("a key claim is for an order's key".into()),
        Command::ClaimOrderKey { sku, qty, dc, .. } => validate::name("sku", sku).and(validate::qty(*qty as i64).map(|_| ())).and(own(dc)),
        Command::DeleteSessionWithRecord { record, token, .. } if record.token != *token => Err("the session record is not the one deleted".into()),
        Command::DeleteSessionWithRecord { record, token, dc, .. } => {
            validate::name("token", token).and(validate::name("user", &record.user)).and(validate::name("dc", &record.dc)).and(own(dc))
        }
        Command::Grant { sku, from, to, .. } if from != to => validate::name("sku", sku).and(own(from)),
        Command::Grant { .. } => Err("a DC cannot grant to itself".into()),
        Command::GrantAboveReserve { sku, from, to, .. } if from != to => validate::name("sku", sku).and(own(from)),
        Command::GrantAboveReserve { .. } => Err("a DC cannot grant to itself".into()),
        Command::RequestCancel { id, owner, dc, session, .. } if owner != dc => validate::name("id", id).and(validate::name("session", session)).and(own(dc)),
        Command::RequestCancel { .. } => Err("a DC cancels its own orders directly".into()),
        Command::SetDcSettings { target, weight, dc, .. } => {
            validate::name("dc", target).and(own(dc)).and(if *weight <= 100 { Ok(()) } else { Err("weight must be in 0..=100".into()) })
        }
        Command::ApplyRemote { origin, events } if events.len() > REMOTE_BATCH_LEN_MAX => {
            Err(format!("{} events from {origin} is over the batch limit", events.len()))
        }
        Command::ApplyRemote { origin, events } if events.iter().any(|e| &e.origin != origin) => {
            Err(format!("events in a batch from {origin} name another origin"))
        }
        Command::ApplyRemote { origin, .. } | Command::InstallRemote { origin, .. } if *origin == local => Err("a DC does not replicate to itself".into()),
        Command::Batch { requests } if requests.iter().any(|r| matches!(r.cmd, Command::Batch { .. })) => Err("a batch inside a batch".into()),
        Command::Expire { dc, batch_len_max, .. } => {
            own(dc).and(if *batch_len_max > 0 { Ok(()) } else { Err("an expiry pass removes at least one record".into()) })
        }
        _ => Ok(()),
    }
}

fn create_session(state: &mut impl State, token: &str, user: &str, dc: &str, hlc: u64) -> Outcome {
    // Applying the same proposal twice (a client_write retried across a leader change)
    // returns the session it created the first time.
    if let Some(existing) = state.session(token) {
        return Outcome::Session(existing);
    }
    let s = Session { token: token.into(), user: user.into(), dc: dc.into(), hlc, deleted: false };
    store_session(state, s.clone());
    state.emit(hlc, Change::Session(s.clone()));
    Outcome::Session(s)
}

fn delete_session(state: &mut impl State, token: &str, dc: &str, hlc: u64) -> Outcome {
    match state.session(token) {
        Some(mut s) if !s.deleted => {
            // The tombstone must win over the version it deletes, whatever the clocks say.
            s.hlc = hlc.max(s.hlc.saturating_add(1));
            s.dc = dc.into();
            s.deleted = true;
            store_session(state, s.clone());
            state.emit(hlc, Change::Session(s));
            Outcome::SessionDeleted
        }
        _ => Outcome::Rejected(Rejection::UnknownSession),
    }
}

fn emit_stock(state: &mut impl State, inv: &Inventory, dc: &str, hlc: u64) {
    state.emit(hlc, Change::StockV2 { sku: inv.sku.clone(), row: inv.row(dc), received: inv.received_by(dc) });
}

fn restock(state: &mut impl State, sku: &str, add: u64, dc: &str, hlc: u64) -> Outcome {
    let mut inv = state.inventory(sku).unwrap_or_else(|| Inventory::new(sku));
    if let Err(e) = Inventory::add(&mut inv.stocked, dc, add) {
        return Outcome::Rejected(Rejection::Invalid(e));
    }
    state.put_inventory(inv.clone());
    emit_stock(state, &inv, dc, hlc);
    Outcome::Inventory(inv)
}

struct NewOrder<'a> {
    id: &'a str,
    session: &'a str,
    sku: &'a str,
    qty: u32,
    dc: &'a str,
    hlc: u64,
    key: Option<&'a str>,
    refresh_session: bool,
    /// The session's user, when the proposer checked the session in its own shard.
    checked_user: Option<&'a str>,
}

fn place_order(state: &mut impl State, o: NewOrder) -> Outcome {
    if let Some(existing) = state.order(o.id) {
        return Outcome::Order(existing);
    }
    let scope = o.key.map(|k| order_key_scope(o.session, k));
    if let Some(scope) = &scope {
        // The same request already placed in another DC and replicated here: a retry.
        let ids = state.duplicates(scope).map(|d| d.ids).unwrap_or_default();
        let live = ids.into_iter().filter_map(|id| state.order(&id)).find(|x| x.status == OrderStatus::Placed);
        if let Some(first) = live {
            return Outcome::Order(first);
        }
    }
    // The session: looked up here, unless the proposer checked it in its own shard.
    let sess = match o.checked_user {
        Some(_) => None,
        None => match state.session(o.session).filter(|s| !s.deleted) {
            Some(s) => Some(s),
            None => return Outcome::Rejected(Rejection::UnknownSession),
        },
    };
    let user = o.checked_user.map(String::from).or_else(|| sess.as_ref().map(|s| s.user.clone())).unwrap_or_default();
    let Some(mut inv) = state.inventory(o.sku) else {
        return Outcome::Rejected(Rejection::UnknownSku);
    };
    let available = inv.available(o.dc);
    if available < o.qty as u64 {
        return Outcome::Rejected(Rejection::SoldOut { available, requested: o.qty });
    }
    if let Err(e) = Inventory::add(&mut inv.sold, o.dc, o.qty as u64) {
        return Outcome::Rejected(Rejection::Invalid(e));
    }
    // Where this DC writes its own counters: crash rather than sell phantom stock.
    inv.check_own(o.dc).expect("escrow invariant after an order");
    let order = Order {
        id: o.id.into(),
        session: o.session.into(),
        user,
        sku: o.sku.into(),
        qty: o.qty,
        status: OrderStatus::Placed,
        dc: o.dc.into(),
        hlc: o.hlc,
        idempotency_key: o.key.map(String::from),
    };
    if let Some(scope) = &scope {
        store_duplicates(state, scope, DuplicateSet { hlc: o.hlc, ids: vec![order.id.clone()] });
    }
    if let Some(sess) = sess.filter(|_| o.refresh_session) {
        refresh(state, sess, o.dc, o.hlc);
    }
    state.put_inventory(inv.clone());
    state.put_order(order.clone());
    state.emit(o.hlc, Change::Order(order.clone()));
    emit_stock(state, &inv, o.dc, o.hlc);
    Outcome::Order(order)
}

/// Used: a newer version of the session from this DC, which now expires it TTL after
/// `hlc`.
fn refresh(state: &mut impl State, sess: Session, dc: &str, hlc: u64) {
    let fresh = Session { hlc: hlc.max(sess.hlc.saturating_add(1)), dc: dc.into(), ..sess };
    store_session(state, fresh.clone());
    state.emit(hlc, Change::Session(fresh));
}

/// `RefreshSession`: a live session whose version is older than `hlc` is refreshed; any
/// other (gone, logged out, already newer) is left alone.
fn refresh_session(state: &mut impl State, token: &str, dc: &str, hlc: u64) -> Outcome {
    match state.session(token).filter(|s| !s.deleted) {
        Some(s) if s.hlc < hlc => {
            refresh(state, s.clone(), dc, hlc);
            Outcome::Session(state.session(token).unwrap_or(s))
        }
        Some(s) => Outcome::Session(s),
        None => Outcome::Rejected(Rejection::UnknownSession),
    }
}

/// `RevokeSession`: records the logout once, expiring a session TTL after the first.
fn revoke_session(state: &mut impl State, token: &str, hlc: u64) -> Outcome {
    if !state.revoked(token) {
        state.put_expiry(expiry_key(ExpiryKind::Revocation, hlc, token));
        state.put_revoked(token, hlc);
    }
    Outcome::SessionDeleted
}

/// Whether `session` may change `order`: it must be the session that placed the order,
/// and still live (not logged out, not expired) — checked here when the session lives in
/// this state, else by the proposer in the session's shard.
fn authorize(state: &impl State, order: &Order, session: &str) -> Result<(), Rejection> {
    // Compared without an early exit: the time taken says nothing about the token.
    let (a, b) = (order.session.as_bytes(), session.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if !same {
        return Err(Rejection::NotYourOrder);
    }
    if !state.holds_session(session) {
        return Ok(());
    }
    match state.session(session) {
        Some(s) if !s.deleted => Ok(()),
        _ => Err(Rejection::UnknownSession),
    }
}

fn cancel_order(state: &mut impl State, id: &str, dc: &str, session: &str) -> Outcome {
    let Some(order) = state.order(id) else {
        return Outcome::Rejected(Rejection::UnknownOrder);
    };
    if order.dc != dc {
        return Outcome::Rejected(Rejection::ForeignOrder { owner: order.dc });
    }
    if let Err(r) = authorize(state, &order, session) {
        return Outcome::Rejected(r);
    }
    if order.status == OrderStatus::Cancelled {
        return Outcome::Rejected(Rejection::AlreadyCancelled);
    }
    Outcome::Order(cancel_owned(state, order))
}

/// Cancels an order this DC owns and releases its units.
fn cancel_owned(state: &mut impl State, mut order: Order) -> Order {
    let mut inv = state.inventory(&order.sku).unwrap_or_else(|| Inventory::new(&order.sku));
    // Released never exceeds sold (each order is released once), so this cannot overflow;
    // if it could, keeping the counter is the safe side (units stay sold).
    let _ = Inventory::add(&mut inv.released, &order.dc, order.qty as u64);
    order.status = OrderStatus::Cancelled;
    state.put_inventory(inv.clone());
    state.put_order(order.clone());
    state.emit(order.hlc, Change::Order(order.clone()));
    emit_stock(state, &inv, &order.dc, order.hlc);
    order
}

/// `from` hands `qty` units to `to`, out of what it holds above `reserve`.
fn grant(state: &mut impl State, sku: &str, qty: u64, from: &str, to: &str, hlc: u64, reserve: u64) -> Outcome {
    let Some(mut inv) = state.inventory(sku) else {
        return Outcome::Rejected(Rejection::UnknownSku);
    };
    let available = inv.available(from).saturating_sub(reserve);
    if qty == 0 || available < qty {
        return Outcome::Rejected(Rejection::SoldOut { available, requested: qty.min(u32::MAX as u64) as u32 });
    }
    if let Err(e) = Inventory::add(inv.sent.entry(from.to_string()).or_default(), to, qty) {
        return Outcome::Rejected(Rejection::Invalid(e));
    }
    inv.check_own(from).expect("escrow invariant after a grant");
    state.put_inventory(inv.clone());
    if state.journals_escrow() {
        // qty ≤ available ≤ u64::MAX; a grant beyond i64::MAX units is not a real number.
        state.escrow_moved(sku, i64::try_from(qty).map_or(i64::MIN, |q| -q));
    }
    emit_stock(state, &inv, from, hlc);
    Outcome::Granted { qty }
}

/// Applies `origin`'s events from our cursor on, in order. An event this DC may not
/// merge (a stock row that does not balance, see `Inventory::check_row`) stops the batch
/// before it; when it is the first new event, the batch is rejected (nothing changes).
fn apply_remote(state: &mut impl State, origin: &str, events: &[Event]) -> Outcome {
    let start = state.cursor(origin);
    let mut cursor = start;
    for e in events {
        if e.seq <= cursor {
            continue; // already applied: a duplicate or a replay
        }
        if Some(e.seq) != cursor.checked_add(1) {
            break; // a gap: the sender resends from our cursor
        }
        if let Err(reason) = check_change(state, origin, &e.change) {
            if cursor == start {
                return Outcome::Rejected(Rejection::Invalid(format!("event {} from {origin}: {reason}", e.seq)));
            }
            break;
        }
        merge_change(state, origin, &e.change);
        cursor = e.seq;
    }
    state.set_cursor(origin, cursor);
    Outcome::Replicated { cursor }
}

/// Whether this DC may merge a change `origin` shipped, as its state stands.
fn check_change(state: &impl State, origin: &str, change: &Change) -> Result<(), String> {
    let (sku, row, received) = match change {
        Change::Stock { sku, row } => (sku, row, None),
        Change::StockV2 { sku, row, received } => (sku, row, Some(received)),
        _ => return Ok(()),
    };
    let inv = state.inventory(sku).unwrap_or_else(|| Inventory::new(sku));
    inv.check_row(&state.local_dc(), origin, row, received)
}

fn install_remote(state: &mut impl State, origin: &str, upto: u64, changes: &[Change]) -> Outcome {
    // All or nothing: every row is checked against the state before any is merged (the
    // changes are one per entity, so one does not vouch for another).
    if let Some(reason) = changes.iter().find_map(|c| check_change(state, origin, c).err()) {
        return Outcome::Rejected(Rejection::Invalid(format!("snapshot from {origin}: {reason}")));
    }
    for c in changes {
        merge_change(state, origin, c);
    }
    let cursor = state.cursor(origin).max(upto);
    state.set_cursor(origin, cursor);
    Outcome::Replicated { cursor }
}

/// Merges one change shipped by `origin`. A change about something `origin` does not
/// own is ignored: a DC speaks only for its own counters and orders.
fn merge_change(state: &mut impl State, origin: &str, change: &Change) {
    match change {
        Change::Session(s) => {
            let merged = match state.session(&s.token) {
                Some(old) => old.merge(s.clone()),
                None => s.clone(),
            };
            store_session(state, merged);
        }
        Change::Stock { sku, row } | Change::StockV2 { sku, row, .. } => {
            let mut inv = state.inventory(sku).unwrap_or_else(|| Inventory::new(sku));
            let journal = state.journals_escrow().then(|| (state.local_dc(), inv.balance(&state.local_dc())));
            inv.merge_row(origin, row);
            // What `origin` granted us since its last row arrived.
            let received = journal.map_or(0, |(local, before)| inv.balance(&local) - before);
            state.put_inventory(inv);
            if received != 0 {
                state.escrow_moved(sku, i64::try_from(received).unwrap_or(i64::MAX));
            }
        }
        Change::Order(o) if o.dc == origin => {
            let merged = match state.order(&o.id) {
                Some(old) => old.merge(o.clone()),
                None => o.clone(),
            };
            state.put_order(merged.clone());
            resolve_duplicates(state, &merged);
        }
        Change::Order(_) => {}
        Change::CancelRequest { id, owner, session } if *owner == state.local_dc() => {
            // Queued in another DC while we were unreachable: apply it now, once, if the
            // session that asked is the one that placed the order.
            if let Some(order) = state.order(id).filter(|o| o.status == OrderStatus::Placed && o.dc == *owner) {
                if authorize(state, &order, session).is_ok() {
                    cancel_owned(state, order);
                }
            }
        }
        Change::CancelRequest { .. } => {}
        Change::Settings(s) => {
            let merged = state.settings(&s.dc).map(|old| old.merge(s.clone())).unwrap_or(s.clone());
            state.put_settings(merged);
        }
    }
}

/// Two live orders with one session + idempotency key (a retry that landed in another DC
/// before replication): every DC picks the same survivor; the DC that owns the other
/// cancels it and releases its units.
fn resolve_duplicates(state: &mut impl State, incoming: &Order) {
    let Some(key) = &incoming.idempotency_key else { return };
    let scope = order_key_scope(&incoming.session, key);
    let mut d = state.duplicates(&scope).unwrap_or(DuplicateSet { hlc: incoming.hlc, ids: Vec::new() });
    if !d.ids.contains(&incoming.id) {
        d.ids.push(incoming.id.clone());
        d.ids.sort();
        store_duplicates(state, &scope, d.clone());
    }
    let ids = d.ids;
    let live: Vec<Order> = ids.iter().filter_map(|id| state.order(id)).filter(|o| o.status == OrderStatus::Placed).collect();
    let Some(winner) = live.iter().reduce(|a, b| if a.precedes(b) { a } else { b }).cloned() else { return };
    let local = state.local_dc();
    for loser in live.into_iter().filter(|o| o.id != winner.id && o.dc == local) {
        cancel_owned(state, loser);
    }
    // A retry here now returns the order that stays.
    if let Some(first) = state.idempotency(&scope).filter(|r| r.outcome != Outcome::Order(winner.clone())) {
        // Same key, same expiry: the record keeps its first HLC (and index entry).
        let fingerprint = format!("{}/{}", winner.sku, winner.qty);
        state.put_idempotency(&scope, IdempotencyRecord { fingerprint, outcome: Outcome::Order(winner), hlc: first.hlc });
    }
}

/// In-memory state, for tests and property checks of the rules.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemState {
    pub dc: String,
    pub sessions: BTreeMap<String, Session>,
    pub inventory: BTreeMap<String, Inventory>,
    pub orders: BTreeMap<String, Order>,
    pub idempotency: BTreeMap<String, IdempotencyRecord>,
    pub duplicates: BTreeMap<String, DuplicateSet>,
    /// The expiry indexes, keyed as in sled.
    pub expiry: BTreeSet<Vec<u8>>,
    pub cursors: BTreeMap<String, u64>,
    pub outbox: Vec<Event>,
    pub out_seq: u64,
    pub settings: BTreeMap<String, DcSettings>,
    /// Logouts recorded here for sessions of other shards, with their HLC.
    pub revoked: BTreeMap<String, u64>,
}

impl MemState {
    pub fn new(dc: &str) -> Self {
        MemState { dc: dc.into(), ..Default::default() }
    }

    /// The replicated entities only: what must be equal across DCs after convergence.
    #[allow(clippy::type_complexity)]
    pub fn entities(&self) -> (&BTreeMap<String, Session>, &BTreeMap<String, Inventory>, &BTreeMap<String, Order>, &BTreeMap<String, DcSettings>) {
        (&self.sessions, &self.inventory, &self.orders, &self.settings)
    }
}

impl State for MemState {
    fn local_dc(&self) -> String {
        self.dc.clone()
    }
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
    fn duplicates(&self, scope: &str) -> Option<DuplicateSet> {
        self.duplicates.get(scope).cloned()
    }
    fn cursor(&self, origin: &str) -> u64 {
        self.cursors.get(origin).copied().unwrap_or(0)
    }
    fn settings(&self, dc: &str) -> Option<DcSettings> {
        self.settings.get(dc).cloned()
    }
    fn put_settings(&mut self, s: DcSettings) {
        self.settings.insert(s.dc.clone(), s);
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
    fn remove_idempotency(&mut self, key: &str) {
        self.idempotency.remove(key);
    }
    fn put_duplicates(&mut self, scope: &str, d: DuplicateSet) {
        self.duplicates.insert(scope.into(), d);
    }
    fn remove_duplicates(&mut self, scope: &str) {
        self.duplicates.remove(scope);
    }
    fn revoked(&self, token: &str) -> bool {
        self.revoked.contains_key(token)
    }
    fn put_revoked(&mut self, token: &str, hlc: u64) {
        self.revoked.insert(token.into(), hlc);
    }
    fn remove_revoked(&mut self, token: &str) {
        self.revoked.remove(token);
    }
    fn put_expiry(&mut self, key: Vec<u8>) {
        self.expiry.insert(key);
    }
    fn remove_expiry(&mut self, key: Vec<u8>) {
        self.expiry.remove(&key);
    }
    fn expiry_keys(&self, range: std::ops::Range<Vec<u8>>, max: usize) -> Vec<Vec<u8>> {
        self.expiry.range(range).take(max).cloned().collect()
    }
    fn set_cursor(&mut self, origin: &str, seq: u64) {
        self.cursors.insert(origin.into(), seq);
    }
    fn emit(&mut self, hlc: u64, change: Change) {
        self.out_seq = self.out_seq.checked_add(1).expect("outbox seq exhausted");
        self.outbox.push(Event { seq: self.out_seq, origin: self.dc.clone(), hlc, change });
    }
    fn trim_outbox(&mut self, upto: u64) {
        self.outbox.retain(|e| e.seq > upto);
    }
}
