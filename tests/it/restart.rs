//! A node restarted from its data dir serves every order acknowledged before it went
//! down: `agora bench --record-ids` writes the id of each acknowledged order, a follower
//! is killed and started again, and `agora verify-orders` asks it alone for each one
//! (stale reads: its own state). `scripts/bench-soak` runs the same check after millions
//! of orders; here a few seconds of load, and an id no node holds, which the check must
//! report.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{must_eventually, run_to_end, Options, TestCluster};

const TOOL_DEADLINE: Duration = Duration::from_secs(120);

/// `agora verify-orders` of `ids` against `node`: whether it passed, and its report.
fn verify(c: &TestCluster, node: &str, ids: &Path) -> (bool, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agora"));
    cmd.args(["verify-orders", "--target", &c.url(node), "-c", "8", "--ids"]).arg(ids);
    let (status, out) = run_to_end(cmd, TOOL_DEADLINE);
    (status.success(), serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("verify-orders printed {out:?}: {e}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_restarted_from_its_data_dir_serves_every_acknowledged_order() {
    let mut c = TestCluster::start(147, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(20)).await;
    let ids = c.dir.path().join("ids");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_agora"));
    bench.args(["bench", "--target", &c.url(&leader), "-c", "16", "-d", "4", "--warmup", "1", "--skus", "40", "--json", "--record-ids"]).arg(&ids);
    let (status, out) = run_to_end(bench, TOOL_DEADLINE);
    assert!(status.success(), "bench: {out}");
    let recorded = std::fs::read_to_string(&ids).expect("ids file").lines().count() as u64;
    assert!(recorded >= 50, "only {recorded} orders acknowledged: {out}");

    let follower = c.dc_nodes("dc1").into_iter().find(|n| *n != leader).expect("a follower");
    let committed = c.status(&leader).await.and_then(|s| s["commit_index"].as_u64()).expect("leader's commit index");
    c.kill(&follower);
    c.start_node(&follower);
    must_eventually(Duration::from_secs(60), &format!("{follower} applying index {committed} again"), || async {
        c.status(&follower).await.and_then(|s| s["applied_index"].as_u64()).filter(|a| *a >= committed)
    })
    .await;

    let (passed, report) = verify(&c, &follower, &ids);
    assert!(passed, "{report}");
    assert_eq!((report["checked"].as_u64(), report["served"].as_u64(), report["missing"].as_u64()), (Some(recorded), Some(recorded), Some(0)), "{report}");

    // The check catches an order the node does not serve.
    let phantom = "dc1-0123456789abcdef0123456789abcdef";
    let with_phantom = c.dir.path().join("ids-with-phantom");
    std::fs::write(&with_phantom, format!("{}{phantom}\n", std::fs::read_to_string(&ids).expect("ids file"))).expect("write ids");
    let (passed, report) = verify(&c, &follower, &with_phantom);
    assert!(!passed, "a missing order must fail the check: {report}");
    assert_eq!((report["served"].as_u64(), report["missing"].as_u64()), (Some(recorded), Some(1)), "{report}");
    assert_eq!(report["missing_examples"][0], phantom, "{report}");
}
