//! `agora cluster` end to end, on each backend: real processes, real network namespaces
//! with iptables drops, real containers. Each test has its own state dir
//! (`AGORA_STATE_DIR`), and a [`Launched`] guard that runs `down` and SIGKILLs by pid
//! whatever is left, even when the test fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agora::launcher::state::{pid_alive, StateDir};
use serde_json::{json, Value};

use crate::harness::{dig_short, fixed_addresses, must_eventually};

const AGORA: &str = env!("CARGO_BIN_EXE_agora");

struct Launched {
    dir: tempfile::TempDir,
    /// Every node pid seen, so the guard can kill leftovers by pid.
    seen_pids: Mutex<BTreeSet<i32>>,
    http: reqwest::Client,
}

impl Launched {
    fn new() -> Launched {
        Launched {
            dir: tempfile::tempdir().expect("temp dir"),
            seen_pids: Mutex::new(BTreeSet::new()),
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).no_proxy().build().expect("http client"),
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn agora(&self, args: &[&str]) -> Output {
        Command::new(AGORA).arg("cluster").args(args).env("AGORA_STATE_DIR", self.state()).output().expect("run agora cluster")
    }

    /// Runs `agora cluster ARGS`, panics unless it succeeds, returns stdout.
    fn must(&self, args: &[&str]) -> String {
        let out = self.agora(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "agora cluster {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        self.pids();
        stdout
    }

    /// Runs `agora cluster ARGS`, panics unless it fails, returns stderr.
    fn must_fail(&self, args: &[&str]) -> String {
        let out = self.agora(args);
        assert!(!out.status.success(), "agora cluster {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Pids from the pid files (and remembered for the guard).
    fn pids(&self) -> BTreeSet<i32> {
        let mut pids = BTreeSet::new();
        for e in std::fs::read_dir(self.state().join("pids")).into_iter().flatten().flatten() {
            // "PID START_TIME": the pid is the first field.
            if let Some(pid) = std::fs::read_to_string(e.path()).ok().and_then(|s| s.split_whitespace().next()?.parse().ok()) {
                pids.insert(pid);
            }
        }
        self.seen_pids.lock().unwrap().extend(&pids);
        pids
    }

    fn status(&self) -> Vec<Value> {
        serde_json::from_str(&self.must(&["status", "--json"])).expect("status json")
    }

    fn node<'a>(status: &'a [Value], name: &str) -> &'a Value {
        status.iter().find(|v| v["node"] == name).expect("node in status")
    }

    /// dc1's leader, once every dc1 node agrees on it.
    async fn must_dc1_leader(&self) -> String {
        must_eventually(Duration::from_secs(30), "an agreed dc1 leader", || async {
            let s = self.status();
            let dc1: Vec<&Value> = s.iter().filter(|v| v["dc"] == "dc1" && v["health"] == "ok").collect();
            let leaders: BTreeSet<&str> = dc1.iter().filter_map(|v| v["leader"].as_str()).collect();
            let l = leaders.iter().next()?.to_string();
            (dc1.len() == 3 && leaders.len() == 1 && dc1.iter().any(|v| v["node"] == l.as_str() && v["role"] == "leader")).then_some(l)
        })
        .await
    }

    async fn must_all_healthy(&self, deadline: Duration) {
        must_eventually(deadline, "9 healthy nodes", || async {
            let s = self.status();
            (s.len() == 9 && s.iter().all(|v| v["health"] == "ok")).then_some(())
        })
        .await;
    }

    fn api(&self, node: &str) -> String {
        Self::node(&self.status(), node)["api"].as_str().expect("api").to_string()
    }

    /// The node's admin API, as the status table shows it.
    fn admin(&self, node: &str) -> String {
        Self::node(&self.status(), node)["admin"].as_str().expect("admin").to_string()
    }

    async fn call(&self, method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, url.clone());
        if url.contains("/v1/admin/") {
            let token = agora::certs::read_token(&agora::certs::token_path(&self.state().join("certs"))).expect("the launcher's admin token");
            req = req.bearer_auth(token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    }

    /// Creates a session through `node`, retrying until the DC can commit it.
    async fn must_session(&self, node: &str, user: &str) -> String {
        let url = format!("{}/v1/sessions", self.api(node));
        must_eventually(Duration::from_secs(30), "a committed session", || async {
            let (code, v) = self.call(reqwest::Method::POST, url.clone(), Some(json!({"user": user}))).await;
            (code == 201).then(|| v["token"].as_str().expect("token").to_string())
        })
        .await
    }

    /// Whether `node` has the session in its own state (a stale read: no quorum needed).
    async fn has_session_locally(&self, node: &str, token: &str) -> bool {
        let url = format!("{}/v1/sessions/{token}?consistency=stale", self.api(node));
        self.call(reqwest::Method::GET, url, None).await.0 == 200
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new(AGORA).args(["cluster", "status"]).env("AGORA_STATE_DIR", self.state()).status();
        }
        self.pids();
        let _ = self.agora(&["down"]);
        // Whatever `down` missed: by pid, and only a process that is a node of this state dir.
        let marker = self.state().display().to_string();
        for &pid in self.seen_pids.lock().unwrap().iter() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if pid_alive(pid) && String::from_utf8_lossy(&cmdline).contains(&marker) {
                // SAFETY: kill(2) on a pid checked to be one of our nodes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The flow, up to a restarted leader and 9 healthy nodes; returns the pids of the
/// first start so the caller can check `down` removes them.
async fn up_write_kill_restart(l: &Launched, up: &[&str]) {
    let t = Instant::now();
    let out = l.must(up);
    assert!(out.contains("9 of 9 nodes healthy") && out.contains("curl -s") && out.contains("dig @"), "{out}");
    println!("up: {} ms", t.elapsed().as_millis());
    let pids = l.pids();
    assert_eq!(pids.len(), 9);
    let again = l.must(up);
    assert!(again.contains("already running"), "{again}");
    assert_eq!(l.pids(), pids, "a second `up` starts nothing");
    let err = l.must_fail(&["kill", "dc9-n9"]);
    assert!(err.contains("unknown node 'dc9-n9'") && err.contains("dc1-n1, dc1-n2"), "{err}");

    // A session and an order in dc1, readable (linearizably) from every dc1 node.
    let token = l.must_session("dc1-n1", "alice").await;
    let api = l.api("dc1-n2");
    let (code, v) = l.call(reqwest::Method::PUT, format!("{api}/v1/inventory/sku-1"), Some(json!({"add": 10}))).await;
    assert_eq!(code, 200, "restock: {v}");
    let order = json!({"session": token, "sku": "sku-1", "qty": 2});
    let (code, v) = l.call(reqwest::Method::POST, format!("{api}/v1/orders"), Some(order)).await;
    assert_eq!(code, 201, "order: {v}");
    let id = v["id"].as_str().expect("order id").to_string();
    for n in ["dc1-n1", "dc1-n2", "dc1-n3"] {
        // A linearizable read during an election answers 503 (retryable); once a leader is
        // known, every node has the order.
        let url = format!("{}/v1/orders/{id}", l.api(n));
        let v = must_eventually(Duration::from_secs(15), &format!("{n} reads the order"), || async {
            let (code, v) = l.call(reqwest::Method::GET, url.clone(), None).await;
            assert!(code == 200 || code == 503, "{n}: {code} {v}");
            (code == 200).then_some(v)
        })
        .await;
        assert_eq!(v["qty"].as_u64(), Some(2), "{n}: {v}");
    }

    // SIGKILL dc1's leader: its pid is gone, and the two others take writes again.
    let leader = l.must_dc1_leader().await;
    let pid = Launched::node(&l.status(), &leader)["pid"].as_i64().expect("pid") as i32;
    l.must(&["kill", &leader]);
    assert!(!pid_alive(pid), "{leader} (pid {pid}) should be dead");
    let survivor = ["dc1-n1", "dc1-n2", "dc1-n3"].into_iter().find(|n| *n != leader).unwrap();
    let t = Instant::now();
    l.must_session(survivor, "bob").await;
    println!("write after killing {leader}: {} ms", t.elapsed().as_millis());

    l.must(&["restart", &leader]);
    l.must_all_healthy(Duration::from_secs(60)).await;
}

/// `down` leaves no node process, pid file or metadata behind.
fn must_down(l: &Launched) {
    let pids = l.seen_pids.lock().unwrap().clone();
    l.must(&["down"]);
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} survived `down`");
    }
    assert!(l.pids().is_empty(), "pid files left behind");
    let status = l.agora(&["status"]);
    assert!(!status.status.success(), "status after down should say there is no cluster");
}

fn config_on(dir: &Path, net: u8) -> PathBuf {
    let text = agora::config::DEFAULT_TOML.replace("127.0.", &format!("127.{net}."));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test]
async fn process_backend_end_to_end() {
    let l = Launched::new();
    let config = config_on(l.dir.path(), 60);
    let config = config.to_str().unwrap();
    // A taken port fails clearly and starts nothing.
    let blocker = std::net::TcpListener::bind("127.60.2.2:7070").expect("bind blocker");
    let err = l.must_fail(&["up", "--config", config]);
    assert!(err.contains("dc2-n2's peer address 127.60.2.2:7070 is taken"), "{err}");
    assert!(l.pids().is_empty(), "nothing started");
    drop(blocker);
    let err = l.must_fail(&["partition", "dc1"]);
    assert!(err.contains("no cluster"), "{err}");

    // A node that dies at start fails `up` with the end of its log, and the others are stopped.
    let data = l.state().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("dc3-n3"), "not a directory").unwrap();
    let err = l.must_fail(&["up", "--config", config]);
    assert!(err.contains("dc3-n3 exited during start-up") && err.contains("open storage"), "{err}");
    assert!(l.seen_pids.lock().unwrap().iter().all(|p| !pid_alive(*p)), "the other nodes were stopped");
    std::fs::remove_file(data.join("dc3-n3")).unwrap();

    up_write_kill_restart(&l, &["up", "--config", config]).await;
    let err = l.must_fail(&["partition", "dc1"]);
    assert!(err.contains("--backend netns"), "{err}");
    let logs = l.must(&["logs", "dc1-n1", "-n", "100000"]);
    assert!(logs.contains("node started node=dc1-n1"), "{logs}");
    check_latency(&l).await;
    // Drain is an operator setting replicated to every DC: dc3 learns of dc2's drain.
    l.must(&["drain", "dc2"]);
    let settings = format!("{}/v1/admin/dcs", l.admin("dc3-n1"));
    must_eventually(Duration::from_secs(10), "dc2 drained as dc3 sees it", || async {
        let (_, v) = l.call(reqwest::Method::GET, settings.clone(), None).await;
        v["dcs"].as_array()?.iter().any(|d| d["dc"] == "dc2" && d["drained"] == true).then_some(())
    })
    .await;
    l.must(&["undrain", "dc2"]);
    l.must(&["weight", "dc1", "3"]);
    let err = l.must_fail(&["drain", "dc9"]);
    assert!(err.contains("unknown datacentre 'dc9'"), "{err}");
    // Membership through the CLI: dc1-n3 out of every Raft group of dc1, then back.
    let out = l.must(&["remove-node", "dc1-n3"]);
    assert!(out.contains("voters") && !out.contains("dc1-n3"), "{out}");
    let out = l.must(&["add-node", "dc1-n3"]);
    assert!(out.contains("dc1-n3"), "{out}");
    let err = l.must_fail(&["remove-node", "dc9-n9"]);
    assert!(err.contains("dc9-n9"), "{err}");
    must_down(&l);
}

/// `grow`: a DC gains a node its cluster file did not name. The launcher adds it to the
/// file, the running nodes restart on it in turn, and the new node joins its DC's shards:
/// it serves an order placed before, takes new ones, and the other DC's DNS answers
/// name it.
#[tokio::test]
async fn process_backend_grows_a_dc() {
    let l = Launched::new();
    let text = agora::config::DEFAULT_TOML.replace("127.0.", "127.61.").replace("[cluster]", "[cluster]\nshards = 3\nreplicas = 3");
    // Two DCs: the third [[dc]] block and what follows go.
    let third = text.match_indices("[[dc]]").nth(2).expect("three DCs in the default").0;
    let config = l.dir.path().join("cluster.toml");
    std::fs::write(&config, &text[..third]).expect("write config");
    l.must(&["up", "--config", config.to_str().unwrap()]);
    let token = l.must_session("dc1-n1", "grower").await;
    let api = l.api("dc1-n2");
    let (code, v) = l.call(reqwest::Method::PUT, format!("{api}/v1/inventory/sku-grow"), Some(json!({"add": 10}))).await;
    assert_eq!(code, 200, "restock: {v}");
    let (code, v) = l.call(reqwest::Method::POST, format!("{api}/v1/orders"), Some(json!({"session": token, "sku": "sku-grow", "qty": 1}))).await;
    assert_eq!(code, 201, "order: {v}");
    let id = v["id"].as_str().expect("order id").to_string();
    let err = l.must_fail(&["grow", "dc9"]);
    assert!(err.contains("unknown DC 'dc9'"), "{err}");

    let out = l.must(&["grow", "dc1"]);
    assert!(out.contains("dc1-n4 added to dc1") && out.contains("\"added\":\"dc1-n4\""), "{out}");
    let new = l.api("dc1-n4");
    assert!(new.contains("127.61.1.4"), "{new}");
    let (code, v) = l.call(reqwest::Method::GET, format!("{new}/v1/orders/{id}"), None).await;
    assert_eq!(code, 200, "the order placed before, through dc1-n4: {v}");
    let url = format!("{new}/v1/orders");
    must_eventually(Duration::from_secs(20), "an order through dc1-n4", || async {
        let (code, _) = l.call(reqwest::Method::POST, url.clone(), Some(json!({"session": token, "sku": "sku-grow", "qty": 1}))).await;
        (code == 201).then_some(())
    })
    .await;
    must_eventually(Duration::from_secs(20), "dc2's DNS answer for dc1 naming dc1-n4", || async {
        dig_short("127.61.2.1", "dc1.shop.agora.test").contains(&"127.61.1.4".to_string()).then_some(())
    })
    .await;
    must_down(&l);
}

/// Namespaces, links and addresses of this state dir that still exist.
fn netns_leftovers(l: &Launched) -> Vec<String> {
    let tag = StateDir { root: l.state() }.tag();
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let mut left: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().filter(|n| n.contains(&format!("agora-{tag}-"))).map(String::from).collect();
    let addrs = Command::new("ip").args(["-o", "addr", "show", "to", "10.77.0.0/16"]).output().expect("ip addr");
    left.extend(String::from_utf8_lossy(&addrs.stdout).lines().map(String::from));
    left
}

#[tokio::test]
async fn netns_backend_end_to_end_with_partition() {
    let _fixed = fixed_addresses();
    let l = Launched::new();
    up_write_kill_restart(&l, &["up", "--backend", "netns"]).await;

    // Cut dc1's leader off from every other node with iptables drops.
    let old = l.must_dc1_leader().await;
    let t = Instant::now();
    l.must(&["partition", &old]);
    let majority: Vec<&str> = ["dc1-n1", "dc1-n2", "dc1-n3"].into_iter().filter(|n| *n != old).collect();
    let token = l.must_session(majority[0], "carol").await;
    println!("write on the majority side after isolating {old}: {} ms", t.elapsed().as_millis());
    assert!(l.has_session_locally(majority[1], &token).await || l.has_session_locally(majority[0], &token).await);
    assert!(!l.has_session_locally(&old, &token).await, "the isolated {old} cannot have the new write");

    l.must(&["heal"]);
    must_eventually(Duration::from_secs(30), "the isolated node to catch up after heal", || async { l.has_session_locally(&old, &token).await.then_some(()) })
        .await;
    l.must_all_healthy(Duration::from_secs(30)).await;

    must_dc_cut_and_heal(&l).await;
    check_latency(&l).await;

    // A crash (every node SIGKILLed, namespaces left behind): the next `up` cleans up first.
    let pids = l.pids();
    for &pid in &pids {
        // SAFETY: kill(2) on a pid from our own pid files.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    must_eventually(Duration::from_secs(10), "the killed nodes to be gone", || async { pids.iter().all(|p| !pid_alive(*p)).then_some(()) }).await;
    let out = l.agora(&["up", "--backend", "netns"]);
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && err.contains("cleaning up the leftovers"), "{stdout}\n{err}");
    l.pids();
    l.must_all_healthy(Duration::from_secs(30)).await;
    must_down(&l);
    assert!(netns_leftovers(&l).is_empty(), "left behind: {:?}", netns_leftovers(&l));
}

/// A session written in `from` reaches `to` by cross-DC replication (over the WAN).
async fn must_replicate(l: &Launched, token: &str, to: &str) {
    must_eventually(Duration::from_secs(20), &format!("the session to replicate to {to}"), || async { l.has_session_locally(to, token).await.then_some(()) })
        .await;
}

/// `partition dc1` cuts dc1 off from the other DCs: a write in dc2 still reaches dc3 but
/// not dc1, until `heal`.
async fn must_dc_cut_and_heal(l: &Launched) {
    l.must(&["partition", "dc1"]);
    let token = l.must_session("dc2-n1", "erin").await;
    must_replicate(l, &token, "dc3-n1").await;
    assert!(!l.has_session_locally("dc1-n1", &token).await, "dc1 is cut off from dc2");
    l.must(&["heal"]);
    must_replicate(l, &token, "dc1-n1").await;
}

/// `latency` sets the nodes' WAN delay (in their peer transport, any kernel): dc1 asking
/// dc2 about an order id of dc2's that nobody has is one cross-DC round trip, which then
/// takes twice the one-way delay; `latency 0` removes it.
async fn check_latency(l: &Launched) {
    let url = format!("{}/v1/orders/dc2-{}", l.api("dc1-n1"), "0".repeat(32));
    let lookup = || async {
        let t = Instant::now();
        let (code, v) = l.call(reqwest::Method::GET, url.clone(), None).await;
        assert_eq!(code, 404, "{v}");
        t.elapsed()
    };
    lookup().await; // opens the connections
    let out = l.must(&["latency", "200"]);
    assert!(out.contains("dc1-dc2 200 ms") && out.contains("peer transport"), "{out}");
    assert!(l.must(&["status"]).contains("wan latency"), "status says what delays traffic");
    let took = lookup().await;
    assert!(took >= Duration::from_millis(400), "a cross-DC lookup took {took:?} with 200 ms each way");
    // Removed on every node (the lookup's speed without latency depends on the machine's
    // load; tests/it/wan.rs compares the two on a quieter cluster).
    assert!(l.must(&["latency", "0"]).contains("wan latency: none"));
    for node in ["dc1-n1", "dc2-n3"] {
        let (code, v) = l.call(reqwest::Method::GET, format!("{}/v1/admin/wan", l.admin(node)), None).await;
        assert_eq!((code, &v["latency_ms"]), (200, &json!(0)), "{node}: {v}");
    }
}

/// Builds the static image once per test run (a debug build: much faster to compile).
fn must_docker_image() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let t = Instant::now();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/docker-build");
        let status = Command::new(script).arg("--debug").status().expect("run scripts/docker-build");
        assert!(status.success(), "scripts/docker-build failed");
        println!("image build: {} s", t.elapsed().as_secs());
    });
}

