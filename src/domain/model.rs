//! Entities: sessions, inventory (escrow counters), orders.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A login. Deleting writes a tombstone (`deleted`) rather than removing the record, so a
/// later replicated create cannot resurrect it (last-writer-wins by timestamp).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub token: String,
    pub user: String,
    pub dc: String,
    pub created_ms: u64,
    pub deleted: bool,
}

/// Stock of one SKU as escrow counters (DESIGN §2). Every counter is owned by one DC and
/// only grows, so per-DC views merge without conflict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub sku: String,
    pub stocked: BTreeMap<String, u64>,
    pub sold: BTreeMap<String, u64>,
    pub released: BTreeMap<String, u64>,
    /// `sent[from][to]`: units `from` handed over to `to`.
    pub sent: BTreeMap<String, BTreeMap<String, u64>>,
}

fn get(map: &BTreeMap<String, u64>, dc: &str) -> u64 {
    map.get(dc).copied().unwrap_or(0)
}

impl Inventory {
    pub fn new(sku: &str) -> Self {
        Inventory {
            sku: sku.to_string(),
            ..Default::default()
        }
    }

    /// Units `dc` may still sell: stocked − sold + released + Σ sent[x→dc] − Σ sent[dc→x].
    pub fn available(&self, dc: &str) -> u64 {
        let received: u64 = self.sent.iter().filter(|(from, _)| from.as_str() != dc).map(|(_, to)| get(to, dc)).sum();
        let given: u64 = self.sent.get(dc).map(|to| to.values().sum()).unwrap_or(0);
        let plus = get(&self.stocked, dc) as i128 + get(&self.released, dc) as i128 + received as i128;
        let minus = get(&self.sold, dc) as i128 + given as i128;
        // The apply rules never let minus exceed plus; assert it so a broken rule crashes
        // loudly instead of selling phantom stock.
        assert!(plus >= minus, "escrow invariant broken for {}: {plus} < {minus}", self.sku);
        (plus - minus) as u64
    }

    /// Units left cluster-wide (this node's view of every DC's counters).
    pub fn total(&self) -> u64 {
        self.dcs().iter().map(|dc| self.available(dc)).sum()
    }

    pub fn dcs(&self) -> Vec<String> {
        let mut dcs: Vec<String> = self
            .stocked
            .keys()
            .chain(self.sold.keys())
            .chain(self.released.keys())
            .chain(self.sent.keys())
            .cloned()
            .collect();
        for to in self.sent.values() {
            dcs.extend(to.keys().cloned());
        }
        dcs.sort();
        dcs.dedup();
        dcs
    }

    pub fn add(map: &mut BTreeMap<String, u64>, dc: &str, n: u64) {
        *map.entry(dc.to_string()).or_insert(0) += n;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// An order, owned by its origin DC (`dc`, also the prefix of its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub session: String,
    pub user: String,
    pub sku: String,
    pub qty: u32,
    pub status: OrderStatus,
    pub dc: String,
    pub created_ms: u64,
}
