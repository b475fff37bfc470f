//! Hybrid logical clock: wall-clock milliseconds in the high 48 bits, a logical counter in
//! the low 16. Timestamps from one node only grow, and a node that has seen a timestamp
//! from another DC issues later ones after it — so last-writer-wins follows causality
//! even when clocks disagree.

use std::sync::atomic::{AtomicU64, Ordering};

const LOGICAL_BITS: u32 = 16;

#[derive(Default)]
pub struct Hlc {
    last: AtomicU64,
}

/// This node's wall clock, in milliseconds since the epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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
