//! Hybrid logical clock: wall-clock milliseconds in the high 48 bits, a logical counter in
//! the low 16. Timestamps from one node only grow, and a node that has seen a timestamp
//! from another DC issues later ones after it — so last-writer-wins follows causality
//! even when clocks disagree.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

const LOGICAL_BITS: u32 = 16;

/// The largest clock skew the test hook sets: a day either way.
pub const SKEW_MS_MAX: i64 = 86_400_000;

/// Added to the system clock for everything this process reads as wall time: the test
/// hook that makes one node's clock run ahead or behind (a node is a process). Zero
/// unless `PUT /v1/admin/clock` set it.
static SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Sets the test skew; refused beyond [`SKEW_MS_MAX`] either way.
pub fn set_skew_ms(ms: i64) -> Result<(), String> {
    if ms.checked_abs().is_none_or(|a| a > SKEW_MS_MAX) {
        return Err(format!("skew_ms must be within ±{SKEW_MS_MAX}"));
    }
    SKEW_MS.store(ms, Ordering::Relaxed);
    Ok(())
}

pub fn skew_ms() -> i64 {
    SKEW_MS.load(Ordering::Relaxed)
}

#[derive(Default)]
pub struct Hlc {
    last: AtomicU64,
}

/// This node's wall clock, in milliseconds since the epoch (with the test skew, if set).
pub fn wall_ms() -> u64 {
    let system = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let system = u64::try_from(system).unwrap_or(u64::MAX);
    system.saturating_add_signed(skew_ms())
}

impl Hlc {
    /// A timestamp later than every one this clock has issued or observed.
    pub fn now(&self) -> u64 {
        let physical = wall_ms() << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last.saturating_add(1));
            match self.last.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Takes in a timestamp from elsewhere, unless it is more than `max_offset_ms` ahead
    /// of this node's wall clock: a peer must not push every later timestamp of this node
    /// (and so every last-writer-wins decision) into the future.
    pub fn observe(&self, remote: u64, max_offset_ms: u64) -> Result<(), String> {
        check("observed", remote, wall_ms(), max_offset_ms)?;
        self.last.fetch_max(remote, Ordering::Relaxed);
        Ok(())
    }
}

/// A timestamp at most `max_offset_ms` ahead of `now_ms` (this node's wall clock).
pub fn check(what: &str, ts: u64, now_ms: u64, max_offset_ms: u64) -> Result<(), String> {
    let ahead = physical_ms(ts).saturating_sub(now_ms);
    if ahead > max_offset_ms {
        return Err(format!("{what} timestamp is {ahead} ms ahead of this node's clock (replication.max_clock_offset_ms = {max_offset_ms})"));
    }
    Ok(())
}

/// The wall-clock milliseconds of a timestamp.
pub fn physical_ms(ts: u64) -> u64 {
    ts >> LOGICAL_BITS
}

/// The smallest timestamp of a wall-clock millisecond.
pub fn from_physical_ms(ms: u64) -> u64 {
    ms << LOGICAL_BITS
}

/// Milliseconds from a timestamp to now (0 if it is in the future).
pub fn age_ms(ts: u64) -> u64 {
    wall_ms().saturating_sub(physical_ms(ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_causal() {
        let c = Hlc::default();
        let a = c.now();
        let b = c.now();
        assert!(b > a);
        let future = (wall_ms() + 300) << LOGICAL_BITS;
        c.observe(future, 500).expect("within the offset");
        assert!(c.now() > future, "after observing a later clock, timestamps follow it");
        let far = (wall_ms() + 60_000) << LOGICAL_BITS;
        assert!(c.observe(far, 500).is_err());
        assert!(c.observe(u64::MAX, 500).is_err());
        assert!(c.now() < far, "a refused timestamp is not observed");
        assert!(physical_ms(a) <= wall_ms());
    }
}
