//! Checks on Raft requests from peers of this DC, made before openraft sees them: values
//! no honest node sends are refused, so openraft never trusts them. openraft 0.9 assumes
//! well-behaved peers: a term near `u64::MAX` overflowed at the next election (and again
//! after every restart, the term being durable), and a snapshot chunk at a huge offset
//! made it grow its receive buffer to that offset.
//!
//! The functions are pure (request, this node's current term, limits → verdict); the one
//! piece of state, the snapshot transfer in progress, is [`SnapshotTransfer`].

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::Vote;

use super::{LogId, NodeId, TypeConfig};
use crate::storage::snapshot_data::Verifier;

/// Log indexes beyond this are refused: no log grows to 2^62 entries, and openraft adds
/// to indexes (`index + 1`) without checking.
pub const LOG_INDEX_MAX: u64 = 1 << 62;

/// What the checks need from the node.
#[derive(Clone, Copy)]
pub struct Limits<'a> {
    /// This node's current term.
    pub current_term: u64,
    /// `raft.term_jump_max`.
    pub term_jump_max: u64,
    /// Whether a node id belongs to this DC in the cluster file (asked only of the rare
    /// membership entries and snapshots: a membership naming other nodes is refused).
    pub is_member: &'a dyn Fn(NodeId) -> bool,
}

fn check_members<'n>(mut ids: impl Iterator<Item = &'n NodeId>, l: Limits) -> Result<(), String> {
    match ids.find(|id| !(l.is_member)(**id)) {
        Some(id) => Err(format!("membership names node {id}, not of this DC")),
        None => Ok(()),
    }
}

fn check_vote(v: &Vote<NodeId>, from: NodeId, l: Limits) -> Result<(), String> {
    let term = v.leader_id.term;
    let max = l.current_term.saturating_add(l.term_jump_max);
    if term > max {
        return Err(format!("term {term} is more than {} beyond the current term {}", l.term_jump_max, l.current_term));
    }
    // An honest node campaigns and leads only as itself.
    if v.leader_id.node_id != from {
        return Err(format!("vote for node {} sent by node {from}", v.leader_id.node_id));
    }
    Ok(())
}

/// A log id inside a request: an index no log reaches, or a term beyond the request's own.
fn check_log_id(what: &str, id: &Option<LogId>, term: u64) -> Result<(), String> {
    let Some(id) = id else { return Ok(()) };
    if id.index > LOG_INDEX_MAX {
        return Err(format!("{what} index {} is beyond {LOG_INDEX_MAX}", id.index));
    }
    if id.leader_id.term > term {
        return Err(format!("{what} term {} is beyond the request's term {term}", id.leader_id.term));
    }
    Ok(())
}

pub fn check_vote_request(r: &VoteRequest<NodeId>, from: NodeId, l: Limits) -> Result<(), String> {
    check_vote(&r.vote, from, l)?;
    check_log_id("last_log_id", &r.last_log_id, r.vote.leader_id.term)
}

pub fn check_append_entries(r: &AppendEntriesRequest<TypeConfig>, from: NodeId, l: Limits) -> Result<(), String> {
    check_vote(&r.vote, from, l)?;
    let term = r.vote.leader_id.term;
    check_log_id("prev_log_id", &r.prev_log_id, term)?;
    check_log_id("leader_commit", &r.leader_commit, term)?;
    // Entries follow prev_log_id without gaps, and no entry is of a later term.
    // (prev_log_id's index is bounded above: no overflow.)
    let first = r.prev_log_id.map(|p| p.index + 1).unwrap_or(0);
    for (expect, e) in (first..).zip(&r.entries) {
        check_log_id("entry", &Some(e.log_id), term)?;
        if e.log_id.index != expect {
            return Err(format!("entry index {} where {expect} follows", e.log_id.index));
        }
        if let openraft::EntryPayload::Membership(m) = &e.payload {
            check_members(m.nodes().map(|(id, _)| id), l)?;
        }
    }
    Ok(())
}

/// The checks of an InstallSnapshot chunk that need no transfer state.
pub fn check_install_snapshot(r: &InstallSnapshotRequest<TypeConfig>, from: NodeId, l: Limits) -> Result<(), String> {
    check_vote(&r.vote, from, l)?;
    check_log_id("snapshot last_log_id", &r.meta.last_log_id, r.vote.leader_id.term)?;
    check_members(r.meta.last_membership.nodes().map(|(id, _)| id), l)
}

