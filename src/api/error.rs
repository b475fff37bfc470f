//! The one map from failures to HTTP statuses and the JSON error body
//! `{"error": {"code", "message"}}`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::domain::Rejection;
use crate::error::NodeError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// More fields for the error object (e.g. how many units other DCs hold).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: Default::default() }
    }
    pub fn with(mut self, key: &str, value: serde_json::Value) -> Self {
        self.details.insert(key.into(), value);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let (status, code) = match &e {
            NodeError::NoLeader | NodeError::NotLeader(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_quorum"),
            NodeError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            NodeError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            NodeError::Unreachable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unreachable"),
            // Like a timeout: the outcome is unknown.
            NodeError::Lost(_) => (StatusCode::SERVICE_UNAVAILABLE, "unknown_outcome"),
            NodeError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            NodeError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            NodeError::WouldLoseQuorum(_) => (StatusCode::CONFLICT, "would_lose_quorum"),
            // The nodes' clocks disagree beyond the bound: retry, possibly on another node.
            NodeError::ClockSkew(_) => (StatusCode::SERVICE_UNAVAILABLE, "clock_skew"),
            NodeError::Stopped(_) => (StatusCode::SERVICE_UNAVAILABLE, "node_stopped"),
            NodeError::MemoryPressure(_) => (StatusCode::SERVICE_UNAVAILABLE, "memory_pressure"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::UnknownSession => ApiError::new(StatusCode::UNAUTHORIZED, "unknown_session", "session not found or logged out"),
            Rejection::UnknownSku => ApiError::not_found("sku"),
            Rejection::UnknownOrder => ApiError::not_found("order"),
            Rejection::SoldOut { available, requested } => {
                ApiError::new(StatusCode::CONFLICT, "sold_out", format!("{requested} requested, {available} available in this datacentre"))
            }
            Rejection::AlreadyCancelled => ApiError::new(StatusCode::CONFLICT, "already_cancelled", "order is already cancelled"),
            Rejection::IdempotencyMismatch => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_mismatch", "Idempotency-Key was used before with a different request")
            }
            Rejection::ForeignOrder { owner } => ApiError::new(StatusCode::CONFLICT, "foreign_order", format!("order is owned by {owner}")),
            Rejection::Invalid(m) => ApiError::bad_request(m),
            Rejection::NotYourOrder => ApiError::new(StatusCode::FORBIDDEN, "forbidden", "the order was placed with another session"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = self.details;
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        let body = axum::Json(json!({ "error": error }));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Retryable: no quorum right now, or the node is busy.
            (self.status, [(header::RETRY_AFTER, "1")], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}
