//! CPU budgets per node (`agora cluster up --cpus 0.25`): each node process goes into its
//! own cgroup of the cgroup v1 cpu controller, `/sys/fs/cgroup/cpu/agora/<node>`, whose
//! CFS quota lets it run that many CPUs' worth of time per 100 ms period. How one small
//! machine stands in for several: a node cannot borrow its neighbours' cores.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

const ROOT: &str = "/sys/fs/cgroup/cpu/agora";
const PERIOD_US: u64 = 100_000;
/// A budget outside this range is a typo (a thousandth of a CPU) or no budget at all.
pub const CPUS_MIN: f64 = 0.01;
pub const CPUS_MAX: f64 = 256.0;

/// `--cpus` as given on the command line.
pub fn check(cpus: f64) -> Result<()> {
    ensure!((CPUS_MIN..=CPUS_MAX).contains(&cpus), "--cpus must be {CPUS_MIN}..={CPUS_MAX}, not {cpus}");
    ensure!(PathBuf::from("/sys/fs/cgroup/cpu").is_dir(), "--cpus needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu");
    Ok(())
}

fn group(node: &str) -> PathBuf {
    PathBuf::from(ROOT).join(node)
}

/// Puts `pid` (all its threads, and those it starts later) under a budget of `cpus`.
pub fn apply(node: &str, pid: i32, cpus: f64) -> Result<()> {
    check(cpus)?;
    let dir = group(node);
    std::fs::create_dir_all(&dir).with_context(|| format!("create cgroup {}", dir.display()))?;
    // In range, so the product is a small positive number of microseconds.
    let quota_us = (cpus * PERIOD_US as f64).round() as u64;
    let write = |file: &str, value: String| std::fs::write(dir.join(file), value).with_context(|| format!("write {}/{file}", dir.display()));
    write("cpu.cfs_period_us", PERIOD_US.to_string())?;
    write("cpu.cfs_quota_us", quota_us.to_string())?;
    write("cgroup.procs", pid.to_string())
}

/// Removes the node's cgroup once its process is gone (an empty cgroup is removed with
/// rmdir; one still in use stays, and is reused by the next start).
pub fn remove(node: &str) {
    let _ = std::fs::remove_dir(group(node));
}
