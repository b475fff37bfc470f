//! The shop's request paths: what each API call does, in terms of this node's shards and
//! the other DCs — which shard holds what it names, which writes it makes, which reads it waits for, when it asks the DC
//! that created an order or session, where a cancel goes, and when it asks other DCs for
//! stock. The HTTP layer (`api::shop`) only parses requests and renders these results.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Command, Found, Inventory, Lookup, Order, Outcome, Rejection, Request, Session};
use crate::error::NodeError;
use crate::hlc::{self, Hlc};
use crate::ids::{order_id, random_hex};
use crate::memory::MemoryBound;
use crate::replication::CrossDc;
use crate::shards::Shards;

/// Why a shop call did not do what it was asked.
#[derive(Debug)]
pub enum ShopError {
    /// The node could not run it (no leader, overloaded, timeout, bad input …).
    Node(NodeError),
    /// The rules refused it (unknown session, not your order …).
    Rejected(Rejection),
    /// Not enough stock here; how many units other DCs hold, and how many of those are in
    /// DCs this one cannot reach right now.
    SoldOut { available: u64, requested: u32, held_by_other_dcs: u64, held_by_unreachable_dcs: u64 },
    /// No such session, order or SKU (`what` names which).
    NotFound(&'static str),
    /// The DC that created what the request names could not be asked about it, and this
    /// DC has not seen it yet. Nothing was done; retry later.
    OwnerUnreachable { owner: String, cause: NodeError },
}

impl From<NodeError> for ShopError {
    fn from(e: NodeError) -> Self {
        ShopError::Node(e)
    }
}

impl From<Rejection> for ShopError {
    fn from(r: Rejection) -> Self {
        ShopError::Rejected(r)
    }
}

/// What a cancel did.
#[derive(Debug)]
pub enum Cancelled {
    /// The owner cancelled it (or it was already cancelled).
    Done(Order),
    /// The owner could not be reached: the cancel waits in this DC's outbound stream,
    /// which delivers it when the owner is back.
    Queued { owner: String },
}

/// A record of another kind than the one asked for: a peer's confusion.
fn mismatch(f: Found) -> ShopError {
    ShopError::Node(NodeError::Internal(format!("a read answered with another kind of record: {f:?}")))
}

fn unexpected(o: Outcome) -> ShopError {
    ShopError::Node(NodeError::Internal(format!("unexpected outcome {o:?}")))
}

pub struct Shop {
    shards: Arc<Shards>,
    hlc: Arc<Hlc>,
    memory: Arc<MemoryBound>,
}

impl Shop {
    pub fn new(shards: Arc<Shards>, hlc: Arc<Hlc>, memory: Arc<MemoryBound>) -> Self {
        Shop { shards, hlc, memory }
    }

    /// The shard (and its cross-DC side) that holds what `key` names: a token, a SKU or
    /// an order id.
    fn at(&self, key: &str) -> &Arc<CrossDc> {
        self.shards.of(key)
    }

    /// This node's DC.
    pub fn dc(&self) -> &str {
        &self.shards.first().shard.dc
    }

    /// Whether `dc` answers this node right now (this DC always does).
    pub fn reachable(&self, dc: &str) -> bool {
        dc == self.dc() || self.shards.first().links.reachable(dc)
    }

    /// A write through the Raft group of the shard that holds what the command is about;
    /// a rejection by the rules is an error. A node fenced for its clock stamps none, and
    /// a node at its memory bound takes none.
    async fn write(&self, cmd: Command, key: Option<String>) -> Result<Outcome, ShopError> {
        if self.shards.first().links.fenced() {
            // Its timestamps would be off: another node takes it (the client retries).
            return Err(NodeError::ClockSkew("this node's clock is off from its datacentre's by more than max_clock_offset_ms".into()).into());
        }
        if self.memory.refuse_write() {
            let limit_mib = self.memory.limit() >> 20;
            return Err(NodeError::MemoryPressure(format!(
                "this node is at its memory bound ({limit_mib} MiB, limits.memory_bytes_max); retry later or on another node"
            ))
            .into());
        }
        let shard = &self.at(cmd.entity()).shard;
        match shard.submit(Request::new(cmd, key)).await? {
            Outcome::Rejected(r) => Err(r.into()),
            other => Ok(other),
        }
    }

