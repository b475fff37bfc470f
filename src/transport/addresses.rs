//! Where nodes named by host (`host = "dc1-1.agora-dc1"` in the cluster file) are now.
//!
//! Names are resolved with hickory's resolver, which reads `/etc/resolv.conf` and
//! `/etc/hosts` itself: the static binary of the container image has no glibc NSS
//! modules to resolve with. A resolver is built for each lookup, so nothing is cached: a
//! pod that restarts with a new address is found at the next connection ([`connect`]).
//!
//! The DNS answers give clients IP addresses: [`AddressBook::refresh_loop`] resolves every
//! name every [`REFRESH`] and keeps the last address it got; a node whose name has never
//! resolved has no address and is left out of the answers.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::RwLock;
use std::time::Duration;

use hickory_resolver::config::ResolveHosts;
use tokio::net::TcpStream;

use crate::config::{ClusterConfig, NodeId, NodeInfo};

/// How often names are resolved again: a restarted pod is in the answers this soon after
/// its name points at it.
pub const REFRESH: Duration = Duration::from_secs(2);

/// A lookup that hangs (an unreachable resolver) must not hold the others back.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AddressBook {
    /// The nodes named by host, and their names.
    names: Vec<(NodeId, String)>,
    /// At most one entry per name above.
    resolved: RwLock<HashMap<NodeId, IpAddr>>,
}

impl AddressBook {
    pub fn new(config: &ClusterConfig) -> Self {
        let names = config.nodes().into_iter().filter_map(|n| Some((n.id, n.host?))).collect();
        AddressBook { names, resolved: RwLock::default() }
    }

    /// The address to give clients for `node`: its fixed IP, or the last one its name
    /// resolved to.
    pub fn ip_of(&self, node: &NodeInfo) -> Option<IpAddr> {
        if node.host.is_none() {
            return Some(node.http.ip());
        }
        self.resolved.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&node.id).copied()
    }

    /// Resolves every name once, with one resolver for the round; a name that fails keeps
    /// its last address.
    pub async fn refresh(&self) {
        let resolver = match resolver() {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "no resolver to look node names up with"),
        };
        for (id, host) in &self.names {
            match lookup(&resolver, host).await {
                Ok(ips) => {
                    if let Some(ip) = ips.first() {
                        self.resolved.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(*id, *ip);
                    }
                }
                Err(e) => tracing::debug!(%host, error = %e, "node name does not resolve"),
            }
        }
    }

    /// Runs for the node's life when some node is named by host; returns at once otherwise.
    pub async fn refresh_loop(self: std::sync::Arc<Self>) {
        if self.names.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tick.tick().await;
            self.refresh().await;
        }
    }
}

/// The addresses of `host` now, IPv4 first: an IP literal as it is, a name from
/// `/etc/hosts` or the resolvers of `/etc/resolv.conf` (with its search domains).
pub async fn resolve(host: &str) -> io::Result<Vec<IpAddr>> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(vec![ip]),
        Err(_) => lookup(&resolver()?, host).await,
    }
}

/// A resolver from the system's files as they are now (built afresh, so nothing it
/// answers was cached before).
fn resolver() -> io::Result<hickory_resolver::TokioResolver> {
    let mut builder = hickory_resolver::TokioResolver::builder_tokio().map_err(io::Error::other)?;
    let opts = builder.options_mut();
    opts.use_hosts_file = ResolveHosts::Always;
    opts.timeout = LOOKUP_TIMEOUT;
    opts.attempts = 1;
    builder.build().map_err(io::Error::other)
}

async fn lookup(resolver: &hickory_resolver::TokioResolver, host: &str) -> io::Result<Vec<IpAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let found = tokio::time::timeout(LOOKUP_TIMEOUT * 2, resolver.lookup_ip(host))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("looking up {host} timed out")))?
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, format!("{host}: {e}")))?;
    Ok(found.iter().collect())
}

/// A TCP connection to `ip:port`, or to `host:port` with the host resolved now; each
/// address of the host is tried in turn.
pub async fn connect(authority: &str) -> io::Result<TcpStream> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return TcpStream::connect(addr).await;
    }
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("'{authority}' is not host:port"));
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
    for ip in resolve(host).await? {
        match TcpStream::connect((ip, port)).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fixed_ips_are_known_and_names_once_resolved() {
        let text = crate::config::DEFAULT_TOML.replace("ip = \"127.0.1.2\"", "host = \"localhost\", bind = \"127.0.1.2\"");
        let config = ClusterConfig::from_toml(&text, "test").unwrap();
        let book = AddressBook::new(&config);
        let (fixed, named) = (config.node("dc1-n1").unwrap(), config.node("dc1-n2").unwrap());
        assert_eq!(book.ip_of(&fixed), Some("127.0.1.1".parse().unwrap()));
        assert_eq!(book.ip_of(&named), None, "not resolved yet: no address to give");
        book.refresh().await;
        assert!(book.ip_of(&named).is_some_and(|ip| ip.is_loopback()), "localhost resolves to loopback: {:?}", book.ip_of(&named));
    }
}