/// Containers and networks of compose projects, to check `down` removes what `up` made.
fn docker_objects(l: &Launched) -> Vec<String> {
    let filter = format!("label=com.docker.compose.project=agora-{}", StateDir { root: l.state() }.tag());
    let mut out = Vec::new();
    for args in [vec!["ps", "-aq", "--filter", &filter], vec!["network", "ls", "-q", "--filter", &filter]] {
        let o = Command::new("docker").args(&args).output().expect("docker");
        out.extend(String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from));
    }
    out
}

#[tokio::test]
async fn docker_backend_end_to_end() {
    let _fixed = fixed_addresses();
    must_docker_image();
    let l = Launched::new();
    up_write_kill_restart(&l, &["up", "--backend", "docker"]).await;
    assert_eq!(docker_objects(&l).len(), 9 + 4, "9 containers, 3 DC networks and the WAN network");
    // Docker keeps its networks apart: only the launcher's routes over the WAN network carry this.
    let token = l.must_session("dc1-n1", "frank").await;
    must_replicate(&l, &token, "dc3-n2").await;

    // Partitions work on containers too: the isolated leader's DC moves on without it.
    let old = l.must_dc1_leader().await;
    l.must(&["partition", &old]);
    let majority = ["dc1-n1", "dc1-n2", "dc1-n3"].into_iter().find(|n| *n != old).unwrap();
    let token = l.must_session(majority, "dave").await;
    assert!(!l.has_session_locally(&old, &token).await, "the isolated {old} cannot have the new write");
    l.must(&["heal"]);
    must_eventually(Duration::from_secs(30), "the isolated container to catch up", || async { l.has_session_locally(&old, &token).await.then_some(()) }).await;

    must_down(&l);
    assert!(docker_objects(&l).is_empty(), "left behind: {:?}", docker_objects(&l));
    standalone_compose_replicates_between_dcs(&l).await;
}

