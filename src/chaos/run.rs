//! `agora chaos run SCENARIO` and `agora chaos all`: bring a cluster up, run the workload
//! and the nemesis schedule together, undo every fault, let the DCs converge, gather the
//! final state, check it, and write the history and both reports to the run directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::control::Control;
use super::history::{DcState, Escrow, EscrowMove, FinalState, InventoryView, Nemesis, Outcome, Record, SessionVersion, SkuState};
use super::scenario::Scenario;
use super::workload::{Clock, Recorder, Workload};
use super::{check, human, CheckOptions, CheckReport, Op};

#[derive(clap::Subcommand)]
pub enum ChaosCmd {
    /// Run one scenario file and check it.
    Run {
        scenario: PathBuf,
        /// Replaces the scenario's seed (the same seed replays the same fault schedule).
        #[arg(long)]
        seed: Option<u64>,
        /// Where the history, final state and reports go [default: .agora/chaos/NAME-SEED].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run every scenario in a directory, one after the other.
    All {
        #[arg(long, default_value = "chaos/scenarios")]
        dir: PathBuf,
        /// Only the quick set (`smoke = true`), as the test suite runs it.
        #[arg(long)]
        smoke: bool,
    },
    /// Check a recorded run again (history.jsonl and final.json in DIR).
    Check { dir: PathBuf },
}

#[derive(clap::Args)]
pub struct ChaosArgs {
    #[command(subcommand)]
    pub cmd: ChaosCmd,
}

/// Runs the command; SIGINT or SIGTERM stops it and takes its cluster down (exit 130).
pub async fn main(args: ChaosArgs) -> anyhow::Result<i32> {
    // Before anything starts: `cluster up` blocks this thread for seconds.
    let stop = crate::signals::Stop::listen()?;
    tokio::select! {
        r = command(args) => r,
        () = stop.requested() => {
            super::control::take_down_running();
            Ok(130)
        }
    }
}

async fn command(args: ChaosArgs) -> anyhow::Result<i32> {
    match args.cmd {
        ChaosCmd::Run { scenario, seed, out } => {
            let mut s = Scenario::load(&scenario)?;
            s.seed = seed.unwrap_or(s.seed);
            let out = out.unwrap_or_else(|| PathBuf::from(".agora/chaos").join(format!("{}-{}", s.name, s.seed)));
            Ok(run(&s, &out).await?.exit_code())
        }
        ChaosCmd::All { dir, smoke } => run_all(&dir, smoke).await,
        ChaosCmd::Check { dir } => {
            let report = recheck(&dir)?;
            println!("{}", human(&report));
            Ok(report.exit_code())
        }
    }
}

async fn run_all(dir: &Path, smoke: bool) -> anyhow::Result<i32> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut worst = 0;
    for f in files {
        let s = Scenario::load(&f)?;
        if smoke && !s.smoke {
            continue;
        }
        let out = PathBuf::from(".agora/chaos").join(format!("{}-{}", s.name, s.seed));
        // A scenario that cannot run here (e.g. no netem in the kernel) is reported and
        // counted, and the others still run.
        let code = match run(&s, &out).await {
            Ok(report) => report.exit_code(),
            Err(e) => {
                println!("chaos {}: could not run: {e:#}", s.name);
                3
            }
        };
        worst = worst.max(code);
    }
    Ok(worst)
}

