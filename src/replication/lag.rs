//! Exact replication lag per event, kept for the last [`SAMPLES_MAX`] events of each
//! origin: from the event's timestamp in its origin DC to its commit here. The
//! Prometheus histogram gives the same lag in buckets for dashboards; these samples give
//! exact percentiles for a benchmark window (`GET /v1/cluster/lag?window_s=N`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Samples kept per origin DC: at 10,000 events/s, the last 6.5 s of them.
pub const SAMPLES_MAX: usize = 65_536;

#[derive(Default)]
pub struct LagSamples {
    // std Mutex: held to push or copy, never across an await.
    by_origin: Mutex<BTreeMap<String, VecDeque<(Instant, u64)>>>,
}

/// Exact order statistics of the lags in a window, in ms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LagSummary {
    pub events: usize,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl LagSamples {
    /// Records the lags of events `origin` applied here just now.
    pub fn record(&self, origin: &str, lags_ms: impl IntoIterator<Item = u64>) {
        let now = Instant::now();
        let mut by_origin = self.by_origin.lock().expect("lag samples lock");
        let ring = by_origin.entry(origin.to_string()).or_default();
        for lag in lags_ms {
            if ring.len() == SAMPLES_MAX {
                ring.pop_front();
            }
            ring.push_back((now, lag));
        }
    }

    /// The lags recorded in the last `window`, per origin.
    fn within(&self, window: Duration, into: &mut BTreeMap<String, Vec<u64>>) {
        let now = Instant::now();
        let by_origin = self.by_origin.lock().expect("lag samples lock");
        for (origin, ring) in by_origin.iter() {
            into.entry(origin.clone()).or_default().extend(ring.iter().filter(|(at, _)| now.duration_since(*at) <= window).map(|(_, l)| *l));
        }
    }
}

/// One summary per origin over the samples of several recorders (a node's shards).
pub fn summary_over<'a>(all: impl IntoIterator<Item = &'a LagSamples>, window: Duration) -> BTreeMap<String, LagSummary> {
    let mut lags = BTreeMap::new();
    for samples in all {
        samples.within(window, &mut lags);
    }
    lags.into_iter().filter_map(|(origin, l)| summarize(l).map(|s| (origin, s))).collect()
}

pub fn summarize(mut lags: Vec<u64>) -> Option<LagSummary> {
    if lags.is_empty() {
        return None;
    }
    lags.sort_unstable();
    let rank = |p: usize| lags[(lags.len() * p).div_ceil(100).saturating_sub(1)];
    Some(LagSummary { events: lags.len(), p50_ms: rank(50), p99_ms: rank(99), max_ms: *lags.last().unwrap_or(&0) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_exact() {
        assert_eq!(summarize(vec![]), None);
        assert_eq!(summarize(vec![7]), Some(LagSummary { events: 1, p50_ms: 7, p99_ms: 7, max_ms: 7 }));
        let s = summarize((1..=100).rev().collect()).unwrap();
        assert_eq!((s.events, s.p50_ms, s.p99_ms, s.max_ms), (100, 50, 99, 100));
        let s = summarize((1..=1000).collect()).unwrap();
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (500, 990, 1000));
    }

    #[test]
    fn each_origin_keeps_its_last_samples_only() {
        let l = LagSamples::default();
        l.record("dc2", 0..(SAMPLES_MAX as u64 + 10));
        l.record("dc3", [5]);
        let s = summary_over([&l], Duration::from_secs(60));
        assert_eq!(s["dc2"].events, SAMPLES_MAX, "bounded");
        assert_eq!(s["dc2"].max_ms, SAMPLES_MAX as u64 + 9, "the newest are kept");
        assert_eq!(s["dc3"], LagSummary { events: 1, p50_ms: 5, p99_ms: 5, max_ms: 5 });
        // Two recorders (two shards) summarised together: one distribution per origin.
        let m = LagSamples::default();
        m.record("dc3", [1, 9]);
        let both = summary_over([&l, &m], Duration::from_secs(60));
        assert_eq!(both["dc3"], LagSummary { events: 3, p50_ms: 5, p99_ms: 9, max_ms: 9 });
        assert!(summary_over([&l], Duration::ZERO).values().all(|s| s.events <= SAMPLES_MAX));
    }
}
