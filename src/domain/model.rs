//! Entities: sessions, inventory (escrow counters), orders — and how two replicas of each
//! merge. Every merge here is commutative, associative and idempotent, so DCs that have
//! seen the same events in any order, any number of times, hold the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A login: a last-writer-wins register ordered by (deleted, HLC timestamp, DC). Logout
/// and expiry write a tombstone (`deleted`), and a tombstone is final: it wins over every
/// live version, so neither a late copy of the create nor a refresh written concurrently
/// in another DC can resurrect the token (tokens are random and never reused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub token: String,
    pub user: String,
    /// DC that wrote this version: the one that expires it (see `domain::apply::expire`).
    pub dc: String,
    /// When this version was written: creation, or the last refresh by use.
    pub hlc: u64,
    pub deleted: bool,
}

impl Session {
    /// The version that wins: the larger under the total order (deleted, hlc, dc), so the
    /// merge is commutative, associative and idempotent, and a tombstone is final.
    pub fn merge(self, other: Session) -> Session {
        if (other.deleted, other.hlc, &other.dc) > (self.deleted, self.hlc, &self.dc) {
            other
        } else {
            self
        }
    }
}

/// Stock of one SKU as escrow counters. Every counter is owned by one DC and
/// only grows, so per-DC views merge by taking the larger value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub sku: String,
    pub stocked: BTreeMap<String, u64>,
    pub sold: BTreeMap<String, u64>,
    pub released: BTreeMap<String, u64>,
    /// `sent[from][to]`: units `from` handed over to `to`.
    pub sent: BTreeMap<String, BTreeMap<String, u64>>,
}

/// One DC's own counters for a SKU: what that DC ships to the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockRow {
    pub stocked: u64,
    pub sold: u64,
    pub released: u64,
    pub sent: BTreeMap<String, u64>,
}

fn get(map: &BTreeMap<String, u64>, dc: &str) -> u64 {
    map.get(dc).copied().unwrap_or(0)
}

fn raise(map: &mut BTreeMap<String, u64>, dc: &str, v: u64) {
    // Absent and zero mean the same; never store a zero, so equal states encode equally.
    if v > get(map, dc) {
        map.insert(dc.to_string(), v);
    }
}

impl Inventory {
    pub fn new(sku: &str) -> Self {
        Inventory { sku: sku.to_string(), ..Default::default() }
    }

    /// What `dc` has received from every other DC: Σ sent[x→dc], per x.
    pub fn received_by(&self, dc: &str) -> BTreeMap<String, u64> {
        self.sent.iter().filter(|(from, _)| from.as_str() != dc).filter_map(|(from, to)| to.get(dc).filter(|n| **n > 0).map(|n| (from.clone(), *n))).collect()
    }

    /// `dc`'s allowance as this view sees it, exactly (i128: sums of u64 counters cannot
    /// overflow it): stocked + released + Σ sent[x→dc] − sold − Σ sent[dc→x].
    pub fn balance(&self, dc: &str) -> i128 {
        let received: i128 = self.sent.iter().filter(|(from, _)| from.as_str() != dc).map(|(_, to)| get(to, dc) as i128).sum();
        let given: i128 = self.sent.get(dc).map(|to| to.values().map(|n| *n as i128).sum()).unwrap_or(0);
        get(&self.stocked, dc) as i128 + get(&self.released, dc) as i128 + received - get(&self.sold, dc) as i128 - given
    }

    /// Units `dc` may still sell: stocked − sold + released + Σ sent[x→dc] − Σ sent[dc→x].
    pub fn available(&self, dc: &str) -> u64 {
        // In a DC's own view its counters never let minus exceed plus (`check_own`). In
        // another DC's view a grant may arrive before the stock behind it; show 0 rather
        // than wrap.
        self.balance(dc).clamp(0, u64::MAX as i128) as u64
    }

    /// The escrow invariant for the DC that writes its own counters: it never holds less
    /// than nothing (sold and given away never exceed stocked, released and received).
    pub fn check_own(&self, dc: &str) -> Result<(), String> {
        let b = self.balance(dc);
        if b < 0 {
            return Err(format!("escrow invariant broken for {dc} on {}: allowance {b}", self.sku));
        }
        Ok(())
    }

    /// Units left cluster-wide (this node's view of every DC's counters).
    pub fn total(&self) -> u64 {
        self.dcs().iter().fold(0u64, |t, dc| t.saturating_add(self.available(dc)))
    }

    pub fn dcs(&self) -> Vec<String> {
        let mut dcs: Vec<String> = self.stocked.keys().chain(self.sold.keys()).chain(self.released.keys()).chain(self.sent.keys()).cloned().collect();
        for to in self.sent.values() {
            dcs.extend(to.keys().cloned());
        }
        dcs.sort();
        dcs.dedup();
        dcs
    }

