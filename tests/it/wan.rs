//! WAN emulation in the peer transport: with `[wan] latency_ms` set, every frame a node
//! sends to another DC's node waits that long, so a cross-DC round trip takes at least
//! twice the latency; frames inside a DC do not wait. `PUT /v1/admin/wan` changes it on
//! a running node.

use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{Options, TestCluster};

const LATENCY_MS: u64 = 400;

/// How long `node` takes to answer 404 for an order id of `owner_dc` that nobody has:
/// for another DC's id, one lookup in that DC (a cross-DC round trip); for its own DC's,
/// a read index through its leader.
async fn time_unknown_order(c: &TestCluster, node: &str, owner_dc: &str) -> Duration {
    let path = format!("/v1/orders/{owner_dc}-{}", "0".repeat(32));
    let start = Instant::now();
    let (code, v) = c.get(node, &path).await;
    let took = start.elapsed();
    assert_eq!(code, 404, "{node} {path}: {v}");
    took
}

#[tokio::test]
async fn the_wan_delay_holds_cross_dc_round_trips_only_and_changes_at_run_time() {
    let wan = "latency_ms = 400";
    let c = TestCluster::start(125, Options { dcs: 2, nodes: 3, wan, ..Options::default() }).await;
    let leader = c.must_leader_in("dc1", Duration::from_secs(20)).await;
    let follower = c.dc_nodes("dc1").into_iter().find(|n| *n != leader).expect("a follower");
    // The first call opens the connections (TLS handshakes are not delayed, but timed here).
    time_unknown_order(&c, &follower, "dc2").await;
    time_unknown_order(&c, &follower, "dc1").await;

    let cross = time_unknown_order(&c, &follower, "dc2").await;
    println!("cross-DC lookup with {LATENCY_MS} ms one way: {cross:?}");
    assert!(cross >= Duration::from_millis(2 * LATENCY_MS), "a cross-DC round trip took {cross:?}, less than twice {LATENCY_MS} ms");
    let inside = time_unknown_order(&c, &follower, "dc1").await;
    println!("read through dc1's leader: {inside:?}");
    assert!(inside < Duration::from_millis(LATENCY_MS), "a round trip inside dc1 took {inside:?}: it was delayed");

    // Removed at run time on every node: the same lookup no longer waits.
    for n in c.names.clone() {
        let (code, v) = c.request(reqwest::Method::PUT, &n, "/v1/admin/wan", Some(json!({})), None).await;
        assert_eq!(code, 200, "{n}: {v}");
    }
    let (code, v) = c.request(reqwest::Method::PUT, "dc1-n1", "/v1/admin/wan", Some(json!({"link": [{"dcs": ["dc1", "dc9"]}]})), None).await;
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("bad_request")), "an unknown DC is refused: {v}");
    let without = time_unknown_order(&c, &follower, "dc2").await;
    println!("cross-DC lookup without latency: {without:?}");
    assert!(without < Duration::from_millis(LATENCY_MS), "without latency a cross-DC round trip took {without:?}");

    // Set again for one pair only, at run time: the lookup waits again.
    for n in c.names.clone() {
        let body = json!({"link": [{"dcs": ["dc2", "dc1"], "latency_ms": LATENCY_MS}]});
        let (code, v) = c.request(reqwest::Method::PUT, &n, "/v1/admin/wan", Some(body), None).await;
        assert_eq!(code, 200, "{n}: {v}");
    }
    let again = time_unknown_order(&c, &follower, "dc2").await;
    assert!(again >= Duration::from_millis(2 * LATENCY_MS), "with the pair's latency set again: {again:?}");
}
