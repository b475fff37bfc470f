//! Asking the DC that created an order or session for its copy: how a DC answers a
//! client for an id or token it has not seen yet.

use serde::{Deserialize, Serialize};

use super::{Order, Session};

/// What a lookup asks another DC for: an order or a session the asked DC created
/// (its id or token names that DC). Answered by that DC after a read barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lookup {
    Order(String),
    Session(String),
}

/// The owner's answer: what it holds under that id or token (`None`: nothing, a 404 the
/// asker may give). A session comes back as the owner's merged version, tombstone included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Found {
    Order(Option<Order>),
    Session(Option<Session>),
}
