//! Linearizability of one key's operations: the Wing–Gong search with Lowe's
//! just-in-time linearization and memoisation, as in Porcupine.
//!
//! The model is one DC's `available` units of one SKU, plus which idempotency groups have
//! already taken effect (a keyed retry gets the first result back and changes nothing).
//! Operations with an unknown outcome have no return time: they may take effect at any
//! point after their call, or never. "Never" needs no search: an operation without effect
//! can always be placed last, so the search succeeds once every *completed* operation is
//! linearized.
//!
//! The search is exponential in the number of concurrent operations, so it memoises
//! (linearized set, state) pairs, checks a deadline every few steps and bounds its cache;
//! hitting either bound is reported as [`Verdict::TimedOut`], never as a verdict on the
//! history.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One operation of one key, reduced to what the model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinOp {
    /// The history record's id.
    pub id: u64,
    pub invoke_ns: u64,
    /// `None`: outcome unknown, it may take effect any time after `invoke_ns`, or never.
    pub return_ns: Option<u64>,
    pub step: Step,
}

/// What an operation does to the model, with the result it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `available += add`; the reported `available_after` (if known) must be the new value.
    Restock { add: u64, available_after: Option<u64> },
    /// A placed order: needs `available >= qty`, then `available -= qty`.
    Order { qty: u64, group: Option<usize> },
    /// A definite sold-out answer: needs `available < qty` and `available == reported`.
    SoldOut { qty: u64, available: u64, group: Option<usize> },
    /// A cancel of an order of this DC: `available += qty`.
    Cancel { qty: u64, group: Option<usize> },
    /// A linearizable read: `available == reported`.
    Read { available: u64 },
}

impl Step {
    fn group(&self) -> Option<usize> {
        match self {
            Step::Order { group, .. } | Step::SoldOut { group, .. } | Step::Cancel { group, .. } => *group,
            _ => None,
        }
    }
}

/// The model state. `groups` is a bitset over the key's idempotency groups (keyed orders
/// retried, or one order cancelled more than once): set once one of them took effect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    available: u64,
    groups: Vec<u64>,
}

impl State {
    fn has(&self, g: Option<usize>) -> bool {
        g.is_some_and(|g| self.groups[g / 64] & (1 << (g % 64)) != 0)
    }
    fn with(&self, available: u64, g: Option<usize>) -> State {
        let mut s = State { available, groups: self.groups.clone() };
        if let Some(g) = g {
            s.groups[g / 64] |= 1 << (g % 64);
        }
        s
    }
}

/// The states an operation can lead to from `s` (none: it cannot be linearized here).
/// A pending operation has no result to check, and "no effect" is covered by never
/// linearizing it, so only its effects are listed.
fn successors(step: &Step, s: &State, pending: bool) -> Vec<State> {
    let g = step.group();
    let replay = s.has(g);
    match step {
        Step::Restock { add, available_after } => match s.available.checked_add(*add) {
            Some(new) if pending || *available_after == Some(new) => vec![s.with(new, None)],
            _ => vec![],
        },
        Step::Read { available } => (*available == s.available).then(|| s.clone()).into_iter().collect(),
        // A retry of a group that already took effect returns the first result unchanged.
        Step::Order { .. } | Step::SoldOut { .. } | Step::Cancel { .. } if replay => {
            if pending {
                vec![]
            } else {
                vec![s.clone()]
            }
        }
        Step::Order { qty, .. } => {
            let mut out: Vec<State> = s.available.checked_sub(*qty).map(|left| s.with(left, g)).into_iter().collect();
            // A pending keyed order may have been answered sold_out, which later retries replay.
            if pending && g.is_some() && s.available < *qty {
                out.push(s.with(s.available, g));
            }
            out
        }
        Step::SoldOut { qty, available, .. } => (s.available < *qty && *available == s.available).then(|| s.with(s.available, g)).into_iter().collect(),
        Step::Cancel { qty, .. } => s.available.checked_add(*qty).map(|new| s.with(new, g)).into_iter().collect(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    Illegal,
    TimedOut,
}

/// Bounds of one search.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub deadline: Instant,
    /// Memoised (set, state) pairs kept at most; each costs about `ops / 8` bytes.
    pub cache_entries_max: usize,
}

impl Limits {
    pub fn new(budget: Duration, cache_entries_max: usize) -> Limits {
        Limits { deadline: Instant::now() + budget, cache_entries_max }
    }
}

/// Why a key is not linearizable: the operation whose answer no linearization of the
/// shortest failing prefix can explain, and the operations around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// `None` if the search for the minimal prefix ran out of time.
    pub culprit: Option<u64>,
    /// Operations in the minimal failing prefix (called before the culprit returned).
    pub prefix_ops: usize,
    /// The culprit, the operations concurrent with it and the last few that completed
    /// before it was called, in call order.
    pub involved: Vec<u64>,
}