/// Runs `docker compose … down -v` on drop, so a failed check leaves no container behind.
struct Compose(PathBuf);

impl Compose {
    fn run(&self, args: &[&str]) -> Output {
        agora::launcher::docker::compose_command().arg("-f").arg(&self.0).args(args).output().expect("run docker compose")
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v"]);
    }
}

/// README's way: `docker compose -f cluster/docker-compose.yml up -d`. The nodes know
/// each other by service name only (no address in docker.toml or the compose file), so a
/// session made in dc1 reaching dc2 shows names resolved inside the containers, across
/// the DCs' networks.
async fn standalone_compose_replicates_between_dcs(l: &Launched) {
    let cluster_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster");
    // README's step before `up`: the certificates the compose file mounts.
    let certs = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["certs", "create", "--config"])
        .arg(cluster_dir.join("docker.toml"))
        .arg("--out")
        .arg(cluster_dir.join("certs"))
        .output()
        .expect("run agora certs create");
    assert!(certs.status.success(), "certs create: {}", String::from_utf8_lossy(&certs.stderr));
    let compose = Compose(cluster_dir.join("docker-compose.yml"));
    let out = compose.run(&["up", "-d"]);
    assert!(out.status.success(), "compose up: {}", String::from_utf8_lossy(&out.stderr));
    let (dc1, dc2) = (container_ip("agora-dc1-n1"), container_ip("agora-dc2-n2"));
    let url = format!("http://{dc1}:8080/v1/sessions");
    let token = must_eventually(Duration::from_secs(30), "a session in the compose cluster", || async {
        let (code, v) = l.call(reqwest::Method::POST, url.clone(), Some(json!({"user": "gina"}))).await;
        (code == 201).then(|| v["token"].as_str().expect("token").to_string())
    })
    .await;
    must_eventually(Duration::from_secs(20), "the session to reach dc2 over the WAN network", || async {
        let url = format!("http://{dc2}:8080/v1/sessions/{token}?consistency=stale");
        (l.call(reqwest::Method::GET, url, None).await.0 == 200).then_some(())
    })
    .await;
    // dc2's node answers with the addresses dc1's names resolve to (it has no other).
    let answer = must_eventually(Duration::from_secs(10), "dc1's three nodes in dc2's DNS answer", || async {
        let answer = dig_short(&dc2, "dc1.shop.agora.test");
        (answer.len() == 3).then_some(answer)
    })
    .await;
    assert!(answer.iter().all(|a| a.parse::<std::net::Ipv4Addr>().is_ok()), "{answer:?}");
}

