//! DNS over UDP: worker threads, each with its own socket on the server's address
//! (`SO_REUSEPORT`: the kernel spreads clients over them) and its own answer cache.
//!
//! A worker answers a datagram exactly as hickory's UDP server and our handler
//! would: a cached question (see `cache`) is admitted by the same rate limiter
//! and replayed with its ID patched; anything else is decoded by hickory, handed
//! to the handler, and its answer cached when the question has the plain shape
//! (one question, EDNS with at most a Client Subnet option, no other records)
//! and the answer is NOERROR or NXDOMAIN. TCP stays with hickory's server.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Header, MessageType, ResponseCode};
use hickory_server::proto::rr::rdata::opt::EdnsOption;
use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use socket2::{Domain, Socket, Type};
use tracing::{debug, warn};

use super::cache::{AnswerCache, MAX_CACHE_BYTES};
use super::handler::{encode_udp, Encoded, Handler};
use super::mmsg::{self, Received};
use super::rrl::Verdict;
use super::DnsError;

/// A DNS header's length; anything shorter is dropped unanswered.
const HEADER_LEN: usize = 12;
/// Datagram bytes read, as hickory's UDP server reads them.
const RECEIVE_BUFFER: usize = 4096;
/// Receive buffer asked of the kernel per socket: bursts of queries wait there
/// instead of being dropped while a worker is busy.
const SOCKET_RECV_BUFFER_BYTES: usize = 4 << 20;
/// How often a worker blocked in `recv` checks whether to stop, should the wake-up
/// at shutdown be missed.
const STOP_POLL: Duration = Duration::from_millis(250);
/// Pause after an unexpected receive error.
const ERROR_BACKOFF: Duration = Duration::from_millis(1);
/// Workers at most, whatever the core count or the config says.
pub const MAX_WORKERS: usize = 16;
/// Workers chosen for a machine at most.
const AUTO_WORKERS_MAX: usize = 4;

/// Answers UDP datagrams for one worker.
pub(crate) struct Responder {
    handler: Arc<Handler>,
    cache: AnswerCache,
}

impl Responder {
    pub fn new(handler: Arc<Handler>) -> Self {
        Self { handler, cache: AnswerCache::new(MAX_CACHE_BYTES) }
    }

    /// The response to send back for one datagram, if any.
    pub fn respond(&mut self, packet: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        if packet.len() < HEADER_LEN || !answerable(src) {
            return None;
        }
        let snap = self.handler.view().shared();
        self.cache.refresh(&snap);
        let keyed = self.cache.set_key(packet, src.ip());
        if keyed && self.cache.entry().is_some() {
            return self.respond_cached(packet, src, &snap);
        }
        let request = match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
            Ok(request) => request,
            Err(error) => return formerr(packet, &error),
        };
        if request.metadata.message_type == MessageType::Response {
            return None;
        }
        match self.handler.admit(src.ip(), Protocol::Udp) {
            Verdict::Send => {}
            Verdict::Drop => return None,
            Verdict::Slip => return Some(self.handler.slip_udp(&request)),
        }
        let encoded = self.handler.answer_udp(&request, &snap, self.handler.rotation());
        if keyed && cacheable(packet, &request, &encoded) {
            self.cache.store(&encoded);
        }
        Some(encoded.bytes)
    }

    /// A question in the cache: the same admission and rotation step as uncached,
    /// then the cached response for the rotation phase, or a fresh one for it.
    fn respond_cached(&mut self, packet: &[u8], src: SocketAddr, snap: &super::DnsSnapshot) -> Option<Vec<u8>> {
        let verdict = self.handler.admit(src.ip(), Protocol::Udp);
        if verdict != Verdict::Send {
            // Rare: decode only to build the slip, exactly as uncached.
            let request = Request::from_bytes(packet.to_vec(), src, Protocol::Udp).ok()?;
            return (verdict == Verdict::Slip).then(|| self.handler.slip_udp(&request));
        }
        let entry = self.cache.entry()?;
        let slot = entry.period.map_or(0, |_| self.handler.rotation().fetch_add(1, Ordering::Relaxed));
        if let Some(bytes) = entry.response(slot) {
            self.handler.replay(entry.rcode, entry.truncated, entry.fail_open);
            let mut response = bytes.to_vec();
            response[..2].copy_from_slice(&packet[..2]);
            return Some(response);
        }
        // This phase of the rotation is not cached yet: answer at the slot just taken.
        let request = Request::from_bytes(packet.to_vec(), src, Protocol::Udp).ok()?;
        let encoded = self.handler.answer_udp(&request, snap, &AtomicU64::new(slot));
        if cacheable(packet, &request, &encoded) {
            self.cache.store(&encoded);
        }
        Some(encoded.bytes)
    }
}

/// hickory's rule: never answer port 0 or an unspecified or broadcast address.
fn answerable(src: SocketAddr) -> bool {
    let ip_ok = match src.ip() {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
        IpAddr::V6(v6) => !v6.is_unspecified(),
    };
    src.port() != 0 && ip_ok
}

