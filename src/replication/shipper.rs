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
        match ship_once(&cross, &dc).await {
            Ok(true) => {}
            // Caught up: wait for a new event of ours, or send an empty batch as heartbeat.
            Ok(false) => {
                let shipped = cross.shard.sm.out_seq();
                let _ = tokio::time::timeout(interval, async { while metrics.changed().await.is_ok() && cross.shard.sm.out_seq() == shipped {} }).await;
            }
            Err(e) => {
                tracing::debug!(%dc, error = %e, "replication batch failed");
                tokio::time::sleep(interval).await;
            }
        }
    }
}

/// Sends one batch (or a snapshot, or an empty probe); returns whether more is waiting.
async fn ship_once(cross: &CrossDc, dc: &str) -> Result<bool, NodeError> {
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
    // Read again: events emitted while the batch was out may have been in it.
    let emitted = sm.out_seq();
    if let Err(e) = super::guard::accept_ack(ack.cursor, emitted) {
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
    let oldest_unacked = sm.outbox(ack.cursor.saturating_add(1), 1).first().map(|e| hlc::age_ms(e.hlc)).unwrap_or(0);
    cross.links.update(dc, |l| {
        l.acked = Some(ack.cursor);
        l.last_contact = Some(Instant::now());
        l.lag_events = out_seq.saturating_sub(ack.cursor);
        l.lag_ms = oldest_unacked;
    });
    cross.metrics.replication_lag_events.with_label_values(&[dc]).set(out_seq.saturating_sub(ack.cursor) as i64);
    cross.metrics.replication_lag_ms.with_label_values(&[dc]).set(oldest_unacked as i64);
    Ok(ack.cursor < out_seq)
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
