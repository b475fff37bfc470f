//! Active-active across DCs: asynchronous replication, escrow, owned orders, convergence
//! after partitions (cut with the transport's fault hook).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{must_eventually, Options, TestCluster};

fn one_node_dcs(dcs: usize) -> Options {
    Options { dcs, nodes: 1, ..Options::default() }
}

/// Places `n` orders of 1 unit on `node`, returning the ids of the acknowledged ones.
async fn place_orders(c: &TestCluster, node: &str, session: &str, sku: &str, n: usize) -> Vec<String> {
    let mut acked = Vec::new();
    for _ in 0..n {
        let (code, v) = c.post(node, "/v1/orders", json!({"session": session, "sku": sku, "qty": 1})).await;
        if code == 201 {
            acked.push(v["id"].as_str().unwrap().to_string());
        }
    }
    acked
}

async fn must_session_everywhere(c: &TestCluster, token: &str) {
    for n in c.running() {
        must_eventually(Duration::from_secs(10), &format!("session on {n}"), || async {
            (c.get(&n, &format!("/v1/sessions/{token}?consistency=stale")).await.0 == 200).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn three_dcs_taking_writes_converge() {
    let c = TestCluster::start(41, one_node_dcs(3)).await;
    let mut load = Vec::new();
    for d in 1..=3 {
        let node = format!("dc{d}-n1");
        let c2 = (c.http.clone(), c.url(&node));
        load.push(tokio::spawn(async move {
            let (http, url) = c2;
            let tok: Value = http.post(format!("{url}/v1/sessions")).json(&json!({"user": "u"})).send().await.unwrap().json().await.unwrap();
            let sku = format!("sku-{d}");
            http.put(format!("{url}/v1/inventory/{sku}")).json(&json!({"add": 500})).send().await.unwrap();
            let mut ok = 0;
            for _ in 0..100 {
                let r = http.post(format!("{url}/v1/orders")).json(&json!({"session": tok["token"], "sku": sku, "qty": 1})).send().await.unwrap();
                ok += (r.status() == 201) as usize;
            }
            ok
        }));
    }
    let mut total = 0;
    for l in load {
        total += l.await.unwrap();
    }
    assert_eq!(total, 300);
    let stopped = Instant::now();
    c.must_converge(Duration::from_secs(5)).await;
    println!("3 DCs converged {} ms after load stopped", stopped.elapsed().as_millis());
    // Every DC sees every DC's stock and sales.
    for n in c.running() {
        let (_, inv) = c.get(&n, "/v1/inventory/sku-2?consistency=stale").await;
        assert_eq!(inv["by_dc"]["dc2"]["sold"], 100, "{n}: {inv}");
        let (_, st) = c.get(&n, "/v1/cluster/status").await;
        assert!(st["dcs"].as_array().unwrap().iter().all(|d| d["healthy"] == true), "{n}: {st}");
    }
}

#[tokio::test]
async fn dc_cut_off_keeps_selling_without_overselling_and_converges() {
    let c = TestCluster::start(42, one_node_dcs(3)).await;
    let token = c.must_session("dc1-n1", "shopper").await;
    must_session_everywhere(&c, &token).await;
    for d in 1..=3 {
        c.must_restock(&format!("dc{d}-n1"), "hot", 30).await;
    }
    c.must_converge(Duration::from_secs(5)).await;
    c.cut(&c.dc_nodes("dc1"), &[c.dc_nodes("dc2"), c.dc_nodes("dc3")].concat()).await;
    // Every DC keeps selling from its own allowance; dc2 and dc3 may still move units
    // between them (rebalancing), dc1 cannot. Sell in rounds until two rounds a second
    // apart sell nothing (a grant may be on its way between them): exactly the 90 units.
    let mut acked = Vec::new();
    let mut dry_rounds = 0;
    for _ in 0..200 {
        let mut sold = 0;
        for d in 1..=3 {
            let got = place_orders(&c, &format!("dc{d}-n1"), &token, "hot", 1).await;
            sold += got.len();
            acked.extend(got);
        }
        dry_rounds = if sold == 0 { dry_rounds + 1 } else { 0 };
        if dry_rounds == 2 {
            break;
        }
        if sold == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    assert_eq!(acked.len(), 90, "the DCs sell exactly their 90 units, no more, no fewer");
    let (code, v) = c.post("dc1-n1", "/v1/orders", json!({"session": token, "sku": "hot", "qty": 1})).await;
    assert_eq!(code, 409, "{v}");
    // dc1's view: it cannot reach the others.
    must_eventually(Duration::from_secs(5), "dc1 sees the others as unreachable", || async {
        let (_, st) = c.get("dc1-n1", "/v1/cluster/status").await;
        st["dcs"].as_array()?.iter().filter(|d| d["local"] == false).all(|d| d["reachable"] == false).then_some(())
    })
    .await;
    c.heal().await;
    c.must_converge(Duration::from_secs(10)).await;
    for n in c.running() {
        for id in &acked {
            assert_eq!(c.get(&n, &format!("/v1/orders/{id}?consistency=stale")).await.0, 200, "{id} missing on {n}");
        }
        let (_, inv) = c.get(&n, "/v1/inventory/hot?consistency=stale").await;
        assert_eq!(inv["total"], 0, "{n}: {inv}");
        let sold: u64 = (1..=3).map(|d| inv["by_dc"][format!("dc{d}")]["sold"].as_u64().unwrap()).sum();
        assert_eq!(sold, 90, "sold never exceeds stocked: {inv}");
    }
}

#[tokio::test]
async fn leaders_killed_during_replication_lose_nothing_and_apply_once() {
    let mut c = TestCluster::start(43, Options { dcs: 2, nodes: 3, ..Options::default() }).await;
    let token = c.must_session("dc1-n1", "buyer").await;
    c.must_restock("dc1-n1", "sku-r", 10_000).await;
    // Load until told to stop: a fixed number of calls would burn out fast while the
    // leader is down (those calls fail at once).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked_count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let (http, urls, token, stop) = (c.http.clone(), c.dc_nodes("dc1").iter().map(|n| c.url(n)).collect::<Vec<_>>(), token.clone(), stop.clone());
        let acked_count = acked_count.clone();
        tokio::spawn(async move {
            let (mut acked, mut attempts) = (Vec::new(), 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = &urls[attempts as usize % urls.len()];
                attempts += 1;
                let r = http.post(format!("{url}/v1/orders")).json(&json!({"session": token, "sku": "sku-r", "qty": 1})).send().await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        acked.push(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
                        acked_count.store(acked.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                    // Refused or no leader: back off a little, as a client would.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            (acked, attempts)
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let sender = c.must_leader_in("dc1", Duration::from_secs(10)).await;
    let receiver = c.must_leader_in("dc2", Duration::from_secs(10)).await;
    c.kill(&sender);
    c.kill(&receiver);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_node(&sender);
    c.start_node(&receiver);
    c.must_leader_in("dc1", Duration::from_secs(10)).await;
    c.must_leader_in("dc2", Duration::from_secs(10)).await;
    // At least 2 s more of load after the restarts, and until enough orders count (a
    // loaded machine answers slower, not fewer).
    let more_until = std::time::Instant::now() + Duration::from_secs(30);
    tokio::time::sleep(Duration::from_secs(2)).await;
    while acked_count.load(std::sync::atomic::Ordering::Relaxed) < 50 && std::time::Instant::now() < more_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, attempts) = load.await.unwrap();
    assert!(acked.len() >= 50, "enough orders acknowledged to matter: {} of {attempts}", acked.len());
    c.must_converge(Duration::from_secs(20)).await;
    for n in c.dc_nodes("dc2") {
        for id in &acked {
            assert_eq!(c.get(&n, &format!("/v1/orders/{id}?consistency=stale")).await.0, 200, "{id} missing on {n}");
        }
        let (_, inv) = c.get(&n, "/v1/inventory/sku-r?consistency=stale").await;
        // Applied exactly once: dc2's copy of dc1's counters matches the acknowledged orders
        // (an order whose acknowledgement was lost to a kill may also have landed).
        let sold = inv["by_dc"]["dc1"]["sold"].as_u64().unwrap();
        assert!(sold >= acked.len() as u64 && sold <= attempts, "{n}: {inv}");
    }
    let (_, s1) = c.get("dc1-n1", "/v1/cluster/status").await;
    let leader2 = c.must_leader_in("dc2", Duration::from_secs(10)).await;
    let (_, s2) = c.get(&leader2, "/v1/cluster/status").await;
    let applied = s2["dcs"].as_array().unwrap().iter().find(|d| d["name"] == "dc1").unwrap()["applied_from_it"].clone();
    assert_eq!(applied, s1["out_seq"], "dc2's cursor for dc1 is dc1's last event");

    // The exact lag of dc1's events, as dc2's nodes applied them (each as leader).
    let mut events = 0;
    for n in c.dc_nodes("dc2") {
        let (code, lag) = c.get(&n, "/v1/cluster/lag?window_s=600").await;
        assert_eq!(code, 200, "{lag}");
        if let Some(s) = lag["origins"].get("dc1") {
            let ms = |k: &str| s[k].as_u64().unwrap();
            assert!(ms("p50_ms") <= ms("p99_ms") && ms("p99_ms") <= ms("max_ms"), "{lag}");
            events += s["events"].as_u64().unwrap();
        }
    }
    assert!(events >= acked.len() as u64, "every applied event of dc1 has its lag: {events} for {} acknowledged orders", acked.len());
    // And as dc1's leaders shipped them: commit there to dc2's answer, on one clock (a
    // restarted node does not remember when it applied what it had before).
    let (mut shipped, mut lag_all) = (0, Vec::new());
    for n in c.dc_nodes("dc1") {
        let (_, lag) = c.get(&n, "/v1/cluster/lag?window_s=600").await;
        lag_all.push(lag.clone());
        if let Some(s) = lag["destinations"].get("dc2") {
            let ms = |k: &str| s[k].as_u64().unwrap();
            assert!(ms("p50_ms") <= ms("p99_ms") && ms("p99_ms") <= ms("max_ms"), "{lag}");
            shipped += s["events"].as_u64().unwrap();
        }
    }
    assert!(shipped > 0, "dc1's leaders measured what they shipped: {lag_all:?}");
    assert_eq!(c.get("dc2-n1", "/v1/cluster/lag?window_s=x").await.0, 400);

    // The console's recent digest: the one just computed, with its age; a bad ask is 400.
    let (_, fresh) = c.get("dc2-n1", "/v1/cluster/digest").await;
    let (code, recent) = c.get("dc2-n1", "/v1/cluster/digest?recent=true").await;
    assert_eq!((code, &recent["all"]), (200, &fresh["all"]), "{recent}");
    assert!(recent["age_ms"].as_u64().is_some_and(|a| a < 5000), "{recent}");
    assert_eq!(c.get("dc2-n1", "/v1/cluster/digest?recent=x").await.0, 400);
}

#[tokio::test]
async fn retry_in_another_dc_during_a_partition_leaves_one_order() {
    let c = TestCluster::start(44, one_node_dcs(2)).await;
    let token = c.must_session("dc1-n1", "retrier").await;
    must_session_everywhere(&c, &token).await;
    c.must_restock("dc1-n1", "sku-k", 10).await;
    c.must_restock("dc2-n1", "sku-k", 10).await;
    c.cut(&c.dc_nodes("dc1"), &c.dc_nodes("dc2")).await;
    let body = json!({"session": token, "sku": "sku-k", "qty": 2});
    let (a, first) = c.request(Method::POST, "dc1-n1", "/v1/orders", Some(body.clone()), Some("same-key")).await;
    let (b, second) = c.request(Method::POST, "dc2-n1", "/v1/orders", Some(body), Some("same-key")).await;
    assert_eq!((a, b), (201, 201));
    assert_ne!(first["id"], second["id"]);
    c.heal().await;
    c.must_converge(Duration::from_secs(10)).await;
    let mut live = BTreeSet::new();
    for id in [&first["id"], &second["id"]] {
        let (_, o) = c.get("dc2-n1", &format!("/v1/orders/{}?consistency=stale", id.as_str().unwrap())).await;
        if o["status"] == "placed" {
            live.insert(o["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(live.len(), 1, "exactly one live order after merge");
    let (_, inv) = c.get("dc1-n1", "/v1/inventory/sku-k?consistency=stale").await;
    assert_eq!(inv["total"], 18, "the duplicate's units are released: {inv}");
}

#[tokio::test]
async fn cancel_of_a_foreign_order_is_forwarded_or_queued() {
    let c = TestCluster::start(45, one_node_dcs(2)).await;
    let token = c.must_session("dc1-n1", "canceller").await;
    c.must_restock("dc1-n1", "sku-f", 10).await;
    let ids = place_orders(&c, "dc1-n1", &token, "sku-f", 2).await;
    c.must_converge(Duration::from_secs(5)).await;
    // Reachable owner: dc2 forwards the cancel to dc1 and answers with its result.
    let (code, v) = c.post("dc2-n1", &format!("/v1/orders/{}/cancel", ids[0]), json!({"session": token})).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    // Unreachable owner: accepted, queued, applied when dc1 returns.
    c.cut(&c.dc_nodes("dc1"), &c.dc_nodes("dc2")).await;
    let (code, v) = c.post("dc2-n1", &format!("/v1/orders/{}/cancel", ids[1]), json!({"session": token})).await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["status"], "cancel_queued");
    let (_, o) = c.get("dc1-n1", &format!("/v1/orders/{}", ids[1])).await;
    assert_eq!(o["status"], "placed", "not applied while cut off");
    c.heal().await;
    must_eventually(Duration::from_secs(10), "the queued cancel applied by the owner", || async {
        let (_, o) = c.get("dc1-n1", &format!("/v1/orders/{}", ids[1])).await;
        (o["status"] == "cancelled").then_some(())
    })
    .await;
    c.must_converge(Duration::from_secs(5)).await;
    let (_, inv) = c.get("dc2-n1", "/v1/inventory/sku-f?consistency=stale").await;
    assert_eq!(inv["by_dc"]["dc1"]["available"], 10, "{inv}");
}

#[tokio::test]
async fn a_dc_short_of_stock_gets_a_grant_from_a_peer() {
    let c = TestCluster::start(46, Options { dcs: 2, nodes: 1, replication: "low_water_units = 5\nreserve_units = 10", ..Options::default() }).await;
    let token = c.must_session("dc2-n1", "far-away").await;
    c.must_restock("dc1-n1", "sku-g", 100).await;
    c.must_converge(Duration::from_secs(5)).await;
    // dc2 has no allowance: the first order is refused, naming the units dc1 holds, and
    // makes dc2 ask dc1 for stock.
    let (code, v) = c.post("dc2-n1", "/v1/orders", json!({"session": token, "sku": "sku-g", "qty": 1})).await;
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["error"]["held_by_other_dcs"], 100, "{v}");
    must_eventually(Duration::from_secs(10), "an order in dc2 after the grant", || async {
        (c.post("dc2-n1", "/v1/orders", json!({"session": token, "sku": "sku-g", "qty": 1})).await.0 == 201).then_some(())
    })
    .await;
    c.must_converge(Duration::from_secs(5)).await;
    let (_, inv) = c.get("dc1-n1", "/v1/inventory/sku-g").await;
    assert!(inv["by_dc"]["dc1"]["available"].as_u64().unwrap() >= 10, "dc1 keeps its reserve: {inv}");
    assert_eq!(inv["total"], 99, "{inv}");
}

#[tokio::test]
async fn replication_from_unknown_or_lying_peers_is_refused() {
    use agora::domain::{Change, Event, Session};
    use agora::transport::PeerRequest;

    let c = TestCluster::start(47, one_node_dcs(2)).await;
    let before = c.must_converge(Duration::from_secs(5)).await;
    let forged = |origin: &str| PeerRequest::Replicate {
        origin: origin.into(),
        events: vec![Event {
            seq: 1,
            origin: origin.into(),
            hlc: 1,
            change: Change::Session(Session { token: "forged".into(), user: "mallory".into(), dc: origin.into(), hlc: 1, deleted: false }),
        }],
    };
    // A certificate of the cluster's CA for a node the cluster file does not know: the
    // connection is refused before any frame is read.
    let stranger = agora::certs::Role::Node { dc: "dc9".into(), name: "dc9-n9".into() };
    agora::certs::issue_extra(&c.certs_dir(), &stranger, Default::default()).unwrap();
    let r = c.peer_call_with("dc1-n1", "dc9-n9", &forged("dc9")).await;
    assert!(r.is_err(), "a node outside the cluster file was answered: {r:?}");
    // dc2's node (its own certificate) speaking for dc3, and for dc1 itself.
    for req in [forged("dc3"), forged("dc1")] {
        let resp = c.peer_call("dc1-n1", 21, req).await;
        assert!(matches!(resp, agora::transport::PeerResponse::Refused(_)), "{resp:?}");
    }
    assert_eq!(c.get("dc1-n1", "/v1/sessions/forged?consistency=stale").await.0, 404);
    assert_eq!(c.must_converge(Duration::from_secs(5)).await, before);
}

/// The snapshot goes in pages of `batch_len_max` changes (here about six of them), the
/// cursor moving only with the last.
#[tokio::test]
async fn a_dc_past_the_outbox_cap_catches_up_from_a_snapshot() {
    let c = TestCluster::start(48, Options { dcs: 2, nodes: 1, replication: "outbox_len_max = 10\nbatch_len_max = 8", ..Options::default() }).await;
    c.must_converge(Duration::from_secs(5)).await;
    c.cut(&c.dc_nodes("dc1"), &c.dc_nodes("dc2")).await;
    let mut tokens = Vec::new();
    for i in 0..40 {
        tokens.push(c.must_session("dc1-n1", &format!("u{i}")).await);
    }
    // dc1 trims its outbox to the cap while dc2 cannot acknowledge.
    must_eventually(Duration::from_secs(10), "dc1's outbox trimmed past dc2's cursor", || async {
        let (_, s) = c.get("dc1-n1", "/v1/cluster/status").await;
        (s["outbox_floor"].as_u64()? > 11).then_some(())
    })
    .await;
    c.heal().await;
    c.must_converge(Duration::from_secs(15)).await;
    for t in &tokens {
        assert_eq!(c.get("dc2-n1", &format!("/v1/sessions/{t}?consistency=stale")).await.0, 200);
    }
    let (_, s) = c.get("dc1-n1", "/v1/cluster/status").await;
    let dc2 = s["dcs"].as_array().unwrap().iter().find(|d| d["name"] == "dc2").unwrap().clone();
    assert!(dc2["snapshot_catchups"].as_u64().unwrap() >= 1, "status says dc2 was caught up from a snapshot: {s}");
}
