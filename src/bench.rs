//! `agora bench`: drives the HTTP API of a running cluster with a fixed number of
//! concurrent clients for a fixed time, and reports throughput and latency percentiles of
//! acknowledged requests.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// Only `POST /v1/orders` (qty 1): acknowledged, durable orders.
    Orders,
    /// 80 % linearizable order reads, 20 % new orders.
    ReadHeavy,
    /// Only `POST /v1/sessions`.
    Sessions,
    /// Only `POST /v1/orders` for SKUs whose stock is gone: every answer is a 409
    /// `sold_out`, which the leader confirms linearizably first (the end of a flash sale).
    SoldOut,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// API base URL of a node to load; repeat to spread clients over several nodes.
    #[arg(long = "target", default_value = "http://127.0.1.1:8080")]
    pub targets: Vec<String>,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, short = 'd', default_value_t = 20)]
    pub duration: u64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    #[arg(long, value_enum, default_value_t = Mix::Orders)]
    pub mix: Mix,
    /// SKUs the orders spread over (each restocked before the run).
    #[arg(long, default_value_t = 64)]
    pub skus: usize,
    /// Target total rate in requests/s, spread over the clients (0: as fast as they go).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also print throughput and p99 for every second of the run: shows when a tail
    /// happens (a snapshot, an election) instead of only that it did.
    #[arg(long)]
    pub timeline: bool,
    /// Also print, every this many seconds while the run goes on, one JSON line of that
    /// interval's acknowledged requests, errors and p50/p99 (0: none). What a soak run
    /// (`scripts/bench-soak`) reads as it goes.
    #[arg(long, default_value_t = 0)]
    pub interval: u64,
    /// Append the id of every order acknowledged (warm-up included) to this file, one
    /// per line: what `agora verify-orders` reads back later.
    #[arg(long)]
    pub record_ids: Option<std::path::PathBuf>,
}

/// Where acknowledged order ids go (`--record-ids`): one buffered file shared by the
/// workers, and the first write error, reported at the end of the run.
#[derive(Clone)]
struct IdLog(std::sync::Arc<std::sync::Mutex<(std::io::BufWriter<std::fs::File>, Option<std::io::Error>)>>);

impl IdLog {
    fn create(path: &std::path::Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("open {}", path.display()))?;
        Ok(IdLog(std::sync::Arc::new(std::sync::Mutex::new((std::io::BufWriter::new(file), None)))))
    }

    /// An acknowledged order's id; `None` when its answer had none, which fails the run
    /// at the end rather than leave an order out of the file.
    fn record(&self, id: Option<&str>) {
        use std::io::Write;
        let mut guard = self.0.lock().expect("id log lock");
        let (out, error) = &mut *guard;
        if error.is_none() {
            let written = match id {
                Some(id) => writeln!(out, "{id}"),
                None => Err(std::io::Error::other("an acknowledged order's answer had no id")),
            };
            if let Err(e) = written {
                *error = Some(e);
            }
        }
    }

    /// Flushes the file; the first error of the run, if any.
    fn finish(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut guard = self.0.lock().expect("id log lock");
        let (out, error) = &mut *guard;
        if let Some(e) = error.take() {
            return Err(e).context("record the acknowledged order ids");
        }
        out.flush().context("record the acknowledged order ids")
    }
}

/// Latencies (µs) and errors of the interval in progress, shared by the workers and the
/// interval reporter.
#[derive(Default)]
struct Window {
    latencies_us: Vec<u32>,
    errors: u64,
}
type SharedWindow = std::sync::Arc<std::sync::Mutex<Window>>;

