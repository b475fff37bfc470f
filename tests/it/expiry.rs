//! Expiry of idempotency records and sessions with tiny TTLs, and cancels that need the
//! session that placed the order — across DCs too.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{must_eventually, Options, TestCluster};

/// Tiny TTLs: idempotency records live 2 s, sessions 3 s; a pass every 200 ms.
const TINY_TTLS: &str = "idempotency_ttl_s = 2\nsession_ttl_s = 3\nexpiry_interval_ms = 200";

#[tokio::test]
async fn an_idempotency_key_returns_the_first_order_within_its_ttl_and_a_new_one_after() {
    let c = TestCluster::start(71, Options { dcs: 1, nodes: 3, limits: "idempotency_ttl_s = 2\nexpiry_interval_ms = 200", ..Options::default() }).await;
    let token = c.must_session(&c.names[0], "retrier").await;
    c.must_restock(&c.names[0], "sku-x", 100).await;
    let body = json!({"session": token, "sku": "sku-x", "qty": 1});
    let post = |node: usize| c.request(Method::POST, &c.names[node], "/v1/orders", Some(body.clone()), Some("key-1"));
    let (code, first) = post(0).await;
    assert_eq!(code, 201, "{first}");
    // Within the TTL, on another node: the first order.
    let (code, retry) = post(1).await;
    assert_eq!((code, &retry["id"]), (201, &first["id"]), "{retry}");
    // After it, the key is free again: a new order.
    let second = must_eventually(Duration::from_secs(15), "the key expired", || async {
        let (code, v) = post(2).await;
        (code == 201 && v["id"] != first["id"]).then_some(v)
    })
    .await;
    let (code, again) = post(0).await;
    assert_eq!((code, &again["id"]), (201, &second["id"]), "the new order is remembered in turn: {again}");
    let (_, inv) = c.get(&c.names[1], "/v1/inventory/sku-x").await;
    assert_eq!(inv["available"], 98, "two orders, not one per call: {inv}");
    c.must_converge(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_unused_session_expires_in_its_dc_and_is_unknown_in_every_dc() {
    let c = TestCluster::start(72, Options { dcs: 2, nodes: 1, limits: TINY_TTLS, ..Options::default() }).await;
    let idle = c.must_session("dc1-n1", "idle").await;
    let busy = c.must_session("dc1-n1", "busy").await;
    c.must_restock("dc2-n1", "sku-s", 1000).await;
    for n in ["dc1-n1", "dc2-n1"] {
        for t in [&idle, &busy] {
            must_eventually(Duration::from_secs(5), &format!("session on {n}"), || async {
                (c.get(n, &format!("/v1/sessions/{t}?consistency=stale")).await.0 == 200).then_some(())
            })
            .await;
        }
    }
    // `busy` keeps ordering in dc2 (use refreshes it there); `idle` does nothing.
    must_eventually(Duration::from_secs(20), "the idle session gone from every DC", || async {
        let (code, v) = c.post("dc2-n1", "/v1/orders", json!({"session": busy, "sku": "sku-s", "qty": 1})).await;
        assert_eq!(code, 201, "the session in use stays valid: {v}");
        let mut gone = true;
        for n in ["dc1-n1", "dc2-n1"] {
            gone &= c.get(n, &format!("/v1/sessions/{idle}?consistency=stale")).await.0 == 404;
        }
        gone.then_some(())
    })
    .await;
    for n in ["dc1-n1", "dc2-n1"] {
        let (code, v) = c.post(n, "/v1/orders", json!({"session": idle, "sku": "sku-s", "qty": 1})).await;
        assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "{n}: {v}");
        assert_eq!(c.get(n, &format!("/v1/sessions/{busy}")).await.0, 200, "{n}");
    }
    c.must_converge(Duration::from_secs(10)).await;
    // Unused from now on, `busy` expires too (in dc2, which wrote its last version).
    must_eventually(Duration::from_secs(20), "the busy session gone once unused", || async {
        let mut gone = true;
        for n in ["dc1-n1", "dc2-n1"] {
            gone &= c.get(n, &format!("/v1/sessions/{busy}?consistency=stale")).await.0 == 404;
        }
        gone.then_some(())
    })
    .await;
    c.must_converge(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn orders_do_not_show_the_session_and_only_it_cancels_them_in_any_dc() {
    let c = TestCluster::start(73, Options { dcs: 2, nodes: 1, ..Options::default() }).await;
    let owner = c.must_session("dc1-n1", "owner").await;
    let other = c.must_session("dc1-n1", "other").await;
    c.must_restock("dc1-n1", "sku-a", 10).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (code, v) = c.post("dc1-n1", "/v1/orders", json!({"session": owner, "sku": "sku-a", "qty": 1})).await;
        assert_eq!(code, 201, "{v}");
        assert!(!v.to_string().contains(&owner), "the token is not in the answer: {v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    c.must_converge(Duration::from_secs(10)).await;
    for n in ["dc1-n1", "dc2-n1"] {
        let (code, v) = c.get(n, &format!("/v1/orders/{}", ids[0])).await;
        assert_eq!(code, 200, "{v}");
        assert!(v.get("session").is_none() && !v.to_string().contains(&owner), "{n}: {v}");
    }
    let c = &c;
    let cancel = |node: &'static str, id: String, body: Option<serde_json::Value>| async move {
        let (code, v) = c.request(Method::POST, node, &format!("/v1/orders/{id}/cancel"), body, None).await;
        (code, v["error"]["code"].as_str().map(String::from), v)
    };
    for node in ["dc1-n1", "dc2-n1"] {
        let (code, err, v) = cancel(node, ids[0].clone(), None).await;
        assert_eq!((code, err.as_deref()), (401, Some("session_required")), "{node}: {v}");
        let (code, err, v) = cancel(node, ids[0].clone(), Some(json!({}))).await;
        assert_eq!((code, err.as_deref()), (401, Some("session_required")), "{node}: {v}");
        let (code, err, v) = cancel(node, ids[0].clone(), Some(json!({"session": other}))).await;
        assert_eq!((code, err.as_deref()), (403, Some("forbidden")), "{node}: {v}");
    }
    let (_, o) = c.get("dc1-n1", &format!("/v1/orders/{}", ids[0])).await;
    assert_eq!(o["status"], "placed", "refused cancels changed nothing");
    // The right session, in the owner DC and through the other DC (forwarded).
    let (code, _, v) = cancel("dc1-n1", ids[0].clone(), Some(json!({"session": owner}))).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    let (code, _, v) = cancel("dc2-n1", ids[1].clone(), Some(json!({"session": owner}))).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    // The owner cut off: a wrong session is still refused, the right one is queued.
    c.cut(&c.dc_nodes("dc1"), &c.dc_nodes("dc2")).await;
    let (code, err, v) = cancel("dc2-n1", ids[2].clone(), Some(json!({"session": other}))).await;
    assert_eq!((code, err.as_deref()), (403, Some("forbidden")), "{v}");
    let (code, _, v) = cancel("dc2-n1", ids[2].clone(), Some(json!({"session": owner}))).await;
    assert_eq!((code, v["status"].as_str()), (202, Some("cancel_queued")), "{v}");
    c.heal().await;
    must_eventually(Duration::from_secs(10), "the queued cancel applied by the owner", || async {
        let (_, o) = c.get("dc1-n1", &format!("/v1/orders/{}", ids[2])).await;
        (o["status"] == "cancelled").then_some(())
    })
    .await;
    c.must_converge(Duration::from_secs(10)).await;
    let (_, inv) = c.get("dc2-n1", "/v1/inventory/sku-a?consistency=stale").await;
    assert_eq!(inv["by_dc"]["dc1"]["available"], 10, "{inv}");
}
