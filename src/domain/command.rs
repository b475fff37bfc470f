//! What Raft replicates ([`Request`]: a [`Command`] and its idempotency key) and what
//! applying it answers ([`Outcome`]).
//!
//! Ids, tokens and timestamps are chosen by the node that proposes a command, never while
//! applying it, so every replica applies the same bytes to the same result.

use serde::{Deserialize, Serialize};

use super::event::{Change, Event};
use super::model::{DcSettings, Inventory, Order, Session};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateSession {
        token: String,
        user: String,
        dc: String,
        hlc: u64,
    },
    DeleteSession {
        token: String,
        dc: String,
        hlc: u64,
    },
    Restock {
        sku: String,
        add: u64,
        dc: String,
        hlc: u64,
    },
    PlaceOrder {
        id: String,
        session: String,
        sku: String,
        qty: u32,
        dc: String,
        hlc: u64,
        /// Use refreshes the session: write a new version of it at `hlc` from this DC
        /// (chosen by the proposing node when the session's version is older than a tenth
        /// of its TTL, so a busy session is not rewritten on every order).
        refresh_session: bool,
    },
    /// Cancels order `id` of this DC, if `session` is the one that placed it.
    CancelOrder {
        id: String,
        dc: String,
        session: String,
        hlc: u64,
    },
    /// `from` hands `qty` units of its allowance to `to` (rebalancing).
    Grant {
        sku: String,
        qty: u64,
        from: String,
        to: String,
        hlc: u64,
    },
    /// Asks `owner` to cancel its order `id`, through this DC's outbound stream: how a
    /// cancel for a foreign order waits while its owner is unreachable.
    RequestCancel {
        id: String,
        owner: String,
        dc: String,
        hlc: u64,
        /// The session the client presented; the owner checks it.
        session: String,
    },
    /// Events another DC originated, in its order; applied exactly once via the cursor.
    ApplyRemote {
        origin: String,
        events: Vec<Event>,
    },
    /// Catch-up for a DC that fell behind the outbox cap: a page of the origin's owned
    /// state; the last page carries the origin's event `upto` the state is as of (the
    /// others 0, which leaves the cursor as it is).
    InstallRemote {
        origin: String,
        upto: u64,
        changes: Vec<Change>,
    },
    /// Operator settings for `target` (drain, DNS weight), written in `dc`.
    SetDcSettings {
        target: String,
        drained: bool,
        weight: u32,
        dc: String,
        hlc: u64,
    },
    /// Drops outbox events every DC has acknowledged (or that exceed the cap).
    TrimOutbox {
        upto: u64,
    },
    /// Requests of several clients in one Raft entry, applied in order, each to its own
    /// outcome: one log append (and one fsync) for all of them. Built only by the leader's
    /// proposer, never accepted from a client or a peer. (Last, so older entries decode.)
    Batch {
        requests: Vec<Request>,
    },
    /// Housekeeping the leader proposes every `expiry_interval_ms`: drops idempotency
    /// records (and duplicate-order indexes) written before `idempotency_before`, and
    /// tombstones this DC's sessions whose version is older than `sessions_before` (HLC
    /// cutoffs chosen by the leader, so every replica removes the same records). At most
    /// `batch_len_max` records of each kind, oldest first.
    Expire {
        idempotency_before: u64,
        sessions_before: u64,
        batch_len_max: u32,
        dc: String,
        hlc: u64,
    },
    /// `from` hands `qty` units of its allowance to `to`, keeping at least `reserve`
    /// (rebalancing; checked when applied, so concurrent orders cannot push a grant into
    /// the reserve). Replaces `Grant`, still applied from older logs. (Last, so older
    /// entries decode.)
    GrantAboveReserve {
        sku: String,
        qty: u64,
        from: String,
        to: String,
        hlc: u64,
        reserve: u64,
    },
    /// `PlaceOrder` with a session this DC had not seen yet: `record` is the session as
    /// its owner DC answered a lookup for it, merged last-writer-wins (like a replicated
    /// version) before the order is placed, so every replica applies the same entry to the
    /// same result. (After `Expire`, so older entries decode.)
    PlaceOrderWithSession {
        record: Session,
        id: String,
        session: String,
        sku: String,
        qty: u32,
        dc: String,
        hlc: u64,
        refresh_session: bool,
    },
    /// `DeleteSession` (logout) of a session this DC had not seen yet: `record` is the
    /// owner DC's version, merged first as in `PlaceOrderWithSession`.
    DeleteSessionWithRecord {
        record: Session,
        token: String,
        dc: String,
        hlc: u64,
    },
    /// `PlaceOrder` in a DC of several shards when the session lives in another shard than
    /// the SKU: the proposing node found the session live in its shard (a read, not a
    /// write) and names its `user`; applying does not look the session up, so placing the
    /// order stays one entry in the SKU's shard. (After `DeleteSessionWithRecord`, so
    /// older entries decode.)
    PlaceOrderChecked {
        id: String,
        session: String,
        user: String,
        sku: String,
        qty: u32,
        dc: String,
        hlc: u64,
    },
    /// Use refreshes a session that lives in another shard than the order that used it:
    /// a newer version from this DC at `hlc`, if the session is live and older. Proposed
    /// after the order, which does not wait for it.
    RefreshSession {
        token: String,
        dc: String,
        hlc: u64,
    },
    /// A logout, recorded in another shard of this DC than the session's: orders placed
    /// there after it (`PlaceOrderChecked`) are refused in `apply`, whatever the proposing
    /// node's copy of the session said. Kept for a session TTL, after which such a copy
    /// shows the session expired anyway. Not shipped to other DCs (the logout itself is).
    /// (After `RefreshSession`, so older entries decode.)
    RevokeSession {
        token: String,
        dc: String,
        hlc: u64,
    },
    /// A keyed order's claim on its key, written in the shard its idempotency `scope`
    /// (`order_key_scope`) hashes to when that is not the SKU's shard, before the order:
    /// a key is one request, and this shard is where two requests with one key meet,
    /// whatever their SKUs. Recorded as the order's idempotency record would be (same scope,
    /// same fingerprint, same expiry); the first claim wins, a retry of the same request
    /// gets `KeyClaimed` again, another request `IdempotencyMismatch`. Not shipped to other
    /// DCs. (After `RevokeSession`, so older entries decode.)
    ClaimOrderKey {
        scope: String,
        sku: String,
        qty: u32,
        dc: String,
        hlc: u64,
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
            Command::DeleteSession { token, .. } | Command::DeleteSessionWithRecord { token, .. } => (format!("logout/{k}"), token.clone()),
            Command::Restock { sku, add, .. } => (format!("restock/{k}"), format!("{sku}/{add}")),
            // Scoped by session: two shoppers may pick the same key.
            Command::PlaceOrder { session, sku, qty, .. }
            | Command::PlaceOrderWithSession { session, sku, qty, .. }
            | Command::PlaceOrderChecked { session, sku, qty, .. } => (order_key_scope(session, k), format!("{sku}/{qty}")),
            // Scoped by session too: only the same shopper gets the first answer back.
            Command::CancelOrder { id, session, .. } => (format!("cancel/{session}/{k}"), id.clone()),
            // The order's own scope and fingerprint: the claim stands for the order. A scope
            // of another kind records nothing (the claim is refused as invalid).
            Command::ClaimOrderKey { scope, sku, qty, .. } if scope.starts_with("order/") => (scope.clone(), format!("{sku}/{qty}")),
            _ => return None,
        })
    }
}

