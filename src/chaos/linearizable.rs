//! Linearizability of one key's operations: the Wing–Gong search with Lowe's
//! just-in-time linearization and memoisation, as in Porcupine.
//!
//! The model is one DC's `available` units of one SKU, plus which idempotency groups have
//! already taken effect (a keyed retry gets the first result back and changes nothing).
//! Operations with an unknown outcome have no return time: they may take effect at any
//! point after their call, or never. Since nothing forces them early, one can always be
//! moved later, to just before the next operation that observes the stock (or to the
//! end, which is "never"). So the search only linearizes completed operations, each
//! preceded by a *bundle* of pending ones that its answer needs (see [`bundles`]), and
//! succeeds once every completed operation is placed. Pending operations with equal
//! steps are interchangeable and are taken in call order, so k unknown restocks of one
//! size cost k + 1 choices, not 2^k.
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
    /// Stock that moved between DCs by itself (a rebalancing grant): `available += delta`,
    /// which a grant given (negative) needs to hold.
    Grant { delta: i64 },
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
        g.is_some_and(|g| get_bit(&self.groups, g))
    }
    fn with(&self, available: u64, g: Option<usize>) -> State {
        let mut s = State { available, groups: self.groups.clone() };
        if let Some(g) = g {
            set_bit(&mut s.groups, g, true);
        }
        s
    }
}

/// What a completed operation needs of `available` just before it takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Exactly(u64),
    AtLeast(u64),
}

/// `None`: the operation cannot take effect whatever came before (e.g. `available_after`
/// smaller than `add`). A retry of a group that already took effect gets the first
/// result back and needs nothing.
fn need(step: &Step, s: &State) -> Option<Need> {
    if s.has(step.group()) {
        return Some(Need::Nothing);
    }
    match step {
        Step::Restock { add, available_after: Some(after) } => after.checked_sub(*add).map(Need::Exactly),
        Step::Restock { available_after: None, .. } | Step::Cancel { .. } => Some(Need::Nothing),
        Step::Read { available } => Some(Need::Exactly(*available)),
        Step::SoldOut { qty, available, .. } => (available < qty).then_some(Need::Exactly(*available)),
        Step::Order { qty, .. } => Some(Need::AtLeast(*qty)),
        Step::Grant { delta } => Some(if *delta < 0 { Need::AtLeast(delta.unsigned_abs()) } else { Need::Nothing }),
    }
}

/// The state after a completed operation whose [`need`] holds in `s`.
fn apply(step: &Step, s: &State) -> Option<State> {
    let g = step.group();
    if s.has(g) {
        return Some(s.clone());
    }
    match step {
        Step::Restock { add, .. } => s.available.checked_add(*add).map(|a| s.with(a, None)),
        Step::Read { .. } => Some(s.clone()),
        Step::SoldOut { .. } => Some(s.with(s.available, g)),
        Step::Order { qty, .. } => s.available.checked_sub(*qty).map(|a| s.with(a, g)),
        Step::Cancel { qty, .. } => s.available.checked_add(*qty).map(|a| s.with(a, g)),
        Step::Grant { delta } => s.available.checked_add_signed(*delta).map(|a| s.with(a, None)),
    }
}

/// The change a pending operation makes if it takes effect.
fn pending_delta(step: &Step) -> i128 {
    match step {
        Step::Restock { add, .. } => *add as i128,
        Step::Cancel { qty, .. } => *qty as i128,
        Step::Order { qty, .. } => -(*qty as i128),
        Step::Grant { delta } => *delta as i128,
        // Never pending: a read or sold-out without its answer says nothing.
        Step::Read { .. } | Step::SoldOut { .. } => 0,
    }
}

/// Interchangeable pending operations (same change to the stock, no idempotency group),
/// unlinearized and callable now, in call order. Taking the first k of a class stands
/// for every choice of k of them. An op with a group is a class of its own.
struct Class {
    delta: i128,
    group: Option<usize>,
    members: Vec<usize>,
}

/// How many of each class a bundle takes.
type Bundle = Vec<usize>;

/// Bundles enumerated per operation and step at most; beyond, the search may miss a
/// linearization, so an "illegal" end is reported as timed out instead.
const BUNDLES_MAX: usize = 4096;

