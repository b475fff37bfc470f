//! Nemeses: the scenario's faults, applied through the launcher at their scheduled times
//! and undone after their hold — recorded as fault windows and leader kills for the
//! checker. Random choices come from the scenario's seed, so a seed replays its schedule.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::control::Control;
use super::history::{FaultWindow, LeaderKill, Nemesis};
use super::scenario::{Action, Step};
use super::workload::Clock;

/// Runs every step on its schedule; returns what happened when.
pub async fn run(control: Arc<Control>, steps: Vec<Step>, seed: u64, clock: Clock) -> anyhow::Result<Nemesis> {
    let mut tasks = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        let (control, clock) = (control.clone(), clock.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(i as u64));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(clock.at(step.at_s)).await;
            apply(&control, &step, &mut rng, &clock).await
        }));
    }
    let mut out = Nemesis::default();
    for t in tasks {
        let (window, kill) = t.await??;
        out.faults.push(window);
        out.leader_kills.extend(kill);
    }
    Ok(out)
}

fn dc_of(node: &str) -> String {
    node.split('-').next().unwrap_or(node).to_string()
}

/// The step's DC: its target's, or one picked by the seed.
fn pick_dc(control: &Control, step: &Step, rng: &mut StdRng) -> String {
    match &step.target {
        Some(t) => dc_of(t),
        None => control.config.dc_names().choose(rng).cloned().unwrap_or_else(|| "dc1".into()),
    }
}

fn pick_node(control: &Control, dc: &str, rng: &mut StdRng) -> String {
    control.nodes(dc).choose(rng).map(|n| n.name.clone()).unwrap_or_default()
}

async fn leader_or_random(control: &Control, step: &Step, dc: &str, rng: &mut StdRng) -> String {
    if let Some(t) = step.target.as_ref().filter(|t| t.contains("-n")) {
        return t.clone();
    }
    match control.leader(dc).await {
        Some(l) => l,
        None => pick_node(control, dc, rng),
    }
}

/// One `agora cluster` command; it blocks for up to seconds, so off the async workers.
async fn cluster(control: &Control, args: Vec<String>) -> anyhow::Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tokio::task::block_in_place(|| control.cluster(&args))
}

