//! Linearizable reads share read-index rounds. A round asks the shard's leader to confirm
//! its leadership with a quorum (openraft's `ensure_linearizable`: one heartbeat to every
//! follower) and to name its commit index. Every read that arrives while a round is in
//! flight waits for the next round, which starts after it arrived — so its index is still
//! one the leader confirmed after the read began — and takes that round's answer. Under
//! load, one round serves every read (and every cross-shard session check) that queued
//! behind it, instead of one heartbeat broadcast each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::oneshot;

use super::{NodeId, Raft};
use crate::error::NodeError;
use crate::transport::{PeerRequest, PeerResponse, Peers};

type Answer = Result<u64, NodeError>;

/// What a round needs: where the leader is and how to ask it.
pub struct Source {
    pub me: NodeId,
    pub raft: Raft,
    pub peers: Peers,
    pub request_timeout: Duration,
    /// How long to wait for a leader to be known.
    pub leader_wait: Duration,
    /// Rounds run, and the reads they answered.
    pub rounds: prometheus::IntCounter,
    pub reads: prometheus::IntCounter,
}

impl Source {
    /// The current leader, waiting up to `leader_wait` for one to appear.
    pub async fn wait_leader(&self) -> Result<NodeId, NodeError> {
        if let Some(l) = self.raft.metrics().borrow().current_leader {
            return Ok(l);
        }
        let m = self.raft.wait(Some(self.leader_wait)).metrics(|m| m.current_leader.is_some(), "leader").await;
        m.ok().and_then(|m| m.current_leader).ok_or(NodeError::NoLeader)
    }

    /// On the leader: confirms leadership with a quorum and names the index a read must
    /// wait for.
    pub async fn local(&self) -> Answer {
        let r = tokio::time::timeout(self.request_timeout, self.raft.ensure_linearizable()).await.map_err(|_| NodeError::Timeout)?;
        match r {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(NodeError::NotLeader(f.leader_id)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Err(NodeError::NoLeader),
            Err(RaftError::Fatal(f)) => Err(NodeError::Stopped(f.to_string())),
        }
    }

    /// Waits until this replica has applied `index`, and returns it. Once per round, not
    /// per read: a waiter on Raft's metrics wakes at every change of them.
    async fn applied(&self, index: u64) -> Answer {
        self.raft.wait(Some(self.request_timeout)).applied_index_at_least(Some(index), "read index").await.map_err(|_| NodeError::Timeout)?;
        Ok(index)
    }

    /// One round: here on the leader, else asked of it.
    async fn round(&self) -> Answer {
        let leader = self.wait_leader().await?;
        if leader == self.me {
            return self.local().await;
        }
        match self.peers.call(leader, PeerRequest::ReadIndex, Some(self.request_timeout)).await? {
            PeerResponse::ReadIndex(r) => r,
            other => Err(NodeError::Internal(format!("unexpected answer to read index: {other:?}"))),
        }
    }
}

#[derive(Default)]
struct Waiting {
    /// A round is in flight (its task runs).
    running: bool,
    /// Reads that arrived since the current round began: the next round's. One per read in
    /// flight, so bounded by what bounds those (the HTTP and peer connection caps).
    next: Vec<oneshot::Sender<Answer>>,
}

/// Shared read-index rounds for one shard.
pub struct ReadIndex {
    source: Arc<Source>,
    waiting: Arc<Mutex<Waiting>>,
}

impl ReadIndex {
    pub fn new(source: Source) -> Self {
        ReadIndex { source: Arc::new(source), waiting: Default::default() }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The index a linearizable read that begins now must see, once this replica has
    /// applied it.
    pub async fn get(&self) -> Answer {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut w = self.waiting.lock().expect("read index lock");
            w.next.push(tx);
            !std::mem::replace(&mut w.running, true)
        };
        if start {
            tokio::spawn(rounds(self.source.clone(), self.waiting.clone()));
        }
        rx.await.unwrap_or_else(|_| Err(NodeError::Internal("read-index round stopped".into())))
    }
}

/// Runs rounds while reads wait for one.
async fn rounds(source: Arc<Source>, waiting: Arc<Mutex<Waiting>>) {
    // Should this task end early (a panic), the next read starts a new one; the reads of
    // the batch in flight get an error as their senders drop.
    struct Unwinding(Option<Arc<Mutex<Waiting>>>);
    impl Drop for Unwinding {
        fn drop(&mut self) {
            if let Some(mut w) = self.0.as_ref().and_then(|w| w.lock().ok()) {
                w.running = false;
            }
        }
    }
    let mut guard = Unwinding(Some(waiting.clone()));
    loop {
        let batch = {
            let mut w = waiting.lock().expect("read index lock");
            if w.next.is_empty() {
                // Under the lock that readers take to queue: none is left waiting.
                w.running = false;
                guard.0 = None;
                return;
            }
            std::mem::take(&mut w.next)
        };
        source.rounds.inc();
        source.reads.inc_by(batch.len() as u64);
        match source.round().await {
            // The next round need not wait for this replica to catch up.
            Ok(index) => {
                let source = source.clone();
                tokio::spawn(async move { answer(batch, source.applied(index).await) });
            }
            Err(e) => answer(batch, Err(e)),
        }
    }
}

fn answer(batch: Vec<oneshot::Sender<Answer>>, answer: Answer) {
    for tx in batch {
        let _ = tx.send(answer.clone());
    }
}
