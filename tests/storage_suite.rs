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
