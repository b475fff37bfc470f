//! DCs of several Raft groups (`[cluster] shards`): entities spread over the shards by a
//! stable hash, an order is one entry in its SKU's shard, first leaders spread over the
//! nodes, a leader kill in one shard leaves the others serving, and shards converge
//! across DCs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use agora::ids::{shard_of, Spread};
use serde_json::{json, Value};

use super::harness::{must_eventually, Options, TestCluster};

const SHARDS: u16 = 3;

/// Expiry passes are Raft entries too: kept out of the way of entry counts. Leaders are
/// balanced every half second (instead of five).
fn sharded(dcs: usize, nodes: usize) -> Options {
    Options { dcs, nodes, shards: SHARDS, limits: "expiry_interval_ms = 600000", raft: "leader_balance_interval_ms = 500", ..Options::default() }
}

/// `/v1/cluster/status` of `node`, per shard.
async fn shards_of(c: &TestCluster, node: &str) -> Vec<Value> {
    try_shards_of(c, node).await.unwrap_or_else(|| panic!("status of {node}"))
}

async fn try_shards_of(c: &TestCluster, node: &str) -> Option<Vec<Value>> {
    let (code, v) = c.get(node, "/v1/cluster/status").await;
    (code == 200).then(|| v["shards"].as_array().cloned()).flatten()
}

/// Every shard's leader as `node` sees it, once each has one.
async fn must_shard_leaders(c: &TestCluster, node: &str) -> Vec<String> {
    must_eventually(Duration::from_secs(20), "a leader in every shard", || async {
        let shards = shards_of(c, node).await;
        shards.iter().map(|s| s["leader"].as_str().map(String::from)).collect::<Option<Vec<_>>>()
    })
    .await
}

/// With shards on subsets (`replicas`), entities live in shards 1 and 2 only: shard 0,
/// on every node, holds the DC's settings.
const ON_SUBSETS: Spread = Spread { count: SHARDS, first: 1 };

/// A session (made on `node`) whose token lands in `shard`.
async fn session_in(c: &TestCluster, node: &str, shard: u16) -> String {
    session_of(c, node, shard, SHARDS.into()).await
}

/// A session (made on `node`) whose token lands in `shard` of `spread`.
async fn session_of(c: &TestCluster, node: &str, shard: u16, spread: Spread) -> String {
    for i in 0..100 {
        let token = c.must_session(node, &format!("user{i}")).await;
        if shard_of(&token, spread) == shard {
            return token;
        }
    }
    panic!("no session landed in shard {shard} in 100 tries");
}

/// A SKU name that lands in `shard`.
fn sku_in(shard: u16, tag: &str) -> String {
    sku_of(shard, tag, SHARDS.into())
}

/// A SKU name that lands in `shard` of `spread`.
fn sku_of(shard: u16, tag: &str, spread: Spread) -> String {
    (0..).map(|i| format!("{tag}-{i}")).find(|s| shard_of(s, spread) == shard).expect("some name lands in every shard")
}

fn applied(shards: &[Value], shard: u16) -> u64 {
    shards[usize::from(shard)]["applied_index"].as_u64().expect("applied index")
}

