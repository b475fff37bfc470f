//! Turns a query name and type into records, given one topology snapshot.
//!
//! This module knows nothing about sockets or EDNS: the handler gives it the
//! question and the client address, and gets back the sections to send.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, HINFO, NS, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use tracing::{debug, warn};

use super::select::{self, Family};
use super::{DcView, DnsSnapshot, MAX_ANSWER_RECORDS};

/// SOA timers; we have no secondaries, so these only need to be sane.
const SOA_REFRESH: i32 = 60;
const SOA_RETRY: i32 = 30;
const SOA_EXPIRE: i32 = 3600;
/// SRV priority for every node: all nodes are equally preferred.
const SRV_PRIORITY: u16 = 10;

/// The question as the resolver sees it.
pub(crate) struct Lookup<'a> {
    /// Query name as sent (its case is echoed back in answers).
    pub qname: &'a Name,
    pub qtype: RecordType,
    /// Address used for nearest-first: ECS address, else the source address.
    pub client: Option<IpAddr>,
    /// Shared rotation counter; bumped once per rotating answer.
    pub rotation: &'a AtomicU64,
}

/// Sections of an in-zone answer.
#[derive(Debug)]
pub(crate) struct Resolution {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The `shop` answer had to fail open.
    pub fail_open: bool,
    /// The answer depends on the client address (for the ECS scope).
    pub client_dependent: bool,
    /// Prefix of the DC subnet that matched the client, if any.
    pub client_scope: Option<u8>,
    /// The rotation step this answer took, if it rotates.
    pub turn: Option<Turn>,
}

/// One step of the shared rotation: the answer depends on `slot` only modulo
/// `period`, so an encoded answer can be reused for every slot of the same phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Turn {
    pub slot: u64,
    /// At least 1.
    pub period: u64,
}

/// Outcome of looking a name up.
pub(crate) enum Outcome {
    /// Name is not in our zone (or the zone is unusable): we are not authoritative.
    NotAuthoritative,
    Resolved(Resolution),
}

/// Names that exist in the zone.
#[derive(Debug, Clone, Copy)]
enum Owner {
    Apex,
    Shop,
    DcShop(usize),
    Leader(usize),
    /// (DC index, node index)
    Node(usize, usize),
    /// (DC index, node index) of the node behind `nsK`.
    Ns(usize, usize),
    HttpSrv,
    /// Empty non-terminal: exists only because names below it do.
    Empty,
}

/// One snapshot plus the derived zone names.
struct Zone<'a> {
    snap: &'a DnsSnapshot,
    origin: Name,
    /// Origin as lowercase labels, leftmost first.
    labels: Vec<String>,
    ttl: u32,
}

/// Resolves one question against one snapshot.
pub(crate) fn resolve(snap: &DnsSnapshot, lookup: &Lookup<'_>) -> Outcome {
    let Some(zone) = Zone::new(snap) else {
        return Outcome::NotAuthoritative;
    };
    let Some(relative) = zone.relative_labels(lookup.qname) else {
        return Outcome::NotAuthoritative;
    };
    let resolution = match zone.classify(&relative) {
        Some(owner) => zone.answer(owner, lookup),
        None => zone.negative(ResponseCode::NXDomain),
    };
    Outcome::Resolved(resolution)
}

impl<'a> Zone<'a> {
    fn new(snap: &'a DnsSnapshot) -> Option<Self> {
        let text = normalize_zone(&snap.zone);
        let origin = match Name::from_ascii(&text) {
            Ok(name) => name,
            Err(error) => {
                warn!(zone = %snap.zone, %error, "invalid dns zone in snapshot, refusing");
                return None;
            }
        };
        Some(Self { snap, labels: name_labels(&origin), origin, ttl: snap.ttl })
    }

