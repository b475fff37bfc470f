//! openraft's storage conformance suite against the sled log store and state machine.

use agora::config::Durability;
use agora::raft::{StorageError, TypeConfig};
use agora::storage::{self, LogStore, StateMachineStore};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = storage::open(dir.path(), "dc1", Durability::Fsync, 16 << 20, 1000).expect("open sled store");
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}

/// The outbox holds one record per entry; reading from the middle of a record, and
/// trimming through one, behave exactly as if every event had its own record.
#[tokio::test]
async fn outbox_records_per_entry_read_and_trim_by_event() {
    use agora::domain::{Change, Command, Outcome, Request};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut sm) = storage::open(dir.path(), "dc1", Durability::Flush, 16 << 20, 1000).expect("open sled store");
    let reader = sm.reader();
    let req = |cmd| Request::new(cmd, None);
    let order = |i: u32| {
        req(Command::PlaceOrder {
            id: format!("o{i}"),
            session: "t1".into(),
            sku: "sku1".into(),
            qty: 1,
            dc: "dc1".into(),
            hlc: 10 + i as u64,
            refresh_session: false,
        })
    };
    let entry = |index: u64, cmd: Request| Entry::<TypeConfig> { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(cmd) };
    // Entry 1: session + restock (2 events: session, stock). Entry 2: three orders in one
    // batch (4 events: each order, then one stock row — the last supersedes the others).
    // Entry 3: one more order (2 events).
    let setup = req(Command::Batch {
        requests: vec![
            req(Command::CreateSession { token: "t1".into(), user: "u".into(), dc: "dc1".into(), hlc: 1 }),
            req(Command::Restock { sku: "sku1".into(), add: 10, dc: "dc1".into(), hlc: 2 }),
        ],
    });
    let orders = req(Command::Batch { requests: (1..=3).map(order).collect() });
    let outs = sm.apply(vec![entry(1, setup), entry(2, orders), entry(3, order(4))]).await.expect("apply");
    assert!(matches!(&outs[1], Outcome::Batch(o) if o.len() == 3 && o.iter().all(|x| matches!(x, Outcome::Order(_)))), "{outs:?}");
    assert_eq!(reader.out_seq(), 8);
    let events = reader.outbox(1, 100);
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    let stock_sold: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.change {
            Change::StockV2 { row, .. } => Some(row.sold),
            _ => None,
        })
        .collect();
    assert_eq!(stock_sold, vec![0, 3, 4], "one row per entry, the entry's last");
    assert!(matches!(events[5].change, Change::StockV2 { .. }), "the row stays where its last version was emitted");
    let seqs = |from, max| reader.outbox(from, max).iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(4, 3), vec![4, 5, 6], "from the middle of entry 2's record");
    assert_eq!(seqs(9, 5), Vec::<u64>::new());
    // Trim through the middle of entry 2's record: the floor is exactly the next event.
    sm.apply(vec![entry(4, req(Command::TrimOutbox { upto: 5 }))]).await.expect("trim");
    assert_eq!(reader.outbox_floor(), 6);
    assert_eq!(seqs(1, 100), (6..=8).collect::<Vec<_>>());
    sm.apply(vec![entry(5, req(Command::TrimOutbox { upto: 8 }))]).await.expect("trim all");
    assert_eq!(reader.outbox_floor(), 9);
    assert!(reader.outbox(1, 100).is_empty());
}
