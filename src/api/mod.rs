//! HTTP/JSON API (DESIGN §3): routes turn requests into domain commands for
//! [`Node::submit`] or reads after [`Node::read_barrier`]. Input is parsed by hand from
//! the raw body, so that every malformed request gets our JSON error, never a panic.
//!
//! - [`shop`]: sessions, inventory, orders.
//! - [`cluster`]: status, digest, health, metrics.
//! - [`admin`]: membership changes, drain and weights, and (with `--enable-test-hooks`)
//!   fault injection — on a listener of its own, behind the admin token.

pub mod admin;
pub mod cluster;
pub mod error;
pub mod shop;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;

pub use error::ApiError;

use crate::domain::validate;
use crate::node::Node;

pub type AppState = Arc<Node>;

pub fn router(node: AppState) -> Router {
    let body_max = node.config.limits.body_bytes_max;
    Router::new()
        .route("/v1/sessions", post(shop::create_session))
        .route("/v1/sessions/{token}", get(shop::get_session).delete(shop::delete_session))
        .route("/v1/inventory/{sku}", get(shop::get_inventory).put(shop::restock))
        .route("/v1/orders", post(shop::place_order))
        .route("/v1/orders/{id}", get(shop::get_order))
        .route("/v1/orders/{id}/cancel", post(shop::cancel_order))
        .route("/v1/cluster/status", get(cluster::status))
        .route("/v1/cluster/digest", get(cluster::digest))
        .route("/healthz", get(cluster::healthz))
        .route("/metrics", get(cluster::metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(body_max))
        .layer(middleware::from_fn_with_state(node.clone(), observe))
        .with_state(node)
}

/// The admin API: every route wants `Authorization: Bearer <admin token>`.
pub fn admin_router(node: AppState, token: Option<Arc<str>>) -> Router {
    let body_max = node.config.limits.body_bytes_max;
    Router::new()
        .route("/v1/admin/nodes", post(admin::add_node))
        .route("/v1/admin/nodes/{name}", axum::routing::delete(admin::remove_node))
        .route("/v1/admin/dcs", get(admin::get_dc_settings))
        .route("/v1/admin/dcs/{dc}", axum::routing::put(admin::set_dc_settings))
        .route("/v1/admin/faults", get(admin::get_faults).put(admin::set_faults))
        .route("/v1/admin/crash/{actor}", post(admin::crash_actor))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(body_max))
        .layer(middleware::from_fn_with_state(token, admin::require_token))
        .layer(middleware::from_fn_with_state(node.clone(), observe))
        .with_state(node)
}

/// Counts and times every request by route and status.
async fn observe(State(node): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    node.metrics.http_seconds.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    node.metrics.http_requests.with_label_values(&[&route, resp.status().as_str()]).inc();
    resp
}

pub async fn serve(listener: tokio::net::TcpListener, node: AppState) {
    if let Err(e) = axum::serve(listener, router(node)).await {
        tracing::error!(error = %e, "http server stopped");
    }
}

pub async fn serve_admin(listener: tokio::net::TcpListener, node: AppState, token: Option<Arc<str>>) {
    if let Err(e) = axum::serve(listener, admin_router(node, token)).await {
        tracing::error!(error = %e, "admin server stopped");
    }
}

/// Parses a JSON body, turning every way it can be wrong into a 4xx JSON error.
pub fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", e.body_text())
        } else {
            ApiError::bad_request(e.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The `Idempotency-Key` header, validated.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let s = v.to_str().map_err(|_| ApiError::bad_request("Idempotency-Key must be printable ASCII"))?;
    validate::idempotency_key(s).map_err(ApiError::bad_request)?;
    Ok(Some(s.to_string()))
}

/// `?consistency=stale` reads locally; the default (`linearizable`) goes through the
/// read index.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    consistency: Option<String>,
}

impl ReadParams {
    pub fn stale(&self) -> Result<bool, ApiError> {
        match self.consistency.as_deref() {
            None | Some("linearizable") => Ok(false),
            Some("stale") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!("consistency must be 'linearizable' or 'stale', not '{other}'"))),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A random 128-bit value in hex, for session tokens and order ids.
pub fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}
