//! Checks on values other nodes send, made before anything is applied or observed:
//! timestamps too far in the future, acknowledgement cursors beyond what this DC has
//! emitted, and how much stock one asking DC may obtain. Pure functions (the time, the
//! state they need, the limits → verdict), plus the grant limiter's small state.
//! (Stock rows are checked where they are merged, against the state: `Inventory::check_row`.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::{Change, Command, Event};
use crate::domain::{Found, Lookup};
use crate::hlc;

/// The timestamps a change carries (sessions, orders and DC settings are last-writer-wins
/// or ordered by them: one from the far future would win forever).
pub fn check_change(c: &Change, now_ms: u64, max: u64) -> Result<(), String> {
    match c {
        Change::Session(s) => hlc::check("session", s.hlc, now_ms, max),
        Change::Order(o) => hlc::check("order", o.hlc, now_ms, max),
        Change::Settings(s) => hlc::check("dc settings", s.hlc, now_ms, max),
        Change::Stock { .. } | Change::StockV2 { .. } | Change::CancelRequest { .. } => Ok(()),
    }
}

/// Changes sent to shard `shard` (of the entities' `spread`) must be about what that
/// shard holds: a peer cannot plant a session or an order where no read would ever look
/// for it.
pub fn check_shard<'a>(changes: impl IntoIterator<Item = &'a Change>, shard: u16, spread: impl Into<crate::ids::Spread>) -> Result<(), String> {
    let spread = spread.into();
    for c in changes {
        let home = c.entity().map_or(0, |key| crate::ids::shard_of(key, spread));
        if home != shard {
            return Err(format!("a change about {:?} belongs to shard {home}, not {shard}", c.entity().unwrap_or("the DC")));
        }
    }
    Ok(())
}

/// A replicated batch: every event's timestamp and what its change carries.
pub fn check_events(events: &[Event], now_ms: u64, max: u64) -> Result<(), String> {
    for e in events {
        hlc::check(&format!("event {}", e.seq), e.hlc, now_ms, max)?;
        check_change(&e.change, now_ms, max).map_err(|m| format!("event {}: {m}", e.seq))?;
    }
    Ok(())
}

/// A command forwarded by a peer: the timestamp it carries (the leader proposes it as is).
pub fn check_command(cmd: &Command, now_ms: u64, max: u64) -> Result<(), String> {
    match cmd {
        Command::ApplyRemote { events, .. } => check_events(events, now_ms, max),
        Command::InstallRemote { changes, .. } => changes.iter().try_for_each(|c| check_change(c, now_ms, max)),
        Command::Batch { requests } => requests.iter().try_for_each(|r| check_command(&r.cmd, now_ms, max)),
        // The session record a DC fetched from its owner rides in the entry: its time too.
        Command::PlaceOrderWithSession { record, hlc, .. } | Command::DeleteSessionWithRecord { record, hlc, .. } => {
            hlc::check("command", *hlc, now_ms, max).and_then(|_| hlc::check("session record", record.hlc, now_ms, max))
        }
        other => other.hlc().map_or(Ok(()), |hlc| hlc::check("command", hlc, now_ms, max)),
    }
}

/// An owner DC's answer to a lookup: it must be about what was asked, created by the DC
/// asked, and not stamped beyond the clock offset — the asker puts it in its own Raft log.
pub fn check_found(asked: &Lookup, owner: &str, found: &Found, now_ms: u64, max: u64) -> Result<(), String> {
    match (asked, found) {
        (_, Found::Order(None) | Found::Session(None)) => Ok(()),
        (Lookup::Order(id), Found::Order(Some(o))) if o.id == *id && o.dc == owner => hlc::check("looked-up order", o.hlc, now_ms, max),
        (Lookup::Session(token), Found::Session(Some(s))) if s.token == *token => hlc::check("looked-up session", s.hlc, now_ms, max),
        _ => Err(format!("{owner} answered a lookup for {asked:?} with something else")),
    }
}

