//! The actor of one family (sessions, inventory or orders).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::domain::{Outcome, Request};
use crate::error::NodeError;
use crate::raft::proposer::Proposer;
use crate::raft::read_index::ReadIndex;
use crate::storage::SmReader;

use super::Kind;

pub enum EntityMsg {
    Submit {
        cmd: Request,
        reply: RpcReplyPort<Result<Outcome, NodeError>>,
    },
    /// Panics in the handler: the test hook that proves supervision works.
    Crash,
}

pub struct EntityActor;

#[derive(Clone)]
pub struct EntityArgs {
    pub kind: Kind,
    /// This shard's shared read-index rounds: one confirms every rejection that waits.
    pub reads: Arc<ReadIndex>,
    pub proposer: Proposer,
    pub sm: SmReader,
}

impl Actor for EntityActor {
    type Msg = EntityMsg;
    type State = EntityArgs;
    type Arguments = EntityArgs;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: EntityArgs) -> Result<EntityArgs, ActorProcessingErr> {
        tracing::debug!(actor = args.kind.name(), "actor started");
        Ok(args)
    }

    async fn handle(&self, _myself: ActorRef<Self::Msg>, msg: EntityMsg, st: &mut EntityArgs) -> Result<(), ActorProcessingErr> {
        match msg {
            EntityMsg::Crash => panic!("{} actor: crash requested by test hook", st.kind.name()),
            EntityMsg::Submit { cmd, reply } => submit(st, cmd, reply).await,
        }
        Ok(())
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(actor = st.kind.name(), entity = cmd.cmd.entity()))]
async fn submit(st: &EntityArgs, cmd: Request, reply: RpcReplyPort<Result<Outcome, NodeError>>) {
    // Cross-DC batches and the leader's own housekeeping are proposed as they are: they
    // were checked when they arrived, the apply decides them anyway, and a dry run of a
    // batch would apply every event twice on the leader.
    if st.kind == Kind::Replication {
        return propose(st, cmd, reply);
    }
    if let Outcome::Rejected(_) = st.sm.dry_run(&cmd) {
        // A rejection read from local state is only trustworthy once this node has
        // confirmed it still leads (a deposed leader's state may be stale). Confirm off
        // the mailbox, then decide again.
        let st = st.clone();
        tokio::spawn(async move {
            let r = confirm_rejection(&st, cmd).await;
            let _ = reply.send(r);
        });
        return;
    }
    propose(st, cmd, reply);
}

async fn confirm_rejection(st: &EntityArgs, cmd: Request) -> Result<Outcome, NodeError> {
    // Once this replica has applied what a read beginning now must see (shared with
    // every read and rejection that waits meanwhile: one quorum round for all).
    st.reads.get().await?;
    match st.sm.dry_run(&cmd) {
        rejected @ Outcome::Rejected(_) => Ok(rejected),
        // State moved on while we confirmed (e.g. a restock landed): propose after all.
        _ => st.proposer.write(cmd).await,
    }
}

/// Queues the command for Raft now (keeping per-entity order); the reply is sent when
/// it is applied, without holding the mailbox.
fn propose(st: &EntityArgs, cmd: Request, reply: RpcReplyPort<Result<Outcome, NodeError>>) {
    st.proposer.propose(cmd, move |r| {
        let _ = reply.send(r);
    });
}