    /// Labels of `qname` below the origin, or None if outside the zone.
    fn relative_labels(&self, qname: &Name) -> Option<Vec<String>> {
        let labels = name_labels(qname);
        let cut = labels.len().checked_sub(self.labels.len())?;
        (labels[cut..] == self.labels[..]).then(|| labels[..cut].to_vec())
    }

    fn classify(&self, rel: &[String]) -> Option<Owner> {
        let dc = |label: &str| self.dc_index(label);
        match rel {
            [] => Some(Owner::Apex),
            [shop] if shop == "shop" => Some(Owner::Shop),
            [tcp, shop] if tcp == "_tcp" && shop == "shop" => Some(Owner::Empty),
            [d, shop] if shop == "shop" => dc(d).map(Owner::DcShop),
            [http, tcp, shop] if http == "_http" && tcp == "_tcp" && shop == "shop" => Some(Owner::HttpSrv),
            [leader, d] if leader == "leader" => dc(d).map(Owner::Leader),
            [label] => self.classify_single(label),
            _ => None,
        }
    }

    /// One-label names: `dcN` (empty non-terminal), `nsK`, `dcN-nK`.
    fn classify_single(&self, label: &str) -> Option<Owner> {
        if self.dc_index(label).is_some() {
            return Some(Owner::Empty);
        }
        if let Some((dc, node)) = label.strip_prefix("ns").and_then(|k| self.ns_node(k)) {
            return Some(Owner::Ns(dc, node));
        }
        let (dc_label, k) = label.rsplit_once("-n")?;
        let dc = self.dc_index(dc_label)?;
        let node = parse_ordinal(k)?;
        (node < self.snap.dcs[dc].nodes.len()).then_some(Owner::Node(dc, node))
    }

    fn dc_index(&self, label: &str) -> Option<usize> {
        self.snap.dcs.iter().position(|dc| dc.name.eq_ignore_ascii_case(label))
    }

    /// The node behind `nsK`: the K-th node overall, in snapshot order.
    fn ns_node(&self, k: &str) -> Option<(usize, usize)> {
        let wanted = parse_ordinal(k)?;
        self.all_nodes().nth(wanted)
    }

