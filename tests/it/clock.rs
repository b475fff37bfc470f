//! Clocks that disagree: a node's wall clock set ahead or behind through its test hook
//! (`PUT /v1/admin/clock`). A write whose timestamp runs further ahead of the leader's
//! clock than `replication.max_clock_offset_ms` is refused as the cluster's problem
//! (503 `clock_skew`, retryable), never as the client's (400); nothing acknowledged is
//! lost, and the DCs converge once the clocks agree again.

use std::time::Duration;

use serde_json::{json, Value};

use super::harness::{must_eventually, Options, TestCluster};

async fn set_skew(c: &TestCluster, node: &str, skew_ms: i64) -> (u16, Value) {
    c.request(reqwest::Method::PUT, node, "/v1/admin/clock", Some(json!({ "skew_ms": skew_ms })), None).await
}

async fn order(c: &TestCluster, node: &str, token: &str) -> (u16, Value) {
    c.post(node, "/v1/orders", json!({"session": token, "sku": "sku-c", "qty": 1})).await
}

#[tokio::test]
async fn a_leader_whose_clock_is_behind_refuses_forwarded_writes_as_clock_skew_and_recovers() {
    let c = TestCluster::start(135, Options { dcs: 2, nodes: 3, ..Options::default() }).await;
    let leader = c.must_leader_in("dc1", Duration::from_secs(10)).await;
    let follower = c.dc_nodes("dc1").into_iter().find(|n| *n != leader).expect("a follower");
    let token = c.must_session(&follower, "buyer").await;
    c.must_restock(&follower, "sku-c", 100).await;
    let (code, _) = order(&c, &follower, &token).await;
    assert_eq!(code, 201, "before the skew, a write through a follower goes through");

    // The hook refuses nonsense and says what it holds.
    assert_eq!(set_skew(&c, &leader, i64::MIN).await.0, 400);
    assert_eq!(set_skew(&c, &leader, -3000).await, (200, json!({"skew_ms": -3000})));
    assert_eq!(c.request(reqwest::Method::GET, &leader, "/v1/admin/clock", None, None).await.1, json!({"skew_ms": -3000}));

    // The follower stamps the order with its own clock, 3 s ahead of the leader's.
    let (code, v) = order(&c, &follower, &token).await;
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("clock_skew")), "{v}");
    // The leader stamps its own writes: they go through.
    let (code, v) = order(&c, &leader, &token).await;
    assert_eq!(code, 201, "{v}");

    assert_eq!(set_skew(&c, &leader, 0).await.0, 200);
    must_eventually(Duration::from_secs(10), "writes through the follower again", || async { (order(&c, &follower, &token).await.0 == 201).then_some(()) })
        .await;
    c.must_converge(Duration::from_secs(20)).await;
    let (_, inv) = c.get("dc2-n1", "/v1/inventory/sku-c?consistency=stale").await;
    assert_eq!(inv["by_dc"]["dc1"]["sold"], 3, "every acknowledged order reached dc2: {inv}");
}
