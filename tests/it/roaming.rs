//! Clients that move between DCs: a DC answers for ids and tokens another DC created and
//! has not replicated yet by asking that DC (`PeerRequest::Lookup`). Replication is held
//! back with the `replication_paused` fault hook (lookups still flow); an unreachable
//! owner is a cut.

use std::time::Duration;

use serde_json::{json, Value};

use super::harness::{must_eventually, Options, TestCluster};

/// Sets the fault rules of every node of `nodes` (replacing what they had).
async fn set_faults(c: &TestCluster, nodes: &[String], rules: Value) {
    for n in nodes {
        let (code, v) = c.request(reqwest::Method::PUT, n, "/v1/admin/faults", Some(rules.clone()), None).await;
        assert_eq!(code, 200, "set faults on {n}: {v}");
    }
}

/// dc2 ships nothing to other DCs until [`TestCluster::heal`].
async fn pause_replication_from(c: &TestCluster, dc: &str) {
    set_faults(c, &c.dc_nodes(dc), json!({"replication_paused": true})).await;
}

/// dc1's digest of orders, from one node (stale: no barrier, no lookup).
async fn orders_digest(c: &TestCluster, node: &str) -> String {
    let (code, v) = c.get(node, "/v1/cluster/digest").await;
    assert_eq!(code, 200, "{v}");
    v["orders"].as_str().expect("orders digest").to_string()
}

async fn must_order(c: &TestCluster, node: &str, token: &str, sku: &str) -> String {
    let (code, v) = c.post(node, "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await;
    assert_eq!(code, 201, "order on {node}: {v}");
    v["id"].as_str().expect("order id").to_string()
}

#[tokio::test]
async fn an_order_placed_in_dc2_is_read_and_cancelled_through_dc1_before_replication() {
    let c = TestCluster::start(101, Options { dcs: 2, nodes: 3, ..Options::default() }).await;
    let token = c.must_session("dc2-n2", "rover").await;
    assert!(token.starts_with("dc2-"), "a token names the DC that created it: {token}");
    c.must_restock("dc2-n1", "sku-r", 10).await;
    c.must_converge(Duration::from_secs(10)).await;
    pause_replication_from(&c, "dc2").await;
    let before = orders_digest(&c, "dc1-n1").await;
    let id = must_order(&c, "dc2-n3", &token, "sku-r").await;
    assert!(id.starts_with("dc2-"), "{id}");
    // The client moves to dc1, which has not seen the order.
    for n in c.dc_nodes("dc1") {
        let (code, v) = c.get(&n, &format!("/v1/orders/{id}")).await;
        assert_eq!((code, v["status"].as_str()), (200, Some("placed")), "read on {n}: {v}");
        assert!(v.get("session").is_none(), "never the session: {v}");
    }
    let (code, v) = c.get("dc1-n2", &format!("/v1/sessions/{token}")).await;
    assert_eq!((code, v["user"].as_str()), (200, Some("rover")), "{v}");
    // A wrong session is refused by the owner, not queued or reported missing.
    let other = c.must_session("dc2-n1", "someone-else").await;
    let (code, v) = c.post("dc1-n3", &format!("/v1/orders/{id}/cancel"), json!({"session": other})).await;
    assert_eq!(code, 403, "{v}");
    let (code, v) = c.post("dc1-n3", &format!("/v1/orders/{id}/cancel"), json!({"session": token})).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "cancel through dc1: {v}");
    let (code, v) = c.get("dc1-n1", &format!("/v1/orders/{id}")).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    // An id no DC made is still 404, asked of the DC it names.
    let (code, v) = c.get("dc1-n1", "/v1/orders/dc2-0123456789abcdef").await;
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("not_found")), "{v}");
    assert_eq!(orders_digest(&c, "dc1-n1").await, before, "all of it answered before dc1 had the order");
    c.heal().await;
    c.must_converge(Duration::from_secs(10)).await;
    let (_, inv) = c.get("dc1-n1", "/v1/inventory/sku-r").await;
    assert_eq!(inv["by_dc"]["dc2"]["available"], 10, "the cancel released the unit: {inv}");
}

