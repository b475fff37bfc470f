//! The leader's side: ship our outbox to every other DC, and trim what all have applied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::CrossDc;
use crate::domain::{Command, Outcome, Request};
use crate::error::NodeError;
use crate::hlc;
use crate::raft::NodeId;
use crate::transport::message::ReplicateAck;
use crate::transport::{PeerRequest, PeerResponse};

/// Streams our events to `dc` while this node leads its DC.
pub async fn ship_loop(cross: Arc<CrossDc>, dc: String) {
    let interval = Duration::from_millis(cross.config().replication.probe_interval_ms);
    let mut metrics = cross.shard.raft.metrics();
    loop {
        if cross.faults.replication_paused() {
            // Test hook: hold our events back (probes and lookups still flow).
            tokio::time::sleep(interval).await;
            continue;
        }
        if !cross.shard.is_leader() {
            // A new leader learns the remote cursor afresh.
            cross.links.update(&dc, |l| l.acked = None);
            let _ = tokio::time::timeout(interval, metrics.changed()).await;
            continue;
        }
        let result = match cross.links.get(&dc).acked {
            Some(acked) if acked.saturating_add(1) >= cross.shard.sm.outbox_floor() => stream(&cross, &dc, acked, &mut metrics).await,
            // Unknown cursor (new leader), or behind the outbox cap: one exchange at a time.
            _ => ship_once(&cross, &dc).await,
        };
        if let Err(e) = result {
            tracing::debug!(%dc, error = %e, "replication batch failed");
            tokio::time::sleep(interval).await;
        }
    }
}

/// A batch on its way: the last seq it carries (for an empty heartbeat, the cursor it
/// checks), and its answer.
type InFlight<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Result<ReplicateAck, NodeError>)> + Send + 'a>>;

type MetricsRx = tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, openraft::BasicNode>>;

/// Ships from `acked` on with up to `replication.batches_inflight_max` batches in flight,
/// each sent as soon as there are events past the last one sent; an empty batch as
/// heartbeat when there has been nothing to ship for a probe interval. Returns when this
/// node stops leading, replication is paused, or the outbox no longer holds what `dc`
/// needs (the caller decides what comes next); an error ends it too.
///
/// Answers are taken in the order their batches left. One that was not applied in full
/// (it reached the receiver's log before the batch ahead of it, or the receiver stopped
/// at an event it refused) may carry a cursor older than one already taken: the cursor
/// only moves forward, and the next batch goes alone, from it. A lone batch's answer is
/// the receiver's cursor as it stands, so that one may also move the cursor back (a
/// receiver whose state went back asks for events again).
async fn stream(cross: &CrossDc, dc: &str, mut acked: u64, metrics: &mut MetricsRx) -> Result<(), NodeError> {
    let sm = &cross.shard.sm;
    let cfg = &cross.config().replication;
    let interval = Duration::from_millis(cfg.probe_interval_ms);
    let mut inflight = futures::stream::FuturesOrdered::<InFlight>::new();
    let (mut sent, mut alone, mut idle_since) = (acked, false, Instant::now());
    loop {
        if !cross.shard.is_leader() || cross.faults.replication_paused() {
            return Ok(());
        }
        let limit = if alone { 1 } else { cfg.batches_inflight_max.max(1) };
        for _ in inflight.len()..limit {
            if sent >= sm.out_seq() {
                break;
            }
            let events = sm.outbox(sent.saturating_add(1), cfg.batch_len_max);
            match (events.first(), events.last()) {
                (Some(first), Some(last)) if first.seq == sent.saturating_add(1) => {
                    let upto = last.seq;
                    inflight.push_back(send_batch(cross, dc, events, upto));
                    sent = upto;
                }
                // Trimmed past what `dc` has: a catch-up from our state, by the caller.
                _ => return Ok(()),
            }
        }
        if inflight.is_empty() && idle_since.elapsed() >= interval {
            // Nothing to ship for a while: an empty batch, as heartbeat and cursor check.
            inflight.push_back(send_batch(cross, dc, Vec::new(), acked));
        }
        if !inflight.is_empty() {
            idle_since = Instant::now();
        }
        let can_send = inflight.len() < limit;
        let new_events = async {
            let shipped = sm.out_seq();
            while metrics.changed().await.is_ok() && sm.out_seq() == shipped {}
        };
        tokio::select! {
            Some((upto, answer)) = futures::StreamExt::next(&mut inflight) => {
                let cursor = take_ack(cross, dc, Some(acked), answer?)?;
                let authoritative = alone && inflight.is_empty();
                acked = if authoritative { cursor } else { acked.max(cursor) };
                set_acked(cross, dc, acked);
                alone = cursor < upto;
                if alone {
                    sent = acked;
                }
            }
            _ = tokio::time::timeout(interval, new_events), if can_send => {}
        }
    }
}

