//! Sessions, inventory and orders.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{idempotency_key, parse_body, ApiError, AppState, ReadParams};
use crate::domain::{validate, Inventory, Order, Rejection, Session};
use crate::shop::{Cancelled, ShopError};

type Body = Result<Bytes, BytesRejection>;
type PathArg = Result<Path<String>, PathRejection>;
type QueryArg = Result<Query<ReadParams>, QueryRejection>;

fn path_name(field: &str, p: PathArg) -> Result<String, ApiError> {
    let Path(v) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    validate::name(field, &v).map_err(ApiError::bad_request)?;
    Ok(v)
}

/// Whether the query asks for a stale read (local copy only: no barrier, and no lookup in
/// the owner DC).
fn stale(q: QueryArg) -> Result<bool, ApiError> {
    let Query(params) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    params.stale()
}

impl From<ShopError> for ApiError {
    fn from(e: ShopError) -> Self {
        match e {
            ShopError::Node(e) => e.into(),
            ShopError::Rejected(r) => r.into(),
            ShopError::NotFound(what) => ApiError::not_found(what),
            ShopError::SoldOut { available, requested, held_by_other_dcs, held_by_unreachable_dcs } => {
                ApiError::from(Rejection::SoldOut { available, requested })
                    .with("available", json!(available))
                    .with("held_by_other_dcs", json!(held_by_other_dcs))
                    .with("held_by_unreachable_dcs", json!(held_by_unreachable_dcs))
            }
            // 503 `owner_unreachable`: nothing was done; retry later.
            ShopError::OwnerUnreachable { owner, cause } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "owner_unreachable",
                format!("{owner} created it and could not be asked about it ({cause}); this datacentre has not seen it yet"),
            )
            .with("owner", json!(owner)),
        }
    }
}

fn session_json(s: &Session) -> Value {
    // `dc` and `hlc` name this version: the last writer wins by (hlc, dc).
    json!({"token": s.token, "user": s.user, "dc": s.dc, "hlc": s.hlc})
}

fn order_json(o: &Order) -> Value {
    // Never the session: its token is the buyer's credential (it authorises the cancel).
    json!({"id": o.id, "sku": o.sku, "qty": o.qty, "status": o.status.as_str(), "dc": o.dc, "user": o.user})
}

pub fn inventory_json(node: &AppState, inv: &Inventory) -> Value {
    let dc = node.shop.dc();
    let by_dc: serde_json::Map<String, Value> = inv
        .dcs()
        .into_iter()
        .map(|d| {
            let n = |m: &std::collections::BTreeMap<String, u64>| m.get(&d).copied().unwrap_or(0);
            let v = json!({"available": inv.available(&d), "stocked": n(&inv.stocked), "sold": n(&inv.sold), "released": n(&inv.released), "reachable": node.shop.reachable(&d)});
            (d, v)
        })
        .collect();
    let unreachable: u64 = inv.dcs().iter().filter(|d| !node.shop.reachable(d)).map(|d| inv.available(d)).fold(0u64, u64::saturating_add);
    json!({"sku": inv.sku, "available": inv.available(dc), "total": inv.total(), "by_dc": by_dc, "held_by_unreachable_dcs": unreachable})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    user: String,
}

/// `POST /v1/sessions`'s body, parsed and checked: the user name.
pub fn session_input(body: Body) -> Result<String, ApiError> {
    let NewSession { user } = parse_body(body)?;
    validate::name("user", &user).map_err(ApiError::bad_request)?;
    Ok(user)
}

pub async fn create_session(State(node): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let user = session_input(body)?;
    let s = node.shop.create_session(user, idempotency_key(&headers)?).await?;
    Ok((StatusCode::CREATED, Json(session_json(&s))).into_response())
}

pub async fn get_session(State(node): State<AppState>, token: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let token = path_name("token", token)?;
    let s = node.shop.session(&token, stale(q)?).await?;
    Ok(Json(session_json(&s)))
}

pub async fn delete_session(State(node): State<AppState>, headers: HeaderMap, token: PathArg) -> Result<StatusCode, ApiError> {
    let token = path_name("token", token)?;
    node.shop.delete_session(token, idempotency_key(&headers)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    add: i64,
}

/// `PUT /v1/inventory/{sku}`'s body, parsed and checked: the units to add.
pub fn restock_input(body: Body) -> Result<u64, ApiError> {
    let RestockBody { add } = parse_body(body)?;
    validate::restock_add(add).map_err(ApiError::bad_request)
}

pub async fn restock(State(node): State<AppState>, headers: HeaderMap, sku: PathArg, body: Body) -> Result<Json<Value>, ApiError> {
    let sku = path_name("sku", sku)?;
    let add = restock_input(body)?;
    let inv = node.shop.restock(sku, add, idempotency_key(&headers)?).await?;
    Ok(Json(inventory_json(&node, &inv)))
}

pub async fn get_inventory(State(node): State<AppState>, sku: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let sku = path_name("sku", sku)?;
    let inv = node.shop.inventory(&sku, stale(q)?).await?;
    Ok(Json(inventory_json(&node, &inv)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    session: String,
    sku: String,
    qty: i64,
}

/// `POST /v1/orders`'s body, parsed and checked: session, SKU, quantity.
pub fn order_input(body: Body) -> Result<(String, String, u32), ApiError> {
    let NewOrder { session, sku, qty } = parse_body(body)?;
    validate::name("session", &session).map_err(ApiError::bad_request)?;
    validate::name("sku", &sku).map_err(ApiError::bad_request)?;
    let qty = validate::qty(qty).map_err(ApiError::bad_request)?;
    Ok((session, sku, qty))
}

pub async fn place_order(State(node): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (session, sku, qty) = order_input(body)?;
    let o = node.shop.place_order(session, sku, qty, idempotency_key(&headers)?).await?;
    Ok((StatusCode::CREATED, Json(order_json(&o))).into_response())
}

pub async fn get_order(State(node): State<AppState>, id: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let id = path_name("id", id)?;
    let o = node.shop.order(&id, stale(q)?).await?;
    Ok(Json(order_json(&o)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    session: Option<String>,
}

/// The session a cancel presents (`{"session": "…"}`): none is 401 `session_required`.
fn cancel_session(body: Body) -> Result<String, ApiError> {
    let empty = body.as_ref().is_ok_and(|b| b.iter().all(u8::is_ascii_whitespace));
    let session = if empty { None } else { parse_body::<CancelBody>(body)?.session };
    let session = session.ok_or_else(|| {
        ApiError::new(StatusCode::UNAUTHORIZED, "session_required", "cancelling needs the session that placed the order: {\"session\": \"…\"}")
    })?;
    validate::name("session", &session).map_err(ApiError::bad_request)?;
    Ok(session)
}

pub async fn cancel_order(State(node): State<AppState>, headers: HeaderMap, id: PathArg, body: Body) -> Result<Response, ApiError> {
    let id = path_name("id", id)?;
    let key = idempotency_key(&headers)?;
    let session = cancel_session(body)?;
    match node.shop.cancel(id.clone(), session, key).await? {
        Cancelled::Done(o) => Ok(Json(order_json(&o)).into_response()),
        Cancelled::Queued { owner } => Ok((StatusCode::ACCEPTED, Json(json!({"id": id, "status": "cancel_queued", "dc": owner}))).into_response()),
    }
}