/// The one snapshot being received: its id, how many bytes were accepted, and their check
/// so far (openraft writes the bytes to the receive file; nothing here keeps them). One
/// transfer at a time; a chunk at offset 0 starts a new one.
#[derive(Default)]
pub struct SnapshotTransfer {
    current: Option<Transfer>,
    /// What `current` becomes once openraft takes the chunk just checked.
    checked: Option<Transfer>,
}

#[derive(Clone)]
struct Transfer {
    id: String,
    len: u64,
    check: Verifier,
}

/// Why a chunk is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkRefusal {
    /// Not where the transfer stands: the leader should start again at this offset (0
    /// when no transfer of that id is under way). openraft's own answer to this case.
    Offset { expect: u64 },
    /// Over the size limit, or not a snapshot this node can install (format, frames, and
    /// at the last chunk the checksum).
    Invalid(String),
}

impl SnapshotTransfer {
    /// Checks a chunk against the transfer: the next one in order, within `bytes_max`,
    /// its bytes well formed; the last chunk completes a snapshot whose checksum matches.
    /// Does not record the chunk: call [`SnapshotTransfer::accept`] once openraft has it.
    pub fn check(&mut self, r: &InstallSnapshotRequest<TypeConfig>, bytes_max: u64) -> Result<(), ChunkRefusal> {
        let mut t = match &self.current {
            _ if r.offset == 0 => Transfer { id: r.meta.snapshot_id.clone(), len: 0, check: Verifier::default() },
            Some(t) if t.id == r.meta.snapshot_id => t.clone(),
            _ => return Err(ChunkRefusal::Offset { expect: 0 }),
        };
        if r.offset != t.len {
            return Err(ChunkRefusal::Offset { expect: t.len });
        }
        t.len = r
            .offset
            .checked_add(r.data.len() as u64)
            .filter(|l| *l <= bytes_max)
            .ok_or_else(|| ChunkRefusal::Invalid(format!("snapshot over raft.snapshot_bytes_max ({bytes_max} bytes)")))?;
        t.check.feed(&r.data).map_err(ChunkRefusal::Invalid)?;
        if r.done {
            t.check.clone().finish().map_err(ChunkRefusal::Invalid)?;
        }
        self.checked = Some(t);
        Ok(())
    }

    /// Records the chunk last checked, which openraft accepted.
    pub fn accept(&mut self, r: &InstallSnapshotRequest<TypeConfig>) {
        let t = self.checked.take();
        self.current = if r.done { None } else { t };
    }

    /// Forgets a transfer (a chunk of it was refused).
    pub fn reset(&mut self) {
        self.current = None;
        self.checked = None;
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, SnapshotMeta};

    use super::*;

    const L: Limits = Limits { current_term: 5, term_jump_max: 100, is_member: &|id| id < 10 };