fn send_batch<'a>(cross: &'a CrossDc, dc: &'a str, events: Vec<crate::domain::Event>, upto: u64) -> InFlight<'a> {
    Box::pin(async move {
        let me = cross.dc().to_string();
        let answer = send_to_dc(cross, dc, || PeerRequest::Replicate { origin: me.clone(), events: events.clone() }).await;
        (upto, answer)
    })
}

/// Sends one batch from the remote cursor (or a snapshot of our state when `dc` is
/// behind the outbox cap, or an empty probe when its cursor is unknown).
async fn ship_once(cross: &CrossDc, dc: &str) -> Result<(), NodeError> {
    let sm = &cross.shard.sm;
    let out_seq = sm.out_seq();
    let acked = cross.links.get(dc).acked;
    let floor = sm.outbox_floor();
    let me = cross.dc().to_string();
    let ack = match acked {
        Some(a) if a.saturating_add(1) < floor => {
            tracing::warn!(%dc, acked = a, floor, "peer DC behind the outbox cap; catching it up from a snapshot");
            cross.links.update(dc, |l| l.snapshot_catchups = l.snapshot_catchups.saturating_add(1));
            install_owned_state(cross, dc, out_seq).await?
        }
        Some(a) => {
            let events = sm.outbox(a.saturating_add(1), cross.config().replication.batch_len_max);
            send_to_dc(cross, dc, || PeerRequest::Replicate { origin: me.clone(), events: events.clone() }).await?
        }
        // Unknown cursor (new leader): an empty batch asks for it.
        None => send_to_dc(cross, dc, || PeerRequest::Replicate { origin: me.clone(), events: Vec::new() }).await?,
    };
    let cursor = take_ack(cross, dc, acked, ack)?;
    set_acked(cross, dc, cursor);
    Ok(())
}

/// Checks an acknowledgement, and records how long the events it newly covers took
/// from their commit here (`prev`: the cursor known before; unknown to a new leader,
/// whose first answer covers events `dc` may have committed long ago, which it does
/// not measure). Returns its cursor.
fn take_ack(cross: &CrossDc, dc: &str, prev: Option<u64>, ack: ReplicateAck) -> Result<u64, NodeError> {
    let sm = &cross.shard.sm;
    if let Err(e) = super::guard::accept_ack(ack.cursor, sm.out_seq()) {
        let mut n = 0;
        cross.links.update(dc, |l| {
            l.bad_acks = l.bad_acks.saturating_add(1);
            n = l.bad_acks;
        });
        // The first time, then at every power of two: visible without flooding the log.
        if n.is_power_of_two() {
            tracing::warn!(%dc, error = %e, bad_acks = n, "impossible acknowledgement ignored; keeping the old cursor");
        }
        return Err(NodeError::Internal(e));
    }
    if let Some(prev) = prev.filter(|p| ack.cursor > *p) {
        cross.shipped.record(dc, sm.emitted_ages_ms(prev.saturating_add(1), ack.cursor, Instant::now()));
    }
    Ok(ack.cursor)
}

/// `dc` has applied our events up to `cursor`: the link, its lag and the metrics say so.
fn set_acked(cross: &CrossDc, dc: &str, cursor: u64) {
    let sm = &cross.shard.sm;
    let emitted = sm.out_seq();
    let oldest_unacked = sm.outbox(cursor.saturating_add(1), 1).first().map(|e| hlc::age_ms(e.hlc)).unwrap_or(0);
    cross.links.update(dc, |l| {
        l.acked = Some(cursor);
        l.last_contact = Some(Instant::now());
        l.lag_events = emitted.saturating_sub(cursor);
        l.lag_ms = oldest_unacked;
    });
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    cross.metrics.replication_lag_events.with_label_values(&[dc]).set(gauge(emitted.saturating_sub(cursor)));
    cross.metrics.replication_lag_ms.with_label_values(&[dc]).set(gauge(oldest_unacked));
}

