//! The embedded DNS server of a running cluster, queried with the real `dig`.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::{must_eventually, Options, TestCluster};

/// `dig +short` (or the status line with `+noall +comments`), against `server`.
fn dig(server: &str, args: &[&str]) -> String {
    let out =
        Command::new("dig").arg(format!("@{server}")).args(["-p", "8553", "+time=1", "+tries=1"]).args(args).output().expect("run dig (install dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ips(answer: &str) -> Vec<String> {
    answer.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with(';')).map(String::from).collect()
}

#[tokio::test]
async fn dig_sees_healthy_dcs_round_robin_and_follows_health_and_drain() {
    let c = TestCluster::start(51, Options { dcs: 3, nodes: 1, ..Options::default() }).await;
    let server = c.url("dc1-n1").replace("http://", "").replace(":8080", "");
    let dc_ip = |d: u8| format!("127.{}.{d}.1", c.net);
    // Every DC healthy: one address each, and successive answers lead with each in turn.
    let all = must_eventually(Duration::from_secs(10), "three DCs in the answer", || async {
        let a = ips(&dig(&server, &["shop.agora.test", "+short"]));
        (a.len() == 3).then_some(a)
    })
    .await;
    let mut firsts: Vec<String> = (0..3).map(|_| ips(&dig(&server, &["shop.agora.test", "+short"]))[0].clone()).collect();
    firsts.sort();
    assert_eq!(firsts, vec![dc_ip(1), dc_ip(2), dc_ip(3)], "rotation leads with each DC in turn (first answer was {all:?})");
    assert_eq!(ips(&dig(&server, &["leader.dc2.agora.test", "+short"])), vec![dc_ip(2)]);
    assert!(dig(&server, &["nope.agora.test", "+noall", "+comments"]).contains("status: NXDOMAIN"));
    assert!(dig(&server, &["example.com", "+noall", "+comments"]).contains("status: REFUSED"));
    assert!(!ips(&dig(&server, &["_http._tcp.shop.agora.test", "SRV", "+short"])).is_empty());
    assert!(!ips(&dig(&server, &["shop.agora.test", "+tcp", "+short"])).is_empty(), "TCP works");
    // ANY gets RFC 8482's one synthesized record, not the zone's records.
    assert_eq!(ips(&dig(&server, &["agora.test", "ANY", "+short"])), vec!["\"RFC8482\" \"\"".to_string()]);

    // dc3 cut off from the others: it leaves dc1's answers, within the health bound.
    let cut_at = Instant::now();
    c.cut(&c.dc_nodes("dc3"), &[c.dc_nodes("dc1"), c.dc_nodes("dc2")].concat()).await;
    must_eventually(Duration::from_secs(8), "dc3 out of the answer", || async {
        let a = ips(&dig(&server, &["shop.agora.test", "+short"]));
        (a.len() == 2 && !a.contains(&dc_ip(3))).then_some(())
    })
    .await;
    println!("dc3 left the DNS answer {} ms after the cut", cut_at.elapsed().as_millis());
    c.heal().await;
    must_eventually(Duration::from_secs(8), "dc3 back in the answer", || async {
        (ips(&dig(&server, &["shop.agora.test", "+short"])).len() == 3).then_some(())
    })
    .await;

    // Draining dc2 on dc3 is replicated: dc1 leaves it out too.
    let (code, v) = c.request(Method::PUT, "dc3-n1", "/v1/admin/dcs/dc2", Some(json!({"drained": true})), None).await;
    assert_eq!(code, 200, "{v}");
    must_eventually(Duration::from_secs(8), "dc2 drained everywhere", || async {
        let a = ips(&dig(&server, &["shop.agora.test", "+short"]));
        (a.len() == 2 && !a.contains(&dc_ip(2))).then_some(())
    })
    .await;
    let (code, _) = c.request(Method::PUT, "dc1-n1", "/v1/admin/dcs/dc2", Some(json!({"drained": false})), None).await;
    assert_eq!(code, 200);
    must_eventually(Duration::from_secs(8), "dc2 back", || async { (ips(&dig(&server, &["shop.agora.test", "+short"])).len() == 3).then_some(()) }).await;
    let metrics = c.http.get(format!("{}/metrics", c.url("dc1-n1"))).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("agora_dns_responses_total{kind=\"nxdomain\""), "dns counters exported");
    assert!(metrics.contains("agora_dns_responses_total{kind=\"rrl_slipped\""), "rate-limit counters exported");
    assert!(metrics.contains("agora_dns_rrl_sources{"), "rate-limit table size exported");
}
