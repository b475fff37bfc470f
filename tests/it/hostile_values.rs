//! Values no honest peer sends, from an authenticated peer: each attack that once worked
//! is refused (or its value rejected), the DC's state is unchanged, and the node serves on.

use std::collections::BTreeMap;
use std::time::Duration;

use agora::domain::{Change, Command, DcSettings, Event, Request, Session, StockRow};
use agora::error::NodeError;
use agora::raft::{NodeId, TypeConfig};
use agora::transport::message::{ProbeAck, ReplicateAck};
use agora::transport::{PeerRequest, PeerResponse};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, SnapshotMeta, Vote};
use serde_json::json;

use crate::harness::{must_eventually, Options, TestCluster};

const SECS: fn(u64) -> Duration = Duration::from_secs;

async fn term_of(c: &TestCluster, node: &str, from: NodeId) -> u64 {
    match c.peer_call(node, from, PeerRequest::Probe).await {
        PeerResponse::Probe(ack) => ack.term,
        other => panic!("probe answered {other:?}"),
    }
}

fn now_hlc(ahead_ms: u64) -> u64 {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    (ms + ahead_ms) << 16
}

/// Some node of `dc1` other than the leader, and a third one to pose as.
async fn roles(c: &TestCluster) -> (String, String, String) {
    let leader = c.must_leader(SECS(10)).await;
    let others: Vec<String> = c.dc_nodes("dc1").into_iter().filter(|n| *n != leader).collect();
    (leader, others[0].clone(), others[1].clone())
}

fn snapshot_chunk(term: u64, from: NodeId, id: &str, offset: u64, data: Vec<u8>, done: bool) -> PeerRequest {
    let meta =
        SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(term, from), 1_000)), last_membership: Default::default(), snapshot_id: id.into() };
    PeerRequest::InstallSnapshot(InstallSnapshotRequest::<TypeConfig> { vote: Vote::new(term, from), meta, offset, data, done })
}

/// A term of u64::MAX (Vote, AppendEntries, InstallSnapshot) made openraft overflow at
/// the next election and after every restart; a commit index near u64::MAX likewise.
#[tokio::test]
async fn raft_terms_far_ahead_and_impossible_indexes_are_refused() {
    let mut c = TestCluster::start(91, Options::default()).await;
    let (leader, target, posing) = roles(&c).await;
    let from = TestCluster::id(&posing);
    let before = c.must_converge(SECS(5)).await;
    let term = term_of(&c, &target, from).await;
    let attacks = [
        PeerRequest::Vote(VoteRequest::new(Vote::new(u64::MAX, from), None)),
        PeerRequest::AppendEntries(AppendEntriesRequest { vote: Vote::new(u64::MAX, from), prev_log_id: None, entries: vec![], leader_commit: None }),
        snapshot_chunk(u64::MAX, from, "x", 0, vec![], false),
        PeerRequest::AppendEntries(AppendEntriesRequest {
            vote: Vote::new(term + 1, from),
            prev_log_id: None,
            entries: vec![],
            leader_commit: Some(LogId::new(CommittedLeaderId::new(term, from), u64::MAX)),
        }),
    ];
    for a in attacks {
        let resp = c.peer_call(&target, from, a).await;
        assert!(matches!(resp, PeerResponse::Refused(_)), "{resp:?}");
    }
    assert!(term_of(&c, &target, from).await < term + 10, "the target's term did not jump");
    // An election (the leader killed), then a restart: the DC elects and serves.
    c.kill(&leader);
    let new_leader = c.must_leader(SECS(20)).await;
    c.start_node(&leader);
    c.must_session(&new_leader, "still-fine").await;
    c.must_session(&target, "target-serves").await;
    let after = c.must_converge(SECS(20)).await;
    assert_ne!(after, before, "the sessions above were written");
}

