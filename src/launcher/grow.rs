//! `agora cluster grow DC`: a DC of a running cluster gains nodes its cluster file did not
//! name. Every node checks a peer's certificate against the file, and answers the DC's
//! addresses in DNS from it, so the file comes first: the new nodes join it (the next
//! names, ids and addresses of the DC) and get certificates; then every running node
//! restarts on it, one at a time, each waiting until it serves again; then the new nodes
//! start and join their DC's shards as `add-node` makes them.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};

use crate::config::{ClusterConfig, NodeConfig};

/// `cfg` with `count` new nodes in `dc`, and their names. Each takes the DC's next
/// `dcX-nK` name, the next id after the DC's highest unused anywhere in the cluster, and
/// the address after the DC's highest; the result is validated as a whole (a DC whose
/// every node holds every shard must stay at 1, 3 or 5 nodes, say).
pub fn grown(cfg: &ClusterConfig, dc: &str, count: usize) -> Result<(ClusterConfig, Vec<String>)> {
    anyhow::ensure!((1..=4).contains(&count), "--nodes: 1 to 4 at a time");
    let mut cfg = cfg.clone();
    let mut added = Vec::new();
    for _ in 0..count {
        let node = next_node(&cfg, dc)?;
        added.push(node.name.clone());
        let d = cfg.dcs.iter_mut().find(|d| d.name == dc).context("the DC vanished")?;
        d.nodes.push(node);
    }
    cfg.validate().context("the DC cannot grow so")?;
    Ok((cfg, added))
}

fn next_node(cfg: &ClusterConfig, dc: &str) -> Result<NodeConfig> {
    let names = cfg.dcs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
    let d = cfg.dcs.iter().find(|d| d.name == dc).with_context(|| format!("unknown DC '{dc}'; DCs: {names}"))?;
    let last = d.nodes.last().context("a DC without nodes")?;
    let Some(IpAddr::V4(highest)) = d.nodes.iter().filter_map(|n| n.ip).max() else {
        bail!("{dc}'s nodes are named by host: add the new node to the cluster file yourself");
    };
    let ip = u32::from(highest).checked_add(1).map(std::net::Ipv4Addr::from).context("no address after the DC's highest")?;
    let taken = |id: u64| cfg.dcs.iter().flat_map(|d| &d.nodes).any(|n| n.id == id);
    let dc_max = d.nodes.iter().map(|n| n.id).max().unwrap_or(0);
    let all_max = cfg.dcs.iter().flat_map(|d| &d.nodes).map(|n| n.id).max().unwrap_or(0);
    let id = match dc_max.checked_add(1) {
        Some(id) if !taken(id) => id,
        _ => all_max.checked_add(1).context("no node id left")?,
    };
    let numbered = |n: &NodeConfig| n.name.strip_prefix(&format!("{dc}-n"))?.parse::<u32>().ok();
    let k = d.nodes.iter().filter_map(numbered).max().unwrap_or(0).checked_add(1).context("no node number left")?;
    Ok(NodeConfig { id, name: format!("{dc}-n{k}"), ip: Some(IpAddr::V4(ip)), host: None, bind: None, ..last.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sharded() -> ClusterConfig {
        let text = crate::config::DEFAULT_TOML.replace("[cluster]", "[cluster]\nshards = 4\nreplicas = 3");
        ClusterConfig::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn a_dc_grows_by_the_next_names_ids_and_addresses() {
        let cfg = sharded();
        let (grown, added) = grown(&cfg, "dc2", 2).unwrap();
        assert_eq!(added, ["dc2-n4", "dc2-n5"]);
        let n4 = grown.node("dc2-n4").unwrap();
        let n3 = cfg.node("dc2-n3").unwrap();
        assert_eq!((n4.dc.as_str(), n4.id), ("dc2", n3.id + 1));
        assert_eq!(n4.http.ip(), "127.0.2.4".parse::<IpAddr>().unwrap());
        assert_eq!(grown.node("dc2-n5").unwrap().http.ip(), "127.0.2.5".parse::<IpAddr>().unwrap());
        assert_eq!(grown.dc_nodes("dc1").len(), 3, "the other DCs are as they were");
    }

    #[test]
    fn a_grown_dc_must_still_be_valid() {
        // Every node holds every shard: a DC of 4 is not a Raft group size.
        let err = grown(&ClusterConfig::from_toml(crate::config::DEFAULT_TOML, "t").unwrap(), "dc1", 1).unwrap_err();
        assert!(format!("{err:#}").contains("nodes"), "{err:#}");
        assert!(grown(&sharded(), "dc9", 1).unwrap_err().to_string().contains("unknown DC"));
        assert!(grown(&sharded(), "dc1", 0).is_err());
    }
}
