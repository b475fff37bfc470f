//! Malformed HTTP input: each case gets a 4xx JSON error, changes nothing, and the node
//! stays healthy.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{Options, TestCluster};

#[tokio::test]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let c = TestCluster::start(31, Options::default()).await;
    let node = c.names[1].clone();
    let url = c.url(&node);
    let token = c.must_session(&node, "alice").await;
    c.must_restock(&node, "sku-b", 10).await;
    let before = c.must_converge(Duration::from_secs(5)).await;

    let raw =
        |method: Method, path: &str, body: Vec<u8>| c.http.request(method, format!("{url}{path}")).header("content-type", "application/json").body(body).send();
    let order = |v: serde_json::Value| raw(Method::POST, "/v1/orders", v.to_string().into_bytes());
    let cases: Vec<(&str, reqwest::Response, u16)> = vec![
        ("malformed json", raw(Method::POST, "/v1/orders", b"{\"session\":".to_vec()).await.unwrap(), 400),
        ("invalid utf-8", raw(Method::POST, "/v1/sessions", b"{\"user\":\"\xff\xfe\"}".to_vec()).await.unwrap(), 400),
        ("wrong type", order(json!({"session": token, "sku": "sku-b", "qty": "two"})).await.unwrap(), 400),
        ("zero qty", order(json!({"session": token, "sku": "sku-b", "qty": 0})).await.unwrap(), 400),
        ("negative qty", order(json!({"session": token, "sku": "sku-b", "qty": -5})).await.unwrap(), 400),
        ("huge qty", order(json!({"session": token, "sku": "sku-b", "qty": 10_001})).await.unwrap(), 400),
        (
            "qty beyond i64",
            raw(Method::POST, "/v1/orders", format!("{{\"session\":\"{token}\",\"sku\":\"sku-b\",\"qty\":99999999999999999999999}}").into_bytes())
                .await
                .unwrap(),
            400,
        ),
        ("unknown field", order(json!({"session": token, "sku": "sku-b", "qty": 1, "price": 0})).await.unwrap(), 400),
        ("missing field", order(json!({"session": token, "sku": "sku-b"})).await.unwrap(), 400),
        ("unknown session", order(json!({"session": "nope", "sku": "sku-b", "qty": 1})).await.unwrap(), 401),
        ("unknown sku", order(json!({"session": token, "sku": "nope", "qty": 1})).await.unwrap(), 404),
        ("bad sku chars", order(json!({"session": token, "sku": "a b/c", "qty": 1})).await.unwrap(), 400),
        ("unknown order", raw(Method::GET, "/v1/orders/dc1-nope", vec![]).await.unwrap(), 404),
        ("cancel unknown order", raw(Method::POST, "/v1/orders/dc1-nope/cancel", json!({"session": token}).to_string().into_bytes()).await.unwrap(), 404),
        ("cancel without a session", raw(Method::POST, "/v1/orders/dc1-nope/cancel", vec![]).await.unwrap(), 401),
        ("cancel with a bad session", raw(Method::POST, "/v1/orders/dc1-nope/cancel", json!({"session": "a b"}).to_string().into_bytes()).await.unwrap(), 400),
        ("unknown session get", raw(Method::GET, "/v1/sessions/nope", vec![]).await.unwrap(), 404),
        ("delete unknown session", raw(Method::DELETE, "/v1/sessions/nope", vec![]).await.unwrap(), 404),
        ("unknown sku get", raw(Method::GET, "/v1/inventory/nope", vec![]).await.unwrap(), 404),
        ("bad user name", raw(Method::POST, "/v1/sessions", json!({"user": "x".repeat(65)}).to_string().into_bytes()).await.unwrap(), 400),
        ("zero restock", raw(Method::PUT, "/v1/inventory/sku-b", json!({"add": 0}).to_string().into_bytes()).await.unwrap(), 400),
        ("bad consistency", raw(Method::GET, "/v1/inventory/sku-b?consistency=eventual", vec![]).await.unwrap(), 400),
        ("unknown route", raw(Method::GET, "/v1/nothing", vec![]).await.unwrap(), 404),
    ];
    for (what, resp, expected) in cases {
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
        assert_eq!(status, expected, "{what}: {body}");
        assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string(), "{what}: {body}");
    }
    let bad_key = c
        .http
        .post(format!("{url}/v1/orders"))
        .header("Idempotency-Key", "has space")
        .json(&json!({"session": token, "sku": "sku-b", "qty": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 400);
    // The server closes the connection after refusing an oversized body without reading
    // it: send that one on a connection of its own.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let big = format!("{{\"user\":\"{}\"}}", "a".repeat(100_000));
    let resp = fresh.post(format!("{url}/v1/sessions")).header("content-type", "application/json").body(big).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large", "{body}");

    // Nothing changed, and the node still serves.
    assert_eq!(c.must_converge(Duration::from_secs(5)).await, before);
    let (code, _) = c.get(&node, "/healthz").await;
    assert_eq!(code, 200);
    let (_, inv) = c.get(&node, "/v1/inventory/sku-b").await;
    assert_eq!(inv["available"], 10);
}