/// A container's address on its first network (docker gave it: nothing fixes it).
fn container_ip(container: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container])
        .output()
        .expect("docker inspect");
    let ips = String::from_utf8_lossy(&out.stdout).to_string();
    ips.split_whitespace().next().unwrap_or_else(|| panic!("{container} has no address: {ips}")).to_string()
}

/// The committed deployment files are what the generators make from the cluster files,
/// and they describe the TOML's topology.
#[test]
fn committed_manifests_match_the_topology() {
    use agora::config::ClusterConfig;
    use agora::launcher::manifests;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster");
    let local = ClusterConfig::load(Some(&root.join("local.toml"))).unwrap();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let stale = "is stale: regenerate with `agora cluster compose` / `agora cluster k8s --config cluster/local.toml`";

    // docker: docker.toml is local.toml readdressed; the compose file is generated from it.
    let docker = ClusterConfig::load(Some(&root.join("docker.toml"))).unwrap();
    assert_eq!(read("docker.toml"), manifests::docker_toml(&local).unwrap(), "cluster/docker.toml {stale}");
    let compose = manifests::compose_yaml(&docker, &manifests::ComposeFlavor::Standalone).unwrap();
    assert_eq!(read("docker-compose.yml"), compose, "cluster/docker-compose.yml {stale}");
    let y: serde_yaml::Value = serde_yaml::from_str(&compose).unwrap();
    for n in docker.nodes() {
        // Found by its service name, on its DC's network and the WAN's, at no fixed address.
        assert_eq!(n.host.as_deref(), Some(n.name.as_str()), "{}: named by its service", n.name);
        let svc = &y["services"][n.name.as_str()];
        assert!(svc["networks"][n.dc.as_str()].is_mapping() && svc["networks"]["wan"].is_mapping(), "{}: networks", n.name);
        assert!(!compose.contains("ipv4_address"), "the compose file fixes no address");
    }

    // k8s: one file per DC whose StatefulSet has one pod per node and whose ConfigMap holds the topology.
    let files = manifests::k8s_files(&local, "cluster/local.toml").unwrap();
    assert_eq!(files.len(), local.dcs.len());
    for (name, text) in files {
        assert_eq!(read(&format!("k8s/{name}")), text, "cluster/k8s/{name} {stale}");
        let dc = name.trim_end_matches(".yaml");
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("{name}: no {k}"));
        assert_eq!(kind("StatefulSet")["spec"]["replicas"].as_u64(), Some(local.dc_nodes(dc).len() as u64), "{name}");
        assert_eq!(kind("Service")["spec"]["clusterIP"].as_str(), Some("None"), "{name}: headless");
        let toml_text = kind("ConfigMap")["data"]["cluster.toml"].as_str().unwrap();
        let in_map = ClusterConfig::from_toml(toml_text, &name).unwrap();
        let ids = |c: &ClusterConfig| c.nodes().into_iter().map(|n| (n.id, n.name, n.dc)).collect::<Vec<_>>();
        assert_eq!(ids(&in_map), ids(&local), "{name}: the ConfigMap's topology");
        // Each node is its StatefulSet pod's stable name under the headless Service.
        let service = kind("Service")["metadata"]["name"].as_str().unwrap().to_string();
        for (k, n) in (1..).zip(in_map.dc_nodes(dc)) {
            assert_eq!(n.host, Some(format!("{dc}-{k}.{service}")), "{name}: {}", n.name);
            assert!(n.http.ip().is_unspecified(), "{name}: {} listens on every interface of its pod", n.name);
        }
    }
}

