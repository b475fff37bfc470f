//! The shards a node hosts: one Raft group each (with its state machine, actors and
//! cross-DC side), and which of them holds an entity. Sessions live in the shard of their
//! token, inventory in the shard of its SKU, and an order in its SKU's shard, under an id
//! that leads there ([`crate::ids::order_id`]); every DC has the same shards, so an
//! entity's shard is the same in every DC, and each shard replicates to its namesakes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    /// The shards entities live in (see [`Shards::spread`]) but `except`.
    pub fn entity_shards_but(&self, except: u16) -> impl Iterator<Item = &Arc<CrossDc>> {
        let first = self.spread().first;
        self.list.iter().filter(move |c| c.shard.number != except && c.shard.number >= first)
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
        self.count() > 1 && shard.replica_session(token).is_some_and(|s| s.deleted)
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
                let moves = placement::moves_onto(&self.data_voters(true).await?, &nodes, id, wanted);
                self.run_moves(&moves, false).await?;
                Ok(Changed { voters, moves })
            }
            MembershipOp::Remove(id) | MembershipOp::ForceRemove(id) => {
                let nodes: Vec<NodeId> = first.members().await?.voters.into_iter().collect();
                let moves = placement::moves_off(&self.data_voters(true).await?, &nodes, id);
                self.run_moves(&moves, matches!(op, MembershipOp::ForceRemove(_))).await?;
                let voters = first.change_membership(op).await?;
                Ok(Changed { voters, moves })
            }
            MembershipOp::Replace { .. } => Err(NodeError::BadRequest("a replacement is made shard by shard".into())),
        }
    }

    /// The voters of every shard but shard 0, from their leaders; unless `strict`, a
    /// shard whose leader cannot say (none now) is left out rather than failing all.
    async fn data_voters(&self, strict: bool) -> Result<placement::Voters, NodeError> {
        let mut out = placement::Voters::new();
        for c in &self.all()[1..] {
            match c.shard.members().await {
                Ok(m) => {
                    out.insert(c.shard.number, m.voters);
                }
                Err(e) if strict => return Err(e),
                Err(_) => {}
            }
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

/// For an automatic move waiting `after_s` (0: off): the wait, and how often its loop
/// looks (two election timeouts); `None` when there is nothing to move — the move is off,
/// every node holds every shard, or there is one shard.
fn automatic_moves(shards: &Shards, after_s: u32) -> Option<(Duration, Duration)> {
    let config = &shards.first().shard.config;
    if after_s == 0 || config.cluster.replicas == 0 || shards.count() == 1 {
        return None;
    }
    Some((Duration::from_secs(after_s.into()), Duration::from_millis(config.raft.election_timeout_max_ms.saturating_mul(2))))
}

/// With shards on subsets (`cluster.replicas`): a node that has failed every probe for
/// `cluster.replace_dead_after_s` counts as dead, and each shard this node leads that
/// has it among its voters gets a healthy node in its place (learner, caught up, voter,
/// then the dead one out), so the shard is back to its copies without an operator. One
/// move per shard per round; a move that fails is tried again next round.
pub async fn replace_dead_loop(shards: Arc<Shards>) {
    let Some((after, every)) = automatic_moves(&shards, shards.first().shard.config.cluster.replace_dead_after_s) else { return };
    loop {
        tokio::time::sleep(every).await;
        for c in shards.all()[1..].iter().filter(|c| c.shard.is_leader()) {
            if let Err(e) = shards.replace_dead_replica(c.shard.number, after).await {
                crate::warn_limited!("replace_dead", shard = c.shard.number, error = %e, "could not move a dead node's replica");
            }
        }
    }
}

impl Shards {
    /// Moves the replica of a voter of `shard` that has failed its probes for `after` to
    /// the least loaded healthy member of the DC holding none of the shard. Nothing when
    /// no voter is dead, or no healthy node can take it (the replica stays: a shard short
    /// of a copy is better than one with fewer).
    async fn replace_dead_replica(&self, shard: u16, after: Duration) -> Result<(), NodeError> {
        let links = &self.first().links;
        let dead = |n: NodeId| links.failing_for(n).is_some_and(|d| d >= after);
        let own = self.list[usize::from(shard)].shard.members().await?.voters;
        let Some(gone) = own.iter().copied().find(|n| dead(*n)) else { return Ok(()) };
        // Who may take it: the DC's members that answer their probes.
        let members = self.first().shard.members().await?.voters;
        let candidates: Vec<NodeId> = members.into_iter().filter(|n| *n == gone || links.node_healthy(*n)).collect();
        // Every shard's voters weigh the choice; a shard that cannot say (no leader
        // now) counts as holding nothing.
        let mut voters = self.data_voters(false).await?;
        voters.insert(shard, own);
        let Some(m) = placement::moves_off(&voters, &candidates, gone).into_iter().find(|m| m.shard == shard && m.add.is_some()) else {
            crate::warn_limited!("replace_dead_none", shard, node = gone, "a dead node's replica has no healthy node to go to");
            return Ok(());
        };
        let failing_ms = links.failing_for(gone).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        tracing::warn!(shard, dead = gone, to = ?m.add, failing_ms, "moving a dead node's replica");
        self.run_moves(&[m], false).await
    }
}

/// With shards on subsets (`cluster.rebalance_after_s`): on the node that leads shard 0,
/// every two election timeouts, the first move of the plan that gives the DC's least
/// loaded healthy member its share (`placement::moves_onto`: a shard short of copies
/// first, then a replica of the most loaded node while it holds two more). Once the same
/// move has been the plan for `rebalance_after_s` it is made: a node back from the dead
/// gets replicas again, but a node that comes and goes, or a DC in the middle of an
/// operator's moves, changes the plan and resets the wait.
pub async fn rebalance_loop(shards: Arc<Shards>) {
    let Some((after, every)) = automatic_moves(&shards, shards.first().shard.config.cluster.rebalance_after_s) else { return };
    let mut planned: Option<(Move, Instant)> = None;
    loop {
        tokio::time::sleep(every).await;
        let next = match shards.first().shard.is_leader() {
            true => shards.rebalancing_move().await.unwrap_or(None),
            false => None,
        };
        planned = match (planned, next) {
            (Some((p, since)), Some(m)) if p == m => Some((p, since)),
            (_, m) => m.map(|m| (m, Instant::now())),
        };
        let Some((m, since)) = planned else { continue };
        if since.elapsed() < after {
            continue;
        }
        tracing::info!(shard = m.shard, add = ?m.add, remove = ?m.remove, "rebalancing a replica");
        if let Err(e) = shards.run_moves(&[m], false).await {
            crate::warn_limited!("rebalance", shard = m.shard, error = %e, "could not rebalance a replica");
        }
        planned = None;
    }
}

impl Shards {
    /// The first move that evens out the DC's replicas, onto its least loaded healthy
    /// member; `None` when they are even. Every shard must answer: a plan made without one
    /// shard's voters could move a replica where it is not needed.
    async fn rebalancing_move(&self) -> Result<Option<Move>, NodeError> {
        let links = &self.first().links;
        let members = self.first().shard.members().await?.voters;
        let healthy: Vec<NodeId> = members.into_iter().filter(|n| links.node_healthy(*n)).collect();
        let voters = self.data_voters(true).await?;
        let wanted = usize::from(self.first().shard.config.cluster.replicas).min(healthy.len());
        let load = placement::loads(&voters, &healthy);
        let Some(joining) = load.iter().min_by_key(|(n, l)| (**l, **n)).map(|(n, _)| *n) else { return Ok(None) };
        Ok(placement::moves_onto(&voters, &healthy, joining, wanted).into_iter().next())
    }
}
