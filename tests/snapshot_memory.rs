//! A snapshot is received and installed with memory bounded by a batch of records, not
//! by the snapshot's size: this binary counts every byte the process holds on the heap
//! (its own global allocator) while a 64 MiB snapshot is streamed into a fresh node's
//! state machine, and while a snapshot of that state is built; and while many small
//! records, as orders are, are installed into compressed pages.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use agora::config::Durability;
use agora::storage::snapshot_data::Writer;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, LogId, SnapshotMeta};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn grow(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is passed on to the system allocator unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, l) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new >= l.size() {
            grow(new - l.size());
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, l, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Heap bytes held at the highest point since the last call, above what was held then.
fn peak_growth_since(mark: &mut usize) -> usize {
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(*mark);
    *mark = LIVE.load(Ordering::Relaxed);
    PEAK.store(*mark, Ordering::Relaxed);
    grown
}

/// Streams the snapshot data in `file` into `sm` as a follower receives it, and installs
/// it (as of entry 1000); returns its meta.
async fn receive_and_install(sm: &mut agora::storage::StateMachineStore, file: &std::path::Path, id: &str) -> SnapshotMeta<u64, openraft::BasicNode> {
    let mut into = sm.begin_receiving_snapshot().await.expect("begin");
    let mut from = tokio::fs::File::open(file).await.expect("open");
    tokio::io::copy(&mut from, &mut *into).await.expect("receive");
    let meta = SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 1000)), last_membership: Default::default(), snapshot_id: id.into() };
    sm.install_snapshot(&meta, into).await.expect("install");
    meta
}

const RECORDS: usize = 65_536;
const VALUE_BYTES: usize = 1024;
const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_snapshot_is_received_and_installed_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let incoming = dir.path().join("incoming.bin");
    let mut w = Writer::new(std::io::BufWriter::new(std::fs::File::create(&incoming).expect("create"))).expect("writer");
    // Values of noise (xorshift): the snapshot's blocks do not compress, so the file is as
    // large as the state and "holding the snapshot" means holding 65 MiB.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..RECORDS {
        let value: Vec<u8> = (0..VALUE_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        w.put(format!("o/{i:08}").as_bytes(), &value).expect("put");
    }
    let (mut out, bytes, records) = w.finish().expect("finish");
    out.flush().expect("flush");
    drop(out);
    assert!(bytes as usize > 64 * MIB && records as usize == RECORDS);

    // sled's page cache bounded at 8 MiB, as a node's `storage.sled_cache_bytes_max` bounds it.
    let (_log, mut sm) = agora::storage::open(&dir.path().join("node"), "dc1", Durability::Flush, 8 << 20, 1000).expect("open store");
    let mut mark = 0;
    peak_growth_since(&mut mark);
    // The measure sees a snapshot held whole: what an install that buffers would cost.
    let whole = std::fs::read(&incoming).expect("read");
    assert!(peak_growth_since(&mut mark) >= whole.len(), "the counter sees a whole-file read");
    drop(whole);
    peak_growth_since(&mut mark);

    let meta = receive_and_install(&mut sm, &incoming, "big").await;
    let grown = peak_growth_since(&mut mark);
    eprintln!("snapshot of {} MiB received and installed; heap peak {:.1} MiB above the start", bytes as usize / MIB, grown as f64 / MIB as f64);

    assert_eq!(sm.applied_state().await.expect("applied").0, meta.last_log_id);
    assert_eq!(sm.reader().snapshot_stats().records, RECORDS as u64);
    // Measured 14–27 MiB alone, and under a whole test run on two cores once 45 MiB and
    // once 57 MiB (sled's background flush falling behind holds written pages longer).
    // An install that held the snapshot would hold at least its 65 MiB, which this
    // bound still catches.
    assert!(grown < 60 * MIB, "installing a {} MiB snapshot held {} MiB of heap at its peak", bytes as usize / MIB, grown / MIB);

    // Building one from that state streams too. sled's first scan of freshly written
    // pages materialises them above its cache bound (a plain scan measured 53 MiB for these
    // 65 MiB, 81 MiB for four times as much); a build that held the snapshot would add
    // the snapshot's 65 MiB on top of that.
    peak_growth_since(&mut mark);
    let built = openraft::RaftSnapshotBuilder::build_snapshot(&mut sm).await.expect("build");
    let grown = peak_growth_since(&mut mark);
    eprintln!("snapshot built; heap peak {:.1} MiB above the start", grown as f64 / MIB as f64);
    assert_eq!(sm.reader().snapshot_stats().records, RECORDS as u64);
    assert!(built.meta.last_log_id == meta.last_log_id);
    assert!(grown < 80 * MIB, "building a {} MiB snapshot held {} MiB of heap at its peak", bytes as usize / MIB, grown / MIB);
}

/// Small records in many batches, into compressed pages as a node keeps them: what a
/// wiped node installs after millions of orders. sled frees the page versions each write
/// replaces through crossbeam-epoch; before Agora's patch to `apply_batch`, a thread
/// applying batch after batch deferred far more than crossbeam collected, about 2.4 KB
/// per record whatever the cache (measured: 2,393 MB of RSS for a million records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_records_install_without_their_garbage_piling_up() {
    const SMALL: u64 = 150_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let incoming = dir.path().join("incoming.bin");
    let mut w = Writer::new(std::io::BufWriter::new(std::fs::File::create(&incoming).expect("create"))).expect("writer");
    for i in 0..SMALL {
        let value = format!("{{\"id\":\"dc1-{i:012}\",\"sku\":\"sku-{:04}\",\"qty\":{},\"state\":\"placed\"}}", i * 7919 % 1000, i % 5);
        w.put(format!("o/dc1-{i:012}").as_bytes(), value.as_bytes()).expect("put");
    }
    let (mut out, _, records) = w.finish().expect("finish");
    out.flush().expect("flush");
    drop(out);
    let sled =
        agora::storage::SledOptions { durability: Durability::Flush, cache_bytes: 8 << 20, segment_bytes: 0, compression_level: 1, compress_updates: true };
    let (_log, mut sm) = agora::storage::open_shards(&dir.path().join("node"), "dc1", 1, sled, 1000, Default::default()).expect("open store").remove(0);
    let mut mark = 0;
    peak_growth_since(&mut mark);
    receive_and_install(&mut sm, &incoming, "small").await;
    let grown = peak_growth_since(&mut mark);
    eprintln!("{records} small records installed; heap peak {:.1} MiB above the start", grown as f64 / MIB as f64);
    assert_eq!(sm.reader().snapshot_stats().records, SMALL);
    // Measured: 43–63 MiB with the patch alone or beside two busy cores, once 127 MiB
    // inside a whole test run on two cores (crossbeam collects later when its threads
    // are starved); 434 MiB without the patch (the garbage of 150,000 writes).
    assert!(grown < 200 * MIB, "installing {SMALL} small records held {} MiB of heap at its peak", grown / MIB);
}