/// Searches for a linearization of `ops` (one key) from `available` = 0.
pub fn check_ops(ops: &[LinOp], limits: Limits) -> Verdict {
    let groups = ops.iter().filter_map(|o| o.step.group()).max().map_or(0, |g| g + 1);
    Search::new(ops, groups).run(limits)
}

/// After [`check_ops`] said `Illegal`: the shortest failing prefix by return order
/// (linearizability is prefix-closed, so a binary search finds it).
pub fn explain(ops: &[LinOp], limits: Limits) -> Failure {
    let mut returns: Vec<&LinOp> = ops.iter().filter(|o| o.return_ns.is_some()).collect();
    returns.sort_by_key(|o| o.return_ns);
    let (mut lo, mut hi) = (0, returns.len().saturating_sub(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        match check_ops(&truncate(ops, returns[mid].return_ns.unwrap_or(u64::MAX)), limits) {
            Verdict::Illegal => hi = mid,
            Verdict::Ok => lo = mid + 1,
            Verdict::TimedOut => return Failure { culprit: None, prefix_ops: ops.len(), involved: vec![] },
        }
    }
    let Some(culprit) = returns.get(lo) else { return Failure { culprit: None, prefix_ops: ops.len(), involved: vec![] } };
    let prefix = truncate(ops, culprit.return_ns.unwrap_or(u64::MAX));
    Failure { culprit: Some(culprit.id), prefix_ops: prefix.len(), involved: involved(&prefix, culprit) }
}

/// The history as it stood at time `t`: operations called by then, those still running
/// turned pending (their results not yet known, so reads drop out).
fn truncate(ops: &[LinOp], t: u64) -> Vec<LinOp> {
    let pending = |o: &LinOp| match &o.step {
        Step::Read { .. } | Step::SoldOut { .. } => None,
        Step::Restock { add, .. } => Some(LinOp { return_ns: None, step: Step::Restock { add: *add, available_after: None }, ..o.clone() }),
        _ => Some(LinOp { return_ns: None, ..o.clone() }),
    };
    ops.iter().filter(|o| o.invoke_ns <= t).filter_map(|o| if o.return_ns.is_some_and(|r| r <= t) { Some(o.clone()) } else { pending(o) }).collect()
}

/// Operations worth showing beside the culprit: the ones concurrent with it and the last
/// few completed before its call (these fix the state it should have seen).
fn involved(prefix: &[LinOp], culprit: &LinOp) -> Vec<u64> {
    const BEFORE_MAX: usize = 5;
    let mut before: Vec<&LinOp> = prefix.iter().filter(|o| o.return_ns.is_some_and(|r| r < culprit.invoke_ns)).collect();
    before.sort_by_key(|o| o.return_ns);
    let concurrent = prefix.iter().filter(|o| o.return_ns.is_none_or(|r| r >= culprit.invoke_ns));
    let mut all: Vec<&LinOp> = before.iter().rev().take(BEFORE_MAX).copied().chain(concurrent).collect();
    all.sort_by_key(|o| (o.invoke_ns, o.id));
    all.iter().map(|o| o.id).collect()
}

/// Call and return events in one doubly linked list (with head and tail sentinels), so
/// that linearizing an operation lifts both of its events out in O(1) and backtracking
/// puts them back.
struct Search<'a> {
    ops: &'a [LinOp],
    groups: usize,
    /// Event `e` is the call (e < n) or the return (e >= n) of op `e % n`.
    next: Vec<usize>,
    prev: Vec<usize>,
    /// For a pending op: the pending op with the same step called just before it. Such
    /// twins are interchangeable (neither has a return), so they are linearized in call
    /// order only; without this, k unknown restocks of one size cost 2^k states.
    twin: Vec<Option<usize>>,
}

/// A choice the search made: which candidate (by position), with which variant, and the
/// state before it.
struct Frame {
    op: usize,
    before: State,
    candidate: usize,
    variant: usize,
}

const CHECK_EVERY: u64 = 256;

