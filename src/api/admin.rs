//! Operator endpoints, served on the admin listener only and only with the admin token:
//! DC membership, leadership handovers, drain and weights, WAN emulation, and the test hooks (fault injection, actor crash)
//! that exist only when the node runs with `--enable-test-hooks`.

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{parse_body, ApiError, AppState};
use crate::actors::Kind;
use crate::config::WanSection;
use crate::domain::{Command, Outcome, Request};
use crate::raft::MembershipOp;
use crate::transport::faults::FaultRules;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNode {
    node: String,
}

fn dc_node_id(node: &AppState, name: &str) -> Result<u64, ApiError> {
    match node.config.node(name) {
        Some(n) if n.dc == node.info.dc => Ok(n.id),
        Some(_) => Err(ApiError::bad_request(format!("node '{name}' is not in {}", node.info.dc))),
        None => Err(ApiError::not_found(&format!("node '{name}'"))),
    }
}

/// Shard 0's voters after a membership change, and the replicas of other shards it moved.
fn changed_json(node: &AppState, changed: crate::shards::Changed) -> Json<Value> {
    let name = |id: u64| node.config.node_by_id(id).map(|n| n.name);
    let names: Vec<String> = changed.voters.into_iter().filter_map(name).collect();
    let moves: Vec<Value> =
        changed.moves.iter().map(|m| json!({"shard": m.shard, "added": m.add.and_then(name), "removed": m.remove.and_then(name)})).collect();
    Json(json!({"voters": names, "moves": moves}))
}

pub async fn add_node(State(node): State<AppState>, body: Result<axum::body::Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let AddNode { node: name } = parse_body(body)?;
    let id = dc_node_id(&node, &name)?;
    let changed = node.shards.change_membership(MembershipOp::Add(id)).await?;
    Ok(changed_json(&node, changed))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandOver {
    #[serde(default)]
    shard: u16,
    to: String,
}

/// `POST /v1/admin/leader` `{"shard": k, "to": "<node>"}`, on the node leading shard k:
/// hands its leadership to that node of the DC (see `shard::handover`); answers once the
/// target leads.
pub async fn hand_over(State(node): State<AppState>, body: Result<axum::body::Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let HandOver { shard, to } = parse_body(body)?;
    let id = dc_node_id(&node, &to)?;
    let c = node.shards.all().get(usize::from(shard)).cloned().ok_or_else(|| ApiError::not_found(&format!("shard {shard}")))?;
    c.shard.hand_over(id).await?;
    Ok(Json(json!({"shard": shard, "leader": to})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    #[serde(default)]
    force: bool,
}

/// `DELETE /v1/admin/nodes/{name}[?force=true]`: refused (409 `would_lose_quorum`) when
/// fewer voters than a quorum of the DC's configured nodes would remain, unless forced.
pub async fn remove_node(
    State(node): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    params: Result<Query<RemoveParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = dc_node_id(&node, &name)?;
    let op = if params.force { MembershipOp::ForceRemove(id) } else { MembershipOp::Remove(id) };
    let changed = node.shards.change_membership(op).await?;
    Ok(changed_json(&node, changed))
}

/// Lets a request through only with `Authorization: Bearer <the admin token>`.
/// Tokens are compared as SHA-256 digests, so the comparison's time says nothing about
/// how much of a guess was right.
pub async fn require_token(State(token): State<Option<Arc<str>>>, req: axum::extract::Request, next: Next) -> Response {
    let Some(token) = token else {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "admin_disabled", "this node has no admin token (see --admin-token-file)").into_response();
    };
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if Sha256::digest(g.trim().as_bytes()) == Sha256::digest(token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", "wrong admin token").into_response(),
        None => {
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the admin API wants Authorization: Bearer <admin token>").into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
    }
}

fn require_hooks(node: &AppState) -> Result<(), ApiError> {
    if node.test_hooks {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "test_hooks_disabled", "start the node with --enable-test-hooks to use this endpoint"))
    }
}

pub async fn get_faults(State(node): State<AppState>) -> Result<Json<FaultRules>, ApiError> {
    require_hooks(&node)?;
    Ok(Json(node.faults.get()))
}

/// Body: `{"partitioned": [node ids], "delay_ms": {"id": ms}}`; `{}` heals.
pub async fn set_faults(State(node): State<AppState>, body: Result<axum::body::Bytes, BytesRejection>) -> Result<Json<FaultRules>, ApiError> {
    require_hooks(&node)?;
    let rules: FaultRules = parse_body(body)?;
    tracing::warn!(?rules, "fault injection rules set");
    node.faults.set(rules.clone());
    Ok(Json(rules))
}

#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    fault: crate::storage::DiskFault,
    /// Read only: a sync has failed (the node acknowledges nothing until restarted).
    #[serde(default)]
    failed: bool,
}

pub async fn get_disk(State(node): State<AppState>) -> Result<Json<DiskState>, ApiError> {
    require_hooks(&node)?;
    Ok(Json(DiskState { fault: node.shard.disk.fault(), failed: node.shard.disk.failed() }))
}

/// Body: `{"fault": "sync-error" | "full" | "none"}`. Clearing the fault does not undo a
/// failed sync.
pub async fn set_disk(State(node): State<AppState>, body: Result<axum::body::Bytes, BytesRejection>) -> Result<Json<DiskState>, ApiError> {
    require_hooks(&node)?;
    let want: DiskState = parse_body(body)?;
    tracing::warn!(fault = ?want.fault, "disk fault injected");
    node.shard.disk.inject(want.fault);
    Ok(Json(DiskState { fault: node.shard.disk.fault(), failed: node.shard.disk.failed() }))
}