#[derive(Default)]
struct WorkerStats {
    latencies_us: Vec<u32>,
    /// The second of the measured run each acknowledged request started in (same order).
    started_s: Vec<u32>,
    errors: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.targets.is_empty() || args.skus == 0 {
        bail!("--concurrency, --skus and at least one --target are required");
    }
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).timeout(Duration::from_secs(10)).build()?;
    let setup = prepare(&client, &args).await.context("prepare the run (is the cluster up?)")?;
    let lag_before = lag_buckets(&client, &args.targets).await;
    let warmup_end = Instant::now() + Duration::from_secs(args.warmup);
    let end = warmup_end + Duration::from_secs(args.duration);
    let window = (args.interval > 0).then(SharedWindow::default);
    let reporter = window.clone().map(|w| tokio::spawn(report_intervals(w, Duration::from_secs(args.interval), warmup_end, end)));
    let ids = args.record_ids.as_deref().map(IdLog::create).transpose()?;
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let (client, args, setup, window, ids) = (client.clone(), args.clone(), setup.clone(), window.clone(), ids.clone());
        let run = Run { setup, warmup_end, end, window, ids };
        workers.push(tokio::spawn(async move { worker(w, client, args, run).await }));
    }
    let mut all = WorkerStats::default();
    for w in workers {
        let s = w.await?;
        all.latencies_us.extend(s.latencies_us);
        all.started_s.extend(s.started_s);
        all.errors += s.errors;
    }
    if let Some(r) = reporter {
        r.await?;
    }
    if let Some(ids) = &ids {
        ids.finish()?;
    }
    let lag = lag_buckets(&client, &args.targets).await.into_iter().map(|(le, n)| (le, n - lag_before.get(&le).copied().unwrap_or(0.0))).collect();
    report(&args, all, &lag);
    Ok(())
}

/// What each target needs: a session of its own DC and stock in its own DC's allowance.
#[derive(Clone)]
struct Setup {
    sessions: Vec<String>,
    skus: Vec<String>,
    /// Orders placed before the run, for the read mix.
    orders: Vec<String>,
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> anyhow::Result<Value> {
    let resp = client.post(&url).json(&body).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{url}: {status} {v}");
    }
    Ok(v)
}

