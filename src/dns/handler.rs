//! hickory `RequestHandler`: protocol checks, EDNS/ECS handling, size fitting
//! and stats around the zone lookup in `answer`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_server::proto::rr::{DNSClass, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tracing::{debug, info, warn};

use super::answer::{self, Lookup, Outcome, Resolution, Turn};
use super::rrl::{Limiter, Verdict};
use super::stats::{bump, Counters};
use super::{DnsSnapshot, DnsView, RateLimit, MAX_UDP_PAYLOAD};

/// Classic DNS UDP limit when the client sent no EDNS.
const PLAIN_UDP_PAYLOAD: u16 = 512;

pub(crate) struct Handler {
    view: Arc<dyn DnsView>,
    stats: Arc<Counters>,
    /// Response-rate limiter for UDP.
    limiter: Limiter,
    /// Round-robin position shared by all `shop` / `dcN.shop` answers.
    rotation: AtomicU64,
    /// Whether the last `shop` answer failed open; lets us warn once per
    /// outage instead of once per query.
    failing_open: AtomicBool,
}

/// A response under construction.
struct Reply {
    metadata: Metadata,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additionals: Vec<Record>,
    edns: Option<Edns>,
}

/// What answering a query did besides the response itself, so that a cached
/// copy of the response can be replayed with the same effects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// For `shop` answers: whether the answer failed open.
    pub fail_open: Option<bool>,
    /// The rotation step taken, for rotating answers.
    pub turn: Option<Turn>,
}

/// A UDP response encoded exactly as hickory's UDP server sends it.
pub(crate) struct Encoded {
    pub bytes: Vec<u8>,
    pub rcode: ResponseCode,
    pub truncated: bool,
    pub effects: Effects,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        match self.admit(request.src().ip(), request.protocol()) {
            Verdict::Send => {}
            Verdict::Drop => return withheld_info(request),
            Verdict::Slip => return self.slip(request, response_handle).await,
        }
        let (mut reply, _) = self.build_reply(request, &self.view.snapshot(), &self.rotation);
        fit_to_size(request, &mut reply);
        self.send(request, reply, response_handle).await
    }
}

/// The handler shared between hickory's server (TCP) and the UDP workers.
pub(crate) struct SharedHandler(pub Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for SharedHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        self.0.handle_request::<R, T>(request, response_handle).await
    }
}

impl Handler {
    pub fn new(view: Arc<dyn DnsView>, stats: Arc<Counters>, limit: &RateLimit) -> Self {
        let limiter = Limiter::new(limit, stats.rrl_sources.clone());
        Self { view, stats, limiter, rotation: AtomicU64::new(0), failing_open: AtomicBool::new(false) }
    }

    pub fn view(&self) -> &dyn DnsView {
        &*self.view
    }

    pub fn rotation(&self) -> &AtomicU64 {
        &self.rotation
    }

    /// Counts a query that reached the handler and, for UDP, asks the rate limiter
    /// before any work is done: a forged flood costs one bucket lookup per packet.
    pub fn admit(&self, source: IpAddr, protocol: Protocol) -> Verdict {
        bump(&self.stats.queries);
        if protocol != Protocol::Udp {
            return Verdict::Send;
        }
        let verdict = self.limiter.check(source);
        match verdict {
            Verdict::Send => {}
            Verdict::Drop => bump(&self.stats.rrl_dropped),
            Verdict::Slip => bump(&self.stats.rrl_slipped),
        }
        verdict
    }

    /// The UDP response to an admitted request, answered from `snap` with the
    /// rotation taken from `rotation`; counted in the stats as sent.
    pub fn answer_udp(&self, request: &Request, snap: &DnsSnapshot, rotation: &AtomicU64) -> Encoded {
        let (mut reply, effects) = self.build_reply(request, snap, rotation);
        fit_to_size(request, &mut reply);
        let (info, bytes) = encode_udp(build_response(request, &reply, reply.answers.len()));
        self.record_sent(info.response_code, info.truncation);
        Encoded { bytes, rcode: info.response_code, truncated: info.truncation, effects }
    }

    /// The rate limiter's slip for a UDP request (see `slip`).
    pub fn slip_udp(&self, request: &Request) -> Vec<u8> {
        encode_udp(build_response(request, &Reply::slipped(request), 0)).1
    }

