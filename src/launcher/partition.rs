//! Faults between nodes: partitions as silent packet drops (iptables DROP inside each
//! node's network namespace, so a cut looks like a dead link, not a refused connection)
//! and WAN latency with `tc netem`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{bail, Result};

use crate::config::ClusterConfig;

/// Chain that holds every partition rule, so `heal` flushes exactly what we added.
const CHAIN: &str = "AGORA";

pub const PARTITION_HELP: &str = "\
Cut traffic between nodes with silent packet drops: iptables DROP rules in each node's
network namespace (netns and docker backends), so a cut link times out like a dead one
instead of refusing connections. Each TARGET is a node name, a DC name, or a
comma-separated list of them, and forms one group:

  partition dc1              dc1's nodes are cut off from every node of the other DCs
                             (traffic inside dc1 still flows)
  partition dc1-n1           dc1-n1 is isolated from every other node
  partition dc1-n1 dc1-n2    traffic between the two groups is dropped; nodes not named
                             are untouched (dc1-n1 still reaches dc1-n3 and other DCs)
  partition dc1 dc2 dc3      all three DCs apart
  partition dc1-n1,dc1-n2 dc1-n3

Cuts add up until `agora cluster heal` removes them all. Clients on the host (curl,
`agora cluster status`) still reach every node: only node-to-node traffic is cut.";

/// Expands the targets into groups of node names; an unknown name changes nothing.
fn groups(cfg: &ClusterConfig, targets: &[String]) -> Result<Vec<BTreeSet<String>>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for target in targets {
        let mut group = BTreeSet::new();
        for name in target.split(',').filter(|s| !s.is_empty()) {
            group.extend(expand(cfg, name)?);
        }
        for n in &group {
            if !seen.insert(n.clone()) {
                bail!("node {n} is in two groups of the partition");
            }
        }
        out.push(group);
    }
    Ok(out)
}

fn expand(cfg: &ClusterConfig, name: &str) -> Result<Vec<String>> {
    if cfg.dcs.iter().any(|dc| dc.name == name) {
        return Ok(cfg.dc_nodes(name).into_iter().map(|n| n.name).collect());
    }
    if cfg.node(name).is_some() {
        return Ok(vec![name.to_string()]);
    }
    let dcs: Vec<&str> = cfg.dcs.iter().map(|d| d.name.as_str()).collect();
    bail!("unknown node or DC '{name}'; valid DCs: {}; valid nodes: {}", dcs.join(", "), cfg.node_names().join(", "))
}

/// The node pairs to cut for `partition TARGET…` (see [`PARTITION_HELP`]).
pub fn cuts(cfg: &ClusterConfig, targets: &[String]) -> Result<BTreeSet<(String, String)>> {
    let mut groups = groups(cfg, targets)?;
    if groups.iter().any(|g| g.is_empty()) || groups.is_empty() {
        bail!("partition needs at least one node or DC");
    }
    if groups.len() == 1 {
        let rest: BTreeSet<String> = cfg.node_names().into_iter().filter(|n| !groups[0].contains(n)).collect();
        groups.push(rest);
    }
    let mut out = BTreeSet::new();
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            for x in a {
                for y in b {
                    out.insert(if x < y { (x.clone(), y.clone()) } else { (y.clone(), x.clone()) });
                }
            }
        }
    }
    Ok(out)
}

/// The nodes `node` must not exchange packets with.
pub fn cut_peers<'a>(cuts: &'a BTreeSet<(String, String)>, node: &'a str) -> impl Iterator<Item = &'a str> {
    cuts.iter().filter_map(move |(a, b)| match () {
        _ if a == node => Some(b.as_str()),
        _ if b == node => Some(a.as_str()),
        _ => None,
    })
}

