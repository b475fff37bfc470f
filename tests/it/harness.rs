//! `TestCluster`: starts real `agora node` processes for one DC on its own loopback
//! addresses (127.<net>.1.N, so tests can run in parallel), and cleans them up by pid.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub net: u8,
    pub names: Vec<String>,
    children: BTreeMap<String, Child>,
    pub http: reqwest::Client,
    /// Nodes run with the cluster's `hosts` file as their `/etc/hosts` (see `Options::named`).
    named: bool,
}

/// The topology and extra TOML for `[raft]`, `[replication]` and `[limits]`.
pub struct Options {
    pub dcs: usize,
    pub nodes: usize,
    pub raft: &'static str,
    pub replication: &'static str,
    /// Extra TOML for `[limits]`.
    pub limits: &'static str,
    /// TOML for `[wan]` (WAN emulation between DCs).
    pub wan: &'static str,
    /// Raft groups per DC (`[cluster] shards`).
    pub shards: u16,
    /// Nodes holding each shard but shard 0 (`[cluster] replicas`; 0: every node).
    pub replicas: u16,
    /// Extra TOML for `[cluster]`.
    pub cluster: &'static str,
    /// Nodes named by host (`dcD-nI.agora.internal`), listening on their address: each
    /// node runs in a mount namespace of its own that sees the cluster's `hosts` file as
    /// `/etc/hosts` (so this needs root).
    pub named: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { dcs: 1, nodes: 3, raft: "", replication: "", limits: "", wan: "", shards: 1, replicas: 0, cluster: "", named: false }
    }
}

/// The name a node of a cluster started with `named` is found by.
pub fn host_name(node: &str) -> String {
    format!("{node}.agora.internal")
}

/// Node `dcD-nI` has id D*10+I and address 127.<net>.D.I.
fn config_toml(net: u8, opts: &Options) -> String {
    let mut dcs = String::new();
    for d in 1..=opts.dcs {
        let address = |i: usize| match opts.named {
            true => format!("host = \"{}\", bind = \"127.{net}.{d}.{i}\"", host_name(&format!("dc{d}-n{i}"))),
            false => format!("ip = \"127.{net}.{d}.{i}\""),
        };
        let nodes: Vec<String> = (1..=opts.nodes).map(|i| format!("  {{ id = {}, name = \"dc{d}-n{i}\", {} }},", d * 10 + i, address(i))).collect();
        dcs += &format!("\n[[dc]]\nname = \"dc{d}\"\nsubnet = \"127.{net}.{d}.0/24\"\nnodes = [\n{}\n]\n", nodes.join("\n"));
    }
    format!(
        "[cluster]\nname = \"test-{net}\"\nshards = {}\nreplicas = {}\n{}\n\n[raft]\nheartbeat_interval_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n{}\n\n[storage]\ndurability = \"fsync\"\n\n[replication]\nprobe_interval_ms = 100\ndc_unhealthy_after_ms = 900\n{}\n\n[limits]\n{}\n\n[wan]\n{}\n{dcs}",
        opts.shards, opts.replicas, opts.cluster, opts.raft, opts.replication, opts.limits, opts.wan
    )
}

