//! Leadership handed over: on an operator's request, and by a leader stopped gracefully
//! (SIGTERM). Writes keep flowing through another node meanwhile, none refused, and each
//! handover costs exactly one election.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;

/// Writes sessions through `via` until `stop`; returns (acknowledged, refused, slowest).
async fn write_until(c: &TestCluster, via: &str, stop: &AtomicBool) -> (u32, Vec<String>, Duration) {
    let (mut ok, mut refused, mut slowest) = (0, Vec::new(), Duration::ZERO);
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let started = Instant::now();
        let (code, v) = c.post(via, "/v1/sessions", json!({"user": format!("writer{i}")})).await;
        slowest = slowest.max(started.elapsed());
        if code == 201 {
            ok += 1;
        } else {
            refused.push(format!("{code} {v}"));
        }
    }
    (ok, refused, slowest)
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) == Some("Z"),
        Err(_) => true,
    }
}

async fn term_of(c: &TestCluster, node: &str) -> u64 {
    c.status(node).await.expect("status")["term"].as_u64().expect("term")
}

#[tokio::test]
async fn leadership_is_handed_over_on_request_and_before_a_graceful_stop() {
    let mut c = TestCluster::start(146, Options::default()).await;
    let leader = c.must_leader(Duration::from_secs(10)).await;
    let others: Vec<String> = c.names.iter().filter(|n| **n != leader).cloned().collect();
    let (to, via) = (others[0].clone(), others[1].clone());
    c.must_session(&via, "warm-up").await;
    let term = term_of(&c, &leader).await;

    // On request: `to` leads afterwards, one term later, and no write was refused.
    let stop = AtomicBool::new(false);
    let handover = async {
        let (code, v) = c.request(reqwest::Method::POST, &leader, "/v1/admin/leader", Some(json!({"to": to})), None).await;
        stop.store(true, Ordering::Relaxed);
        (code, v)
    };
    let ((code, v), (ok, refused, slowest)) = tokio::join!(handover, write_until(&c, &via, &stop));
    assert_eq!((code, v["leader"].as_str()), (200, Some(to.as_str())), "{v}");
    assert!(refused.is_empty(), "writes refused during the handover: {refused:?}");
    assert!(ok > 0, "writes went on during the handover");
    eprintln!("handover on request: {ok} writes, slowest {slowest:?}");
    let s = c.status(&to).await.expect("status");
    assert_eq!((s["role"].as_str(), s["term"].as_u64()), (Some("leader"), Some(term + 1)), "one election: {s}");

    // Only the shard's leader may hand over, and ask a node to campaign: a follower's
    // requests are refused, and no election follows.
    let (code, _) = c.request(reqwest::Method::POST, &leader, "/v1/admin/leader", Some(json!({"to": via})), None).await;
    assert_ne!(code, 200, "a follower cannot hand over what it does not lead");
    let resp = c.peer_call(&via, TestCluster::id(&leader), agora::transport::PeerRequest::Campaign).await;
    assert!(matches!(resp, agora::transport::PeerResponse::Campaign(Err(_))), "{resp:?}");
    assert_eq!(term_of(&c, &via).await, term + 1, "no election");

    // A graceful stop of the new leader hands over first: again one election, no refusal.
    let stop = AtomicBool::new(false);
    let pid = c.pid(&to).expect("pid of the leader") as libc::pid_t;
    let stopping = async {
        // SAFETY: a signal to a child process the harness started; reaped by `stop` below.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        must_eventually(Duration::from_secs(10), "the stopped leader's process exits", || async { exited(pid).then_some(()) }).await;
        // Handed over before it exited: the others already follow a new leader (without
        // the handover they would still name the stopped one, for a lease at least).
        let s = c.status(&via).await.expect("status");
        stop.store(true, Ordering::Relaxed);
        (s["leader"].as_str().map(String::from), s["term"].as_u64())
    };
    let ((new_leader, new_term), (ok, refused, slowest)) = tokio::join!(stopping, write_until(&c, &via, &stop));
    c.stop(&to);
    assert!(refused.is_empty(), "writes refused while the leader stopped: {refused:?}");
    eprintln!("graceful stop of the leader: {ok} writes, slowest {slowest:?}, new leader {new_leader:?}");
    assert!(new_leader.is_some() && new_leader.as_deref() != Some(to.as_str()), "a new leader when the old one exits: {new_leader:?}");
    assert_eq!(new_term, Some(term + 2), "one election for the stop");
}