/// The bundles of pending operations that, placed just before a completed operation,
/// meet its need (the empty bundle first). Pending operations only ever need to take
/// effect just before an operation that observes the stock: one placed anywhere else can
/// be moved later (it has no return time to respect) without changing any answer. For
/// an order, only adds help, and only minimal sets of them (extra adds can wait).
fn bundles(classes: &[Class], need: Need, available: u64, limit: usize) -> (Vec<Bundle>, bool) {
    let mut out = vec![];
    let mut counts = vec![0; classes.len()];
    let truncated = match need {
        Need::Nothing => {
            out.push(counts);
            false
        }
        Need::Exactly(v) => exact(classes, 0, v as i128 - available as i128, &mut counts, &mut out, limit),
        Need::AtLeast(q) if available >= q => {
            out.push(counts);
            false
        }
        Need::AtLeast(q) => at_least(classes, 0, q as i128 - available as i128, &mut counts, &mut out, limit),
    };
    (out, truncated)
}

/// Usable members of a class: a group takes effect once.
fn usable(c: &Class) -> usize {
    if c.group.is_some() {
        c.members.len().min(1)
    } else {
        c.members.len()
    }
}

fn exact(classes: &[Class], i: usize, target: i128, counts: &mut Bundle, out: &mut Vec<Bundle>, limit: usize) -> bool {
    if out.len() >= limit {
        return true;
    }
    if i == classes.len() {
        if target == 0 {
            out.push(counts.clone());
        }
        return false;
    }
    // What the classes after i can still add or take away bounds the search.
    let reach = |sign: i128| classes[i..].iter().map(|c| if c.delta * sign > 0 { c.delta * usable(c) as i128 } else { 0 }).sum::<i128>();
    if target > reach(1) || target < reach(-1) {
        return false;
    }
    let mut truncated = false;
    for k in 0..=usable(&classes[i]) {
        counts[i] = k;
        truncated |= exact(classes, i + 1, target - classes[i].delta * k as i128, counts, out, limit);
    }
    counts[i] = 0;
    truncated
}

fn at_least(classes: &[Class], i: usize, missing: i128, counts: &mut Bundle, out: &mut Vec<Bundle>, limit: usize) -> bool {
    if out.len() >= limit {
        return true;
    }
    if missing <= 0 {
        // Minimal: dropping any one chosen add would fall short.
        let smallest = classes.iter().zip(counts.iter()).filter(|(_, &k)| k > 0).map(|(c, _)| c.delta).min().unwrap_or(0);
        if missing + smallest > 0 {
            out.push(counts.clone());
        }
        return false;
    }
    if i == classes.len() {
        return false;
    }
    if classes[i].delta <= 0 {
        return at_least(classes, i + 1, missing, counts, out, limit);
    }
    let mut truncated = false;
    for k in 0..=usable(&classes[i]) {
        counts[i] = k;
        truncated |= at_least(classes, i + 1, missing - classes[i].delta * k as i128, counts, out, limit);
    }
    counts[i] = 0;
    truncated
}

fn apply_bundle(classes: &[Class], bundle: &Bundle, s: &State) -> Option<State> {
    let mut available = s.available as i128;
    let mut next = s.clone();
    for (c, &k) in classes.iter().zip(bundle) {
        available += c.delta * k as i128;
        if k > 0 {
            next = next.with(next.available, c.group);
        }
    }
    // Adds go first within a bundle, so the final value bounds every intermediate one.
    next.available = u64::try_from(available).ok()?;
    Some(next)
}

fn members<'c>(classes: &'c [Class], bundle: &'c Bundle) -> impl Iterator<Item = usize> + 'c {
    classes.iter().zip(bundle).flat_map(|(c, &k)| c.members[..k].iter().copied())
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
    let mut ids: Vec<u64> = all.iter().map(|o| o.id).collect();
    // A merge release shares its order's id.
    ids.dedup();
    ids
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
}

/// A choice the search made: a completed op (by its position among the candidates),
/// the bundle of pending ops placed just before it, and the state before both.
struct Frame {
    op: usize,
    bundle: Vec<usize>,
    before: State,
    candidate: usize,
    bundle_index: usize,
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
        Search { ops, groups, next, prev }
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

