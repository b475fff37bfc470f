//! The chaos suite's smoke set, run as the README's test command runs it: real clusters,
//! real faults, and the checker's verdict — plus proof that a tampered run is caught.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::fixed_addresses;

fn agora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agora"))
}

/// Runs a scenario into a temporary directory; returns the exit code and the run dir.
/// A run that is not valid leaves its evidence behind (see [`keep_evidence`]).
fn must_run(scenario: &str) -> (i32, tempfile::TempDir) {
    let _fixed = fixed_addresses();
    let out = tempfile::tempdir().expect("temp dir");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("chaos/scenarios").join(scenario);
    let status =
        agora().current_dir(env!("CARGO_MANIFEST_DIR")).args(["chaos", "run"]).arg(&file).arg("--out").arg(out.path()).status().expect("run agora chaos");
    let code = status.code().unwrap_or(-1);
    if code != 0 {
        keep_evidence(out.path(), scenario);
    }
    (code, out)
}

/// Copies a failed run's history, final state, reports, node logs and escrow journals
/// (not the data stores) under the test build's temp dir, and says where.
fn keep_evidence(run: &Path, scenario: &str) {
    let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-failures").join(format!("{scenario}-{}", std::process::id()));
    let keep = |p: &Path| p.extension().is_some_and(|e| ["json", "jsonl", "txt", "log", "toml"].iter().any(|k| e == *k));
    for p in files_under(run).into_iter().filter(|p| keep(p)) {
        let to = dest.join(p.strip_prefix(run).expect("under the run"));
        let _ = std::fs::create_dir_all(to.parent().expect("a parent"));
        let _ = std::fs::copy(&p, &to);
    }
    eprintln!("chaos run {scenario} failed; its evidence is in {}", dest.display());
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files
}

/// The lines of the run's node logs that contain `text`.
fn logged(run: &Path, text: &str) -> Vec<String> {
    let logs = files_under(run).into_iter().filter(|p| p.extension().is_some_and(|e| e == "log"));
    logs.flat_map(|p| std::fs::read_to_string(p).unwrap_or_default().lines().filter(|l| l.contains(text)).map(String::from).collect::<Vec<_>>()).collect()
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("report.json")).expect("report is JSON")
}

#[test]
fn chaos_leader_kill_is_valid_and_a_lost_order_is_caught() {
    let (code, out) = must_run("leader-kill.toml");
    let r = report(out.path());
    assert_eq!(code, 0, "leader-kill run invalid: {r:#}");
    assert_eq!(r["valid"], true);
    grants_and_sessions_are_checked(out.path(), &r);

    // Tamper with the recorded final state: one acknowledged order vanishes from dc2.
    let final_path: PathBuf = out.path().join("final.json");
    let mut f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&final_path).unwrap()).unwrap();
    let sku = f["dcs"]["dc2"]["skus"].as_object().unwrap().keys().next().unwrap().clone();
    let present = f["dcs"]["dc2"]["skus"][&sku]["orders_present"].as_array_mut().unwrap();
    let lost = present.pop().expect("an acknowledged order");
    f["dcs"]["dc2"]["skus"][&sku]["orders_missing"].as_array_mut().unwrap().push(lost.clone());
    std::fs::write(&final_path, serde_json::to_string(&f).unwrap()).unwrap();
    let out2 = agora().args(["chaos", "check"]).arg(out.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out2.stdout);
    assert_ne!(out2.status.code(), Some(0), "the checker must reject a lost order:\n{text}");
    assert!(text.contains(lost.as_str().unwrap()), "the report names the lost order:\n{text}");
}

/// What rebalancing and sessions add to a valid run: grants happened and were placed in
/// the stock model, sessions were logged out and read; then the run's final state is
/// tampered with twice (and put back), and each is caught.
fn grants_and_sessions_are_checked(dir: &Path, r: &serde_json::Value) {
    assert!(r["linearizability"]["grants"].as_u64().unwrap_or(0) > 0, "rebalancing moved stock: {r:#}");
    assert_eq!(r["linearizability"]["unchecked_keys"].as_array().map(Vec::len), Some(0), "every key checked: {r:#}");
    assert!(r["sessions"]["logged_out"].as_u64().unwrap_or(0) > 0 && r["sessions"]["reads_checked"].as_u64().unwrap_or(0) > 0, "{r:#}");
    let final_path: PathBuf = dir.join("final.json");
    let original = std::fs::read_to_string(&final_path).unwrap();
    let check = |f: &serde_json::Value| {
        std::fs::write(&final_path, serde_json::to_string(f).unwrap()).unwrap();
        let o = agora().args(["chaos", "check"]).arg(dir).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).to_string())
    };

    // Every grant moved 2 s later than the nodes journaled it: the reads no longer fit.
    let mut f: serde_json::Value = serde_json::from_str(&original).unwrap();
    for m in f["escrow"]["moves"].as_array_mut().unwrap() {
        for field in ["not_before_ns", "by_ns"] {
            m[field] = (m[field].as_u64().unwrap() + 2_000_000_000).into();
        }
    }
    let (status, text) = check(&f);
    assert_ne!(status, Some(0), "grants out of place must fail the stock model:\n{text}");
    assert!(text.contains("FAIL linearizable"), "{text}");

    // A session never logged out is gone from one DC.
    let mut f: serde_json::Value = serde_json::from_str(&original).unwrap();
    let sessions = f["dcs"]["dc2"]["sessions"].as_object_mut().unwrap();
    let live = sessions.iter().find(|(_, v)| !v.is_null()).map(|(k, _)| k.clone()).expect("a live session");
    sessions.insert(live.clone(), serde_json::Value::Null);
    let (status, text) = check(&f);
    assert_ne!(status, Some(0), "a lost session must be caught:\n{text}");
    assert!(text.contains(&live), "the report names it:\n{text}");
    std::fs::write(&final_path, original).unwrap();
}

