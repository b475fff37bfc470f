//! The shards a node hosts: one Raft group each (with its state machine, actors and
//! cross-DC side), and which of them holds an entity. Sessions live in the shard of their
//! token, inventory in the shard of its SKU, and an order in its SKU's shard, under an id
//! that leads there ([`crate::ids::order_id`]); every DC has the same shards, so an
//! entity's shard is the same in every DC, and each shard replicates to its namesakes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::error::NodeError;
use crate::ids::shard_of;
use crate::placement::{self, Move};
use crate::raft::{MembershipOp, NodeId};
use crate::replication::CrossDc;

pub struct Shards {
    list: Vec<Arc<CrossDc>>,
}

impl Shards {
    /// `list[k]` is shard `k`; there is at least one.
    pub fn new(list: Vec<Arc<CrossDc>>) -> Self {
        assert!(!list.is_empty() && list.len() <= usize::from(crate::config::SHARDS_MAX), "1..=SHARDS_MAX shards");
        Shards { list }
    }

    /// How many there are.
    pub fn count(&self) -> u16 {
        u16::try_from(self.list.len()).expect("at most SHARDS_MAX shards")
    }

    /// Shard 0, which also holds what belongs to the whole DC (operator settings).
    pub fn first(&self) -> &Arc<CrossDc> {
        &self.list[0]
    }

    pub fn all(&self) -> &[Arc<CrossDc>] {
        &self.list
    }

    /// The shard that holds the entity `key` names (a token, a SKU, an order id).
    pub fn of(&self, key: &str) -> &Arc<CrossDc> {
        &self.list[usize::from(self.number_of(key))]
    }

    /// The number of the shard that holds `key`.
    pub fn number_of(&self, key: &str) -> u16 {
        shard_of(key, self.spread())
    }

    /// The shards entities live in (`ClusterConfig::spread`).
    pub fn spread(&self) -> crate::ids::Spread {
        self.first().shard.config.spread()
    }

    /// Whether this node's replica of the session's shard holds `token` logged out or
    /// expired: how a cancel in a shard that does not hold the session is refused (a
    /// session not seen here at all may be another DC's, not replicated yet; the order's
    /// own record of its session still has to match). A node holding no replica of that
    /// shard cannot tell: false.
    pub fn session_ended(&self, token: &str) -> bool {
        let shard = &self.of(token).shard;
        self.count() > 1 && shard.hosts() && shard.sm.session(token).is_some_and(|s| s.deleted)
    }
}

/// What a membership change of the DC did: shard 0's voters after it (shard 0 is on every
/// node), and the replicas of the other shards it moved.
#[derive(Debug, Default)]
pub struct Changed {
    pub voters: BTreeSet<NodeId>,
    pub moves: Vec<Move>,
}

impl Shards {
    /// Adds or removes a node of the DC. With every shard on every node, in every shard,
    /// shard 0 first. With shards on subsets (`cluster.replicas`), shard 0 as before, and
    /// the other shards' replicas move (`crate::placement`): a node added takes its share
    /// from the most loaded nodes, a node removed hands each of its replicas to another
    /// node first. One shard at a time; a failure stops there, and since each step
    /// leaves every shard with its replicas, the operator repeats the command.
    pub async fn change_membership(&self, op: MembershipOp) -> Result<Changed, NodeError> {
        let first = &self.first().shard;
        if first.config.cluster.replicas == 0 || self.count() == 1 {
            let mut voters = None;
            for c in self.all() {
                let v = c.shard.change_membership(op.clone()).await?;
                voters.get_or_insert(v);
            }
            return Ok(Changed { voters: voters.unwrap_or_default(), moves: Vec::new() });
        }
        match op {
            MembershipOp::Add(id) => {
                let voters = first.change_membership(op).await?;
                let nodes: Vec<NodeId> = voters.iter().copied().collect();
                let wanted = usize::from(first.config.cluster.replicas).min(nodes.len());
                let moves = placement::moves_onto(&self.data_voters().await?, &nodes, id, wanted);
                self.run_moves(&moves, false).await?;
                Ok(Changed { voters, moves })
            }
            MembershipOp::Remove(id) | MembershipOp::ForceRemove(id) => {
                let nodes: Vec<NodeId> = first.members().await?.voters.into_iter().collect();
                let moves = placement::moves_off(&self.data_voters().await?, &nodes, id);
                self.run_moves(&moves, matches!(op, MembershipOp::ForceRemove(_))).await?;
                let voters = first.change_membership(op).await?;
                Ok(Changed { voters, moves })
            }
            MembershipOp::Replace { .. } => Err(NodeError::BadRequest("a replacement is made shard by shard".into())),
        }
    }

    /// The voters of every shard but shard 0, from their leaders.
    async fn data_voters(&self) -> Result<placement::Voters, NodeError> {
        let mut out = placement::Voters::new();
        for c in &self.all()[1..] {
            out.insert(c.shard.number, c.shard.members().await?.voters);
        }
        Ok(out)
    }

    async fn run_moves(&self, moves: &[Move], force: bool) -> Result<(), NodeError> {
        for m in moves {
            let op = match (m.add, m.remove) {
                (Some(add), Some(remove)) => MembershipOp::Replace { add, remove },
                (Some(add), None) => MembershipOp::Add(add),
                (None, Some(remove)) if force => MembershipOp::ForceRemove(remove),
                (None, Some(remove)) => MembershipOp::Remove(remove),
                (None, None) => continue,
            };
            let shard = &self.list[usize::from(m.shard)].shard;
            shard.change_membership(op).await?;
            tracing::info!(shard = m.shard, add = ?m.add, remove = ?m.remove, "shard replica moved");
        }
        Ok(())
    }
}

/// A node fenced for its clock hands over every shard it leads to a voter its clock
/// probes find healthy and unfenced (the most caught-up first). Fenced, it refuses to stamp
/// writes, and as a leader it would also judge the writes its peers forward by its own
/// wrong clock — behind, it refused them all as from the future. Checked every election
/// timeout.
pub async fn fenced_leader_loop(shards: Arc<Shards>) {
    let every = Duration::from_millis(shards.first().shard.config.raft.election_timeout_max_ms);
    loop {
        tokio::time::sleep(every).await;
        if !shards.first().links.fenced() {
            continue;
        }
        // The local prober's latest answers (a fenced peer answered as unhealthy).
        let links = &shards.first().links;
        for c in shards.all().iter().filter(|c| c.shard.is_leader()) {
            let shard = &c.shard;
            if let Some(to) = shard.handover_targets().into_iter().find(|to| links.node_healthy(*to)) {
                tracing::warn!(shard = shard.number, to, "this node's clock is fenced: handing its leadership over");
                let _ = shard.hand_over(to).await;
            }
        }
    }
}