    /// The completed ops that may come next (called before the earliest remaining
    /// return), earliest return first: a write usually takes effect late in its call, so
    /// this order is the likeliest to be right at once. And the pending ops callable now,
    /// in classes.
    fn candidates(&self, s: &State) -> (Vec<usize>, Vec<Class>) {
        let n = self.ops.len();
        let (mut done, mut classes) = (vec![], Vec::<Class>::new());
        let mut e = self.next[2 * n];
        while e < n {
            let op = &self.ops[e];
            if op.return_ns.is_some() {
                done.push(e);
            } else if !s.has(op.step.group()) {
                let (delta, group) = (pending_delta(&op.step), op.step.group());
                match classes.iter_mut().find(|c| group.is_none() && c.group.is_none() && c.delta == delta) {
                    Some(c) => c.members.push(e),
                    None => classes.push(Class { delta, group, members: vec![e] }),
                }
            }
            e = self.next[e];
        }
        done.sort_by_key(|&op| self.ops[op].return_ns);
        (done, classes)
    }

    fn run(mut self, limits: Limits) -> Verdict {
        let n = self.ops.len();
        let mut remaining = self.ops.iter().filter(|o| o.return_ns.is_some()).count();
        let mut state = State { available: 0, groups: vec![0; self.groups.div_ceil(64)] };
        let mut linearized = vec![0u64; n.div_ceil(64)];
        let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
        let mut stack: Vec<Frame> = Vec::new();
        // Where to resume among the candidates and their bundles after a backtrack.
        let (mut first_candidate, mut first_bundle) = (0, 0);
        let mut truncated = false;
        let mut steps: u64 = 0;
        while remaining > 0 {
            steps += 1;
            if steps.is_multiple_of(CHECK_EVERY) && (Instant::now() >= limits.deadline || cache.len() >= limits.cache_entries_max) {
                return Verdict::TimedOut;
            }
            let (candidates, classes) = self.candidates(&state);
            let mut chosen = None;
            'search: for (c, &op) in candidates.iter().enumerate().skip(first_candidate) {
                let step = &self.ops[op].step;
                let Some(need) = need(step, &state) else { continue };
                let mut from = if c == first_candidate { first_bundle } else { 0 };
                // Bundles are enumerated lazily, in growing batches: the first usually fits.
                let mut limit = from + 8;
                loop {
                    let (options, cut) = bundles(&classes, need, state.available, limit);
                    for (b, bundle) in options.iter().enumerate().skip(from) {
                        let Some(next) = apply_bundle(&classes, bundle, &state).and_then(|pre| apply(step, &pre)) else { continue };
                        let pending: Vec<usize> = members(&classes, bundle).collect();
                        pending.iter().chain([&op]).for_each(|&o| set_bit(&mut linearized, o, true));
                        if cache.insert((linearized.clone(), next.clone())) {
                            chosen = Some(Frame { op, bundle: pending, before: next, candidate: c, bundle_index: b });
                            break 'search;
                        }
                        pending.iter().chain([&op]).for_each(|&o| set_bit(&mut linearized, o, false));
                    }
                    if !cut {
                        break;
                    }
                    if limit >= BUNDLES_MAX {
                        truncated = true;
                        break;
                    }
                    (from, limit) = (options.len(), (limit * 4).min(BUNDLES_MAX));
                }
            }
            match chosen {
                Some(mut frame) => {
                    // The frame carries the new state until it is swapped for the old one.
                    frame.bundle.iter().chain([&frame.op]).for_each(|&o| self.lift(o));
                    std::mem::swap(&mut state, &mut frame.before);
                    stack.push(frame);
                    remaining -= 1;
                    (first_candidate, first_bundle) = (0, 0);
                }
                None => {
                    // Nothing leads anywhere new: undo the last choice and try its next option.
                    let Some(f) = stack.pop() else { return if truncated { Verdict::TimedOut } else { Verdict::Illegal } };
                    for &o in [f.op].iter().chain(f.bundle.iter().rev()) {
                        self.unlift(o);
                        set_bit(&mut linearized, o, false);
                    }
                    state = f.before;
                    remaining += 1;
                    (first_candidate, first_bundle) = (f.candidate, f.bundle_index + 1);
                }
            }
        }
        Verdict::Ok
    }
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
