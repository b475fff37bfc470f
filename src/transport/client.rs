//! The sending side: one persistent connection per peer, opened on first use (TCP, then
//! the TLS handshake that proves both ends' identities), reopened with exponential
//! backoff after a failure. Requests are multiplexed by id; each has a
//! timeout, and at most `peer_inflight_max` wait for an answer at once. Requests to a node
//! of another DC pass through a [`super::wan::delay_line`] first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::addresses::AddressBook;
use super::frame::{read_frame, write_frame};
use super::tls::{self, BoxStream, Security};
use super::{Faults, PeerRequest, PeerResponse, Wan};
use crate::codec;
use crate::config::{ClusterConfig, Limits};
use crate::error::NodeError;
use crate::raft::NodeId;

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// `Err` when the request was never sent; dropped unanswered when the connection died
/// after sending it.
type Reply = oneshot::Sender<Result<PeerResponse, NodeError>>;
type Pending = Arc<Mutex<HashMap<u64, Reply>>>;

struct Outgoing {
    id: u64,
    bytes: Vec<u8>,
    reply: Reply,
}

/// A client for one peer. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct PeerClient {
    peer: NodeId,
    tx: mpsc::UnboundedSender<Outgoing>,
    next_id: Arc<AtomicU64>,
    inflight: Arc<Semaphore>,
    timeout: Duration,
    faults: Faults,
}

impl PeerClient {
    fn new(peer: &Target, limits: &Limits, faults: Faults, security: Security, wan: &Wan) -> Self {
        // Unbounded channels, bounded by their senders: every frame put in them holds one of
        // the `peer_inflight_max` permits of `call` until its answer, and the WAN delay
        // line passes on only what its bounded queue (`wan.queue_len_max`) took.
        let (tx, mut rx) = mpsc::unbounded_channel();
        if wan.crosses(peer.id) {
            let (delayed_tx, delayed_rx) = mpsc::unbounded_channel();
            let addr = peer.addr.clone();
            let refuse = move |o: Outgoing| {
                let _ = o.reply.send(Err(NodeError::Overloaded(format!("WAN delay queue to {addr} is full"))));
            };
            tokio::spawn(super::wan::delay_line(rx, delayed_tx, wan.clone(), peer.id, refuse));
            rx = delayed_rx;
        }
        let backoff_max = Duration::from_millis(limits.peer_backoff_max_ms);
        tokio::spawn(connection_loop(peer.clone(), security, rx, limits.peer_frame_bytes_max, backoff_max));
        PeerClient {
            peer: peer.id,
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            inflight: Arc::new(Semaphore::new(limits.peer_inflight_max)),
            timeout: Duration::from_millis(limits.peer_request_timeout_ms),
            faults,
        }
    }

    /// Sends `req` and waits for the answer, at most `timeout` (or the default).
    pub async fn call(&self, req: PeerRequest, timeout: Option<Duration>) -> Result<PeerResponse, NodeError> {
        let timeout = timeout.unwrap_or(self.timeout);
        if self.faults.is_cut(self.peer) {
            // A silent drop: the caller learns nothing until its timeout, as on a real cut.
            tokio::time::sleep(timeout).await;
            return Err(NodeError::Timeout);
        }
        if let Some(d) = self.faults.delay(self.peer) {
            tokio::time::sleep(d).await;
        }
        let _permit = self.inflight.try_acquire().map_err(|_| NodeError::Overloaded(format!("too many requests in flight to node {}", self.peer)))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let bytes = codec::encode(&(id, req));
        self.tx.send(Outgoing { id, bytes, reply }).map_err(|_| NodeError::Internal("peer connection task stopped".into()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => resp,
            // The sender was dropped: the connection failed after the request went out.
            Ok(Err(_)) => Err(NodeError::Lost(format!("node {}", self.peer))),
            Err(_) => Err(NodeError::Timeout),
        }
    }
}

/// A peer as the client needs it: where it listens and who its certificate must say it is.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: NodeId,
    pub name: String,
    pub dc: String,
    /// `ip:port`, or `host:port` for a node named by host: resolved at every connection.
    pub addr: String,
}

