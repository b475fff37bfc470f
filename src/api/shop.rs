//! Sessions, inventory and orders.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{idempotency_key, now_ms, parse_body, random_hex, ApiError, AppState, ReadParams};
use crate::domain::{validate, Command, Inventory, Order, Outcome, Rejection, Request, Session};

type Body = Result<Bytes, BytesRejection>;
type PathArg = Result<Path<String>, PathRejection>;
type QueryArg = Result<Query<ReadParams>, QueryRejection>;

fn path_name(field: &str, p: PathArg) -> Result<String, ApiError> {
    let Path(v) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    validate::name(field, &v).map_err(ApiError::bad_request)?;
    Ok(v)
}

/// Waits for the read barrier the query asks for.
async fn barrier(node: &AppState, q: QueryArg) -> Result<(), ApiError> {
    let Query(params) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    node.read_barrier(params.stale()?).await.map_err(ApiError::from)
}

async fn submit(node: &AppState, cmd: Command, headers: &HeaderMap) -> Result<Outcome, ApiError> {
    let req = Request::new(cmd, idempotency_key(headers)?);
    match node.submit(req).await? {
        Outcome::Rejected(r) => Err(r.into()),
        other => Ok(other),
    }
}

fn unexpected(o: Outcome) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected outcome {o:?}"))
}

fn session_json(s: &Session) -> Value {
    json!({"token": s.token, "user": s.user, "dc": s.dc})
}

fn order_json(o: &Order) -> Value {
    json!({"id": o.id, "sku": o.sku, "qty": o.qty, "status": o.status.as_str(), "dc": o.dc, "user": o.user, "session": o.session})
}

pub fn inventory_json(inv: &Inventory, dc: &str) -> Value {
    let by_dc: serde_json::Map<String, Value> = inv
        .dcs()
        .into_iter()
        .map(|d| {
            let n = |m: &std::collections::BTreeMap<String, u64>| m.get(&d).copied().unwrap_or(0);
            let v = json!({"available": inv.available(&d), "stocked": n(&inv.stocked), "sold": n(&inv.sold), "released": n(&inv.released)});
            (d, v)
        })
        .collect();
    json!({"sku": inv.sku, "available": inv.available(dc), "total": inv.total(), "by_dc": by_dc})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    user: String,
}

pub async fn create_session(State(node): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let NewSession { user } = parse_body(body)?;
    validate::name("user", &user).map_err(ApiError::bad_request)?;
    let cmd = Command::CreateSession {
        token: random_hex(),
        user,
        dc: node.info.dc.clone(),
        at_ms: now_ms(),
    };
    match submit(&node, cmd, &headers).await? {
        Outcome::Session(s) => Ok((StatusCode::CREATED, Json(session_json(&s))).into_response()),
        other => Err(unexpected(other)),
    }
}

pub async fn get_session(State(node): State<AppState>, token: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let token = path_name("token", token)?;
    barrier(&node, q).await?;
    match node.sm.session(&token) {
        Some(s) if !s.deleted => Ok(Json(session_json(&s))),
        _ => Err(ApiError::not_found("session")),
    }
}

pub async fn delete_session(State(node): State<AppState>, headers: HeaderMap, token: PathArg) -> Result<StatusCode, ApiError> {
    let token = path_name("token", token)?;
    let req = Request::new(Command::DeleteSession { token }, idempotency_key(&headers)?);
    match node.submit(req).await? {
        Outcome::SessionDeleted => Ok(StatusCode::NO_CONTENT),
        // The session is what the URL names: unknown means 404 here, not 401.
        Outcome::Rejected(Rejection::UnknownSession) => Err(ApiError::not_found("session")),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    add: i64,
}

pub async fn restock(State(node): State<AppState>, headers: HeaderMap, sku: PathArg, body: Body) -> Result<Json<Value>, ApiError> {
    let sku = path_name("sku", sku)?;
    let RestockBody { add } = parse_body(body)?;
    let add = validate::restock_add(add).map_err(ApiError::bad_request)?;
    match submit(
        &node,
        Command::Restock {
            sku,
            add,
            dc: node.info.dc.clone(),
        },
        &headers,
    )
    .await?
    {
        Outcome::Inventory(inv) => Ok(Json(inventory_json(&inv, &node.info.dc))),
        other => Err(unexpected(other)),
    }
}

pub async fn get_inventory(State(node): State<AppState>, sku: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let sku = path_name("sku", sku)?;
    barrier(&node, q).await?;
    let inv = node.sm.inventory(&sku).ok_or_else(|| ApiError::not_found("sku"))?;
    Ok(Json(inventory_json(&inv, &node.info.dc)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    session: String,
    sku: String,
    qty: i64,
}

pub async fn place_order(State(node): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let NewOrder { session, sku, qty } = parse_body(body)?;
    validate::name("session", &session).map_err(ApiError::bad_request)?;
    validate::name("sku", &sku).map_err(ApiError::bad_request)?;
    let qty = validate::qty(qty).map_err(ApiError::bad_request)?;
    // The id names its origin DC, and is globally unique.
    let id = format!("{}-{}", node.info.dc, random_hex());
    let cmd = Command::PlaceOrder {
        id,
        session,
        sku,
        qty,
        dc: node.info.dc.clone(),
        at_ms: now_ms(),
    };
    match submit(&node, cmd, &headers).await? {
        Outcome::Order(o) => Ok((StatusCode::CREATED, Json(order_json(&o))).into_response()),
        other => Err(unexpected(other)),
    }
}

pub async fn get_order(State(node): State<AppState>, id: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let id = path_name("id", id)?;
    barrier(&node, q).await?;
    node.sm.order(&id).map(|o| Json(order_json(&o))).ok_or_else(|| ApiError::not_found("order"))
}

pub async fn cancel_order(State(node): State<AppState>, headers: HeaderMap, id: PathArg) -> Result<Json<Value>, ApiError> {
    let id = path_name("id", id)?;
    match submit(&node, Command::CancelOrder { id }, &headers).await? {
        Outcome::Order(o) => Ok(Json(order_json(&o))),
        other => Err(unexpected(other)),
    }
}
