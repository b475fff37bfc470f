//! Cluster status, state digest, health and metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use openraft::ServerState;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::AppState;
use crate::console::Console;
use crate::replication::lag;
use crate::storage::digest::Wanted;
use crate::storage::state_machine::SnapshotStats;

fn role(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

pub async fn status(State(node): State<AppState>) -> Json<Value> {
    let m = node.shard.raft.metrics().borrow().clone();
    let commit_index = node.shard.commit_index().await;
    let leader_name = m.current_leader.and_then(|id| node.config.node_by_id(id)).map(|n| n.name);
    let voters: Vec<String> = m.membership_config.membership().voter_ids().filter_map(|id| node.config.node_by_id(id)).map(|n| n.name).collect();
    let dcs = dc_views(&node, leader_name.clone());
    Json(json!({
        "node": node.info.name,
        "dc": node.info.dc,
        "role": role(m.state),
        "leader": leader_name,
        "term": m.current_term,
        "commit_index": commit_index,
        "applied_index": m.last_applied.map(|l| l.index).unwrap_or(0),
        "last_log_index": m.last_log_index.unwrap_or(0),
        "snapshot_index": m.snapshot.map(|l| l.index),
        "purged_index": m.purged.map(|l| l.index),
        "voters": voters,
        "out_seq": node.shard.sm.out_seq(),
        "outbox_floor": node.shard.sm.outbox_floor(),
        "dcs": dcs,
        // The fields above are shard 0's; every shard's own view:
        "shards": shard_views(&node).await,
        // This node's clock against its DC's other nodes (their clock minus ours, in ms).
        "clock": node.cross.links.clock(),
    }))
}

/// Each shard's Raft state as this node sees it (its leader, term, commit index and how
/// many records its state holds).
async fn shard_views(node: &AppState) -> Vec<Value> {
    let name = |id: Option<u64>| id.and_then(|id| node.config.node_by_id(id)).map(|n| n.name);
    let mut out = Vec::new();
    for c in node.shards.all() {
        let s = &c.shard;
        let m = s.metrics();
        out.push(json!({
            "shard": s.number,
            "role": role(m.state),
            // Whether this node holds a replica (else the leader is as its DC named it).
            "hosted": s.hosts(),
            "leader": name(s.leader()),
            "preferred_leader": name(s.preferred_leader()),
            "voters": m.membership_config.membership().voter_ids().filter_map(|id| name(Some(id))).collect::<Vec<_>>(),
            "term": m.current_term,
            "commit_index": s.commit_index().await,
            "applied_index": m.last_applied.map(|l| l.index).unwrap_or(0),
            "snapshot_index": m.snapshot.map(|l| l.index),
            "snapshot_records": s.sm.snapshot_stats().records,
            "out_seq": s.sm.out_seq(),
        }));
    }
    out
}

/// This DC from Raft, the others from the links: health, leader, replication lag.
fn dc_views(node: &AppState, local_leader: Option<String>) -> Vec<Value> {
    let name = |id: Option<u64>| id.and_then(|id| node.config.node_by_id(id)).map(|n| n.name);
    node.config
        .dc_names()
        .into_iter()
        .map(|dc| {
            if dc == node.info.dc {
                return json!({"name": dc, "local": true, "healthy": local_leader.is_some(), "leader": local_leader, "lag_ms": 0, "lag_events": 0});
            }
            let l = node.cross.links.get(&dc);
            json!({
                "name": dc,
                "local": false,
                "healthy": node.cross.links.healthy(&dc),
                "reachable": node.cross.links.reachable(&dc),
                "leader": name(l.remote_leader),
                "last_contact_ms": l.last_contact.map(|t| t.elapsed().as_millis() as u64),
                // How far that DC is behind our events (known on our leader).
                "lag_ms": l.lag_ms,
                "lag_events": l.lag_events,
                "acked_seq": l.acked,
                "applied_from_it": node.shard.sm.cursor(&dc),
                "snapshot_catchups": l.snapshot_catchups,
                // Answers acknowledging more of our events than we emitted (ignored).
                "bad_acks": l.bad_acks,
            })
        })
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LagParams {
    window_s: Option<u64>,
}

/// Exact replication lag in the last `window_s` seconds (default 60), p50, p99 and max in
/// ms, from the last events kept: of the events this node applied, per origin DC (from
/// the time the origin stamped them); and of the events it shipped as leader, per
/// destination DC (from their commit here to the answer that they are committed there).
pub async fn lag(
    State(node): State<AppState>,
    q: Result<axum::extract::Query<LagParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, super::ApiError> {
    let axum::extract::Query(p) = q.map_err(|e| super::ApiError::bad_request(e.body_text()))?;
    let window = std::time::Duration::from_secs(p.window_s.unwrap_or(60).min(86_400));
    Ok(Json(json!({
        "node": node.info.name,
        "window_s": window.as_secs(),
        "origins": lag::summary_over(node.shards.all().iter().map(|c| &c.lag), window),
        "destinations": lag::summary_over(node.shards.all().iter().map(|c| &c.shipped), window),
    })))
}

/// Equal digests mean equal state: per entity kind and in all. With several shards,
/// each kind's digest is the SHA-256 of the shards' digests of that kind, in shard order,
/// and `shards` lists each shard's own `all`.
///
/// `?recent=true` (the console's rounds) takes a digest computed a while ago, reused for
/// longer the longer its scan took; `age_ms` says how old the answer is.
pub async fn digest(
    State(node): State<AppState>,
    q: Result<axum::extract::Query<DigestQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, super::ApiError> {
    let axum::extract::Query(q) = q.map_err(|e| super::ApiError::bad_request(e.body_text()))?;
    let wanted = if q.recent { Wanted::Recent } else { Wanted::Fresh };
    // Shards this node holds no replica of are digested by their leaders.
    let digests = futures::future::join_all(node.shards.all().iter().map(|c| c.shard.digest(wanted))).await;
    let (mut per_shard, mut age_ms, mut applied) = (Vec::new(), 0u64, 0u64);
    for d in digests {
        let d = d?;
        age_ms = age_ms.max(d.age_ms);
        applied = applied.saturating_add(d.applied_index);
        per_shard.push(d.kinds);
    }
    let mut d = match per_shard.as_slice() {
        [one] => serde_json::to_value(one).unwrap_or_default(),
        many => {
            let mut combined = serde_json::Map::new();
            for kind in many[0].keys() {
                let mut h = Sha256::new();
                for shard in many {
                    h.update(shard.get(kind).map(String::as_str).unwrap_or_default());
                }
                combined.insert(kind.clone(), json!(hex::encode(h.finalize())));
            }
            combined.insert("shards".into(), json!(many.iter().map(|s| s.get("all").cloned().unwrap_or_default()).collect::<Vec<_>>()));
            Value::Object(combined)
        }
    };
    d["applied_index"] = json!(applied);
    d["age_ms"] = json!(age_ms);
    Ok(Json(d))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DigestQuery {
    recent: bool,
}

/// 200 while this node serves; 503 while it is unfit to (its clock off from its DC's, or
/// a disk sync failed).
pub async fn healthz(State(node): State<AppState>) -> (axum::http::StatusCode, Json<Value>) {
    let m = node.shard.raft.metrics().borrow().clone();
    let (clock_fenced, storage_failed) = (node.cross.links.fenced(), node.shard.disk.failed());
    let ok = !node.cross.unfit();
    let code = if ok { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        Json(
            json!({"ok": ok, "node": node.info.name, "leader_known": m.current_leader.is_some(), "clock_fenced": clock_fenced, "storage_failed": storage_failed}),
        ),
    )
}

pub async fn metrics(State(node): State<AppState>, Extension(console): Extension<Arc<Console>>) -> impl IntoResponse {
    for c in node.shards.all() {
        let m = c.shard.raft.metrics().borrow().clone();
        let number = c.shard.number.to_string();
        let shard = [number.as_str()];
        let metrics = &node.metrics;
        metrics.raft_term.with_label_values(&shard).set(m.current_term as i64);
        metrics.raft_applied_index.with_label_values(&shard).set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
        metrics.raft_commit_index.with_label_values(&shard).set(c.shard.commit_index().await as i64);
        metrics.raft_is_leader.with_label_values(&shard).set((m.state == ServerState::Leader) as i64);
        metrics.raft_leader_known.with_label_values(&shard).set(m.current_leader.is_some() as i64);
    }
    for (dc, l) in node.cross.links.all() {
        node.metrics.replication_link_up.with_label_values(&[&dc]).set(node.cross.links.healthy(&dc) as i64);
        let changes = node.metrics.replication_link_health_changes.with_label_values(&[&dc]);
        changes.inc_by(l.health_changes.saturating_sub(changes.get()));
        let since = l.last_contact.map(|t| t.elapsed().as_millis() as i64).unwrap_or(-1);
        node.metrics.replication_last_contact_ms.with_label_values(&[&dc]).set(since);
    }
    let mut text = node.metrics.render();
    text += &snapshot_metrics(&node);
    let labels = format!("node=\"{}\",dc=\"{}\"", node.info.name, node.info.dc);
    text += &crate::resources::render(&crate::resources::measure(node.shard.sm.data_dir()), &labels);
    text += &node.memory.render(&labels);
    if let Some(s) = console.diverged_seconds() {
        let help = "How long the DCs' state digests have differed, as this node compares them (0: equal).";
        text += &crate::metrics::text_sample("digests_diverged_seconds", "gauge", help, &labels, s);
    }
    let dns = node.dns.lock().expect("dns lock").as_ref().map(|d| d.stats());
    if let Some(s) = dns {
        text += &dns_metrics(&node, &s);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// Snapshot counters live in each shard's state machine; rendered here in Prometheus
/// text, a sample per shard.
fn snapshot_metrics(node: &AppState) -> String {
    let rows: [(&str, &str, &str, fn(&SnapshotStats) -> f64); 8] = [
        ("snapshot_builds_total", "counter", "snapshots this node built since it started", |s| s.builds as f64),
        ("snapshot_build_seconds_total", "counter", "wall time of those builds: scan, write, sync", |s| s.build_ms_total as f64 / 1000.0),
        ("snapshot_build_last_seconds", "gauge", "wall time of the last build", |s| s.build_ms_last as f64 / 1000.0),
        ("snapshot_installs_total", "counter", "snapshots this node installed from its leader since it started", |s| s.installs as f64),
        ("snapshot_records", "gauge", "records in the last snapshot built or installed (0: none since start)", |s| s.records as f64),
        ("snapshot_bytes", "gauge", "bytes of the last snapshot built or installed", |s| s.bytes as f64),
        ("snapshot_writes_since", "gauge", "client writes applied since the last snapshot began", |s| s.writes_since as f64),
        ("snapshot_catch_up_applies_total", "counter", "applies of 8 entries or more at once: the node catching up", |s| s.catch_up_applies as f64),
    ];
    let stats: Vec<(u16, SnapshotStats)> = node.shards.all().iter().map(|c| (c.shard.number, c.shard.sm.snapshot_stats())).collect();
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        out += &crate::metrics::text_header(name, kind, help);
        for (shard, s) in &stats {
            out += &format!("agora_{name}{{node=\"{}\",dc=\"{}\",shard=\"{shard}\"}} {}\n", node.info.name, node.info.dc, value(s));
        }
    }
    out
}

/// DNS counters live in the DNS server; they are rendered here in Prometheus text.
fn dns_metrics(node: &AppState, s: &crate::dns::DnsStats) -> String {
    let labels = format!("node=\"{}\",dc=\"{}\"", node.info.name, node.info.dc);
    let rows = [
        ("queries", s.queries),
        ("answered", s.answered),
        ("nxdomain", s.nxdomain),
        ("refused", s.refused),
        ("formerr", s.formerr),
        ("notimp", s.notimp),
        ("servfail", s.servfail),
        ("truncated", s.truncated),
        ("fail_open", s.fail_open),
        ("rrl_dropped", s.rrl_dropped),
        ("rrl_slipped", s.rrl_slipped),
    ];
    let mut out = String::from("# HELP agora_dns_responses_total DNS responses by outcome (queries: all).\n# TYPE agora_dns_responses_total counter\n");
    for (kind, v) in rows {
        out += &format!("agora_dns_responses_total{{kind=\"{kind}\",{labels}}} {v}\n");
    }
    out += "# HELP agora_dns_rrl_sources Source netblocks the DNS rate limiter tracks.\n# TYPE agora_dns_rrl_sources gauge\n";
    out += &format!("agora_dns_rrl_sources{{{labels}}} {}\n", s.rrl_sources);
    out
}
