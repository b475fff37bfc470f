//! Embedded authoritative DNS server for the shop's multi-datacentre topology.
//!
//! The server answers for one zone (default `agora.test.`) from a live
//! [`DnsSnapshot`] taken from a [`DnsView`] on every query, so health, drain,
//! weight and leader changes are visible on the very next answer.
//!
//! Names served (`<zone>` = the snapshot zone):
//! - `<zone>` SOA / NS (`ns1.<zone>`, `ns2.<zone>`, ... one per node overall)
//! - `nsK.<zone>` A/AAAA: glue for the K-th node overall (snapshot order)
//! - `shop.<zone>` A/AAAA: one address per serving DC, weighted round-robin
//! - `dcN.shop.<zone>` A/AAAA: that DC's healthy nodes, rotated
//! - `leader.dcN.<zone>` A/AAAA: that DC's leader
//! - `_http._tcp.shop.<zone>` SRV: healthy nodes of non-drained DCs
//! - `dcN-nK.<zone>` A/AAAA: the K-th node (1-based) of DC `dcN`
//!
//! # Rotation and weights for `shop.<zone>`
//!
//! A DC *serves* when it is healthy, not drained, has weight > 0 and has an
//! address (its leader, else its first healthy node). Each DC's weight is
//! capped at [`MAX_WEIGHT`]. The rotation cycle is the smooth weighted
//! round-robin sequence (the nginx algorithm, ties to the earlier DC) over the
//! serving DCs with an address of the queried family, so a DC of weight `w`
//! appears exactly `w` times in a cycle of length `sum(w)`, spread out rather
//! than back to back. A per-server atomic counter (advanced once per
//! `shop` or `dcN.shop` address query) picks the slot
//! (`counter % sum(w)`): that DC leads the answer, and every other serving DC
//! follows once, in snapshot order starting after the leading DC (wrapping).
//! If the client (ECS address, else source address) is inside a serving DC's
//! subnet (longest prefix wins), that DC is moved to the front and the rest
//! keep their rotated order.
//!
//! If no DC serves, the answer *fails open*: every non-drained DC with a
//! non-zero weight (or every DC, if none is left) is listed, each with an
//! equal share of the rotation, using its leader, first healthy node or first
//! node. Nearest-first does not apply then, since no DC is known good.
//!
//! # ANY and response-rate limiting
//!
//! An ANY query for a name of the zone gets the one synthesized record RFC 8482
//! suggests (`HINFO "RFC8482" ""`, zone TTL), over UDP and TCP alike: no
//! resolver needs ANY, and a full answer would be the largest we can send.
//! UDP responses are rate-limited per source netblock ([`RateLimit`], `rrl`).

mod answer;
mod cache;
mod handler;
mod mmsg;
mod rrl;
mod select;
mod stats;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use tokio::net::TcpListener;
use tracing::{info, warn};

use self::handler::{Handler, SharedHandler};
use self::stats::Counters;
pub use self::stats::DnsStats;
use self::udp::UdpWorkers;
pub use self::udp::MAX_WORKERS as UDP_WORKERS_MAX;

/// Upper bound on a DC weight; keeps the rotation cycle short.
pub const MAX_WEIGHT: u32 = 100;
/// Upper bound on records in any answer section, so answers stay bounded.
pub const MAX_ANSWER_RECORDS: usize = 128;
/// Largest UDP response we send even if the client offers more (DNS flag day 2020).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Default zone served when a snapshot leaves it at its default.
pub const DEFAULT_ZONE: &str = "agora.test.";
/// Default record TTL in seconds: short, because health changes quickly.
pub const DEFAULT_TTL: u32 = 5;
/// Default UDP responses per second per source netblock. A resolver asks each of
/// our names again at most once per TTL, so even a netblock full of resolvers
/// stays far below this.
pub const DEFAULT_RRL_RESPONSES_PER_S: u32 = 1000;
/// Default slip: every second limited response is sent truncated.
pub const DEFAULT_RRL_SLIP: u32 = 2;
/// Default bound on the source netblocks tracked (some 50 bytes each, allocated at start).
pub const DEFAULT_RRL_SOURCES_MAX: usize = 20_000;

/// Idle TCP connections are closed after this long.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Outgoing responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// How long `shutdown` waits for in-flight work before giving up.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts to find a port free for both UDP and TCP when binding port 0.
const EPHEMERAL_BIND_ATTEMPTS: usize = 16;

