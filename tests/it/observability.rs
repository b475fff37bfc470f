//! The Grafana dashboards and Prometheus rules in `cluster/observability/` use only
//! metrics a live node exports, and promtool accepts the rules and the scrape config.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{must_eventually, tool, Options, TestCluster};

const NET: u8 = 122;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/observability")
}

/// Every `expr` in a dashboard, wherever it is nested.
fn json_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::String(s) if k == "expr" => out.push(s.clone()),
                    _ => json_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// (file, expression) for every PromQL expression of the dashboards and the rules.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let grafana = dir().join("grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&grafana).expect("grafana dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(files.len() >= 4, "a dashboard per concern: {files:?}");
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).expect("read dashboard")).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut exprs = Vec::new();
        json_exprs(&v, &mut exprs);
        assert!(!exprs.is_empty(), "{} has no queries", f.display());
        out.extend(exprs.into_iter().map(|e| (f.display().to_string(), e)));
    }
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(dir().join("alerts.yml")).expect("read rules")).expect("rules YAML");
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push(("alerts.yml".into(), rule["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

/// Metric names in a PromQL expression: identifiers outside quotes that start `agora_`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut quoted = false;
    let mut word = String::new();
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("agora_") {
            names.insert(word.clone());
        }
        word.clear();
    }
    names
}

/// Names of the metrics in a `/metrics` text.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).filter_map(|l| l.split(['{', ' ']).next()).map(str::to_string).collect()
}

#[test]
fn metric_names_are_read_from_promql() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (dc, le) (rate(agora_http_request_duration_seconds_bucket{route="/v1/orders",x="agora_no"}[1m]))) / agora_b"#,
    );
    assert_eq!(got, BTreeSet::from(["agora_http_request_duration_seconds_bucket".to_string(), "agora_b".to_string()]));
}

#[tokio::test]
async fn every_metric_the_rules_and_dashboards_use_exists() {
    let exprs = expressions();
    let mut wanted = BTreeSet::new();
    for (file, e) in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{file}: `{e}` names no agora metric");
        wanted.extend(names);
    }
    // Two one-node DCs taking an order: requests, replication, digests all have values.
    let c = TestCluster::start(NET, Options { dcs: 2, nodes: 1, ..Options::default() }).await;
    let token = c.must_session("dc1-n1", "ops").await;
    c.must_restock("dc1-n1", "tea", 10).await;
    let (code, v) = c.post("dc1-n1", "/v1/orders", json!({"session": token, "sku": "tea", "qty": 1})).await;
    assert_eq!(code, 201, "{v}");
    let missing = must_eventually(Duration::from_secs(30), "every metric used to be exported (see the log for the ones missing)", || async {
        let mut have = BTreeSet::new();
        for n in c.running() {
            let text = c.http.get(format!("{}/metrics", c.url(&n))).send().await.ok()?.text().await.ok()?;
            have.extend(exported(&text));
        }
        let missing: Vec<&String> = wanted.difference(&have).collect();
        if !missing.is_empty() {
            eprintln!("not exported (yet): {missing:?}");
        }
        missing.is_empty().then_some(missing.len())
    })
    .await;
    assert_eq!(missing, 0);
}

#[test]
fn promtool_accepts_the_rules_and_the_scrape_config() {
    let Some(promtool) = tool("promtool", "prometheus") else { return };
    for args in [["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(dir()).output().expect("run promtool");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?} failed: {text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}: {text}");
    }
}
