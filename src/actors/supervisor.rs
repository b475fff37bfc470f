//! Starts one actor per family and restarts any that fails.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::entity::{EntityActor, EntityArgs};
use super::{Directory, Kind};
use crate::metrics::Metrics;

pub struct Supervisor;

pub struct SupervisorArgs {
    pub template: EntityArgs,
    pub directory: Arc<Directory>,
    pub metrics: Metrics,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    children: HashMap<ActorId, Kind>,
}

async fn start_child(myself: &ActorRef<()>, st: &mut SupervisorState, kind: Kind) -> Result<(), ActorProcessingErr> {
    let args = EntityArgs { kind, ..st.args.template.clone() };
    // Unnamed: actor names are process-global, and nothing needs to look these up by name.
    let (actor, _) = Actor::spawn_linked(None, EntityActor, args, myself.get_cell()).await?;
    st.children.insert(actor.get_id(), kind);
    st.args.directory.set(kind, actor);
    Ok(())
}

impl Actor for Supervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, myself: ActorRef<()>, args: SupervisorArgs) -> Result<SupervisorState, ActorProcessingErr> {
        let mut st = SupervisorState { args, children: HashMap::new() };
        for kind in Kind::ALL {
            start_child(&myself, &mut st, kind).await?;
        }
        Ok(st)
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<()>, evt: SupervisionEvent, st: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        let (cell, why): (ActorCell, String) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.unwrap_or_else(|| "stopped".into())),
            _ => return Ok(()),
        };
        let Some(kind) = st.children.remove(&cell.get_id()) else { return Ok(()) };
        tracing::error!(actor = kind.name(), reason = %why, "actor failed; restarting");
        st.args.metrics.actor_restarts.with_label_values(&[kind.name()]).inc();
        start_child(&myself, st, kind).await
    }
}

pub async fn spawn_supervisor(args: SupervisorArgs) -> anyhow::Result<ActorRef<()>> {
    let (sup, _) = Actor::spawn(None, Supervisor, args).await.map_err(|e| anyhow::anyhow!("start supervisor: {e}"))?;
    Ok(sup)
}