/// A chunk at a huge offset made the node grow its buffer to 2^40 bytes; a snapshot
/// whose checksum does not match, or over the size limit, is refused whole.
#[tokio::test]
async fn snapshot_chunks_out_of_order_oversized_or_failing_their_checksum_are_refused() {
    let opts = Options { raft: "snapshot_bytes_max = 65536", ..Options::default() };
    let c = TestCluster::start(92, opts).await;
    let (_leader, target, posing) = roles(&c).await;
    let from = TestCluster::id(&posing);
    let before = c.must_converge(SECS(5)).await;
    let term = term_of(&c, &target, from).await + 1;
    // Begins a transfer (openraft takes it: the sender's term is newer), then jumps.
    let _ = c.peer_call(&target, from, snapshot_chunk(term, from, "s1", 0, vec![1; 16], false)).await;
    let resp = c.peer_call(&target, from, snapshot_chunk(term, from, "s1", 1 << 40, vec![1; 16], false)).await;
    assert!(matches!(resp, PeerResponse::InstallSnapshot(Err(_))), "{resp:?}");
    // Over raft.snapshot_bytes_max.
    let resp = c.peer_call(&target, from, snapshot_chunk(term, from, "s2", 0, vec![0; 70_000], false)).await;
    assert!(matches!(resp, PeerResponse::Refused(_)), "{resp:?}");
    // A whole snapshot whose checksum does not match its body.
    let mut w = agora::storage::snapshot_data::Writer::new(std::io::Cursor::new(Vec::new())).unwrap();
    w.put(b"s/forged", b"value").unwrap();
    let mut data = w.finish().unwrap().0.into_inner();
    *data.last_mut().unwrap() ^= 0xff;
    let resp = c.peer_call(&target, from, snapshot_chunk(term, from, "s3", 0, data, true)).await;
    assert!(matches!(resp, PeerResponse::Refused(_)), "{resp:?}");
    // Not format 3 or 4 (an older format, without a checksum here).
    let body = agora::codec::encode(&Vec::<(Vec<u8>, Vec<u8>)>::new());
    let resp = c.peer_call(&target, from, snapshot_chunk(term, from, "s4", 0, body, true)).await;
    assert!(matches!(resp, PeerResponse::Refused(_)), "{resp:?}");
    c.must_leader(SECS(20)).await;
    c.must_session(&target, "target-serves").await;
    let after = c.must_converge(SECS(20)).await;
    assert_ne!(after, before, "the session above was written");
    assert!(c.status(&target).await.is_some(), "the target is up");
}

fn two_dcs(net_opts: &'static str) -> Options {
    Options { dcs: 2, nodes: 1, replication: net_opts, ..Options::default() }
}

/// dc1's cursor for dc2's events, asked as dc2 with an empty batch.
async fn cursor(c: &TestCluster) -> u64 {
    must_eventually(SECS(10), "a cursor from dc1's leader", || async {
        match c.peer_call("dc1-n1", 21, PeerRequest::Replicate { origin: "dc2".into(), events: vec![] }).await {
            PeerResponse::Replicate(Ok(ack)) => Some(ack.cursor),
            _ => None,
        }
    })
    .await
}

fn forged(seq: u64, hlc: u64, change: Change) -> PeerRequest {
    PeerRequest::Replicate { origin: "dc2".into(), events: vec![Event { seq, origin: "dc2".into(), hlc, change }] }
}