    /// The other DC an id or token names (`dc2-…`), if it names one: the DC to ask when
    /// this one has not seen it yet.
    fn foreign_owner(&self, id: &str) -> Option<String> {
        self.shards.first().shard.config.owner_of(id).filter(|dc| dc != self.dc())
    }

    /// What this DC's shard holds under `what`'s key, read linearizably unless `stale`:
    /// from this node's replica, or from the shard's leader when this node holds none.
    async fn record(&self, what: Lookup, stale: bool) -> Result<Found, ShopError> {
        Ok(self.at(what.key()).shard.read(what, stale).await?)
    }

    async fn session_record(&self, token: &str, stale: bool) -> Result<Option<Session>, ShopError> {
        match self.record(Lookup::Session(token.to_string()), stale).await? {
            Found::Session(s) => Ok(s),
            other => Err(mismatch(other)),
        }
    }

    async fn inventory_record(&self, sku: &str, stale: bool) -> Result<Option<Inventory>, ShopError> {
        match self.record(Lookup::Inventory(sku.to_string()), stale).await? {
            Found::Inventory(i) => Ok(i),
            other => Err(mismatch(other)),
        }
    }

    async fn order_record(&self, id: &str, stale: bool) -> Result<Option<Order>, ShopError> {
        match self.record(Lookup::Order(id.to_string()), stale).await? {
            Found::Order(o) => Ok(o),
            other => Err(mismatch(other)),
        }
    }

    /// The session `token` names: this DC's copy (linearizable unless `stale`), or — for
    /// a token another DC created that this DC has not seen yet — that DC's. `None`: no
    /// such session. The second value says whether it came from the owner.
    async fn find_session(&self, token: &str, stale: bool) -> Result<(Option<Session>, bool), ShopError> {
        match self.session_record(token, stale).await? {
            Some(s) => Ok((Some(s), false)),
            None => self.session_from_owner(token).await,
        }
    }

    /// The session as the DC that created it holds it, if another DC did.
    async fn session_from_owner(&self, token: &str) -> Result<(Option<Session>, bool), ShopError> {
        let Some(owner) = self.foreign_owner(token) else { return Ok((None, false)) };
        match self.at(token).lookup(&owner, Lookup::Session(token.to_string())).await {
            Ok(Found::Session(s)) => Ok((s.filter(|s| s.token == token), true)),
            Ok(other) => Err(mismatch(other)),
            Err(cause) => Err(ShopError::OwnerUnreachable { owner, cause }),
        }
    }

