//! Cross-DC events: what a DC ships about the state it owns. Each carries the full new
//! value of an owned entity (state-based, not a delta), so applying one twice or late is
//! harmless; the per-origin cursor makes it exactly-once in order on top of that.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::{DcSettings, Order, Session, StockRow};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the origin's outbound stream, from 1, without gaps.
    pub seq: u64,
    pub origin: String,
    /// HLC of the command that produced it (lag is measured from its physical part).
    pub hlc: u64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Session(Session),
    /// The origin's own counters for a SKU.
    Stock {
        sku: String,
        row: StockRow,
    },
    Order(Order),
    /// A cancel for an order `owner` owns, received by another DC, with the session the
    /// client presented: the owner cancels only if it is the one that placed the order.
    CancelRequest {
        id: String,
        owner: String,
        session: String,
    },
    /// Operator settings of a DC (any DC may write them).
    Settings(DcSettings),
    /// The origin's own counters for a SKU and what it has received from each DC (its
    /// view of sent[x→origin]), so a receiver can check the row balances (see
    /// `Inventory::check_row`). What this build emits; `Stock` (without `received`) is
    /// still read from outboxes and peers written before. Last, so older records decode.
    StockV2 {
        sku: String,
        row: StockRow,
        received: BTreeMap<String, u64>,
    },
}

impl Change {
    /// What the change is about, which names its shard (a token, a SKU, an order id);
    /// `None` for what belongs to the whole DC, kept in shard 0.
    pub fn entity(&self) -> Option<&str> {
        match self {
            Change::Session(s) => Some(&s.token),
            Change::Stock { sku, .. } | Change::StockV2 { sku, .. } => Some(sku),
            Change::Order(o) => Some(&o.id),
            Change::CancelRequest { id, .. } => Some(id),
            Change::Settings(_) => None,
        }
    }
}
