//! The state digest (`GET /v1/cluster/digest`): a SHA-256 over every record, per kind.
//! It scans the whole state — seconds of CPU for millions of records — so it runs on a
//! low-priority thread of its own and never on the async runtime, where a scan held up
//! Raft's heartbeats for as long as it ran and, as the state grew, cost the DC
//! elections. One scan per shard runs at a time; callers that queued behind it share
//! the next one, and callers content with a recent answer (the console's rounds) share
//! one for a while that grows with the scan's cost.

use std::collections::BTreeMap;
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
    /// A digest at most [`recent_for`] old.
    Recent,
}

/// A recent digest is reused for at least this long...
const RECENT_MIN: Duration = Duration::from_secs(5);
/// ...and for this many times the scan's own time: scans for recent callers then take
/// at most 2 % of a core, however large the state.
const RECENT_SCAN_FACTOR: u32 = 50;

/// How long a digest whose scan took `took` serves recent callers.
pub fn recent_for(took: Duration) -> Duration {
    RECENT_MIN.max(took.saturating_mul(RECENT_SCAN_FACTOR))
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
#[derive(Default)]
pub struct DigestCache {
    last: tokio::sync::Mutex<Option<Computed>>,
}

impl DigestCache {
    /// A digest as `wanted`, and its age. `applied` reads the shard's applied index;
    /// `scan` computes the digest (on a background thread).
    pub async fn get(&self, wanted: Wanted, applied: impl Fn() -> u64, scan: impl FnOnce() -> Digest + Send + 'static) -> std::io::Result<(Digest, Duration)> {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some(c) = last.as_ref().filter(|c| reusable(c, wanted, asked, applied())) {
            return Ok((c.value.clone(), c.started.elapsed()));
        }
        let (started, at) = (Instant::now(), applied());
        let value = background::run_low_priority("digest", scan).await?;
        let took = started.elapsed();
        tracing::debug!(took_ms = took.as_millis() as u64, "state digest computed");
        *last = Some(Computed { started, applied: at, took, value: value.clone() });
        Ok((value, took))
    }
}

fn reusable(c: &Computed, wanted: Wanted, asked: Instant, applied_now: u64) -> bool {
    match wanted {
        Wanted::Fresh => c.started >= asked || c.applied == applied_now,
        Wanted::Recent => c.started.elapsed() < recent_for(c.took),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    fn counting_scan(scans: &Arc<AtomicU64>) -> impl FnOnce() -> Digest + Send + 'static {
        let scans = scans.clone();
        move || {
            let n = scans.fetch_add(1, Ordering::SeqCst) + 1;
            BTreeMap::from([("all".to_string(), n.to_string())])
        }
    }

    #[tokio::test]
    async fn a_fresh_ask_scans_again_once_anything_was_applied() {
        let (cache, scans) = (DigestCache::default(), Arc::new(AtomicU64::new(0)));
        let applied = AtomicU64::new(7);
        let read = || applied.load(Ordering::SeqCst);
        let (first, _) = cache.get(Wanted::Fresh, read, counting_scan(&scans)).await.unwrap();
        let (same, _) = cache.get(Wanted::Fresh, read, counting_scan(&scans)).await.unwrap();
        assert_eq!((first["all"].as_str(), same["all"].as_str()), ("1", "1"), "nothing applied: the same state, no second scan");
        applied.store(8, Ordering::SeqCst);
        let (after, _) = cache.get(Wanted::Fresh, read, counting_scan(&scans)).await.unwrap();
        assert_eq!(after["all"], "2", "an entry applied since: scanned again");
        // A recent ask takes the digest just made, even though entries keep coming.
        applied.store(9, Ordering::SeqCst);
        let (recent, age) = cache.get(Wanted::Recent, read, counting_scan(&scans)).await.unwrap();
        assert_eq!(recent["all"], "2");
        assert!(age < RECENT_MIN);
        assert_eq!(scans.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn asks_queued_behind_a_scan_share_the_next_one() {
        let cache = Arc::new(DigestCache::default());
        let scans = Arc::new(AtomicU64::new(0));
        let applied = Arc::new(AtomicU64::new(0));
        // Entries keep being applied: no scan is of the state a later ask sees.
        let asks = (0..4).map(|_| {
            let (cache, scans, applied) = (cache.clone(), scans.clone(), applied.clone());
            tokio::spawn(async move {
                let read = || applied.fetch_add(1, Ordering::SeqCst);
                let slow = counting_scan(&scans);
                cache
                    .get(Wanted::Fresh, read, move || {
                        std::thread::sleep(Duration::from_millis(50));
                        slow()
                    })
                    .await
                    .unwrap()
            })
        });
        let answers = futures::future::join_all(asks).await;
        assert_eq!(answers.len(), 4);
        let n = scans.load(Ordering::SeqCst);
        assert!(n <= 2, "4 asks at once: one scan, then at most one for those queued behind it; {n} scans");
    }

    #[test]
    fn recent_digests_last_longer_as_scans_grow_costly() {
        assert_eq!(recent_for(Duration::from_millis(10)), RECENT_MIN);
        assert_eq!(recent_for(Duration::from_secs(2)), Duration::from_secs(100));
        assert_eq!(recent_for(Duration::MAX), Duration::MAX);
    }
}
