//! Invariant 7: sessions are last-writer-wins registers ordered by (HLC, DC), and a
//! logout is final. From the versions clients were answered (a create's, a read's) and
//! each DC's answer after healing:
//! - **lost**: a session acknowledged and never logged out is live in every DC;
//! - **logout undone**: a session whose logout was acknowledged is gone in every DC, and
//!   the DC that acknowledged the logout never shows it live to a later read;
//! - **not the last writer**: a DC's final version is the largest version any client was
//!   ever answered (a version that lost to a smaller one means the merge did not follow
//!   the HLC order, e.g. when a clock ran behind);
//! - **went back**: once a DC answered a version it wrote itself, a later read there never
//!   answers a smaller one (its own writes are in its Raft log);
//! - **diverged**: all DCs answer the same.

use std::collections::{BTreeMap, HashMap};

use super::checker::op_ref;
use super::history::{FinalState, Op, Outcome, Record, SessionVersion};
use super::report::{SessionLww, SessionViolation};

/// What one client saw of one session: a version in a DC, between two instants.
struct Seen<'a> {
    record: &'a Record,
    version: &'a SessionVersion,
}

pub fn check_sessions(records: &[&Record], final_state: &FinalState) -> SessionLww {
    let mut created: BTreeMap<&str, &Record> = BTreeMap::new();
    let mut seen: HashMap<&str, Vec<Seen>> = HashMap::new();
    let mut logouts: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in records {
        match (&r.op, r.outcome) {
            (Op::Session { token: Some(t), version, .. }, Outcome::Ok) => {
                created.entry(t).or_insert(r);
                seen.entry(t).or_default().extend(version.as_ref().map(|version| Seen { record: r, version }));
            }
            (Op::ReadSession { token, version: Some(version), .. }, Outcome::Ok) => seen.entry(token).or_default().push(Seen { record: r, version }),
            (Op::Logout { token }, _) => logouts.entry(token).or_default().push(r),
            _ => {}
        }
    }
    let mut violations = vec![];
    let mut unverified = 0;
    for (token, create) in &created {
        let tried = logouts.get(token).map(Vec::as_slice).unwrap_or_default();
        let acked_logout = tried.iter().filter(|r| r.outcome == Outcome::Ok).min_by_key(|r| r.complete_ns);
        let finals: BTreeMap<&str, Option<&SessionVersion>> =
            final_state.dcs.iter().filter_map(|(dc, d)| d.sessions.get(*token).map(|v| (dc.as_str(), v.as_ref()))).collect();
        unverified += usize::from(finals.len() < final_state.dcs.len());
        let seen = seen.get(token).map(Vec::as_slice).unwrap_or_default();
        let mut flag = |kind: &str, detail: String, op: Option<&Record>| {
            violations.push(SessionViolation { kind: kind.into(), token: token.to_string(), detail, op: op.map(op_ref) })
        };
        for (dc, v) in &finals {
            match (v, acked_logout) {
                (None, None) if tried.is_empty() => flag("lost", format!("{dc} answers 404 for a session never logged out"), Some(create)),
                (Some(v), Some(l)) => flag("logout_undone", format!("{dc} answers {v} after the logout was acknowledged"), Some(l)),
                _ => {}
            }
            if let (Some(v), Some(max)) = (v, seen.iter().max_by_key(|s| s.version)) {
                if *v < max.version {
                    flag("not_last_writer", format!("{dc} ends with {v}, smaller than {} answered before", max.version), Some(max.record));
                }
            }
        }
        let answers: Vec<Option<&SessionVersion>> = finals.values().copied().collect();
        if answers.windows(2).any(|w| w[0] != w[1]) {
            let all = finals.iter().map(|(dc, v)| format!("{dc}: {}", v.map_or("404".to_string(), |v| v.to_string()))).collect::<Vec<_>>();
            flag("diverged", all.join(", "), None);
        }
        if let Some(l) = acked_logout {
            for s in seen.iter().filter(|s| s.record.dc == l.dc && l.complete_ns.is_some_and(|c| c < s.record.invoke_ns)) {
                flag("logout_undone", format!("{} answers {} after it acknowledged the logout", s.record.dc, s.version), Some(s.record));
            }
        }
        for (a, b) in went_back(seen) {
            flag(
                "went_back",
                format!("{} answered {} after it had answered its own {} (op {})", b.record.dc, b.version, a.version, a.record.id),
                Some(b.record),
            );
        }
    }
    let logged_out = created.keys().filter(|t| logouts.get(*t).is_some_and(|l| l.iter().any(|r| r.outcome == Outcome::Ok))).count();
    let reads = records.iter().filter(|r| matches!(r.op, Op::ReadSession { .. }) && r.outcome == Outcome::Ok).count();
    SessionLww { ok: violations.is_empty(), sessions: created.len(), logged_out, reads_checked: reads, unverified, violations }
}

/// Pairs (earlier, later) in one DC where the earlier answer was a version that DC wrote
/// and the later one, called after the earlier returned, is smaller.
fn went_back<'s, 'a>(seen: &'s [Seen<'a>]) -> Vec<(&'s Seen<'a>, &'s Seen<'a>)> {
    let mut out = vec![];
    for a in seen.iter().filter(|a| a.version.dc == a.record.dc) {
        let Some(done) = a.record.complete_ns else { continue };
        if let Some(b) =
            seen.iter().filter(|b| b.record.dc == a.record.dc && b.record.invoke_ns > done && b.version < a.version).min_by_key(|b| b.record.invoke_ns)
        {
            out.push((a, b));
        }
    }
    out
}
