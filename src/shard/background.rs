//! What a shard does by itself, on every node that hosts it: build snapshots when its
//! log has grown enough, and — on the leader — propose the expiry passes and hand
//! leadership back to the node meant to lead the shard.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;

use super::Shard;
use crate::domain::{Outcome, Request};
use crate::hlc::Hlc;
use crate::raft::snapshots::{due, due_while_catching_up};

/// How long after its last apply of a backlog a node still counts as catching up.
const CATCH_UP_QUIET: Duration = Duration::from_secs(5);

/// Asks openraft for a snapshot whenever this node's log since the last one passes its
/// threshold (`raft::snapshots`). openraft ignores a request while a build runs, so
/// asking again is harmless.
pub async fn snapshot_loop(shard: Arc<Shard>) {
    let raft = shard.config.raft.clone();
    let rank = shard.config.dc_nodes(&shard.dc).iter().position(|n| n.id == shard.me).unwrap_or(0);
    let rank = u64::try_from(rank).unwrap_or(u64::MAX);
    let mut metrics = shard.raft.metrics();
    // The backlog applies counted when last seen to grow, and when.
    let mut backlog: (u64, Option<std::time::Instant>) = (0, None);
    loop {
        let (since, leader) = {
            let m = metrics.borrow_and_update();
            let applied = m.last_applied.map_or(0, |l| l.index);
            let snapshot = m.snapshot.map_or(0, |l| l.index);
            (applied.saturating_sub(snapshot), m.state == ServerState::Leader)
        };
        let stats = shard.sm.snapshot_stats();
        if stats.catch_up_applies != backlog.0 {
            backlog = (stats.catch_up_applies, Some(std::time::Instant::now()));
        }
        let rule = if backlog.1.is_some_and(|t| t.elapsed() < CATCH_UP_QUIET) { due_while_catching_up } else { due };
        if rule(since, stats.writes_since, stats.records, &raft, rank, leader) {
            if let Err(e) = shard.raft.trigger().snapshot().await {
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

/// While leader, proposes an expiry pass (`expiry`) every interval; at once again after
/// a full pass (more records were due than one pass removes).
pub async fn expiry_loop(shard: Arc<Shard>, hlc: Arc<Hlc>) {
    let limits = &shard.config.limits;
    let interval = Duration::from_millis(limits.expiry_interval_ms);
    let max = limits.expiry_batch_len_max;
    let mut full = false;
    loop {
        if !full {
            tokio::time::sleep(interval).await;
        }
        full = false;
        if !shard.is_leader() {
            continue;
        }
        let cmd = crate::expiry::pass(limits, &shard.dc, hlc.now());
        match shard.actors.submit(Request::new(cmd, None)).await {
            Ok(Outcome::Expired { idempotency, duplicates, sessions }) => {
                if idempotency + duplicates + sessions > 0 {
                    tracing::info!(idempotency, duplicates, sessions, "expired records");
                }
                full = idempotency == max || duplicates == max || sessions == max;
            }
            other => tracing::debug!(?other, "expiry pass failed"),
        }
    }
}

/// Leaders spread again after failovers: every `leader_balance_interval_ms`, the leader of
/// a shard that another node is meant to lead (`Shard::preferred_leader`) hands it over
/// once that node is a voter holding nearly all of the log and answers its clock probe
/// unfenced, and the shard has had the same term for two intervals (a node that just
/// came back, or a DC that just elected, is left to settle). One shard of a DC: nothing
/// to spread.
pub async fn leader_balance_loop(shard: Arc<Shard>) {
    let interval = Duration::from_millis(shard.config.raft.leader_balance_interval_ms);
    if interval.is_zero() || shard.config.cluster.shards < 2 {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    let (mut term, mut since) = (0, tokio::time::Instant::now());
    loop {
        ticker.tick().await;
        let m = shard.raft.metrics().borrow().clone();
        if m.current_term != term {
            (term, since) = (m.current_term, tokio::time::Instant::now());
            continue;
        }
        let Some(preferred) = shard.preferred_leader().filter(|p| *p != shard.me) else { continue };
        if m.state != ServerState::Leader || since.elapsed() < 2 * interval || !shard.nearly_caught_up(preferred) || !shard.peer_fit(preferred).await {
            continue;
        }
        if let Err(e) = shard.hand_over(preferred).await {
            tracing::info!(shard = shard.number, to = preferred, error = %e, "leader balance: handover not done");
        }
    }
}

/// One log line whenever this node's Raft role or term in the shard changes: elections
/// are rare events an operator wants in the log with their time, and a line per change
/// cannot flood (a term lasts at least an election timeout).
pub async fn role_log_loop(shard: Arc<Shard>) {
    let mut rx = shard.raft.metrics();
    let mut last = (0, ServerState::Learner);
    let mut since = tokio::time::Instant::now();
    loop {
        let (now, leader) = {
            let m = rx.borrow_and_update();
            ((m.current_term, m.state), m.current_leader)
        };
        if now != last {
            let held_ms = since.elapsed().as_millis() as u64;
            tracing::info!(shard = shard.number, term = now.0, state = ?now.1, ?leader, previous_held_ms = held_ms, "raft role changed");
            (last, since) = (now, tokio::time::Instant::now());
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Every two election timeouts, a node that campaigns or learns in the shard without
/// hearing a leader asks whether the leader still counts it (`Shard::check_still_member`):
/// how a node whose replica moved elsewhere finds out.
pub async fn membership_check_loop(shard: Arc<Shard>) {
    let every = Duration::from_millis(2 * shard.config.raft.election_timeout_max_ms);
    loop {
        tokio::time::sleep(every).await;
        shard.check_still_member(false).await;
    }
}