/// `GET /v1/admin/memory`: the memory bound, the last resident set read, and what the
/// bound has done.
pub async fn get_memory(State(node): State<AppState>) -> Json<crate::memory::Status> {
    Json(node.memory.status())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRss {
    /// Bytes the bound sees instead of the measured resident set; null measures again.
    rss_bytes: Option<u64>,
}

/// `PUT /v1/admin/memory` `{"rss_bytes": N}` (a test hook): the memory bound acts as if the
/// process's resident set were N bytes, from its next reading on; `{"rss_bytes": null}`
/// measures it again.
pub async fn set_memory(State(node): State<AppState>, body: Result<axum::body::Bytes, BytesRejection>) -> Result<Json<crate::memory::Status>, ApiError> {
    require_hooks(&node)?;
    let InjectRss { rss_bytes } = parse_body(body)?;
    if rss_bytes == Some(0) {
        return Err(ApiError::bad_request("rss_bytes must be > 0, or null to measure"));
    }
    tracing::warn!(?rss_bytes, "resident set injected (test hook)");
    node.memory.inject_rss(rss_bytes);
    Ok(Json(node.memory.status()))
}

#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Clock {
    skew_ms: i64,
}

/// The escrow journal (a test hook): `{"dc", "node", "records": [...]}`.
pub async fn get_escrow_journal(State(node): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    require_hooks(&node)?;
    let records =
        crate::escrow_journal::read().map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("read the escrow journal: {e}")))?;
    Ok(Json(serde_json::json!({"dc": node.info.dc, "node": node.info.name, "records": records})))
}

pub async fn get_clock(State(node): State<AppState>) -> Result<Json<Clock>, ApiError> {
    require_hooks(&node)?;
    Ok(Json(Clock { skew_ms: crate::hlc::skew_ms() }))
}

/// Body: `{"skew_ms": N}`: this node's wall clock runs N ms ahead (or behind, if
/// negative) from now on; `0` puts it back. The hybrid clock never goes back: after a
/// skew ahead is undone, its timestamps stay ahead until the wall clock catches up.
pub async fn set_clock(State(node): State<AppState>, body: Result<axum::body::Bytes, BytesRejection>) -> Result<Json<Clock>, ApiError> {
    require_hooks(&node)?;
    let Clock { skew_ms } = parse_body(body)?;
    crate::hlc::set_skew_ms(skew_ms).map_err(ApiError::bad_request)?;
    tracing::warn!(skew_ms, "clock skew set (test hook)");
    Ok(Json(Clock { skew_ms }))
}

/// `GET /v1/admin/wan`: the WAN emulation's latencies on this node.
pub async fn get_wan(State(node): State<AppState>) -> Json<WanSection> {
    Json(node.wan.get())
}

/// `PUT /v1/admin/wan` `{"latency_ms": 80, "jitter_ms": 5, "link": [{"dcs": ["dc1", "dc3"],
/// "latency_ms": 150}]}`: the delay this node adds to frames it sends to other DCs, at
/// once and until changed or restarted (`{}` removes it). Each node is set on its own;
/// `agora cluster latency` sets every node.
pub async fn set_wan(State(node): State<AppState>, body: Result<axum::body::Bytes, BytesRejection>) -> Result<Json<WanSection>, ApiError> {
    let section: WanSection = parse_body(body)?;
    section.check(&node.config.dc_names()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(?section, "WAN emulation set");
    node.wan.set(section);
    Ok(Json(node.wan.get()))
}

pub async fn crash_actor(State(node): State<AppState>, actor: Result<Path<String>, PathRejection>) -> Result<StatusCode, ApiError> {
    require_hooks(&node)?;
    let Path(actor) = actor.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let kind = Kind::parse(&actor).ok_or_else(|| ApiError::not_found(&format!("actor '{actor}'")))?;
    if node.shard.actors.crash(kind) {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "actor_restarting", "actor is restarting"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DcSettingsBody {
    drained: Option<bool>,
    weight: Option<u32>,
}

/// `PUT /v1/admin/dcs/{dc}` `{"drained": true}` / `{"weight": 3}`: an operator toggle,
/// replicated to every DC (last writer wins). Drained or weight-0 DCs leave the DNS answers.
pub async fn set_dc_settings(
    State(node): State<AppState>,
    dc: Result<Path<String>, PathRejection>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(dc) = dc.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if !node.config.dc_names().contains(&dc) {
        return Err(ApiError::not_found(&format!("datacentre '{dc}'")));
    }
    let DcSettingsBody { drained, weight } = parse_body(body)?;
    if weight.is_some_and(|w| w > 100) {
        return Err(ApiError::bad_request("weight must be in 0..=100"));
    }
    let current = node.shard.sm.settings(&dc);
    let cmd = Command::SetDcSettings {
        target: dc,
        drained: drained.unwrap_or(current.drained),
        weight: weight.unwrap_or(current.weight),
        dc: node.info.dc.clone(),
        hlc: node.hlc.now(),
    };
    match node.shard.submit(Request::new(cmd, None)).await? {
        Outcome::Settings(s) => Ok(Json(json!({"dc": s.dc, "drained": s.drained, "weight": s.weight}))),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected outcome {other:?}"))),
    }
}

pub async fn get_dc_settings(State(node): State<AppState>) -> Json<Value> {
    let all: Vec<Value> =
        node.config.dc_names().iter().map(|dc| node.shard.sm.settings(dc)).map(|s| json!({"dc": s.dc, "drained": s.drained, "weight": s.weight})).collect();
    Json(json!({ "dcs": all }))
}