    fn all_nodes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.snap.dcs.iter().enumerate().flat_map(|(d, dc)| (0..dc.nodes.len()).map(move |n| (d, n)))
    }

    fn answer(&self, owner: Owner, lookup: &Lookup<'_>) -> Resolution {
        let mut res = self.negative(ResponseCode::NoError);
        if lookup.qtype == RecordType::ANY {
            // RFC 8482: one small synthesized record instead of every RRset (a
            // 14x amplification for the apex), for every name that exists.
            let hinfo = HINFO::new("RFC8482".into(), String::new());
            res.answers.push(Record::from_rdata(lookup.qname.clone(), self.ttl, RData::HINFO(hinfo)));
            res.authority.clear();
            return res;
        }
        match owner {
            Owner::Apex => self.apex_records(lookup.qtype, &mut res),
            Owner::HttpSrv => self.srv_records(lookup.qtype, &mut res),
            Owner::Empty => {}
            _ => self.address_records(owner, lookup, &mut res),
        }
        res.answers.truncate(MAX_ANSWER_RECORDS);
        res.additionals.truncate(MAX_ANSWER_RECORDS);
        if !res.answers.is_empty() {
            // Positive answer: the SOA is only for negative caching.
            res.authority.clear();
        }
        res
    }

    /// NXDOMAIN or NODATA skeleton: SOA in authority for negative caching.
    fn negative(&self, rcode: ResponseCode) -> Resolution {
        Resolution {
            rcode,
            answers: Vec::new(),
            authority: vec![self.soa_record()],
            additionals: Vec::new(),
            fail_open: false,
            client_dependent: false,
            client_scope: None,
            turn: None,
        }
    }

    fn apex_records(&self, qtype: RecordType, res: &mut Resolution) {
        if qtype == RecordType::SOA {
            res.answers.push(self.soa_record());
        }
        if qtype == RecordType::NS {
            for (index, (d, n)) in self.all_nodes().enumerate().take(MAX_ANSWER_RECORDS) {
                let Some(ns) = self.name(&format!("ns{}", index + 1)) else {
                    continue;
                };
                let host = NS(ns.clone());
                res.answers.push(Record::from_rdata(self.origin.clone(), self.ttl, RData::NS(host)));
                let ip = self.snap.dcs[d].nodes[n].ip;
                res.additionals.push(address_record(ns, self.ttl, ip));
            }
        }
    }

    fn srv_records(&self, qtype: RecordType, res: &mut Resolution) {
        if qtype != RecordType::SRV {
            return;
        }
        let owner = self.name("_http._tcp.shop");
        for (d, dc) in self.snap.dcs.iter().enumerate() {
            // Drained or zero-weight DCs take no new traffic, SRV included.
            if dc.drained || dc.weight == 0 {
                continue;
            }
            self.dc_srv_records(d, dc, owner.as_ref(), res);
        }
    }

    fn dc_srv_records(&self, d: usize, dc: &DcView, owner: Option<&Name>, res: &mut Resolution) {
        let Some(owner) = owner else { return };
        let weight = u16::try_from(dc.weight).unwrap_or(u16::MAX);
        for (n, node) in dc.nodes.iter().enumerate().filter(|(_, n)| n.healthy) {
            let Some(target) = self.node_name(d, n) else {
                continue;
            };
            let srv = SRV::new(SRV_PRIORITY, weight, node.http_port, target.clone());
            res.answers.push(Record::from_rdata(owner.clone(), self.ttl, RData::SRV(srv)));
            res.additionals.push(address_record(target, self.ttl, node.ip));
        }
    }

    fn address_records(&self, owner: Owner, lookup: &Lookup<'_>, res: &mut Resolution) {
        let families: &[Family] = match lookup.qtype {
            RecordType::A => &[Family::V4],
            RecordType::AAAA => &[Family::V6],
            _ => &[],
        };
        if families.is_empty() {
            return;
        }
        // One counter step per rotating answer keeps successive queries in turn.
        let slot = match owner {
            Owner::Shop | Owner::DcShop(_) => lookup.rotation.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        for family in families {
            for ip in self.owner_addresses(owner, *family, slot, lookup.client, res) {
                res.answers.push(address_record(lookup.qname.clone(), self.ttl, ip));
            }
        }
    }

    /// The owner's addresses of one family; records the rotation period in `res.turn`
    /// for rotating owners.
    fn owner_addresses(&self, owner: Owner, family: Family, slot: u64, client: Option<IpAddr>, res: &mut Resolution) -> Vec<IpAddr> {
        let dcs = &self.snap.dcs;
        match owner {
            Owner::Shop => {
                let pick = select::pick_shop(dcs, family, slot, client);
                res.fail_open |= pick.fail_open;
                res.client_dependent = true;
                res.client_scope = pick.client_scope;
                res.turn = Some(Turn { slot, period: pick.cycle.max(1) });
                pick.order.into_iter().map(|(_, ip)| ip).collect()
            }
            Owner::DcShop(d) => {
                let ips = select::rotated_nodes(&dcs[d], family, slot);
                let period = u64::try_from(ips.len()).unwrap_or(u64::MAX).max(1);
                res.turn = Some(Turn { slot, period });
                ips
            }
            Owner::Leader(d) => dcs[d].leader.filter(|ip| family.matches(*ip)).into_iter().collect(),
            Owner::Node(d, n) | Owner::Ns(d, n) => {
                let ip = dcs[d].nodes[n].ip;
                family.matches(ip).then_some(ip).into_iter().collect()
            }
            Owner::Apex | Owner::HttpSrv | Owner::Empty => Vec::new(),
        }
    }

    fn soa_record(&self) -> Record {
        let mname = self.name("ns1").unwrap_or_else(|| self.origin.clone());
        let rname = self.name("hostmaster").unwrap_or_else(|| self.origin.clone());
        let serial = topology_serial(self.snap);
        let soa = SOA::new(mname, rname, serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, self.ttl);
        Record::from_rdata(self.origin.clone(), self.ttl, RData::SOA(soa))
    }

    /// `dcN-nK.<zone>` with K 1-based.
    fn node_name(&self, d: usize, n: usize) -> Option<Name> {
        self.name(&format!("{}-n{}", self.snap.dcs[d].name, n + 1))
    }

    /// `<relative>.<zone>`; None (logged) if the DC naming makes it invalid.
    fn name(&self, relative: &str) -> Option<Name> {
        let text = if self.origin.is_root() { format!("{relative}.") } else { format!("{relative}.{}", self.origin) };
        match Name::from_ascii(&text) {
            Ok(name) => Some(name),
            Err(error) => {
                debug!(name = %text, %error, "skipping unrepresentable dns name");
                None
            }
        }
    }
}

