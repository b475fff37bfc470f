//! The node's memory bound, `limits.memory_bytes_max`: resident memory stays under a figure
//! the operator sets, whatever the number of orders the node has taken.
//!
//! The parts a setting bounds (sled's page cache, the hot entities, the queues of
//! `[limits]`) must fit under it with room to spare: config validation checks that. What
//! no setting bounds is measured instead: pages the allocator keeps for reuse, the pages
//! a snapshot scan holds past sled's cache bound, connection buffers. So [`watch`] reads
//! the process's resident set every [`CHECK_EVERY`], and
//! - at [`RELEASE_PERCENT`] of the bound or more, releases what can be rebuilt (each
//!   shard's hot-entity cache, the allocator's free pages), at most once per
//!   [`RELEASE_EVERY`];
//! - at the bound or more after that, refuses new client writes (503 `memory_pressure`)
//!   until the resident set is back under it, and for at least [`REFUSE_HOLD`], so that
//!   a node at its bound does not flip on every reading. A node whose memory at rest is
//!   over its bound (sled's full cache and the rest) would refuse for good, so it says so
//!   in its log after [`STUCK_AFTER`].
//!
//! Reads, Raft traffic and cross-DC batches go on while writes are refused: refusing them
//! would stall the DC's other nodes, and each is bounded by its own limits. A node over
//! its bound therefore still serves what it holds and answers its peers; the client's
//! write is retried on another node or later (`Retry-After`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// How often the resident set is read.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Caches are released at this share of the bound.
pub const RELEASE_PERCENT: u64 = 90;
/// Writes, once refused, stay refused at least this long.
pub const REFUSE_HOLD: Duration = Duration::from_secs(1);
/// Refusing this long without a break: the bound is below what the node holds at rest.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);
/// Releases at most this often: each one costs the cache misses that follow.
pub const RELEASE_EVERY: Duration = Duration::from_secs(1);

/// What can be given back when memory runs short: each is called on a blocking thread.
pub type Release = Box<dyn Fn() + Send + Sync>;

/// The bound and what it has done, shared by the watcher and the request paths.
pub struct MemoryBound {
    limit: u64,
    refusing: AtomicBool,
    /// The last resident set read, in bytes.
    rss: AtomicU64,
    releases: AtomicU64,
    refused_writes: AtomicU64,
    /// A test hook's stand-in for the measured resident set (0: measure).
    injected_rss: AtomicU64,
}

/// What one reading calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    release: bool,
    refuse: bool,
}

