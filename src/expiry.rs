//! Expiry of idempotency records and sessions. `domain::apply` has no clock, so time
//! enters here: every `expiry_interval_ms` the DC leader turns its HLC and the configured
//! TTLs into two cutoffs and proposes a `Command::Expire` through Raft. Every replica then
//! removes exactly the same records (oldest first, at most `expiry_batch_len_max` of each
//! kind), and sessions are tombstoned by the DC that wrote their current version, so the
//! tombstones replicate to every DC like a logout (see ARCHITECTURE.md, "Expiry").

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Command, Outcome, Request};
use crate::hlc;
use crate::node::Node;

/// The cutoffs of a pass at HLC `now`: records written before `now - ttl`.
pub fn cutoff(now: u64, ttl_s: u64) -> u64 {
    hlc::from_physical_ms(hlc::physical_ms(now).saturating_sub(ttl_s.saturating_mul(1000)))
}

/// The command of one pass at HLC `now`, from this node's config.
pub fn pass(node: &Node, now: u64) -> Command {
    let l = &node.config.limits;
    Command::Expire {
        idempotency_before: cutoff(now, l.idempotency_ttl_s),
        sessions_before: cutoff(now, l.session_ttl_s),
        batch_len_max: l.expiry_batch_len_max,
        dc: node.info.dc.clone(),
        hlc: now,
    }
}

/// While leader, proposes a pass every interval; at once again after a full pass (more
/// records were due than one pass removes).
pub async fn expiry_loop(node: Arc<Node>) {
    let interval = Duration::from_millis(node.config.limits.expiry_interval_ms);
    let max = node.config.limits.expiry_batch_len_max;
    let mut full = false;
    loop {
        if !full {
            tokio::time::sleep(interval).await;
        }
        full = false;
        if !node.is_leader() {
            continue;
        }
        match node.actors.submit(Request::new(pass(&node, node.hlc.now()), None)).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_is_ttl_before_now_and_never_wraps() {
        let now = hlc::from_physical_ms(10_000) + 5;
        assert_eq!(cutoff(now, 3), hlc::from_physical_ms(7_000));
        assert_eq!(cutoff(now, 3600), 0, "a TTL longer than the clock: nothing is due");
    }
}
