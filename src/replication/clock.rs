//! Whether this node's clock is off from its DC's. Each local probe (`PeerRequest::Clock`)
//! brings back the peer's wall clock; with the probe's send and receive times here, that
//! gives the peer's offset from this node, up to half the round trip. A node whose clock
//! disagrees by more than `replication.max_clock_offset_ms` with a majority of its DC's
//! other nodes is the one that is off (one bad peer disagrees with everyone; the others
//! still agree with each other): it fences itself — it leaves the DNS answers, fails
//! `/healthz`, refuses the writes it would stamp, and its peers count it unhealthy.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::raft::NodeId;

/// One probe's times: ours when it left and came back, the peer's in between.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub peer: NodeId,
    pub sent_ms: u64,
    pub their_ms: u64,
    pub received_ms: u64,
}

impl Sample {
    /// The peer's clock minus ours, in ms (positive: theirs is ahead), and how far that
    /// may be off (half the round trip).
    pub fn offset_ms(&self) -> (i128, i128) {
        let (sent, theirs, received) = (i128::from(self.sent_ms), i128::from(self.their_ms), i128::from(self.received_ms));
        let rtt = (received - sent).max(0);
        (theirs - (sent + rtt / 2), rtt / 2 + 1)
    }

    /// Whether the peer's clock is surely more than `max_ms` from ours.
    pub fn disagrees(&self, max_ms: u64) -> bool {
        let (offset, uncertainty) = self.offset_ms();
        offset.abs() > i128::from(max_ms) + uncertainty
    }
}

/// What the last round of local probes said of this node's clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClockView {
    /// This node's clock disagrees with a majority of its DC's other nodes.
    pub fenced: bool,
    /// Each peer that answered: its clock minus ours, in ms.
    pub offsets_ms: BTreeMap<NodeId, i64>,
}

/// Judges a round of samples from `peers` other nodes of the DC (those that did not
/// answer count as agreeing: a node cut off from its DC cannot tell, and does not fence).
pub fn judge(samples: &[Sample], peers: usize, max_ms: u64) -> ClockView {
    let disagreeing = samples.iter().filter(|s| s.disagrees(max_ms)).count();
    let offsets_ms = samples.iter().map(|s| (s.peer, i64::try_from(s.offset_ms().0).unwrap_or(i64::MAX))).collect();
    ClockView { fenced: peers > 0 && disagreeing.saturating_mul(2) > peers, offsets_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(peer: NodeId, their_ms: u64) -> Sample {
        Sample { peer, sent_ms: 1_000_000, their_ms, received_ms: 1_000_010 }
    }

    #[test]
    fn a_node_is_fenced_only_when_a_majority_of_its_peers_disagree() {
        // Our clock 5 s ahead of both peers: both disagree.
        let both = [sample(2, 995_005), sample(3, 995_004)];
        assert!(judge(&both, 2, 500).fenced);
        // One peer 5 s ahead of us: only it disagrees; we are not the one that is off.
        let one = [sample(2, 1_005_005), sample(3, 1_000_006)];
        assert!(!judge(&one, 2, 500).fenced);
        assert_eq!(judge(&one, 2, 500).offsets_ms[&2], 5_000);
        // Within the bound, or no peer to compare with: not fenced.
        assert!(!judge(&[sample(2, 1_000_400), sample(3, 999_600)], 2, 500).fenced);
        assert!(!judge(&[], 0, 500).fenced);
        // Peers that did not answer do not make a minority of answers a majority.
        assert!(!judge(&[sample(2, 995_005)], 2, 500).fenced);
        assert!(!judge(&[sample(2, 995_005), sample(3, 995_005)], 4, 500).fenced);
        assert!(judge(&[sample(2, 995_005), sample(3, 995_005), sample(4, 995_005)], 4, 500).fenced);
    }

    #[test]
    fn a_slow_round_trip_widens_the_margin_and_extreme_clocks_do_not_overflow() {
        let slow = Sample { peer: 2, sent_ms: 1_000_000, their_ms: 1_000_900, received_ms: 1_001_000 };
        assert!(!slow.disagrees(500), "900 ms after the send, but 400 ms after the midpoint, ± 501");
        let wild = Sample { peer: 2, sent_ms: 0, their_ms: u64::MAX, received_ms: u64::MAX };
        assert!(wild.offset_ms().0 > 0);
        let back = Sample { peer: 2, sent_ms: 10, their_ms: 0, received_ms: 5 };
        assert_eq!(back.offset_ms(), (-10, 1), "a clock that went back is a zero round trip");
    }
}