impl<'a> Search<'a> {
    fn new(ops: &'a [LinOp], groups: usize) -> Search<'a> {
        let n = ops.len();
        let time = |e: usize| if e < n { ops[e].invoke_ns } else { ops[e - n].return_ns.unwrap_or(u64::MAX) };
        let mut events: Vec<usize> = (0..2 * n).collect();
        // At equal times calls come first: touching intervals count as concurrent, which
        // can only make the search more permissive, never raise a false alarm.
        events.sort_by_key(|&e| (time(e), e >= n));
        let (head, tail) = (2 * n, 2 * n + 1);
        let mut next = vec![tail; 2 * n + 2];
        let mut prev = vec![head; 2 * n + 2];
        let mut last = head;
        for &e in &events {
            next[last] = e;
            prev[e] = last;
            last = e;
        }
        next[last] = tail;
        prev[tail] = last;
        Search { ops, groups, next, prev, twin: twins(ops, &events) }
    }

    fn lift(&mut self, op: usize) {
        for e in [op, op + self.ops.len()] {
            let (p, n) = (self.prev[e], self.next[e]);
            self.next[p] = n;
            self.prev[n] = p;
        }
    }

    fn unlift(&mut self, op: usize) {
        for e in [op + self.ops.len(), op] {
            let (p, n) = (self.prev[e], self.next[e]);
            self.next[p] = e;
            self.prev[n] = e;
        }
    }

    /// The ops that may come next: called before the earliest remaining return. Completed
    /// ops first, earliest return first (a write usually takes effect late in its call, so
    /// this order is the likeliest to be right at once); unknown ones last, so that they
    /// take effect only when the history needs them. Any order is complete; this one is fast.
    fn candidates(&self, linearized: &[u64]) -> Vec<usize> {
        let n = self.ops.len();
        let mut e = self.next[2 * n];
        let (mut done, mut pending) = (vec![], vec![]);
        while e < n {
            match (self.ops[e].return_ns, self.twin[e]) {
                (Some(_), _) => done.push(e),
                (None, Some(t)) if !get_bit(linearized, t) => {}
                (None, _) => pending.push(e),
            }
            e = self.next[e];
        }
        done.sort_by_key(|&op| self.ops[op].return_ns);
        done.extend(pending);
        done
    }

    fn run(mut self, limits: Limits) -> Verdict {
        let n = self.ops.len();
        let mut remaining = self.ops.iter().filter(|o| o.return_ns.is_some()).count();
        let mut state = State { available: 0, groups: vec![0; self.groups.div_ceil(64)] };
        let mut linearized = vec![0u64; n.div_ceil(64)];
        let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
        let mut stack: Vec<Frame> = Vec::new();
        // Where to resume among the candidates after a backtrack.
        let (mut first_candidate, mut first_variant) = (0, 0);
        let mut steps: u64 = 0;
        while remaining > 0 {
            steps += 1;
            if steps % CHECK_EVERY == 0 && (Instant::now() >= limits.deadline || cache.len() >= limits.cache_entries_max) {
                return Verdict::TimedOut;
            }
            let candidates = self.candidates(&linearized);
            let mut chosen = None;
            for (c, &op) in candidates.iter().enumerate().skip(first_candidate) {
                let options = successors(&self.ops[op].step, &state, self.ops[op].return_ns.is_none());
                set_bit(&mut linearized, op, true);
                let from = if c == first_candidate { first_variant } else { 0 };
                if let Some(v) = (from..options.len()).find(|&v| cache.insert((linearized.clone(), options[v].clone()))) {
                    chosen = Some((c, op, v, options[v].clone()));
                    break;
                }
                set_bit(&mut linearized, op, false);
            }
            match chosen {
                Some((candidate, op, variant, next_state)) => {
                    stack.push(Frame { op, before: std::mem::replace(&mut state, next_state), candidate, variant });
                    self.lift(op);
                    remaining -= usize::from(self.ops[op].return_ns.is_some());
                    (first_candidate, first_variant) = (0, 0);
                }
                None => {
                    // No candidate leads anywhere new: undo the last choice and try its next option.
                    let Some(f) = stack.pop() else { return Verdict::Illegal };
                    set_bit(&mut linearized, f.op, false);
                    state = f.before;
                    self.unlift(f.op);
                    remaining += usize::from(self.ops[f.op].return_ns.is_some());
                    (first_candidate, first_variant) = (f.candidate, f.variant + 1);
                }
            }
        }
        Verdict::Ok
    }
}

/// See [`Search::twin`]: links each pending op to the previous pending op (in call order)
/// with the same step.
fn twins(ops: &[LinOp], events: &[usize]) -> Vec<Option<usize>> {
    let n = ops.len();
    let mut twin = vec![None; n];
    let mut last: Vec<(&Step, usize)> = vec![];
    for &e in events.iter().filter(|&&e| e < n && ops[e].return_ns.is_none()) {
        match last.iter_mut().find(|(step, _)| **step == ops[e].step) {
            Some((_, prev)) => {
                twin[e] = Some(*prev);
                *prev = e;
            }
            None => last.push((&ops[e].step, e)),
        }
    }
    twin
}

fn get_bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn set_bit(bits: &mut [u64], i: usize, on: bool) {
    if on {
        bits[i / 64] |= 1 << (i % 64);
    } else {
        bits[i / 64] &= !(1 << (i % 64));
    }
}