/// A whole `filter` table for iptables-restore: replacing it in one call is atomic and
/// idempotent (the node's namespace holds no other filter rules).
pub fn filter_table(drop_addrs: &[IpAddr]) -> String {
    let mut s = format!("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:{CHAIN} - [0:0]\n");
    s += &format!("-A INPUT -j {CHAIN}\n-A OUTPUT -j {CHAIN}\n");
    for ip in drop_addrs {
        s += &format!("-A {CHAIN} -s {ip} -j DROP\n-A {CHAIN} -d {ip} -j DROP\n");
    }
    s + "COMMIT\n"
}

/// Replaces the node's filter table with `table`, via `prefix` (which enters the node's
/// network namespace: `ip netns exec NS` or `nsenter -t PID -n`).
pub fn load_filter(prefix: &[String], table: &str) -> Result<()> {
    super::exec_stdin(&mut command(prefix, &["iptables-restore", "-w"]), table).map(|_| ())
}

/// `tc netem` arguments that delay everything leaving `dev` by `ms` (0 removes the delay).
fn netem_args(dev: &str, ms: u64) -> Vec<String> {
    let v: Vec<&str> =
        if ms == 0 { vec!["tc", "qdisc", "del", "dev", dev, "root"] } else { vec!["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay"] };
    let mut args: Vec<String> = v.into_iter().map(String::from).collect();
    if ms > 0 {
        args.push(format!("{ms}ms"));
    }
    args
}

/// Runs the netem change for one interface (via `prefix`); removing a delay that is not
/// there is fine; a kernel built without netem gets a clear message.
pub fn set_netem(prefix: &[String], dev: &str, ms: u64) -> Result<()> {
    let args = netem_args(dev, ms);
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match super::exec(&mut command(prefix, &words)) {
        Ok(_) => Ok(()),
        Err(_) if ms == 0 => Ok(()),
        Err(e) if e.to_string().contains("qdisc kind is unknown") => {
            bail!("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM, module sch_netem): WAN latency is not available here")
        }
        Err(e) => Err(e),
    }
}

/// `prefix` followed by `args` as one command.
pub fn command(prefix: &[String], args: &[&str]) -> Command {
    let all: Vec<&str> = prefix.iter().map(String::as_str).chain(args.iter().copied()).collect();
    let mut cmd = Command::new(all[0]);
    cmd.args(&all[1..]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(targets: &[&str], expected: &[(&str, &str)]) {
        let cfg = ClusterConfig::load(None).unwrap();
        let t: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
        let got = cuts(&cfg, &t).unwrap();
        let want: BTreeSet<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(got, want, "partition {targets:?}");
    }

    #[test]
    fn partition_forms() {
        check(&["dc1-n1", "dc1-n2"], &[("dc1-n1", "dc1-n2")]);
        check(&["dc1-n1,dc1-n2", "dc1-n3"], &[("dc1-n1", "dc1-n3"), ("dc1-n2", "dc1-n3")]);
        let cfg = ClusterConfig::load(None).unwrap();
        let one = cuts(&cfg, &["dc1-n1".into()]).unwrap();
        assert_eq!(one.len(), 8, "isolating one node cuts it from the 8 others");
        let dc = cuts(&cfg, &["dc1".into()]).unwrap();
        assert_eq!(dc.len(), 3 * 6, "dc1's 3 nodes from the other 6");
        assert!(!dc.contains(&("dc1-n1".into(), "dc1-n2".into())));
        let all = cuts(&cfg, &["dc1".into(), "dc2".into(), "dc3".into()]).unwrap();
        assert_eq!(all.len(), 27);
    }

    #[test]
    fn bad_partitions_are_refused() {
        let cfg = ClusterConfig::load(None).unwrap();
        let err = cuts(&cfg, &["dc9".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown node or DC 'dc9'") && err.contains("dc1-n1"), "{err}");
        let err = cuts(&cfg, &["dc1".into(), "dc1-n1".into()]).unwrap_err().to_string();
        assert!(err.contains("two groups"), "{err}");
    }
}
