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

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Hlc {
    /// A timestamp later than every one this clock has issued or observed.
    pub fn now(&self) -> u64 {
        let physical = wall_ms() << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last + 1);
            match self.last.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Takes in a timestamp from elsewhere.
    pub fn observe(&self, remote: u64) {
        self.last.fetch_max(remote, Ordering::Relaxed);
    }
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
        let future = (wall_ms() + 60_000) << LOGICAL_BITS;
        c.observe(future);
        assert!(c.now() > future, "after observing a later clock, timestamps follow it");
        assert!(physical_ms(a) <= wall_ms());
    }
}