async fn must_order(c: &TestCluster, node: &str, token: &str, sku: &str) -> String {
    let (code, v) = c.post(node, "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await;
    assert_eq!(code, 201, "order on {node}: {v}");
    v["id"].as_str().expect("order id").to_string()
}

#[tokio::test]
async fn an_order_is_one_entry_in_its_skus_shard_and_leaders_spread() {
    let c = TestCluster::start(137, sharded(1, 3)).await;
    let leaders = must_shard_leaders(&c, "dc1-n1").await;
    let distinct: BTreeSet<&String> = leaders.iter().collect();
    assert!(distinct.len() >= 2, "first leaders spread over the nodes: {leaders:?}");
    // The console says how many shards each node leads: every shard once in all.
    must_eventually(Duration::from_secs(10), "the console's shard leaders", || async {
        let (_, console) = c.get("dc1-n1", "/v1/console").await;
        let nodes = console["dcs"][0]["nodes"].as_array()?.clone();
        let leads: u64 = nodes.iter().map(|n| n["leads"].as_u64().unwrap_or(0)).sum();
        (nodes.iter().all(|n| n["shards"] == SHARDS) && leads == u64::from(SHARDS)).then_some(())
    })
    .await;
    // /metrics labels the Raft gauges and snapshot counters by shard: over the DC's
    // nodes, each shard has exactly one leader.
    must_eventually(Duration::from_secs(10), "one leader per shard in /metrics", || async {
        let mut leads = vec![0.0; usize::from(SHARDS)];
        for n in c.dc_nodes("dc1") {
            let text = c.http.get(format!("{}/metrics", c.url(&n))).send().await.ok()?.text().await.ok()?;
            for shard in 0..SHARDS {
                let label = format!("shard=\"{shard}\"");
                let value =
                    |name: &str| text.lines().find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))?.rsplit(' ').next()?.parse::<f64>().ok();
                value("agora_snapshot_records")?;
                leads[usize::from(shard)] += value("agora_raft_is_leader")?;
            }
        }
        leads.iter().all(|l| *l == 1.0).then_some(())
    })
    .await;
    // Entities of every shard, through any node.
    for shard in 0..SHARDS {
        let token = session_in(&c, "dc1-n2", shard).await;
        let sku = sku_in(shard, "spread");
        c.must_restock("dc1-n3", &sku, 5).await;
        let id = must_order(&c, "dc1-n1", &token, &sku).await;
        assert_eq!(shard_of(&id, SHARDS), shard, "the order id leads to its SKU's shard: {id}");
    }
    // The session in shard 0, the SKU in shard 1: ten orders are ten entries in shard 1,
    // and none in shard 0 (the session is checked there by a read, not a write).
    let token = session_in(&c, "dc1-n1", 0).await;
    let sku = sku_in(1, "one-entry");
    c.must_restock("dc1-n1", &sku, 100).await;
    let before = shards_of(&c, "dc1-n1").await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(must_order(&c, "dc1-n2", &token, &sku).await);
    }
    // dc1-n1 applies what its shards' leaders committed a moment later.
    let after = must_eventually(Duration::from_secs(10), "dc1-n1 applied the ten orders", || async {
        let after = shards_of(&c, "dc1-n1").await;
        (applied(&after, 1) >= applied(&before, 1) + 10).then_some(after)
    })
    .await;
    let grew = applied(&after, 0) - applied(&before, 0);
    assert!(grew < 10, "no write per order in the session's shard: {before:?} → {after:?}");
    for id in &ids {
        for n in c.dc_nodes("dc1") {
            let (code, v) = c.get(&n, &format!("/v1/orders/{id}")).await;
            assert_eq!((code, v["user"].as_str().map(|u| u.starts_with("user"))), (200, Some(true)), "{id} on {n}: {v}");
        }
    }
    // A logged-out session in another shard places nothing.
    let (code, _) = c.request(reqwest::Method::DELETE, "dc1-n1", &format!("/v1/sessions/{token}"), None, None).await;
    assert_eq!(code, 204);
    let (code, v) = c.post("dc1-n3", "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "{v}");
    // Nor does it cancel, though the order's shard does not hold sessions of its token.
    let (code, v) = c.post("dc1-n2", &format!("/v1/orders/{}/cancel", ids[0]), json!({"session": token})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "{v}");
}

