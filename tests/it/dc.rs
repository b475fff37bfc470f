//! One datacentre's Raft group: replication, failover, durability, snapshots, membership,
//! partitions.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{must_eventually, Options, TestCluster};

#[tokio::test]
async fn write_to_follower_is_committed_and_readable_on_all_three() {
    let c = TestCluster::start(11, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let follower = c.names.iter().find(|n| **n != leader).unwrap().clone();
    let token = c.must_session(&follower, "alice").await;
    for n in &c.names {
        // Linearizable by default: every node answers with the committed write.
        let (code, v) = c.get(n, &format!("/v1/sessions/{token}")).await;
        assert_eq!(code, 200, "{n}: {v}");
        assert_eq!(v["user"], "alice");
        // A stale read converges too, from the node's own state machine.
        must_eventually(Duration::from_secs(5), "stale read", || async {
            let (code, _) = c.get(n, &format!("/v1/sessions/{token}?consistency=stale")).await;
            (code == 200).then_some(())
        })
        .await;
    }
    c.must_converge(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn leader_kill_elects_a_new_leader_and_writes_resume() {
    let mut c = TestCluster::start(12, Options::default()).await;
    let old = c.must_leader(Duration::from_secs(10)).await;
    let survivor = c.names.iter().find(|n| **n != old).unwrap().clone();
    c.must_session(&survivor, "before").await;
    let killed_at = Instant::now();
    c.kill(&old);
    // Writes through a survivor until one succeeds: the measured write gap.
    let gap = must_eventually(Duration::from_secs(15), "a write after the leader kill", || async {
        let (code, _) = c.post(&survivor, "/v1/sessions", json!({"user": "after"})).await;
        (code == 201).then(|| killed_at.elapsed())
    })
    .await;
    let new = c.must_leader(Duration::from_secs(10)).await;
    assert_ne!(new, old);
    println!("leader {old} killed: new leader {new}, write gap {} ms", gap.as_millis());
    c.start_node(&old);
    c.must_converge(Duration::from_secs(15)).await;
}

#[tokio::test]
async fn killed_node_restarts_with_every_acknowledged_write() {
    let mut c = TestCluster::start(13, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let victim = c.names.iter().find(|n| **n != leader).unwrap().clone();
    let token = c.must_session(&leader, "buyer").await;
    c.must_restock(&leader, "sku-a", 10_000).await;
    // Load from a background task while the victim is SIGKILLed and restarted.
    let load = {
        let (http, url, token) = (c.http.clone(), c.url(&leader), token.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for _ in 0..300 {
                let r = http.post(format!("{url}/v1/orders")).json(&json!({"session": token, "sku": "sku-a", "qty": 1})).send().await;
                if let Ok(r) = r {
                    if r.status() == 201 {
                        let v: serde_json::Value = r.json().await.unwrap();
                        acked.push(v["id"].as_str().unwrap().to_string());
                    }
                }
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill(&victim);
    c.start_node(&victim);
    let acked = load.await.unwrap();
    assert!(acked.len() >= 150, "enough orders acknowledged to matter, got {}", acked.len());
    // The leader too: kill it and restart it from its own data dir.
    c.kill(&leader);
    c.start_node(&leader);
    c.must_leader(Duration::from_secs(15)).await;
    c.must_converge(Duration::from_secs(15)).await;
    for n in c.names.clone() {
        for id in &acked {
            let (code, v) = c.get(&n, &format!("/v1/orders/{id}?consistency=stale")).await;
            assert_eq!(code, 200, "acknowledged order {id} missing on {n}: {v}");
        }
    }
    let (_, inv) = c.get(&c.names[0], "/v1/inventory/sku-a").await;
    assert_eq!(inv["available"], 10_000 - acked.len() as u64, "stock must match the acknowledged orders: {inv}");
}

#[tokio::test]
async fn wiped_node_rejoins_from_a_snapshot() {
    let mut c = TestCluster::start(14, Options { raft: "snapshot_logs_since_last = 50\nlogs_to_keep_after_snapshot = 10", ..Options::default() }).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let victim = c.names.iter().find(|n| **n != leader).unwrap().clone();
    c.wipe(&victim);
    let mut tokens = Vec::new();
    for i in 0..150 {
        tokens.push(c.must_session(&leader, &format!("u{i}")).await);
    }
    // The log behind the snapshot is purged, so the wiped node can only catch up by snapshot.
    must_eventually(Duration::from_secs(10), "log purged on the leader", || async {
        let s = c.status(&leader).await?;
        (s["purged_index"].as_u64()? > 20).then_some(())
    })
    .await;
    let term = c.status(&leader).await.expect("leader status")["term"].as_u64().expect("term");
    // The leader cannot reach the wiped node at first (the other follower can): the node
    // must stay quiet. Had it initialised itself, it would campaign — never winning, its
    // log being empty — and its higher term would depose the leader once they meet.
    let faults = |ids: Vec<u64>| serde_json::json!({ "partitioned": ids });
    let (code, v) = c.request(reqwest::Method::PUT, &leader, "/v1/admin/faults", Some(faults(vec![TestCluster::id(&victim)])), None).await;
    assert_eq!(code, 200, "{v}");
    c.start_node(&victim);
    must_eventually(Duration::from_secs(10), "the wiped node serves its status", || async { c.status(&victim).await }).await;
    // Three election timeouts (the harness's are at most 800 ms) to campaign in, if it would.
    let quiet_until = std::time::Instant::now() + Duration::from_millis(2400);
    while std::time::Instant::now() < quiet_until {
        let s = c.status(&victim).await.expect("victim status");
        assert_eq!(s["term"].as_u64(), Some(0), "the wiped node campaigned: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, v) = c.request(reqwest::Method::PUT, &leader, "/v1/admin/faults", Some(faults(vec![])), None).await;
    assert_eq!(code, 200, "{v}");
    c.must_converge(Duration::from_secs(20)).await;
    // The wiped node did not initialise itself (it would have campaigned, and its higher
    // term deposed the leader): the same leader, in the same term.
    let s = c.status(&leader).await.expect("leader status");
    assert_eq!((s["role"].as_str(), s["term"].as_u64()), (Some("leader"), Some(term)), "{s}");
    // The installed state is read at once; Raft's own metrics follow a moment later.
    must_eventually(Duration::from_secs(10), "the victim reports the snapshot it installed", || async { c.status(&victim).await?["snapshot_index"].as_u64() })
        .await;
    for t in tokens.iter().step_by(10) {
        let (code, _) = c.get(&victim, &format!("/v1/sessions/{t}?consistency=stale")).await;
        assert_eq!(code, 200);
    }
    // The builds and the install are counted in /metrics.
    let value = |text: &str, name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(&format!("{name}{{"))).unwrap_or_else(|| panic!("{name} in /metrics"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let leader_metrics = c.http.get(format!("{}/metrics", c.url(&leader))).send().await.unwrap().text().await.unwrap();
    assert!(value(&leader_metrics, "agora_snapshot_builds_total") >= 1.0, "{leader_metrics}");
    assert!(value(&leader_metrics, "agora_snapshot_records") >= 150.0, "the state's size is known: {leader_metrics}");
    let victim_metrics = c.http.get(format!("{}/metrics", c.url(&victim))).send().await.unwrap().text().await.unwrap();
    assert!(value(&victim_metrics, "agora_snapshot_installs_total") >= 1.0, "{victim_metrics}");
}

#[tokio::test]
async fn isolated_leader_loses_writes_to_the_majority_and_rejoins() {
    let c = TestCluster::start(15, Options::default()).await;
    let old = c.must_leader(Duration::from_secs(10)).await;
    let others: Vec<String> = c.names.iter().filter(|n| **n != old).cloned().collect();
    // Cut the leader off from both followers, in both directions.
    c.cut(&[old.clone()], &others).await;
    // The majority elects a new leader and keeps taking writes.
    let token = must_eventually(Duration::from_secs(15), "a write on the majority side", || async {
        let (code, v) = c.post(&others[0], "/v1/sessions", json!({"user": "majority"})).await;
        (code == 201).then(|| v["token"].as_str().unwrap().to_string())
    })
    .await;
    // The isolated old leader cannot acknowledge a write, nor serve a linearizable read.
    let (code, v) = c.post(&old, "/v1/sessions", json!({"user": "minority"})).await;
    assert_eq!(code, 503, "isolated node must not acknowledge: {v}");
    let (code, _) = c.get(&old, &format!("/v1/sessions/{token}")).await;
    assert_eq!(code, 503, "isolated node must not serve a linearizable read");
    c.heal().await;
    c.must_converge(Duration::from_secs(15)).await;
    let (code, _) = c.get(&old, &format!("/v1/sessions/{token}")).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn membership_remove_and_add_back() {
    let c = TestCluster::start(16, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let victim = c.names.iter().find(|n| **n != leader).unwrap().clone();
    let follower = c.names.iter().find(|n| **n != leader && **n != victim).unwrap().clone();
    // Sent to a follower: forwarded to the leader.
    let (code, v) = c.request(reqwest::Method::DELETE, &follower, &format!("/v1/admin/nodes/{victim}"), None, None).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["voters"].as_array().unwrap().len(), 2);
    c.must_session(&leader, "two-voters").await;
    let (code, v) = c.post(&follower, "/v1/admin/nodes", json!({"node": victim})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["voters"].as_array().unwrap().len(), 3);
    let (code, _) = c.post(&follower, "/v1/admin/nodes", json!({"node": "dc9-n9"})).await;
    assert_eq!(code, 404);
    c.must_converge(Duration::from_secs(10)).await;
}