#[tokio::test]
async fn a_session_from_dc2_places_an_order_in_dc1_before_replication() {
    let c = TestCluster::start(102, Options { dcs: 2, nodes: 1, ..Options::default() }).await;
    c.must_restock("dc1-n1", "sku-s", 10).await;
    c.must_converge(Duration::from_secs(10)).await;
    pause_replication_from(&c, "dc2").await;
    let token = c.must_session("dc2-n1", "traveller").await;
    let id = must_order(&c, "dc1-n1", &token, "sku-s").await;
    assert!(id.starts_with("dc1-"), "the order belongs to the DC that took it: {id}");
    let (code, v) = c.get("dc1-n1", &format!("/v1/orders/{id}")).await;
    assert_eq!((code, v["user"].as_str()), (200, Some("traveller")), "{v}");
    // dc1 now holds the session (merged from the owner's answer): cancelling checks it there.
    let (code, v) = c.post("dc1-n1", &format!("/v1/orders/{id}/cancel"), json!({"session": token})).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    // A token dc2 never made: 401, answered by dc2.
    let (code, v) = c.post("dc1-n1", "/v1/orders", json!({"session": "dc2-feedfacefeedface", "sku": "sku-s", "qty": 1})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "{v}");
    // Logging out through dc1 of a session only dc2 has: written in dc1, final everywhere.
    let leaving = c.must_session("dc2-n1", "leaving").await;
    let (code, v) = c.request(reqwest::Method::DELETE, "dc1-n1", &format!("/v1/sessions/{leaving}"), None, None).await;
    assert_eq!(code, 204, "logout through dc1: {v}");
    let (code, _) = c.get("dc1-n1", &format!("/v1/sessions/{leaving}")).await;
    assert_eq!(code, 404);
    c.heal().await;
    c.must_converge(Duration::from_secs(10)).await;
    let (code, _) = c.get("dc2-n1", &format!("/v1/sessions/{leaving}")).await;
    assert_eq!(code, 404, "dc1's tombstone reached dc2");
}

/// A forwarded cancel whose first attempt reaches the owner but whose answer is lost is
/// retried through another node of the owner DC: the retry answers with the cancelled
/// order, never `already_cancelled` for a cancel the same request made.
#[tokio::test]
async fn a_forwarded_cancel_whose_answer_is_lost_is_answered_by_its_retry() {
    let c = TestCluster::start(136, Options { dcs: 2, nodes: 3, ..Options::default() }).await;
    c.must_restock("dc1-n1", "sku-l", 10).await;
    let token = c.must_session("dc1-n1", "patient").await;
    let id = must_order(&c, "dc1-n2", &token, "sku-l").await;
    c.must_converge(Duration::from_secs(10)).await;
    let leader = c.must_leader_in("dc1", Duration::from_secs(10)).await;
    // Every node of dc1 but one follower answers dc2-n1 only after dc2-n1 gave up on it
    // (a third of the request timeout): the first attempt applies the cancel and its answer
    // comes too late. The prompt follower is the last dc2-n1 tries (leader first, then by
    // name), so the retry that answers comes after the cancel was applied.
    let prompt = c.dc_nodes("dc1").into_iter().filter(|n| *n != leader).max().expect("a follower");
    let slow = TestCluster::id("dc2-n1").to_string();
    let delayed: Vec<String> = c.dc_nodes("dc1").into_iter().filter(|n| *n != prompt).collect();
    set_faults(&c, &delayed, json!({"delay_ms": {slow: 2500}})).await;
    let (code, v) = c.post("dc2-n1", &format!("/v1/orders/{id}/cancel"), json!({"session": token})).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "cancel forwarded from dc2: {v}");
    let (code, v) = c.get(&leader, &format!("/v1/orders/{id}")).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    c.heal().await;
    c.must_converge(Duration::from_secs(10)).await;
    let (_, inv) = c.get("dc2-n1", "/v1/inventory/sku-l").await;
    assert_eq!(inv["by_dc"]["dc1"]["available"], 10, "one unit released once: {inv}");
}