/// `dig +short` of `name` against the DNS port (8553) of `server` (an IP address).
pub fn dig_short(server: &str, name: &str) -> Vec<String> {
    let out =
        Command::new("dig").arg(format!("@{server}")).args(["-p", "8553", "+time=1", "+tries=1", name, "+short"]).output().expect("run dig (install dnsutils)");
    String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn must_eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestCluster {
    pub async fn start(net: u8, opts: Options) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client");
        let mut c = TestCluster { dir, net, names: Vec::new(), children: BTreeMap::new(), http, named: opts.named };
        c.rewrite_config(&opts);
        if opts.named {
            let hosts: Vec<(String, String)> = c.names.iter().map(|n| (n.clone(), c.url(n).replace("http://", "").replace(":8080", ""))).collect();
            c.write_hosts(&hosts);
        }
        for name in c.names.clone() {
            c.start_node(&name);
        }
        for d in 1..=opts.dcs {
            c.must_leader_in(&format!("dc{d}"), Duration::from_secs(20)).await;
        }
        c
    }

    /// Writes the cluster file for `opts` (at start, or later with more nodes, say), issues
    /// certificates for the nodes it adds (keeping the others'), and counts its nodes as
    /// this cluster's. Running nodes go on with the file they started with until restarted.
    pub fn rewrite_config(&mut self, opts: &Options) {
        let toml = config_toml(self.net, opts);
        let config = agora::config::ClusterConfig::from_toml(&toml, "test config").expect("valid test config");
        std::fs::write(self.dir.path().join("cluster.toml"), &toml).expect("write config");
        agora::certs::create(&self.certs_dir(), &config, false, Default::default()).expect("issue certificates");
        self.names = (1..=opts.dcs).flat_map(|d| (1..=opts.nodes).map(move |i| format!("dc{d}-n{i}"))).collect();
    }

    /// `dcD-nI` → (D, I).
    pub fn parse(name: &str) -> (u8, u8) {
        let (d, i) = name.trim_start_matches("dc").split_once("-n").expect("node name dcD-nI");
        (d.parse().expect("dc number"), i.parse().expect("node number"))
    }

    pub fn id(name: &str) -> u64 {
        let (d, i) = Self::parse(name);
        d as u64 * 10 + i as u64
    }

    pub fn url(&self, name: &str) -> String {
        let (d, i) = Self::parse(name);
        format!("http://127.{}.{d}.{i}:8080", self.net)
    }

    pub fn dc_nodes(&self, dc: &str) -> Vec<String> {
        self.names.iter().filter(|n| n.starts_with(&format!("{dc}-"))).cloned().collect()
    }

    /// Cuts every node of `a` off from every node of `b`, both ways (fault hook).
    pub async fn cut(&self, a: &[String], b: &[String]) {
        for (side, other) in [(a, b), (b, a)] {
            let ids: Vec<u64> = other.iter().map(|n| Self::id(n)).collect();
            for n in side {
                let (code, v) = self.request(reqwest::Method::PUT, n, "/v1/admin/faults", Some(serde_json::json!({"partitioned": ids})), None).await;
                assert_eq!(code, 200, "set faults on {n}: {v}");
            }
        }
    }

    pub async fn heal(&self) {
        for n in self.running() {
            let (code, v) = self.request(reqwest::Method::PUT, &n, "/v1/admin/faults", Some(serde_json::json!({})), None).await;
            assert_eq!(code, 200, "heal {n}: {v}");
        }
    }

    pub fn peer_addr(&self, name: &str) -> String {
        self.url(name).replace("http://", "").replace(":8080", ":7070")
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Sends one peer-protocol request to `name` as node id `from`, with that node's own
    /// certificate (an authenticated peer), and returns the answer.
    pub async fn peer_call(&self, name: &str, from: u64, req: agora::transport::PeerRequest) -> agora::transport::PeerResponse {
        let from_name = format!("dc{}-n{}", from / 10, from % 10);
        self.peer_call_with(name, &from_name, &req).await.expect("peer answered")
    }

    /// Sends one peer-protocol request to `name` over TLS with the certificate `cert`
    /// (`<cert>.pem` in the certs dir): `Err` when the node refuses the connection.
    pub async fn peer_call_with(&self, name: &str, cert: &str, req: &agora::transport::PeerRequest) -> Result<agora::transport::PeerResponse, String> {
        use agora::transport::tls::{PeerTls, Security};
        let tls = PeerTls::load(&self.certs_dir(), cert).map_err(|e| format!("{e:#}"))?;
        self.peer_call_secured(name, &Security::Tls(std::sync::Arc::new(tls)), req).await
    }

    pub async fn peer_call_secured(
        &self,
        name: &str,
        security: &agora::transport::tls::Security,
        req: &agora::transport::PeerRequest,
    ) -> Result<agora::transport::PeerResponse, String> {
        let (d, _) = Self::parse(name);
        let target = agora::transport::client::Target {
            id: Self::id(name),
            name: name.to_string(),
            dc: format!("dc{d}"),
            addr: self.peer_addr(name).parse().expect("peer address"),
        };
        agora::transport::client::call_once(&target, security, req, 64 << 20).await
    }

    fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("data").join(name)
    }

    pub fn start_node(&mut self, name: &str) {
        self.start_node_with(name, &self.dir.path().join("cluster.toml"));
    }

    /// The `hosts` file nodes of a `named` cluster resolve with: (node, IP address) pairs.
    /// Written in place, so the nodes' bind mounts of it see the new text.
    pub fn write_hosts(&self, nodes: &[(String, String)]) {
        let text: String = nodes.iter().map(|(n, ip)| format!("{ip} {}\n", host_name(n))).collect();
        std::fs::write(self.dir.path().join("hosts"), text).expect("write hosts file");
    }

    /// A node process, in a mount namespace of its own with the cluster's `hosts` file as
    /// `/etc/hosts` when the cluster is `named`; `unshare` and `sh` exec into the node, so
    /// the pid is the node's.
    fn node_command(&self) -> Command {
        if !self.named {
            return Command::new(env!("CARGO_BIN_EXE_agora"));
        }
        let mut c = Command::new("unshare");
        c.args(["--mount", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""]).arg(self.dir.path().join("hosts")).arg(env!("CARGO_BIN_EXE_agora"));
        c
    }

    /// Starts `name` with the cluster file at `config`.
    pub fn start_node_with(&mut self, name: &str, config: &std::path::Path) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{name}.log"))).expect("log file");
        let child = self
            .node_command()
            .args(["node", "--node", name, "--enable-test-hooks", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(self.data_dir(name))
            .arg("--certs")
            .arg(self.certs_dir())
            // TEST_NODE_LOG overrides the nodes' log filter (e.g. `info,openraft=debug`).
            .env("RUST_LOG", std::env::var("TEST_NODE_LOG").unwrap_or("info,openraft=warn,sled=warn,hickory_server=warn".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agora node");
        self.children.insert(name.to_string(), child);
    }

    /// The process id of a running node.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.get(name).map(|c| c.id())
    }

    /// SIGKILL, by pid.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, by pid: the node stops gracefully (handing over what it leads); SIGKILL
    /// if it is still there after 10 s.
    pub fn stop(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            // SAFETY: a signal to a child process this harness started and still owns.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    pub fn wipe(&mut self, name: &str) {
        self.kill(name);
        std::fs::remove_dir_all(self.data_dir(name)).expect("wipe data dir");
    }

    pub fn running(&self) -> Vec<String> {
        self.children.keys().cloned().collect()
    }

    pub async fn get(&self, name: &str, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, name, path, None, None).await
    }

    pub async fn post(&self, name: &str, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, name, path, Some(body), None).await
    }

    /// Metric `name` summed over its series and over every node's /metrics.
    pub async fn metric_total(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for node in &self.names {
            let text = self.http.get(format!("{}/metrics", self.url(node))).send().await.unwrap().text().await.unwrap();
            let series = text.lines().filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
            total += series.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>();
        }
        total
    }

    /// The node's admin API (its own listener, port 9090).
    pub fn admin_url(&self, name: &str) -> String {
        self.url(name).replace(":8080", ":9090")
    }

    pub fn admin_token(&self) -> String {
        agora::certs::read_token(&agora::certs::token_path(&self.certs_dir())).expect("admin token")
    }

    /// A request to `name`: admin paths go to its admin listener, with the admin token.
    pub async fn request(&self, method: reqwest::Method, name: &str, path: &str, body: Option<Value>, key: Option<&str>) -> (u16, Value) {
        let mut req = if path.starts_with("/v1/admin/") {
            self.http.request(method, format!("{}{path}", self.admin_url(name))).bearer_auth(self.admin_token())
        } else {
            self.http.request(method, format!("{}{path}", self.url(name)))
        };
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({"transport_error": e.to_string()})),
        }
    }

    pub async fn status(&self, name: &str) -> Option<Value> {
        let (code, v) = self.get(name, "/v1/cluster/status").await;
        (code == 200).then_some(v)
    }

    /// The leader every running node of `dc` agrees on.
    pub async fn leader_in(&self, dc: &str) -> Option<String> {
        let mut seen = None;
        for n in self.running().into_iter().filter(|n| n.starts_with(&format!("{dc}-"))) {
            let s = self.status(&n).await?;
            let l = s["leader"].as_str()?.to_string();
            if seen.get_or_insert(l.clone()) != &l {
                return None;
            }
        }
        seen.filter(|l| self.children.contains_key(l))
    }

    pub async fn must_leader(&self, deadline: Duration) -> String {
        self.must_leader_in("dc1", deadline).await
    }

    pub async fn must_leader_in(&self, dc: &str, deadline: Duration) -> String {
        must_eventually(deadline, &format!("an agreed leader in {dc}"), || self.leader_in(dc)).await
    }

    pub async fn must_session(&self, node: &str, user: &str) -> String {
        let (code, v) = self.post(node, "/v1/sessions", json!({"user": user})).await;
        assert_eq!(code, 201, "create session: {v}");
        v["token"].as_str().expect("token").to_string()
    }

    pub async fn must_restock(&self, node: &str, sku: &str, add: u64) {
        let (code, v) = self.request(reqwest::Method::PUT, node, &format!("/v1/inventory/{sku}"), Some(json!({"add": add})), None).await;
        assert_eq!(code, 200, "restock: {v}");
    }

    /// Waits until every running node reports the same digest; returns it.
    pub async fn must_converge(&self, deadline: Duration) -> String {
        must_eventually(deadline, "equal digests on all running nodes", || async {
            let mut digests = Vec::new();
            for n in self.running() {
                let (code, v) = self.get(&n, "/v1/cluster/digest").await;
                if code != 200 {
                    return None;
                }
                digests.push(v["all"].as_str()?.to_string());
            }
            digests.windows(2).all(|w| w[0] == w[1]).then(|| digests[0].clone())
        })
        .await
    }

    /// What node `name` has logged so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn dump_logs(&self) {
        for n in &self.names {
            let text = self.log(n);
            let lines: Vec<&str> = text.lines().collect();
            // A panic's message, however far up the log its backtrace pushed it.
            for (i, _) in lines.iter().enumerate().filter(|(_, l)| l.contains("panicked at")) {
                eprintln!("--- {n}.log: {}", lines[i..lines.len().min(i + 3)].join(" | "));
            }
            let tail: Vec<&str> = lines.iter().rev().take(30).copied().collect();
            eprintln!("--- last lines of {n}.log ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in self.running() {
            self.kill(&n);
        }
        // TEST_KEEP_DIR=1 keeps the cluster's directory (nodes' logs and data) to read.
        if std::env::var_os("TEST_KEEP_DIR").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {}", self.dir.path().display());
        }
    }
}

