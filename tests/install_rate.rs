//! How fast a wiped node's snapshot install writes records, by hand (ignored by default:
//! it is a measurement, not a check):
//! `RECORDS=1000000 cargo test --release --test install_rate -- --ignored --nocapture`.
//! Order-like records (about 150 bytes) into a fresh store with the node's settings:
//! compressed pages, the default cache, the node's allocator, a writer thread per core.

use std::io::Write;
use std::time::Instant;

use agora::config::Durability;
use agora::storage::snapshot_data::Writer;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, LogId, SnapshotMeta};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand with --ignored --nocapture"]
async fn install_rate() {
    let records: u64 = std::env::var("RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let incoming = dir.path().join("incoming.bin");
    let mut w = Writer::new(std::io::BufWriter::new(std::fs::File::create(&incoming).expect("create"))).expect("writer");
    for i in 0..records {
        let value = format!(
            "{{\"id\":\"dc1-{i:032x}\",\"sku\":\"sku-{:04}\",\"qty\":{},\"user\":\"user-{:06}\",\"state\":\"placed\",\"hlc\":{}}}",
            i * 7919 % 1000,
            i % 5,
            i % 100_000,
            1_700_000_000_000u64 + i
        );
        w.put(format!("o/dc1-{i:032x}").as_bytes(), value.as_bytes()).expect("put");
    }
    let (mut out, _, written) = w.finish().expect("finish");
    out.flush().expect("flush");
    drop(out);
    let sled =
        agora::storage::SledOptions { durability: Durability::Fsync, cache_bytes: 256 << 20, segment_bytes: 0, compression_level: 1, compress_updates: true };
    let (_log, mut sm) = agora::storage::open_shards(&dir.path().join("node"), "dc1", 1, sled, 100_000, Default::default()).expect("open store").remove(0);
    let mut into = sm.begin_receiving_snapshot().await.expect("begin");
    let mut from = tokio::fs::File::open(&incoming).await.expect("open");
    tokio::io::copy(&mut from, &mut *into).await.expect("receive");
    let meta =
        SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 1000)), last_membership: Default::default(), snapshot_id: "rate".into() };
    let t = Instant::now();
    sm.install_snapshot(&meta, into).await.expect("install");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(sm.reader().snapshot_stats().records, records);
    let db = std::fs::metadata(dir.path().join("node/db")).map(|m| m.len()).unwrap_or(0);
    eprintln!("{written} records installed in {secs:.2} s: {:.0} records/s; sled file {:.1} MB", records as f64 / secs, db as f64 / 1e6);
}
