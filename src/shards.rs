//! The shards a node hosts: one Raft group each (with its state machine, actors and
//! cross-DC side), and which of them holds an entity. Sessions live in the shard of their
//! token, inventory in the shard of its SKU, and an order in its SKU's shard, under an id
//! that leads there ([`crate::ids::order_id`]); every DC has the same shards, so an
//! entity's shard is the same in every DC, and each shard replicates to its namesakes.

use std::sync::Arc;
use std::time::Duration;

use crate::ids::shard_of;
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
        &self.list[usize::from(shard_of(key, self.count()))]
    }

    /// The number of the shard that holds `key`.
    pub fn number_of(&self, key: &str) -> u16 {
        shard_of(key, self.count())
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