/// "Pin a DC as drained forever with a DC-settings timestamp at the clock's maximum";
/// likewise sessions from the far future, and forwarded commands carrying such stamps.
#[tokio::test]
async fn timestamps_beyond_the_clock_offset_are_refused() {
    let c = TestCluster::start(93, two_dcs("")).await;
    c.must_session("dc1-n1", "before").await;
    let before = c.must_converge(SECS(10)).await;
    let seq = cursor(&c).await + 1;
    let drain = |hlc| Change::Settings(DcSettings { dc: "dc1".into(), drained: true, weight: 0, hlc, by: "dc2".into() });
    let session = Change::Session(Session { token: "forever".into(), user: "m".into(), dc: "dc2".into(), hlc: now_hlc(60_000), deleted: false });
    for attack in [forged(seq, now_hlc(0), drain(u64::MAX)), forged(seq, u64::MAX, drain(now_hlc(0))), forged(seq, now_hlc(0), session)] {
        let resp = c.peer_call("dc1-n1", 21, attack).await;
        assert!(matches!(resp, PeerResponse::Replicate(Err(NodeError::BadRequest(_)))), "{resp:?}");
    }
    // A command forwarded by a node of the DC (here: as the node itself) with a stamp at the maximum.
    let cmd = Command::SetDcSettings { target: "dc1".into(), drained: true, weight: 0, dc: "dc1".into(), hlc: u64::MAX };
    let resp = c.peer_call("dc1-n1", 11, PeerRequest::Submit(Request::new(cmd, None))).await;
    // Refused as clocks that disagree (the sender is a node of this DC): nothing applied.
    assert!(matches!(resp, PeerResponse::Submit(Err(NodeError::ClockSkew(_)))), "{resp:?}");
    assert_eq!(c.must_converge(SECS(5)).await, before);
    let (_, dcs) = c.get("dc1-n1", "/v1/admin/dcs").await;
    assert!(!dcs.to_string().contains("\"drained\":true"), "{dcs}");
    // The clock was not pushed: an operator's drain now still wins over the current one, and undrains.
    for drained in [true, false] {
        let (code, v) = c.request(reqwest::Method::PUT, "dc1-n1", "/v1/admin/dcs/dc1", Some(json!({"drained": drained, "weight": 1})), None).await;
        assert_eq!(code, 200, "{v}");
    }
    c.must_session("dc1-n1", "after").await;
    // An honest event at a current timestamp still passes.
    let ok = Change::Session(Session { token: "honest".into(), user: "h".into(), dc: "dc2".into(), hlc: now_hlc(0), deleted: false });
    let resp = c.peer_call("dc1-n1", 21, forged(seq, now_hlc(0), ok)).await;
    assert!(matches!(resp, PeerResponse::Replicate(Ok(ReplicateAck { cursor })) if cursor == seq), "{resp:?}");
}

/// A hostile dc2 leader: dc2-n1's own certificate (an authenticated peer), answering
/// every replication batch with the cursor u64::MAX.
struct LyingDc2;

#[async_trait::async_trait]
impl agora::transport::PeerHandler for LyingDc2 {
    async fn handle(&self, _from: NodeId, req: PeerRequest) -> PeerResponse {
        match req {
            PeerRequest::Probe => PeerResponse::Probe(ProbeAck { dc: "dc2".into(), leader: Some(21), term: 1 }),
            _ => PeerResponse::Replicate(Ok(ReplicateAck { cursor: u64::MAX })),
        }
    }
}

/// The fake runs on a runtime of its own: shutting it down closes every connection it
/// accepted, as a killed process would.
async fn fake_dc2(c: &TestCluster) -> tokio::runtime::Runtime {
    use agora::transport::server::{Admission, ServerLimits};
    use agora::transport::tls::{Directory, PeerTls, Security};
    let addr = c.peer_addr("dc2-n1");
    let listener = must_eventually(SECS(10), "the fake dc2 bound", || async { std::net::TcpListener::bind(&addr).ok() }).await;
    listener.set_nonblocking(true).unwrap();
    let config = agora::config::ClusterConfig::from_toml(&std::fs::read_to_string(c.dir.path().join("cluster.toml")).unwrap(), "test").unwrap();
    let tls = PeerTls::load(&c.certs_dir(), "dc2-n1").expect("dc2-n1's certificate");
    let admission = Admission { security: Security::Tls(std::sync::Arc::new(tls)), directory: std::sync::Arc::new(Directory::new(&config)) };
    let door = agora::door::Door::new("peer", agora::door::ConnLimits { total_max: 64, per_source_max: 64 }, SECS(60));
    let limits = ServerLimits { frame_bytes_max: 64 << 20, inflight_per_connection_max: 64, door };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        agora::transport::serve(listener, std::sync::Arc::new(LyingDc2), Default::default(), Default::default(), limits, admission).await
    });
    rt
}

