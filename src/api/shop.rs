//! Sessions, inventory and orders.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{idempotency_key, parse_body, random_hex, ApiError, AppState, ReadParams};
use crate::domain::{validate, Command, Inventory, Order, Outcome, Rejection, Request, Session};
use crate::error::NodeError;
use crate::hlc;
use crate::replication::rebalance;
use crate::transport::message::{Found, Lookup};

type Body = Result<Bytes, BytesRejection>;
type PathArg = Result<Path<String>, PathRejection>;
type QueryArg = Result<Query<ReadParams>, QueryRejection>;

fn path_name(field: &str, p: PathArg) -> Result<String, ApiError> {
    let Path(v) = p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    validate::name(field, &v).map_err(ApiError::bad_request)?;
    Ok(v)
}

/// Waits for the read barrier the query asks for; returns whether the read is stale
/// (local copy only: no barrier, and no lookup in the owner DC).
async fn barrier(node: &AppState, q: QueryArg) -> Result<bool, ApiError> {
    let Query(params) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let stale = params.stale()?;
    node.read_barrier(stale).await.map_err(ApiError::from)?;
    Ok(stale)
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
    // Never the session: its token is the buyer's credential (it authorises the cancel).
    json!({"id": o.id, "sku": o.sku, "qty": o.qty, "status": o.status.as_str(), "dc": o.dc, "user": o.user})
}

pub fn inventory_json(node: &AppState, inv: &Inventory) -> Value {
    let dc = node.info.dc.as_str();
    let by_dc: serde_json::Map<String, Value> = inv
        .dcs()
        .into_iter()
        .map(|d| {
            let n = |m: &std::collections::BTreeMap<String, u64>| m.get(&d).copied().unwrap_or(0);
            let reachable = d == dc || node.links.reachable(&d);
            let v =
                json!({"available": inv.available(&d), "stocked": n(&inv.stocked), "sold": n(&inv.sold), "released": n(&inv.released), "reachable": reachable});
            (d, v)
        })
        .collect();
    let unreachable: u64 = inv.dcs().iter().filter(|d| d.as_str() != dc && !node.links.reachable(d)).map(|d| inv.available(d)).sum();
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

/// The other DC an id or token names (`dc2-…`), if it names one: the DC to ask when this
/// one has not seen it yet.
fn foreign_owner(node: &AppState, id: &str) -> Option<String> {
    node.config.owner_of(id).filter(|dc| *dc != node.info.dc)
}

/// 503 `owner_unreachable`: the DC that created what the request names could not be
/// asked about it, and this DC has not seen it yet. Nothing was done; retry later.
fn owner_unreachable(owner: &str, e: NodeError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "owner_unreachable",
        format!("{owner} created it and could not be asked about it ({e}); this datacentre has not seen it yet"),
    )
    .with("owner", json!(owner))
}

/// The session `token` names, as far as a linearizable view can tell: this DC's copy, or
/// — for a token another DC created that this DC has not seen yet — that DC's. `Ok(None)`:
/// no such session. The second value says whether the session came from the owner.
async fn find_session(node: &AppState, token: &str) -> Result<(Option<Session>, bool), ApiError> {
    if let Some(s) = node.sm.session(token) {
        return Ok((Some(s), false));
    }
    let Some(owner) = foreign_owner(node, token) else { return Ok((None, false)) };
    match node.lookup(&owner, Lookup::Session(token.to_string())).await {
        Ok(Found::Session(s)) => Ok((s.filter(|s| s.token == token), true)),
        Ok(Found::Order(_)) => Err(ApiError::from(NodeError::Internal(format!("{owner} answered a session lookup with an order")))),
        Err(e) => Err(owner_unreachable(&owner, e)),
    }
}

pub async fn create_session(State(node): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let user = session_input(body)?;
    // The token names the DC that created it, which any DC can then ask about it.
    let token = format!("{}-{}", node.info.dc, random_hex());
    let cmd = Command::CreateSession { token, user, dc: node.info.dc.clone(), hlc: node.hlc.now() };
    match submit(&node, cmd, &headers).await? {
        Outcome::Session(s) => Ok((StatusCode::CREATED, Json(session_json(&s))).into_response()),
        other => Err(unexpected(other)),
    }
}

