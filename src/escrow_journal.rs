//! Test hook (`--enable-test-hooks`): a journal of every change to this DC's own stock
//! that no client call made — units granted to another DC, units received from one —
//! each with the Raft entry that made it, when the leader proposed that entry and when
//! each node applied it. (A duplicate order that merge cancels also releases units by
//! itself; the checker models those from the history, where the duplicate shows.)
//!
//! The chaos checker's per-(DC, SKU) linearizability model sees client calls only; with
//! rebalancing on, stock also moves between DCs by itself. From this journal (read from
//! every node after a run) the checker places each such move in a window: not before its
//! entry was proposed, not after the first node applied it.
//!
//! Records are JSON lines appended to `escrow-journal.jsonl` in the data dir, one `write`
//! each, so a SIGKILLed node keeps what it wrote. Times are `CLOCK_MONOTONIC`
//! nanoseconds, one clock for every process on the machine (and in its containers), which
//! the chaos runner converts to its own. The file stops growing at [`BYTES_MAX`]; a
//! truncated journal says so, and the checker then treats what it lacks as unknown.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::raft::LogId;

/// The journal's size bound: about 100,000 records.
pub const BYTES_MAX: u64 = 16 << 20;

pub const FILE_NAME: &str = "escrow-journal.jsonl";

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// This node, leading `shard`, proposed the entry (`term`, `index`) at `at_ns`.
    Proposed { shard: u16, term: u64, index: u64, at_ns: u64 },
    /// This node applied the entry, whose `seq`-th move (from 0) changed this DC's
    /// `available` of `sku` by `delta`.
    Applied { shard: u16, term: u64, index: u64, seq: u32, sku: String, delta: i64, at_ns: u64 },
    /// The bound was reached: records after this one were dropped.
    Truncated { at_ns: u64 },
}

struct Journal {
    path: PathBuf,
    /// The open file and its length; `None` once stopped (full, or a write failed).
    file: Mutex<Option<(std::fs::File, u64)>>,
}

static JOURNAL: OnceLock<Journal> = OnceLock::new();

/// Starts the journal in `data_dir` (once per process; a node is a process).
pub fn enable(data_dir: &Path) -> std::io::Result<()> {
    let path = data_dir.join(FILE_NAME);
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let len = file.metadata()?.len();
    let _ = JOURNAL.set(Journal { path, file: Mutex::new(Some((file, len))) });
    Ok(())
}

pub fn enabled() -> bool {
    JOURNAL.get().is_some()
}

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; CLOCK_MONOTONIC
    // is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Whether a request changes some DC's stock without a client call.
pub fn moves_stock(cmd: &crate::domain::Command) -> bool {
    use crate::domain::Command;
    match cmd {
        Command::Grant { .. } | Command::GrantAboveReserve { .. } | Command::ApplyRemote { .. } | Command::InstallRemote { .. } => true,
        Command::Batch { requests } => requests.iter().any(|r| moves_stock(&r.cmd)),
        _ => false,
    }
}

pub fn proposed(shard: u16, log_id: &LogId, at_ns: u64) {
    write(&[Record::Proposed { shard, term: log_id.leader_id.term, index: log_id.index, at_ns }]);
}

/// The moves one applied entry made, in the order it made them, as (SKU, change of this
/// DC's `available`). Each keeps its place in the entry (`seq`): an entry of many
/// requests may move one SKU more than once, with a client's request between the moves.
pub fn applied(shard: u16, log_id: &LogId, moves: &[(String, i64)]) {
    let at_ns = monotonic_ns();
    let (term, index) = (log_id.leader_id.term, log_id.index);
    let records: Vec<Record> =
        (0u32..).zip(moves).map(|(seq, (sku, delta))| Record::Applied { shard, term, index, seq, sku: sku.clone(), delta: *delta, at_ns }).collect();
    write(&records);
}

fn write(records: &[Record]) {
    let Some(j) = JOURNAL.get() else { return };
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("a journal record serialises"));
        text.push('\n');
    }
    let mut guard = j.file.lock().expect("journal lock");
    let Some((file, len)) = guard.as_mut() else { return };
    let full = len.saturating_add(text.len() as u64) > BYTES_MAX;
    if full {
        text = serde_json::to_string(&Record::Truncated { at_ns: monotonic_ns() }).expect("serialises") + "\n";
    }
    // One write per call: a whole line or, if the node dies inside it, a torn last line
    // that the reader skips.
    match file.write_all(text.as_bytes()) {
        Err(e) => {
            tracing::warn!(error = %e, "escrow journal: write failed; journal stopped");
            *guard = None;
        }
        Ok(()) if full => *guard = None,
        Ok(()) => *len = len.saturating_add(text.len() as u64),
    }
}

/// The journal as written so far: its records, in order (a torn last line is skipped).
pub fn read() -> std::io::Result<Vec<Record>> {
    let Some(j) = JOURNAL.get() else { return Ok(vec![]) };
    let text = std::fs::read_to_string(&j.path)?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}
