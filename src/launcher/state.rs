//! The state directory (default `.agora/`): the effective cluster file, run metadata,
//! pid files, logs and data dirs. Everything the launcher knows about a running cluster
//! is here, so any later command (and a test's clean-up) finds its processes by pid file.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Backend;

/// Env var that overrides the default state dir (tests set it so they never collide).
pub const STATE_DIR_ENV: &str = "AGORA_STATE_DIR";

/// What `up` recorded: later commands act on the same backend and re-apply the same faults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub backend: Backend,
    pub wan_latency_ms: u64,
    /// Nodes start with `--enable-test-hooks` (fault rules, clock skew, actor crashes).
    #[serde(default)]
    pub test_hooks: bool,
    /// What applies `wan_latency_ms`: the nodes' transport or tc netem.
    #[serde(default)]
    pub wan_via: super::wan::WanVia,
    /// Node pairs (sorted) whose traffic is dropped, until `heal`.
    pub cuts: BTreeSet<(String, String)>,
    /// Each node's CPU budget, in CPUs (`--cpus`), kept across restarts.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// The period `cpus` is counted over, in ms (`--cpu-period-ms`; `None`: the default).
    #[serde(default)]
    pub cpu_period_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// `--state-dir`, else `$AGORA_STATE_DIR`, else `.agora`; made absolute because node
    /// processes and containers get these paths from a different working directory.
    pub fn resolve(flag: Option<PathBuf>) -> Result<StateDir> {
        let dir = flag.or_else(|| std::env::var_os(STATE_DIR_ENV).map(PathBuf::from)).unwrap_or_else(|| PathBuf::from(".agora"));
        let root = if dir.is_absolute() { dir } else { std::env::current_dir().context("read current directory")?.join(dir) };
        Ok(StateDir { root })
    }

    /// Short id of this state dir, used to name namespaces, links and containers so that
    /// two clusters (two state dirs) never touch each other's.
    pub fn tag(&self) -> String {
        let h = Sha256::digest(self.root.to_string_lossy().as_bytes());
        hex::encode(&h[..3])
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("cluster.toml")
    }
    fn meta_path(&self) -> PathBuf {
        self.root.join("meta.json")
    }
    fn pid_path(&self, node: &str) -> PathBuf {
        self.root.join("pids").join(format!("{node}.pid"))
    }
    pub fn log_path(&self, node: &str) -> PathBuf {
        self.root.join("logs").join(format!("{node}.log"))
    }
    /// The cluster's CA, node and admin certificates and the admin token (`up` creates them).
    pub fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }
    pub fn data_dir(&self, node: &str) -> PathBuf {
        self.root.join("data").join(node)
    }

    pub fn create_dirs(&self) -> Result<()> {
        for d in ["pids", "logs", "data"] {
            let p = self.root.join(d);
            std::fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        }
        Ok(())
    }

    pub fn read_meta(&self) -> Result<Option<Meta>> {
        let path = self.meta_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// The metadata of the cluster this state dir describes, or a hint to start one.
    pub fn must_meta(&self) -> Result<Meta> {
        match self.read_meta()? {
            Some(m) => Ok(m),
            None => bail!("no cluster in {} (start one with `agora cluster up`)", self.root.display()),
        }
    }

    pub fn write_meta(&self, meta: &Meta) -> Result<()> {
        write_atomic(&self.meta_path(), serde_json::to_string_pretty(meta)?.as_bytes())
    }

    /// Records the node's pid with its start time: pids are reused (`pid_max` may be
    /// 32768), and another cluster's node of the same name must never pass for this one.
    pub fn write_pid(&self, node: &str, pid: i32) -> Result<()> {
        let started = start_time(pid).map(|t| format!(" {t}")).unwrap_or_default();
        write_atomic(&self.pid_path(node), format!("{pid}{started}\n").as_bytes())
    }

    pub fn read_pid(&self, node: &str) -> Option<i32> {
        self.read_pid_record(node).map(|(pid, _)| pid)
    }

    /// The pid and, when recorded, the process's start time.
    fn read_pid_record(&self, node: &str) -> Option<(i32, Option<u64>)> {
        let text = std::fs::read_to_string(self.pid_path(node)).ok()?;
        let mut fields = text.split_whitespace();
        let pid = fields.next()?.parse().ok()?;
        Some((pid, fields.next().and_then(|t| t.parse().ok())))
    }

    pub fn remove_pid(&self, node: &str) {
        let _ = std::fs::remove_file(self.pid_path(node));
    }

    /// The node's pid if its pid file names a live process that is that node, started
    /// when the pid was recorded: a pid reused by another program, or by a node of the
    /// same name in another cluster, does not count.
    pub fn live_pid(&self, node: &str) -> Option<i32> {
        let (pid, started) = self.read_pid_record(node)?;
        (same_start(pid, started) && is_agora_node(pid, node)).then_some(pid)
    }

    /// Forgets the run (pid files, metadata, generated config and compose file) but keeps
    /// data and logs.
    pub fn clear_run(&self) -> Result<()> {
        remove_if_exists(&self.root.join("pids"))?;
        for f in [self.meta_path(), self.config_path(), self.root.join("docker-compose.yml")] {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }

    /// Removes data dirs and logs (`--wipe`).
    pub fn wipe(&self) -> Result<()> {
        remove_if_exists(&self.root.join("data"))?;
        remove_if_exists(&self.root.join("logs"))
    }

    /// The last `lines` lines of a node's log file.
    pub fn tail_log(&self, node: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(node)).unwrap_or_default();
        tail(&text, lines)
    }

    /// Prints a node's log, then (with `follow`) what is appended to it, until interrupted.
    pub fn print_log(&self, node: &str, lines: usize, follow: bool) -> Result<()> {
        let path = self.log_path(node);
        let mut file = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
        print!("{}", self.tail_log(node, lines));
        if !follow {
            return Ok(());
        }
        let mut pos = file.seek(SeekFrom::End(0))?;
        loop {
            let len = file.metadata()?.len();
            if len < pos {
                pos = 0; // truncated by `up --wipe`: start over
            }
            if len > pos {
                file.seek(SeekFrom::Start(pos))?;
                let mut reader = BufReader::new(&file);
                let mut line = String::new();
                while reader.read_line(&mut line)? > 0 {
                    print!("{line}");
                    line.clear();
                }
                pos = len;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].iter().map(|l| format!("{l}\n")).collect()
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", p.display())),
    }
}

/// Write then rename, so a crash never leaves a half-written pid or metadata file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {}", path.display()))
}