async fn prepare(client: &reqwest::Client, args: &BenchArgs) -> anyhow::Result<Setup> {
    let run = format!("{:08x}", rand::random::<u32>());
    let skus: Vec<String> = (0..args.skus).map(|i| format!("bench-{run}-{i}")).collect();
    let mut sessions = Vec::new();
    for base in &args.targets {
        sessions.push(post(client, format!("{base}/v1/sessions"), json!({"user": "bench"})).await?["token"].as_str().unwrap_or_default().to_string());
        // Sold out: one unit in all, bought below.
        let restocked = if args.mix == Mix::SoldOut { &[][..] } else { &skus[..] };
        for sku in restocked {
            let url = format!("{base}/v1/inventory/{sku}");
            let resp = client.put(&url).json(&json!({"add": 1_000_000})).send().await?;
            if !resp.status().is_success() {
                bail!("{url}: {}", resp.status());
            }
        }
    }
    if args.mix == Mix::SoldOut {
        let base = &args.targets[0];
        for sku in &skus {
            client.put(format!("{base}/v1/inventory/{sku}")).json(&json!({"add": 1})).send().await?.error_for_status()?;
            post(client, format!("{base}/v1/orders"), json!({"session": sessions[0], "sku": sku, "qty": 1})).await?;
        }
    }
    let mut orders = Vec::new();
    if args.mix == Mix::ReadHeavy {
        let base = &args.targets[0];
        for sku in skus.iter().take(16) {
            let o = post(client, format!("{base}/v1/orders"), json!({"session": sessions[0], "sku": sku, "qty": 1})).await?;
            orders.push(o["id"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(Setup { sessions, skus, orders })
}

/// Every `every` from `start` to `end`: one JSON line of the interval just ended.
async fn report_intervals(window: SharedWindow, every: Duration, start: Instant, end: Instant) {
    use std::io::Write;
    let mut n = 0u64;
    let mut from = start;
    while from < end {
        let to = (from + every).min(end);
        tokio::time::sleep_until(to.into()).await;
        let Window { latencies_us: mut l, errors } = std::mem::take(&mut *window.lock().expect("window lock"));
        l.sort_unstable();
        n += 1;
        let secs = (to - from).as_secs_f64().max(1e-3);
        let line = interval_line(n, (to - start).as_secs_f64(), secs, &l, errors);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        from = to;
    }
}

/// One interval's figures: `l` sorted latencies (µs) of its acknowledged requests.
fn interval_line(n: u64, t_s: f64, secs: f64, l: &[u32], errors: u64) -> Value {
    json!({
        "interval": n,
        "t_s": t_s.round(),
        "ok": l.len(),
        "errors": errors,
        "throughput_per_s": (l.len() as f64 / secs).round(),
        "p50_ms": percentile(l, 0.50),
        "p99_ms": percentile(l, 0.99),
    })
}

/// What every worker of one run shares.
struct Run {
    setup: Setup,
    warmup_end: Instant,
    end: Instant,
    window: Option<SharedWindow>,
    ids: Option<IdLog>,
}

async fn worker(w: usize, client: reqwest::Client, args: BenchArgs, run: Run) -> WorkerStats {
    let Run { setup, warmup_end, end, window, ids } = run;
    let mut stats = WorkerStats::default();
    let t = w % args.targets.len();
    let base = &args.targets[t];
    // Open-loop pacing when a rate is set: each client sends on its own fixed schedule.
    let period = (args.rate > 0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate as f64));
    let mut next = Instant::now();
    let mut i = w;
    while Instant::now() < end {
        if let Some(p) = period {
            tokio::time::sleep_until(next.into()).await;
            next += p;
        }
        i = i.wrapping_add(args.concurrency);
        let started = Instant::now();
        let answer = one_request(&client, base, &args, &setup, t, i, ids.is_some()).await;
        if let (Some(ids), true) = (&ids, answer.placed) {
            ids.record(answer.order_id.as_deref());
        }
        let ok = answer.ok;
        if started < warmup_end {
            continue;
        }
        // Over u32::MAX µs (71 min) counts as the largest latency the histogram holds.
        let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        match ok {
            true => {
                stats.latencies_us.push(us);
                stats.started_s.push((started - warmup_end).as_secs() as u32);
            }
            false => stats.errors += 1,
        }
        if let Some(w) = &window {
            let mut w = w.lock().expect("window lock");
            match ok {
                true => w.latencies_us.push(us),
                false => w.errors += 1,
            }
        }
    }
    stats
}

/// One request's result: acknowledged or not, whether it placed an order, and that
/// order's id when asked for (`--record-ids`).
struct Answer {
    ok: bool,
    placed: bool,
    order_id: Option<String>,
}

async fn one_request(client: &reqwest::Client, base: &str, args: &BenchArgs, setup: &Setup, target: usize, i: usize, want_id: bool) -> Answer {
    let sku = &setup.skus[i % setup.skus.len()];
    let (req, places_order) = match args.mix {
        Mix::ReadHeavy if i % 5 != 0 => (client.get(format!("{base}/v1/orders/{}", setup.orders[i % setup.orders.len()])), false),
        Mix::Sessions => (client.post(format!("{base}/v1/sessions")).json(&json!({"user": "bench"})), false),
        _ => (client.post(format!("{base}/v1/orders")).json(&json!({"session": setup.sessions[target], "sku": sku, "qty": 1})), true),
    };
    let Ok(r) = req.send().await else { return Answer { ok: false, placed: false, order_id: None } };
    // Only an order that was placed (201 with its id) is recorded; the body is read
    // either way, so the connection can be reused.
    let ok = if args.mix == Mix::SoldOut { r.status() == reqwest::StatusCode::CONFLICT } else { r.status().is_success() };
    let body = r.bytes().await;
    let order_id = (ok && want_id && places_order)
        .then(|| body.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).and_then(|v| v["id"].as_str().map(str::to_string)))
        .flatten();
    Answer { ok, placed: ok && places_order, order_id }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

/// Cumulative counts of `agora_replication_apply_lag_seconds` by upper bound (ms),
/// summed over the targets' /metrics and every origin.
async fn lag_buckets(client: &reqwest::Client, targets: &[String]) -> std::collections::BTreeMap<u64, f64> {
    let mut out = std::collections::BTreeMap::new();
    for base in targets {
        let Ok(resp) = client.get(format!("{base}/metrics")).send().await else { continue };
        let text = resp.text().await.unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("agora_replication_apply_lag_seconds_bucket")) {
            let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|v| v.parse::<f64>().ok());
            let n = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(le), Some(n)) = (le, n) {
                let key = if le.is_finite() { (le * 1000.0).round() as u64 } else { u64::MAX };
                *out.entry(key).or_insert(0.0) += n;
            }
        }
    }
    out
}

