//! The sending side: one persistent connection per peer, opened on first use (TCP, then
//! the TLS handshake that proves both ends' identities), reopened with exponential
//! backoff after a failure. Requests are multiplexed by id; each has a
//! timeout, and at most `peer_inflight_max` wait for an answer at once. Requests to a node
//! of another DC pass through a [`super::wan::delay_line`] first.
//!
//! A connection with requests waiting that hears nothing from the peer pings it (a
//! `Probe`); one that then stays silent for `peer_request_timeout_ms` is dropped, failing
//! every request on it. So a peer cut off by the network is noticed within that time,
//! whatever a request's own timeout: a snapshot's last chunk may wait minutes for the
//! install behind it, but not for a peer that is gone.

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
/// The id of a liveness ping: request ids start at 1, so its answer matches nothing.
const PING_ID: u64 = 0;

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
    /// How long a connection with requests waiting may hear nothing before it is dropped.
    silence_max: Duration,
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
        let silence_max = Duration::from_millis(limits.peer_request_timeout_ms);
        tokio::spawn(connection_loop(peer.clone(), security, rx, limits.peer_frame_bytes_max, backoff_max, silence_max));
        PeerClient {
            peer: peer.id,
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            inflight: Arc::new(Semaphore::new(limits.peer_inflight_max)),
            timeout: Duration::from_millis(limits.peer_request_timeout_ms),
            silence_max,
            faults,
        }
    }

    /// Sends `req` and waits for the answer, at most `timeout` (or the default).
    pub async fn call(&self, req: PeerRequest, timeout: Option<Duration>) -> Result<PeerResponse, NodeError> {
        let timeout = timeout.unwrap_or(self.timeout);
        if self.faults.is_cut(self.peer) {
            // A silent drop, as on a real cut: the caller learns nothing until its timeout,
            // or until the connection's unanswered pings drop it, whichever comes first.
            if timeout <= self.silence_max {
                tokio::time::sleep(timeout).await;
                return Err(NodeError::Timeout);
            }
            tokio::time::sleep(self.silence_max).await;
            return Err(silent(self.peer, self.silence_max));
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

/// What a request learns when its connection was dropped for silence.
fn silent(peer: NodeId, silence_max: Duration) -> NodeError {
    NodeError::Lost(format!("node {peer}: no answer, not even to a ping, for {} ms", silence_max.as_millis()))
}

async fn connection_loop(
    peer: Target,
    security: Security,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    frame_max: usize,
    backoff_max: Duration,
    silence_max: Duration,
) {
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
        serve_connection(stream, first, &mut rx, frame_max, (peer.id, silence_max)).await;
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

/// Writes requests and routes answers until the connection fails or falls silent (see
/// the module's doc); then every request still waiting on it is failed.
async fn serve_connection(
    stream: BoxStream,
    first: Outgoing,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    frame_max: usize,
    (peer, silence_max): (NodeId, Duration),
) {
    let (mut r, w) = tokio::io::split(stream);
    let mut w = BufWriter::new(w);
    let pending: Pending = Default::default();
    let heard = Heard::default();
    let (reader_pending, reader_heard) = (pending.clone(), heard.clone());
    let mut reader = tokio::spawn(async move {
        loop {
            let frame = match read_frame(&mut r, frame_max).await {
                Ok(f) => f,
                Err(e) => return tracing::debug!(error = %e, "peer read ended"),
            };
            reader_heard.now();
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
    // (A zero period would panic: `peer_request_timeout_ms` may be as low as 1.)
    let mut tick = tokio::time::interval((silence_max / 4).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = Some(first);
    let mut silenced = false;
    loop {
        let out = match next.take() {
            Some(o) => o,
            None => tokio::select! {
                o = rx.recv() => match o { Some(o) => o, None => break },
                _ = &mut reader => break,
                _ = tick.tick() => {
                    match check_liveness(&heard, &pending, silence_max) {
                        Liveness::Fine => {}
                        Liveness::Ping => if ping(&mut w).await.is_err() { break },
                        Liveness::Dead => { silenced = true; break }
                    }
                    continue;
                }
            },
        };
        if pending.lock().expect("pending lock").is_empty() {
            // Silence while nothing was asked is not the peer's fault.
            heard.now();
        }
        if write_batch(&mut w, out, rx, &pending).await.is_err() {
            break;
        }
    }
    reader.abort();
    let failed: Vec<Reply> = pending.lock().expect("pending lock").drain().map(|(_, r)| r).collect();
    if silenced {
        tracing::warn!(peer, waiting = failed.len(), silence_ms = silence_max.as_millis() as u64, "peer silent with requests waiting; dropping the connection");
        failed.into_iter().for_each(|r| drop(r.send(Err(silent(peer, silence_max)))));
    }
}

/// When the connection last heard from the peer (or began waiting for it).
#[derive(Clone)]
struct Heard(Arc<Mutex<tokio::time::Instant>>);

impl Default for Heard {
    fn default() -> Self {
        Heard(Arc::new(Mutex::new(tokio::time::Instant::now())))
    }
}

impl Heard {
    fn now(&self) {
        *self.0.lock().expect("heard lock") = tokio::time::Instant::now();
    }

    fn quiet_for(&self) -> Duration {
        self.0.lock().expect("heard lock").elapsed()
    }
}

#[derive(Debug, PartialEq)]
enum Liveness {
    Fine,
    Ping,
    Dead,
}

/// With requests waiting: a quarter of `silence_max` without a word asks for a ping, all
/// of it means the peer is gone. Without any, silence is fine.
fn check_liveness(heard: &Heard, pending: &Pending, silence_max: Duration) -> Liveness {
    if pending.lock().expect("pending lock").is_empty() {
        return Liveness::Fine;
    }
    let quiet = heard.quiet_for();
    if quiet >= silence_max {
        Liveness::Dead
    } else if quiet >= silence_max / 4 {
        Liveness::Ping
    } else {
        Liveness::Fine
    }
}

/// Asks the peer for any answer at all (a `Probe`, which every node answers at once).
async fn ping(w: &mut BufWriter<tokio::io::WriteHalf<BoxStream>>) -> Result<(), super::frame::FrameError> {
    write_frame(w, &codec::encode(&(PING_ID, PeerRequest::Probe))).await?;
    w.flush().await?;
    Ok(())
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

    /// Node 2 of `dc` (plaintext, on a free loopback port) answering with `handler`; node 1
    /// of dc1 may call it.
    async fn test_peer(dc: &str, handler: Arc<dyn PeerHandler>, faults: Faults) -> (Target, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let door = crate::door::Door::new("peer", crate::door::ConnLimits { total_max: 8, per_source_max: 8 }, Duration::from_secs(60));
        let limits = ServerLimits { frame_bytes_max: 1 << 20, inflight_per_connection_max: 8, door };
        let directory = Arc::new(Directory::of([("n1", 1, "dc1"), ("n2", 2, dc)]));
        let admission = Admission { security: Security::Plaintext { me: 2 }, directory };
        let server = tokio::spawn(serve(listener, handler, faults, Wan::default(), limits, admission));
        (Target { id: 2, name: "n2".into(), dc: dc.into(), addr: addr.to_string() }, server)
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
        let (target, server) = test_peer("dc2", Arc::new(Echo), delay_to(1, MS)).await;
        let client = PeerClient::new(&target, &Limits::default(), delay_to(2, MS), Security::Plaintext { me: 1 }, &Wan::default());
        let start = Instant::now();
        let resp = client.call(PeerRequest::Probe, None).await.expect("answered");
        assert!(matches!(resp, PeerResponse::Probe(_)), "{resp:?}");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2 * MS), "a round trip took {took:?}, less than twice the {MS} ms delay");
        server.abort();
    }

    /// Answers pings at once and anything else after `slow`; or nothing at all when mute.
    struct Stalled {
        slow: Duration,
        mute: bool,
    }

    #[async_trait::async_trait]
    impl PeerHandler for Stalled {
        async fn handle(&self, _from: NodeId, req: PeerRequest) -> PeerResponse {
            if self.mute {
                std::future::pending::<()>().await;
            }
            if !matches!(req, PeerRequest::Probe) {
                tokio::time::sleep(self.slow).await;
            }
            PeerResponse::Probe(ProbeAck { dc: "dc1".into(), leader: None, term: 0 })
        }
    }

    async fn stalled_peer(slow: Duration, mute: bool) -> (PeerClient, tokio::task::JoinHandle<()>) {
        let (target, server) = test_peer("dc1", Arc::new(Stalled { slow, mute }), Faults::default()).await;
        let limits = Limits { peer_request_timeout_ms: 400, ..Limits::default() };
        (PeerClient::new(&target, &limits, Faults::default(), Security::Plaintext { me: 1 }, &Wan::default()), server)
    }

    /// A peer that answers nothing, not even a ping, fails a request with a long timeout
    /// (a snapshot's last chunk) once the connection has been silent for the request
    /// timeout, instead of holding it for its own.
    #[tokio::test]
    async fn a_silent_peer_fails_a_long_request_within_the_silence_bound() {
        let (client, server) = stalled_peer(Duration::ZERO, true).await;
        let start = Instant::now();
        let res = client.call(PeerRequest::Clock, Some(Duration::from_secs(30))).await;
        let took = start.elapsed();
        assert!(matches!(&res, Err(NodeError::Lost(m)) if m.contains("not even to a ping")), "{res:?}");
        assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(5), "failed after {took:?}");
        server.abort();
    }

    /// A peer that answers its pings keeps the connection, however long one request takes.
    #[tokio::test]
    async fn a_slow_answer_from_a_live_peer_is_waited_for() {
        let (client, server) = stalled_peer(Duration::from_millis(1500), false).await;
        let res = client.call(PeerRequest::Clock, Some(Duration::from_secs(30))).await;
        assert!(matches!(res, Ok(PeerResponse::Probe(_))), "{res:?}");
        server.abort();
    }
}