/// Everything the DNS server needs to know about the cluster at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSnapshot {
    /// Zone apex, e.g. `"agora.test."` (trailing dot optional, case ignored).
    pub zone: String,
    /// TTL for every record and for negative answers (SOA minimum).
    pub ttl: u32,
    /// Datacentres in a stable order; the order drives rotation and naming.
    pub dcs: Vec<DcView>,
}

/// What `shop.<zone> A` answers now to a client outside every DC's subnet: (DC, address)
/// in the order of the rotation's first slot, and whether the answer fails open (no DC
/// serving, so every DC is listed).
pub fn shop_answer(snap: &DnsSnapshot) -> (Vec<(String, IpAddr)>, bool) {
    let pick = select::pick_shop(&snap.dcs, select::Family::V4, 0, None);
    let order = pick.order.iter().filter_map(|(i, ip)| Some((snap.dcs.get(*i)?.name.clone(), *ip))).collect();
    (order, pick.fail_open)
}

/// One datacentre as seen by the DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcView {
    /// DNS label of the DC, e.g. `"dc1"`.
    pub name: String,
    pub healthy: bool,
    pub drained: bool,
    /// Share of `shop` rotation; 0 excludes the DC like a drain.
    pub weight: u32,
    pub leader: Option<IpAddr>,
    pub nodes: Vec<NodeView>,
    /// Client subnets (address, prefix length) that should prefer this DC.
    pub subnets: Vec<(IpAddr, u8)>,
}

/// One node of a datacentre.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub ip: IpAddr,
    pub http_port: u16,
    pub healthy: bool,
}

/// Response-rate limiting of UDP responses per source netblock (IPv4 /24,
/// IPv6 /56); TCP is not limited. See the `rrl` module for the algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Responses per second per netblock; a netblock may also send one second's
    /// worth at once (the burst). Must be > 0.
    pub responses_per_s: u32,
    /// Every `slip`-th limited response is sent empty with TC=1 so a real
    /// resolver retries over TCP; the others are dropped. 0 drops them all.
    pub slip: u32,
    /// Netblocks tracked at most; the least recently seen are forgotten first.
    pub sources_max: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self { responses_per_s: DEFAULT_RRL_RESPONSES_PER_S, slip: DEFAULT_RRL_SLIP, sources_max: DEFAULT_RRL_SOURCES_MAX }
    }
}

/// Source of topology for the DNS server; called once per query, keep it cheap.
pub trait DnsView: Send + Sync + 'static {
    fn snapshot(&self) -> DnsSnapshot;

    /// The snapshot, shared. A view that keeps a snapshot for a while should hand
    /// out the same `Arc` meanwhile: the UDP answer caches then know at a pointer
    /// comparison that their answers still hold.
    fn shared(&self) -> Arc<DnsSnapshot> {
        Arc::new(self.snapshot())
    }
}

/// Errors from starting the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("failed to bind dns {proto} socket on {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("dns socket error: {0}")]
    Io(#[from] std::io::Error),
}

impl Default for DnsSnapshot {
    fn default() -> Self {
        Self { zone: DEFAULT_ZONE.to_string(), ttl: DEFAULT_TTL, dcs: Vec::new() }
    }
}

impl DnsSnapshot {
    /// SOA serial for this snapshot: a stable hash of the answer topology, so
    /// every nameserver fed the same topology reports the same serial.
    #[must_use]
    pub fn serial(&self) -> u32 {
        answer::topology_serial(self)
    }
}

impl DcView {
    /// A healthy, undrained DC of weight 1 with no leader, nodes or subnets.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), healthy: true, drained: false, weight: 1, leader: None, nodes: Vec::new(), subnets: Vec::new() }
    }
}

impl NodeView {
    /// A healthy node.
    pub fn new(name: impl Into<String>, ip: IpAddr, http_port: u16) -> Self {
        Self { name: name.into(), ip, http_port, healthy: true }
    }
}

