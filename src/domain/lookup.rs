//! Asking for one record by its key: another DC, for an order or session it created that
//! this DC has not seen yet; or, inside a DC, a node holding the record's shard, for a
//! node that holds no replica of that shard.

use serde::{Deserialize, Serialize};

use super::{Inventory, Order, Session};

/// What a lookup asks for: across DCs, an order or a session the asked DC created (its
/// id or token names that DC), answered by that DC after a read barrier; inside a DC, any
/// record of the shard (`Inventory` only there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lookup {
    Order(String),
    Session(String),
    Inventory(String),
}

impl Lookup {
    /// The key asked for: an order id, a token or a SKU.
    pub fn key(&self) -> &str {
        match self {
            Lookup::Order(k) | Lookup::Session(k) | Lookup::Inventory(k) => k,
        }
    }
}

/// The owner's answer: what it holds under that id or token (`None`: nothing, a 404 the
/// asker may give). A session comes back as the owner's merged version, tombstone included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Found {
    Order(Option<Order>),
    Session(Option<Session>),
    Inventory(Option<Inventory>),
}
