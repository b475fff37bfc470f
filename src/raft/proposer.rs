//! The leader's proposal batcher: many clients' requests in one Raft entry.
//!
//! openraft 0.9 appends each client write as its own entry and waits, inside its core
//! loop, until that append is durable before it takes the next message
//! (`RaftCore::append_to_log` awaits the flush). One request per entry therefore caps a
//! DC at one fsync per write. The proposer keeps at most `inflight_max` entries between
//! openraft and their application; the requests that arrive meanwhile wait here and go
//! out together as one [`Command::Batch`]. Alone, a request is proposed at once and as
//! itself, so a quiet node pays nothing for it.
//!
//! Order is kept: requests leave in the order they were queued, and entries reach the
//! log in the order they leave, so the per-entity order the actors establish holds.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::{NodeId, Raft};
use crate::domain::{Command, Outcome, Request};
use crate::error::NodeError;

type Done = Box<dyn FnOnce(Result<Outcome, NodeError>) + Send>;

struct Pending {
    req: Request,
    done: Done,
}

/// Queue in front of `client_write`; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    /// While true nothing is proposed: requests wait in the queue (a leadership handover).
    held: Arc<watch::Sender<bool>>,
    /// One permit per entry that may be out between openraft and its answer.
    permits: Arc<Semaphore>,
    inflight_max: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct ProposerLimits {
    /// Entries proposed and not yet applied; while all are out, requests queue.
    pub inflight_max: usize,
    /// Requests in one entry at most.
    pub batch_len_max: usize,
    /// Requests waiting for an entry at most; past that a request is refused at once
    /// (`Overloaded`, 503): with no quorum nothing leaves the queue.
    pub queue_len_max: usize,
    /// How long a request waits for its entry to be applied.
    pub timeout: Duration,
}

impl Proposer {
    /// Starts the batching task; it ends when the last `Proposer` is dropped.
    /// `shard`: the group's number, which the escrow journal test hook names.
    pub fn start(raft: Raft, shard: u16, limits: ProposerLimits) -> Self {
        let (proposer, rx) = Self::queue(limits.queue_len_max, limits.inflight_max);
        tokio::spawn(run(raft, shard, rx, proposer.held.subscribe(), proposer.permits.clone(), limits));
        proposer
    }

    fn queue(len_max: usize, inflight_max: usize) -> (Self, mpsc::Receiver<Pending>) {
        let (tx, rx) = mpsc::channel(len_max.max(1));
        // `drained` takes every permit at once, which tokio counts in a u32: a larger bound
        // (no config needs one) is held to u32::MAX, below `Semaphore::MAX_PERMITS`.
        let inflight_max = u32::try_from(inflight_max.max(1)).unwrap_or(u32::MAX);
        let permits = Arc::new(Semaphore::new(inflight_max as usize));
        (Proposer { tx, held: Arc::new(watch::channel(false).0), permits, inflight_max }, rx)
    }

    /// Waits up to `within` until no proposed entry is still waiting for its answer (a
    /// node about to stop: entries it proposed are answered once applied here).
    pub async fn drained(&self, within: Duration) {
        if let Ok(Ok(all)) = tokio::time::timeout(within, self.permits.acquire_many(self.inflight_max)).await {
            drop(all);
        }
    }

    /// Holds proposals back (`true`) or lets them go again. Held requests keep their
    /// place; once released they go to Raft as usual (and, if this node no longer leads
    /// by then, are answered `NotLeader` for the caller to go to the new leader).
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Queues `req` behind every request queued before it; `done` gets its outcome once
    /// the entry holding it is applied (or fails), or at once when the queue is full.
    pub fn propose(&self, req: Request, done: impl FnOnce(Result<Outcome, NodeError>) + Send + 'static) {
        match self.tx.try_send(Pending { req, done: Box::new(done) }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(p)) => (p.done)(Err(NodeError::Overloaded("too many writes waiting for a Raft entry".into()))),
            Err(mpsc::error::TrySendError::Closed(p)) => (p.done)(Err(NodeError::Internal("proposer stopped".into()))),
        }
    }

    /// Proposes `req` and waits for its outcome.
    pub async fn write(&self, req: Request) -> Result<Outcome, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.propose(req, move |r| {
            let _ = tx.send(r);
        });
        rx.await.unwrap_or_else(|_| Err(NodeError::Internal("proposer stopped".into())))
    }
}