    /// Replays the effects of an answer sent again from a cached copy.
    pub fn replay(&self, rcode: ResponseCode, truncated: bool, fail_open: Option<bool>) {
        if let Some(fail_open) = fail_open {
            self.note_fail_open(fail_open);
        }
        self.record_sent(rcode, truncated);
    }

    fn record_sent(&self, rcode: ResponseCode, truncated: bool) {
        self.stats.record_rcode(rcode);
        if truncated {
            bump(&self.stats.truncated);
        }
    }

    fn build_reply(&self, request: &Request, snap: &DnsSnapshot, rotation: &AtomicU64) -> (Reply, Effects) {
        let mut reply = Reply::for_request(request);
        if let Some(rcode) = header_error(request) {
            reply.metadata.response_code = rcode;
            return (reply, Effects::default());
        }
        // Exactly one question is required; zero or several is a FORMERR.
        let Ok(info) = request.request_info() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return (reply, Effects::default());
        };
        let query = info.query;
        if query.query_class() != DNSClass::IN || is_transfer(query.query_type()) {
            reply.metadata.response_code = ResponseCode::Refused;
            return (reply, Effects::default());
        }
        let ecs = client_subnet(request);
        let lookup = Lookup { qname: query.original().name(), qtype: query.query_type(), client: client_address(request.src().ip(), ecs), rotation };
        let mut effects = Effects::default();
        match answer::resolve(snap, &lookup) {
            Outcome::NotAuthoritative => reply.metadata.response_code = ResponseCode::Refused,
            Outcome::Resolved(res) => effects = self.apply(&mut reply, res, ecs),
        }
        (reply, effects)
    }

    fn apply(&self, reply: &mut Reply, res: Resolution, ecs: Option<ClientSubnet>) -> Effects {
        let fail_open = res.client_dependent.then_some(res.fail_open);
        if let Some(fail_open) = fail_open {
            self.note_fail_open(fail_open);
        }
        if let (Some(edns), Some(ecs)) = (reply.edns.as_mut(), ecs) {
            let scope = ecs_scope(&ecs, &res);
            let echoed = ClientSubnet::new(ecs.addr(), ecs.source_prefix(), scope);
            edns.options_mut().insert(EdnsOption::Subnet(echoed));
        }
        reply.metadata.authoritative = true;
        reply.metadata.response_code = res.rcode;
        reply.answers = res.answers;
        reply.authority = res.authority;
        reply.additionals = res.additionals;
        Effects { fail_open, turn: res.turn }
    }

    fn note_fail_open(&self, fail_open: bool) {
        if fail_open {
            bump(&self.stats.fail_open);
            if !self.failing_open.swap(true, Ordering::Relaxed) {
                warn!("no healthy dc, shop answers fail open to all candidate dcs");
            }
        } else if self.failing_open.swap(false, Ordering::Relaxed) {
            info!("healthy dc available again, shop answers no longer fail open");
        }
    }

    /// The rate limiter's "slip": an empty truncated answer (header, question
    /// and OPT only, never larger than the query), so a real resolver retries
    /// over TCP, which cannot be forged.
    async fn slip<R: ResponseHandler>(&self, request: &Request, mut handle: R) -> ResponseInfo {
        match handle.send_response(build_response(request, &Reply::slipped(request), 0)).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, "failed to send dns response");
                withheld_info(request)
            }
        }
    }

    async fn send<R: ResponseHandler>(&self, request: &Request, reply: Reply, mut handle: R) -> ResponseInfo {
        let response = build_response(request, &reply, reply.answers.len());
        match handle.send_response(response).await {
            Ok(info) => {
                self.record_sent(info.response_code, info.truncation);
                info
            }
            Err(error) => {
                debug!(%error, "failed to send dns response");
                self.stats.record_rcode(ResponseCode::ServFail);
                servfail_info(request)
            }
        }
    }
}

impl Reply {
    /// Empty response echoing the request id, flags and EDNS (RFC 6891: only
    /// when the client used EDNS itself).
    fn for_request(request: &Request) -> Self {
        let edns = request.edns.as_ref().map(response_edns);
        Self { metadata: Metadata::response_from_request(&request.metadata), answers: Vec::new(), authority: Vec::new(), additionals: Vec::new(), edns }
    }