/// `agora cluster remove-node|add-node NODE`, tried again every second for up to
/// `within_s` while it is refused (a partition or an election under way); says how it
/// ended, for the fault's name. A change never done leaves the DC as it was, which the
/// checker judges like any other state.
async fn membership_until_done(control: &Control, cmd: &str, node: &str, within_s: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(within_s.max(1.0));
    let mut tries = 0u32;
    loop {
        tries = tries.saturating_add(1);
        match cluster(control, s(&[cmd, node])).await {
            Ok(()) => return format!("done, {tries} tries"),
            Err(e) if tokio::time::Instant::now() >= deadline => return format!("refused after {tries} tries: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Applies one fault, holds it, undoes it.
async fn apply(control: &Control, step: &Step, rng: &mut StdRng, clock: &Clock) -> anyhow::Result<(FaultWindow, Option<LeaderKill>)> {
    let dc = pick_dc(control, step, rng);
    let start_ns = clock.now_ns();
    let mut kill = None;
    let (name, undo): (String, Vec<String>) = match step.action {
        Action::KillRandom => {
            let node = step.target.clone().filter(|t| t.contains("-n")).unwrap_or_else(|| pick_node(control, &dc, rng));
            cluster(control, s(&["kill", &node])).await?;
            (format!("kill {node}"), s(&["restart", &node]))
        }
        Action::KillLeader => {
            let node = leader_or_random(control, step, &dc, rng).await;
            cluster(control, s(&["kill", &node])).await?;
            kill = Some(LeaderKill { dc: dc.clone(), node: node.clone(), at_ns: clock.now_ns() });
            (format!("kill {dc} leader {node}"), s(&["restart", &node]))
        }
        Action::RestartLeader => {
            let node = leader_or_random(control, step, &dc, rng).await;
            kill = Some(LeaderKill { dc: dc.clone(), node: node.clone(), at_ns: clock.now_ns() });
            cluster(control, s(&["restart", &node])).await?;
            (format!("restart {dc} leader {node} (graceful)"), Vec::new())
        }
        Action::PauseLeader => {
            let node = leader_or_random(control, step, &dc, rng).await;
            cluster(control, s(&["pause", &node])).await?;
            (format!("pause {dc} leader {node}"), s(&["resume", &node]))
        }
        Action::IsolateLeader => {
            let node = leader_or_random(control, step, &dc, rng).await;
            cluster(control, s(&["partition", &node])).await?;
            (format!("isolate {dc} leader {node}"), s(&["heal"]))
        }
        Action::SplitDc => {
            let node = pick_node(control, &dc, rng);
            let rest: Vec<String> = control.nodes(&dc).into_iter().map(|n| n.name).filter(|n| *n != node).collect();
            cluster(control, vec!["partition".into(), node.clone(), rest.join(",")]).await?;
            (format!("split {dc}: {node} | {}", rest.join(",")), s(&["heal"]))
        }
        Action::CutDc => {
            cluster(control, s(&["partition", &dc])).await?;
            (format!("cut {dc} off"), s(&["heal"]))
        }
        Action::CutAll => {
            let mut args = s(&["partition"]);
            args.extend(control.config.dc_names());
            cluster(control, args).await?;
            ("cut all DCs apart".into(), s(&["heal"]))
        }
        Action::Latency => {
            cluster(control, s(&["latency", &step.ms.to_string()])).await?;
            (format!("{} ms between DCs", step.ms), s(&["latency", "0"]))
        }
        Action::ClockSkew => {
            let node = leader_or_random(control, step, &dc, rng).await;
            cluster(control, vec!["clock".into(), node.clone(), step.skew_ms.to_string()]).await?;
            (format!("clock of {node} {:+} ms", step.skew_ms), vec!["clock".into(), node, "0".into()])
        }
        Action::DiskFault => {
            let node = leader_or_random(control, step, &dc, rng).await;
            let fault = step.disk.ok_or_else(|| anyhow::anyhow!("disk-fault without disk"))?;
            cluster(control, s(&["disk", &node, fault.name()])).await?;
            // Counted like a kill: the DC's time to its next write is what a failed disk costs.
            kill = Some(LeaderKill { dc: dc.clone(), node: node.clone(), at_ns: clock.now_ns() });
            (format!("disk of {dc} node {node}: {fault:?}"), s(&["restart", &node]))
        }
        Action::MoveReplicas => {
            let node = step.target.clone().filter(|t| t.contains("-n")).unwrap_or_else(|| pick_node(control, &dc, rng));
            let off = membership_until_done(control, "remove-node", &node, step.hold_s).await;
            tokio::time::sleep(Duration::from_secs_f64(step.hold_s)).await;
            let on = membership_until_done(control, "add-node", &node, step.hold_s).await;
            let name = format!("replicas of {node} moved off ({off}) and back ({on})");
            return Ok((FaultWindow { name, start_ns, end_ns: clock.now_ns() }, None));
        }
        Action::RollingRestart => {
            let nodes = control.config.node_names();
            let pause = Duration::from_secs_f64(step.hold_s / nodes.len().max(1) as f64);
            for n in &nodes {
                cluster(control, s(&["restart", n])).await?;
                tokio::time::sleep(pause).await;
            }
            let end_ns = clock.now_ns();
            return Ok((FaultWindow { name: "rolling restart".into(), start_ns, end_ns }, None));
        }
    };
    tokio::time::sleep(Duration::from_secs_f64(step.hold_s)).await;
    if !undo.is_empty() {
        cluster(control, undo).await?;
    }
    Ok((FaultWindow { name, start_ns, end_ns: clock.now_ns() }, kill))
}
