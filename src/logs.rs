//! Rate-limited, summarising warnings for events a remote party can cause at will
//! (refused connections, bad frames, refused requests): per key, at most one line per
//! interval, carrying the number of events suppressed since the previous line. A flood
//! then costs a line every few seconds, not a line per packet. Callers log names and
//! counts, never payloads.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// One line per key per this interval, for the process-wide limiter.
pub const INTERVAL: Duration = Duration::from_secs(10);

struct Slot {
    last: Instant,
    suppressed: u64,
}

/// Decides, per key, whether an event gets a log line.
pub struct LogLimiter {
    interval: Duration,
    slots: Mutex<HashMap<&'static str, Slot>>,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        LogLimiter { interval, slots: Mutex::new(HashMap::new()) }
    }

    /// `Some(suppressed)` when this event should be logged, with the number of events of
    /// `key` dropped since the last line; `None` when it is to be dropped (and counted).
    /// Keys are static strings, so the map is bounded by the call sites.
    pub fn check(&self, key: &'static str) -> Option<u64> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &'static str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().expect("log limiter lock");
        match slots.get_mut(key) {
            None => {
                slots.insert(key, Slot { last: now, suppressed: 0 });
                Some(0)
            }
            Some(s) if now.duration_since(s.last) >= self.interval => {
                let n = s.suppressed;
                *s = Slot { last: now, suppressed: 0 };
                Some(n)
            }
            Some(s) => {
                s.suppressed += 1;
                None
            }
        }
    }
}

/// The process-wide limiter behind [`warn_limited!`](crate::warn_limited).
pub static LIMITER: LazyLock<LogLimiter> = LazyLock::new(|| LogLimiter::new(INTERVAL));

/// `warn_limited!(key, fields…, "message")`: `tracing::warn!` at most once per
/// [`INTERVAL`] for `key` (a `&'static str`), with a `suppressed` field counting the
/// events dropped since the previous line.
#[macro_export]
macro_rules! warn_limited {
    ($key:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $crate::logs::LIMITER.check($key) {
            tracing::warn!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_suppressed_count() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let lines: Vec<u64> = (0..100).filter_map(|i| l.check_at("bad_frame", t0 + Duration::from_millis(i * 50))).collect();
        // 100 events over 4.95 s: the first is logged, the other 99 are counted.
        assert_eq!(lines, vec![0]);
        // Another key has its own budget.
        assert_eq!(l.check_at("refused", t0 + Duration::from_secs(1)), Some(0));
        // The first event after the interval carries the count.
        assert_eq!(l.check_at("bad_frame", t0 + Duration::from_secs(10)), Some(99));
        assert_eq!(l.check_at("bad_frame", t0 + Duration::from_secs(11)), None);
        assert_eq!(l.check_at("bad_frame", t0 + Duration::from_secs(20)), Some(1));
    }
}