pub async fn get_session(State(node): State<AppState>, token: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let token = path_name("token", token)?;
    let stale = barrier(&node, q).await?;
    let found = if stale { node.sm.session(&token) } else { find_session(&node, &token).await?.0 };
    match found {
        Some(s) if !s.deleted => Ok(Json(session_json(&s))),
        _ => Err(ApiError::not_found("session")),
    }
}

pub async fn delete_session(State(node): State<AppState>, headers: HeaderMap, token: PathArg) -> Result<StatusCode, ApiError> {
    let token = path_name("token", token)?;
    let (dc, hlc) = (node.info.dc.clone(), node.hlc.now());
    // A token another DC created that this DC has not seen yet: its owner's version
    // travels in the entry (as for an order), and the logout is written here.
    let cmd = match find_session(&node, &token).await? {
        (Some(record), true) if !record.deleted => Command::DeleteSessionWithRecord { record, token, dc, hlc },
        (_, true) => return Err(ApiError::not_found("session")),
        _ => Command::DeleteSession { token, dc, hlc },
    };
    let req = Request::new(cmd, idempotency_key(&headers)?);
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

/// `PUT /v1/inventory/{sku}`'s body, parsed and checked: the units to add.
pub fn restock_input(body: Body) -> Result<u64, ApiError> {
    let RestockBody { add } = parse_body(body)?;
    validate::restock_add(add).map_err(ApiError::bad_request)
}

pub async fn restock(State(node): State<AppState>, headers: HeaderMap, sku: PathArg, body: Body) -> Result<Json<Value>, ApiError> {
    let sku = path_name("sku", sku)?;
    let add = restock_input(body)?;
    let cmd = Command::Restock { sku, add, dc: node.info.dc.clone(), hlc: node.hlc.now() };
    match submit(&node, cmd, &headers).await? {
        Outcome::Inventory(inv) => Ok(Json(inventory_json(&node, &inv))),
        other => Err(unexpected(other)),
    }
}

pub async fn get_inventory(State(node): State<AppState>, sku: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let sku = path_name("sku", sku)?;
    barrier(&node, q).await?;
    let inv = node.sm.inventory(&sku).ok_or_else(|| ApiError::not_found("sku"))?;
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
    // The id names its origin DC, and is globally unique.
    let id = format!("{}-{}", node.info.dc, random_hex());
    // Use refreshes the session, at most once per tenth of its TTL (from this node's view,
    // which may be stale: then the version looks older and the refresh happens anyway).
    let refresh_after_ms = node.config.limits.session_ttl_s * 1000 / 10;
    // A session another DC created and this one has not seen yet: its owner is asked (a
    // read there, no write), and the entry carries the owner's version, which every
    // replica merges before placing the order.
    let (found, from_owner) = find_session(&node, &session).await?;
    let refresh_session = found.as_ref().is_some_and(|s| !s.deleted && hlc::age_ms(s.hlc) >= refresh_after_ms);
    let (dc, hlc) = (node.info.dc.clone(), node.hlc.now());
    let cmd = match found {
        Some(record) if from_owner && !record.deleted => {
            Command::PlaceOrderWithSession { record, id, session, sku: sku.clone(), qty, dc, hlc, refresh_session }
        }
        Some(_) if from_owner => return Err(Rejection::UnknownSession.into()),
        _ => Command::PlaceOrder { id, session, sku: sku.clone(), qty, dc, hlc, refresh_session },
    };
    let req = Request::new(cmd, idempotency_key(&headers)?);
    let outcome = node.submit(req).await?;
    rebalance::after_order(&node, &sku);
    match outcome {
        Outcome::Order(o) => Ok((StatusCode::CREATED, Json(order_json(&o))).into_response()),
        Outcome::Rejected(Rejection::SoldOut { available, requested }) => Err(sold_out(&node, &sku, available, requested)),
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

/// 409 `sold_out`, saying how many units other DCs hold (and how many of those are in
/// DCs this one cannot reach right now).
fn sold_out(node: &AppState, sku: &str, available: u64, requested: u32) -> ApiError {
    let inv = node.sm.inventory(sku).unwrap_or_default();
    let others: Vec<String> = inv.dcs().into_iter().filter(|d| *d != node.info.dc).collect();
    let held: u64 = others.iter().map(|d| inv.available(d)).sum();
    let unreachable: u64 = others.iter().filter(|d| !node.links.reachable(d)).map(|d| inv.available(d)).sum();
    ApiError::from(Rejection::SoldOut { available, requested })
        .with("available", json!(available))
        .with("held_by_other_dcs", json!(held))
        .with("held_by_unreachable_dcs", json!(unreachable))
}

pub async fn get_order(State(node): State<AppState>, id: PathArg, q: QueryArg) -> Result<Json<Value>, ApiError> {
    let id = path_name("id", id)?;
    let stale = barrier(&node, q).await?;
    if let Some(o) = node.sm.order(&id) {
        return Ok(Json(order_json(&o)));
    }
    // Another DC's order this DC has not seen yet: its owner knows (a stale read does not ask).
    let Some(owner) = foreign_owner(&node, &id).filter(|_| !stale) else { return Err(ApiError::not_found("order")) };
    match node.lookup(&owner, Lookup::Order(id)).await {
        Ok(Found::Order(Some(o))) => Ok(Json(order_json(&o))),
        Ok(_) => Err(ApiError::not_found("order")),
        Err(e) => Err(owner_unreachable(&owner, e)),
    }
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
    // The owner is the DC the id names (`dc2-…`), whether or not this DC has a copy yet.
    let local = node.sm.order(&id);
    let owner = node.config.owner_of(&id).or_else(|| local.as_ref().map(|o| o.dc.clone())).unwrap_or_else(|| node.info.dc.clone());
    if owner != node.info.dc {
        return cancel_foreign(&node, id, owner, session, key, local).await;
    }
    let req = Request::new(Command::CancelOrder { id: id.clone(), dc: owner, session: session.clone(), hlc: node.hlc.now() }, key.clone());
    match node.submit(req).await? {
        Outcome::Order(o) => Ok(Json(order_json(&o)).into_response()),
        // Cannot happen for ids this system makes (they name their owner); an order owned
        // elsewhere goes to its owner rather than back to the client.
        Outcome::Rejected(Rejection::ForeignOrder { owner }) if owner != node.info.dc => cancel_foreign(&node, id, owner, session, key, None).await,
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(unexpected(other)),
    }
}

/// A cancel for an order `owner` owns: it alone may cancel, and checks the session again.
/// A session our copy of the order already refutes is refused here, never forwarded or
/// queued. Forwarded; if the owner cannot be reached, queued in our outbound stream,
/// which delivers it when the owner is back (202).
async fn cancel_foreign(node: &AppState, id: String, owner: String, session: String, key: Option<String>, local: Option<Order>) -> Result<Response, ApiError> {
    if local.is_some_and(|o| o.session != session) {
        return Err(Rejection::NotYourOrder.into());
    }
    let req = Request::new(Command::CancelOrder { id: id.clone(), dc: owner.clone(), session: session.clone(), hlc: node.hlc.now() }, key);
    match node.forward_to_owner(&owner, req).await {
        Ok(Outcome::Order(o)) => Ok(Json(order_json(&o)).into_response()),
        Ok(Outcome::Rejected(r)) => Err(r.into()),
        Ok(other) => Err(unexpected(other)),
        Err(e) if e.is_retryable() => {
            tracing::info!(%id, %owner, error = %e, "owner DC unreachable; cancel queued");
            let cmd = Command::RequestCancel { id: id.clone(), owner: owner.clone(), dc: node.info.dc.clone(), hlc: node.hlc.now(), session };
            match node.submit(Request::new(cmd, None)).await? {
                Outcome::CancelQueued { owner } => Ok((StatusCode::ACCEPTED, Json(json!({"id": id, "status": "cancel_queued", "dc": owner}))).into_response()),
                other => Err(unexpected(other)),
            }
        }
        Err(e) => Err(e.into()),
    }
}