    /// The empty truncated reply of a rate-limiter slip.
    fn slipped(request: &Request) -> Self {
        let mut reply = Self::for_request(request);
        reply.metadata.truncation = true;
        reply
    }
}

/// Our OPT record: advertises (and, for hickory's UDP encoder, enforces) the
/// size we will actually send, capped to avoid fragmentation.
fn response_edns(client: &Edns) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(client.max_payload().min(MAX_UDP_PAYLOAD));
    edns
}

/// Header-level problems that need no question to answer.
fn header_error(request: &Request) -> Option<ResponseCode> {
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Some(ResponseCode::BADVERS);
    }
    (request.metadata.op_code != OpCode::Query).then_some(ResponseCode::NotImp)
}

/// Zone transfers are not offered: the zone is synthesised per query.
fn is_transfer(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::AXFR | RecordType::IXFR)
}

fn client_subnet(request: &Request) -> Option<ClientSubnet> {
    match request.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(subnet) => Some(*subnet),
        _ => None,
    }
}

/// ECS address when the resolver passed one; a /0 ECS means "do not tailor".
fn client_address(src: IpAddr, ecs: Option<ClientSubnet>) -> Option<IpAddr> {
    match ecs {
        Some(ecs) if ecs.source_prefix() == 0 => None,
        Some(ecs) => Some(ecs.addr().to_canonical()),
        None => Some(src.to_canonical()),
    }
}

/// RFC 7871 scope: 0 if the answer is the same for everyone, else the DC
/// subnet that decided it, else the whole source prefix (no wider reuse).
fn ecs_scope(ecs: &ClientSubnet, res: &Resolution) -> u8 {
    if !res.client_dependent || ecs.source_prefix() == 0 {
        return 0;
    }
    res.client_scope.unwrap_or(ecs.source_prefix())
}

/// Makes the reply fit the transport: drop optional glue first, then set TC
/// and keep only whole answer records that fit. Done here rather than by
/// hickory's encoder so the OPT record is never the part that gets dropped.
fn fit_to_size(request: &Request, reply: &mut Reply) {
    let limit = size_limit(request, reply);
    if encoded_len(request, reply, reply.answers.len()) <= limit {
        return;
    }
    reply.additionals.clear();
    if encoded_len(request, reply, reply.answers.len()) <= limit {
        return;
    }
    reply.authority.clear();
    reply.metadata.truncation = true;
    let fits = largest_fitting(reply.answers.len(), |n| encoded_len(request, reply, n) <= limit);
    reply.answers.truncate(fits);
}

fn size_limit(request: &Request, reply: &Reply) -> usize {
    match request.protocol() {
        Protocol::Udp => reply.edns.as_ref().map_or(PLAIN_UDP_PAYLOAD, Edns::max_payload).into(),
        _ => u16::MAX.into(),
    }
}

/// Binary search for the largest `n` in `0..=max` with `fits(n)`; assumes
/// `fits` is monotone and treats `fits(0)` as true.
fn largest_fitting(max: usize, fits: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, max);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// The response hickory will encode, with only the first `answers` answers.
fn build_response<'q>(
    request: &'q Request,
    reply: &'q Reply,
    answers: usize,
) -> MessageResponse<
    'q,
    'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
    impl Iterator<Item = &'q Record> + Send + 'q,
> {
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &reply.edns {
        builder.edns(edns);
    }
    builder.build(reply.metadata, reply.answers.iter().take(answers), reply.authority.iter(), std::iter::empty(), reply.additionals.iter())
}

/// Wire size of the reply with only its first `answers` answer records,
/// encoded exactly as hickory will (its name compression differs from a
/// plain `Message` encode, so a separate estimate would be off).
fn encoded_len(request: &Request, reply: &Reply, answers: usize) -> usize {
    let mut buf = Vec::with_capacity(512);
    let result = {
        let mut encoder = BinEncoder::new(&mut buf);
        build_response(request, reply, answers).destructive_emit(&mut encoder)
    };
    match result {
        Ok(_) => buf.len(),
        Err(_) => usize::MAX,
    }
}