/// Opens a connection to `peer` and proves both identities.
async fn open(peer: &Target, security: &Security) -> Result<BoxStream, String> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, super::addresses::connect(&peer.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    let _ = tcp.set_nodelay(true);
    tls::connect(tcp, security, &peer.name, &peer.dc).await
}

async fn connection_loop(peer: Target, security: Security, mut rx: mpsc::UnboundedReceiver<Outgoing>, frame_max: usize, backoff_max: Duration) {
    let mut backoff = BACKOFF_MIN;
    let addr = peer.addr.as_str();
    // Connect lazily, when there is something to send.
    while let Some(first) = rx.recv().await {
        let stream = match open(&peer, &security).await {
            Ok(s) => s,
            Err(reason) => {
                refuse(first, addr);
                tracing::debug!(%addr, %reason, backoff_ms = backoff.as_millis() as u64, "peer connect failed");
                fail_fast_for(&mut rx, backoff, addr).await;
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        serve_connection(stream, first, &mut rx, frame_max).await;
        tracing::debug!(%addr, "peer connection closed");
    }
}

/// One request on a fresh connection, as node `peer` expects it from whoever `security`
/// names: for tools and tests that speak to a node without running one.
pub async fn call_once(peer: &Target, security: &Security, req: &PeerRequest, frame_max: usize) -> Result<PeerResponse, String> {
    let stream = open(peer, security).await?;
    let (mut r, w) = tokio::io::split(stream);
    let mut w = BufWriter::new(w);
    write_frame(&mut w, &codec::encode(&(1u64, req))).await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())?;
    let frame = read_frame(&mut r, frame_max).await.map_err(|e| e.to_string())?;
    let (_, resp) = codec::decode::<(u64, PeerResponse)>(&frame).map_err(|e| e.to_string())?;
    Ok(resp)
}

/// While backing off from a peer that refused us, fail every request at once (the caller
/// sees `Unreachable` and can go elsewhere) instead of holding it for the backoff.
async fn fail_fast_for(rx: &mut mpsc::UnboundedReceiver<Outgoing>, backoff: Duration, addr: &str) {
    let until = tokio::time::Instant::now() + backoff;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return,
            o = rx.recv() => match o {
                Some(o) => refuse(o, addr),
                None => return,
            },
        }
    }
}

/// Tells the caller its request was never sent.
fn refuse(o: Outgoing, addr: &str) {
    let _ = o.reply.send(Err(NodeError::Unreachable(addr.to_string())));
}

/// Writes requests and routes answers until the connection fails; then every request
/// still waiting on it is failed (by dropping its reply sender).
async fn serve_connection(stream: BoxStream, first: Outgoing, rx: &mut mpsc::UnboundedReceiver<Outgoing>, frame_max: usize) {
    let (mut r, w) = tokio::io::split(stream);
    let mut w = BufWriter::new(w);
    let pending: Pending = Default::default();
    let reader_pending = pending.clone();
    let mut reader = tokio::spawn(async move {
        loop {
            let frame = match read_frame(&mut r, frame_max).await {
                Ok(f) => f,
                Err(e) => return tracing::debug!(error = %e, "peer read ended"),
            };
            match codec::decode::<(u64, PeerResponse)>(&frame) {
                Ok((id, resp)) => {
                    if let Some(reply) = reader_pending.lock().expect("pending lock").remove(&id) {
                        let _ = reply.send(Ok(resp));
                    }
                }
                Err(e) => return tracing::warn!(error = %e, "bad response frame from peer; dropping connection"),
            }
        }
    });
    let mut next = Some(first);
    loop {
        let out = match next.take() {
            Some(o) => o,
            None => tokio::select! {
                o = rx.recv() => match o { Some(o) => o, None => break },
                _ = &mut reader => break,
            },
        };
        if write_batch(&mut w, out, rx, &pending).await.is_err() {
            break;
        }
    }
    reader.abort();
    pending.lock().expect("pending lock").clear();
}

/// Writes `first` and whatever else is already queued, then flushes once.
async fn write_batch(
    w: &mut BufWriter<tokio::io::WriteHalf<BoxStream>>,
    first: Outgoing,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    pending: &Pending,
) -> Result<(), super::frame::FrameError> {
    let mut out = first;
    loop {
        if out.reply.is_closed() {
            // The caller gave up (timeout): do not send a request nobody waits for.
        } else {
            pending.lock().expect("pending lock").insert(out.id, out.reply);
            write_frame(w, &out.bytes).await?;
        }
        match rx.try_recv() {
            Ok(o) => out = o,
            Err(_) => break,
        }
    }
    w.flush().await?;
    Ok(())
}

