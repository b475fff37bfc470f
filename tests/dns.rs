//! Integration tests for the embedded DNS server over real UDP/TCP sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora::dns::{DcView, DnsServer, DnsSnapshot, DnsView, NodeView, RateLimit};
use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(3);

// ---------- test view and topology builders ----------

struct TestView(Mutex<DnsSnapshot>);

impl DnsView for TestView {
    fn snapshot(&self) -> DnsSnapshot {
        self.0.lock().unwrap().clone()
    }
}

impl TestView {
    fn update(&self, change: impl FnOnce(&mut DnsSnapshot)) {
        change(&mut self.0.lock().unwrap());
    }

    fn dc(&self, name: &str, change: impl FnOnce(&mut DcView)) {
        self.update(|s| change(s.dcs.iter_mut().find(|d| d.name == name).unwrap()));
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// DC `dc<n>` with `nodes` healthy nodes 10.<n>.0.<k>, leader = first node.
fn dc(n: u8, nodes: u8) -> DcView {
    let mut dc = DcView::new(format!("dc{n}"));
    dc.nodes = (1..=nodes).map(|k| NodeView::new(format!("n{k}"), IpAddr::from([10, n, 0, k]), 8000 + u16::from(k))).collect();
    dc.leader = dc.nodes.first().map(|node| node.ip);
    dc
}

/// The address `shop` answers with for DC n (its leader).
fn leader_of(n: u8) -> IpAddr {
    IpAddr::from([10, n, 0, 1])
}

fn three_dcs() -> DnsSnapshot {
    DnsSnapshot { dcs: vec![dc(1, 2), dc(2, 2), dc(3, 2)], ..DnsSnapshot::default() }
}

async fn start(snapshot: DnsSnapshot) -> (DnsServer, Arc<TestView>) {
    start_limited(snapshot, RateLimit::default()).await
}

async fn start_limited(snapshot: DnsSnapshot, limit: RateLimit) -> (DnsServer, Arc<TestView>) {
    let view = Arc::new(TestView(Mutex::new(snapshot)));
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = DnsServer::start(addr, view.clone(), limit, 0).await.unwrap();
    (server, view)
}

// ---------- message helpers ----------

fn query(name: &str, qtype: RecordType) -> Message {
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg
}

fn with_edns(mut msg: Message, payload: u16, ecs: Option<ClientSubnet>) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    if let Some(ecs) = ecs {
        edns.options_mut().insert(EdnsOption::Subnet(ecs));
    }
    msg.edns = Some(edns);
    msg
}

async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (len, _) = timeout(WAIT, socket.recv_from(&mut buf)).await.expect("udp response timed out").unwrap();
    buf.truncate(len);
    buf
}

async fn udp(server: SocketAddr, msg: &Message) -> Message {
    let bytes = udp_raw(server, &msg.to_vec().unwrap()).await;
    let response = Message::from_vec(&bytes).unwrap();
    assert_eq!(response.metadata.id, msg.metadata.id);
    assert_eq!(response.metadata.message_type, MessageType::Response);
    response
}

/// Like a stub resolver: UDP may drop our query while the server's socket
/// buffer is still full of flood packets, so retry a few times.
async fn udp_with_retries(server: SocketAddr, msg: &Message) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let bytes = msg.to_vec().unwrap();
    let mut buf = vec![0u8; 65535];
    for _ in 0..10 {
        socket.send_to(&bytes, server).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            let (len, _) = received.unwrap();
            match Message::from_vec(&buf[..len]) {
                Ok(response) if response.metadata.id == msg.metadata.id => {
                    return response;
                }
                _ => continue,
            }
        }
    }
    panic!("no udp answer after retries");
}

async fn tcp(server: SocketAddr, msg: &Message) -> Message {
    let bytes = msg.to_vec().unwrap();
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.unwrap();
        stream.write_u16(bytes.len() as u16).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut body = vec![0u8; usize::from(len)];
        stream.read_exact(&mut body).await.unwrap();
        body
    };
    let body = timeout(WAIT, exchange).await.expect("tcp response timed out");
    Message::from_vec(&body).unwrap()
}

async fn shop(server: SocketAddr) -> Vec<IpAddr> {
    addresses(&udp(server, &query("shop.agora.test.", RecordType::A)).await)
}