/// One-letter process state from /proc (R, S, T stopped, Z zombie, …); None if gone.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Alive and not a zombie (a killed node whose parent has not reaped it yet is gone).
pub fn pid_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Whether `pid` runs `agora node --node NODE` (directly, or as a container's init).
/// When `pid` started, in clock ticks after boot (`/proc/PID/stat`, field 22): with the
/// pid, it names one process for good.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is the process that started at `started` (unknown: taken on trust).
fn same_start(pid: i32, started: Option<u64>) -> bool {
    started.is_none_or(|t| start_time(pid) == Some(t))
}

fn is_agora_node(pid: i32, node: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    pid_alive(pid) && args.windows(2).any(|w| w[0] == b"--node" && w[1] == node.as_bytes())
}

pub fn signal(pid: i32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory effects; the pid came from our own pid file.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("send signal {sig} to pid {pid}"));
    }
    Ok(())
}

/// Waits until `pid` has exited, up to `deadline`.
pub fn wait_gone(pid: i32, deadline: Duration) -> bool {
    let start = Instant::now();
    while pid_alive(pid) {
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`.
pub fn stop_pid(pid: i32, grace: Duration) -> Result<()> {
    if !pid_alive(pid) {
        return Ok(());
    }
    // A paused node cannot act on SIGTERM: wake it first.
    let _ = signal(pid, libc::SIGCONT);
    let _ = signal(pid, libc::SIGTERM);
    if wait_gone(pid, grace) {
        return Ok(());
    }
    let _ = signal(pid, libc::SIGKILL);
    if !wait_gone(pid, Duration::from_secs(5)) {
        bail!("pid {pid} survived SIGKILL");
    }
    Ok(())
}

#[cfg(test)]
mod pid_tests {
    use super::*;

    /// A pid file names one process: the same pid with another start time (a reused pid)
    /// is not it, and a file without a start time (written before they were recorded)
    /// still reads.
    #[test]
    fn a_pid_file_names_one_process_by_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir { root: dir.path().to_path_buf() };
        st.create_dirs().unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        st.write_pid("n1", me).unwrap();
        let (pid, started) = st.read_pid_record("n1").unwrap();
        assert_eq!((pid, started), (me, start_time(me)));
        assert!(started.is_some(), "this process's start time is known");
        std::fs::write(st.pid_path("n1"), format!("{me} 1\n")).unwrap();
        assert_eq!(st.read_pid_record("n1"), Some((me, Some(1))));
        assert!(same_start(me, start_time(me)) && same_start(me, None));
        assert!(!same_start(me, Some(1)), "another start time: a reused pid, not this process");
        std::fs::write(st.pid_path("n1"), format!("{me}\n")).unwrap();
        assert_eq!(st.read_pid("n1"), Some(me));
    }
}