/// The Kubernetes manifests hang together: every object a DC needs is there, each
/// selector matches the pods' labels, ports are named and the probes, the budget and the
/// network policy use those names, the pods run unprivileged with requests and limits.
/// Then each file is checked against the Kubernetes API's schemas (`kubernetes-validate`).
#[test]
fn k8s_manifests_are_well_formed_kubernetes() {
    use agora::config::ClusterConfig;
    use serde_yaml::Value as Y;
    let local = ClusterConfig::load(None).unwrap();
    for (name, text) in agora::launcher::manifests::k8s_files(&local, "cluster/local.toml").unwrap() {
        let docs: Vec<Y> = serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().expect("kind")).collect();
        let want: BTreeSet<&str> = ["ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget", "NetworkPolicy"].into();
        assert_eq!(kinds, want, "{name}");
        let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
        let set = kind("StatefulSet");
        let pod = &set["spec"]["template"];
        let pod_labels = pod["metadata"]["labels"].as_mapping().expect("pod labels");
        let matches = |selector: &Y, what: &str| {
            let sel = selector.as_mapping().unwrap_or_else(|| panic!("{name}: {what} has no selector"));
            assert!(
                !sel.is_empty() && sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
                "{name}: {what}'s selector {sel:?} misses the pods {pod_labels:?}"
            );
        };
        matches(&set["spec"]["selector"]["matchLabels"], "StatefulSet");
        matches(&kind("Service")["spec"]["selector"], "Service");
        matches(&kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], "PodDisruptionBudget");
        matches(&kind("NetworkPolicy")["spec"]["podSelector"]["matchLabels"], "NetworkPolicy");
        assert_eq!(set["spec"]["serviceName"], kind("Service")["metadata"]["name"], "{name}: the StatefulSet names its Service");
        let majority = local.dc_nodes(name.trim_end_matches(".yaml")).len() / 2 + 1;
        assert_eq!(kind("PodDisruptionBudget")["spec"]["minAvailable"].as_u64(), Some(majority as u64), "{name}: evictions keep a majority");

        let spec = &pod["spec"];
        let c = &spec["containers"][0];
        let port_names: BTreeSet<&str> = c["ports"].as_sequence().unwrap().iter().map(|p| p["name"].as_str().expect("every port is named")).collect();
        assert!(["http", "peer", "dns-tcp", "dns-udp"].iter().all(|p| port_names.contains(p)), "{name}: {port_names:?}");
        for probe in ["readinessProbe", "livenessProbe"] {
            let get = &c[probe]["httpGet"];
            // `/healthz` answers 200 on every running node (see the HTTP API table).
            assert_eq!(get["path"].as_str(), Some("/healthz"), "{name}: {probe}");
            assert!(port_names.contains(get["port"].as_str().unwrap_or("")), "{name}: {probe} uses a named port");
        }
        for r in ["requests", "limits"] {
            assert!(c["resources"][r]["cpu"].is_string() && c["resources"][r]["memory"].is_string(), "{name}: resources.{r}");
        }
        assert_eq!(spec["securityContext"]["runAsNonRoot"].as_bool(), Some(true), "{name}");
        assert!(spec["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u > 0), "{name}: a non-root uid");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false), "{name}");
        let volumes: BTreeSet<&str> = spec["volumes"].as_sequence().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        for m in c["volumeMounts"].as_sequence().unwrap() {
            let v = m["name"].as_str().unwrap();
            assert!(volumes.contains(v) || v == "data", "{name}: mount {v} has no volume");
        }
        let certs = spec["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == "certs").expect("certs volume");
        assert!(certs["secret"]["secretName"].as_str().is_some_and(|s| s.starts_with("agora-") && s.ends_with("-certs")), "{name}: certificates from a Secret");

        let policy = &kind("NetworkPolicy")["spec"]["ingress"];
        let peer_rule = policy.as_sequence().unwrap().iter().find(|r| r["ports"][0]["port"] == "peer").expect("a rule for the peer port");
        assert_eq!(peer_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "agora", "{name}: the peer port from Agora's pods only");
        for rule in policy.as_sequence().unwrap() {
            for p in rule["ports"].as_sequence().unwrap() {
                assert!(port_names.contains(p["port"].as_str().unwrap()), "{name}: the policy names a container port");
            }
        }
    }
    validate_against_kubernetes_schemas(&Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/k8s"));
}

/// `kubernetes-validate --strict` (scripts/test installs it) on every committed manifest.
fn validate_against_kubernetes_schemas(dir: &Path) {
    let files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let out = match Command::new("kubernetes-validate").arg("--strict").args(&files).output() {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() && !root => {
            return println!("skipped the schema check: kubernetes-validate cannot run ({e}); scripts/test installs it as root");
        }
        Err(e) => panic!("kubernetes-validate: {e} (scripts/test installs it)"),
    };
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the manifests fail the Kubernetes schemas:\n{report}");
    assert_eq!(report.matches(" passed ").count(), 5 * files.len(), "five objects a file:\n{report}");
}