fn addresses(msg: &Message) -> Vec<IpAddr> {
    record_addresses(&msg.answers)
}

fn record_addresses(records: &[Record]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn soa_serial(records: &[Record]) -> Option<u32> {
    records.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(soa.serial),
        _ => None,
    })
}

fn assert_nodata(msg: &Message) {
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert!(msg.metadata.authoritative);
    assert!(msg.answers.is_empty());
    assert!(soa_serial(&msg.authorities).is_some(), "SOA expected in authority");
}

// ---------- rotation, health, drain, weights ----------

#[tokio::test]
async fn rotation_leads_with_each_dc_in_turn() {
    let (server, _view) = start(three_dcs()).await;
    let mut leads = Vec::new();
    for _ in 0..6 {
        let answer = shop(server.local_addr()).await;
        assert_eq!(answer.len(), 3);
        leads.push(answer[0]);
    }
    let (d1, d2, d3) = (leader_of(1), leader_of(2), leader_of(3));
    assert_eq!(leads, vec![d1, d2, d3, d1, d2, d3]);
    // The rest follow in snapshot order after the leader, wrapping around.
    assert_eq!(shop(server.local_addr()).await, vec![d1, d2, d3]);
    assert_eq!(shop(server.local_addr()).await, vec![d2, d3, d1]);
    server.shutdown().await;
}

#[tokio::test]
async fn unhealthy_dc_drops_out_and_returns() {
    let (server, view) = start(three_dcs()).await;
    view.dc("dc2", |d| d.healthy = false);
    for _ in 0..4 {
        let answer = shop(server.local_addr()).await;
        assert_eq!(answer.len(), 2);
        assert!(!answer.contains(&leader_of(2)));
    }
    view.dc("dc2", |d| d.healthy = true);
    assert!(shop(server.local_addr()).await.contains(&leader_of(2)));
    assert_eq!(server.stats().fail_open, 0);
}

#[tokio::test]
async fn drained_and_zero_weight_dcs_are_excluded() {
    let (server, view) = start(three_dcs()).await;
    view.dc("dc1", |d| d.drained = true);
    view.dc("dc3", |d| d.weight = 0);
    for _ in 0..3 {
        assert_eq!(shop(server.local_addr()).await, vec![leader_of(2)]);
    }
}

#[tokio::test]
async fn weights_set_share_of_leading_position() {
    let (server, view) = start(three_dcs()).await;
    view.dc("dc1", |d| d.weight = 2);
    view.dc("dc3", |d| d.weight = 0);
    let mut leads = Vec::new();
    for _ in 0..6 {
        let answer = shop(server.local_addr()).await;
        assert_eq!(answer.len(), 2, "each serving DC appears once per answer");
        leads.push(answer[0]);
    }
    // Smooth weighted round-robin over weights [2, 1]: dc1 dc2 dc1, repeated.
    let (d1, d2) = (leader_of(1), leader_of(2));
    assert_eq!(leads, vec![d1, d2, d1, d1, d2, d1]);
}

#[tokio::test]
async fn leader_unknown_uses_first_healthy_node() {
    let (server, view) = start(three_dcs()).await;
    view.update(|s| s.dcs.truncate(1));
    view.dc("dc1", |d| {
        d.leader = None;
        d.nodes[0].healthy = false;
    });
    assert_eq!(shop(server.local_addr()).await, vec![ip("10.1.0.2")]);
}

#[tokio::test]
async fn fails_open_when_no_dc_is_healthy() {
    let (server, view) = start(three_dcs()).await;
    view.update(|s| s.dcs.iter_mut().for_each(|d| d.healthy = false));
    let mut answer = shop(server.local_addr()).await;
    answer.sort();
    assert_eq!(answer, vec![leader_of(1), leader_of(2), leader_of(3)]);
    assert_eq!(server.stats().fail_open, 1);

    // Drained DCs stay out while an undrained one is left...
    view.dc("dc3", |d| d.drained = true);
    let mut answer = shop(server.local_addr()).await;
    answer.sort();
    assert_eq!(answer, vec![leader_of(1), leader_of(2)]);

    // ...and come back when every DC is drained.
    view.update(|s| s.dcs.iter_mut().for_each(|d| d.drained = true));
    assert_eq!(shop(server.local_addr()).await.len(), 3);
    assert_eq!(server.stats().fail_open, 3);

    // Recovery stops failing open.
    view.update(|s| s.dcs.iter_mut().for_each(|d| d.drained = false));
    view.dc("dc1", |d| d.healthy = true);
    assert_eq!(shop(server.local_addr()).await, vec![leader_of(1)]);
    assert_eq!(server.stats().fail_open, 3);
}