/// Encodes a response as hickory's UDP server does: within the size the client
/// offered (512 bytes without EDNS), or, if that fails, an empty SERVFAIL.
pub(crate) fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> (ResponseInfo, Vec<u8>) {
    let id = response.metadata().id;
    let max_size = response.edns().map_or(PLAIN_UDP_PAYLOAD, Edns::max_payload);
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max_size);
    match response.destructive_emit(&mut encoder) {
        Ok(info) => (info, bytes),
        Err(error) => {
            warn!(%error, "error encoding dns response");
            bytes.clear();
            let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::ServFail;
            let header = Header { metadata, counts: HeaderCounts::default() };
            // Twelve bytes into an empty vector: cannot fail.
            let _ = header.emit(&mut BinEncoder::new(&mut bytes));
            (ResponseInfo::from(header), bytes)
        }
    }
}

/// What the handler reports for a response it did not send.
fn withheld_info(request: &Request) -> ResponseInfo {
    let metadata = Metadata::response_from_request(&request.metadata);
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

fn servfail_info(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use hickory_server::net::runtime::TokioTime;
    use hickory_server::net::NetError;
    use hickory_server::proto::op::{Message, MessageType, Query};
    use hickory_server::proto::rr::{Name, RData};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;
    use crate::dns::{DcView, DnsSnapshot, NodeView};

    #[test]
    fn largest_fitting_finds_boundary() {
        assert_eq!(largest_fitting(10, |n| n <= 7), 7);
        assert_eq!(largest_fitting(10, |n| n == 0), 0);
        assert_eq!(largest_fitting(10, |_| true), 10);
        assert_eq!(largest_fitting(0, |_| true), 0);
    }

    // ---------- fuzzing the handler with generated queries ----------

    struct FixedView(DnsSnapshot);

    impl DnsView for FixedView {
        fn snapshot(&self) -> DnsSnapshot {
            self.0.clone()
        }
    }

    fn topology() -> DnsSnapshot {
        let mut dcs = Vec::new();
        for d in 1..=2u8 {
            let mut dc = DcView::new(format!("dc{d}"));
            dc.nodes = (1..=3u8).map(|k| NodeView::new(format!("n{k}"), IpAddr::from([10, d, 0, k]), 8080)).collect();
            dc.leader = Some(IpAddr::from([10, d, 0, 1]));
            dc.subnets = vec![(IpAddr::from([192, 0, 2 + d, 0]), 24)];
            dcs.push(dc);
        }
        dcs[1].nodes.push(NodeView::new("v6", "2001:db8::1".parse().unwrap(), 8080));
        DnsSnapshot { dcs, ..DnsSnapshot::default() }
    }

    /// Keeps every response the handler sends, encoded as hickory would.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);

    #[async_trait::async_trait]
    impl ResponseHandler for Capture {
        async fn send_response<'a>(
            &mut self,
            response: MessageResponse<
                '_,
                'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
            >,
        ) -> Result<ResponseInfo, NetError> {
            let mut buf = Vec::new();
            let info = response.destructive_emit(&mut BinEncoder::new(&mut buf))?;
            self.0.lock().unwrap().push(buf);
            Ok(info)
        }
    }

    fn label() -> impl Strategy<Value = Vec<u8>> {
        let known =
            ["shop", "SHOP", "dc1", "dc2", "dc9", "leader", "ns1", "ns7", "ns0", "_http", "_tcp", "dc1-n1", "dc2-n4", "agora", "test", "*", "hostmaster"];
        prop_oneof![4 => prop::sample::select(known.to_vec()).prop_map(|l| l.as_bytes().to_vec()), 1 => prop::collection::vec(any::<u8>(), 1..64)]
    }

    fn qname() -> impl Strategy<Value = Name> {
        (prop::collection::vec(label(), 0..4), prop::bool::weighted(0.8)).prop_filter_map("name over 255 bytes", |(mut labels, in_zone)| {
            if in_zone {
                labels.extend([b"agora".to_vec(), b"test".to_vec()]);
            }
            Name::from_labels(labels).ok()
        })
    }

    fn ecs() -> impl Strategy<Value = ClientSubnet> {
        (any::<bool>(), any::<[u8; 16]>(), any::<u8>(), any::<u8>()).prop_map(|(v4, bytes, source, scope)| {
            let (addr, bits) = if v4 { (IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]), 33) } else { (IpAddr::from(bytes), 129) };
            ClientSubnet::new(addr, source % bits, scope % bits)
        })
    }

    fn edns() -> impl Strategy<Value = Option<Edns>> {
        prop::option::of((any::<u16>(), prop_oneof![7 => Just(0u8), 1 => any::<u8>()], any::<bool>(), prop::option::of(ecs()))).prop_map(|edns| {
            edns.map(|(payload, version, dnssec_ok, ecs)| {
                let mut edns = Edns::new();
                edns.set_max_payload(payload).set_version(version).set_dnssec_ok(dnssec_ok);
                if let Some(ecs) = ecs {
                    edns.options_mut().insert(EdnsOption::Subnet(ecs));
                }
                edns
            })
        })
    }

    /// A well-formed message: 0-2 questions of any type and class, any opcode, maybe EDNS;
    /// mostly the shape a resolver sends, so most reach the zone lookup.
    fn message() -> impl Strategy<Value = Vec<u8>> {
        let class = prop_oneof![6 => Just(1u16), 1 => Just(255), 1 => any::<u16>()];
        let types =
            prop_oneof![Just(RecordType::ANY), Just(RecordType::A), Just(RecordType::AAAA), Just(RecordType::SRV), any::<u16>().prop_map(RecordType::from)];
        let op = prop_oneof![7 => Just(0u8), 1 => 0u8..16];
        let questions = (prop::collection::vec((qname(), types, class), 1..3), 0u8..10);
        (questions, any::<u16>(), op, edns()).prop_filter_map("unencodable", |((mut questions, shape), id, op, edns)| {
            match shape {
                0 => questions.clear(),
                1 => {}
                _ => questions.truncate(1),
            }
            let mut msg = Message::query();
            msg.metadata.id = id;
            msg.metadata.op_code = OpCode::from_u8(op);
            for (name, qtype, class) in questions {
                let mut query = Query::query(name, qtype);
                query.set_query_class(DNSClass::from(class));
                msg.add_query(query);
            }
            msg.edns = edns;
            msg.to_vec().ok()
        })
    }

    /// Raw noise, well-formed messages, and well-formed messages with bytes overwritten.
    fn packet() -> impl Strategy<Value = Vec<u8>> {
        let mutated = (message(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)).prop_map(|(mut bytes, edits)| {
            for (at, byte) in edits {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            bytes
        });
        prop_oneof![prop::collection::vec(any::<u8>(), 0..600), message(), mutated]
    }

    fn source() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![any::<[u8; 4]>().prop_map(IpAddr::from), any::<[u8; 16]>().prop_map(IpAddr::from)].prop_map(|ip| SocketAddr::new(ip, 5353))
    }

    /// Feeds one packet to the handler as hickory would; returns what it sent.
    fn feed(rt: &tokio::runtime::Runtime, handler: &Handler, bytes: Vec<u8>, src: SocketAddr, protocol: Protocol) -> Option<(Request, Vec<Vec<u8>>)> {
        // hickory answers undecodable packets and drops responses before the handler.
        let request = Request::from_bytes(bytes, src, protocol).ok()?;
        if request.metadata.message_type == MessageType::Response {
            return None;
        }
        let capture = Capture::default();
        rt.block_on(handler.handle_request::<_, TokioTime>(&request, capture.clone()));
        let sent = std::mem::take(&mut *capture.0.lock().unwrap());
        Some((request, sent))
    }

    #[test]
    fn fuzzed_queries_never_panic_and_answers_stay_well_formed() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stats = Arc::new(Counters::default());
        let handler = Handler::new(Arc::new(FixedView(topology())), stats.clone(), &RateLimit::default());
        let mut runner = TestRunner::new(Config { cases: 5000, failure_persistence: None, ..Config::default() });
        let udp = prop_oneof![3 => Just(Protocol::Udp), 1 => Just(Protocol::Tcp)];
        runner
            .run(&(packet(), source(), udp), |(bytes, src, protocol)| {
                let Some((request, sent)) = feed(&rt, &handler, bytes, src, protocol) else {
                    return Ok(());
                };
                prop_assert!(sent.len() <= 1, "one response per query at most");
                for bytes in sent {
                    let response = Message::from_vec(&bytes).map_err(|e| TestCaseError::fail(format!("undecodable response: {e}")))?;
                    prop_assert_eq!(response.metadata.id, request.metadata.id);
                    prop_assert_eq!(response.metadata.message_type, MessageType::Response);
                    if protocol == Protocol::Udp {
                        let limit = request.edns.as_ref().map_or(PLAIN_UDP_PAYLOAD, |e| e.max_payload().clamp(PLAIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD));
                        prop_assert!(bytes.len() <= usize::from(limit), "{} bytes over UDP, limit {}", bytes.len(), limit);
                    }
                    let asked_any = request.queries.queries().first().is_some_and(|q| q.query_type() == RecordType::ANY);
                    if asked_any {
                        prop_assert!(response.answers.len() <= 1, "ANY answered with {} records", response.answers.len());
                    }
                }
                Ok(())
            })
            .unwrap();
        let snapshot = stats.snapshot();
        let in_zone = snapshot.answered + snapshot.nxdomain;
        assert!(snapshot.queries > 2000 && in_zone > 500, "the generator reached the zone lookup: {snapshot:?}");

        // Still answering normally afterwards.
        let mut msg = Message::query();
        msg.add_query(Query::query(Name::from_ascii("shop.agora.test.").unwrap(), RecordType::A));
        let src = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 5353);
        let (_, sent) = feed(&rt, &handler, msg.to_vec().unwrap(), src, Protocol::Udp).unwrap();
        let response = Message::from_vec(&sent[0]).unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        let addresses = response.answers.iter().filter(|r| matches!(r.data, RData::A(_))).count();
        assert_eq!(addresses, 2);
    }

    // ---------- the UDP workers' responder against the handler ----------

    /// Sources inside the topology's DC subnets half of the time, so nearest-first
    /// by source address (and the cache's client key) is exercised.
    fn near_source() -> impl Strategy<Value = SocketAddr> {
        let near = (3u8..5, any::<u8>()).prop_map(|(net, host)| SocketAddr::new(IpAddr::from([192, 0, net, host]), 5353));
        prop_oneof![near, source()]
    }

    /// What hickory's UDP server and the handler send for one datagram.
    fn reference(rt: &tokio::runtime::Runtime, handler: &Handler, bytes: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        if bytes.len() < 12 {
            return None;
        }
        let (_, mut sent) = feed(rt, handler, bytes.to_vec(), src, Protocol::Udp)?;
        sent.pop()
    }

    #[test]
    fn udp_responder_sends_what_the_handler_sends_byte_for_byte() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let view: Arc<dyn DnsView> = Arc::new(FixedView(topology()));
        let limit = RateLimit { responses_per_s: 1_000_000, ..RateLimit::default() };
        let handler = Handler::new(view.clone(), Arc::new(Counters::default()), &limit);
        let fast_stats = Arc::new(Counters::default());
        let responder = std::cell::RefCell::new(crate::dns::udp::Responder::new(Arc::new(Handler::new(view, fast_stats.clone(), &limit))));
        let mut runner = TestRunner::new(Config { cases: 3000, failure_persistence: None, ..Config::default() });
        // Each packet is sent a few times with other IDs, so cached answers, their ID
        // patch and the rotation through cached phases are compared too.
        runner
            .run(&(packet(), near_source(), prop::collection::vec(any::<u16>(), 1..5)), |(bytes, src, ids)| {
                for id in ids {
                    let mut bytes = bytes.clone();
                    if let Some(head) = bytes.get_mut(..2) {
                        head.copy_from_slice(&id.to_be_bytes());
                    }
                    let fast = responder.borrow_mut().respond(&bytes, src);
                    match Request::from_bytes(bytes.clone(), src, Protocol::Udp) {
                        Ok(_) => prop_assert_eq!(fast, reference(&rt, &handler, &bytes, src)),
                        // Undecodable: hickory answers FORMERR (with a header to echo) before the handler.
                        Err(_) if bytes.len() < 12 => prop_assert_eq!(fast, None),
                        Err(_) => {
                            let response = Message::from_vec(&fast.expect("FORMERR sent")).expect("decodable FORMERR");
                            prop_assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
                            prop_assert_eq!(response.metadata.id, id);
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
        let stats = fast_stats.snapshot();
        assert!(stats.answered > 200 && stats.nxdomain > 300, "the generator reached the zone lookup: {stats:?}");
    }
}
