//! The chaos suite's checker: pure functions over a recorded history of client
//! operations and the state gathered after healing. No network code lives here; the
//! workload and nemeses that record the input are elsewhere, and [`history`] is the
//! contract between them and the checker.
//!
//! What a valid report proves, for the operations recorded:
//! 1. **No acknowledged order lost**: every order answered 2xx is found in every DC after
//!    healing, and its own DC never answered 404 for it after acknowledging it.
//! 2. **No oversell**: in every DC's view of every SKU, Σsold − Σreleased ≤ Σstocked and
//!    no counter is negative (with rebalancing off, also per DC); and the live
//!    acknowledged orders fit in the units restocked (ok or unknown restocks).
//! 3. **Convergence**: all DCs report the same digest (within a bound, if one is set).
//! 4. **Linearizability** of inventory inside each DC, per (DC, SKU): restocks, orders,
//!    sold-out answers, cancels and reads are explained by one sequential order that
//!    respects real time ([`linearizable`], Wing–Gong/Lowe with memoisation as in
//!    Porcupine). A read that no such order explains is a *stale read*. Rebalancing
//!    grants move a DC's stock with no client call: the nodes journal each one (a test
//!    hook, [`crate::escrow_journal`]) and the model places it between its entry's
//!    proposal and its first apply. A cancel sent to another DC than the order's owner
//!    is accepted only as "may have happened".
//! 5. **Availability** (measured, and checked against a bound if one is set): the share
//!    of calls served during each fault window, and the time from each leader kill to
//!    the next successful write in that DC. Also: no idempotency key has two live orders.
//!
//! 6. **Read-your-writes across DCs**: once an order or session was acknowledged, no call
//!    about it — wherever it was sent — answers 404 (order or session reads), 401 (an
//!    order with the session) or refuses a cancel by the session that placed the order
//!    (401, 403, 404, 409); 503 `owner_unreachable` is allowed.
//!
//! 7. **Sessions are last-writer-wins registers** ordered by (HLC, DC), with final
//!    logouts: nothing lost, no logout undone, every DC ends with the largest version any
//!    client was answered, and no DC answers older than a version it wrote ([`sessions`]).
//!
//! A run in which fewer than `min_ok_ops` operations succeeded, or a key's search hit its
//! time bound, is *inconclusive*, never valid. Operations with an unknown outcome are
//! never assumed to have failed.
//!
//! Use: [`history::read_history`] and [`history::read_final_state`], then [`check`], then
//! [`report::human`] or `serde_json::to_string(&report)`, and exit with
//! [`CheckReport::exit_code`].

pub mod checker;
pub mod control;
pub mod history;
pub mod linearizable;
pub mod nemesis;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sessions;
pub mod workload;

#[cfg(test)]
mod tests;

pub use checker::{check, CheckOptions};
pub use history::{FinalState, Op, Outcome, Record};
pub use report::{human, CheckReport, RunVerdict};
