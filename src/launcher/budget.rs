//! CPU budgets per node (`agora cluster up --cpus 0.25`): each node process goes into its
//! own cgroup of the cgroup v1 cpu controller, `/sys/fs/cgroup/cpu/agora/<node>`, whose
//! CFS quota lets it run that many CPUs' worth of time per period (100 ms unless
//! `--cpu-period-ms` says otherwise). How one small machine stands in for several: a node
//! cannot borrow its neighbours' cores.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

const ROOT: &str = "/sys/fs/cgroup/cpu/agora";
/// The CFS period, as docker and Kubernetes set it.
pub const PERIOD_MS_DEFAULT: u64 = 100;
/// A budget outside this range is a typo (a thousandth of a CPU) or no budget at all.
pub const CPUS_MIN: f64 = 0.01;
pub const CPUS_MAX: f64 = 256.0;
/// The kernel takes CFS periods of 1 ms to 1 s.
const PERIOD_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=1000;

/// `--cpus` and `--cpu-period-ms` as given on the command line.
pub fn check(cpus: f64, period_ms: u64) -> Result<()> {
    ensure!((CPUS_MIN..=CPUS_MAX).contains(&cpus), "--cpus must be {CPUS_MIN}..={CPUS_MAX}, not {cpus}");
    ensure!(PERIOD_MS_RANGE.contains(&period_ms), "--cpu-period-ms must be {}..={}, not {period_ms}", PERIOD_MS_RANGE.start(), PERIOD_MS_RANGE.end());
    // The kernel refuses a quota under 1 ms.
    ensure!(cpus * period_ms as f64 >= 1.0, "--cpus {cpus} over {period_ms} ms is under the kernel's 1 ms minimum quota: a longer --cpu-period-ms");
    ensure!(PathBuf::from("/sys/fs/cgroup/cpu").is_dir(), "--cpus needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu");
    Ok(())
}

fn group(node: &str) -> PathBuf {
    PathBuf::from(ROOT).join(node)
}

/// Puts `pid` (all its threads, and those it starts later) under a budget of `cpus`,
/// counted over `period_ms`.
pub fn apply(node: &str, pid: i32, cpus: f64, period_ms: u64) -> Result<()> {
    check(cpus, period_ms)?;
    let dir = group(node);
    std::fs::create_dir_all(&dir).with_context(|| format!("create cgroup {}", dir.display()))?;
    // In range, so both are small positive numbers of microseconds.
    let period_us = period_ms * 1000;
    let quota_us = (cpus * period_us as f64).round() as u64;
    let write = |file: &str, value: String| std::fs::write(dir.join(file), value).with_context(|| format!("write {}/{file}", dir.display()));
    // Unbounded first: a group reused from an earlier start may hold a quota the new
    // period would not take.
    write("cpu.cfs_quota_us", "-1".to_string())?;
    write("cpu.cfs_period_us", period_us.to_string())?;
    write("cpu.cfs_quota_us", quota_us.to_string())?;
    write("cgroup.procs", pid.to_string())
}

/// Removes the node's cgroup once its process is gone (an empty cgroup is removed with
/// rmdir; one still in use stays, and is reused by the next start).
pub fn remove(node: &str) {
    let _ = std::fs::remove_dir(group(node));
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn a_budget_the_kernel_would_refuse_is_refused_before_any_cgroup_is_made() {
        for (cpus, period_ms, says) in [(0.001, 100, "--cpus"), (0.25, 0, "--cpu-period-ms"), (0.25, 1001, "--cpu-period-ms"), (0.05, 10, "1 ms minimum quota")]
        {
            let e = check(cpus, period_ms).expect_err("refused").to_string();
            assert!(e.contains(says), "{cpus} CPUs per {period_ms} ms: {e}");
        }
    }
}