// ---------- nearest first ----------

#[tokio::test]
async fn nearest_first_by_source_address() {
    let (server, view) = start(three_dcs()).await;
    view.dc("dc2", |d| d.subnets = vec![(ip("127.0.0.0"), 8)]);
    let mut seconds = Vec::new();
    for _ in 0..4 {
        let answer = shop(server.local_addr()).await;
        assert_eq!(answer.len(), 3);
        assert_eq!(answer[0], leader_of(2), "dc2 holds the client subnet");
        seconds.push(answer[1]);
    }
    // The rest still rotate behind the nearest DC.
    assert!(seconds.contains(&leader_of(1)) && seconds.contains(&leader_of(3)));

    // An unhealthy nearest DC is simply not in the answer.
    view.dc("dc2", |d| d.healthy = false);
    assert!(!shop(server.local_addr()).await.contains(&leader_of(2)));
}

#[tokio::test]
async fn nearest_first_by_client_subnet_option() {
    let (server, view) = start(three_dcs()).await;
    view.dc("dc3", |d| d.subnets = vec![(ip("192.0.2.0"), 24)]);
    view.dc("dc1", |d| d.subnets = vec![(ip("198.51.100.0"), 22)]);
    let ecs = ClientSubnet::new(ip("192.0.2.0"), 24, 0);
    for _ in 0..3 {
        let msg = with_edns(query("shop.agora.test.", RecordType::A), 1232, Some(ecs));
        let response = udp(server.local_addr(), &msg).await;
        assert_eq!(addresses(&response)[0], leader_of(3));
        let edns = response.edns.expect("edns echoed");
        let Some(EdnsOption::Subnet(echo)) = edns.option(EdnsCode::Subnet) else {
            panic!("ecs not echoed");
        };
        assert_eq!(echo.addr(), ip("192.0.2.0"));
        assert_eq!(echo.source_prefix(), 24);
        assert_eq!(echo.scope_prefix(), 24);
    }
    // Other names do not depend on the client: scope 0.
    let ecs = ClientSubnet::new(ip("198.51.100.0"), 24, 0);
    let msg = with_edns(query("leader.dc1.agora.test.", RecordType::A), 1232, Some(ecs));
    let edns = udp(server.local_addr(), &msg).await.edns.unwrap();
    let Some(EdnsOption::Subnet(echo)) = edns.option(EdnsCode::Subnet) else {
        panic!("ecs not echoed");
    };
    assert_eq!(echo.scope_prefix(), 0);
}

// ---------- protocol hygiene ----------

#[tokio::test]
async fn unknown_name_is_nxdomain_with_soa() {
    let (server, _view) = start(three_dcs()).await;
    let response = udp(server.local_addr(), &query("nope.agora.test.", RecordType::A)).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(response.metadata.authoritative);
    assert!(soa_serial(&response.authorities).is_some());
    assert_eq!(response.authorities[0].ttl, 5);
    // Names that only exist as parents of other names are NODATA, not NXDOMAIN.
    for ent in ["dc1.agora.test.", "_tcp.shop.agora.test."] {
        assert_nodata(&udp(server.local_addr(), &query(ent, RecordType::A)).await);
    }
    let unknown_dc = query("dc9.shop.agora.test.", RecordType::A);
    let response = udp(server.local_addr(), &unknown_dc).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(server.stats().nxdomain, 2);
}

#[tokio::test]
async fn names_outside_the_zone_are_refused() {
    let (server, _view) = start(three_dcs()).await;
    for name in ["example.com.", "agora.test.example.", "test."] {
        let response = udp(server.local_addr(), &query(name, RecordType::A)).await;
        assert_eq!(response.metadata.response_code, ResponseCode::Refused);
        assert!(!response.metadata.authoritative);
        assert!(response.answers.is_empty());
    }
    assert_eq!(server.stats().refused, 3);
}