    /// Adds to a counter; one that would pass `u64::MAX` is left alone, as an error.
    pub fn add(map: &mut BTreeMap<String, u64>, dc: &str, n: u64) -> Result<(), String> {
        let v = get(map, dc).checked_add(n).ok_or_else(|| format!("counter of {dc} would overflow"))?;
        if v > 0 {
            map.insert(dc.to_string(), v);
        }
        Ok(())
    }

    pub fn row(&self, dc: &str) -> StockRow {
        StockRow {
            stocked: get(&self.stocked, dc),
            sold: get(&self.sold, dc),
            released: get(&self.released, dc),
            sent: self.sent.get(dc).cloned().unwrap_or_default(),
        }
    }

    /// Whether this DC (`me`) may merge the row `origin` shipped, `received` being
    /// origin's own account of what each DC sent it (absent in rows from builds before
    /// it was shipped). A DC speaks only for itself and grants only out of what it holds:
    ///
    /// 1. the row balances: stocked + released + Σ received − sold − Σ sent ≥ 0;
    /// 2. it received from us no more than we recorded sending it;
    /// 3. a row that raises what origin gave *us* must balance with what it received
    ///    from third DCs counted only as far as our own view confirms it (a grant from
    ///    y not yet replicated here holds the row back until it is).
    ///
    /// Residual trust: origin's own stocked (a restock is its prerogative), and its
    /// claims about third DCs when they do not raise its grants to us (each such DC
    /// checks rule 2 for itself).
    pub fn check_row(&self, me: &str, origin: &str, row: &StockRow, received: Option<&BTreeMap<String, u64>>) -> Result<(), String> {
        let sum = |m: &BTreeMap<String, u64>| m.values().map(|n| *n as i128).sum::<i128>();
        let own = row.stocked as i128 + row.released as i128 - row.sold as i128 - sum(&row.sent);
        let view = self.received_by(origin);
        if let Some(received) = received {
            if received.contains_key(origin) || row.sent.contains_key(origin) {
                return Err(format!("{origin}'s row on {} names itself", self.sku));
            }
            if own + sum(received) < 0 {
                return Err(format!("{origin}'s row on {} hands out more than it holds", self.sku));
            }
            let ours = self.sent.get(me).map(|to| get(to, origin)).unwrap_or(0);
            if get(received, me) > ours {
                return Err(format!("{origin} claims {} units of {} from {me}, which sent {ours}", get(received, me), self.sku));
            }
        }
        let to_me = get(&row.sent, me);
        let had = self.sent.get(origin).map(|to| get(to, me)).unwrap_or(0);
        if to_me > had {
            let confirmed: i128 = match received {
                Some(r) => r.iter().map(|(y, n)| (*n).min(get(&view, y)) as i128).sum(),
                None => sum(&view),
            };
            if own + confirmed < 0 {
                return Err(format!("{origin}'s grant of {} to {me} is not backed by what {me} knows it holds", self.sku));
            }
        }
        Ok(())
    }

    /// Merges `dc`'s own counters, as shipped by `dc`.
    pub fn merge_row(&mut self, dc: &str, row: &StockRow) {
        raise(&mut self.stocked, dc, row.stocked);
        raise(&mut self.sold, dc, row.sold);
        raise(&mut self.released, dc, row.released);
        for (to, n) in row.sent.iter().filter(|(_, n)| **n > 0) {
            raise(self.sent.entry(dc.to_string()).or_default(), to, *n);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OrderStatus {
    Placed,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Placed => "placed",
            OrderStatus::Cancelled => "cancelled",
        }
    }
}

/// An order, owned by its origin DC (`dc`, also the prefix of its id). Only the owner
/// changes it; its status only moves forward (placed → cancelled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub session: String,
    pub user: String,
    pub sku: String,
    pub qty: u32,
    pub status: OrderStatus,
    pub dc: String,
    pub hlc: u64,
    /// The client's `Idempotency-Key`: two live orders with the same session and key,
    /// placed in two DCs before they saw each other, are one order too many.
    pub idempotency_key: Option<String>,
}

impl Order {
    pub fn merge(self, other: Order) -> Order {
        if other.status > self.status {
            other
        } else {
            self
        }
    }

    /// Of two duplicates, the one that stays: the earlier (HLC, DC, id).
    pub fn precedes(&self, other: &Order) -> bool {
        (self.hlc, &self.dc, &self.id) < (other.hlc, &other.dc, &other.id)
    }
}

/// Operator settings of one DC (drain, DNS weight): a last-writer-wins register any DC
/// may write, replicated to all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DcSettings {
    pub dc: String,
    pub drained: bool,
    pub weight: u32,
    pub hlc: u64,
    /// The DC that wrote this version (the tie-break).
    pub by: String,
}

impl DcSettings {
    pub fn default_for(dc: &str) -> Self {
        DcSettings { dc: dc.into(), drained: false, weight: 1, hlc: 0, by: String::new() }
    }

    pub fn merge(self, other: DcSettings) -> DcSettings {
        if (other.hlc, &other.by) > (self.hlc, &self.by) {
            other
        } else {
            self
        }
    }
}
