//! Response-rate limiting (RRL) of UDP answers, per source netblock.
//!
//! A UDP query's source address can be forged, so without a limit the server
//! can be made to send its answers at a third party (reflection). Every source
//! netblock (IPv4 /24, IPv6 /56, as resolvers of one operator often spread over
//! one) has a token bucket: `responses_per_s` tokens a second, holding at most
//! one second's worth. A response takes a token; without one it is *limited*:
//! every `slip`-th limited response is sent empty with TC=1 (a real resolver
//! then retries over TCP, which cannot be forged), the others are dropped.
//!
//! The table of netblocks is bounded: two generations of at most
//! `sources_max / 2` entries each. New netblocks go into the current one; a
//! netblock found in the previous one moves to the current one; when the
//! current one is full, the previous one (the least recently seen netblocks) is
//! forgotten and the current one takes its place. Both maps are allocated once,
//! at start: a query costs one hash lookup (three for a netblock not in the
//! current generation) and never allocates. The hasher is std's keyed SipHash,
//! so forged sources cannot be chosen to collide.
//!
//! A forgotten netblock starts again with a full bucket: a flood from more than
//! `sources_max / 2` netblocks gets at most one second's burst per netblock per
//! generation, and each netblock's share stays within the rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::RateLimit;

/// Token units per token: a bucket gains `responses_per_s` units per
/// nanosecond, so refills are exact in integers.
const UNITS_PER_TOKEN: u64 = 1_000_000_000;

/// What to do with one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Send,
    /// Send an empty, truncated (TC=1) response instead.
    Slip,
    Drop,
}

/// One netblock's token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    /// Tokens in [`UNITS_PER_TOKEN`] units, at most the burst.
    units: u64,
    /// Nanoseconds since the limiter's epoch when `units` was last refilled.
    at_ns: u64,
    /// Limited responses since the last slip.
    limited: u32,
}

/// Rate and slip in the units the arithmetic uses.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// Units added per nanosecond (= responses per second).
    units_per_ns: u64,
    /// Bucket capacity in units: one second's worth of responses.
    burst_units: u64,
    slip: u32,
}

impl Rule {
    fn new(limit: &RateLimit) -> Self {
        let units_per_ns = u64::from(limit.responses_per_s);
        // u32::MAX * 1e9 < u64::MAX, so this never saturates in practice.
        Self { units_per_ns, burst_units: units_per_ns.saturating_mul(UNITS_PER_TOKEN), slip: limit.slip }
    }
}

impl Bucket {
    fn full(rule: &Rule, now_ns: u64) -> Self {
        Self { units: rule.burst_units, at_ns: now_ns, limited: 0 }
    }

