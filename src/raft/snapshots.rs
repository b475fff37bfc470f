//! When this node builds a snapshot. openraft's own policy (every N entries) has every node
//! of a DC build at the same entry: all three copy and write the whole state at once, the
//! leader with them, and the DC's writes slow down together (seen as a 2–3 s dip of a
//! third of the throughput with p99 up to four times its usual, `agora bench --timeline`).
//! Here, with
//! openraft's policy off:
//! - the DC's nodes wait 1, 1.25 and 1.5 × `snapshot_logs_since_last` entries (by their
//!   place in the cluster file), so their builds drift apart and rarely overlap: while one
//!   follower builds, the leader and the other follower still form a quorum at full speed;
//! - the leader, whose CPU serves every request, waits twice as long as it would as a
//!   follower, so most builds happen off the request path.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use crate::node::Node;

/// Entries since the last snapshot after which a node builds one.
pub fn threshold(base: u64, rank: u64, leader: bool) -> u64 {
    let staggered = base + base * rank / 4;
    if leader {
        2 * staggered
    } else {
        staggered
    }
}

/// Asks openraft for a snapshot whenever this node's log since the last one passes its
/// threshold. openraft ignores a request while a build runs, so asking again is harmless.
pub async fn snapshot_loop(node: Arc<Node>) {
    let base = node.config.raft.snapshot_logs_since_last;
    let rank = node.config.dc_nodes(&node.info.dc).iter().position(|n| n.id == node.info.id).unwrap_or(0) as u64;
    let mut metrics = node.raft.metrics();
    loop {
        let (since, leader) = {
            let m = metrics.borrow_and_update();
            let applied = m.last_applied.map_or(0, |l| l.index);
            let snapshot = m.snapshot.map_or(0, |l| l.index);
            (applied.saturating_sub(snapshot), m.state == ServerState::Leader)
        };
        if since >= threshold(base, rank, leader) {
            if let Err(e) = node.raft.trigger().snapshot().await {
                tracing::debug!(error = %e, "snapshot request refused");
            }
            // Give the build time to start before asking again.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Woken by every applied entry; the timeout only bounds a missed change.
        if tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await.is_ok_and(|r| r.is_err()) {
            return; // Raft stopped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_wait_staggered_and_the_leader_twice_as_long() {
        assert_eq!([0, 1, 2].map(|r| threshold(5000, r, false)), [5000, 6250, 7500]);
        assert_eq!([0, 1, 2].map(|r| threshold(5000, r, true)), [10000, 12500, 15000]);
        // Whatever its place, the leader waits longer than any follower.
        for base in [1, 50, 5000] {
            assert!((0..3).all(|r| threshold(base, r, true) > threshold(base, 2, false)), "base {base}");
        }
    }
}
