//! Cluster status, state digest, health and metrics.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use openraft::ServerState;
use serde_json::{json, Value};

use super::AppState;

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
    let m = node.raft.metrics().borrow().clone();
    let commit_index = node.commit_index().await;
    let leader_name = m.current_leader.and_then(|id| node.config.node_by_id(id)).map(|n| n.name);
    let voters: Vec<String> = m
        .membership_config
        .membership()
        .voter_ids()
        .filter_map(|id| node.config.node_by_id(id))
        .map(|n| n.name)
        .collect();
    // Cross-DC links are not replicated yet: only this DC is reported.
    let dcs = vec![json!({"name": node.info.dc, "healthy": m.current_leader.is_some(), "leader": leader_name, "lag_ms": 0})];
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
        "dcs": dcs,
    }))
}

pub async fn digest(State(node): State<AppState>) -> Json<Value> {
    let mut d = serde_json::to_value(node.sm.digest()).unwrap_or_default();
    d["applied_index"] = json!(node.sm.applied_index());
    Json(d)
}

pub async fn healthz(State(node): State<AppState>) -> Json<Value> {
    let m = node.raft.metrics().borrow().clone();
    Json(json!({"ok": true, "node": node.info.name, "leader_known": m.current_leader.is_some()}))
}

pub async fn metrics(State(node): State<AppState>) -> impl IntoResponse {
    let m = node.raft.metrics().borrow().clone();
    node.metrics.raft_term.set(m.current_term as i64);
    node.metrics.raft_applied_index.set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
    node.metrics.raft_commit_index.set(node.commit_index().await as i64);
    node.metrics.raft_is_leader.set((m.state == ServerState::Leader) as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render())
}
