//! The memory bound (`limits.memory_bytes_max`): a node measures its resident set against
//! it, and a node at its bound refuses client writes (503 `memory_pressure`) while it
//! still serves reads and its DC takes the same writes through another node. The resident
//! set is injected through the test hook: growing a real one to the bound would take
//! minutes of load.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{must_eventually, Options, TestCluster};

async fn order(c: &TestCluster, node: &str, token: &str) -> (u16, Value) {
    c.post(node, "/v1/orders", json!({"session": token, "sku": "sku-mem", "qty": 1})).await
}

async fn memory(c: &TestCluster, node: &str) -> Value {
    let (code, v) = c.get(node, "/v1/admin/memory").await;
    assert_eq!(code, 200, "{v}");
    v
}

async fn inject_rss(c: &TestCluster, node: &str, bytes: Value) {
    let (code, v) = c.request(Method::PUT, node, "/v1/admin/memory", Some(json!({ "rss_bytes": bytes })), None).await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test]
async fn a_node_at_its_memory_bound_refuses_writes_and_serves_reads() {
    let c = TestCluster::start(153, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(20)).await;
    let token = c.must_session(&leader, "mia").await;
    c.must_restock(&leader, "sku-mem", 100).await;
    let (code, placed) = order(&c, &leader, &token).await;
    assert_eq!(code, 201, "{placed}");
    let id = placed["id"].as_str().expect("order id").to_string();

    // The real resident set, measured, under the default bound of 1 GiB.
    let m = must_eventually(Duration::from_secs(5), "a first reading of the resident set", || async {
        let m = memory(&c, &leader).await;
        (m["rss_bytes"].as_u64() > Some(0)).then_some(m)
    })
    .await;
    assert_eq!(m["limit_bytes"].as_u64(), Some(1 << 30), "{m}");
    assert!(m["rss_bytes"].as_u64() < m["limit_bytes"].as_u64() && m["refusing_writes"] == false, "{m}");

    inject_rss(&c, &leader, json!(2u64 << 30)).await;
    must_eventually(Duration::from_secs(5), "the node to refuse writes at its bound", || async {
        (memory(&c, &leader).await["refusing_writes"] == true).then_some(())
    })
    .await;
    let (code, v) = order(&c, &leader, &token).await;
    assert_eq!((code, v["error"]["code"].as_str()), (503, Some("memory_pressure")), "{v}");
    let (code, v) = c.get(&leader, &format!("/v1/orders/{id}")).await;
    assert_eq!(code, 200, "reads go on at the bound: {v}");
    // The same write through another node of the DC: its leader is the node at its bound,
    // and it takes the write (Raft traffic is not refused).
    let other = c.dc_nodes("dc1").into_iter().find(|n| *n != leader).expect("another node");
    let (code, v) = order(&c, &other, &token).await;
    assert_eq!(code, 201, "through {other}: {v}");
    let m = memory(&c, &leader).await;
    assert!(m["releases"].as_u64() >= Some(1) && m["refused_writes"].as_u64() >= Some(1), "{m}");
    assert!(c.metric_total("agora_memory_refused_writes_total").await >= 1.0);

    inject_rss(&c, &leader, Value::Null).await;
    must_eventually(Duration::from_secs(5), "writes taken again under the bound", || async { (order(&c, &leader, &token).await.0 == 201).then_some(()) }).await;
}