/// hickory's answer to a datagram with a header but no decodable message.
fn formerr(packet: &[u8], error: &dyn std::fmt::Display) -> Option<Vec<u8>> {
    debug!(%error, "undecodable dns query");
    let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
    let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
    let response = MessageResponseBuilder::new(&queries, None).error_msg(&header.metadata, ResponseCode::FormErr);
    Some(encode_udp(response).1)
}

/// Whether this question's answer may be replayed: a plain query (one question,
/// no records but an OPT holding at most a Client Subnet) answered NOERROR or
/// NXDOMAIN. Anything unusual is answered afresh every time.
fn cacheable(packet: &[u8], request: &Request, encoded: &Encoded) -> bool {
    let count = |at: usize| packet.get(at..at + 2).map_or(u16::MAX, |b| u16::from_be_bytes([b[0], b[1]]));
    let extra = u16::from(request.edns.is_some());
    let plain_counts = count(4) == 1 && count(6) == 0 && count(8) == 0 && count(10) == extra;
    let plain_edns = request.edns.as_ref().is_none_or(|edns| edns.options().as_ref().iter().all(|(_, o)| matches!(o, EdnsOption::Subnet(_))));
    let rcode_ok = matches!(encoded.rcode, ResponseCode::NoError | ResponseCode::NXDomain);
    plain_counts && plain_edns && rcode_ok && request.metadata.message_type == MessageType::Query
}

/// The UDP worker threads of one server.
pub(crate) struct UdpWorkers {
    stop: Arc<AtomicBool>,
    /// Clones of the workers' sockets, to wake them at shutdown.
    sockets: Vec<Socket>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpWorkers {
    /// `configured` workers, or for 0 this machine's: one per core but one, which the
    /// rest of the node (Raft, HTTP, replication) keeps, at least one and at most
    /// four. On two cores one worker answered 120-128 k queries/s where two answered
    /// 85-112 k (README, Performance): the second only fought the first, the node and
    /// the load for the cores.
    pub fn count(configured: usize) -> usize {
        if configured > 0 {
            return configured.min(MAX_WORKERS);
        }
        std::thread::available_parallelism().map_or(1, usize::from).saturating_sub(1).clamp(1, AUTO_WORKERS_MAX)
    }

    /// Binds `count` sockets on `addr` (the port must be given); all or nothing.
    pub fn bind(addr: SocketAddr, count: usize) -> Result<Vec<Socket>, DnsError> {
        (0..count.max(1)).map(|_| bind_socket(addr).map_err(|source| DnsError::Bind { proto: "udp", addr, source })).collect()
    }

    /// Starts one worker per socket.
    pub fn start(sockets: Vec<Socket>, handler: &Arc<Handler>) -> Result<UdpWorkers, DnsError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = UdpWorkers { stop: stop.clone(), sockets: Vec::new(), threads: Vec::new() };
        for (index, socket) in sockets.into_iter().enumerate() {
            workers.sockets.push(socket.try_clone()?);
            let socket: std::net::UdpSocket = socket.into();
            let (stop, responder) = (stop.clone(), Responder::new(handler.clone()));
            let thread = std::thread::Builder::new().name(format!("agora-dns-udp{index}")).spawn(move || serve(&socket, responder, &stop))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Tells the workers to stop and wakes them; they end on their own.
    fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for socket in &self.sockets {
            // On Linux this wakes a blocked `recv`; the poll interval covers the rest.
            let _ = socket.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Stops the workers and waits until they have closed their sockets.
    pub fn stop_and_join(mut self) {
        self.signal_stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.sockets.clear();
    }
}

impl Drop for UdpWorkers {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

fn bind_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if let Err(error) = socket.set_recv_buffer_size(SOCKET_RECV_BUFFER_BYTES) {
        // Best effort: the kernel caps it at net.core.rmem_max; a failure only costs bursts.
        warn!(%error, "could not enlarge the dns receive buffer");
    }
    socket.set_read_timeout(Some(STOP_POLL))?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn serve(socket: &std::net::UdpSocket, mut responder: Responder, stop: &AtomicBool) {
    let mut received = Received::new(RECEIVE_BUFFER);
    let mut answers = Vec::with_capacity(mmsg::BATCH);
    let mut sender = mmsg::Sender::default();
    while !stop.load(Ordering::Relaxed) {
        let count = match received.recv(socket) {
            Ok(count) => count,
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
            Err(error) => {
                debug!(%error, "dns udp receive failed");
                // Never spin on an error that persists.
                std::thread::sleep(ERROR_BACKOFF);
                continue;
            }
        };
        for i in 0..count {
            let Some((packet, src)) = received.get(i) else { continue };
            if let Some(response) = responder.respond(packet, src) {
                answers.push((response, src));
            }
        }
        if let Err(error) = sender.send_all(socket, &answers) {
            debug!(%error, "failed to send a dns response");
        }
        answers.clear();
    }
}
