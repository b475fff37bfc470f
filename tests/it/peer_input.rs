//! Hostile bytes on the peer port are rejected without harm.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Options, TestCluster};

/// Writes `bytes` and returns what the node sent back before closing the connection.
async fn send<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, bytes: &[u8]) -> Vec<u8> {
    let _ = s.write_all(bytes).await;
    // Half-close: a truncated frame then ends, as when a sender dies mid-frame.
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "node should close the connection");
    got
}

/// Raw bytes on the peer port meet the TLS handshake: at most a TLS alert record
/// (content type 21) comes back, then the connection closes.
async fn send_raw(addr: &str, bytes: &[u8]) {
    let s = TcpStream::connect(addr).await.expect("connect peer port");
    let got = send(s, bytes).await;
    assert!(got.is_empty() || got[0] == 21, "node answered garbage with {got:?}");
}

/// The same garbage from an authenticated peer, inside its TLS session: the node closes
/// the connection without answering.
async fn send_authenticated(c: &TestCluster, to: &str, from: &str, bytes: &[u8]) {
    use agora::transport::tls::{self, PeerTls, Security};
    let security = Security::Tls(std::sync::Arc::new(PeerTls::load(&c.certs_dir(), from).unwrap()));
    let tcp = TcpStream::connect(c.peer_addr(to)).await.expect("connect peer port");
    let s = tls::connect(tcp, &security, to, "dc1").await.expect("tls handshake with a valid certificate");
    assert!(send(s, bytes).await.is_empty(), "node answered a bad frame");
}

#[tokio::test]
async fn garbage_truncated_and_unknown_version_frames_are_rejected() {
    let c = TestCluster::start(32, Options::default()).await;
    let addr = c.peer_addr(&c.names[0]);
    let before = c.must_converge(Duration::from_secs(5)).await;
    let frames: [&[u8]; 5] =
        [&[0, 0, 0, 3, 99, 1, 2], &[0, 0, 0, 100, 1, 2, 3], &[0, 0, 0, 5, 1, 0xff, 0xff, 0xff, 0xff], &[0xff, 0xff, 0xff, 0xff], b"GET / HTTP/1.1\r\n\r\n"];
    for f in frames {
        send_authenticated(&c, &c.names[0], &c.names[1], f).await;
    }
    // A frame from a future format version.
    send_raw(&addr, &[0, 0, 0, 3, 99, 1, 2]).await;
    // Truncated: the length says 100 bytes, 3 follow.
    send_raw(&addr, &[0, 0, 0, 100, 1, 2, 3]).await;
    // Current version, undecodable body.
    send_raw(&addr, &[0, 0, 0, 5, 1, 0xff, 0xff, 0xff, 0xff]).await;
    // A length over the frame limit.
    send_raw(&addr, &[0xff, 0xff, 0xff, 0xff]).await;
    // Plain noise.
    send_raw(&addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(c.must_converge(Duration::from_secs(5)).await, before);
    c.must_session(&c.names[0], "still-fine").await;
}

/// A batch entry is built by the leader's proposer only: a peer that submits one (to slip
/// several commands past the actors' ordering) is refused, and nothing changes.
#[tokio::test]
async fn a_batch_submitted_by_a_peer_is_refused() {
    use agora::domain::{Command, Request};
    use agora::error::NodeError;
    use agora::transport::{PeerRequest, PeerResponse};

    let c = TestCluster::start(33, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let before = c.must_converge(Duration::from_secs(5)).await;
    let session = |token: &str| Request::new(Command::CreateSession { token: token.into(), user: "mallory".into(), dc: "dc1".into(), hlc: 1 }, None);
    let batch = Request::new(Command::Batch { requests: vec![session("b1"), session("b2")] }, None);
    let from = c.names.iter().find(|n| **n != leader).map(|n| TestCluster::id(n)).unwrap();
    let resp = c.peer_call(&leader, from, PeerRequest::Submit(batch)).await;
    assert!(matches!(resp, PeerResponse::Submit(Err(NodeError::BadRequest(_)))), "{resp:?}");
    assert_eq!(c.get(&leader, "/v1/sessions/b1").await.0, 404);
    assert_eq!(c.must_converge(Duration::from_secs(5)).await, before);
}