/// Clients for every peer in the cluster, by node id, sending for one shard.
#[derive(Clone)]
pub struct Peers {
    clients: Arc<HashMap<NodeId, PeerClient>>,
    /// Where peers named by host are now, for the DNS answers.
    addresses: Arc<AddressBook>,
    /// The shard whose requests these are: wrapped in `PeerRequest::Shard` unless 0.
    shard: u16,
}

impl Peers {
    pub fn new(config: &ClusterConfig, me: NodeId, faults: Faults, security: Security, wan: &Wan) -> Self {
        let clients = config
            .nodes()
            .into_iter()
            .filter(|n| n.id != me)
            .map(|n| {
                let target = Target { id: n.id, addr: n.authority(n.peer), name: n.name, dc: n.dc };
                (n.id, PeerClient::new(&target, &config.limits, faults.clone(), security.clone(), wan))
            })
            .collect();
        Peers { clients: Arc::new(clients), addresses: Arc::new(AddressBook::new(config)), shard: 0 }
    }

    pub fn addresses(&self) -> &Arc<AddressBook> {
        &self.addresses
    }

    /// The same connections, sending for `shard`.
    pub fn for_shard(&self, shard: u16) -> Peers {
        Peers { clients: self.clients.clone(), addresses: self.addresses.clone(), shard }
    }

    pub fn get(&self, id: NodeId) -> Option<&PeerClient> {
        self.clients.get(&id)
    }

    pub async fn call(&self, id: NodeId, req: PeerRequest, timeout: Option<Duration>) -> Result<PeerResponse, NodeError> {
        let client = self.get(id).ok_or_else(|| NodeError::Unreachable(format!("unknown node {id}")))?;
        let req = if self.shard == 0 { req } else { PeerRequest::Shard { shard: self.shard, req: Box::new(req) } };
        client.call(req, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::transport::faults::FaultRules;
    use crate::transport::message::ProbeAck;
    use crate::transport::server::{serve, Admission, PeerHandler, ServerLimits};
    use crate::transport::tls::Directory;

    struct Echo;

    #[async_trait::async_trait]
    impl PeerHandler for Echo {
        async fn handle(&self, _from: NodeId, _req: PeerRequest) -> PeerResponse {
            PeerResponse::Probe(ProbeAck { dc: "dc2".into(), leader: None, term: 0 })
        }
    }

    fn delay_to(peer: NodeId, ms: u64) -> Faults {
        let faults = Faults::default();
        faults.set(FaultRules { delay_ms: [(peer, ms)].into(), ..FaultRules::default() });
        faults
    }

    /// Both ends delay what they send to the other: the request waits once, the answer once.
    #[tokio::test]
    async fn a_delayed_link_holds_the_request_and_the_answer() {
        const MS: u64 = 150;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let door = crate::door::Door::new("peer", crate::door::ConnLimits { total_max: 8, per_source_max: 8 }, Duration::from_secs(60));
        let limits = ServerLimits { frame_bytes_max: 1 << 20, inflight_per_connection_max: 8, door };
        let directory = Arc::new(Directory::of([("n1", 1, "dc1"), ("n2", 2, "dc2")]));
        let admission = Admission { security: Security::Plaintext { me: 2 }, directory };
        let server = tokio::spawn(serve(listener, Arc::new(Echo), delay_to(1, MS), Wan::default(), limits, admission));
        let target = Target { id: 2, name: "n2".into(), dc: "dc2".into(), addr: addr.to_string() };
        let client = PeerClient::new(&target, &Limits::default(), delay_to(2, MS), Security::Plaintext { me: 1 }, &Wan::default());
        let start = Instant::now();
        let resp = client.call(PeerRequest::Probe, None).await.expect("answered");
        assert!(matches!(resp, PeerResponse::Probe(_)), "{resp:?}");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2 * MS), "a round trip took {took:?}, less than twice the {MS} ms delay");
        server.abort();
    }
}