/// The shop's exactness test on a sharded DC: 200 buyers, sessions in every shard, 100
/// units of one SKU; exactly 100 orders succeed.
#[tokio::test]
async fn two_hundred_buyers_of_one_hundred_units_over_shards() {
    let c = TestCluster::start(138, sharded(1, 3)).await;
    must_shard_leaders(&c, "dc1-n1").await;
    let sku = sku_in(2, "scarce");
    c.must_restock("dc1-n1", &sku, 100).await;
    let mut tokens = Vec::new();
    for i in 0..20 {
        tokens.push(c.must_session(&format!("dc1-n{}", i % 3 + 1), &format!("buyer{i}")).await);
    }
    let shards: BTreeSet<u16> = tokens.iter().map(|t| shard_of(t, SHARDS)).collect();
    assert_eq!(shards.len(), usize::from(SHARDS), "buyers' sessions in every shard");
    let calls = (0..200).map(|i| {
        let (c, token, sku) = (&c, tokens[i % tokens.len()].clone(), sku.clone());
        async move { c.post(&format!("dc1-n{}", i % 3 + 1), "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await }
    });
    let answers = futures::future::join_all(calls).await;
    let placed = answers.iter().filter(|(c, _)| *c == 201).count();
    let sold_out = answers.iter().filter(|(c, _)| *c == 409).count();
    let others: Vec<&(u16, Value)> = answers.iter().filter(|(c, _)| ![201, 409].contains(c)).collect();
    assert_eq!((placed, sold_out), (100, 100), "other answers: {others:?}");
    let (_, inv) = c.get("dc1-n2", &format!("/v1/inventory/{sku}")).await;
    assert_eq!(inv["available"], 0, "{inv}");
}

#[tokio::test]
async fn a_leader_kill_in_one_shard_leaves_the_others_serving() {
    let mut c = TestCluster::start(139, sharded(1, 3)).await;
    let leaders = must_shard_leaders(&c, "dc1-n1").await;
    let victim = leaders[0].clone();
    let token = session_in(&c, &victim, 0).await;
    let skus: Vec<String> = (0..SHARDS).map(|s| sku_in(s, "kill")).collect();
    for sku in &skus {
        c.must_restock(&victim, sku, 50).await;
    }
    let survivor = c.dc_nodes("dc1").into_iter().find(|n| *n != victim).expect("another node");
    c.kill(&victim);
    // Shards the victim did not lead have a leader throughout: their orders go through
    // at once, while shard 0 elects.
    for (shard, sku) in skus.iter().enumerate() {
        if leaders[shard] != victim {
            must_order(&c, &survivor, &token, sku).await;
        }
    }
    must_eventually(Duration::from_secs(20), "shard 0 serves again", || async {
        let (code, _) = c.post(&survivor, "/v1/orders", json!({"session": token, "sku": skus[0], "qty": 1})).await;
        (code == 201).then_some(())
    })
    .await;
    c.start_node(&victim);
    must_eventually(Duration::from_secs(20), "the restarted node has caught up in every shard", || async {
        let mine = try_shards_of(&c, &victim).await?;
        let theirs = shards_of(&c, &survivor).await;
        (0..SHARDS).all(|s| applied(&mine, s) >= applied(&theirs, s).saturating_sub(5)).then_some(())
    })
    .await;
    // Leaders spread again: the shard the victim is meant to lead is handed back to it.
    must_eventually(Duration::from_secs(20), "every shard led by its preferred node", || async {
        let shards = try_shards_of(&c, &survivor).await?;
        shards.iter().all(|s| s["leader"].is_string() && s["leader"] == s["preferred_leader"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn shards_converge_across_dcs_with_keys_and_lookups() {
    let c = TestCluster::start(140, sharded(2, 1)).await;
    let sku = sku_in(1, "far");
    c.must_restock("dc1-n1", &sku, 10).await;
    c.must_restock("dc2-n1", &sku, 10).await;
    let token = session_in(&c, "dc1-n1", 0).await;
    c.must_converge(Duration::from_secs(15)).await;
    // The same key, the same request: one order, in dc1 and then retried in dc2.
    let body = json!({"session": token, "sku": sku, "qty": 1});
    let (code, first) = c.request(reqwest::Method::POST, "dc1-n1", "/v1/orders", Some(body.clone()), Some("k-1")).await;
    assert_eq!(code, 201, "{first}");
    let (code, again) = c.request(reqwest::Method::POST, "dc1-n1", "/v1/orders", Some(body.clone()), Some("k-1")).await;
    assert_eq!((code, &again["id"]), (201, &first["id"]), "{again}");
    c.must_converge(Duration::from_secs(15)).await;
    let (code, there) = c.request(reqwest::Method::POST, "dc2-n1", "/v1/orders", Some(body.clone()), Some("k-1")).await;
    assert_eq!((code, &there["id"]), (201, &first["id"]), "a retry in dc2 after replication: {there}");
    // The same key with another quantity of the same SKU is not the same request.
    let (code, v) = c.request(reqwest::Method::POST, "dc1-n1", "/v1/orders", Some(json!({"session": token, "sku": sku, "qty": 2})), Some("k-1")).await;
    assert_eq!(code, 422, "{v}");
    // So with a SKU of another shard, in either DC.
    let other = sku_in(2, "far");
    c.must_restock("dc1-n1", &other, 10).await;
    c.must_restock("dc2-n1", &other, 10).await;
    for n in ["dc1-n1", "dc2-n1"] {
        let (code, v) = c.request(reqwest::Method::POST, n, "/v1/orders", Some(json!({"session": token, "sku": other, "qty": 1})), Some("k-1")).await;
        assert_eq!(code, 422, "{n}: {v}");
    }
    // Orders from both DCs, cancels across them, and equal digests per shard.
    let id2 = must_order(&c, "dc2-n1", &token, &sku).await;
    let (code, v) = c.post("dc1-n1", &format!("/v1/orders/{id2}/cancel"), json!({"session": token})).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    c.must_converge(Duration::from_secs(15)).await;
    let (_, d) = c.get("dc2-n1", "/v1/cluster/digest").await;
    assert_eq!(d["shards"].as_array().map(Vec::len), Some(usize::from(SHARDS)), "{d}");
    let (_, inv) = c.get("dc1-n1", &format!("/v1/inventory/{sku}")).await;
    assert_eq!(inv["total"], 19, "one order left of three calls and a cancel: {inv}");
    let (_, inv) = c.get("dc2-n1", &format!("/v1/inventory/{other}")).await;
    assert_eq!(inv["total"], 20, "no order for a reused key: {inv}");
    // Logged out, the session cancels nothing in the other DC either: dc2's shard of the
    // order does not hold the session, the node that takes the forwarded cancel checks it.
    let id3 = must_order(&c, "dc2-n1", &token, &sku).await;
    let (code, _) = c.request(reqwest::Method::DELETE, "dc1-n1", &format!("/v1/sessions/{token}"), None, None).await;
    assert_eq!(code, 204);
    c.must_converge(Duration::from_secs(15)).await;
    let (code, v) = c.post("dc1-n1", &format!("/v1/orders/{id3}/cancel"), json!({"session": token})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "{v}");
    let (_, o) = c.get("dc2-n1", &format!("/v1/orders/{id3}")).await;
    assert_eq!(o["status"], "placed", "{o}");
}

/// Membership changes go to every shard: a node removed from a sharded DC leaves every
/// group, the DC keeps taking orders in every shard, and once added back the node catches
/// up in every shard with every acknowledged order.
#[tokio::test]
async fn a_node_removed_and_added_back_leaves_and_rejoins_every_shard() {
    let c = TestCluster::start(142, sharded(1, 3)).await;
    must_shard_leaders(&c, "dc1-n1").await;
    let voters = |shards: &[Value]| shards.iter().map(|s| s["voters"].as_array().map_or(0, Vec::len)).collect::<Vec<_>>();
    let (code, v) = c.request(reqwest::Method::DELETE, "dc1-n2", "/v1/admin/nodes/dc1-n3", None, None).await;
    assert_eq!(code, 200, "{v}");
    // A shard dc1-n3 led elects another leader once its removal commits.
    must_eventually(Duration::from_secs(20), "two voters and a leader other than dc1-n3 in every shard", || async {
        let shards = shards_of(&c, "dc1-n1").await;
        let led_elsewhere = shards.iter().all(|s| s["leader"].as_str().is_some_and(|l| l != "dc1-n3"));
        (voters(&shards) == vec![2; usize::from(SHARDS)] && led_elsewhere).then_some(())
    })
    .await;
    // Orders in every shard while dc1-n3 is out.
    let token = c.must_session("dc1-n1", "member").await;
    let mut ids = Vec::new();
    for shard in 0..SHARDS {
        let sku = sku_in(shard, "member");
        c.must_restock("dc1-n2", &sku, 5).await;
        ids.push(must_order(&c, "dc1-n1", &token, &sku).await);
    }
    let (code, v) = c.post("dc1-n1", "/v1/admin/nodes", json!({"node": "dc1-n3"})).await;
    assert_eq!(code, 200, "{v}");
    must_eventually(Duration::from_secs(10), "three voters in every shard", || async {
        (voters(&shards_of(&c, "dc1-n1").await) == vec![3; usize::from(SHARDS)]).then_some(())
    })
    .await;
    c.must_converge(Duration::from_secs(15)).await;
    for id in &ids {
        let (code, v) = c.get("dc1-n3", &format!("/v1/orders/{id}?consistency=stale")).await;
        assert_eq!(code, 200, "{id} on the node added back: {v}");
    }
}

/// Shards on subsets of the nodes (`[cluster] replicas`): five nodes, three shards,
/// three replicas of shards 1 and 2 (shard 0 is on every node and holds no entities).
/// Each node holds the shards placed on it and no data of the others, and still takes
/// any request — sessions, stock, orders, reads, cancels, logouts — for any shard,
/// through the shard's leader; digests agree; and a node that holds every shard can be
/// lost.
#[tokio::test]
async fn shards_on_subsets_of_nodes_serve_through_every_node() {
    let mut c = TestCluster::start(148, Options { replicas: 3, ..sharded(1, 5) }).await;
    must_shard_leaders(&c, "dc1-n4").await;
    // Shard k's replicas are nodes k, k+1, k+2 (counted from 0): dc1-n1 holds shard 0
    // only, dc1-n2 lacks shard 2, dc1-n5 lacks shard 1, dc1-n3 and dc1-n4 hold all three.
    let placed = |node: usize, shard: u16| shard == 0 || (0..3).any(|i| (usize::from(shard) + i) % 5 == node - 1);
    let nodes: Vec<String> = c.dc_nodes("dc1");
    must_eventually(Duration::from_secs(20), "each node holding exactly the shards placed on it", || async {
        for (i, n) in nodes.iter().enumerate() {
            let shards = try_shards_of(&c, n).await?;
            let hosted: Vec<bool> = shards.iter().map(|s| s["hosted"].as_bool().unwrap_or(false)).collect();
            let want: Vec<bool> = (0..SHARDS).map(|s| placed(i + 1, s)).collect();
            (hosted == want).then_some(())?;
        }
        Some(())
    })
    .await;
    let voters_of_1: BTreeSet<String> =
        shards_of(&c, "dc1-n4").await[1]["voters"].as_array().expect("voters").iter().filter_map(|v| v.as_str().map(String::from)).collect();
    assert_eq!(voters_of_1, BTreeSet::from(["dc1-n2".to_string(), "dc1-n3".into(), "dc1-n4".into()]), "shard 1's voters");
    // Orders in every shard through every node, with sessions of another shard, read back
    // linearizably through every node.
    let before = shards_of(&c, "dc1-n4").await;
    let mut placed_orders = Vec::new();
    let mut read_index_reads = 0.0;
    for shard in 1..SHARDS {
        let sku = sku_of(shard, "subset", ON_SUBSETS);
        c.must_restock("dc1-n1", &sku, 20).await;
        for n in &nodes {
            // The session in the other data shard.
            let token = session_of(&c, n, SHARDS - shard, ON_SUBSETS).await;
            let reads_before = c.metric_total("agora_read_index_reads_total").await;
            placed_orders.push((must_order(&c, n, &token, &sku).await, token, sku.clone()));
            read_index_reads += c.metric_total("agora_read_index_reads_total").await - reads_before;
        }
    }
    // Every node found the live session in a copy — its own replica, or (dc1-n1, and the
    // nodes lacking the session's shard) its shard leader's — and not through a
    // linearizable read.
    assert_eq!(read_index_reads, 0.0, "read-index reads for orders of live sessions");
    for (id, token, sku) in &placed_orders {
        for n in &nodes {
            let (code, v) = c.get(n, &format!("/v1/orders/{id}")).await;
            assert_eq!((code, v["id"].as_str(), v["status"].as_str()), (200, Some(id.as_str()), Some("placed")), "{id} on {n}: {v}");
            let (code, v) = c.get(n, &format!("/v1/sessions/{token}")).await;
            assert_eq!(code, 200, "{token} on {n}: {v}");
            let (code, v) = c.get(n, &format!("/v1/inventory/{sku}")).await;
            let left = 20 - u64::try_from(nodes.len()).expect("a few nodes");
            assert_eq!((code, v["available"].as_u64()), (200, Some(left)), "one order per node: {sku} on {n}: {v}");
        }
    }
    // A node holds nothing of a shard it is not placed on, and shard 0 took none of it.
    let (lacking, holding) = (shards_of(&c, "dc1-n1").await, shards_of(&c, "dc1-n4").await);
    assert!(applied(&holding, 0) < applied(&before, 0) + 3, "no entity writes in shard 0: {before:?} → {holding:?}");
    assert_eq!(applied(&lacking, 1), 0, "dc1-n1 holds no replica of shard 1: {lacking:?}");
    assert!(applied(&holding, 1) > 0, "{holding:?}");
    c.must_converge(Duration::from_secs(15)).await;
    // A logout in shard 1, written through a node that holds it, refuses an order and a
    // cancel through dc1-n1, which must ask shard 1's leader.
    let token = session_of(&c, "dc1-n2", 1, ON_SUBSETS).await;
    let sku = sku_of(2, "subset", ON_SUBSETS);
    let id = must_order(&c, "dc1-n1", &token, &sku).await;
    let (code, _) = c.request(reqwest::Method::DELETE, "dc1-n2", &format!("/v1/sessions/{token}"), None, None).await;
    assert_eq!(code, 204);
    let (code, v) = c.post("dc1-n1", "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "{v}");
    let (code, v) = c.post("dc1-n1", &format!("/v1/orders/{id}/cancel"), json!({"session": token})).await;
    assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "{v}");
    // A key is one request, whichever shard its first use went to: reused with a SKU of
    // another shard, it is refused through nodes that hold no replica of the first one.
    let token = session_of(&c, "dc1-n2", 1, ON_SUBSETS).await;
    let (first, second) = (sku_of(1, "subset", ON_SUBSETS), sku_of(2, "subset", ON_SUBSETS));
    let (code, v) =
        c.request(reqwest::Method::POST, "dc1-n2", "/v1/orders", Some(json!({"session": token, "sku": first, "qty": 1})), Some("one-request")).await;
    assert_eq!(code, 201, "{v}");
    for n in ["dc1-n5", "dc1-n1"] {
        let (code, v) = c.request(reqwest::Method::POST, n, "/v1/orders", Some(json!({"session": token, "sku": second, "qty": 1})), Some("one-request")).await;
        assert_eq!((code, v["error"]["code"].as_str()), (422, Some("idempotency_mismatch")), "through {n}: {v}");
    }
    // dc1-n3 holds every shard; without it, every shard still takes orders through dc1-n1.
    c.kill("dc1-n3");
    // A write whose shard dc1-n3 led is refused (503) until the others elect.
    let token = must_eventually(Duration::from_secs(20), "a session after the kill", || async {
        let (code, v) = c.post("dc1-n2", "/v1/sessions", json!({"user": "after-kill"})).await;
        (code == 201).then(|| v["token"].as_str().map(String::from)).flatten()
    })
    .await;
    for shard in 1..SHARDS {
        let sku = sku_of(shard, "subset", ON_SUBSETS);
        must_eventually(Duration::from_secs(20), &format!("shard {shard} serving through dc1-n1"), || async {
            let (code, _) = c.post("dc1-n1", "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await;
            (code == 201).then_some(())
        })
        .await;
    }
}

/// With shards on subsets, removing a node first moves each of its replicas to another
/// node, and adding it back moves a share of the replicas onto it; every acknowledged
/// order survives both, and the DC takes orders in every shard throughout.
#[tokio::test]
async fn removing_and_adding_a_node_moves_shard_replicas() {
    let c = TestCluster::start(149, Options { replicas: 3, ..sharded(1, 5) }).await;
    must_shard_leaders(&c, "dc1-n4").await;
    let token = c.must_session("dc1-n1", "mover").await;
    let skus: Vec<String> = (1..SHARDS).map(|s| sku_of(s, "move", ON_SUBSETS)).collect();
    let mut ids = Vec::new();
    for sku in &skus {
        c.must_restock("dc1-n1", sku, 50).await;
        ids.push(must_order(&c, "dc1-n2", &token, sku).await);
    }
    // dc1-n3 holds a replica of shards 1 and 2: both move before it leaves.
    let (code, v) = c.request(reqwest::Method::DELETE, "dc1-n1", "/v1/admin/nodes/dc1-n3", None, None).await;
    assert_eq!(code, 200, "{v}");
    let moves = v["moves"].as_array().cloned().unwrap_or_default();
    assert_eq!(moves.len(), 2, "{v}");
    assert!(moves.iter().all(|m| m["removed"] == "dc1-n3" && m["added"].is_string()), "{v}");
    // Each data shard has three voters again, none of them dc1-n3, and dc1-n3 finds out
    // it holds no replica.
    must_eventually(Duration::from_secs(20), "dc1-n3 out of every shard, three voters in each", || async {
        let out = try_shards_of(&c, "dc1-n3").await?;
        (out.iter().all(|s| s["hosted"] == false)).then_some(())?;
        for shard in 1..SHARDS {
            let voters = voters_where_hosted(&c, shard).await?;
            (voters.len() == 3 && !voters.contains("dc1-n3")).then_some(())?;
        }
        Some(())
    })
    .await;
    for sku in &skus {
        ids.push(must_order(&c, "dc1-n3", &token, sku).await);
    }
    // Back in: it takes a replica from the most loaded nodes.
    must_add_node(&c, "dc1-n3").await;
    for sku in &skus {
        ids.push(must_order(&c, "dc1-n3", &token, sku).await);
    }
    c.must_converge(Duration::from_secs(15)).await;
    must_serve_everywhere(&c, &ids).await;
}

/// With shards on subsets, the replicas of a node that has failed its probes for
/// `replace_dead_after_s` move to living nodes without an operator: each shard it held
/// has three voters again, none of them the dead node, every acknowledged order is
/// served, and every shard takes new orders.
#[tokio::test]
async fn a_dead_nodes_replicas_move_to_living_nodes() {
    let mut c = TestCluster::start(150, Options { replicas: 3, cluster: "replace_dead_after_s = 2", ..sharded(1, 5) }).await;
    must_shard_leaders(&c, "dc1-n1").await;
    let (token, skus, mut ids) = an_order_in_every_shard(&c, "survivor", "dead").await;
    // dc1-n3 holds a replica of shards 1 and 2.
    for shard in 1..SHARDS {
        let voters = must_eventually(Duration::from_secs(10), "a shard's voters", || voters_where_hosted(&c, shard)).await;
        assert!(voters.contains("dc1-n3"), "shard {shard}: {voters:?}");
    }
    c.kill("dc1-n3");
    must_have_three_voters_without(&c, "dc1-n3").await;
    // Each move waited out the dead node's two seconds of failed probes.
    let waited: Vec<u64> = c
        .dc_nodes("dc1")
        .iter()
        .flat_map(|n| c.log(n).lines().filter(|l| l.contains("moving a dead node's replica")).map(String::from).collect::<Vec<_>>())
        .filter_map(|l| l.split("failing_ms=").nth(1)?.split(|ch: char| !ch.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(waited.len() >= usize::from(SHARDS - 1) && waited.iter().all(|ms| *ms >= 2000), "moves logged with their wait: {waited:?}");
    for sku in &skus {
        ids.push(must_order(&c, "dc1-n4", &token, sku).await);
    }
    // Back, dc1-n3 learns it holds neither shard any more; restarted once more, it
    // deletes their data, and serves both through their leaders.
    c.start_node("dc1-n3");
    must_eventually(Duration::from_secs(20), "dc1-n3 finding it holds no entity shard", || async {
        let out = try_shards_of(&c, "dc1-n3").await?;
        (1..SHARDS).all(|k| out[usize::from(k)]["hosted"] == false).then_some(())
    })
    .await;
    c.stop("dc1-n3");
    c.start_node("dc1-n3");
    must_eventually(Duration::from_secs(20), "dc1-n3 up again", || async { try_shards_of(&c, "dc1-n3").await }).await;
    // Each shard's trees (log, state, metadata) were there to delete.
    let log = c.log("dc1-n3");
    let wiped = log.lines().filter(|l| l.contains("deleted the data of a replica removed from its group") && !l.contains("trees=0")).count();
    assert_eq!(wiped, usize::from(SHARDS - 1), "{log}");
    for sku in &skus {
        ids.push(must_order(&c, "dc1-n3", &token, sku).await);
    }
    must_serve_everywhere(&c, &ids).await;
}

/// With shards on subsets, a node back from the dead gets replicas again without an
/// operator: its replicas moved off while it was away, and once the DC's replica counts
/// have stayed uneven for `rebalance_after_s`, a replica moves onto it from the most
/// loaded node, until no node holds two more than another. Every acknowledged order is
/// served after.
#[tokio::test]
async fn a_node_back_from_the_dead_gets_its_share_of_replicas_again() {
    let opts = Options { replicas: 3, cluster: "replace_dead_after_s = 2\nrebalance_after_s = 2", ..sharded(1, 5) };
    let mut c = TestCluster::start(151, opts).await;
    must_shard_leaders(&c, "dc1-n1").await;
    let (token, skus, mut ids) = an_order_in_every_shard(&c, "returner", "back").await;
    c.kill("dc1-n3");
    must_have_three_voters_without(&c, "dc1-n3").await;
    c.start_node("dc1-n3");
    let load = must_eventually(Duration::from_secs(40), "replicas even again, some on dc1-n3", || async {
        let mut load: BTreeMap<String, usize> = c.dc_nodes("dc1").into_iter().map(|n| (n, 0)).collect();
        for shard in 1..SHARDS {
            let voters = voters_where_hosted(&c, shard).await?;
            (voters.len() == 3).then_some(())?;
            for v in voters {
                *load.get_mut(&v)? += 1;
            }
        }
        let (min, max) = (*load.values().min()?, *load.values().max()?);
        (load["dc1-n3"] > 0 && max - min <= 1).then_some(load)
    })
    .await;
    assert!(c.dc_nodes("dc1").iter().any(|n| c.log(n).contains("rebalancing a replica")), "moved by the rebalancing, not by hand: {load:?}");
    for sku in &skus {
        ids.push(must_order(&c, "dc1-n3", &token, sku).await);
    }
    must_serve_everywhere(&c, &ids).await;
}

/// A session and one order in every entity shard (SKUs tagged `tag`, 50 units each):
/// the session's token, the SKUs and the acknowledged orders' ids.
async fn an_order_in_every_shard(c: &TestCluster, user: &str, tag: &str) -> (String, Vec<String>, Vec<String>) {
    let token = c.must_session("dc1-n1", user).await;
    let skus: Vec<String> = (1..SHARDS).map(|s| sku_of(s, tag, ON_SUBSETS)).collect();
    let mut ids = Vec::new();
    for sku in &skus {
        c.must_restock("dc1-n1", sku, 50).await;
        ids.push(must_order(c, "dc1-n2", &token, sku).await);
    }
    (token, skus, ids)
}

/// Every order of `ids` read through every node of dc1.
async fn must_serve_everywhere(c: &TestCluster, ids: &[String]) {
    for id in ids {
        for n in c.dc_nodes("dc1") {
            let (code, v) = c.get(&n, &format!("/v1/orders/{id}")).await;
            assert_eq!(code, 200, "{id} through {n}: {v}");
        }
    }
}

/// Waits until every entity shard has three voters, `gone` not among them.
async fn must_have_three_voters_without(c: &TestCluster, gone: &str) {
    must_eventually(Duration::from_secs(40), &format!("three voters in every shard, {gone} not among them"), || async {
        for shard in 1..SHARDS {
            let voters = voters_where_hosted(c, shard).await?;
            (voters.len() == 3 && !voters.contains(gone)).then_some(())?;
        }
        Some(())
    })
    .await;
}

/// The voters of `shard` as its leader sees them: of the nodes that hold a replica and
/// say they lead it, the one with the highest term (a leader restarted after it was
/// replaced takes itself for the leader until it hears the newer term).
async fn voters_where_hosted(c: &TestCluster, shard: u16) -> Option<BTreeSet<String>> {
    let mut best: Option<(u64, BTreeSet<String>)> = None;
    for n in c.dc_nodes("dc1") {
        let Some(shards) = try_shards_of(c, &n).await else { continue };
        let s = &shards[usize::from(shard)];
        if s["hosted"] == true && s["role"] == "leader" {
            let term = s["term"].as_u64()?;
            let voters = s["voters"].as_array()?.iter().filter_map(|v| v.as_str().map(String::from)).collect();
            if best.as_ref().is_none_or(|(t, _)| term > *t) {
                best = Some((term, voters));
            }
        }
    }
    best.map(|(_, v)| v)
}

/// An order in another shard than its session's is checked against this node's own
/// replica of the session's shard, with no read-index round; a logout is therefore
/// recorded in every other shard before it is acknowledged, and the order's shard refuses
/// the session from then on. Here that replica is made stale on purpose: dc1-nB is cut
/// off from the leader of the session's shard, the logout goes through the leader of the
/// SKU's shard, and dc1-nB — whose copy still shows the session live — must not place
/// the order.
#[tokio::test]
async fn a_logout_is_seen_by_orders_in_other_shards_through_a_stale_replica() {
    let c = TestCluster::start(152, sharded(1, 3)).await;
    // Shards s and t led by different nodes a and c; b is the third node.
    let (s, t, a, b, cc) = must_eventually(Duration::from_secs(30), "two shards with different leaders", || async {
        let leaders = must_shard_leaders(&c, "dc1-n1").await;
        let (s, t) = (0..SHARDS).flat_map(|s| (0..SHARDS).map(move |t| (s, t))).find(|&(s, t)| leaders[usize::from(s)] != leaders[usize::from(t)])?;
        let (a, cc) = (leaders[usize::from(s)].clone(), leaders[usize::from(t)].clone());
        let b = c.dc_nodes("dc1").into_iter().find(|n| *n != a && *n != cc)?;
        Some((s, t, a, b, cc))
    })
    .await;
    let sku = sku_in(t, "revoked");
    c.must_restock(&cc, &sku, 100).await;
    let mut conclusive = 0;
    for attempt in 0..3 {
        let token = session_in(&c, &a, s).await;
        must_order(&c, &b, &token, &sku).await;
        must_eventually(Duration::from_secs(10), "the session on dc1-nB's replica", || async {
            (c.get(&b, &format!("/v1/sessions/{token}?consistency=stale")).await.0 == 200).then_some(())
        })
        .await;
        c.cut(std::slice::from_ref(&a), std::slice::from_ref(&b)).await;
        let (code, v) = c.request(reqwest::Method::DELETE, &cc, &format!("/v1/sessions/{token}"), None, None).await;
        assert_eq!(code, 204, "logout through {cc}: {v}");
        let (code, v) = c.post(&b, "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await;
        // Only a replica that still shows the session live puts the revocation to the test
        // (an election in shard s during the cut may have brought it up to date).
        let stale = c.get(&b, &format!("/v1/sessions/{token}?consistency=stale")).await.0 == 200;
        c.heal().await;
        assert_eq!((code, v["error"]["code"].as_str()), (401, Some("unknown_session")), "attempt {attempt}: order through {b} after the logout: {v}");
        if stale {
            conclusive += 1;
            break;
        }
    }
    assert!(conclusive > 0, "dc1-nB's replica of shard {s} caught up with the logout in every attempt");
}

/// A DC grows by a node its cluster file did not name when the DC started: the file gains
/// the node (and `agora certs create` its certificate), the running nodes restart on the
/// new file one at a time, the new node starts, and `add-node` moves replicas onto it.
/// Every acknowledged order survives, and the new node takes orders in every shard.
#[tokio::test]
async fn a_dc_grows_by_a_node_its_first_cluster_file_did_not_name() {
    let mut c = TestCluster::start(155, Options { replicas: 3, ..sharded(1, 4) }).await;
    must_shard_leaders(&c, "dc1-n1").await;
    let (token, skus, mut ids) = an_order_in_every_shard(&c, "grower", "grow").await;
    c.rewrite_config(&Options { replicas: 3, ..sharded(1, 5) });
    for n in ["dc1-n1", "dc1-n2", "dc1-n3", "dc1-n4"] {
        c.stop(n);
        c.start_node(n);
        must_lead_what_it_hosts(&c, n).await;
    }
    c.start_node("dc1-n5");
    must_lead_what_it_hosts(&c, "dc1-n5").await;
    must_add_node(&c, "dc1-n5").await;
    for sku in &skus {
        let id = must_eventually(Duration::from_secs(20), "an order through dc1-n5", || async {
            let (code, v) = c.post("dc1-n5", "/v1/orders", json!({"session": token, "sku": sku, "qty": 1})).await;
            (code == 201).then(|| v["id"].as_str().map(String::from)).flatten()
        })
        .await;
        ids.push(id);
    }
    must_serve_everywhere(&c, &ids).await;
}

/// Adds `node` through dc1-n1's admin API, checks that replicas move onto it from other
/// nodes, and waits until it holds shard 0 and each of them.
async fn must_add_node(c: &TestCluster, node: &str) {
    let (code, v) = c.post("dc1-n1", "/v1/admin/nodes", json!({ "node": node })).await;
    assert_eq!(code, 200, "{v}");
    let moves = v["moves"].as_array().cloned().unwrap_or_default();
    assert!(!moves.is_empty() && moves.iter().all(|m| m["added"] == node && m["removed"].is_string()), "{v}");
    must_eventually(Duration::from_secs(30), &format!("{node} holding shard 0 and the replicas moved onto it"), || async {
        let mine = try_shards_of(c, node).await?;
        (mine[0]["hosted"] == true).then_some(())?;
        for m in &moves {
            (mine[usize::try_from(m["shard"].as_u64()?).ok()?]["hosted"] == true).then_some(())?;
        }
        Some(())
    })
    .await;
}

/// Waits until `node` answers and sees a leader in every shard it holds a replica of.
async fn must_lead_what_it_hosts(c: &TestCluster, node: &str) {
    must_eventually(Duration::from_secs(30), &format!("{node} up, with a leader in every shard it holds"), || async {
        let shards = try_shards_of(c, node).await?;
        shards.iter().filter(|s| s["hosted"] == true).all(|s| s["leader"].is_string()).then_some(())
    })
    .await;
}

/// A key is one request even when two requests with it, for SKUs of two shards, arrive at
/// once through two nodes: exactly one is placed, the other refused (422), for keys whose
/// claim lands in either SKU's shard or in a third.
#[tokio::test]
async fn one_key_sent_at_once_for_two_shards_places_one_order() {
    let c = TestCluster::start(156, sharded(1, 3)).await;
    must_shard_leaders(&c, "dc1-n1").await;
    let token = c.must_session("dc1-n1", "racer").await;
    let (a, b) = (sku_in(1, "race"), sku_in(2, "race"));
    for sku in [&a, &b] {
        c.must_restock("dc1-n1", sku, 100).await;
    }
    // The token is random, and so is where a key's claim lands: take four keys whose
    // claim lands in each shard.
    let claim_shard = |key: &str| shard_of(&agora::domain::command::order_key_scope(&token, key), Spread::from(SHARDS));
    let keys: Vec<String> =
        (0..u16::from(SHARDS)).flat_map(|shard| (0..1000).map(|i| format!("race-{i}")).filter(move |k| claim_shard(k) == shard).take(4)).collect();
    assert_eq!(keys.len(), 4 * usize::from(SHARDS), "four keys for each shard among 1,000");
    for key in keys {
        let send = |node: &'static str, sku: String| {
            let (c, token, key) = (&c, token.clone(), key.clone());
            async move { c.request(reqwest::Method::POST, node, "/v1/orders", Some(json!({"session": token, "sku": sku, "qty": 1})), Some(&key)).await }
        };
        let ((code_a, va), (code_b, vb)) = tokio::join!(send("dc1-n1", a.clone()), send("dc1-n2", b.clone()));
        let codes = BTreeSet::from([code_a, code_b]);
        assert_eq!(codes, BTreeSet::from([201, 422]), "key {key}: {va} / {vb}");
        let refused = if code_a == 422 { &va } else { &vb };
        assert_eq!(refused["error"]["code"], "idempotency_mismatch", "{refused}");
    }
}
