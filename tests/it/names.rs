//! Nodes named by host, as pods of a StatefulSet are: the cluster file holds no peer's
//! address, only names, which each node resolves (its own `/etc/hosts` here) every time it
//! connects.

use std::time::Duration;

use serde_json::json;

use crate::harness::{dig_short, must_eventually, Options, TestCluster};

/// Two DCs whose nodes know each other by name only elect, replicate across DCs and answer
/// DNS with the addresses the names resolve to. A node that comes back at another address
/// (a rescheduled pod) is found again under its name: its DC replicates to it there, and
/// the other DC's DNS answers move to the new address.
#[tokio::test]
async fn nodes_found_by_name_follow_a_node_that_moves() {
    let mut c = TestCluster::start(143, Options { dcs: 2, named: true, ..Options::default() }).await;
    let token = c.must_session("dc1-n1", "hana").await;
    must_eventually(Duration::from_secs(20), "dc1's session in dc2, shipped to names", || async {
        (c.get("dc2-n2", &format!("/v1/sessions/{token}?consistency=stale")).await.0 == 200).then_some(())
    })
    .await;
    let dc2_dns = "127.143.2.1";
    let answer = |want: &'static [&'static str]| async move {
        let mut got = dig_short(dc2_dns, "dc1.shop.agora.test");
        got.sort();
        (got == want).then_some(())
    };
    must_eventually(Duration::from_secs(10), "dc1's resolved addresses in dc2's answer", || answer(&["127.143.1.1", "127.143.1.2", "127.143.1.3"])).await;

    // dc1-n3 comes back at 127.143.1.9: its name now points there, and only there.
    c.kill("dc1-n3");
    let moved = c.dir.path().join("cluster-moved.toml");
    let text = std::fs::read_to_string(c.dir.path().join("cluster.toml")).unwrap().replace("bind = \"127.143.1.3\"", "bind = \"127.143.1.9\"");
    std::fs::write(&moved, text).unwrap();
    let mut hosts: Vec<(String, String)> = c.names.iter().map(|n| (n.clone(), c.url(n).replace("http://", "").replace(":8080", ""))).collect();
    hosts.iter_mut().filter(|(n, _)| n == "dc1-n3").for_each(|(_, ip)| *ip = "127.143.1.9".into());
    c.write_hosts(&hosts);
    c.start_node_with("dc1-n3", &moved);

    // dc1-n3 may have led dc1: writes wait for the next leader.
    must_eventually(Duration::from_secs(20), "a restock in dc1", || async {
        (c.request(reqwest::Method::PUT, "dc1-n1", "/v1/inventory/sku-moved", Some(json!({"add": 5})), None).await.0 == 200).then_some(())
    })
    .await;
    let (code, order) = c.post("dc1-n1", "/v1/orders", json!({"session": token, "sku": "sku-moved", "qty": 1})).await;
    assert_eq!(code, 201, "{order}");
    let id = order["id"].as_str().expect("order id").to_string();
    must_eventually(Duration::from_secs(20), "the order on dc1-n3 at its new address", || async {
        let url = format!("http://127.143.1.9:8080/v1/orders/{id}?consistency=stale");
        let resp = c.http.get(url).send().await.ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    must_eventually(Duration::from_secs(15), "dc2's answer to follow dc1-n3's name", || answer(&["127.143.1.1", "127.143.1.2", "127.143.1.9"])).await;
}