    pub async fn create_session(&self, user: String, key: Option<String>) -> Result<Session, ShopError> {
        // The token names the DC that created it, which any DC can then ask about it.
        let token = format!("{}-{}", self.dc(), random_hex());
        let cmd = Command::CreateSession { token, user, dc: self.dc().to_string(), hlc: self.hlc.now() };
        match self.write(cmd, key).await? {
            Outcome::Session(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// A live session, read linearizably (asking its owner if need be) unless `stale`.
    pub async fn session(&self, token: &str, stale: bool) -> Result<Session, ShopError> {
        let found = if stale { self.session_record(token, true).await? } else { self.find_session(token, false).await?.0 };
        found.filter(|s| !s.deleted).ok_or(ShopError::NotFound("session"))
    }

    pub async fn delete_session(&self, token: String, key: Option<String>) -> Result<(), ShopError> {
        let (dc, hlc) = (self.dc().to_string(), self.hlc.now());
        // A token another DC created that this DC has not seen yet: its owner's version
        // travels in the entry (as for an order), and the logout is written here.
        let cmd = match self.find_session(&token, true).await? {
            (Some(record), true) if !record.deleted => Command::DeleteSessionWithRecord { record, token: token.clone(), dc, hlc },
            (_, true) => return Err(ShopError::NotFound("session")),
            _ => Command::DeleteSession { token: token.clone(), dc, hlc },
        };
        match self.write(cmd, key).await {
            Ok(Outcome::SessionDeleted) => self.revoke_in_other_shards(&token).await,
            // The session is what the URL names: unknown means not found, not unauthorised.
            // A logout retried after its revocations failed finds it gone: they are
            // written now, before the 404 tells the client it is logged out.
            Err(ShopError::Rejected(Rejection::UnknownSession)) => {
                if self.shards.count() > 1 && self.session_record(&token, false).await?.is_some_and(|s| s.deleted) {
                    self.revoke_in_other_shards(&token).await?;
                }
                Err(ShopError::NotFound("session"))
            }
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e),
        }
    }

    /// Records a logout in every shard of this DC but the session's, and returns once all
    /// have it: from then on an order placed in any of them is refused in `apply`, even if
    /// the proposing node's copy of the session still looked live (see
    /// [`Shop::order_in_other_shard`]). One write per shard, made only on logout. The
    /// logout itself is already written, so a shard without a leader is waited for (up to
    /// the request timeout), and one still failing then makes the answer "outcome
    /// unknown", never a refusal: the client retries, and the retry writes the rest.
    async fn revoke_in_other_shards(&self, token: &str) -> Result<(), ShopError> {
        let home = self.shards.number_of(token);
        let (dc, hlc) = (self.dc().to_string(), self.hlc.now());
        let within = Duration::from_millis(self.shards.first().shard.config.limits.request_timeout_ms);
        let writes = self.shards.entity_shards_but(home).map(|c| {
            let req = Request::new(Command::RevokeSession { token: token.to_string(), dc: dc.clone(), hlc }, None);
            c.shard.submit_repeatable(req, within)
        });
        for r in futures::future::join_all(writes).await {
            if let Err(e) = r {
                return Err(NodeError::Lost(format!("the logout is written, but not yet recorded in every shard ({e}); retry it")).into());
            }
        }
        Ok(())
    }

    pub async fn restock(&self, sku: String, add: u64, key: Option<String>) -> Result<Inventory, ShopError> {
        let cmd = Command::Restock { sku, add, dc: self.dc().to_string(), hlc: self.hlc.now() };
        match self.write(cmd, key).await? {
            Outcome::Inventory(inv) => Ok(inv),
            other => Err(unexpected(other)),
        }
    }

    pub async fn inventory(&self, sku: &str, stale: bool) -> Result<Inventory, ShopError> {
        self.inventory_record(sku, stale).await?.ok_or(ShopError::NotFound("sku"))
    }

    /// Places an order: one Raft write, in the shard of its SKU. A session another DC
    /// created and this one has not seen yet is fetched from its owner (a read there, no
    /// write), and the entry carries the owner's version, which every replica merges
    /// before placing the order. A session in another shard than the SKU is checked here,
    /// in its shard (see [`Shop::order_in_other_shard`]). Afterwards, if this DC runs low
    /// on the SKU, it asks the others for stock.
    pub async fn place_order(&self, session: String, sku: String, qty: u32, key: Option<String>) -> Result<Order, ShopError> {
        let (spread, sku_shard) = (self.shards.spread(), self.shards.number_of(&sku));
        if let Some(k) = &key {
            self.claim_key(&session, k, &sku, qty, sku_shard).await?;
        }
        // The id names its origin DC and leads to the SKU's shard; it is globally unique.
        let id = order_id(self.dc(), sku_shard, spread);
        let r = if self.shards.number_of(&session) == sku_shard {
            self.order_in_one_shard(id, session, &sku, qty, key).await
        } else {
            self.order_in_other_shard(id, session, &sku, qty, key).await
        };
        // On the shard's leader only (forwarded orders: `node::peer`).
        self.at(&sku).after_order(&sku);
        match r {
            Ok(Outcome::Order(o)) => Ok(o),
            Ok(other) => Err(unexpected(other)),
            Err(ShopError::Rejected(Rejection::SoldOut { available, requested })) => Err(self.sold_out(&sku, available, requested).await),
            Err(e) => Err(e),
        }
    }

    /// A key is one request: the same key with the same session and another SKU is
    /// another request, refused (422) rather than placed as a second order. The order's
    /// idempotency record lives in its SKU's shard, so two requests with one key but SKUs of
    /// two shards would each find no record there; they meet in the shard the key's scope
    /// hashes to instead. When that is not the SKU's shard, the order first claims its key
    /// there (`Command::ClaimOrderKey`, one Raft write), and only the request the claim
    /// holds for goes on: the first claim wins, whether the requests come one after the
    /// other or at once, through any nodes of the DC. When it is the SKU's shard, the
    /// order's own record is the claim.
    async fn claim_key(&self, session: &str, key: &str, sku: &str, qty: u32, sku_shard: u16) -> Result<(), ShopError> {
        let scope = crate::domain::command::order_key_scope(session, key);
        if self.shards.number_of(&scope) == sku_shard {
            return Ok(());
        }
        let cmd = Command::ClaimOrderKey { scope, sku: sku.to_string(), qty, dc: self.dc().to_string(), hlc: self.hlc.now() };
        match self.write(cmd, Some(key.to_string())).await? {
            Outcome::KeyClaimed => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Whether use should refresh `s`: at most once per tenth of its TTL (from this
    /// node's view, which may be stale: then the version looks older and the refresh
    /// happens anyway).
    fn due_for_refresh(&self, s: &Session) -> bool {
        let refresh_after_ms = self.shards.first().shard.config.limits.session_ttl_s.saturating_mul(1000) / 10;
        !s.deleted && hlc::age_ms(s.hlc) >= refresh_after_ms
    }

    /// The session and the SKU in one shard: the entry checks the session and refreshes it.
    async fn order_in_one_shard(&self, id: String, session: String, sku: &str, qty: u32, key: Option<String>) -> Result<Outcome, ShopError> {
        let (found, from_owner) = self.find_session(&session, true).await?;
        let refresh_session = found.as_ref().is_some_and(|s| self.due_for_refresh(s));
        let (dc, hlc, sku) = (self.dc().to_string(), self.hlc.now(), sku.to_string());
        let cmd = match found {
            Some(record) if from_owner && !record.deleted => Command::PlaceOrderWithSession { record, id, session, sku, qty, dc, hlc, refresh_session },
            Some(_) if from_owner => return Err(Rejection::UnknownSession.into()),
            _ => Command::PlaceOrder { id, session, sku, qty, dc, hlc, refresh_session },
        };
        self.write(cmd, key).await
    }

    /// The session in another shard than the SKU: taken from a copy that shows it live,
    /// with no read-index round, else checked linearizably ([`Shop::session_for_order`]) —
    /// and named in the order's entry, so the order is still one write, in the SKU's shard. A refresh the session is due goes
    /// to its shard after the order, which does not wait for it. A logout racing the
    /// order may lose to it, as it would if it came a moment later.
    async fn order_in_other_shard(&self, id: String, session: String, sku: &str, qty: u32, key: Option<String>) -> Result<Outcome, ShopError> {
        let (record, from_owner) = self.session_for_order(&session).await?;
        let refresh = !from_owner && self.due_for_refresh(&record);
        let (dc, hlc) = (self.dc().to_string(), self.hlc.now());
        let cmd = Command::PlaceOrderChecked { id, session: session.clone(), user: record.user, sku: sku.to_string(), qty, dc: dc.clone(), hlc };
        let r = self.write(cmd, key).await;
        if refresh && matches!(r, Ok(Outcome::Order(_))) {
            let shard = self.at(&session).shard.clone();
            tokio::spawn(async move {
                let cmd = Command::RefreshSession { token: session, dc, hlc };
                if let Err(e) = shard.submit(Request::new(cmd, None)).await {
                    tracing::debug!(error = %e, "session refresh after an order failed; the next order retries it");
                }
            });
        }
        r
    }

    /// The session an order in another shard names, and whether it came from its owner
    /// DC: a copy read as it stands — this node's replica of the session's shard, or its
    /// leader's when this node holds none (`Shard::read`, no read-index round) — if that
    /// shows it live and young enough ([`Shop::trusted_live`]); else checked linearizably
    /// ([`Shop::session_confirmed`]). Any replica's copy will do: the revocation in the
    /// order's shard is what refuses an order after a logout, and a leader has applied
    /// every session it acknowledged.
    async fn session_for_order(&self, token: &str) -> Result<(Session, bool), ShopError> {
        match self.session_record(token, true).await {
            Ok(copy) => match self.trusted_live(copy) {
                Some(s) => Ok((s, false)),
                None => self.session_confirmed(token).await,
            },
            // The leader is not to be had: asking again would only wait as long again.
            Err(e) => self.settle_session(token, None, Err(e)).await,
        }
    }

    /// `copy` if it shows the session live and within its TTL: enough for an order in
    /// another shard, whose `apply` refuses it if a logout was recorded there first
    /// (`Command::RevokeSession`, written in every shard before a logout is acknowledged).
    /// A copy that lags may miss a refresh, not a logout that matters: the revocation does
    /// that job. A revocation expires a TTL after the logout by the leader's clock; the
    /// copy is trusted for less than its TTL by this node's clock — shorter by four clock
    /// offsets (the copy's, the logout's, the leader's and this node's timestamps each
    /// within one of the DC's clocks), so that no copy is trusted once the revocation that
    /// covers it may be gone.
    fn trusted_live(&self, copy: Option<Session>) -> Option<Session> {
        let config = &self.shards.first().shard.config;
        let margin_ms = config.replication.max_clock_offset_ms.saturating_mul(4);
        let trusted_ms = config.limits.session_ttl_s.saturating_mul(1000).saturating_sub(margin_ms);
        copy.filter(|s| !s.deleted && hlc::age_ms(s.hlc) < trusted_ms)
    }

    /// The session, checked linearizably in its shard (or asked of its owner DC, then
    /// `true`): for a session this node's replica does not show live.
    async fn session_confirmed(&self, session: &str) -> Result<(Session, bool), ShopError> {
        // Linearizable first: a logout acknowledged before this order began is seen.
        let (here, barrier) = match self.session_record(session, false).await {
            Ok(s) => (s, Ok(())),
            // This node's own replica, if it has one (asking the leaderless shard again
            // would only wait as long again).
            Err(e) => (self.at(session).shard.replica_session(session), Err(e)),
        };
        self.settle_session(session, here, barrier).await
    }

    /// The session as this DC's linearizable read (`barrier` its outcome) or, failing
    /// that, this node's replica found it (`here`), else as its owner DC holds it.
    async fn settle_session(&self, session: &str, here: Option<Session>, barrier: Result<(), ShopError>) -> Result<(Session, bool), ShopError> {
        let (found, from_owner) = match here {
            Some(s) => (Some(s), false),
            None => self.session_from_owner(session).await?,
        };
        match (found.filter(|s| !s.deleted), barrier) {
            (Some(s), _) => Ok((s, from_owner)),
            // While the session's shard elects a leader, the replica here still vouches
            // for a session it holds live (only a logout of the last moments may be
            // missed), so orders for other shards go on; anything else waits for it.
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Err(Rejection::UnknownSession.into()),
        }
    }

    async fn sold_out(&self, sku: &str, available: u64, requested: u32) -> ShopError {
        let inv = self.inventory_record(sku, true).await.ok().flatten().unwrap_or_default();
        let others: Vec<String> = inv.dcs().into_iter().filter(|d| d != self.dc()).collect();
        let held_by_other_dcs = others.iter().map(|d| inv.available(d)).fold(0u64, u64::saturating_add);
        let held_by_unreachable_dcs = others.iter().filter(|d| !self.reachable(d)).map(|d| inv.available(d)).fold(0u64, u64::saturating_add);
        ShopError::SoldOut { available, requested, held_by_other_dcs, held_by_unreachable_dcs }
    }

    /// An order, read linearizably unless `stale`; another DC's order this DC has not
    /// seen yet is asked of its owner (a stale read does not ask).
    pub async fn order(&self, id: &str, stale: bool) -> Result<Order, ShopError> {
        if let Some(o) = self.order_record(id, stale).await? {
            return Ok(o);
        }
        let Some(owner) = self.foreign_owner(id).filter(|_| !stale) else { return Err(ShopError::NotFound("order")) };
        match self.at(id).lookup(&owner, Lookup::Order(id.to_string())).await {
            Ok(Found::Order(Some(o))) => Ok(o),
            Ok(_) => Err(ShopError::NotFound("order")),
            Err(cause) => Err(ShopError::OwnerUnreachable { owner, cause }),
        }
    }

    /// Cancels an order with the session that placed it. The owner — the DC the id names
    /// (`dc2-…`), whether or not this DC has a copy yet — alone may cancel.
    pub async fn cancel(&self, id: String, session: String, key: Option<String>) -> Result<Cancelled, ShopError> {
        // This DC's copy, if it has one: whose it is, and which session placed it.
        let local = self.order_record(&id, true).await?;
        let owner = self.shards.first().shard.config.owner_of(&id).or_else(|| local.as_ref().map(|o| o.dc.clone())).unwrap_or_else(|| self.dc().to_string());
        if owner != self.dc() {
            return self.cancel_foreign(id, owner, session, key, local).await;
        }
        if self.shards.number_of(&session) != self.shards.number_of(&id) {
            // The order's shard cannot see the session: checked in its own, linearizably.
            if self.session_record(&session, false).await?.is_some_and(|s| s.deleted) {
                return Err(Rejection::UnknownSession.into());
            }
        }
        let cmd = Command::CancelOrder { id: id.clone(), dc: owner, session: session.clone(), hlc: self.hlc.now() };
        match self.write(cmd, key.clone()).await {
            Ok(Outcome::Order(o)) => Ok(Cancelled::Done(o)),
            Ok(other) => Err(unexpected(other)),
            // Cannot happen for ids this system makes (they name their owner); an order
            // owned elsewhere goes to its owner rather than back to the client.
            Err(ShopError::Rejected(Rejection::ForeignOrder { owner })) if owner != self.dc() => self.cancel_foreign(id, owner, session, key, None).await,
            Err(e) => Err(e),
        }
    }

    /// A cancel for an order `owner` owns; it checks the session again. A session our
    /// copy of the order already refutes is refused here, never forwarded or queued.
    /// Forwarded; if the owner cannot be reached, queued in our outbound stream.
    async fn cancel_foreign(&self, id: String, owner: String, session: String, key: Option<String>, local: Option<Order>) -> Result<Cancelled, ShopError> {
        if local.is_some_and(|o| o.session != session) {
            return Err(Rejection::NotYourOrder.into());
        }
        // Each attempt may reach the owner even when its answer is lost (a cut TCP
        // connection delivers what it buffered once healed), so every attempt of this one
        // cancel carries one idempotency key: a retry gets the first attempt's answer,
        // never `already_cancelled` for a cancel that it made itself.
        let key = key.unwrap_or_else(|| format!("fwd-{}", crate::ids::random_hex()));
        let req = Request::new(Command::CancelOrder { id: id.clone(), dc: owner.clone(), session: session.clone(), hlc: self.hlc.now() }, Some(key));
        match self.at(&id).forward_to_owner(&owner, req).await {
            Ok(Outcome::Order(o)) => Ok(Cancelled::Done(o)),
            Ok(Outcome::Rejected(r)) => Err(r.into()),
            Ok(other) => Err(unexpected(other)),
            Err(e) if e.is_retryable() => {
                tracing::info!(%id, %owner, error = %e, "owner DC unreachable; cancel queued");
                let cmd = Command::RequestCancel { id, owner, dc: self.dc().to_string(), hlc: self.hlc.now(), session };
                match self.write(cmd, None).await? {
                    Outcome::CancelQueued { owner } => Ok(Cancelled::Queued { owner }),
                    other => Err(unexpected(other)),
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}
