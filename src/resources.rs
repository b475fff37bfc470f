//! What the node process holds of the machine, measured at each `/metrics` scrape: its
//! resident memory against the memory it may use, and its data dir against the free
//! space of the filesystem it is on — so an alert can fire before either bound is hit.

use std::path::Path;

/// One scrape's measures; `None` where the platform did not say.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resources {
    /// Resident set size of this process (`/proc/self/statm`).
    pub rss_bytes: Option<u64>,
    /// The cgroup's memory limit (`memory.max`) or, without one, the machine's memory.
    pub memory_limit_bytes: Option<u64>,
    /// Bytes of the files in the data dir (sled, snapshot), not descending further.
    pub data_dir_bytes: Option<u64>,
    /// Size and space left for an unprivileged writer on the data dir's filesystem.
    pub fs_size_bytes: Option<u64>,
    pub fs_free_bytes: Option<u64>,
}

pub fn measure(data_dir: &Path) -> Resources {
    let (fs_size_bytes, fs_free_bytes) = fs_space(data_dir).unzip();
    Resources { rss_bytes: rss_bytes(), memory_limit_bytes: memory_limit(), data_dir_bytes: dir_bytes(data_dir), fs_size_bytes, fs_free_bytes }
}

/// Prometheus text for the measures taken; a measure the platform did not give is left out.
pub fn render(r: &Resources, labels: &str) -> String {
    let rows = [
        ("process_resident_memory_bytes", "resident memory of the node process", r.rss_bytes),
        ("memory_limit_bytes", "memory the process may use: its cgroup's memory.max, else the machine's memory", r.memory_limit_bytes),
        ("data_dir_bytes", "bytes of the files in the node's data dir", r.data_dir_bytes),
        ("data_fs_size_bytes", "size of the filesystem holding the data dir", r.fs_size_bytes),
        ("data_fs_free_bytes", "space left for the node on the filesystem holding the data dir", r.fs_free_bytes),
    ];
    rows.iter().filter_map(|(name, help, v)| Some(crate::metrics::text_sample(name, "gauge", help, labels, (*v)?))).collect()
}

fn page_size() -> Option<u64> {
    // SAFETY: sysconf reads a constant of the running system; no memory is touched.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0)
}

/// Second field of `/proc/self/statm`: resident pages, in bytes.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size()?)
}

fn memory_limit() -> Option<u64> {
    cgroup_memory_max().or_else(mem_total)
}

/// cgroup v2's `memory.max` of this process's cgroup ("max": no limit).
fn cgroup_memory_max() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim_end_matches('/'))).ok()?;
    max.trim().parse().ok()
}

fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    kib.checked_mul(1024)
}

fn dir_bytes(dir: &Path) -> Option<u64> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(entries.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).fold(0u64, |sum, m| sum.saturating_add(m.len())))
}

/// (size, available) of the filesystem holding `dir`.
// statvfs's field types are u64 here but narrower on 32-bit targets.
#[allow(clippy::useless_conversion)]
fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = u64::from(st.f_frsize);
    Some((u64::from(st.f_blocks).checked_mul(frsize)?, u64::from(st.f_bavail).checked_mul(frsize)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_this_process_and_a_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        let r = measure(dir.path());
        assert!(r.rss_bytes.unwrap() > 1 << 20, "{r:?}");
        assert!(r.memory_limit_bytes.unwrap() >= r.rss_bytes.unwrap(), "{r:?}");
        assert_eq!(r.data_dir_bytes, Some(1000));
        assert!(r.fs_free_bytes.unwrap() <= r.fs_size_bytes.unwrap(), "{r:?}");
        let text = render(&r, "node=\"n\"");
        assert!(text.contains("agora_data_dir_bytes{node=\"n\"} 1000\n"), "{text}");
        assert_eq!(render(&Resources::default(), ""), "");
    }
}
