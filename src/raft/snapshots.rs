//! When this node builds a snapshot. openraft's own policy (every N entries) has every node
//! of a DC build at the same entry: all three copy and write the whole state at once, the
//! leader with them, and the DC's writes slow down together (seen as a 2–3 s dip of a
//! third of the throughput with p99 up to four times its usual, `agora bench --timeline`).
//! Here, with openraft's policy off, a node builds once both hold:
//! - at least `snapshot_logs_since_last` entries since its last snapshot, and
//! - at least `snapshot_state_ratio_percent` % of the state's records (as counted by the
//!   last snapshot built or installed) in client writes since it.
//!
//! The second part keeps the cost of snapshots per write constant as the state grows: a
//! build copies every record, and it happens at most once per `ratio × records` writes,
//! so each write pays for at most `1 / ratio` record copies on each node (4 at 25 %),
//! whether the state holds a thousand records or ten million. Counted in writes, not
//! entries: one entry carries up to `proposal_batch_len_max` client requests.
//!
//! Both thresholds are staggered the same way:
//! - the DC's nodes wait 1, 1.25 and 1.5 × the threshold (by their place in the cluster
//!   file), so their builds drift apart and rarely overlap: while one follower builds,
//!   the leader and the other follower still form a quorum at full speed;
//! - the leader, whose CPU serves every request, waits twice as long as it would as a
//!   follower, so most builds happen off the request path.
//!
//! Bound on the log: a node's log since its last snapshot holds at most 3 × max(entries
//! threshold, writes threshold) entries (leader, last rank) plus the build in progress,
//! and `logs_to_keep_after_snapshot` behind it: with the defaults, at most 0.75 × the
//! state's records in client writes, or 15,000 entries while the state is small. A node
//! replaying a backlog waits twice as long (`due_while_catching_up`), so its log may
//! hold twice that while it catches up.