/// Handle to a running DNS server (UDP and TCP on the same port): UDP served by
/// worker threads of its own (see `udp`), TCP by hickory's server.
///
/// Dropping the handle aborts the server tasks and tells the UDP workers to stop;
/// `shutdown` stops them gracefully.
pub struct DnsServer {
    server: Server<SharedHandler>,
    udp: Option<UdpWorkers>,
    local_addr: SocketAddr,
    stats: Arc<Counters>,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr`, serves until `shutdown()` or drop.
    ///
    /// # Errors
    /// `DnsError::Bind` if either socket cannot be bound (for port 0, if no
    /// port free for both was found).
    /// `udp_workers`: UDP threads, 0 for this machine's count (see `UdpWorkers::count`).
    pub async fn start(addr: SocketAddr, view: Arc<dyn DnsView>, limit: RateLimit, udp_workers: usize) -> Result<DnsServer, DnsError> {
        let workers = UdpWorkers::count(udp_workers);
        let (tcp, sockets) = bind_all(addr, workers).await?;
        let local_addr = tcp.local_addr()?;
        let stats = Arc::new(Counters::default());
        let handler = Arc::new(Handler::new(view, stats.clone(), &limit));
        let udp = UdpWorkers::start(sockets, &handler)?;
        let mut server = Server::new(SharedHandler(handler));
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        info!(%local_addr, udp_workers = workers, "dns server listening");
        Ok(DnsServer { server, udp: Some(udp), local_addr, stats })
    }

    /// The bound address (with the real port when started on port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting queries and waits (bounded) for the server tasks to end.
    pub async fn shutdown(mut self) {
        if let Some(udp) = self.udp.take() {
            let _ = tokio::task::spawn_blocking(move || udp.stop_and_join()).await;
        }
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.server.shutdown_gracefully()).await {
            Ok(Ok(())) => info!(addr = %self.local_addr, "dns server stopped"),
            Ok(Err(error)) => warn!(%error, "dns server stopped with error"),
            Err(_) => warn!("dns server shutdown timed out, aborting tasks"),
        }
    }

    /// Counters since start.
    #[must_use]
    pub fn stats(&self) -> DnsStats {
        self.stats.snapshot()
    }
}

/// A DNS server on a thread of its own with a single-threaded runtime: each query is
/// received, answered and sent on one thread, without waking the node's other workers —
/// a large share of the per-query cost on a small machine.
pub struct DnsThread {
    local_addr: SocketAddr,
    stats: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsThread {
    /// Binds (errors are returned here, not lost on the thread) and starts serving.
    pub fn spawn(addr: SocketAddr, view: Arc<dyn DnsView>, limit: RateLimit, udp_workers: usize) -> Result<DnsThread, DnsError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("agora-dns".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(ready_tx.send(Err(DnsError::Io(e)))),
            };
            rt.block_on(async move {
                match DnsServer::start(addr, view, limit, udp_workers).await {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok((server.local_addr(), server.stats.clone())));
                        let _ = stop_rx.await;
                        server.shutdown().await;
                    }
                    Err(e) => drop(ready_tx.send(Err(e))),
                }
            });
        })?;
        let (local_addr, stats) = ready_rx.recv().map_err(|_| DnsError::Io(std::io::Error::other("dns thread ended before it started")))??;
        Ok(DnsThread { local_addr, stats, stop: Some(stop), thread: Some(thread) })
    }

    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    #[must_use]
    pub fn stats(&self) -> DnsStats {
        self.stats.snapshot()
    }

    /// Stops serving and waits for the thread to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Binds TCP, then the UDP workers' sockets on the same port; for port 0 retries
/// until the kernel's TCP pick is also free for UDP. TCP first: it takes no
/// `SO_REUSEPORT`, so a port another server holds fails here before any UDP
/// socket could join that server's sockets.
async fn bind_all(addr: SocketAddr, workers: usize) -> Result<(TcpListener, Vec<socket2::Socket>), DnsError> {
    if addr.port() != 0 {
        let tcp = bind_tcp(addr).await?;
        return Ok((tcp, UdpWorkers::bind(addr, workers)?));
    }
    let mut last_error = None;
    for _ in 0..EPHEMERAL_BIND_ATTEMPTS {
        let tcp = bind_tcp(addr).await?;
        match UdpWorkers::bind(tcp.local_addr()?, workers) {
            Ok(udp) => return Ok((tcp, udp)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| DnsError::Io(std::io::Error::other("no free port"))))
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, DnsError> {
    TcpListener::bind(addr).await.map_err(|source| DnsError::Bind { proto: "tcp", addr, source })
}