/// Installs our owned state as of `out_seq` (read before the state, so the state covers
/// every event up to it) on `dc`, a page of `replication.batch_len_max` changes at a time,
/// in key order: each page is one bounded message and one bounded Raft entry there. Every
/// page but the last leaves the cursor where it is (`upto` 0; merges only raise what they
/// touch, so a page applied twice, or a catch-up started again, changes nothing); the last
/// moves it to `out_seq`.
async fn install_owned_state(cross: &CrossDc, dc: &str, out_seq: u64) -> Result<ReplicateAck, NodeError> {
    let me = cross.dc().to_string();
    let page_len = cross.config().replication.batch_len_max.max(1);
    let mut from = Vec::new();
    loop {
        // A page may walk past many records other DCs own before it has `page_len` of
        // ours: a scan that grows with the state, kept off the async runtime.
        let (sm, start) = (cross.shard.sm.clone(), std::mem::take(&mut from));
        let (changes, next) = tokio::task::spawn_blocking(move || sm.owned_state_page(&start, page_len))
            .await
            .map_err(|e| NodeError::Internal(format!("reading our state for a catch-up: {e}")))?;
        let upto = if next.is_none() { out_seq } else { 0 };
        let ack = send_to_dc(cross, dc, || PeerRequest::InstallRemote { origin: me.clone(), upto, changes: changes.clone() }).await?;
        match next {
            Some(key) => from = key,
            None => return Ok(ack),
        }
    }
}

/// Sends to `dc`'s leader: the one we last heard of first, then whoever it names, then
/// every node in turn.
async fn send_to_dc(cross: &CrossDc, dc: &str, make: impl Fn() -> PeerRequest) -> Result<ReplicateAck, NodeError> {
    let mut targets: Vec<NodeId> = cross.config().dc_nodes(dc).iter().map(|n| n.id).collect();
    if let Some(l) = cross.links.get(dc).remote_leader {
        targets.retain(|t| *t != l);
        targets.insert(0, l);
    }
    let mut last = NodeError::Unreachable(dc.to_string());
    let mut tried = Vec::new();
    while let Some(target) = targets.first().copied() {
        targets.remove(0);
        tried.push(target);
        match cross.peers.call(target, make(), None).await {
            Ok(PeerResponse::Replicate(Ok(ack))) => {
                cross.links.update(dc, |l| l.remote_leader = Some(target));
                return Ok(ack);
            }
            Ok(PeerResponse::Replicate(Err(NodeError::NotLeader(Some(l))))) if !tried.contains(&l) => {
                cross.links.update(dc, |link| link.remote_leader = Some(l));
                targets.insert(0, l);
            }
            Ok(PeerResponse::Replicate(Err(e))) => last = e,
            Ok(other) => last = NodeError::Internal(format!("unexpected answer to replication: {other:?}")),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// While leader, drops outbox events every DC has applied, and any beyond the cap.
pub async fn trim_loop(cross: Arc<CrossDc>) {
    let interval = Duration::from_millis(cross.config().replication.probe_interval_ms * 4);
    loop {
        tokio::time::sleep(interval).await;
        if !cross.shard.is_leader() {
            continue;
        }
        let Some(upto) = trim_point(&cross) else { continue };
        let req = Request::new(Command::TrimOutbox { upto }, None);
        match cross.shard.actors.submit(req).await {
            Ok(Outcome::Trimmed) => tracing::debug!(upto, "outbox trimmed"),
            other => tracing::debug!(?other, "outbox trim failed"),
        }
    }
}

fn trim_point(cross: &CrossDc) -> Option<u64> {
    let links = cross.links.all();
    let acked: Option<Vec<u64>> = links.values().map(|l| l.acked).collect();
    let all_applied = acked.and_then(|a| a.into_iter().min()).unwrap_or(0);
    let over_cap = cross.shard.sm.out_seq().saturating_sub(cross.config().replication.outbox_len_max);
    let upto = all_applied.max(over_cap);
    (upto >= cross.shard.sm.outbox_floor()).then_some(upto)
}
