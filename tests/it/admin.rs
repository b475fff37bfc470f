//! The admin API listens apart from the shop's, wants the admin token, and refuses a
//! membership change that would leave a DC below a quorum of its configured voters
//! unless the operator forces it.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{Options, TestCluster};

async fn call(c: &TestCluster, url: String, token: Option<&str>) -> (u16, Value) {
    let mut req = c.http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("admin listener answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_admin_api_wants_its_token_and_is_not_on_the_shop_port() {
    let c = TestCluster::start(83, Options { nodes: 1, ..Options::default() }).await;
    let admin = format!("{}/v1/admin/dcs", c.admin_url("dc1-n1"));
    let (code, v) = call(&c, admin.clone(), None).await;
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unauthorized")), "{v}");
    let (code, v) = call(&c, admin.clone(), Some("not-the-token-at-all")).await;
    assert_eq!((code, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    let (code, v) = call(&c, admin, Some(&c.admin_token())).await;
    assert_eq!(code, 200, "{v}");
    // The shop's port has no admin routes at all, with or without the token.
    let (code, _) = call(&c, format!("{}/v1/admin/dcs", c.url("dc1-n1")), Some(&c.admin_token())).await;
    assert_eq!(code, 404);
    let r = c.http.put(format!("{}/v1/admin/faults", c.url("dc1-n1"))).json(&json!({"partitioned": [11]})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn removing_voters_below_a_quorum_is_refused_unless_forced() {
    let c = TestCluster::start(84, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let others: Vec<String> = c.names.iter().filter(|n| **n != leader).cloned().collect();
    let remove = |n: &str, force: bool| format!("/v1/admin/nodes/{n}{}", if force { "?force=true" } else { "" });
    let (code, v) = c.request(reqwest::Method::DELETE, &leader, &remove(&others[0], false), None, None).await;
    assert_eq!(code, 200, "2 of 3 voters are still a quorum: {v}");
    let (code, v) = c.request(reqwest::Method::DELETE, &leader, &remove(&others[1], false), None, None).await;
    assert_eq!((code, v["error"]["code"].as_str()), (409, Some("would_lose_quorum")), "{v}");
    let (_, s) = c.get(&leader, "/v1/cluster/status").await;
    c.must_session(&leader, "still-two-voters").await;
    let (code, v) = c.request(reqwest::Method::DELETE, &leader, &remove(&others[1], true), None, None).await;
    assert_eq!(code, 200, "forced: {v} (status before: {s})");
    assert_eq!(v["voters"].as_array().unwrap().len(), 1, "{v}");
    for n in &others {
        let (code, v) = c.post(&leader, "/v1/admin/nodes", json!({"node": n})).await;
        assert_eq!(code, 200, "add {n} back: {v}");
    }
    c.must_converge(Duration::from_secs(10)).await;
}
