//! Where shard replicas go when a node joins or leaves a DC whose shards live on subsets
//! of its nodes (`cluster.replicas`): pure plans over the shards' current voters, run one
//! move at a time by the admin API (`api::admin`) and by the automatic moves off a dead
//! node and onto the least loaded one (`crate::shards`). Shard 0 is on every node and is
//! not planned here.
//!
//! A node leaving hands each of its replicas to the node holding the fewest, among those
//! without one of that shard. A node joining takes replicas from the most loaded nodes
//! until it holds about its share (no move that would leave it holding more than its
//! donor), and first fills any shard that has fewer replicas than wanted.

use std::collections::{BTreeMap, BTreeSet};

use crate::raft::NodeId;

/// One change to one shard's voters: `add` joins (a learner that catches up, then a
/// voter) and `remove` leaves, in one membership change when both are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Move {
    pub shard: u16,
    pub add: Option<NodeId>,
    pub remove: Option<NodeId>,
}

/// Voters of each shard that is placed on a subset (shard 1 and up).
pub type Voters = BTreeMap<u16, BTreeSet<NodeId>>;

/// How many replicas each of `nodes` holds.
pub fn loads(voters: &Voters, nodes: &[NodeId]) -> BTreeMap<NodeId, usize> {
    let mut load: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for v in voters.values().flatten() {
        if let Some(l) = load.get_mut(v) {
            *l += 1;
        }
    }
    load
}

/// The moves that take every replica off `leaving`, each to the least loaded of `nodes`
/// (the DC's members, `leaving` among them or not) that has none of that shard; a shard
/// with no such node just loses the replica.
pub fn moves_off(voters: &Voters, nodes: &[NodeId], leaving: NodeId) -> Vec<Move> {
    let staying: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != leaving).collect();
    let mut load = loads(voters, &staying);
    let mut moves = Vec::new();
    for (shard, members) in voters.iter().filter(|(_, m)| m.contains(&leaving)) {
        let to = load.iter().filter(|(n, _)| !members.contains(n)).min_by_key(|(n, l)| (**l, **n)).map(|(n, _)| *n);
        if let Some(to) = to {
            *load.entry(to).or_default() += 1;
        }
        moves.push(Move { shard: *shard, add: to, remove: Some(leaving) });
    }
    moves
}

