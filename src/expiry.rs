//! Expiry of idempotency records and sessions. `domain::apply` has no clock, so time
//! enters here: every `expiry_interval_ms` the DC leader (`shard::background`) turns its HLC and the configured
//! TTLs into two cutoffs and proposes a `Command::Expire` through Raft. Every replica then
//! removes exactly the same records (oldest first, at most `expiry_batch_len_max` of each
//! kind), and sessions are tombstoned by the DC that wrote their current version, so the
//! tombstones replicate to every DC like a logout (see ARCHITECTURE.md, "Expiry").

use crate::config::Limits;
use crate::domain::Command;
use crate::hlc;

/// The cutoffs of a pass at HLC `now`: records written before `now - ttl`.
pub fn cutoff(now: u64, ttl_s: u64) -> u64 {
    hlc::from_physical_ms(hlc::physical_ms(now).saturating_sub(ttl_s.saturating_mul(1000)))
}

/// The command of one pass at HLC `now` by `dc`'s leader, with the configured TTLs.
pub fn pass(l: &Limits, dc: &str, now: u64) -> Command {
    Command::Expire {
        idempotency_before: cutoff(now, l.idempotency_ttl_s),
        sessions_before: cutoff(now, l.session_ttl_s),
        batch_len_max: l.expiry_batch_len_max,
        dc: dc.to_string(),
        hlc: now,
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