#[tokio::test]
async fn an_unreachable_owner_gives_503_for_reads_and_202_for_cancels() {
    let c = TestCluster::start(103, Options { dcs: 2, nodes: 1, ..Options::default() }).await;
    c.must_restock("dc2-n1", "sku-u", 10).await;
    c.must_restock("dc1-n1", "sku-u", 10).await;
    c.must_converge(Duration::from_secs(10)).await;
    pause_replication_from(&c, "dc2").await;
    let token = c.must_session("dc2-n1", "stranded").await;
    let id = must_order(&c, "dc2-n1", &token, "sku-u").await;
    c.cut(&c.dc_nodes("dc1"), &c.dc_nodes("dc2")).await;
    for path in [format!("/v1/orders/{id}"), format!("/v1/sessions/{token}")] {
        let r = c.http.get(format!("{}{path}", c.url("dc1-n1"))).send().await.expect("answer");
        assert_eq!(r.status().as_u16(), 503, "{path}");
        assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"), "{path}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "owner_unreachable", "{path}: {v}");
        assert_eq!(v["error"]["owner"], "dc2", "{v}");
    }
    let (code, v) = c.post("dc1-n1", "/v1/orders", json!({"session": token, "sku": "sku-u", "qty": 1})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("owner_unreachable")), "an unknown foreign session is not 401: {v}");
    let (code, v) = c.request(reqwest::Method::DELETE, "dc1-n1", &format!("/v1/sessions/{token}"), None, None).await;
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("owner_unreachable")), "a logout is not a false 404 either: {v}");
    let (code, v) = c.post("dc1-n1", &format!("/v1/orders/{id}/cancel"), json!({"session": token})).await;
    assert_eq!((code, v["status"].as_str()), (202, Some("cancel_queued")), "{v}");
    c.heal().await;
    must_eventually(Duration::from_secs(10), "the queued cancel applied by dc2", || async {
        let (_, o) = c.get("dc2-n1", &format!("/v1/orders/{id}")).await;
        (o["status"] == "cancelled").then_some(())
    })
    .await;
    c.must_converge(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn lookups_answer_only_for_what_the_asked_dc_owns() {
    use agora::transport::message::{Found, Lookup};
    use agora::transport::{PeerRequest, PeerResponse};
    let c = TestCluster::start(104, Options { dcs: 2, nodes: 1, ..Options::default() }).await;
    let token = c.must_session("dc1-n1", "owner").await;
    c.must_converge(Duration::from_secs(10)).await;
    // dc2 asks dc1 (ids: dcD-nI is D*10+I): answered.
    match c.peer_call("dc1-n1", 21, PeerRequest::Lookup(Lookup::Session(token.clone()))).await {
        PeerResponse::Lookup(Ok(Found::Session(Some(s)))) => assert_eq!(s.user, "owner"),
        other => panic!("lookup of dc1's session: {other:?}"),
    }
    // Something dc1 does not own (even though it holds a copy), or malformed: refused.
    let theirs = c.must_session("dc2-n1", "theirs").await;
    c.must_converge(Duration::from_secs(10)).await;
    for bad in [Lookup::Session(theirs), Lookup::Order("../dc1-x".into()), Lookup::Order("x".repeat(200))] {
        match c.peer_call("dc1-n1", 21, PeerRequest::Lookup(bad.clone())).await {
            PeerResponse::Lookup(Err(agora::error::NodeError::BadRequest(_))) => {}
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    // From a node of dc1 itself: not a cross-DC request.
    assert!(matches!(c.peer_call("dc1-n1", 11, PeerRequest::Lookup(Lookup::Session(token))).await, PeerResponse::Refused(_)));
}