/// `ReplicateAck { cursor: u64::MAX }` stopped replication (`a + 1` wrapped in the
/// shipper): an ack beyond what was emitted is ignored and the old cursor kept.
#[tokio::test]
async fn an_ack_beyond_what_was_emitted_does_not_stop_replication() {
    let mut c = TestCluster::start(94, two_dcs("")).await;
    c.must_session("dc1-n1", "first").await;
    c.must_converge(SECS(10)).await;
    c.kill("dc2-n1");
    let fake = fake_dc2(&c).await;
    // dc1 ships to the fake, and writes meanwhile.
    let token = c.must_session("dc1-n1", "during").await;
    let link = must_eventually(SECS(15), "impossible acks counted by dc1", || async {
        let link = dc2_link(&c).await;
        (link["bad_acks"].as_u64()? >= 2).then_some(link)
    })
    .await;
    // The impossible ack was not taken: the cursor is not u64::MAX (which would also
    // have let dc1 trim events dc2 never applied, and catch it up from a snapshot).
    assert!(link["acked_seq"].as_u64().unwrap_or(0) < 100, "{link}");
    fake.shutdown_background();
    let addr = c.peer_addr("dc2-n1");
    must_eventually(SECS(10), "the fake's port free again", || async { std::net::TcpListener::bind(&addr).ok().map(drop) }).await;
    c.start_node("dc2-n1");
    c.must_leader_in("dc2", SECS(20)).await;
    must_eventually(SECS(20), "dc1's session replicated to dc2", || async {
        (c.get("dc2-n1", &format!("/v1/sessions/{token}?consistency=stale")).await.0 == 200).then_some(())
    })
    .await;
    c.must_converge(SECS(10)).await;
    c.must_session("dc1-n1", "after").await;
    assert_eq!(dc2_link(&c).await["snapshot_catchups"], 0, "caught up from events, not a snapshot");
}

/// dc1's view of its link to dc2, from its status.
async fn dc2_link(c: &TestCluster) -> serde_json::Value {
    let st = c.status("dc1-n1").await.expect("dc1 status");
    st["dcs"].as_array().expect("dcs").iter().find(|d| d["name"] == "dc2").cloned().expect("dc2 in status")
}

/// "As a forged dc2, grant dc1 unlimited stock, which dc1 then sold": rows that do not
/// balance, or claim units dc1 never sent, are rejected; an AskStock takes at most
/// `grant_units_max`, once per interval, and never the reserve.
#[tokio::test]
async fn forged_grants_are_rejected_and_asks_are_bounded() {
    let c = TestCluster::start(95, two_dcs("grant_units_max = 5\ngrant_interval_ms = 60000")).await;
    c.must_restock("dc1-n1", "sku", 30).await;
    let before = c.must_converge(SECS(10)).await;
    let seq = cursor(&c).await + 1;
    let row = |sent: u64| StockRow { sent: BTreeMap::from([("dc1".to_string(), sent)]), ..Default::default() };
    let attacks = [
        Change::StockV2 { sku: "sku".into(), row: row(1_000_000), received: BTreeMap::new() },
        Change::Stock { sku: "sku".into(), row: row(1_000_000) },
        // Balances only with units dc1 never sent.
        Change::StockV2 { sku: "sku".into(), row: row(500), received: BTreeMap::from([("dc1".to_string(), 500)]) },
    ];
    for a in attacks {
        let resp = c.peer_call("dc1-n1", 21, forged(seq, now_hlc(0), a)).await;
        assert!(matches!(resp, PeerResponse::Replicate(Err(NodeError::BadRequest(_)))), "{resp:?}");
    }
    assert_eq!(c.must_converge(SECS(5)).await, before);
    let (_, inv) = c.get("dc1-n1", "/v1/inventory/sku").await;
    assert_eq!(inv["available"], 30, "{inv}");
    // A forged ask for everything: capped per ask, then nothing until the interval ends.
    let ask = || PeerRequest::AskStock { sku: "sku".into(), want: u64::MAX };
    let resp = c.peer_call("dc1-n1", 21, ask()).await;
    assert!(matches!(resp, PeerResponse::Granted(Ok(5))), "{resp:?}");
    let resp = c.peer_call("dc1-n1", 21, ask()).await;
    assert!(matches!(resp, PeerResponse::Granted(Ok(0))), "{resp:?}");
    let (_, inv) = c.get("dc1-n1", "/v1/inventory/sku").await;
    assert_eq!(inv["available"], 25, "{inv}");
    c.must_session("dc1-n1", "still-fine").await;
}
