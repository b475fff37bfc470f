//! The operators' console in a real browser: headless Chromium loads `/ui` from one node
//! of a 3-DC × 3-node cluster, runs its JavaScript, and the DOM it ends with must show
//! every DC and node; then a DC is cut off and then killed, and the page must say so;
//! last, a node whose DC lost its quorum must say it knows no leader.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{must_eventually, run_with_deadline, tool, Options, TestCluster};

const NET: u8 = 121;
const WAIT: Duration = Duration::from_secs(30);

/// Chromium's DOM after the page's polls ran (virtual time: a few seconds of them).
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(chromium);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url);
    run_with_deadline(cmd, Duration::from_secs(60))
}

fn screenshot(chromium: &Path, url: &str, out: &Path) {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(chromium);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=4000", "--window-size=1400,960"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg(url);
    run_with_deadline(cmd, Duration::from_secs(60));
    assert!(out.is_file(), "no screenshot at {}", out.display());
}

/// Loads the page until its DOM holds every marker (the page polls each second, the
/// console samples each second: a DOM can be one round behind).
async fn must_show(chromium: &Path, url: &str, markers: &[String]) -> String {
    let (chromium, url) = (chromium.to_path_buf(), url.to_string());
    must_eventually(WAIT, &format!("the page at {url} to show {markers:?}"), || {
        let (chromium, url) = (chromium.clone(), url.clone());
        async move {
            let dom = tokio::task::spawn_blocking(move || dump_dom(&chromium, &url)).await.expect("chromium");
            markers.iter().all(|m| dom.contains(m.as_str())).then_some(dom)
        }
    })
    .await
}

async fn console(c: &TestCluster, node: &str) -> Option<Value> {
    let (code, v) = c.get(node, "/v1/console").await;
    (code == 200).then_some(v)
}

fn dc(v: &Value, name: &str) -> Value {
    v["dcs"].as_array().and_then(|d| d.iter().find(|d| d["name"] == name).cloned()).unwrap_or(Value::Null)
}

/// A write retried (with one idempotency key) until it succeeds: on a loaded machine
/// the first write of a fresh cluster may time out.
async fn retried(c: &TestCluster, method: Method, node: &str, path: &str, body: Value) -> Value {
    let key = format!("console-{node}-{}", path.replace('/', "-"));
    must_eventually(WAIT, &format!("{method} {path} on {node}"), || async {
        let (code, v) = c.request(method.clone(), node, path, Some(body.clone()), Some(&key)).await;
        (200..300).contains(&code).then_some(v)
    })
    .await
}

async fn orders_until_aborted(http: reqwest::Client, url: String, token: String) {
    loop {
        let _ = http.post(format!("{url}/v1/orders")).json(&json!({"session": token, "sku": "tea", "qty": 1})).send().await;
    }
}

#[tokio::test]
async fn console_page_shows_every_dc_and_node_then_a_cut_and_a_dead_dc() {
    let Some(chromium) = tool("chromium", "chromium") else { return };
    let mut c = TestCluster::start(NET, Options { dcs: 3, nodes: 3, ..Options::default() }).await;
    let viewer = "dc1-n2";
    let url = format!("{}/ui", c.url(viewer));
    let (code, _) = c.get(viewer, "/").await;
    assert_eq!(code, 200, "/ redirects to the page");

    // Orders in dc1, so its chart has a rate to show.
    let token = retried(&c, Method::POST, "dc1-n1", "/v1/sessions", json!({"user": "watcher"})).await["token"].as_str().expect("token").to_string();
    for n in ["dc1-n1", "dc2-n1"] {
        retried(&c, Method::PUT, n, "/v1/inventory/tea", json!({"add": 100_000})).await;
    }
    must_eventually(WAIT, "dc1's orders/s in the console", || async {
        // Failures (a timeout on a loaded machine) just show as a lower rate.
        c.post("dc1-n1", "/v1/orders", json!({"session": token, "sku": "tea", "qty": 1})).await;
        let v = console(&c, viewer).await?;
        dc(&v, "dc1")["history"].as_array()?.iter().any(|p| p["orders_per_s"].as_f64() > Some(0.0)).then_some(())
    })
    .await;

    let all_up: Vec<String> = c
        .names
        .iter()
        .map(|n| format!("data-node=\"{n}\" data-state=\"up\""))
        .chain((1..=3).map(|d| format!("data-dc=\"dc{d}\" data-health=\"up\"")))
        .collect();
    let dom = must_show(&chromium, &url, &all_up).await;
    assert!(dom.contains("data-state=\"leader\"") || dom.contains(">leader<"), "a leader is shown");
    assert!(dom.contains("converged"), "digests compared and equal: {}", &dom[dom.find("digest-mark").unwrap_or(0)..][..400.min(dom.len())]);

    // Cut dc3 off from the others: the links are drawn cut, dc3 leaves the DNS answer.
    let (dc3, rest): (Vec<String>, Vec<String>) = c.names.iter().cloned().partition(|n| n.starts_with("dc3-"));
    c.cut(&dc3, &rest).await;
    let cut = ["data-link=\"dc1-dc3\" data-state=\"cut\"".to_string(), "data-link=\"dc2-dc3\" data-state=\"cut\"".to_string()];
    let dom = must_show(&chromium, &url, &cut).await;
    assert!(dom.contains("data-link=\"dc1-dc2\" data-state=\"up\""), "dc1–dc2 still up");
    let answer = &dom[dom.find("id=\"dns-answer\"").expect("dns answer")..];
    let answer = &answer[..answer.find("</ul>").expect("end of the answer")];
    assert!(answer.contains("(dc1)") && answer.contains("(dc2)") && !answer.contains("(dc3)"), "{answer}");
    if let Some(out) = std::env::var_os("AGORA_CONSOLE_SCREENSHOT") {
        // Orders in dc1 and dc2 meanwhile, so the charts show what a cut looks like under load.
        let load: Vec<_> = ["dc1-n1", "dc2-n1"].iter().map(|n| tokio::spawn(orders_until_aborted(c.http.clone(), c.url(n), token.clone()))).collect();
        tokio::time::sleep(Duration::from_secs(20)).await; // a chart's worth of history
        let (chromium, url) = (chromium.clone(), url.clone());
        // Off the test's runtime thread, so the load goes on while Chromium draws.
        tokio::task::spawn_blocking(move || screenshot(&chromium, &url, &PathBuf::from(out))).await.expect("screenshot");
        load.iter().for_each(|l| l.abort());
    }

    // Kill dc3's processes: it is shown down, its nodes down.
    for n in &dc3 {
        c.kill(n);
    }
    let mut down: Vec<String> = dc3.iter().map(|n| format!("data-node=\"{n}\" data-state=\"down\"")).collect();
    down.push("data-dc=\"dc3\" data-health=\"down\"".into());
    down.push("data-dc=\"dc1\" data-health=\"up\"".into());
    must_show(&chromium, &url, &down).await;

    // A follower whose DC lost its quorum says so at the top of its own page (a leader
    // cut from its followers may go on believing it leads for a while).
    let leader = c.must_leader_in("dc2", WAIT).await;
    let mut dc2 = c.dc_nodes("dc2").into_iter().filter(|n| *n != leader);
    let (killed, follower) = (dc2.next().expect("a follower"), dc2.next().expect("another follower"));
    c.kill(&leader);
    c.kill(&killed);
    must_show(&chromium, &format!("{}/ui", c.url(&follower)), &["knows no leader of dc2".to_string()]).await;
}