/// Three shards per DC; the node that leads most of them is killed.
#[test]
fn chaos_sharded_leader_kill_is_valid() {
    let (code, out) = must_run("sharded-leader-kill.toml");
    let r = report(out.path());
    assert_eq!(code, 0, "sharded-leader-kill run invalid: {r:#}");
    assert_eq!(r["availability"]["leader_kills"].as_array().map(Vec::len), Some(2), "both kills happened: {r:#}");
}

/// Shards on subsets of dc1's five nodes: a node's replicas move off and back while a
/// node of dc1 is cut from the rest; both moves are made, and the run is valid.
#[test]
fn chaos_replica_moves_under_a_partition_are_valid() {
    let (code, out) = must_run("subset-moves.toml");
    let r = report(out.path());
    assert_eq!(code, 0, "subset-moves run invalid: {r:#}");
    let fin = std::fs::read_to_string(out.path().join("final.json")).expect("final.json");
    assert!(fin.contains("moved off (done") && fin.contains("and back (done"), "both moves were made: {r:#}");
}

/// Shards on subsets of dc1's five nodes: dc1-n3 (node 103), which holds both entity
/// shards, is dead for longer than `replace_dead_after_s`; each shard's leader moves its
/// replica to a living node, and the run is valid.
#[test]
fn chaos_a_dead_nodes_replicas_move_under_load_and_the_run_is_valid() {
    let (code, out) = must_run("subset-dead-node.toml");
    let r = report(out.path());
    assert_eq!(code, 0, "subset-dead-node run invalid: {r:#}");
    let moves = logged(out.path(), "moving a dead node's replica");
    for shard in ["shard=1 ", "shard=2 "] {
        assert!(moves.iter().any(|l| l.contains(shard) && l.contains("dead=103")), "{shard}moved off dc1-n3: {moves:#?}");
    }
}

#[test]
fn chaos_pause_leader_is_valid() {
    let (code, out) = must_run("pause-leader.toml");
    assert_eq!(code, 0, "pause-leader run invalid: {:#}", report(out.path()));
}

#[test]
fn chaos_cut_dc_on_netns_is_valid() {
    let (code, out) = must_run("cut-dc.toml");
    assert_eq!(code, 0, "cut-dc run invalid: {:#}", report(out.path()));
}

#[test]
fn chaos_clock_skew_is_valid_with_no_valid_request_refused_as_malformed() {
    let (code, out) = must_run("clock-skew.toml");
    let r = report(out.path());
    assert_eq!(code, 0, "clock-skew run invalid: {r:#}");
    assert!(r["wrongly_refused"]["checked"].as_u64().unwrap_or(0) > 0, "answers were checked: {r:#}");
    let windows = r["availability"]["windows"].as_array().expect("fault windows");
    assert!(windows.iter().any(|w| w["name"].as_str().is_some_and(|n| n.contains("clock of"))), "the skews happened: {r:#}");
}

/// dc1's leader's fsync fails, then dc2's leader's disk fills: each stops acknowledging,
/// its DC elects another leader, and nothing acknowledged is lost.
#[test]
fn chaos_disk_faults_are_valid() {
    let (code, out) = must_run("disk-fault.toml");
    let r = report(out.path());
    assert_eq!(code, 0, "disk-fault run invalid: {r:#}");
    assert_eq!(r["availability"]["leader_kills"].as_array().map(Vec::len), Some(2), "both disks failed: {r:#}");
}

/// The docker backend: dc1's leader container is killed twice, then (another run) dc1's
/// containers are cut off from the other DCs.
#[test]
fn chaos_on_containers_is_valid() {
    for scenario in ["docker-kill-leader.toml", "docker-cut-dc.toml"] {
        let (code, out) = must_run(scenario);
        assert_eq!(code, 0, "{scenario} run invalid: {:#}", report(out.path()));
    }
}

/// A runner stopped by SIGTERM (as a test harness or an operator stops it) takes its
/// cluster down and exits 130: none of its nine nodes is left running.
#[test]
fn chaos_runner_stopped_by_sigterm_takes_its_cluster_down() {
    let _fixed = fixed_addresses();
    let out = tempfile::tempdir().expect("temp dir");
    let state = out.path().join("cluster");
    // Whatever happens below, nothing this test started outlives it.
    struct Down(PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = agora().args(["cluster", "down", "--state-dir"]).arg(&self.0).output();
        }
    }
    let _down = Down(state.clone());
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("chaos/scenarios/leader-kill.toml");
    let mut runner = agora()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["chaos", "run"])
        .arg(&file)
        .arg("--out")
        .arg(out.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start agora chaos run");
    let node_pids = || -> Vec<i32> {
        let files = std::fs::read_dir(state.join("pids")).into_iter().flatten().flatten();
        files.filter_map(|f| std::fs::read_to_string(f.path()).ok()?.split_whitespace().next()?.parse().ok()).collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let pids = loop {
        let pids = node_pids();
        if pids.len() == 9 {
            break pids;
        }
        assert!(std::time::Instant::now() < deadline, "the cluster did not come up: {pids:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // SAFETY: kill(2) with a pid this test spawned and a valid signal.
    assert_eq!(unsafe { libc::kill(runner.id() as i32, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = runner.try_wait().expect("wait for the runner") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the runner did not stop");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");
    // A node still running would still have its /proc entry naming this run's state dir.
    let running: Vec<i32> = pids
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*state.to_string_lossy())))
        .collect();
    assert!(running.is_empty(), "nodes left running: {running:?}");
}
