//! Who may speak on the peer port. Every attack that once worked with hand-built frames
//! is sent again: without credentials (plaintext, a certificate of another CA, an expired
//! certificate, a certificate naming a node in the wrong DC, an admin certificate) the
//! connection is refused before a frame is read; with a valid certificate of another DC,
//! Raft and admin traffic are refused. In every case the DC's digest and term stay as they
//! were and the node keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agora::certs::{self, Role, Validity};
use agora::domain::{Command, Request, StockRow};
use agora::raft::MembershipOp;
use agora::transport::tls::{PeerTls, Security};
use agora::transport::{PeerRequest, PeerResponse};
use openraft::{LogId, SnapshotMeta, StoredMembership, Vote};

use crate::harness::{Options, TestCluster};

/// The requests that took over a DC when identities came from the frame.
fn attacks(target_leader: u64) -> Vec<(&'static str, PeerRequest)> {
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    let huge = Vote::new_committed(u64::MAX - 1, target_leader);
    let restock = Request::new(Command::Restock { sku: "forged".into(), add: 1_000_000, dc: "dc1".into(), hlc: 1 }, None);
    let grant = StockRow { stocked: 0, sold: 0, released: 0, sent: [("dc1".to_string(), u64::MAX / 2)].into() };
    let events =
        vec![agora::domain::Event { seq: 1, origin: "dc2".into(), hlc: u64::MAX, change: agora::domain::Change::Stock { sku: "forged".into(), row: grant } }];
    vec![
        (
            "append_entries with a huge term",
            PeerRequest::AppendEntries(AppendEntriesRequest { vote: huge, prev_log_id: None, entries: vec![], leader_commit: None }),
        ),
        ("vote with a huge term", PeerRequest::Vote(VoteRequest { vote: Vote::new(u64::MAX - 1, target_leader), last_log_id: None })),
        (
            "install_snapshot at a huge offset",
            PeerRequest::InstallSnapshot(InstallSnapshotRequest {
                vote: huge,
                meta: SnapshotMeta {
                    last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, target_leader), 1 << 30)),
                    last_membership: StoredMembership::default(),
                    snapshot_id: "forged".into(),
                },
                offset: 1 << 40,
                data: vec![1],
                done: false,
            }),
        ),
        ("submit a restock", PeerRequest::Submit(restock)),
        ("remove a voter", PeerRequest::Membership(MembershipOp::Remove(12))),
        ("replicate a grant of unlimited stock", PeerRequest::Replicate { origin: "dc2".into(), events }),
        ("ask for all the stock", PeerRequest::AskStock { sku: "sku-a".into(), want: u64::MAX }),
    ]
}

