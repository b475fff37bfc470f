//! The receiving side: accepts peer connections, learns who connected (the TLS client
//! certificate, see [`super::tls`]), and answers each request through a [`PeerHandler`]
//! with that identity. A connection whose identity cannot be established is closed before
//! any frame is read. A frame that is oversized, truncated, of an unknown version or
//! undecodable is logged and closes that connection; nothing in it is acted on.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;

use super::tls::{self, BoxStream, Directory, Security};
use tokio::sync::{mpsc, Semaphore};

use super::frame::{read_frame, write_frame};
use super::{Faults, PeerRequest, PeerResponse, Wan};
use crate::codec;
use crate::raft::NodeId;

#[async_trait::async_trait]
pub trait PeerHandler: Send + Sync + 'static {
    async fn handle(&self, from: NodeId, req: PeerRequest) -> PeerResponse;
}

pub struct ServerLimits {
    pub frame_bytes_max: usize,
    pub inflight_per_connection_max: usize,
    /// Connection caps (global, per source IP) and the idle timeout.
    pub door: crate::door::Door,
}

/// Who may connect, and how that is checked.
#[derive(Clone)]
pub struct Admission {
    pub security: Security,
    pub directory: Arc<Directory>,
}

/// Accepts connections until the task is aborted.
pub async fn serve(listener: TcpListener, handler: Arc<dyn PeerHandler>, faults: Faults, wan: Wan, limits: ServerLimits, admission: Admission) {
    let limits = Arc::new(limits);
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                // Over a connection cap: dropped (closed) at once; else idle-timed.
                let Some(stream) = limits.door.admit(stream, addr.ip()) else { continue };
                let (handler, faults, wan, limits, admission) = (handler.clone(), faults.clone(), wan.clone(), limits.clone(), admission.clone());
                tokio::spawn(async move {
                    match tls::accept(stream, &admission.security, &admission.directory, limits.frame_bytes_max).await {
                        Ok((stream, from)) => connection(stream, addr, from, handler, faults, wan, limits).await,
                        Err(reason) => crate::warn_limited!("peer_refused", peer = %addr, %reason, "peer connection refused"),
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: BoxStream, addr: SocketAddr, from: NodeId, handler: Arc<dyn PeerHandler>, faults: Faults, wan: Wan, limits: Arc<ServerLimits>) {
    let (mut r, w) = tokio::io::split(stream);
    // Bounded like the handlers that fill it: at most one answer each.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(limits.inflight_per_connection_max.max(1));
    if wan.crosses(from) {
        // Answers to another DC's node cross the WAN: they wait its latency, in order.
        let (delayed_tx, delayed_rx) = mpsc::channel(limits.inflight_per_connection_max.max(1));
        let refuse = move |_| crate::warn_limited!("wan_queue_full", peer = %addr, "WAN delay queue full; answer dropped");
        tokio::spawn(super::wan::delay_line(rx, delayed_tx, wan, from, refuse));
        rx = delayed_rx;
    }
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(w);
        while let Some(bytes) = rx.recv().await {
            if write_frame(&mut w, &bytes).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if write_frame(&mut w, &more).await.is_err() {
                    return;
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
    });
    let inflight = Arc::new(Semaphore::new(limits.inflight_per_connection_max));
    loop {
        let frame = match read_frame(&mut r, limits.frame_bytes_max).await {
            Ok(f) => f,
            Err(super::frame::FrameError::Closed) => break,
            Err(e) => {
                crate::warn_limited!("peer_bad_frame", peer = %addr, error = %e, "bad frame from peer; closing connection");
                break;
            }
        };
        let (id, req) = match codec::decode::<(u64, PeerRequest)>(&frame) {
            Ok(m) => m,
            Err(e) => {
                crate::warn_limited!("peer_undecodable", peer = %addr, error = %e, "undecodable request from peer; closing connection");
                break;
            }
        };
        if faults.is_cut(from) {
            continue;
        }
        // Waiting for a permit stops reading: TCP back-pressure slows the sender down.
        let Ok(permit) = inflight.clone().acquire_owned().await else { break };
        let (handler, tx, delay) = (handler.clone(), tx.clone(), faults.delay(from));
        tokio::spawn(async move {
            let resp = handler.handle(from, req).await;
            if let Some(d) = delay {
                // The answer crosses the same slow link as the request did.
                tokio::time::sleep(d).await;
            }
            let _ = tx.send(codec::encode(&(id, resp))).await;
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}