/// The cursor to keep after a DC acknowledged `ack` of our events: it cannot have
/// applied more than we have emitted (`emitted`) — an answer saying so is an error, and
/// the old cursor stays. (A cursor going back is allowed: a DC restored from nothing
/// starts again at 0.)
pub fn accept_ack(ack: u64, emitted: u64) -> Result<u64, String> {
    if ack > emitted {
        return Err(format!("acknowledged event {ack}, but only {emitted} were emitted"));
    }
    Ok(ack)
}

/// Units to grant for an ask of `want`: out of what is held above the reserve, and at
/// most `units_max` per ask.
pub fn grant_qty(want: u64, available: u64, reserve: u64, units_max: u64) -> u64 {
    want.min(available.saturating_sub(reserve)).min(units_max)
}

/// When each asking DC last obtained units of each SKU: one grant per (DC, SKU) per
/// `replication.grant_interval_ms`, so a hostile asker moves at most `grant_units_max`
/// units per interval to itself (never below the reserve).
#[derive(Default)]
pub struct GrantLimiter {
    last: Mutex<HashMap<(String, String), Instant>>,
}

impl GrantLimiter {
    /// Whether `dc` may be granted `sku` now; if so, the interval starts again.
    pub fn try_begin(&self, dc: &str, sku: &str, interval: Duration) -> bool {
        let mut last = self.last.lock().expect("grant limiter lock");
        let now = Instant::now();
        // Bounded: entries older than the interval are of no use.
        last.retain(|_, t| now.duration_since(*t) < interval);
        let key = (dc.to_string(), sku.to_string());
        if last.contains_key(&key) {
            return false;
        }
        last.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer cannot plant what a shard does not hold: a session whose token lives in
    /// another shard, or DC settings outside shard 0.
    #[test]
    fn changes_must_belong_to_the_shard_they_are_sent_to() {
        use crate::domain::{DcSettings, Session};
        use crate::ids::shard_of;
        let token = (0..).map(|i| format!("dc2-{i}")).find(|t| shard_of(t, 3) == 1).expect("a token of shard 1");
        let s = Change::Session(Session { token: token.clone(), user: "u".into(), dc: "dc2".into(), hlc: 1, deleted: false });
        assert!(check_shard([&s], 1, 3).is_ok());
        let err = check_shard([&s], 2, 3).expect_err("shard 2 does not hold it");
        assert!(err.contains("belongs to shard 1"), "{err}");
        let settings = Change::Settings(DcSettings::default_for("dc2"));
        assert!(check_shard([&settings], 0, 3).is_ok());
        assert!(check_shard([&settings], 1, 3).is_err());
        assert!(check_shard([&s, &settings], 0, 1).is_ok(), "one shard holds everything");
    }

    #[test]
    fn a_lookup_answer_must_be_what_was_asked_and_not_from_the_future() {
        use crate::domain::{Order, OrderStatus, Session};
        let now = 1_000_000;
        let session = |token: &str, hlc_ms: u64| Session { token: token.into(), user: "u".into(), dc: "dc2".into(), hlc: hlc_ms << 16, deleted: false };
        let order = |id: &str, dc: &str| Order {
            id: id.into(),
            session: "s".into(),
            user: "u".into(),
            sku: "k".into(),
            qty: 1,
            status: OrderStatus::Placed,
            dc: dc.into(),
            hlc: now << 16,
            idempotency_key: None,
        };
        let asked = Lookup::Session("dc2-t".into());
        assert!(check_found(&asked, "dc2", &Found::Session(Some(session("dc2-t", now))), now, 500).is_ok());
        assert!(check_found(&asked, "dc2", &Found::Session(None), now, 500).is_ok());
        assert!(check_found(&asked, "dc2", &Found::Session(Some(session("dc2-other", now))), now, 500).is_err());
        assert!(check_found(&asked, "dc2", &Found::Session(Some(session("dc2-t", now + 10_000))), now, 500).is_err());
        assert!(check_found(&asked, "dc2", &Found::Order(None), now, 500).is_ok(), "nothing found is an honest answer");
        let asked = Lookup::Order("dc2-o".into());
        assert!(check_found(&asked, "dc2", &Found::Order(Some(order("dc2-o", "dc2"))), now, 500).is_ok());
        assert!(check_found(&asked, "dc2", &Found::Order(Some(order("dc2-o", "dc3"))), now, 500).is_err(), "dc2 answers only for its own orders");
        assert!(check_found(&asked, "dc2", &Found::Session(Some(session("dc2-o", now))), now, 500).is_err());
    }
    use crate::domain::{DcSettings, Request, Session};

    const NOW: u64 = 1_800_000_000_000;
    fn ts(ms: u64) -> u64 {
        ms << 16
    }

    #[test]
    fn timestamps_beyond_the_offset_are_refused() {
        assert!(hlc::check("x", ts(NOW + 500), NOW, 500).is_ok());
        assert!(hlc::check("x", ts(NOW + 500) | 0xffff, NOW, 500).is_ok(), "the logical part does not count");
        assert!(hlc::check("x", ts(NOW + 501), NOW, 500).is_err());
        assert!(hlc::check("x", u64::MAX, NOW, 500).is_err());
        assert!(hlc::check("x", 0, NOW, 500).is_ok(), "the past is fine");
        let settings = |hlc| Change::Settings(DcSettings { dc: "dc1".into(), drained: true, weight: 1, hlc, by: "dc2".into() });
        let ev = |hlc, change| Event { seq: 1, origin: "dc2".into(), hlc, change };
        assert!(check_events(&[ev(ts(NOW), settings(ts(NOW)))], NOW, 500).is_ok());
        assert!(check_events(&[ev(u64::MAX, settings(ts(NOW)))], NOW, 500).is_err(), "the event's own stamp");
        assert!(check_events(&[ev(ts(NOW), settings(u64::MAX))], NOW, 500).is_err(), "the stamp inside the change");
        let session = Change::Session(Session { token: "t".into(), user: "u".into(), dc: "dc2".into(), hlc: u64::MAX, deleted: false });
        assert!(check_events(&[ev(ts(NOW), session)], NOW, 500).is_err());
        let cmd = |hlc| Command::SetDcSettings { target: "dc1".into(), drained: true, weight: 1, dc: "dc1".into(), hlc };
        assert!(check_command(&cmd(ts(NOW)), NOW, 500).is_ok());
        assert!(check_command(&cmd(u64::MAX), NOW, 500).is_err());
        let batch = Command::Batch { requests: vec![Request::new(cmd(u64::MAX), None)] };
        assert!(check_command(&batch, NOW, 500).is_err(), "inside a batch too");
    }

    #[test]
    fn acks_beyond_what_was_emitted_are_refused() {
        assert_eq!(accept_ack(0, 0), Ok(0));
        assert_eq!(accept_ack(7, 7), Ok(7));
        assert_eq!(accept_ack(2, 7), Ok(2), "a DC restored from nothing starts again");
        assert!(accept_ack(u64::MAX, 7).is_err());
        assert!(accept_ack(8, 7).is_err());
    }

    #[test]
    fn grants_come_from_above_the_reserve_and_are_capped() {
        assert_eq!(grant_qty(u64::MAX, 50, 10, 100), 40);
        assert_eq!(grant_qty(u64::MAX, 500, 10, 100), 100);
        assert_eq!(grant_qty(5, 500, 10, 100), 5);
        assert_eq!(grant_qty(5, 8, 10, 100), 0);
        let l = GrantLimiter::default();
        let i = Duration::from_secs(60);
        assert!(l.try_begin("dc2", "a", i));
        assert!(!l.try_begin("dc2", "a", i), "again within the interval");
        assert!(l.try_begin("dc2", "b", i));
        assert!(l.try_begin("dc3", "a", i));
        assert!(l.try_begin("dc2", "x", Duration::ZERO) && l.try_begin("dc2", "x", Duration::ZERO));
    }
}