/// `base` staggered by the node's place in the DC and its role: 1, 1.25 or 1.5 × it,
/// twice that on the leader. Saturates instead of overflowing.
pub fn threshold(base: u64, rank: u64, leader: bool) -> u64 {
    let base = u128::from(base);
    let staggered = base + base * u128::from(rank) / 4;
    let t = if leader { 2 * staggered } else { staggered };
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// Client writes to wait for since the last snapshot, before the stagger: `percent` % of
/// the state's `records`. Saturates instead of overflowing.
pub fn writes_base(records: u64, percent: u64) -> u64 {
    u64::try_from(u128::from(records) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

/// The whole rule: whether a node that has applied `entries` entries and `writes` client
/// writes since its last snapshot, of a state of `records` records, builds one now.
pub fn due(entries: u64, writes: u64, records: u64, raft: &crate::config::RaftSection, rank: u64, leader: bool) -> bool {
    entries >= threshold(raft.snapshot_logs_since_last, rank, leader)
        && writes >= threshold(writes_base(records, raft.snapshot_state_ratio_percent), rank, leader)
}

/// The rule for a node replaying a backlog (restarted, or rejoining after a snapshot
/// install): it waits for twice its thresholds. A build then would copy the whole state
/// while the replay rewrites it, on the same cores: a rejoin after 8.7 M orders spent
/// 77 s of its 148 s replay beside its own build, whose pre-images of the keys the replay
/// wrote also took the node over its memory bound. Twice, not forever, so that the log of
/// a node that never catches up stays bounded.
pub fn due_while_catching_up(entries: u64, writes: u64, records: u64, raft: &crate::config::RaftSection, rank: u64, leader: bool) -> bool {
    due(entries / 2, writes / 2, records, raft, rank, leader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RaftSection;

    #[test]
    fn nodes_wait_staggered_and_the_leader_twice_as_long() {
        assert_eq!([0, 1, 2].map(|r| threshold(5000, r, false)), [5000, 6250, 7500]);
        assert_eq!([0, 1, 2].map(|r| threshold(5000, r, true)), [10000, 12500, 15000]);
        // Whatever its place, the leader waits longer than any follower.
        for base in [1, 50, 5000] {
            assert!((0..3).all(|r| threshold(base, r, true) > threshold(base, 2, false)), "base {base}");
        }
    }

    #[test]
    fn a_small_state_builds_every_base_entries() {
        let raft = RaftSection { snapshot_logs_since_last: 5000, snapshot_state_ratio_percent: 25, ..Default::default() };
        // 10,000 records: the writes threshold (2,500) is below one entry per write.
        assert!(!due(4999, 4999, 10_000, &raft, 0, false));
        assert!(due(5000, 5000, 10_000, &raft, 0, false));
        // No snapshot yet (0 records known): entries alone decide.
        assert!(due(5000, 0, 0, &raft, 0, false));
        assert!(!due(14_999, 0, 0, &raft, 2, true));
        assert!(due(15_000, 0, 0, &raft, 2, true));
    }

    #[test]
    fn a_large_state_waits_for_writes_in_proportion_to_it() {
        let raft = RaftSection { snapshot_logs_since_last: 5000, snapshot_state_ratio_percent: 25, ..Default::default() };
        // A million records want 250,000 writes, however many entries carried them.
        assert!(!due(50_000, 249_999, 1_000_000, &raft, 0, false));
        assert!(due(5_000, 250_000, 1_000_000, &raft, 0, false));
        // And never fewer entries than the base.
        assert!(!due(4_999, 1_000_000, 1_000_000, &raft, 0, false));
        // Staggered like the entries threshold: 1.5 × on the last rank, twice on the leader.
        assert!(!due(10_000, 374_999, 1_000_000, &raft, 2, false));
        assert!(due(10_000, 375_000, 1_000_000, &raft, 2, false));
        assert!(!due(20_000, 749_999, 1_000_000, &raft, 2, true));
        assert!(due(20_000, 750_000, 1_000_000, &raft, 2, true));
        // The work per write stays constant: builds per write fall as the state grows,
        // in inverse proportion to it (records copied per write = records / interval).
        for records in [100_000u64, 1_000_000, 10_000_000] {
            let interval = threshold(writes_base(records, 25), 0, false);
            assert_eq!(records / interval, 4, "records {records}");
        }
    }

    #[test]
    fn a_node_catching_up_waits_twice_as_long_and_no_longer() {
        let raft = RaftSection { snapshot_logs_since_last: 5000, snapshot_state_ratio_percent: 25, ..Default::default() };
        assert!(due(5_000, 250_000, 1_000_000, &raft, 0, false));
        assert!(!due_while_catching_up(5_000, 250_000, 1_000_000, &raft, 0, false));
        assert!(!due_while_catching_up(10_000, 499_999, 1_000_000, &raft, 0, false));
        assert!(due_while_catching_up(10_000, 500_000, 1_000_000, &raft, 0, false));
        assert!(!due_while_catching_up(29_999, 1_500_000, 1_000_000, &raft, 2, true));
        assert!(due_while_catching_up(30_000, 1_500_000, 1_000_000, &raft, 2, true));
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        assert_eq!(threshold(u64::MAX, 2, true), u64::MAX);
        assert_eq!(threshold(u64::MAX, 0, false), u64::MAX);
        assert_eq!(writes_base(u64::MAX, 100), u64::MAX);
        assert_eq!(writes_base(u64::MAX, 25), u64::MAX / 4);
        assert_eq!(writes_base(u64::MAX, u64::MAX), u64::MAX);
        let raft = RaftSection { snapshot_logs_since_last: u64::MAX, snapshot_state_ratio_percent: u64::MAX, ..Default::default() };
        assert!(due(u64::MAX, u64::MAX, u64::MAX, &raft, 2, true));
        assert!(!due(u64::MAX - 1, u64::MAX, u64::MAX, &raft, 2, true));
    }
}
