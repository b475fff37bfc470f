//! A node whose disk fails (every sync failing with EIO, or with ENOSPC as on a full
//! disk, through the storage layer's test hook) stops acknowledging: it never
//! acknowledges a write it could not make durable, and its DC goes on without it.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{dig_short, must_eventually, Options, TestCluster};

async fn order(c: &TestCluster, node: &str, token: &str) -> (u16, Value) {
    c.post(node, "/v1/orders", json!({"session": token, "sku": "sku-disk", "qty": 1})).await
}

async fn the_leader_whose_disk_fails_stops_acknowledging(net: u8, fault: &str) {
    let mut c = TestCluster::start(net, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(20)).await;
    let token = c.must_session(&leader, "ida").await;
    c.must_restock(&leader, "sku-disk", 1000).await;
    let mut acked = Vec::new();
    for _ in 0..5 {
        let (code, v) = order(&c, &leader, &token).await;
        assert_eq!(code, 201, "before the fault: {v}");
        acked.push(v["id"].as_str().expect("order id").to_string());
    }

    let (code, v) = c.request(Method::PUT, &leader, "/v1/admin/disk", Some(json!({"fault": fault})), None).await;
    assert_eq!(code, 200, "inject {fault}: {v}");
    for _ in 0..20 {
        let (code, v) = order(&c, &leader, &token).await;
        assert_ne!(code, 201, "{leader} acknowledged an order its disk could not keep: {v}");
    }
    let (code, health) = c.get(&leader, "/healthz").await;
    assert_eq!((code, health["storage_failed"].as_bool()), (503, Some(true)), "{health}");
    // Clients are no longer sent to it: it leaves its DC's answer on the other nodes.
    let failed_ip = c.url(&leader).replace("http://", "").replace(":8080", "");
    for n in c.dc_nodes("dc1").into_iter().filter(|n| *n != leader) {
        let server = c.url(&n).replace("http://", "").replace(":8080", "");
        must_eventually(Duration::from_secs(10), &format!("{n}'s dc1.shop answer without {leader}"), || async {
            let answer = dig_short(&server, "dc1.shop.agora.test");
            (!answer.is_empty() && !answer.contains(&failed_ip)).then_some(())
        })
        .await;
    }
    // The disk "recovers", but what the failed sync lost is unknown: still nothing.
    let (code, v) = c.request(Method::PUT, &leader, "/v1/admin/disk", Some(json!({"fault": "none"})), None).await;
    assert_eq!((code, v["failed"].as_bool()), (200, Some(true)), "{v}");
    let (code, v) = order(&c, &leader, &token).await;
    assert_ne!(code, 201, "{leader} acknowledged again after a failed sync: {v}");

    // The two others elect a leader, take orders, and hold every acknowledged one.
    let other = c.dc_nodes("dc1").into_iter().find(|n| *n != leader).expect("another node");
    let id = must_eventually(Duration::from_secs(20), "an order through the rest of the DC", || async {
        let (code, v) = order(&c, &other, &token).await;
        (code == 201).then(|| v["id"].as_str().expect("order id").to_string())
    })
    .await;
    acked.push(id.clone());
    for id in &acked {
        let (code, v) = c.get(&other, &format!("/v1/orders/{id}")).await;
        assert_eq!(code, 200, "acknowledged order {id} after the disk fault: {v}");
    }

    // Restarted, the node comes back healthy and catches up from its DC.
    c.kill(&leader);
    c.start_node(&leader);
    must_eventually(Duration::from_secs(20), "the restarted node to hold the order taken without it", || async {
        let (code, _) = c.get(&leader, &format!("/v1/orders/{id}?consistency=stale")).await;
        let (health, _) = c.get(&leader, "/healthz").await;
        (code == 200 && health == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_leader_whose_fsync_fails_acknowledges_nothing_more() {
    the_leader_whose_disk_fails_stops_acknowledging(144, "sync-error").await;
}

#[tokio::test]
async fn a_leader_whose_disk_is_full_acknowledges_nothing_more() {
    the_leader_whose_disk_fails_stops_acknowledging(145, "full").await;
}