fn address_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, rdata)
}

/// Lowercase, fully qualified zone text; empty means the default zone.
fn normalize_zone(zone: &str) -> String {
    let zone = zone.trim().to_ascii_lowercase();
    if zone.is_empty() {
        return super::DEFAULT_ZONE.to_string();
    }
    if zone.ends_with('.') {
        zone
    } else {
        format!("{zone}.")
    }
}

/// Lowercase labels, leftmost first; lossy so odd bytes simply never match.
fn name_labels(name: &Name) -> Vec<String> {
    name.iter().map(|label| String::from_utf8_lossy(label).to_ascii_lowercase()).collect()
}

/// Parses a 1-based ordinal ("3") into a 0-based index; rejects "0" and "03".
fn parse_ordinal(text: &str) -> Option<usize> {
    if text.starts_with('0') || text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<usize>().ok()?.checked_sub(1)
}

/// FNV-1a over the answer-relevant topology: stable across processes and
/// Rust versions, so all nameservers agree on the serial for one topology.
pub(crate) fn topology_serial(snap: &DnsSnapshot) -> u32 {
    let mut hash = Fnv::default();
    hash.write(normalize_zone(&snap.zone).as_bytes());
    for dc in &snap.dcs {
        hash.write(dc.name.to_ascii_lowercase().as_bytes());
        hash.write(&[u8::from(dc.healthy), u8::from(dc.drained)]);
        hash.write(&dc.weight.to_be_bytes());
        hash.write_ip(dc.leader);
        for node in &dc.nodes {
            hash.write(&[u8::from(node.healthy)]);
            hash.write_ip(Some(node.ip));
            hash.write(&node.http_port.to_be_bytes());
        }
        // Separator so moving a node between DCs changes the hash.
        hash.write(&[0xff]);
    }
    // Zero is avoided as some tools treat it as "unset".
    hash.0.max(1)
}

struct Fnv(u32);

impl Default for Fnv {
    fn default() -> Self {
        Self(0x811c_9dc5)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u32::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
    }

    fn write_ip(&mut self, ip: Option<IpAddr>) {
        match ip {
            None => self.write(&[0]),
            Some(IpAddr::V4(v4)) => {
                self.write(&[4]);
                self.write(&v4.octets());
            }
            Some(IpAddr::V6(v6)) => {
                self.write(&[6]);
                self.write(&v6.octets());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals() {
        assert_eq!(parse_ordinal("1"), Some(0));
        assert_eq!(parse_ordinal("12"), Some(11));
        assert_eq!(parse_ordinal("0"), None);
        assert_eq!(parse_ordinal("01"), None);
        assert_eq!(parse_ordinal("+1"), None);
        assert_eq!(parse_ordinal(""), None);
    }

    #[test]
    fn zone_normalization() {
        assert_eq!(normalize_zone("Agora.Test"), "agora.test.");
        assert_eq!(normalize_zone(""), "agora.test.");
        assert_eq!(normalize_zone("x."), "x.");
    }
}