/// The bucket bound (ms) under which a share `q` of the observations fall.
fn bucket_quantile(buckets: &std::collections::BTreeMap<u64, f64>, q: f64) -> Option<u64> {
    let total = buckets.get(&u64::MAX).copied().unwrap_or(0.0);
    if total <= 0.0 {
        return None;
    }
    buckets.iter().find(|(_, n)| **n >= q * total).map(|(le, _)| *le)
}

/// Per second of the run: acknowledged requests and their p99 (ms).
fn timeline(all: &WorkerStats) -> Vec<(u32, usize, f64)> {
    let mut by_second: std::collections::BTreeMap<u32, Vec<u32>> = std::collections::BTreeMap::new();
    for (s, l) in all.started_s.iter().zip(&all.latencies_us) {
        by_second.entry(*s).or_default().push(*l);
    }
    by_second
        .into_iter()
        .map(|(s, mut l)| {
            l.sort_unstable();
            (s, l.len(), percentile(&l, 0.99))
        })
        .collect()
}

fn report(args: &BenchArgs, mut all: WorkerStats, lag: &std::collections::BTreeMap<u64, f64>) {
    let seconds = if args.timeline { timeline(&all) } else { Vec::new() };
    all.latencies_us.sort_unstable();
    let l = &all.latencies_us;
    let ok = l.len() as f64;
    let summary = json!({
        "mix": format!("{:?}", args.mix).to_lowercase(),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "targets": args.targets,
        "ok": l.len(),
        "errors": all.errors,
        "throughput_per_s": (ok / args.duration as f64).round(),
        "p50_ms": percentile(l, 0.50),
        "p99_ms": percentile(l, 0.99),
        "p999_ms": percentile(l, 0.999),
        "max_ms": percentile(l, 1.0),
        "replication_events": lag.get(&u64::MAX).copied().unwrap_or(0.0),
        "replication_lag_p50_ms_at_most": bucket_quantile(lag, 0.5),
        "replication_lag_p99_ms_at_most": bucket_quantile(lag, 0.99),
        "timeline": seconds.iter().map(|(s, n, p99)| json!({"second": s, "ok": n, "p99_ms": p99})).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{summary}");
        return;
    }
    println!(
        "agora bench: mix={} concurrency={} duration={}s targets={}",
        summary["mix"].as_str().unwrap_or(""),
        args.concurrency,
        args.duration,
        args.targets.join(",")
    );
    println!("  acknowledged: {} ({} /s), errors: {}", l.len(), summary["throughput_per_s"], all.errors);
    println!("  latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}", percentile(l, 0.5), percentile(l, 0.99), percentile(l, 0.999), percentile(l, 1.0));
    if let (Some(p50), Some(p99)) = (bucket_quantile(lag, 0.5), bucket_quantile(lag, 0.99)) {
        let n = summary["replication_events"].as_f64().unwrap_or(0.0);
        println!(
            "  cross-DC replication lag (origin timestamp to remote commit, histogram buckets, {n} events at the targets): p50 <= {p50} ms, p99 <= {p99} ms"
        );
    }
    for (s, n, p99) in &seconds {
        println!("  second {s:>3}: {n:>6} acknowledged, p99 {p99:.2} ms");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_groups_requests_by_the_second_they_started_in() {
        let all = WorkerStats { latencies_us: vec![1_000, 2_000, 50_000, 3_000], started_s: vec![0, 0, 2, 2], errors: 0 };
        assert_eq!(timeline(&all), vec![(0, 2, 2.0), (2, 2, 50.0)]);
    }

    #[test]
    fn an_interval_line_has_its_rate_and_percentiles() {
        let l: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        let v = interval_line(3, 30.0, 10.0, &l, 2);
        assert_eq!(v["interval"], 3);
        assert_eq!(v["ok"], 100);
        assert_eq!(v["errors"], 2);
        assert_eq!(v["throughput_per_s"], 10.0);
        assert_eq!(v["p50_ms"], 51.0);
        assert_eq!(v["p99_ms"], 99.0);
        assert_eq!(interval_line(1, 10.0, 10.0, &[], 0)["p99_ms"], 0.0);
    }
}