#[tokio::test]
async fn malformed_queries_get_formerr() {
    let (server, _view) = start(three_dcs()).await;
    let addr = server.local_addr();

    // Header promises a question, body is cut short.
    let mut bytes = query("shop.agora.test.", RecordType::A).to_vec().unwrap();
    bytes.truncate(bytes.len() - 3);
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let response = Message::from_vec(&udp_raw(addr, &bytes).await).unwrap();
    assert_eq!(response.metadata.id, id);
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);

    // Zero questions.
    let empty = Message::query();
    let response = udp(addr, &empty).await;
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);

    // Two questions.
    let mut two = query("shop.agora.test.", RecordType::A);
    two.add_query(Query::query(Name::from_ascii("agora.test.").unwrap(), RecordType::SOA));
    let response = udp(addr, &two).await;
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(server.stats().formerr, 2, "handler-level formerrs are counted");
}

#[tokio::test]
async fn only_query_opcode_is_implemented() {
    let (server, _view) = start(three_dcs()).await;
    let mut msg = query("shop.agora.test.", RecordType::A);
    msg.metadata.op_code = OpCode::Status;
    let response = udp(server.local_addr(), &msg).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(server.stats().notimp, 1);
}

#[tokio::test]
async fn edns_is_echoed_and_bad_version_rejected() {
    let (server, _view) = start(three_dcs()).await;
    let addr = server.local_addr();
    let plain = udp(addr, &query("shop.agora.test.", RecordType::A)).await;
    assert!(plain.edns.is_none(), "no OPT without one in the query");

    let msg = with_edns(query("shop.agora.test.", RecordType::A), 4096, None);
    let response = udp(addr, &msg).await;
    let edns = response.edns.expect("edns echoed");
    assert_eq!(edns.max_payload(), 1232, "capped to avoid fragmentation");

    // Errors echo EDNS too.
    let msg = with_edns(query("nope.example.", RecordType::A), 1232, None);
    assert!(udp(addr, &msg).await.edns.is_some());

    let mut msg = with_edns(query("shop.agora.test.", RecordType::A), 1232, None);
    msg.edns.as_mut().unwrap().set_version(1);
    let response = udp(addr, &msg).await;
    // BADVERS and BADSIG share code 16; the decoder reports the latter.
    assert_eq!(u16::from(response.metadata.response_code), 16);
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_complete_over_tcp() {
    let snapshot = DnsSnapshot { dcs: vec![dc(1, 60)], ..DnsSnapshot::default() };
    let (server, _view) = start(snapshot).await;
    let addr = server.local_addr();
    let msg = query("dc1.shop.agora.test.", RecordType::A);

    let raw = udp_raw(addr, &msg.to_vec().unwrap()).await;
    assert!(raw.len() <= 512);
    let response = Message::from_vec(&raw).unwrap();
    assert!(response.metadata.truncation, "TC expected over plain UDP");
    assert!(response.answers.len() < 60);

    let response = tcp(addr, &msg).await;
    assert!(!response.metadata.truncation);
    assert_eq!(response.answers.len(), 60);

    // With EDNS the larger buffer holds all 60, and OPT survives.
    let response = udp(addr, &with_edns(msg.clone(), 4096, None)).await;
    assert!(!response.metadata.truncation);
    assert_eq!(response.answers.len(), 60);
    assert!(response.edns.is_some());

    // A tiny EDNS buffer still truncates but keeps the OPT record.
    let response = udp(addr, &with_edns(msg, 512, None)).await;
    assert!(response.metadata.truncation);
    assert!(response.edns.is_some());
    assert_eq!(server.stats().truncated, 2);
}

#[tokio::test]
async fn names_match_case_insensitively() {
    let (server, _view) = start(three_dcs()).await;
    let response = udp(server.local_addr(), &query("ShOp.AGORA.Test.", RecordType::A)).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&response).len(), 3);
    assert_eq!(response.answers[0].name.to_ascii(), "ShOp.AGORA.Test.");
    let leader = udp(server.local_addr(), &query("LEADER.DC2.agora.TEST.", RecordType::A)).await;
    assert_eq!(addresses(&leader), vec![leader_of(2)]);
}

