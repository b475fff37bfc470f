//! ractor actors for sessions, inventory and orders, under a [`supervisor`] that restarts
//! a failed actor (ractor's supervisors stop by default; the restart is ours).
//!
//! An actor handles one command at a time: it validates the command against the current
//! state, then proposes it to Raft with `client_write_ff` — which enqueues it in
//! proposal order without waiting — and hands the wait for commit to a task. So commands
//! for one entity reach the log in the order the actor saw them, and a Raft write never
//! blocks the mailbox.

pub mod entity;
pub mod supervisor;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;
use tokio::sync::Semaphore;

use crate::domain::{Command, Outcome, Request};
use crate::error::NodeError;
pub use entity::EntityMsg;
pub use supervisor::{spawn_supervisor, Supervisor};

/// The actor families; each command goes to the family that owns its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Sessions,
    Inventory,
    Orders,
    /// Cross-DC events: one batch per origin at a time, in origin order.
    Replication,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Sessions, Kind::Inventory, Kind::Orders, Kind::Replication];

    /// The family that serialises `cmd`; none for a batch, which only the proposer builds.
    pub fn of(cmd: &Command) -> Option<Kind> {
        Some(match cmd {
            Command::CreateSession { .. }
            | Command::DeleteSession { .. }
            | Command::DeleteSessionWithRecord { .. }
            | Command::RefreshSession { .. }
            | Command::RevokeSession { .. } => Kind::Sessions,
            // An order takes units from its SKU: the SKU's actor serialises it with restocks.
            Command::Restock { .. }
            | Command::PlaceOrder { .. }
            | Command::PlaceOrderWithSession { .. }
            | Command::PlaceOrderChecked { .. }
            | Command::Grant { .. }
            | Command::GrantAboveReserve { .. } => Kind::Inventory,
            Command::CancelOrder { .. } | Command::RequestCancel { .. } | Command::ClaimOrderKey { .. } => Kind::Orders,
            Command::ApplyRemote { .. }
            | Command::InstallRemote { .. }
            | Command::TrimOutbox { .. }
            | Command::SetDcSettings { .. }
            | Command::Expire { .. } => Kind::Replication,
            Command::Batch { .. } => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Sessions => "sessions",
            Kind::Inventory => "inventory",
            Kind::Orders => "orders",
            Kind::Replication => "replication",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Where the live actor of each family is; the supervisor updates it after a restart.
pub struct Directory {
    // std RwLock: held only to clone an ActorRef, never across an await.
    actors: RwLock<HashMap<Kind, ActorRef<EntityMsg>>>,
    /// Bounds the commands queued at or in flight through the actors.
    queue: Arc<Semaphore>,
    timeout: Duration,
}

impl Directory {
    pub fn new(queue_len_max: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Directory { actors: Default::default(), queue: Arc::new(Semaphore::new(queue_len_max)), timeout })
    }

    pub(crate) fn set(&self, kind: Kind, actor: ActorRef<EntityMsg>) {
        self.actors.write().expect("directory lock").insert(kind, actor);
    }

    pub fn get(&self, kind: Kind) -> Option<ActorRef<EntityMsg>> {
        self.actors.read().expect("directory lock").get(&kind).cloned()
    }

    /// Runs `cmd` through its actor and Raft; answers once it is applied here.
    pub async fn submit(&self, cmd: Request) -> Result<Outcome, NodeError> {
        let _permit = self.queue.try_acquire().map_err(|_| NodeError::Overloaded("too many commands queued at the actors".into()))?;
        let kind = Kind::of(&cmd.cmd).ok_or_else(|| NodeError::BadRequest("a batch is built by the leader, not submitted".into()))?;
        let actor = self.get(kind).ok_or_else(|| NodeError::Overloaded("actor restarting".into()))?;
        match actor.call(|reply| EntityMsg::Submit { cmd, reply }, Some(self.timeout)).await {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::Timeout) => Err(NodeError::Timeout),
            // The actor failed with our message in its mailbox; the supervisor restarts it.
            Ok(CallResult::SenderError) | Err(_) => Err(NodeError::Overloaded("actor restarting".into())),
        }
    }

    /// Makes an actor panic inside its handler (test hook: proves the restart).
    pub fn crash(&self, kind: Kind) -> bool {
        self.get(kind).map(|a| a.cast(EntityMsg::Crash).is_ok()).unwrap_or(false)
    }
}
