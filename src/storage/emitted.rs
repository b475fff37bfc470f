//! When this replica applied its DC's outbox events: where the shipper's measure of
//! cross-DC lag starts. The events themselves carry the time their request arrived, which
//! also counts the origin's own queueing and commit; this is the origin's commit (as
//! applied here), so "commit here → acknowledged by the other DC's commit" is read on one
//! clock. In memory only, and bounded: a restarted node, or events older than the last
//! [`RECORDS_MAX`] applies, are simply not measured.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Applies remembered; each covers every event one `apply` call emitted.
pub const RECORDS_MAX: usize = 65_536;

/// One `apply` call's events: seqs `first..=last`, applied at `at`.
#[derive(Debug, Clone, Copy)]
struct Applied {
    first: u64,
    last: u64,
    at: Instant,
}

#[derive(Default)]
pub struct EmittedAt {
    // std Mutex: held to push or to look up, never across an await. Seqs ascend.
    records: Mutex<VecDeque<Applied>>,
}

impl EmittedAt {
    /// Events `first..=last` were applied (committed to the state) at `at`.
    pub fn record(&self, first: u64, last: u64, at: Instant) {
        if first > last {
            return;
        }
        let mut records = self.records.lock().expect("emitted-at lock");
        // Seqs went back (a snapshot installed an older state): what we knew is void.
        if records.back().is_some_and(|r| r.last >= first) {
            records.clear();
        }
        if records.len() == RECORDS_MAX {
            records.pop_front();
        }
        records.push_back(Applied { first, last, at });
    }

    /// For each event `from..=to` whose apply is remembered, milliseconds from its apply
    /// to `now` (at most [`RECORDS_MAX`] of the newest of them).
    pub fn ages_ms(&self, from: u64, to: u64, now: Instant) -> Vec<u64> {
        if from > to {
            return Vec::new();
        }
        let records = self.records.lock().expect("emitted-at lock");
        let start = records.partition_point(|r| r.last < from);
        let end = records.partition_point(|r| r.first <= to);
        // Newest first, so that the cap keeps the newest; reversed at the end.
        let mut ages = Vec::new();
        for r in records.range(start..end.max(start)).rev() {
            let ms = u64::try_from(now.saturating_duration_since(r.at).as_millis()).unwrap_or(u64::MAX);
            let (lo, hi) = (r.first.max(from), r.last.min(to));
            let room = RECORDS_MAX - ages.len();
            let n = usize::try_from((hi - lo).saturating_add(1)).unwrap_or(usize::MAX).min(room);
            ages.extend(std::iter::repeat_n(ms, n));
            if ages.len() == RECORDS_MAX {
                break;
            }
        }
        ages.reverse();
        ages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_event_is_aged_from_the_apply_that_emitted_it() {
        let e = EmittedAt::default();
        let t0 = Instant::now();
        e.record(1, 3, t0);
        e.record(4, 4, t0 + Duration::from_millis(10));
        e.record(6, 7, t0 + Duration::from_millis(25)); // 5 was never applied here
        let now = t0 + Duration::from_millis(40);
        assert_eq!(e.ages_ms(1, 7, now), vec![40, 40, 40, 30, 15, 15]);
        assert_eq!(e.ages_ms(3, 4, now), vec![40, 30], "a range cut inside a record");
        assert_eq!(e.ages_ms(5, 5, now), Vec::<u64>::new(), "unknown events are not measured");
        assert_eq!(e.ages_ms(8, 100, now), Vec::<u64>::new());
        assert_eq!(e.ages_ms(2, 1, now), Vec::<u64>::new(), "an empty range");
    }

    #[test]
    fn bounded_and_reset_when_seqs_go_back() {
        let e = EmittedAt::default();
        let t0 = Instant::now();
        for s in 1..=(RECORDS_MAX as u64 + 5) {
            e.record(s, s, t0);
        }
        assert_eq!(e.records.lock().unwrap().len(), RECORDS_MAX);
        assert!(e.ages_ms(1, 5, t0).is_empty(), "the oldest were forgotten");
        assert_eq!(e.ages_ms(6, 6, t0), vec![0]);
        e.record(3, 4, t0); // an older state installed
        assert_eq!(e.records.lock().unwrap().len(), 1);
        assert_eq!(e.ages_ms(1, u64::MAX, t0 + Duration::from_millis(2)), vec![2, 2]);
        // A huge range is capped, not allocated.
        e.record(10, u64::MAX - 1, t0);
        assert_eq!(e.ages_ms(0, u64::MAX, t0).len(), RECORDS_MAX);
    }
}