pub fn order_key_scope(session: &str, key: &str) -> String {
    format!("order/{session}/{key}")
}

impl Command {
    /// The entity a command is about: commands for one entity are serialised by its actor.
    pub fn entity(&self) -> &str {
        match self {
            Command::CreateSession { token, .. }
            | Command::DeleteSession { token, .. }
            | Command::DeleteSessionWithRecord { token, .. }
            | Command::RefreshSession { token, .. }
            | Command::RevokeSession { token, .. } => token,
            Command::Restock { sku, .. }
            | Command::PlaceOrder { sku, .. }
            | Command::PlaceOrderWithSession { sku, .. }
            | Command::PlaceOrderChecked { sku, .. }
            | Command::Grant { sku, .. }
            | Command::GrantAboveReserve { sku, .. } => sku,
            Command::CancelOrder { id, .. } | Command::RequestCancel { id, .. } => id,
            Command::ClaimOrderKey { scope, .. } => scope,
            Command::ApplyRemote { origin, .. } | Command::InstallRemote { origin, .. } => origin,
            Command::TrimOutbox { .. } => "outbox",
            Command::SetDcSettings { target, .. } => target,
            Command::Batch { .. } => "batch",
            Command::Expire { .. } => "expiry",
        }
    }

    /// The SKU an order placement is for (`None` for any other command).
    pub fn order_sku(&self) -> Option<&str> {
        match self {
            Command::PlaceOrder { sku, .. } | Command::PlaceOrderWithSession { sku, .. } | Command::PlaceOrderChecked { sku, .. } => Some(sku),
            _ => None,
        }
    }