/// A copy of the cluster's certs directory, to forge certificates in without touching
/// the real ones.
fn forge_dir(c: &TestCluster, label: &str) -> PathBuf {
    let dir = c.dir.path().join(format!("forged-{label}"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(c.certs_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn tls_from(dir: &Path, cert: &str) -> Security {
    Security::Tls(std::sync::Arc::new(PeerTls::load(dir, cert).expect("load forged certificate")))
}

/// Term and digest of the DC, for before/after comparisons.
async fn fingerprint(c: &TestCluster, node: &str) -> (u64, String) {
    let digest = c.must_converge(Duration::from_secs(10)).await;
    let (_, s) = c.get(node, "/v1/cluster/status").await;
    (s["term"].as_u64().expect("term"), digest)
}

async fn must_refuse_connection(c: &TestCluster, to: &str, who: &str, security: &Security) {
    for (what, req) in attacks(TestCluster::id(to)) {
        let r = c.peer_call_secured(to, security, &req).await;
        assert!(r.is_err(), "{who}: '{what}' was answered: {r:?}");
    }
}

#[tokio::test]
async fn peers_without_valid_credentials_are_refused_before_any_frame() {
    let c = TestCluster::start(81, Options { dcs: 2, nodes: 3, ..Options::default() }).await;
    c.must_restock("dc1-n1", "sku-a", 50).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let before = fingerprint(&c, &leader).await;
    // Control: the same client path with a valid certificate of the DC is answered, so a
    // refusal below is the node's, not a client that never reached it.
    let ok = c.peer_call_with(&leader, "dc1-n2", &PeerRequest::Probe).await;
    assert!(matches!(ok, Ok(PeerResponse::Probe(_))), "a valid peer was not answered: {ok:?}");

    // Plaintext: a hello naming a real node of the DC.
    must_refuse_connection(&c, &leader, "plaintext", &Security::Plaintext { me: 12 }).await;

    // A certificate for a real node name from a CA the cluster does not trust (the client
    // trusts the real CA, so the handshake gets as far as the client certificate).
    let other = c.dir.path().join("other-ca");
    let config = agora::config::ClusterConfig::from_toml(&std::fs::read_to_string(c.dir.path().join("cluster.toml")).unwrap(), "test").unwrap();
    certs::create(&other, &config, false, Validity::default()).unwrap();
    std::fs::copy(c.certs_dir().join("ca.pem"), other.join("ca.pem")).unwrap();
    must_refuse_connection(&c, &leader, "another CA", &tls_from(&other, "dc1-n2")).await;

    // The cluster's CA, but expired.
    let expired = forge_dir(&c, "expired");
    certs::issue_extra(&expired, &Role::Node { dc: "dc1".into(), name: "dc1-n2".into() }, Validity { not_before_days: 30, days: -1 }).unwrap();
    must_refuse_connection(&c, &leader, "expired", &tls_from(&expired, "dc1-n2")).await;

    // The cluster's CA, naming dc2's node as a member of dc1.
    let wrong_dc = forge_dir(&c, "wrong-dc");
    certs::issue_extra(&wrong_dc, &Role::Node { dc: "dc1".into(), name: "dc2-n1".into() }, Validity::default()).unwrap();
    must_refuse_connection(&c, &leader, "wrong DC", &tls_from(&wrong_dc, "dc2-n1")).await;

    // An admin's certificate is not a node's.
    must_refuse_connection(&c, &leader, "admin role", &tls_from(&c.certs_dir(), "admin")).await;

    assert_eq!(fingerprint(&c, &leader).await, before, "term or state changed");
    c.must_session(&leader, "still-serving").await;
}

/// A cancel forwarded by another DC's node names the order and must carry the session
/// that placed it: a forged one (right order id, another session) cancels nothing.
#[tokio::test]
async fn a_forwarded_cancel_without_the_buyers_session_cancels_nothing() {
    use serde_json::json;
    let c = TestCluster::start(85, Options { dcs: 2, nodes: 1, ..Options::default() }).await;
    let buyer = c.must_session("dc1-n1", "buyer").await;
    c.must_restock("dc1-n1", "sku-c", 5).await;
    let (code, order) = c.post("dc1-n1", "/v1/orders", json!({"session": buyer, "sku": "sku-c", "qty": 1})).await;
    assert_eq!(code, 201, "{order}");
    let id = order["id"].as_str().unwrap().to_string();
    let mallory = c.must_session("dc2-n1", "mallory").await;
    c.must_converge(Duration::from_secs(10)).await;
    for session in [mallory.as_str(), "no-such-session"] {
        let cancel = Request::new(Command::CancelOrder { id: id.clone(), dc: "dc1".into(), session: session.into(), hlc: 1 }, None);
        let resp = c.peer_call("dc1-n1", 21, PeerRequest::Submit(cancel)).await;
        assert!(
            !matches!(resp, PeerResponse::Submit(Ok(agora::domain::Outcome::Order(ref o))) if o.status == agora::domain::OrderStatus::Cancelled),
            "{resp:?}"
        );
    }
    let (_, o) = c.get("dc1-n1", &format!("/v1/orders/{id}")).await;
    assert_eq!(o["status"], "placed", "{o}");
}

#[tokio::test]
async fn a_node_of_another_dc_cannot_speak_raft_or_admin_to_this_dc() {
    let c = TestCluster::start(82, Options { dcs: 2, nodes: 3, ..Options::default() }).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let before = fingerprint(&c, &leader).await;
    // dc2-n1's own, valid certificate.
    for (what, req) in attacks(TestCluster::id(&leader)) {
        if matches!(req, PeerRequest::Replicate { .. } | PeerRequest::AskStock { .. }) {
            continue; // cross-DC requests: dc2 may send these (their values are checked elsewhere)
        }
        let resp = c.peer_call_with(&leader, "dc2-n1", &req).await.expect("dc2's node is authenticated");
        assert!(matches!(resp, PeerResponse::Refused(_)), "'{what}' from dc2 was not refused: {resp:?}");
    }
    assert_eq!(fingerprint(&c, &leader).await, before, "term or state changed");
    c.must_session(&leader, "still-serving").await;
}
