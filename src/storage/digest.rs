//! The state digest (`GET /v1/cluster/digest`): a SHA-256 over every record, per kind.
//! It scans the whole state — seconds of CPU for millions of records — so it runs on a
//! low-priority thread of its own and never on the async runtime, where a scan held up
//! Raft's heartbeats for as long as it ran and, as the state grew, cost the DC
//! elections. One scan per shard runs at a time; callers that queued behind it share
//! the next one, and callers content with a recent answer (the console's rounds) share
//! one for a while that grows with the scan's cost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::background;

/// Per kind (and `all`): hex SHA-256.
pub type Digest = BTreeMap<String, String>;

/// How recent a digest the caller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Of the state as it is once the call began: a scan that started after the call, or
    /// one of exactly the state still held (no entry applied since it started).
    Fresh,
    /// A digest at most [`RECENT_MIN`] old, or [`RECENT_SCAN_FACTOR`] times its scan's time.
    Recent,
}

/// A recent digest is reused for at least this long...
const RECENT_MIN: Duration = Duration::from_secs(5);
/// ...and for this many times the scan's own time: scans for recent callers then take
/// at most 2 % of a core, however large the state.
const RECENT_SCAN_FACTOR: u32 = 50;

/// How long a digest whose scan took `took` serves recent callers, at least `min`.
fn recent_for(took: Duration, min: Duration) -> Duration {
    min.max(took.saturating_mul(RECENT_SCAN_FACTOR))
}

#[derive(Clone)]
struct Computed {
    started: Instant,
    /// The applied index read just before the scan began.
    applied: u64,
    took: Duration,
    value: Digest,
}

/// The last digest of one shard, and the lock that lets one scan run at a time.
pub struct DigestCache {
    last: std::sync::Mutex<Option<Computed>>,
    scanning: tokio::sync::Mutex<()>,
    recent_min: Duration,
}

impl Default for DigestCache {
    fn default() -> Self {
        DigestCache { last: Default::default(), scanning: Default::default(), recent_min: RECENT_MIN }
    }
}