    fn vote(term: u64, node: NodeId) -> Vote<NodeId> {
        Vote::new(term, node)
    }
    fn log_id(term: u64, index: u64) -> LogId {
        openraft::LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn terms_beyond_the_jump_and_votes_for_others_are_refused() {
        assert!(check_vote_request(&VoteRequest::new(vote(105, 2), None), 2, L).is_ok());
        assert!(check_vote_request(&VoteRequest::new(vote(106, 2), None), 2, L).is_err());
        assert!(check_vote_request(&VoteRequest::new(vote(u64::MAX, 2), None), 2, L).is_err());
        assert!(check_vote_request(&VoteRequest::new(vote(6, 3), None), 2, L).is_err(), "campaigning for another node");
        assert!(check_vote_request(&VoteRequest::new(vote(6, 2), Some(log_id(6, u64::MAX))), 2, L).is_err());
        assert!(check_vote_request(&VoteRequest::new(vote(6, 2), Some(log_id(7, 3))), 2, L).is_err(), "a log term beyond the vote");
        // No overflow at the top of the range.
        let top = Limits { current_term: u64::MAX - 1, ..L };
        assert!(check_vote_request(&VoteRequest::new(vote(u64::MAX, 2), None), 2, top).is_ok());
    }

    fn append(term: u64, prev: Option<LogId>, entries: &[LogId], commit: Option<LogId>) -> AppendEntriesRequest<TypeConfig> {
        let entries = entries.iter().map(|l| Entry { log_id: *l, payload: EntryPayload::Blank }).collect();
        AppendEntriesRequest { vote: vote(term, 2), prev_log_id: prev, entries, leader_commit: commit }
    }

    #[test]
    fn append_entries_with_impossible_log_ids_are_refused() {
        assert!(check_append_entries(&append(5, Some(log_id(5, 9)), &[log_id(5, 10), log_id(5, 11)], Some(log_id(5, 9))), 2, L).is_ok());
        assert!(check_append_entries(&append(5, None, &[log_id(5, 0)], None), 2, L).is_ok());
        assert!(check_append_entries(&append(u64::MAX, None, &[], None), 2, L).is_err());
        assert!(check_append_entries(&append(5, None, &[], Some(log_id(5, u64::MAX))), 2, L).is_err(), "leader_commit near u64::MAX");
        assert!(check_append_entries(&append(5, Some(log_id(5, u64::MAX)), &[], None), 2, L).is_err());
        assert!(check_append_entries(&append(5, Some(log_id(5, 9)), &[log_id(5, 12)], None), 2, L).is_err(), "a gap");
        assert!(check_append_entries(&append(5, Some(log_id(5, 9)), &[log_id(6, 10)], None), 2, L).is_err(), "an entry of a later term");
        let members = |ids: &[NodeId]| {
            let nodes: std::collections::BTreeMap<NodeId, openraft::BasicNode> = ids.iter().map(|i| (*i, openraft::BasicNode::default())).collect();
            let m = openraft::Membership::new(vec![nodes.keys().copied().collect()], nodes);
            AppendEntriesRequest {
                vote: vote(5, 2),
                prev_log_id: None,
                entries: vec![Entry { log_id: log_id(5, 0), payload: EntryPayload::Membership(m) }],
                leader_commit: None,
            }
        };
        assert!(check_append_entries(&members(&[1, 2, 3]), 2, L).is_ok());
        assert!(check_append_entries(&members(&[1, 2, 66]), 2, L).is_err(), "a node not of this DC");
    }

    fn chunk(id: &str, offset: u64, data: &[u8], done: bool) -> InstallSnapshotRequest<TypeConfig> {
        let meta = SnapshotMeta { last_log_id: Some(log_id(5, 3)), last_membership: Default::default(), snapshot_id: id.into() };
        InstallSnapshotRequest { vote: vote(5, 2), meta, offset, data: data.to_vec(), done }
    }

    /// Format-3 snapshot data of a few records.
    fn snapshot_data() -> Vec<u8> {
        let mut w = crate::storage::snapshot_data::Writer::new(std::io::Cursor::new(Vec::new())).unwrap();
        for i in 0..20u8 {
            w.put(&[b'k', i], &[i; 30]).unwrap();
        }
        w.finish().unwrap().0.into_inner()
    }

    #[test]
    fn snapshot_chunks_must_come_in_order_within_the_size_limit() {
        let data = snapshot_data();
        let (a, b) = data.split_at(100);
        let n = data.len() as u64;
        let mut t = SnapshotTransfer::default();
        assert!(check_install_snapshot(&chunk("a", 0, b"", false), 2, L).is_ok());
        assert_eq!(t.check(&chunk("a", 1 << 40, b"x", false), n), Err(ChunkRefusal::Offset { expect: 0 }), "no transfer under way");
        assert!(t.check(&chunk("a", 0, a, false), n).is_ok());
        t.accept(&chunk("a", 0, a, false));
        assert_eq!(t.check(&chunk("a", 1 << 40, b"x", false), n), Err(ChunkRefusal::Offset { expect: 100 }));
        assert_eq!(t.check(&chunk("a", 2, b"x", false), n), Err(ChunkRefusal::Offset { expect: 100 }), "a resent chunk");
        assert_eq!(t.check(&chunk("b", 100, b"x", false), n), Err(ChunkRefusal::Offset { expect: 0 }), "another snapshot");
        assert!(matches!(t.check(&chunk("a", 100, b, false), n - 1), Err(ChunkRefusal::Invalid(_))), "over the limit");
        // The last chunk completes the data: it must check out whole.
        let mut bad = b.to_vec();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(t.check(&chunk("a", 100, &bad, true), n), Err(ChunkRefusal::Invalid(_))), "checksum mismatch");
        assert!(matches!(t.check(&chunk("a", 100, &b[..b.len() - 1], true), n), Err(ChunkRefusal::Invalid(_))), "cut short");
        assert!(t.check(&chunk("a", 100, b, true), n).is_ok());
        t.accept(&chunk("a", 100, b, true));
        assert_eq!(t.check(&chunk("a", n, b"x", false), n), Err(ChunkRefusal::Offset { expect: 0 }), "a finished transfer is gone");
        // A new transfer (or a restart of one) begins at 0, and must start like a snapshot.
        assert!(t.check(&chunk("c", 0, a, false), n).is_ok());
        assert!(matches!(t.check(&chunk("d", 0, &[7; 60], false), n), Err(ChunkRefusal::Invalid(_))), "not a snapshot format");
        assert!(check_install_snapshot(&chunk("a", 0, b"", false), 3, L).is_err(), "sent as another node");
    }
}
