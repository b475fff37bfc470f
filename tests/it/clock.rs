//! Clocks that disagree: a node's wall clock set ahead or behind through its test hook
//! (`PUT /v1/admin/clock`). A write whose timestamp runs further ahead of the leader's
//! clock than `replication.max_clock_offset_ms` is refused as the cluster's problem
//! (503 `clock_skew`, retryable), never as the client's (400); nothing acknowledged is
//! lost, and the DCs converge once the clocks agree again.

use std::time::Duration;

use serde_json::{json, Value};

use super::harness::{dig_short, must_eventually, Options, TestCluster};

async fn set_skew(c: &TestCluster, node: &str, skew_ms: i64) -> (u16, Value) {
    c.request(reqwest::Method::PUT, node, "/v1/admin/clock", Some(json!({ "skew_ms": skew_ms })), None).await
}

async fn order(c: &TestCluster, node: &str, token: &str) -> (u16, Value) {
    c.post(node, "/v1/orders", json!({"session": token, "sku": "sku-c", "qty": 1})).await
}

#[tokio::test]
async fn a_leader_whose_clock_is_behind_refuses_forwarded_writes_then_hands_over_and_recovers() {
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
    // The leader's clock disagrees with both followers': it fences itself and stamps
    // nothing either.
    must_eventually(Duration::from_secs(5), "the leader fenced for its clock", || async { (c.get(&leader, "/healthz").await.0 == 503).then_some(()) }).await;
    let (code, v) = order(&c, &leader, &token).await;
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("clock_skew")), "{v}");
    // Fenced, it hands its leadership to a node whose clock agrees: writes through the
    // follower go through again while its clock is still off.
    must_eventually(Duration::from_secs(10), "writes through the follower under a new leader", || async {
        (order(&c, &follower, &token).await.0 == 201).then_some(())
    })
    .await;
    // Every node's view agrees a moment after the write (the fenced node learns the new
    // leader from its first heartbeat).
    let now = c.must_leader_in("dc1", Duration::from_secs(5)).await;
    assert_ne!(now, leader, "the fenced node no longer leads");

    assert_eq!(set_skew(&c, &leader, 0).await.0, 200);
    must_eventually(Duration::from_secs(15), "writes through the old leader again", || async { (order(&c, &leader, &token).await.0 == 201).then_some(()) })
        .await;
    c.must_converge(Duration::from_secs(20)).await;
    let (_, inv) = c.get("dc2-n1", "/v1/inventory/sku-c?consistency=stale").await;
    assert_eq!(inv["by_dc"]["dc1"]["sold"], 3, "every acknowledged order reached dc2: {inv}");
}

/// `dig` against `node`'s DNS port.
fn dig(c: &TestCluster, node: &str, name: &str) -> Vec<String> {
    dig_short(&c.url(node).replace("http://", "").replace(":8080", ""), name)
}

/// A node whose clock runs 5 s ahead of the two others of its DC sees both disagree: it
/// fences itself (out of every node's DNS answers for its DC, `/healthz` 503, its own
/// writes refused as `clock_skew`), and its peers see only it disagree, so they do not.
/// Its clock put back, it returns.
#[tokio::test]
async fn a_node_whose_clock_is_off_from_its_dc_leaves_dns_and_comes_back() {
    let c = TestCluster::start(141, Options { dcs: 1, nodes: 3, ..Options::default() }).await;
    let ip = |n: u8| format!("127.{}.1.{n}", c.net);
    let name = "dc1.shop.agora.test";
    must_eventually(Duration::from_secs(10), "three nodes in the DC's answer", || async { (dig(&c, "dc1-n1", name).len() == 3).then_some(()) }).await;
    let token = c.must_session("dc1-n1", "buyer").await;
    c.must_restock("dc1-n1", "sku-c", 10).await;
    assert_eq!(set_skew(&c, "dc1-n2", 5000).await.0, 200);
    must_eventually(Duration::from_secs(10), "dc1-n2 fenced, and out of the answers", || async {
        let (code, health) = c.get("dc1-n2", "/healthz").await;
        let out = !dig(&c, "dc1-n1", name).contains(&ip(2)) && !dig(&c, "dc1-n2", name).contains(&ip(2));
        (code == 503 && health["clock_fenced"] == true && out).then_some(())
    })
    .await;
    let (code, v) = order(&c, "dc1-n2", &token).await;
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("clock_skew")), "{v}");
    // The others are not fenced: they see one peer off, not a majority.
    for n in ["dc1-n1", "dc1-n3"] {
        let (code, health) = c.get(n, "/healthz").await;
        assert_eq!((code, &health["clock_fenced"]), (200, &json!(false)), "{n}: {health}");
        let (_, status) = c.get(n, "/v1/cluster/status").await;
        let offset = status["clock"]["offsets_ms"]["12"].as_i64().expect("dc1-n2's offset");
        assert!((4000..6000).contains(&offset), "{n} sees dc1-n2 about 5 s ahead: {status}");
        let answer = dig(&c, n, name);
        assert!(answer.contains(&ip(1)) && answer.contains(&ip(3)), "the healthy nodes stay in {n}'s answer: {answer:?}");
        assert_eq!(order(&c, n, &token).await.0, 201, "{n} still takes orders");
    }
    assert_eq!(set_skew(&c, "dc1-n2", 0).await.0, 200);
    must_eventually(Duration::from_secs(10), "dc1-n2 back", || async {
        let (code, _) = c.get("dc1-n2", "/healthz").await;
        (code == 200 && dig(&c, "dc1-n1", name).contains(&ip(2))).then_some(())
    })
    .await;
    // Its hybrid clock never goes back: what it stamps runs ahead until real time catches
    // up with the 5 s it was ahead (refused as `clock_skew` meanwhile, nothing lost).
    must_eventually(Duration::from_secs(15), "orders through dc1-n2 again", || async { (order(&c, "dc1-n2", &token).await.0 == 201).then_some(()) }).await;
}