    /// Adds the tokens earned since the last refill, up to the burst. A clock
    /// that seems to go backwards adds nothing; huge gaps saturate.
    fn refill(&mut self, rule: &Rule, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.at_ns);
        let earned = elapsed.saturating_mul(rule.units_per_ns);
        self.units = self.units.saturating_add(earned).min(rule.burst_units);
        self.at_ns = self.at_ns.max(now_ns);
    }

    fn take(&mut self, rule: &Rule, now_ns: u64) -> Verdict {
        self.refill(rule, now_ns);
        if let Some(left) = self.units.checked_sub(UNITS_PER_TOKEN) {
            self.units = left;
            return Verdict::Send;
        }
        if rule.slip == 0 {
            return Verdict::Drop;
        }
        self.limited = self.limited.saturating_add(1);
        if self.limited >= rule.slip {
            self.limited = 0;
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// The two generations of netblocks.
struct Table {
    current: HashMap<u64, Bucket>,
    previous: HashMap<u64, Bucket>,
    /// Entries per generation at most.
    generation_max: usize,
}

impl Table {
    fn new(sources_max: usize) -> Self {
        let generation_max = (sources_max / 2).max(1);
        Self { current: HashMap::with_capacity(generation_max), previous: HashMap::with_capacity(generation_max), generation_max }
    }

    fn take(&mut self, key: u64, rule: &Rule, now_ns: u64) -> Verdict {
        if let Some(bucket) = self.current.get_mut(&key) {
            return bucket.take(rule, now_ns);
        }
        let mut bucket = self.previous.remove(&key).unwrap_or_else(|| Bucket::full(rule, now_ns));
        let verdict = bucket.take(rule, now_ns);
        if self.current.len() >= self.generation_max {
            // `clear` keeps the allocation: the maps never grow past their start size.
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        self.current.insert(key, bucket);
        verdict
    }

    fn len(&self) -> usize {
        self.current.len().saturating_add(self.previous.len())
    }
}

/// The limiter shared by the server's UDP queries.
pub(crate) struct Limiter {
    epoch: Instant,
    rule: Rule,
    /// Held only for one lookup; never across an await.
    table: Mutex<Table>,
    /// Where the number of netblocks tracked is reported (a gauge).
    sources: Arc<AtomicU64>,
}

impl Limiter {
    pub fn new(limit: &RateLimit, sources: Arc<AtomicU64>) -> Self {
        Self { epoch: Instant::now(), rule: Rule::new(limit), table: Mutex::new(Table::new(limit.sources_max)), sources }
    }

    /// Takes a token for one response to `source`.
    pub fn check(&self, source: IpAddr) -> Verdict {
        let now_ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.check_at(netblock(source), now_ns)
    }

    fn check_at(&self, key: u64, now_ns: u64) -> Verdict {
        // A panic cannot leave a bucket half-updated in a way that matters: go on.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let verdict = table.take(key, &self.rule, now_ns);
        let tracked = u64::try_from(table.len()).unwrap_or(u64::MAX);
        drop(table);
        self.sources.store(tracked, Ordering::Relaxed);
        verdict
    }
}

/// The source's netblock as a table key: IPv4 /24 or IPv6 /56, tagged by
/// family (an IPv4-mapped IPv6 address counts as IPv4).
fn netblock(ip: IpAddr) -> u64 {
    const V6_TAG: u64 = 1 << 63;
    match ip.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
        IpAddr::V6(v6) => {
            let top = u64::try_from(u128::from(v6) >> 72).unwrap_or(u64::MAX >> 8);
            V6_TAG | top
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn rule(per_s: u32, slip: u32) -> Rule {
        Rule::new(&RateLimit { responses_per_s: per_s, slip, sources_max: 16 })
    }

    #[test]
    fn bucket_refills_at_the_rate_and_saturates_at_the_burst() {
        let rule = rule(10, 0);
        let mut bucket = Bucket::full(&rule, 0);
        for _ in 0..10 {
            assert_eq!(bucket.take(&rule, 0), Verdict::Send);
        }
        assert_eq!(bucket.take(&rule, 0), Verdict::Drop, "burst is one second's worth");
        // A tenth of a second earns exactly one token.
        assert_eq!(bucket.take(&rule, SECOND / 10 - 1), Verdict::Drop);
        assert_eq!(bucket.take(&rule, SECOND / 10), Verdict::Send);
        assert_eq!(bucket.take(&rule, SECOND / 10), Verdict::Drop);
        // A long idle time fills the bucket to the burst, not beyond.
        bucket.refill(&rule, 3600 * SECOND);
        assert_eq!(bucket.units, 10 * UNITS_PER_TOKEN);
        // A clock going backwards earns nothing and does not move `at_ns` back.
        bucket.units = 0;
        bucket.refill(&rule, SECOND);
        assert_eq!((bucket.units, bucket.at_ns), (0, 3600 * SECOND));
    }

    #[test]
    fn huge_rates_and_gaps_do_not_overflow() {
        let rule = rule(u32::MAX, 1);
        let mut bucket = Bucket { units: 0, at_ns: 0, limited: 0 };
        bucket.refill(&rule, u64::MAX);
        assert_eq!(bucket.units, rule.burst_units);
        assert_eq!(rule.burst_units, u64::from(u32::MAX) * UNITS_PER_TOKEN);
        assert_eq!(bucket.take(&rule, u64::MAX), Verdict::Send);
        // And the slowest rate, after the longest gap.
        let slow = self::rule(1, 1);
        let mut bucket = Bucket { units: u64::MAX - 1, at_ns: 0, limited: 0 };
        bucket.refill(&slow, u64::MAX);
        assert_eq!(bucket.units, UNITS_PER_TOKEN);
    }

    #[test]
    fn every_nth_limited_response_slips() {
        let rule = rule(1, 3);
        let mut bucket = Bucket::full(&rule, 0);
        assert_eq!(bucket.take(&rule, 0), Verdict::Send);
        let verdicts: Vec<Verdict> = (0..6).map(|_| bucket.take(&rule, 0)).collect();
        use Verdict::{Drop, Slip};
        assert_eq!(verdicts, vec![Drop, Drop, Slip, Drop, Drop, Slip]);
        let always = self::rule(1, 1);
        let mut bucket = Bucket { units: 0, at_ns: 0, limited: 0 };
        assert_eq!(bucket.take(&always, 0), Slip);
        assert_eq!(bucket.take(&always, 0), Slip);
    }

    #[test]
    fn netblocks_group_ipv4_by_24_and_ipv6_by_56() {
        let key = |s: &str| netblock(s.parse().unwrap());
        assert_eq!(key("192.0.2.1"), key("192.0.2.254"));
        assert_ne!(key("192.0.2.1"), key("192.0.3.1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.1"));
        assert_eq!(key("2001:db8:0:ff::1"), key("2001:db8:0:1::2"));
        assert_ne!(key("2001:db8:0:100::1"), key("2001:db8:0:ff::1"));
        assert_ne!(key("::c000:201"), key("192.0.2.1"), "families never share a key");
    }

    #[test]
    fn table_stays_within_its_bound_and_keeps_recent_sources() {
        let gauge = Arc::new(AtomicU64::new(0));
        let limiter = Limiter::new(&RateLimit { responses_per_s: 1, slip: 0, sources_max: 100 }, gauge.clone());
        let capacity = limiter.table.lock().unwrap().current.capacity();
        for key in 0..10_000u64 {
            // Key 0 is seen throughout, so it is never forgotten: its empty bucket stays empty.
            assert_eq!(limiter.check_at(0, 0), if key == 0 { Verdict::Send } else { Verdict::Drop });
            limiter.check_at(key + 1, 0);
            assert!(gauge.load(Ordering::Relaxed) <= 100);
        }
        let table = limiter.table.lock().unwrap();
        assert_eq!(table.current.capacity(), capacity, "the table never reallocates");
    }
}