    /// The command's timestamp, if it has one: when its idempotency record was written.
    pub fn hlc(&self) -> Option<u64> {
        match self {
            Command::CreateSession { hlc, .. }
            | Command::DeleteSession { hlc, .. }
            | Command::Restock { hlc, .. }
            | Command::PlaceOrder { hlc, .. }
            | Command::PlaceOrderWithSession { hlc, .. }
            | Command::PlaceOrderChecked { hlc, .. }
            | Command::RefreshSession { hlc, .. }
            | Command::RevokeSession { hlc, .. }
            | Command::DeleteSessionWithRecord { hlc, .. }
            | Command::CancelOrder { hlc, .. }
            | Command::Grant { hlc, .. }
            | Command::GrantAboveReserve { hlc, .. }
            | Command::RequestCancel { hlc, .. }
            | Command::SetDcSettings { hlc, .. }
            | Command::ClaimOrderKey { hlc, .. }
            | Command::Expire { hlc, .. } => Some(*hlc),
            Command::ApplyRemote { .. } | Command::InstallRemote { .. } | Command::TrimOutbox { .. } | Command::Batch { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Session(Session),
    SessionDeleted,
    Inventory(Inventory),
    Order(Order),
    /// The receiving DC's cursor for the origin after an `ApplyRemote`/`InstallRemote`.
    Replicated {
        cursor: u64,
    },
    Granted {
        qty: u64,
    },
    CancelQueued {
        owner: String,
    },
    Trimmed,
    Settings(DcSettings),
    Rejected(Rejection),
    /// The result of a blank or membership entry: no client waits on it.
    Noop,
    /// One outcome per request of a [`Command::Batch`], in its order.
    Batch(Vec<Outcome>),
    /// What one expiry pass removed (idempotency records, duplicate-order indexes) and
    /// how many sessions it tombstoned.
    Expired {
        idempotency: u32,
        duplicates: u32,
        sessions: u32,
    },
    /// A keyed order's claim on its key holds (`Command::ClaimOrderKey`).
    KeyClaimed,
}

/// Why a well-formed command changed nothing. Each maps to one HTTP status in `api`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    UnknownSession,
    UnknownSku,
    UnknownOrder,
    SoldOut {
        available: u64,
        requested: u32,
    },
    AlreadyCancelled,
    IdempotencyMismatch,
    /// The order belongs to another DC, which alone may change it.
    ForeignOrder {
        owner: String,
    },
    Invalid(String),
    /// The session presented is not the one that placed the order.
    NotYourOrder,
}

/// A remembered first result of an idempotent request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub fingerprint: String,
    pub outcome: Outcome,
    /// When it was first written (the request's HLC): it expires `idempotency_ttl_s` later.
    pub hlc: u64,
}

/// Ids of the orders (from any DC) placed with one session + idempotency key, and when
/// the first was seen here: kept as long as idempotency records, so a retry in another
/// DC within the TTL still leaves one live order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DuplicateSet {
    pub hlc: u64,
    pub ids: Vec<String>,
}
