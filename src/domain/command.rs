//! What Raft replicates ([`Command`]) and what applying it answers ([`Outcome`]).
//!
//! Ids, tokens and timestamps are chosen by the node that proposes a command, never while
//! applying it, so every replica applies the same bytes to the same result.

use serde::{Deserialize, Serialize};

use super::model::{Inventory, Order, Session};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateSession {
        token: String,
        user: String,
        dc: String,
        at_ms: u64,
    },
    DeleteSession {
        token: String,
    },
    Restock {
        sku: String,
        add: u64,
        dc: String,
    },
    PlaceOrder {
        id: String,
        session: String,
        sku: String,
        qty: u32,
        dc: String,
        at_ms: u64,
    },
    CancelOrder {
        id: String,
    },
}

/// What Raft replicates: a command and the client's `Idempotency-Key`, if it sent one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub cmd: Command,
    pub idempotency_key: Option<String>,
}

impl Request {
    pub fn new(cmd: Command, idempotency_key: Option<String>) -> Self {
        Request { cmd, idempotency_key }
    }

    /// Where the first result of an idempotent request is remembered, and what must match
    /// for a retry to count as the same request.
    pub fn idempotency(&self) -> Option<(String, String)> {
        let k = self.idempotency_key.as_ref()?;
        Some(match &self.cmd {
            Command::CreateSession { user, .. } => (format!("session/{k}"), user.clone()),
            Command::DeleteSession { token } => (format!("logout/{k}"), token.clone()),
            Command::Restock { sku, add, .. } => (format!("restock/{k}"), format!("{sku}/{add}")),
            // Scoped by session: two shoppers may pick the same key.
            Command::PlaceOrder { session, sku, qty, .. } => (format!("order/{session}/{k}"), format!("{sku}/{qty}")),
            Command::CancelOrder { id } => (format!("cancel/{k}"), id.clone()),
        })
    }
}

impl Command {
    /// The entity a command is about: commands for one entity are serialised by its actor.
    pub fn entity(&self) -> &str {
        match self {
            Command::CreateSession { token, .. } | Command::DeleteSession { token } => token,
            Command::Restock { sku, .. } | Command::PlaceOrder { sku, .. } => sku,
            Command::CancelOrder { id } => id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Session(Session),
    SessionDeleted,
    Inventory(Inventory),
    Order(Order),
    Rejected(Rejection),
    /// The result of a blank or membership entry: no client waits on it.
    Noop,
}

/// Why a well-formed command changed nothing. Each maps to one HTTP status in `api`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    UnknownSession,
    UnknownSku,
    UnknownOrder,
    SoldOut { available: u64, requested: u32 },
    AlreadyCancelled,
    IdempotencyMismatch,
    Invalid(String),
}

/// A remembered first result of an idempotent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: String,
    pub outcome: Outcome,
}