/// One scenario, start to verdict.
pub async fn run(s: &Scenario, out: &Path) -> anyhow::Result<CheckReport> {
    std::fs::create_dir_all(out)?;
    println!("chaos {} (seed {}, {} backend, {} s): {}", s.name, s.seed, s.backend, s.duration_s, s.description);
    let control = Arc::new(Control::up(&out.join("cluster"), &s.config, s.backend)?);
    let clock = Clock::new();
    let rec = Recorder::new(clock.clone());
    let skus: Vec<String> = (0..s.workload.skus).map(|i| format!("sku-{i}")).collect();
    let workload = Workload { spec: s.workload.clone(), skus: skus.clone(), seed: s.seed };
    let until = clock.at(s.duration_s);
    let nemesis = tokio::spawn(super::nemesis::run(control.clone(), s.nemesis.clone(), s.seed, clock.clone()));
    workload.run(control.clone(), rec.clone(), until).await?;
    let faults = nemesis.await??;
    let history = rec.take().await;
    let final_state = gather(&control, &clock, &history, &skus, faults, Duration::from_secs_f64(s.converge_within_s)).await;
    let rebalancing = control.config.replication.low_water_units > 0;
    let opts = CheckOptions { convergence_ms_max: Some((s.converge_within_s * 1000.0) as u64), rebalancing, ..CheckOptions::default() };
    let report = check(&history, &final_state, &opts);
    write_run(out, &history, &final_state, &report)?;
    println!("{}", human(&report));
    println!("history, final state and reports in {}", out.display());
    drop(control);
    Ok(report)
}

fn write_run(out: &Path, history: &[Record], final_state: &FinalState, report: &CheckReport) -> anyhow::Result<()> {
    let lines: Vec<String> = history.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
    std::fs::write(out.join("history.jsonl"), lines.join("\n") + "\n")?;
    std::fs::write(out.join("final.json"), serde_json::to_string_pretty(final_state)?)?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(out.join("report.txt"), human(report))?;
    Ok(())
}

fn recheck(dir: &Path) -> anyhow::Result<CheckReport> {
    let (hpath, fpath) = (dir.join("history.jsonl"), dir.join("final.json"));
    let open = |p: &Path| std::fs::File::open(p).with_context(|| format!("open {}", p.display()));
    let history = super::history::read_history(std::io::BufReader::new(open(&hpath)?), &hpath.display().to_string())?;
    let final_state = super::history::read_final_state(open(&fpath)?, &fpath.display().to_string())?;
    Ok(check(&history, &final_state, &CheckOptions::default()))
}

/// Every node's escrow journal, joined by Raft entry: one move per (DC, shard, entry,
/// place in the entry), not before its proposal (or, where the proposing leader's record is gone, the
/// latest proposal of an earlier entry of the same term, which came before it), by the
/// first node's apply. Times move to the history's clock.
async fn escrow_moves(control: &Control, clock: &Clock) -> Escrow {
    type Entry = (String, u16, u64, u64); // (dc, shard, term, index)
    let mut proposed: BTreeMap<Entry, u64> = BTreeMap::new();
    // By entry and place in it: (SKU, change, first apply).
    let mut applied: BTreeMap<(Entry, u32), (String, i64, u64)> = BTreeMap::new();
    let mut incomplete = vec![];
    for node in control.config.nodes() {
        let Some(mut v) = control.admin_get(&node, "/v1/admin/escrow-journal").await else {
            incomplete.push(node.name.clone());
            continue;
        };
        let records: Vec<crate::escrow_journal::Record> = serde_json::from_value(v["records"].take()).unwrap_or_default();
        for r in records {
            match r {
                crate::escrow_journal::Record::Proposed { shard, term, index, at_ns } => {
                    let e = proposed.entry((node.dc.clone(), shard, term, index)).or_insert(at_ns);
                    *e = (*e).min(at_ns);
                }
                crate::escrow_journal::Record::Applied { shard, term, index, seq, sku, delta, at_ns } => {
                    let e = applied.entry(((node.dc.clone(), shard, term, index), seq)).or_insert((sku, delta, at_ns));
                    e.2 = e.2.min(at_ns);
                }
                crate::escrow_journal::Record::Truncated { .. } => incomplete.push(node.name.clone()),
            }
        }
    }
    let moves = applied
        .into_iter()
        .map(|(((dc, shard, term, index), seq), (sku, delta, by))| {
            let exact = proposed.get(&(dc.clone(), shard, term, index)).copied();
            let earlier = || proposed.range((dc.clone(), shard, term, 0)..(dc.clone(), shard, term, index)).map(|(_, t)| *t).max();
            let not_before = exact.or_else(earlier).map_or(0, |t| clock.from_monotonic_ns(t).saturating_sub(CLOCK_SLACK_NS));
            let entry = format!("{term}.{index}.{seq}");
            EscrowMove { dc, sku, delta, not_before_ns: not_before, by_ns: clock.from_monotonic_ns(by).saturating_add(CLOCK_SLACK_NS), entry }
        })
        .collect();
    incomplete.dedup();
    Escrow { moves, incomplete }
}