impl DigestCache {
    /// A digest as `wanted`, and its age. `applied` reads the shard's applied index;
    /// `scan` computes the digest (on a background thread).
    ///
    /// A scan, once begun, runs to its end and is kept even if every caller waiting for
    /// it has gone (an HTTP client that timed out): otherwise each new ask would start
    /// another scan beside the ones still running. A recent ask never waits behind a
    /// running scan when there is an older digest to give.
    pub async fn get(
        self: &Arc<Self>,
        wanted: Wanted,
        applied: impl Fn() -> u64 + Send + 'static,
        scan: impl FnOnce() -> Digest + Send + 'static,
    ) -> std::io::Result<(Digest, Duration)> {
        let asked = Instant::now();
        if let Some(answer) = self.reusable(wanted, asked, applied()) {
            return Ok(answer);
        }
        if wanted == Wanted::Recent && self.scanning.try_lock().is_err() {
            if let Some(c) = self.last() {
                return Ok((c.value, c.started.elapsed()));
            }
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            let _one = this.scanning.lock().await;
            // A scan that ended while this one queued may be what the caller wants.
            if let Some(answer) = this.reusable(wanted, asked, applied()) {
                return Ok(answer);
            }
            let (started, at) = (Instant::now(), applied());
            let value = background::run_low_priority("digest", scan).await?;
            let took = started.elapsed();
            tracing::debug!(took_ms = took.as_millis() as u64, "state digest computed");
            *this.last.lock().expect("digest lock") = Some(Computed { started, applied: at, took, value: value.clone() });
            Ok((value, took))
        });
        task.await.map_err(std::io::Error::other)?
    }

    fn last(&self) -> Option<Computed> {
        self.last.lock().expect("digest lock").clone()
    }

    fn reusable(&self, wanted: Wanted, asked: Instant, applied_now: u64) -> Option<(Digest, Duration)> {
        let c = self.last()?;
        let ok = match wanted {
            Wanted::Fresh => c.started >= asked || c.applied == applied_now,
            Wanted::Recent => c.started.elapsed() < recent_for(c.took, self.recent_min),
        };
        ok.then(|| (c.value, c.started.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A scan that counts itself and takes `ms`; its digest's `all` is its number.
    fn scan(scans: &Arc<AtomicU64>, ms: u64) -> impl FnOnce() -> Digest + Send + 'static {
        let scans = scans.clone();
        move || {
            let n = scans.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(ms));
            BTreeMap::from([("all".to_string(), n.to_string())])
        }
    }

    fn reader(applied: &Arc<AtomicU64>) -> impl Fn() -> u64 + Send + 'static {
        let applied = applied.clone();
        move || applied.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_fresh_ask_scans_again_once_anything_was_applied() {
        let (cache, scans, applied) = (Arc::new(DigestCache::default()), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(7)));
        let (first, _) = cache.get(Wanted::Fresh, reader(&applied), scan(&scans, 0)).await.unwrap();
        let (same, _) = cache.get(Wanted::Fresh, reader(&applied), scan(&scans, 0)).await.unwrap();
        assert_eq!((first["all"].as_str(), same["all"].as_str()), ("1", "1"), "nothing applied: the same state, no second scan");
        applied.store(8, Ordering::SeqCst);
        let (after, _) = cache.get(Wanted::Fresh, reader(&applied), scan(&scans, 0)).await.unwrap();
        assert_eq!(after["all"], "2", "an entry applied since: scanned again");
        // A recent ask takes the digest just made, even though entries keep coming.
        applied.store(9, Ordering::SeqCst);
        let (recent, age) = cache.get(Wanted::Recent, reader(&applied), scan(&scans, 0)).await.unwrap();
        assert_eq!(recent["all"], "2");
        assert!(age < RECENT_MIN);
        assert_eq!(scans.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn asks_queued_behind_a_scan_share_the_next_one() {
        let (cache, scans) = (Arc::new(DigestCache::default()), Arc::new(AtomicU64::new(0)));
        // Entries keep being applied: no scan is of the state a later ask sees.
        let applied = Arc::new(AtomicU64::new(0));
        let asks = (0..4).map(|_| {
            let (cache, scans, applied) = (cache.clone(), scans.clone(), applied.clone());
            tokio::spawn(async move { cache.get(Wanted::Fresh, move || applied.fetch_add(1, Ordering::SeqCst), scan(&scans, 50)).await.unwrap() })
        });
        assert_eq!(futures::future::join_all(asks).await.len(), 4);
        let n = scans.load(Ordering::SeqCst);
        assert!(n <= 2, "4 asks at once: one scan, then at most one for those queued behind it; {n} scans");
    }

    #[tokio::test]
    async fn a_scan_outlives_its_caller_and_recent_asks_do_not_wait_for_it() {
        // Recent digests kept only for 50 times their scan's time (here: about nothing).
        let cache = Arc::new(DigestCache { recent_min: Duration::ZERO, ..DigestCache::default() });
        let (scans, applied) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(1)));
        cache.get(Wanted::Fresh, reader(&applied), scan(&scans, 0)).await.unwrap();
        applied.store(2, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.reusable(Wanted::Recent, Instant::now(), 2).is_some() {
            assert!(Instant::now() < deadline, "the first digest stays recent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A caller that gives up (an HTTP client's timeout) while its scan runs.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), cache.get(Wanted::Fresh, reader(&applied), scan(&scans, 300))).await;
        assert!(gave_up.is_err());
        // Meanwhile a recent ask gets the older digest at once (rather than none, or a wait
        // for the running scan), and starts no scan.
        let started = Instant::now();
        let (old, _) = cache.get(Wanted::Recent, reader(&applied), scan(&scans, 300)).await.unwrap();
        assert_eq!(old["all"], "1");
        assert!(started.elapsed() < Duration::from_millis(200), "waited {:?} behind the running scan", started.elapsed());
        // The abandoned scan ends and is kept: a fresh ask takes it without scanning again.
        let (fresh, _) = cache.get(Wanted::Fresh, reader(&applied), scan(&scans, 0)).await.unwrap();
        assert_eq!(fresh["all"], "2");
        assert_eq!(scans.load(Ordering::SeqCst), 2, "one scan for the abandoned ask, none after it");
    }

    #[test]
    fn recent_digests_last_longer_as_scans_grow_costly() {
        assert_eq!(recent_for(Duration::from_millis(10), RECENT_MIN), RECENT_MIN);
        assert_eq!(recent_for(Duration::from_secs(2), RECENT_MIN), Duration::from_secs(100));
        assert_eq!(recent_for(Duration::MAX, RECENT_MIN), Duration::MAX);
    }
}
