//! What this node believes about the whole cluster's health, as the DNS server sees it:
//! its own DC from Raft, other DCs from the links, drain and weight from the replicated
//! operator settings.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{parse_cidr, NodeId};
use crate::dns::{DcView, DnsSnapshot, DnsView, NodeView};
use crate::node::Node;

pub struct ClusterView(pub Arc<Node>);

impl ClusterView {
    fn ip_of(&self, id: Option<NodeId>) -> Option<IpAddr> {
        id.and_then(|id| self.0.config.node_by_id(id)).map(|n| n.http.ip())
    }

    fn dc_view(&self, dc: &crate::config::DcConfig) -> DcView {
        let node = &self.0;
        let local = dc.name == node.info.dc;
        let (healthy, leader) = if local {
            let leader = node.leader();
            (leader.is_some(), self.ip_of(leader))
        } else {
            (node.links.healthy(&dc.name), self.ip_of(node.links.get(&dc.name).remote_leader))
        };
        let settings = node.sm.settings(&dc.name);
        let nodes = node
            .config
            .dc_nodes(&dc.name)
            .into_iter()
            .map(|n| NodeView {
                healthy: healthy && (n.id == node.info.id || node.links.node_healthy(n.id)),
                name: n.name,
                ip: n.http.ip(),
                http_port: n.http.port(),
            })
            .collect();
        let subnets = dc.subnet.as_deref().and_then(|s| parse_cidr(s).ok()).into_iter().collect();
        DcView { name: dc.name.clone(), healthy, drained: settings.drained, weight: settings.weight, leader, nodes, subnets }
    }
}

impl DnsView for ClusterView {
    fn snapshot(&self) -> DnsSnapshot {
        let c = &self.0.config;
        DnsSnapshot { zone: c.cluster.zone.clone(), ttl: c.cluster.dns_ttl_s, dcs: c.dcs.iter().map(|dc| self.dc_view(dc)).collect() }
    }
}
