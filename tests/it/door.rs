//! Bounds at the door: connection caps per source and in total, and the timeouts that
//! cut slow or idle clients.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{Options, TestCluster};

/// Connects to `to` from the local address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).expect("bind a loopback source address");
    s.connect(to).await.expect("connect")
}

/// Waits until the server closes `s` (EOF or reset); `None` if it is still open at the
/// deadline. Anything the server sends first (a 408, say) is skipped.
async fn closed_within(s: &mut TcpStream, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

const PER_SOURCE: usize = 16;

#[tokio::test]
async fn a_connection_flood_from_one_address_is_refused_at_once() {
    let limits = "http_conns_max = 64\nhttp_conns_per_source_max = 16\n";
    let c = TestCluster::start(65, Options { nodes: 1, limits, ..Options::default() }).await;
    let node = c.names[0].clone();
    let pid = c.pid(&node).expect("node pid");
    let http: SocketAddr = c.url(&node).trim_start_matches("http://").parse().unwrap();
    let fds_before = open_fds(pid);

    // The node raised its open-file limit to the hard limit.
    let limits_file = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile: Vec<&str> = limits_file.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(nofile[3], nofile[4], "soft open-file limit is the hard one: {nofile:?}");

    // Ten times the per-source cap of idle connections from one address.
    let flooder: IpAddr = "127.65.9.1".parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..PER_SOURCE * 10 {
        conns.push(connect_from(flooder, http).await);
    }
    // Everything past the cap is closed at once (well before any timeout of the node).
    let mut closed = 0;
    for s in conns.iter_mut().skip(PER_SOURCE) {
        let t = closed_within(s, Duration::from_secs(3)).await;
        assert!(t.is_some(), "a connection over the per-source cap was left open");
        closed += 1;
    }
    assert_eq!(closed, PER_SOURCE * 9);
    // The first ones are still open (they idle until the header timeout, 10 s).
    for s in conns.iter_mut().take(PER_SOURCE) {
        assert_eq!(closed_within(s, Duration::from_millis(100)).await, None, "an admitted connection was closed");
    }

    // A client from another address is served meanwhile.
    let other = reqwest::Client::builder().local_address(Some("127.65.9.2".parse().unwrap())).timeout(Duration::from_secs(5)).build().unwrap();
    let resp = other.get(format!("{}/healthz", c.url(&node))).send().await.expect("request from another address");
    assert_eq!(resp.status(), 200);

    // Counted in /metrics.
    let metrics = other.get(format!("{}/metrics", c.url(&node))).send().await.unwrap().text().await.unwrap();
    let line = metrics.lines().find(|l| l.starts_with("agora_conns_refused_total") && l.contains("per_source")).expect("refusals in /metrics");
    assert!(line.ends_with(&format!(" {}", PER_SOURCE * 9)), "{line}");

    // The node holds no socket for the refused connections.
    let fds = open_fds(pid);
    assert!(fds <= fds_before + PER_SOURCE + 8, "{fds} fds open, {fds_before} before the flood");
    drop(conns);
    c.must_session(&node, "after-the-flood").await;
}

#[tokio::test]
async fn slow_and_idle_http_clients_are_cut() {
    let limits = "request_timeout_ms = 1000\nhttp_request_timeout_ms = 1000\nhttp_header_timeout_ms = 1000\nhttp_idle_timeout_ms = 2000\n";
    let c = TestCluster::start(66, Options { nodes: 1, limits, ..Options::default() }).await;
    let node = c.names[0].clone();
    let http: SocketAddr = c.url(&node).trim_start_matches("http://").parse().unwrap();
    let me: IpAddr = "127.66.9.1".parse().unwrap();

    // Half a header, then nothing: cut after the header timeout.
    let mut s = connect_from(me, http).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: agora\r\n").await.unwrap();
    let t = closed_within(&mut s, Duration::from_secs(5)).await.expect("a half-sent header is cut");
    // By the header timeout (1 s), not the idle timeout (2 s).
    assert!(t >= Duration::from_millis(800) && t < Duration::from_millis(1800), "cut after {t:?}");

    // A keep-alive connection that sends no next request is closed.
    let mut s = connect_from(me, http).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: agora\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    let t = closed_within(&mut s, Duration::from_secs(5)).await.expect("an idle keep-alive connection is closed");
    assert!(t >= Duration::from_millis(800) && t < Duration::from_millis(1800), "closed after {t:?}");

    // A body that stops arriving: the request timeout answers 503 with Retry-After.
    let mut s = connect_from(me, http).await;
    s.write_all(b"POST /v1/sessions HTTP/1.1\r\nHost: agora\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user\":").await.unwrap();
    let mut got = Vec::new();
    let start = Instant::now();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer to a stalled body").unwrap();
        assert!(n > 0, "closed without an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 503") && text.contains("retry-after"), "{text}");
    assert!(start.elapsed() >= Duration::from_millis(800), "answered after {:?}", start.elapsed());

    // And the node still serves.
    c.must_session(&node, "still-serving").await;
}

/// The peer port has the same door: connections over the per-source cap are closed at
/// once, a silent one is closed after the idle timeout, and the DC's own links — busy
/// with heartbeats and probes — are never idle: no election, writes still forwarded.
#[tokio::test]
async fn the_peer_port_caps_sources_and_closes_silent_connections() {
    let limits = "peer_request_timeout_ms = 2000\npeer_idle_timeout_ms = 2500\npeer_conns_per_source_max = 4\n";
    let c = TestCluster::start(67, Options { limits, ..Options::default() }).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let term = c.status(&leader).await.expect("status")["term"].as_u64().expect("term");
    let peer: SocketAddr = c.peer_addr(&leader).parse().unwrap();
    let me: IpAddr = "127.67.9.1".parse().unwrap();

    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(connect_from(me, peer).await);
    }
    for s in conns.iter_mut().skip(4) {
        assert!(closed_within(s, Duration::from_secs(2)).await.is_some(), "a peer connection over the per-source cap was left open");
    }
    let start = Instant::now();
    for s in conns.iter_mut().take(4) {
        let t = closed_within(s, Duration::from_secs(6)).await.expect("a silent peer connection is closed");
        assert!(start.elapsed() >= Duration::from_millis(2000), "closed after {t:?}, before the idle timeout");
    }

    // Meanwhile, and after, the DC is undisturbed.
    let follower = c.names.iter().find(|n| **n != leader).unwrap().clone();
    c.must_session(&follower, "forwarded-after-idle").await;
    assert_eq!(c.must_leader(Duration::from_secs(5)).await, leader);
    assert_eq!(c.status(&leader).await.expect("status")["term"].as_u64(), Some(term), "an election happened");
}
