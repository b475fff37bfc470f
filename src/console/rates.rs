//! Orders per second and p99 order latency per DC, from the nodes' own counters: each
//! round reads every node's `/metrics`, takes what changed since the previous round
//! (a counter that went down means the node restarted: its whole value is new), sums a
//! DC's nodes, and keeps the last [`HISTORY_LEN`] points per DC.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use serde::Serialize;

use super::promtext::{self, Sample};

/// Points kept per DC: five minutes at one round a second.
pub const HISTORY_LEN: usize = 300;

const REQUESTS: &str = "agora_http_requests_total";
const BUCKETS: &str = "agora_http_request_duration_seconds_bucket";
const ORDERS_ROUTE: &str = "/v1/orders";

/// One node's order counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderCounters {
    /// Orders acknowledged (201).
    pub placed: f64,
    /// `POST /v1/orders` latency buckets, every status: (upper bound, cumulative count).
    pub buckets: Vec<(f64, f64)>,
}

impl OrderCounters {
    pub fn from_metrics(text: &str) -> Self {
        let samples = promtext::samples(text, &[REQUESTS, BUCKETS]);
        let orders = |s: &&Sample| s.label("route") == Some(ORDERS_ROUTE);
        let placed = samples.iter().filter(orders).filter(|s| s.name == REQUESTS && s.label("status") == Some("201")).map(|s| s.value).sum();
        let buckets =
            samples.iter().filter(orders).filter(|s| s.name == BUCKETS).filter_map(|s| Some((s.label("le")?.parse::<f64>().ok()?, s.value))).collect();
        OrderCounters { placed, buckets }
    }

    /// What happened since `before` (a reset counts from zero).
    fn since(&self, before: Option<&OrderCounters>) -> OrderCounters {
        let delta = |now: f64, then: Option<f64>| match then {
            Some(t) if now >= t => now - t,
            _ => now,
        };
        let reset = before.is_some_and(|b| self.placed < b.placed);
        let before = before.filter(|_| !reset);
        let placed = delta(self.placed, before.map(|b| b.placed));
        let buckets =
            self.buckets.iter().map(|(le, n)| (*le, delta(*n, before.and_then(|b| b.buckets.iter().find(|(l, _)| l == le).map(|(_, v)| *v))))).collect();
        OrderCounters { placed, buckets }
    }
}

/// One point of a DC's history.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Wall clock of the round, in ms since the epoch.
    pub t_ms: u64,
    pub orders_per_s: f64,
    /// p99 of `POST /v1/orders` in that second; `None` when none was answered.
    pub p99_ms: Option<f64>,
}

#[derive(Default)]
pub struct Rates {
    last: HashMap<String, (Instant, OrderCounters)>,
    history: BTreeMap<String, VecDeque<Point>>,
}

impl Rates {
    /// Records a round: `counters` maps each DC to its nodes that answered.
    pub fn record(&mut self, t_ms: u64, counters: &BTreeMap<String, Vec<(String, OrderCounters)>>) {
        let now = Instant::now();
        for (dc, nodes) in counters {
            let mut placed = 0.0;
            let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
            let mut seconds = 0.0f64;
            for (node, c) in nodes {
                let before = self.last.get(node);
                let d = c.since(before.map(|(_, c)| c));
                if let Some((at, _)) = before {
                    seconds = seconds.max(now.duration_since(*at).as_secs_f64());
                    placed += d.placed;
                    for (le, n) in d.buckets {
                        buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += n;
                    }
                }
                self.last.insert(node.clone(), (now, c.clone()));
            }
            if seconds <= 0.0 {
                continue; // the first round only sets the baseline
            }
            let p99 = promtext::quantile(0.99, &buckets.into_values().collect::<Vec<_>>()).map(|s| s * 1000.0);
            let h = self.history.entry(dc.clone()).or_default();
            h.push_back(Point { t_ms, orders_per_s: placed / seconds, p99_ms: p99 });
            while h.len() > HISTORY_LEN {
                h.pop_front();
            }
        }
    }

    pub fn history(&self, dc: &str) -> Vec<Point> {
        self.history.get(dc).map(|h| h.iter().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(placed: f64, fast: f64, all: f64) -> OrderCounters {
        OrderCounters { placed, buckets: vec![(0.01, fast), (f64::INFINITY, all)] }
    }

    #[test]
    fn reads_order_counters_from_metrics_text() {
        let text = "agora_http_requests_total{route=\"/v1/orders\",status=\"201\"} 7\n\
                    agora_http_requests_total{route=\"/v1/orders\",status=\"409\"} 2\n\
                    agora_http_requests_total{route=\"/v1/sessions\",status=\"201\"} 9\n\
                    agora_http_request_duration_seconds_bucket{le=\"0.01\",route=\"/v1/orders\"} 8\n\
                    agora_http_request_duration_seconds_bucket{le=\"+Inf\",route=\"/v1/orders\"} 9\n";
        assert_eq!(OrderCounters::from_metrics(text), counters(7.0, 8.0, 9.0));
    }

    #[test]
    fn sums_a_dcs_nodes_and_survives_a_restart_and_bounds_history() {
        let mut r = Rates::default();
        let round = |a: OrderCounters, b: OrderCounters| BTreeMap::from([("dc1".to_string(), vec![("n1".to_string(), a), ("n2".to_string(), b)])]);
        r.record(1, &round(counters(10.0, 10.0, 10.0), counters(5.0, 5.0, 5.0)));
        assert!(r.history("dc1").is_empty(), "the first round is a baseline");
        r.record(2, &round(counters(20.0, 20.0, 20.0), counters(7.0, 7.0, 7.0)));
        let p = r.history("dc1")[0].clone();
        assert!(p.orders_per_s > 0.0 && p.p99_ms.is_some_and(|ms| ms <= 10.0), "{p:?}");
        // n2 restarted: its counters start again from zero, never a negative rate.
        r.record(3, &round(counters(20.0, 20.0, 20.0), counters(1.0, 1.0, 1.0)));
        assert!(r.history("dc1")[1].orders_per_s > 0.0);
        for t in 0..(HISTORY_LEN as u64 + 10) {
            r.record(t, &round(counters(20.0, 20.0, 20.0), counters(1.0, 1.0, 1.0)));
        }
        let h = r.history("dc1");
        assert_eq!(h.len(), HISTORY_LEN);
        assert_eq!(h.last().unwrap().p99_ms, None, "no order in the last round");
    }
}
