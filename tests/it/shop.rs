//! Shop semantics under concurrency: no oversell, idempotency, actor supervision.

use std::time::Duration;

use serde_json::json;

use crate::harness::{must_eventually, Options, TestCluster};

#[tokio::test]
async fn two_hundred_buyers_of_one_hundred_units() {
    let c = TestCluster::start(21, Options::default()).await;
    let token = c.must_session(&c.names[0], "crowd").await;
    c.must_restock(&c.names[0], "hot", 100).await;
    let mut buyers = Vec::new();
    for i in 0..200 {
        // Spread over every node: followers forward to the leader.
        let (http, url, token) = (c.http.clone(), c.url(&c.names[i % 3]), token.clone());
        buyers.push(tokio::spawn(async move {
            let r = http.post(format!("{url}/v1/orders")).json(&json!({"session": token, "sku": "hot", "qty": 1})).send().await.unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap();
            (status, v)
        }));
    }
    let (mut ok, mut sold_out) = (0, 0);
    for b in buyers {
        match b.await.unwrap() {
            (201, _) => ok += 1,
            (409, v) => {
                assert_eq!(v["error"]["code"], "sold_out", "{v}");
                sold_out += 1;
            }
            (s, v) => panic!("unexpected answer {s}: {v}"),
        }
    }
    assert_eq!((ok, sold_out), (100, 100));
    // Latecomers, once the leader's state shows no stock: refused before any write, once
    // confirmed linearizably (this node still leads and its state is current). The
    // refusals that wait together share one quorum round.
    let before = (c.metric_total("agora_read_index_rounds_total").await, c.metric_total("agora_read_index_reads_total").await);
    let leader = c.must_leader(Duration::from_secs(5)).await;
    let late: Vec<_> = (0..50).map(|_| c.post(&leader, "/v1/orders", json!({"session": token, "sku": "hot", "qty": 1}))).collect();
    for (code, v) in futures::future::join_all(late).await {
        assert_eq!((code, &v["error"]["code"]), (409, &json!("sold_out")), "{v}");
    }
    let rounds = c.metric_total("agora_read_index_rounds_total").await - before.0;
    let reads = c.metric_total("agora_read_index_reads_total").await - before.1;
    assert!(reads >= 50.0, "every refusal confirmed in a read-index round: {reads} reads");
    assert!(rounds * 2.0 <= reads, "refusals share rounds: {reads} reads in {rounds} rounds");
    c.must_converge(Duration::from_secs(10)).await;
    for n in &c.names {
        let (_, inv) = c.get(n, "/v1/inventory/hot?consistency=stale").await;
        assert_eq!(inv["available"], 0, "{n}: {inv}");
        assert_eq!(inv["by_dc"]["dc1"]["sold"], 100, "{n}: {inv}");
    }
}

#[tokio::test]
async fn same_idempotency_key_twice_gives_one_order() {
    let c = TestCluster::start(22, Options::default()).await;
    let token = c.must_session(&c.names[0], "retrier").await;
    c.must_restock(&c.names[0], "sku-i", 10).await;
    let body = json!({"session": token, "sku": "sku-i", "qty": 3});
    let post = |node: usize| c.request(reqwest::Method::POST, &c.names[node], "/v1/orders", Some(body.clone()), Some("order-42"));
    // The retry goes to another node of the DC, as a client failing over would.
    let (a, first) = post(0).await;
    let (b, second) = post(1).await;
    assert_eq!((a, b), (201, 201));
    assert_eq!(first["id"], second["id"]);
    let (_, inv) = c.get(&c.names[2], "/v1/inventory/sku-i").await;
    assert_eq!(inv["available"], 7, "units taken once: {inv}");
    // The same key with a different request is refused, not silently merged.
    let other = c.request(reqwest::Method::POST, &c.names[0], "/v1/orders", Some(json!({"session": token, "sku": "sku-i", "qty": 1})), Some("order-42")).await;
    assert_eq!(other.0, 422, "{}", other.1);
    // Cancelling with a key twice: the retry gets the first answer.
    let path = format!("/v1/orders/{}/cancel", first["id"].as_str().unwrap());
    let mine = Some(json!({"session": token}));
    let c1 = c.request(reqwest::Method::POST, &c.names[0], &path, mine.clone(), Some("cancel-1")).await;
    let c2 = c.request(reqwest::Method::POST, &c.names[1], &path, mine.clone(), Some("cancel-1")).await;
    assert_eq!((c1.0, c2.0), (200, 200));
    let c3 = c.request(reqwest::Method::POST, &c.names[1], &path, mine, None).await;
    assert_eq!(c3.0, 409, "a keyless second cancel conflicts");
}

#[tokio::test]
async fn crashed_actor_is_restarted_and_the_node_keeps_serving() {
    let c = TestCluster::start(23, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let token = c.must_session(&leader, "survivor").await;
    c.must_restock(&leader, "sku-c", 5).await;
    for actor in ["inventory", "sessions", "orders"] {
        let (code, v) = c.request(reqwest::Method::POST, &leader, &format!("/v1/admin/crash/{actor}"), None, None).await;
        assert_eq!(code, 202, "{v}");
    }
    // The leader still takes orders: its supervisor restarted every actor.
    let (code, v) = must_eventually(Duration::from_secs(5), "an order after the crashes", || async {
        let r = c.post(&leader, "/v1/orders", json!({"session": token, "sku": "sku-c", "qty": 1})).await;
        (r.0 == 201).then_some(r)
    })
    .await;
    assert_eq!(code, 201, "{v}");
    let (code, _) = c.post(&leader, &format!("/v1/orders/{}/cancel", v["id"].as_str().unwrap()), json!({"session": token})).await;
    assert_eq!(code, 200);
    c.must_session(&leader, "after-crash").await;
    let metrics = c.http.get(format!("{}/metrics", c.url(&leader))).send().await.unwrap().text().await.unwrap();
    for actor in ["inventory", "sessions", "orders"] {
        let line = format!("agora_actor_restarts_total{{actor=\"{actor}\"");
        assert!(metrics.lines().any(|l| l.starts_with(&line) && l.ends_with(" 1")), "restart of {actor} not counted:\n{metrics}");
    }
}
