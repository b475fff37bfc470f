//! Which DCs and nodes go into an answer, and in what order.
//!
//! Pure functions over the snapshot so the rotation rule is easy to reason
//! about and test; the rule itself is documented in the module root.

use std::net::IpAddr;

use super::{DcView, NodeView, MAX_WEIGHT};

/// Address family asked for (A or AAAA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub fn matches(self, ip: IpAddr) -> bool {
        matches!((self, ip), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }
}

/// DCs chosen for a `shop` answer.
#[derive(Debug)]
pub(crate) struct ShopPick {
    /// (DC index, address) in answer order.
    pub order: Vec<(usize, IpAddr)>,
    /// True when no DC was serving and every candidate was listed instead.
    pub fail_open: bool,
    /// Prefix length of the most specific DC subnet holding the client.
    pub client_scope: Option<u8>,
    /// Length of the rotation cycle: the order depends on the slot only modulo this.
    pub cycle: u64,
}

/// A DC serves `shop` traffic when it is healthy, undrained, weighted and
/// has somewhere to send clients.
pub(crate) fn serves(dc: &DcView) -> bool {
    let reachable = dc.leader.is_some() || dc.nodes.iter().any(|n| n.healthy);
    dc.healthy && !dc.drained && dc.weight > 0 && reachable
}

/// Orders the DCs for `shop.<zone>`; `slot` is the rotation counter value.
pub(crate) fn pick_shop(dcs: &[DcView], family: Family, slot: u64, client: Option<IpAddr>) -> ShopPick {
    let client_scope = client.and_then(|ip| best_subnet(dcs, ip, |_| true).map(|(_, p)| p));
    if !dcs.iter().any(serves) {
        let (order, cycle) = fail_open_order(dcs, family, slot);
        return ShopPick { order, fail_open: true, client_scope, cycle };
    }
    let candidates: Vec<(usize, IpAddr, u32)> =
        dcs.iter().enumerate().filter(|(_, dc)| serves(dc)).filter_map(|(i, dc)| serving_address(dc, family).map(|ip| (i, ip, dc.weight))).collect();
    let (mut order, cycle) = rotate(&candidates, slot);
    let nearest = client.and_then(|ip| best_subnet(dcs, ip, |i| order.iter().any(|o| o.0 == i)));
    if let Some((dc, _)) = nearest {
        move_to_front(&mut order, dc);
    }
    ShopPick { order, fail_open: false, client_scope, cycle }
}

/// Fail-open candidates: undrained, weighted DCs, or every DC if none is left,
/// each with an equal share of the rotation.
fn fail_open_order(dcs: &[DcView], family: Family, slot: u64) -> (Vec<(usize, IpAddr)>, u64) {
    let undrained = |dc: &DcView| !dc.drained && dc.weight > 0;
    let any_undrained = dcs.iter().any(undrained);
    let candidates: Vec<(usize, IpAddr, u32)> = dcs
        .iter()
        .enumerate()
        .filter(|(_, dc)| !any_undrained || undrained(dc))
        .filter_map(|(i, dc)| fallback_address(dc, family).map(|ip| (i, ip, 1)))
        .collect();
    rotate(&candidates, slot)
}

/// The DC's leader if known, else its first healthy node. A leader whose node is not
/// healthy (e.g. fenced for its clock: it answers its own writes with 503 `clock_skew`)
/// gives way to a healthy node of the DC, if there is one.
pub(crate) fn serving_address(dc: &DcView, family: Family) -> Option<IpAddr> {
    let healthy = |ip: IpAddr| dc.nodes.iter().all(|n| n.ip != ip || n.healthy);
    match dc.leader.filter(|ip| family.matches(*ip)) {
        Some(ip) if !healthy(ip) => first_node(&dc.nodes, family, true).or(Some(ip)),
        Some(ip) => Some(ip),
        None => first_node(&dc.nodes, family, true),
    }
}

/// Like `serving_address` but accepts an unhealthy node as a last resort.
fn fallback_address(dc: &DcView, family: Family) -> Option<IpAddr> {
    serving_address(dc, family).or_else(|| first_node(&dc.nodes, family, false))
}

fn first_node(nodes: &[NodeView], family: Family, healthy_only: bool) -> Option<IpAddr> {
    nodes.iter().find(|n| (n.healthy || !healthy_only) && family.matches(n.ip)).map(|n| n.ip)
}