impl MemoryBound {
    pub fn new(limit: u64) -> Self {
        MemoryBound {
            limit,
            refusing: AtomicBool::new(false),
            rss: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            refused_writes: AtomicU64::new(0),
            injected_rss: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The share of the bound above which caches go.
    fn release_at(&self) -> u64 {
        self.limit / 100 * RELEASE_PERCENT
    }

    /// What a reading of `rss` calls for, before the hold of a refusal.
    fn verdict(&self, rss: u64) -> Verdict {
        Verdict { release: rss >= self.release_at(), refuse: rss >= self.limit }
    }

    /// Whether new client writes are refused now; counts the refusal if so.
    pub fn refuse_write(&self) -> bool {
        let refusing = self.refusing.load(Ordering::Relaxed);
        if refusing {
            self.refused_writes.fetch_add(1, Ordering::Relaxed);
        }
        refusing
    }

    /// Sets the resident set the watcher sees instead of measuring it (`None`: measure).
    pub fn inject_rss(&self, bytes: Option<u64>) {
        self.injected_rss.store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    fn read_rss(&self) -> Option<u64> {
        match self.injected_rss.load(Ordering::Relaxed) {
            0 => crate::resources::rss_bytes(),
            injected => Some(injected),
        }
    }

    pub fn status(&self) -> Status {
        Status {
            limit_bytes: self.limit,
            rss_bytes: self.rss.load(Ordering::Relaxed),
            refusing_writes: self.refusing.load(Ordering::Relaxed),
            releases: self.releases.load(Ordering::Relaxed),
            refused_writes: self.refused_writes.load(Ordering::Relaxed),
        }
    }

    /// Prometheus text of [`Status`].
    pub fn render(&self, labels: &str) -> String {
        let s = self.status();
        let rows = [
            ("memory_bound_bytes", "gauge", "limits.memory_bytes_max: the resident memory this node keeps under", s.limit_bytes),
            ("memory_refusing_writes", "gauge", "1 while the node refuses client writes for being at its memory bound", u64::from(s.refusing_writes)),
            ("memory_releases_total", "counter", "times the node dropped its caches for nearing its memory bound", s.releases),
            ("memory_refused_writes_total", "counter", "client writes refused for the memory bound", s.refused_writes),
        ];
        rows.iter().map(|(name, kind, help, v)| crate::metrics::text_sample(name, kind, help, labels, v)).collect()
    }
}

/// What `GET /v1/admin/memory` and the status show.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub limit_bytes: u64,
    pub rss_bytes: u64,
    pub refusing_writes: bool,
    pub releases: u64,
    pub refused_writes: u64,
}

/// Reads the resident set every [`CHECK_EVERY`] and acts on it, until the task is dropped.
pub async fn watch(bound: Arc<MemoryBound>, release: Arc<Vec<Release>>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut released_at: Option<Instant> = None;
    let mut refusing_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(mut rss) = bound.read_rss() else { continue };
        if bound.verdict(rss).release && released_at.is_none_or(|t| t.elapsed() >= RELEASE_EVERY) {
            released_at = Some(Instant::now());
            let release = release.clone();
            // Dropping 100,000 cached entities, or the allocator's collection, takes
            // milliseconds: not on the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || release.iter().for_each(|r| r())).await;
            bound.releases.fetch_add(1, Ordering::Relaxed);
            rss = bound.read_rss().unwrap_or(rss);
        }
        bound.rss.store(rss, Ordering::Relaxed);
        let held = refusing_since.is_some_and(|t| t.elapsed() < REFUSE_HOLD);
        let refuse = bound.verdict(rss).refuse || held;
        match (refusing_since, refuse) {
            (None, true) => refusing_since = Some(Instant::now()),
            (Some(_), false) => refusing_since = None,
            _ => {}
        }
        if refuse != bound.refusing.swap(refuse, Ordering::Relaxed) {
            log_change(&bound, rss, refuse);
        }
        if refusing_since.is_some_and(|t| t.elapsed() >= STUCK_AFTER) {
            crate::warn_limited!(
                "memory_bound_stuck",
                rss_mib = rss >> 20,
                limit_mib = bound.limit >> 20,
                "client writes refused for over 10 s: releasing caches does not bring this node under limits.memory_bytes_max; its memory at rest (sled's cache and the rest) needs a higher bound"
            );
        }
    }
}

fn log_change(bound: &MemoryBound, rss: u64, refuse: bool) {
    let (rss_mib, limit_mib) = (rss >> 20, bound.limit >> 20);
    if refuse {
        tracing::warn!(rss_mib, limit_mib, "resident memory at limits.memory_bytes_max after releasing caches: refusing client writes");
    } else {
        tracing::info!(rss_mib, limit_mib, "resident memory back under its bound: taking client writes again");
    }
}

/// The allocator's part of a release: mimalloc hands its free pages back to the system.
pub fn release_allocator() {
    // SAFETY: mi_collect takes no pointer and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn releases_near_the_bound_and_refuses_at_it() {
        let b = MemoryBound::new(1000 * MIB);
        assert_eq!(b.verdict(500 * MIB), Verdict { release: false, refuse: false });
        // Near the bound: caches go, writes go on.
        assert_eq!(b.verdict(950 * MIB), Verdict { release: true, refuse: false });
        assert_eq!(b.verdict(1000 * MIB), Verdict { release: true, refuse: true });
    }

    #[test]
    fn a_refused_write_is_counted() {
        let b = MemoryBound::new(100 * MIB);
        assert!(!b.refuse_write());
        b.refusing.store(true, Ordering::Relaxed);
        assert!(b.refuse_write());
        assert_eq!(b.status().refused_writes, 1);
        assert!(b.render("node=\"n\"").contains("agora_memory_refused_writes_total{node=\"n\"} 1\n"));
    }

    /// Waits until the watcher has read `rss` (and acted on it), for at most 5 s.
    async fn read(b: &MemoryBound, rss: u64) -> Status {
        b.inject_rss(Some(rss));
        let deadline = Instant::now() + Duration::from_secs(5);
        // Two readings of it: the first may have begun before the injection.
        let releases = b.status().releases;
        let mut seen = 0;
        while seen < 2 {
            assert!(Instant::now() < deadline, "the watcher did not read {rss}: {:?}", b.status());
            tokio::time::sleep(CHECK_EVERY / 4).await;
            if b.status().rss_bytes == rss && (rss < b.release_at() || b.status().releases > releases) {
                seen += 1;
            }
        }
        b.status()
    }

    #[tokio::test]
    async fn the_watcher_releases_then_refuses_then_resumes() {
        let b = Arc::new(MemoryBound::new(100 * MIB));
        let released = Arc::new(AtomicU64::new(0));
        let r = released.clone();
        let release: Arc<Vec<Release>> = Arc::new(vec![Box::new(move || {
            r.fetch_add(1, Ordering::Relaxed);
        })]);
        let task = tokio::spawn(watch(b.clone(), release));
        assert!(!read(&b, 50 * MIB).await.refusing_writes);
        assert_eq!(released.load(Ordering::Relaxed), 0);
        let s = read(&b, 120 * MIB).await;
        assert!(s.refusing_writes, "{s:?}");
        assert!(released.load(Ordering::Relaxed) >= 1 && s.releases >= 1, "{s:?}");
        // Under the bound again: writes resume once the refusal's hold is over.
        read(&b, 95 * MIB).await;
        let deadline = Instant::now() + REFUSE_HOLD + Duration::from_secs(5);
        while b.status().refusing_writes {
            assert!(Instant::now() < deadline, "still refusing under the bound: {:?}", b.status());
            tokio::time::sleep(CHECK_EVERY / 4).await;
        }
        task.abort();
    }
}