async fn run(raft: Raft, shard: u16, mut rx: mpsc::Receiver<Pending>, mut held: watch::Receiver<bool>, permits: Arc<Semaphore>, limits: ProposerLimits) {
    loop {
        // Take the permit first: while every entry is out, requests pile up in `rx` and
        // the next entry carries all of them.
        let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
        let Some(first) = rx.recv().await else { return };
        let was_held = *held.borrow();
        if held.wait_for(|h| !h).await.is_err() {
            return;
        }
        let mut batch = vec![first];
        while batch.len() < limits.batch_len_max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // Held through a handover: leadership has moved, so the requests go back to be
        // sent to the new leader at once, rather than into this node's Raft (which may be
        // stopping: a graceful stop hands over first).
        if was_held {
            let (state, leader) = {
                let m = raft.metrics();
                let m = m.borrow();
                (m.state, m.current_leader)
            };
            if state != openraft::ServerState::Leader {
                answer_all(batch.into_iter().map(|p| p.done).collect(), Err(NodeError::NotLeader(leader)));
                continue;
            }
        }
        propose(&raft, shard, batch, permit, limits.timeout).await;
    }
}

/// Hands one entry to openraft (in order, before the next) and waits for it off the loop.
async fn propose(raft: &Raft, shard: u16, batch: Vec<Pending>, permit: OwnedSemaphorePermit, timeout: Duration) {
    let (mut requests, dones): (Vec<Request>, Vec<Done>) = batch.into_iter().map(|p| (p.req, p.done)).unzip();
    let entry = if requests.len() == 1 { requests.pop().expect("one request") } else { Request::new(Command::Batch { requests }, None) };
    // The escrow journal test hook: when an entry that moves stock by itself was proposed.
    let journal = (crate::escrow_journal::enabled() && crate::escrow_journal::moves_stock(&entry.cmd)).then(crate::escrow_journal::monotonic_ns);
    let rx = match raft.client_write_ff(entry).await {
        Ok(rx) => rx,
        Err(fatal) => return answer_all(dones, Err(NodeError::Stopped(fatal.to_string()))),
    };
    tokio::spawn(async move {
        let r = match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(NodeError::Timeout),
            // Raft stopped with the entry in hand: it may have been replicated and committed.
            Ok(Err(_)) => Err(NodeError::Lost("this node's raft group, which stopped".into())),
            Ok(Ok(r)) => r
                .inspect(|resp| {
                    if let Some(at_ns) = journal {
                        crate::escrow_journal::proposed(shard, &resp.log_id, at_ns);
                    }
                })
                .map(|resp| resp.data)
                .map_err(write_error),
        };
        drop(permit);
        answer(dones, r);
    });
}

/// Splits an entry's outcome among its requests.
fn answer(mut dones: Vec<Done>, r: Result<Outcome, NodeError>) {
    match r {
        Ok(Outcome::Batch(outcomes)) if outcomes.len() == dones.len() => {
            for (done, o) in dones.into_iter().zip(outcomes) {
                done(Ok(o));
            }
        }
        Ok(o) if dones.len() == 1 => (dones.pop().expect("one waiter"))(Ok(o)),
        Ok(o) => {
            let msg = format!("an entry of {} requests was answered with {o:?}", dones.len());
            answer_all(dones, Err(NodeError::Internal(msg)))
        }
        Err(e) => answer_all(dones, Err(e)),
    }
}

fn answer_all(dones: Vec<Done>, r: Result<Outcome, NodeError>) {
    for done in dones {
        done(r.clone());
    }
}

fn write_error(e: ClientWriteError<NodeId, openraft::BasicNode>) -> NodeError {
    match e {
        ClientWriteError::ForwardToLeader(f) => NodeError::NotLeader(f.leader_id),
        ClientWriteError::ChangeMembershipError(e) => NodeError::Internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Command;

    fn req(i: u32) -> Request {
        Request::new(Command::CancelOrder { id: format!("dc1-{i}"), dc: "dc1".into(), session: "s".into(), hlc: 1 }, None)
    }

    /// Nothing drains the queue (as when the DC has no quorum): once it is full, the next
    /// write is answered `Overloaded` at once instead of waiting in memory.
    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let (p, mut rx) = Proposer::queue(3, 1);
        let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for i in 0..5 {
            let answered = answered.clone();
            p.propose(req(i), move |r| answered.lock().unwrap().push((i, r)));
        }
        let answered = answered.lock().unwrap();
        assert_eq!(answered.len(), 2, "{answered:?}");
        for (i, r) in answered.iter() {
            assert!(*i >= 3 && matches!(r, Err(NodeError::Overloaded(_))), "{i}: {r:?}");
        }
        let e = crate::api::ApiError::from(NodeError::Overloaded("x".into()));
        assert_eq!(e.status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        // The three queued wait, in order.
        for i in 0..3 {
            assert!(matches!(&rx.try_recv().unwrap().req.cmd, Command::CancelOrder { id, .. } if *id == format!("dc1-{i}")));
        }
    }
}
