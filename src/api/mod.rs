//! HTTP/JSON API: routes parse requests into calls of the shop's request paths
//! ([`crate::shop`]) and render their results. Input is parsed by hand from the raw body,
//! so that every malformed request gets our JSON error, never a panic.
//!
//! - [`shop`]: sessions, inventory, orders.
//! - [`cluster`]: status, digest, health, metrics.
//! - [`admin`]: membership changes, drain and weights, and (with `--enable-test-hooks`)
//!   fault injection — on a listener of its own, behind the admin token.

pub mod admin;
pub mod cluster;
pub mod console;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod shop;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;

pub use error::ApiError;

use crate::config::{ClusterConfig, NodeInfo};
use crate::dns::DnsThread;
use crate::domain::validate;
use crate::door::{ConnLimits, Door};
use crate::error::NodeError;
use crate::hlc::Hlc;
use crate::metrics::Metrics;
use crate::replication::CrossDc;
use crate::shard::Shard;
use crate::shop::Shop;
use crate::transport::Faults;

/// What the HTTP handlers may use: the shop's request paths, this node's shard (status,
/// digest, membership), the links to other DCs, the metrics, and the test hooks.
pub struct ApiState {
    pub info: NodeInfo,
    pub config: Arc<ClusterConfig>,
    pub shop: Shop,
    /// Every shard this node hosts.
    pub shards: Arc<crate::shards::Shards>,
    /// Shard 0: what belongs to the whole DC (operator settings, the links that DNS and
    /// health read).
    pub shard: Arc<Shard>,
    pub cross: Arc<CrossDc>,
    pub hlc: Arc<Hlc>,
    pub metrics: Metrics,
    pub faults: Faults,
    /// WAN emulation: the delay of frames to other DCs (`[wan]`, `PUT /v1/admin/wan`).
    pub wan: crate::transport::Wan,
    /// The resident memory this node keeps under, and what it does about it.
    pub memory: Arc<crate::memory::MemoryBound>,
    /// Enables the admin endpoints that inject faults and crash actors.
    pub test_hooks: bool,
    /// The DNS server, once started (its counters feed /metrics; the node stops it).
    pub dns: std::sync::Mutex<Option<DnsThread>>,
}

pub type AppState = Arc<ApiState>;

pub fn router(node: AppState, console: Arc<crate::console::Console>) -> Router {
    let body_max = node.config.limits.body_bytes_max;
    let request_timeout = Duration::from_millis(node.config.limits.http_request_timeout_ms);
    Router::new()
        .route("/v1/sessions", post(shop::create_session))
        .route("/v1/sessions/{token}", get(shop::get_session).delete(shop::delete_session))
        .route("/v1/inventory/{sku}", get(shop::get_inventory).put(shop::restock))
        .route("/v1/orders", post(shop::place_order))
        .route("/v1/orders/{id}", get(shop::get_order))
        .route("/v1/orders/{id}/cancel", post(shop::cancel_order))
        .route("/v1/cluster/status", get(cluster::status))
        .route("/v1/cluster/digest", get(cluster::digest))
        .route("/v1/cluster/lag", get(cluster::lag))
        .route("/healthz", get(cluster::healthz))
        .route("/metrics", get(cluster::metrics))
        .route("/", get(console::root))
        .route("/ui", get(console::page))
        .route("/v1/console", get(console::data))
        .layer(axum::Extension(console))
        .layer(middleware::from_fn(move |req: Request, next: Next| time_limit(request_timeout, req, next)))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(body_max))
        .layer(middleware::from_fn_with_state(node.clone(), observe))
        .with_state(node)
}

/// The admin API: every route wants `Authorization: Bearer <admin token>`. No request
/// time limit: adding a node waits for the learner to catch up.
pub fn admin_router(node: AppState, token: Option<Arc<str>>) -> Router {
    let body_max = node.config.limits.body_bytes_max;
    Router::new()
        .route("/v1/admin/nodes", post(admin::add_node))
        .route("/v1/admin/nodes/{name}", axum::routing::delete(admin::remove_node))
        .route("/v1/admin/leader", post(admin::hand_over))
        .route("/v1/admin/dcs", get(admin::get_dc_settings))
        .route("/v1/admin/dcs/{dc}", axum::routing::put(admin::set_dc_settings))
        .route("/v1/admin/faults", get(admin::get_faults).put(admin::set_faults))
        .route("/v1/admin/disk", get(admin::get_disk).put(admin::set_disk))
        .route("/v1/admin/memory", get(admin::get_memory).put(admin::set_memory))
        .route("/v1/admin/wan", get(admin::get_wan).put(admin::set_wan))
        .route("/v1/admin/crash/{actor}", post(admin::crash_actor))
        .route("/v1/admin/clock", get(admin::get_clock).put(admin::set_clock))
        .route("/v1/admin/escrow-journal", get(admin::get_escrow_journal))
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

/// Answers 503 `timeout` (with `Retry-After`) for a request not answered in time.
async fn time_limit(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::from(NodeError::Timeout).into_response(),
    }
}

/// Serves HTTP until the task is aborted. Each accepted connection passes the door
/// first (global and per-source caps; refused ones are closed at once) and runs under
/// the idle timeout; hyper cuts a request whose headers are slower than
/// `http_header_timeout_ms` (that timer also closes a keep-alive connection that sends
/// no next request), and [`time_limit`] bounds each request.
/// The shop's HTTP port.
/// The console's rounds run as long as the port is served.
pub async fn serve(listener: tokio::net::TcpListener, node: AppState) {
    let console = crate::console::Console::new(node.info.clone(), node.cross.clone());
    let rounds = AbortOnDrop(tokio::spawn(console.clone().run()));
    let app = router(node.clone(), console);
    serve_guarded(listener, app, "http", &node).await;
    drop(rounds);
}

/// Stops a task when dropped: the node aborts `serve` at shutdown, which drops this.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The admin port: the same caps and timeouts as the shop's.
pub async fn serve_admin(listener: tokio::net::TcpListener, node: AppState, token: Option<Arc<str>>) {
    let app = admin_router(node.clone(), token);
    serve_guarded(listener, app, "admin", &node).await
}

/// Accepts connections behind the door (caps per source and in total, idle timeout) and
/// serves HTTP/1 with a header timeout.
async fn serve_guarded(listener: tokio::net::TcpListener, app: Router, label: &'static str, node: &AppState) {
    let l = &node.config.limits;
    let conns = ConnLimits { total_max: l.http_conns_max, per_source_max: l.http_conns_per_source_max };
    let door = Door::counted(label, conns, Duration::from_millis(l.http_idle_timeout_ms), node.metrics.door());
    let header_timeout = Duration::from_millis(l.http_header_timeout_ms);
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                crate::warn_limited!(label, error = %e, listener = label, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(stream) = door.admit(stream, addr.ip()) else { continue };
        let _ = stream.get_ref().set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
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