// ---------- record types ----------

#[tokio::test]
async fn srv_lists_healthy_nodes_with_resolvable_targets() {
    let (server, view) = start(three_dcs()).await;
    view.dc("dc1", |d| d.nodes[1].healthy = false);
    view.dc("dc3", |d| d.drained = true);
    let msg = query("_http._tcp.shop.agora.test.", RecordType::SRV);
    let response = udp(server.local_addr(), &msg).await;
    let mut targets: Vec<(String, u16)> = response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv.target.to_ascii(), srv.port)),
            _ => None,
        })
        .collect();
    targets.sort();
    let expected = [("dc1-n1.agora.test.", 8001), ("dc2-n1.agora.test.", 8001), ("dc2-n2.agora.test.", 8002)];
    let expected: Vec<(String, u16)> = expected.iter().map(|(n, p)| (n.to_string(), *p)).collect();
    assert_eq!(targets, expected);
    assert_eq!(record_addresses(&response.additionals).len(), 3);

    let target = udp(server.local_addr(), &query("dc2-n2.agora.test.", RecordType::A)).await;
    assert_eq!(addresses(&target), vec![ip("10.2.0.2")]);
    let missing = udp(server.local_addr(), &query("dc2-n3.agora.test.", RecordType::A)).await;
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn dc_shop_rotates_healthy_nodes() {
    let (server, view) = start(DnsSnapshot { dcs: vec![dc(1, 3)], ..DnsSnapshot::default() }).await;
    let msg = query("dc1.shop.agora.test.", RecordType::A);
    let first = addresses(&udp(server.local_addr(), &msg).await);
    let second = addresses(&udp(server.local_addr(), &msg).await);
    assert_eq!(first, vec![ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.3")]);
    assert_eq!(second, vec![ip("10.1.0.2"), ip("10.1.0.3"), ip("10.1.0.1")]);
    view.dc("dc1", |d| d.nodes.iter_mut().for_each(|n| n.healthy = false));
    assert_nodata(&udp(server.local_addr(), &msg).await);
}

#[tokio::test]
async fn leader_name_answers_or_is_empty() {
    let (server, view) = start(three_dcs()).await;
    view.dc("dc2", |d| d.leader = Some(ip("10.2.0.2")));
    view.dc("dc3", |d| d.leader = None);
    let addr = server.local_addr();
    let response = udp(addr, &query("leader.dc2.agora.test.", RecordType::A)).await;
    assert_eq!(addresses(&response), vec![ip("10.2.0.2")]);
    assert!(response.metadata.authoritative);
    assert_eq!(response.answers[0].ttl, 5);
    assert_nodata(&udp(addr, &query("leader.dc3.agora.test.", RecordType::A)).await);
}

#[tokio::test]
async fn aaaa_is_empty_unless_ipv6_configured() {
    let (server, view) = start(three_dcs()).await;
    let addr = server.local_addr();
    for name in ["shop.agora.test.", "dc1.shop.agora.test.", "leader.dc1.agora.test."] {
        assert_nodata(&udp(addr, &query(name, RecordType::AAAA)).await);
    }
    view.dc("dc1", |d| d.nodes.push(NodeView::new("v6", ip("2001:db8::1"), 8080)));
    let response = udp(addr, &query("dc1.shop.agora.test.", RecordType::AAAA)).await;
    assert_eq!(addresses(&response), vec![ip("2001:db8::1")]);
    let response = udp(addr, &query("shop.agora.test.", RecordType::AAAA)).await;
    assert_eq!(addresses(&response), vec![ip("2001:db8::1")]);
}

#[tokio::test]
async fn apex_has_soa_and_ns_with_glue() {
    let (server, _view) = start(three_dcs()).await;
    let addr = server.local_addr();
    let response = udp(addr, &query("agora.test.", RecordType::NS)).await;
    let ns: Vec<String> = response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(ns.len(), 6, "one NS per node");
    assert_eq!(ns[0], "ns1.agora.test.");
    assert_eq!(response.additionals.len(), 6, "glue for every NS");
    let glue = udp(addr, &query("ns4.agora.test.", RecordType::A)).await;
    assert_eq!(addresses(&glue), vec![ip("10.2.0.2")]);
    let soa = udp(addr, &query("agora.test.", RecordType::SOA)).await;
    assert!(soa.metadata.authoritative);
    assert!(soa_serial(&soa.answers).is_some());
}

#[tokio::test]
async fn soa_serial_follows_topology() {
    let (server, view) = start(three_dcs()).await;
    let addr = server.local_addr();
    let serial = async || {
        let response = udp(addr, &query("agora.test.", RecordType::SOA)).await;
        soa_serial(&response.answers).unwrap()
    };
    let initial = serial().await;
    assert_eq!(initial, view.snapshot().serial());
    assert_eq!(serial().await, initial, "stable while nothing changes");

    view.dc("dc2", |d| d.healthy = false);
    let unhealthy = serial().await;
    assert_ne!(unhealthy, initial);

    view.dc("dc2", |d| d.healthy = true);
    view.dc("dc1", |d| d.leader = Some(ip("10.1.0.2")));
    let new_leader = serial().await;
    assert_ne!(new_leader, initial);
    assert_ne!(new_leader, unhealthy);

    view.dc("dc3", |d| d.drained = true);
    assert_ne!(serial().await, new_leader);
}

#[tokio::test]
async fn custom_zone_and_ttl() {
    let snapshot = DnsSnapshot { zone: "Shop.Example".into(), ttl: 30, dcs: vec![dc(1, 1)] };
    let (server, _view) = start(snapshot).await;
    let response = udp(server.local_addr(), &query("shop.shop.example.", RecordType::A)).await;
    assert_eq!(addresses(&response), vec![leader_of(1)]);
    assert_eq!(response.answers[0].ttl, 30);
    let response = udp(server.local_addr(), &query("shop.agora.test.", RecordType::A)).await;
    assert_eq!(response.metadata.response_code, ResponseCode::Refused);
}

// ---------- ANY (RFC 8482) ----------

fn assert_minimal_any(msg: &Message, qname: &str) {
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert!(msg.metadata.authoritative);
    assert!(!msg.metadata.truncation);
    assert_eq!(msg.answers.len(), 1, "one synthesized record, not every RRset: {:?}", msg.answers);
    assert!(msg.authorities.is_empty() && msg.additionals.is_empty());
    let record = &msg.answers[0];
    assert_eq!(record.name.to_ascii(), qname);
    assert_eq!(record.ttl, 5, "zone TTL");
    let RData::HINFO(hinfo) = &record.data else {
        panic!("HINFO expected, got {:?}", record.data);
    };
    assert_eq!((&*hinfo.cpu, &*hinfo.os), (&b"RFC8482"[..], &b""[..]));
}

#[tokio::test]
async fn any_gets_one_small_synthesized_answer() {
    let (server, _view) = start(three_dcs()).await;
    let addr = server.local_addr();
    // The apex holds SOA and 6 NS with glue: the largest ANY answer we could give.
    let full = udp_raw(addr, &query("agora.test.", RecordType::NS).to_vec().unwrap()).await;
    for name in ["agora.test.", "shop.agora.test.", "dc1.shop.agora.test.", "_http._tcp.shop.agora.test.", "dc2-n1.agora.test.", "dc1.agora.test."] {
        let bytes = query(name, RecordType::ANY).to_vec().unwrap();
        let raw = udp_raw(addr, &bytes).await;
        // The query echoed, plus one record: owner (at most the name again), type, class,
        // TTL and length (10 bytes) and the HINFO data (9 bytes).
        let one_hinfo = name.len() + 1 + 10 + 9;
        assert!(raw.len() <= bytes.len() + one_hinfo, "{name}: {} bytes for a {}-byte query", raw.len(), bytes.len());
        assert_minimal_any(&Message::from_vec(&raw).unwrap(), name);
    }
    let raw = udp_raw(addr, &query("agora.test.", RecordType::ANY).to_vec().unwrap()).await;
    assert!(raw.len() * 4 < full.len(), "ANY ({} bytes) is far smaller than NS alone ({} bytes)", raw.len(), full.len());
    // TCP gets the same answer (see the dns module docs).
    assert_minimal_any(&tcp(addr, &query("agora.test.", RecordType::ANY)).await, "agora.test.");
    // With EDNS too, and the ANY did not advance the shop rotation.
    assert_minimal_any(&udp(addr, &with_edns(query("shop.agora.test.", RecordType::ANY), 1232, None)).await, "shop.agora.test.");
    assert_eq!(shop(addr).await[0], leader_of(1));
    // Unknown names and names outside the zone are answered as before.
    let nx = udp(addr, &query("nope.agora.test.", RecordType::ANY)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.answers.is_empty());
    let out = udp(addr, &query("example.com.", RecordType::ANY)).await;
    assert_eq!(out.metadata.response_code, ResponseCode::Refused);
    assert!(out.answers.is_empty());
}

// ---------- response-rate limiting ----------

/// Waits, with a deadline, until the server has taken `count` queries in.
async fn until_queries(server: &DnsServer, count: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.stats().queries < count {
        assert!(tokio::time::Instant::now() < deadline, "server took only {:?} of {count} queries", server.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Receives exactly `count` responses on `socket`, each within the deadline.
async fn receive(socket: &UdpSocket, count: u64) -> Vec<(usize, Message)> {
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::new();
    for _ in 0..count {
        let (len, _) = timeout(WAIT, socket.recv_from(&mut buf)).await.expect("udp response timed out").unwrap();
        out.push((len, Message::from_vec(&buf[..len]).unwrap()));
    }
    out
}

#[tokio::test]
async fn rate_limit_drops_and_slips_a_flood_from_one_netblock_only() {
    let limit = RateLimit { responses_per_s: 10, slip: 2, sources_max: 100 };
    let (server, _view) = start_limited(three_dcs(), limit).await;
    let addr = server.local_addr();
    let flood = UdpSocket::bind("127.0.51.1:0").await.unwrap();
    let started = std::time::Instant::now();
    let sent = 200u16;
    let mut query_len = 0;
    for id in 0..sent {
        let mut msg = query("shop.agora.test.", RecordType::A);
        msg.metadata.id = id;
        let bytes = msg.to_vec().unwrap();
        query_len = bytes.len();
        flood.send_to(&bytes, addr).await.unwrap();
    }
    until_queries(&server, u64::from(sent)).await;
    let elapsed = started.elapsed();
    let stats = server.stats();
    let responses = receive(&flood, u64::from(sent) - stats.rrl_dropped).await;
    let (slips, full): (Vec<_>, Vec<_>) = responses.iter().partition(|(_, m)| m.metadata.truncation);
    // The burst (one second's worth), plus what the rate earned while we sent (one
    // token per 100 ms begun).
    let earned = u64::try_from(elapsed.as_millis() / 100).unwrap() + 1;
    assert!(full.len() >= 10 && full.len() as u64 <= 10 + earned, "{} answered in {elapsed:?}", full.len());
    for (_, m) in &full {
        assert_eq!(addresses(m).len(), 3);
    }
    for (len, m) in &slips {
        assert!(m.answers.is_empty() && m.authorities.is_empty() && m.additionals.is_empty());
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.queries.len(), 1, "a slip keeps the question");
        assert!(*len <= query_len, "a slip is never larger than the query");
    }
    let limited = u64::from(sent) - full.len() as u64;
    assert_eq!(stats.rrl_slipped, slips.len() as u64);
    assert_eq!(stats.rrl_slipped + stats.rrl_dropped, limited);
    assert_eq!(stats.rrl_slipped, limited / 2, "every 2nd limited response slips");
    assert!(stats.rrl_dropped > 0);
    assert_eq!(stats.answered, full.len() as u64, "withheld responses are not counted as answered");

    // Another netblock is answered in full, up to its own burst...
    let other = UdpSocket::bind("127.0.52.1:0").await.unwrap();
    for id in 0..10u16 {
        let mut msg = query("shop.agora.test.", RecordType::A);
        msg.metadata.id = id;
        other.send_to(&msg.to_vec().unwrap(), addr).await.unwrap();
    }
    for (_, m) in receive(&other, 10).await {
        assert!(!m.metadata.truncation);
        assert_eq!(addresses(&m).len(), 3);
    }
    // ...and TCP is not limited: the flooding netblock still gets its answer there.
    let over_tcp = tcp(addr, &query("shop.agora.test.", RecordType::A)).await;
    assert_eq!(addresses(&over_tcp).len(), 3);
    assert_eq!(server.stats().rrl_dropped, stats.rrl_dropped);
    assert_eq!(server.stats().rrl_sources, 2);
}

#[tokio::test]
async fn rate_limit_table_stays_within_its_bound_under_many_sources() {
    // One response per second, every limited one slipped: a second query in a row is TC.
    let limit = RateLimit { responses_per_s: 1, slip: 1, sources_max: 8 };
    let (server, _view) = start_limited(three_dcs(), limit).await;
    let addr = server.local_addr();
    let ask = async |source: &str| {
        let socket = UdpSocket::bind(format!("{source}:0")).await.unwrap();
        let msg = query("leader.dc1.agora.test.", RecordType::A);
        socket.send_to(&msg.to_vec().unwrap(), addr).await.unwrap();
        receive(&socket, 1).await.remove(0).1
    };
    let first = "127.0.60.1";
    assert!(!ask(first).await.metadata.truncation);
    assert!(ask(first).await.metadata.truncation, "the first netblock is limited now");
    let mut most = 0;
    for k in 0..64u8 {
        let answer = ask(&format!("127.1.{k}.1")).await;
        assert!(!answer.metadata.truncation, "a new netblock starts with a full bucket");
        most = most.max(server.stats().rrl_sources);
    }
    assert!(most <= 8, "{most} netblocks tracked, bound 8");
    assert!(server.stats().rrl_sources > 4, "both generations in use: {:?}", server.stats());
    // The first netblock was forgotten (least recently seen), so it starts afresh.
    assert!(!ask(first).await.metadata.truncation, "forgotten netblock is answered again");
}

// ---------- robustness ----------

/// xorshift64*: deterministic noise without a dev-dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn packet(&mut self, template: &[u8]) -> Vec<u8> {
        if self.next().is_multiple_of(2) {
            let len = (self.next() % 600) as usize;
            return (0..len).map(|_| self.next() as u8).collect();
        }
        // Mutated valid query: exercises deeper parser paths than pure noise.
        let mut bytes = template.to_vec();
        for _ in 0..1 + self.next() % 6 {
            let at = (self.next() as usize) % bytes.len();
            bytes[at] = self.next() as u8;
        }
        if self.next().is_multiple_of(3) {
            bytes.truncate(1 + (self.next() as usize) % bytes.len());
        }
        bytes
    }
}

// Multi-threaded so the server parses the flood while it is being sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_flood_does_not_stop_the_server() {
    let (server, _view) = start(three_dcs()).await;
    let addr = server.local_addr();
    let ecs = ClientSubnet::new(ip("192.0.2.0"), 24, 0);
    let template = with_edns(query("shop.agora.test.", RecordType::A), 1232, Some(ecs));
    let template = template.to_vec().unwrap();
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);

    // From a netblock of its own, so the rate limiter's view of it does not
    // decide whether the checks below are answered.
    let socket = UdpSocket::bind("127.0.77.1:0").await.unwrap();
    for _ in 0..3000 {
        let packet = noise.packet(&template);
        // Send errors (e.g. a full buffer) are fine: this is a flood.
        let _ = socket.send_to(&packet, addr).await;
    }
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let packet = noise.packet(&template);
        let _ = stream.write_all(&packet).await;
    }

    let response = udp_with_retries(addr, &query("shop.agora.test.", RecordType::A)).await;
    assert_eq!(addresses(&response).len(), 3);
    let response = tcp(addr, &query("shop.agora.test.", RecordType::A)).await;
    assert_eq!(addresses(&response).len(), 3);
    // Some mutated packets still parse and reach the handler.
    let stats = server.stats();
    assert!(stats.queries > 10, "flood never reached the handler: {stats:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_the_port() {
    let (server, _view) = start(three_dcs()).await;
    let addr = server.local_addr();
    assert_eq!(shop(addr).await.len(), 3);
    timeout(WAIT, server.shutdown()).await.expect("shutdown hangs");
    assert!(TcpStream::connect(addr).await.is_err(), "tcp still accepting");
    let stats_after_restart =
        DnsServer::start(addr, Arc::new(TestView(Mutex::new(three_dcs()))), RateLimit::default(), 0).await.expect("port reusable after shutdown");
    assert_eq!(stats_after_restart.stats().queries, 0);
}