/// The history's clock and the nodes' `CLOCK_MONOTONIC` were read a few microseconds
/// apart: journal windows are widened by this much so that the gap cannot narrow them.
const CLOCK_SLACK_NS: u64 = 1_000_000;

/// This DC's answer for every session the history acknowledged: its version, or `None`
/// for a 404. Tokens whose read got no definite answer are left out.
async fn final_sessions(control: &Control, node: &crate::config::NodeInfo, history: &[Record]) -> BTreeMap<String, Option<SessionVersion>> {
    let tokens: BTreeSet<&str> = history
        .iter()
        .filter(|r| r.outcome == Outcome::Ok)
        .filter_map(|r| match &r.op {
            Op::Session { token: Some(t), .. } => Some(t.as_str()),
            _ => None,
        })
        .collect();
    let mut out = BTreeMap::new();
    for t in tokens {
        match control.get_answer(node, &format!("/v1/sessions/{t}?consistency=stale")).await {
            Some((200, v)) => {
                out.insert(t.to_string(), SessionVersion::of_answer(&v));
            }
            Some((404, _)) => {
                out.insert(t.to_string(), None);
            }
            _ => {}
        }
    }
    out
}

/// Waits for equal digests in every DC (up to `within`), then reads each DC's view of
/// every SKU and looks up every acknowledged order there.
async fn gather(control: &Control, clock: &Clock, history: &[Record], skus: &[String], nemesis: Nemesis, within: Duration) -> FinalState {
    let healed = Instant::now();
    let dcs = control.config.dc_names();
    let mut converged_after_ms = None;
    while healed.elapsed() < within {
        let mut digests = Vec::new();
        for dc in &dcs {
            if let Some(n) = control.any_node(dc).await {
                digests.extend(control.get(&n, "/v1/cluster/digest").await.and_then(|d| d["all"].as_str().map(String::from)));
            }
        }
        if digests.len() == dcs.len() && digests.windows(2).all(|w| w[0] == w[1]) {
            converged_after_ms = Some(healed.elapsed().as_millis() as u64);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let acked: Vec<(String, String)> = history
        .iter()
        .filter(|r| r.outcome == Outcome::Ok)
        .filter_map(|r| match &r.op {
            Op::Order { sku, order_id: Some(id), .. } => Some((sku.clone(), id.clone())),
            _ => None,
        })
        .collect();
    let escrow = escrow_moves(control, clock).await;
    let mut out = FinalState { dcs: Default::default(), nemesis, escrow };
    for dc in dcs {
        let Some(node) = control.any_node(&dc).await else { continue };
        let digest = control.get(&node, "/v1/cluster/digest").await.and_then(|d| d["all"].as_str().map(String::from)).unwrap_or_default();
        let mut state = DcState { digest, converged_after_ms, skus: Default::default(), sessions: final_sessions(control, &node, history).await };
        for sku in skus {
            let inventory: InventoryView = match control.get(&node, &format!("/v1/inventory/{sku}?consistency=stale")).await {
                Some(v) => serde_json::from_value(v).unwrap_or_default(),
                None => InventoryView::default(),
            };
            let mut s = SkuState { inventory, ..Default::default() };
            for (_, id) in acked.iter().filter(|(k, _)| k == sku) {
                match control.get(&node, &format!("/v1/orders/{id}?consistency=stale")).await {
                    Some(o) => {
                        if o["status"] == "cancelled" {
                            s.orders_cancelled.push(id.clone());
                        }
                        s.orders_present.push(id.clone());
                    }
                    None => s.orders_missing.push(id.clone()),
                }
            }
            state.skus.insert(sku.clone(), s);
        }
        out.dcs.insert(dc, state);
    }
    out
}