/// The path of an external tool a test needs. Missing, the test fails when run as root
/// or in CI (`scripts/test` installs it there) and is skipped otherwise, saying why.
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()));
    if found.is_none() {
        // SAFETY: geteuid only reads the process's credentials.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(!root && std::env::var_os("CI").is_none(), "'{name}' is missing: install the Debian package '{package}' (scripts/test does)");
        eprintln!("skipped: '{name}' is missing (Debian package '{package}'); not root and not CI");
    }
    found
}

/// Runs `cmd` to its end, killing it (by pid) after `deadline`; returns its stdout.
pub fn run_with_deadline(cmd: Command, deadline: Duration) -> String {
    run_to_end(cmd, deadline).1
}

/// Runs `cmd` to its end, killing it (by pid) after `deadline`; returns how it exited
/// and its stdout.
pub fn run_to_end(mut cmd: Command, deadline: Duration) -> (std::process::ExitStatus, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn tool");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait tool") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().expect("tool output"))
}

/// Held while a test uses address ranges fixed for the whole machine: the chaos cluster's
/// 127.70.x.x, the netns backend's 10.77.0.0/16, the docker backend's 10.78.0.0/16.
/// Within one run nextest already runs such tests one at a time (`.config/nextest.toml`);
/// this lock (an advisory file lock, released when the guard drops or the process dies)
/// does the same across runs on one machine, where two checkouts tested at once would
/// take each other's subnets (docker: "Pool overlaps with other one"). Waits up to 20
/// minutes for the other run's test, then fails saying why.
pub struct FixedAddresses {
    _lock: std::fs::File,
}

pub fn fixed_addresses() -> FixedAddresses {
    let path = std::env::temp_dir().join("agora-tests-fixed-addresses.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    let mut told = false;
    loop {
        match file.try_lock() {
            Ok(()) => return FixedAddresses { _lock: file },
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                if !told {
                    eprintln!("waiting for {}: another test run on this machine is using the fixed address ranges", path.display());
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("{}: the fixed address ranges stayed taken by another test run ({e:?})", path.display()),
        }
    }
}