/// Leads with the DC owning `slot` in the weighted cycle, then the others in
/// snapshot order after it, wrapping around. Also returns the cycle's length.
fn rotate(candidates: &[(usize, IpAddr, u32)], slot: u64) -> (Vec<(usize, IpAddr)>, u64) {
    if candidates.is_empty() {
        return (Vec::new(), 1);
    }
    let weights: Vec<u32> = candidates.iter().map(|c| c.2.clamp(1, MAX_WEIGHT)).collect();
    let lead = smooth_pick(&weights, slot);
    let n = candidates.len();
    let order = (0..n).map(|k| candidates[(lead + k) % n]).map(|(i, ip, _)| (i, ip)).collect();
    (order, weights.iter().map(|w| u64::from(*w)).sum())
}

/// Smooth weighted round-robin (as in nginx): returns the index chosen at
/// position `slot % sum(weights)` of the cycle. Each index `i` occurs
/// `weights[i]` times per cycle, interleaved; ties go to the lower index.
pub(crate) fn smooth_pick(weights: &[u32], slot: u64) -> usize {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return 0;
    }
    let steps = slot % total;
    let total = i64::try_from(total).unwrap_or(i64::MAX);
    let mut current = vec![0i64; weights.len()];
    let mut pick = 0;
    for _ in 0..=steps {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
        }
        pick = argmax_first(&current);
        current[pick] -= total;
    }
    pick
}

fn argmax_first(values: &[i64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

fn move_to_front(order: &mut Vec<(usize, IpAddr)>, dc: usize) {
    if let Some(pos) = order.iter().position(|o| o.0 == dc) {
        let entry = order.remove(pos);
        order.insert(0, entry);
    }
}

/// The DC (accepted by `allow`) whose subnet holds `ip` most specifically.
fn best_subnet(dcs: &[DcView], ip: IpAddr, allow: impl Fn(usize) -> bool) -> Option<(usize, u8)> {
    let mut best: Option<(usize, u8)> = None;
    for (i, dc) in dcs.iter().enumerate().filter(|(i, _)| allow(*i)) {
        for (net, prefix) in &dc.subnets {
            let better = best.is_none_or(|(_, p)| *prefix > p);
            if better && in_subnet(ip, *net, *prefix) {
                best = Some((i, *prefix));
            }
        }
    }
    best
}

/// CIDR membership; IPv4-mapped IPv6 addresses count as IPv4.
pub(crate) fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip.to_canonical(), net.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(u128::from(a.to_bits()), u128::from(b.to_bits()), prefix, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(a.to_bits(), b.to_bits(), prefix, 128),
        _ => false,
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8, width: u32) -> bool {
    let prefix = u32::from(prefix).min(width);
    if prefix == 0 {
        return true;
    }
    let shift = width - prefix;
    (a >> shift) == (b >> shift)
}

/// Rotates a DC's healthy node addresses by `slot`.
pub(crate) fn rotated_nodes(dc: &DcView, family: Family, slot: u64) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = dc.nodes.iter().filter(|n| n.healthy && family.matches(n.ip)).map(|n| n.ip).collect();
    if !ips.is_empty() {
        let start = usize::try_from(slot % ips.len() as u64).unwrap_or(0);
        ips.rotate_left(start);
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_cycle_interleaves_by_weight() {
        let cycle: Vec<usize> = (0..6).map(|s| smooth_pick(&[2, 1], s)).collect();
        assert_eq!(cycle, vec![0, 1, 0, 0, 1, 0]);
        let cycle: Vec<usize> = (0..3).map(|s| smooth_pick(&[1, 1, 1], s)).collect();
        assert_eq!(cycle, vec![0, 1, 2]);
    }

    #[test]
    fn subnet_membership() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_subnet(ip("127.0.0.1"), ip("127.0.0.0"), 8));
        assert!(!in_subnet(ip("10.0.0.1"), ip("127.0.0.0"), 8));
        assert!(in_subnet(ip("::ffff:127.0.0.1"), ip("127.0.0.0"), 8));
        assert!(in_subnet(ip("2001:db8::1"), ip("2001:db8::"), 32));
        assert!(in_subnet(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(!in_subnet(ip("1.2.3.4"), ip("::"), 0));
    }
}
