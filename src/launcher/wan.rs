//! WAN latency between the DCs of a launched cluster. By default the nodes' own peer
//! transport delays every frame to another DC (`[wan]` in the cluster file the nodes start
//! with, changed at run time through `PUT /v1/admin/wan`): it works on every backend and
//! any kernel. `--wan-via netem` uses tc netem on the WAN links instead (netns and docker
//! backends, kernels with `sch_netem`), which also delays TCP's own packets.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::state::Meta;
use super::{table, Cluster};
use crate::config::{ClusterConfig, WanLink};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WanVia {
    /// The nodes' peer transport delays frames to other DCs.
    #[default]
    Transport,
    /// tc netem on the WAN links.
    Netem,
}

#[derive(clap::Args)]
pub struct LatencyArgs {
    /// One-way delay in ms (0 removes it).
    pub ms: u64,
    /// Each frame's delay varies by up to ± this, in ms (transport only).
    #[arg(long, default_value_t = 0)]
    pub jitter: u64,
    /// Only between these two DCs, e.g. `dc1,dc3` (transport only); the other pairs keep theirs.
    #[arg(long, value_name = "DC,DC")]
    pub between: Option<String>,
}

/// Puts the delay into `cfg`'s `[wan]`: between every pair of DCs (dropping per-pair
/// settings), or between the two of `pair` only.
pub fn configure(cfg: &mut ClusterConfig, ms: u64, jitter: u64, pair: Option<[String; 2]>) -> Result<()> {
    match pair {
        None => {
            cfg.wan.latency_ms = ms;
            cfg.wan.jitter_ms = jitter;
            cfg.wan.links.clear();
        }
        Some(dcs) => {
            let same = |l: &WanLink| (l.dcs[0] == dcs[0] && l.dcs[1] == dcs[1]) || (l.dcs[0] == dcs[1] && l.dcs[1] == dcs[0]);
            cfg.wan.links.retain(|l| !same(l));
            cfg.wan.links.push(WanLink { dcs, latency_ms: ms, jitter_ms: jitter });
        }
    }
    cfg.wan.check(&cfg.dc_names()).context("WAN latency")?;
    Ok(())
}

fn parse_pair(between: &str) -> Result<[String; 2]> {
    match between.split_once(',') {
        Some((a, b)) if !b.contains(',') => Ok([a.trim().to_string(), b.trim().to_string()]),
        _ => bail!("--between wants two DC names separated by a comma, e.g. dc1,dc3"),
    }
}

/// `agora cluster latency MS [--jitter MS] [--between DC,DC]`.
pub(super) async fn latency(mut c: Cluster, a: &LatencyArgs) -> Result<()> {
    match c.meta.wan_via {
        WanVia::Netem => {
            ensure!(a.jitter == 0 && a.between.is_none(), "--jitter and --between need a cluster started with --wan-via transport");
            c.rt.supports_faults()?;
            c.rt.set_latency(&c.st, &c.cfg, a.ms)?;
            c.meta.wan_latency_ms = a.ms;
        }
        WanVia::Transport => {
            let pair = a.between.as_deref().map(parse_pair).transpose()?;
            let everywhere = pair.is_none();
            configure(&mut c.cfg, a.ms, a.jitter, pair)?;
            // Restarted nodes read it from the cluster file; running ones are told now.
            std::fs::write(c.st.config_path(), toml::to_string(&c.cfg).context("serialize config")?).context("write cluster.toml")?;
            set_on_nodes(&c).await?;
            if everywhere {
                c.meta.wan_latency_ms = a.ms;
            }
        }
    }
    c.st.write_meta(&c.meta)?;
    println!("{}", describe(&c.cfg, &c.meta).unwrap_or_else(|| "wan latency: none".into()));
    Ok(())
}

/// Sends the cluster file's `[wan]` to every running node.
async fn set_on_nodes(c: &Cluster) -> Result<()> {
    let http = table::http_client();
    let token = crate::certs::read_token(&crate::certs::token_path(&c.st.certs_dir()))?;
    for name in c.live_nodes() {
        let n = c.node(&name)?;
        let r = http.put(format!("http://{}/v1/admin/wan", n.admin)).bearer_auth(&token).json(&c.cfg.wan).send().await;
        match r {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => bail!("{name} refused the WAN latency: {} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => bail!("{name}: {e}"),
        }
    }
    Ok(())
}

/// One line saying what delays traffic between DCs, and by how much; `None` when nothing does.
pub fn describe(cfg: &ClusterConfig, meta: &Meta) -> Option<String> {
    match meta.wan_via {
        WanVia::Netem => (meta.wan_latency_ms > 0).then(|| format!("wan latency: {} ms one way between DCs (tc netem on the WAN links)", meta.wan_latency_ms)),
        WanVia::Transport => {
            let pairs: Vec<String> = cfg
                .wan
                .table(&cfg.dc_names())
                .into_iter()
                .filter(|(_, d)| d.latency_ms > 0 || d.jitter_ms > 0)
                .map(|(pair, d)| if d.jitter_ms > 0 { format!("{pair} {} ± {} ms", d.latency_ms, d.jitter_ms) } else { format!("{pair} {} ms", d.latency_ms) })
                .collect();
            (!pairs.is_empty()).then(|| format!("wan latency (one way, delayed in the nodes' peer transport): {}", pairs.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_overrides_the_default_and_a_default_resets_the_pairs() {
        let mut cfg = ClusterConfig::load(None).unwrap();
        configure(&mut cfg, 80, 5, None).unwrap();
        configure(&mut cfg, 150, 0, Some(parse_pair("dc3,dc1").unwrap())).unwrap();
        let t = cfg.wan.table(&cfg.dc_names());
        assert_eq!((t["dc1-dc2"].latency_ms, t["dc1-dc2"].jitter_ms, t["dc1-dc3"].latency_ms, t["dc2-dc3"].latency_ms), (80, 5, 150, 80));
        let meta = Meta {
            backend: super::super::Backend::Process,
            wan_latency_ms: 80,
            wan_via: WanVia::Transport,
            test_hooks: false,
            cuts: Default::default(),
            cpus: None,
            cpu_period_ms: None,
        };
        let line = describe(&cfg, &meta).unwrap();
        assert!(line.contains("dc1-dc3 150 ms") && line.contains("dc1-dc2 80 ± 5 ms"), "{line}");
        configure(&mut cfg, 0, 0, None).unwrap();
        assert!(cfg.wan.links.is_empty());
        assert_eq!(describe(&cfg, &meta), None);
        assert!(configure(&mut cfg, 10, 0, Some(parse_pair("dc1,dc9").unwrap())).is_err(), "unknown DC");
        assert!(parse_pair("dc1").is_err());
    }
}
