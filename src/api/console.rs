//! The operators' console: the page (`/`, `/ui`) and its data (`GET /v1/console`).
//! Read-only: the page has no write actions, and the JSON is assembled from what the
//! console's rounds saw (see [`crate::console`]).

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::{Extension, Json};
use serde_json::Value;

use crate::console::Console;

/// The page: HTML, CSS and JS in one file, compiled into the binary (no CDN, no build step).
const PAGE: &str = include_str!("../console/page.html");

pub async fn root() -> Redirect {
    Redirect::temporary("/ui")
}

pub async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], PAGE)
}

pub async fn data(Extension(console): Extension<Arc<Console>>) -> Json<Value> {
    Json(console.snapshot().await)
}
