//! Query counters, shared lock-free between the server tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hickory_server::proto::op::ResponseCode;

/// Point-in-time copy of the server counters.
///
/// `queries` counts requests that reached the handler. Packets that hickory
/// cannot decode at all are answered FORMERR (or dropped if shorter than a
/// header) before the handler sees them, so they appear in neither `queries`
/// nor `formerr`.
///
/// A UDP response withheld by the rate limiter counts only in `rrl_dropped` or
/// `rrl_slipped`, not under its response code nor in `truncated`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsStats {
    pub queries: u64,
    /// NOERROR responses (including empty NODATA answers).
    pub answered: u64,
    pub nxdomain: u64,
    pub refused: u64,
    pub formerr: u64,
    pub notimp: u64,
    /// SERVFAIL, BADVERS and failures to send.
    pub servfail: u64,
    /// Responses sent with the TC bit set.
    pub truncated: u64,
    /// `shop` answers that had to fail open because no DC was serving.
    pub fail_open: u64,
    /// UDP responses the rate limiter dropped.
    pub rrl_dropped: u64,
    /// UDP responses the rate limiter replaced by an empty truncated one (TC=1).
    pub rrl_slipped: u64,
    /// Source netblocks the rate limiter tracks now (a gauge, not a counter).
    pub rrl_sources: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub queries: AtomicU64,
    answered: AtomicU64,
    nxdomain: AtomicU64,
    refused: AtomicU64,
    formerr: AtomicU64,
    notimp: AtomicU64,
    servfail: AtomicU64,
    pub truncated: AtomicU64,
    pub fail_open: AtomicU64,
    pub rrl_dropped: AtomicU64,
    pub rrl_slipped: AtomicU64,
    /// Shared with the limiter, which keeps it current.
    pub rrl_sources: Arc<AtomicU64>,
}

pub(crate) fn bump(counter: &AtomicU64) {
    // Relaxed is enough: counters are independent and only read for reporting. A
    // counter stops at u64::MAX rather than wrap to zero.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
}

impl Counters {
    /// Counts a sent response under its response code.
    pub fn record_rcode(&self, rcode: ResponseCode) {
        let counter = match rcode {
            ResponseCode::NoError => &self.answered,
            ResponseCode::NXDomain => &self.nxdomain,
            ResponseCode::Refused => &self.refused,
            ResponseCode::FormErr => &self.formerr,
            ResponseCode::NotImp => &self.notimp,
            _ => &self.servfail,
        };
        bump(counter);
    }

    pub fn snapshot(&self) -> DnsStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStats {
            queries: get(&self.queries),
            answered: get(&self.answered),
            nxdomain: get(&self.nxdomain),
            refused: get(&self.refused),
            formerr: get(&self.formerr),
            notimp: get(&self.notimp),
            servfail: get(&self.servfail),
            truncated: get(&self.truncated),
            fail_open: get(&self.fail_open),
            rrl_dropped: get(&self.rrl_dropped),
            rrl_slipped: get(&self.rrl_slipped),
            rrl_sources: get(&self.rrl_sources),
        }
    }
}