/// The moves that give `joining` its share of the replicas: first a replica of every shard
/// with fewer than `wanted`, then, while the most loaded node holds at least two more
/// than `joining`, one of its replicas (of a shard `joining` lacks).
pub fn moves_onto(voters: &Voters, nodes: &[NodeId], joining: NodeId, wanted: usize) -> Vec<Move> {
    let mut nodes: Vec<NodeId> = nodes.to_vec();
    if !nodes.contains(&joining) {
        nodes.push(joining);
    }
    let mut voters = voters.clone();
    let mut load = loads(&voters, &nodes);
    let mut moves = Vec::new();
    for (shard, members) in voters.iter_mut() {
        if members.len() < wanted && members.insert(joining) {
            *load.entry(joining).or_default() += 1;
            moves.push(Move { shard: *shard, add: Some(joining), remove: None });
        }
    }
    loop {
        let mine = load.get(&joining).copied().unwrap_or(0);
        // The most loaded donor, over the shards `joining` lacks (lowest shard, lowest id on ties).
        let best = voters
            .iter()
            .filter(|(_, m)| !m.contains(&joining))
            .flat_map(|(shard, m)| m.iter().map(move |n| (*shard, *n)))
            .max_by_key(|(shard, n)| (load.get(n).copied().unwrap_or(0), std::cmp::Reverse(*shard), std::cmp::Reverse(*n)));
        let Some((shard, donor)) = best else { break };
        if load.get(&donor).copied().unwrap_or(0) < mine + 2 {
            break;
        }
        let members = voters.get_mut(&shard).expect("shard from the map");
        members.remove(&donor);
        members.insert(joining);
        *load.entry(donor).or_default() -= 1;
        *load.entry(joining).or_default() += 1;
        moves.push(Move { shard, add: Some(joining), remove: Some(donor) });
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn voters(list: &[(u16, &[NodeId])]) -> Voters {
        list.iter().map(|(s, m)| (*s, m.iter().copied().collect())).collect()
    }

    fn apply(v: &Voters, moves: &[Move]) -> Voters {
        let mut v = v.clone();
        for m in moves {
            let members = v.get_mut(&m.shard).expect("a planned shard exists");
            if let Some(r) = m.remove {
                assert!(members.remove(&r), "{m:?} removes a voter");
            }
            if let Some(a) = m.add {
                assert!(members.insert(a), "{m:?} adds a node that was not a voter");
            }
        }
        v
    }

    #[test]
    fn a_leaving_node_hands_each_replica_to_the_least_loaded() {
        // Five nodes, five shards of three: node 5 leaves.
        let v = voters(&[(1, &[2, 3, 4]), (2, &[3, 4, 5]), (3, &[4, 5, 1]), (4, &[5, 1, 2]), (5, &[1, 2, 3])]);
        let moves = moves_off(&v, &[1, 2, 3, 4, 5], 5);
        assert_eq!(moves.len(), 3, "{moves:?}");
        let after = apply(&v, &moves);
        assert!(after.values().all(|m| m.len() == 3 && !m.contains(&5)), "{after:?}");
        let load = loads(&after, &[1, 2, 3, 4]);
        assert!(load.values().max() <= Some(&4) && load.values().min() >= Some(&3), "{load:?}");
    }

    #[test]
    fn a_joining_node_takes_its_share_and_no_more() {
        // Four nodes held five shards of three (15 replicas): a fifth takes three.
        let v = voters(&[(1, &[1, 2, 3]), (2, &[2, 3, 4]), (3, &[3, 4, 1]), (4, &[4, 1, 2]), (5, &[1, 2, 3])]);
        let moves = moves_onto(&v, &[1, 2, 3, 4], 5, 3);
        let after = apply(&v, &moves);
        let load = loads(&after, &[1, 2, 3, 4, 5]);
        assert_eq!(load[&5], 3, "{load:?} after {moves:?}");
        assert!(load.values().all(|l| *l == 3), "{load:?}");
        // Already balanced: nothing moves.
        assert_eq!(moves_onto(&after, &[1, 2, 3, 4, 5], 5, 3), vec![]);
    }

    #[test]
    fn a_shard_short_of_replicas_is_filled_first() {
        let v = voters(&[(1, &[1, 2]), (2, &[1, 2, 3])]);
        let moves = moves_onto(&v, &[1, 2, 3], 4, 3);
        assert_eq!(moves[0], Move { shard: 1, add: Some(4), remove: None });
    }

    proptest! {
        /// Off then onto: every shard keeps its replica count, the node that left holds
        /// nothing, and after it joins again no node holding a shard it lacks holds two
        /// more replicas than it does.
        #[test]
        fn plans_keep_counts_and_balance(nodes in 3u64..8, shards in 1u16..12, replicas in 1usize..4, leaving in 0u64..8) {
            let nodes: Vec<NodeId> = (1..=nodes).collect();
            let replicas = replicas.min(nodes.len());
            let leaving = nodes[usize::try_from(leaving).unwrap() % nodes.len()];
            let v: Voters = (1..=shards).map(|s| {
                let start = usize::from(s) % nodes.len();
                (s, (0..replicas).map(|i| nodes[(start + i) % nodes.len()]).collect())
            }).collect();
            let off = apply(&v, &moves_off(&v, &nodes, leaving));
            for (s, m) in &off {
                prop_assert!(!m.contains(&leaving));
                prop_assert_eq!(m.len(), v[s].len().min(nodes.len() - 1));
            }
            let staying: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != leaving).collect();
            let back = apply(&off, &moves_onto(&off, &staying, leaving, replicas));
            let load = loads(&back, &nodes);
            prop_assert!(back.values().all(|m| m.len() == replicas));
            let mine = load[&leaving];
            let donors = back.values().filter(|m| !m.contains(&leaving)).flatten().map(|n| load[n]);
            prop_assert!(donors.max().unwrap_or(0) <= mine + 1, "{:?}", load);
        }
    }
}
