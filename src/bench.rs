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
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default)]
struct WorkerStats {
    latencies_us: Vec<u32>,
    errors: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.targets.is_empty() || args.skus == 0 {
        bail!("--concurrency, --skus and at least one --target are required");
    }
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).timeout(Duration::from_secs(10)).build()?;
    let setup = prepare(&client, &args).await.context("prepare the run (is the cluster up?)")?;
    let warmup_end = Instant::now() + Duration::from_secs(args.warmup);
    let end = warmup_end + Duration::from_secs(args.duration);
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let (client, args, setup) = (client.clone(), args.clone(), setup.clone());
        workers.push(tokio::spawn(async move { worker(w, client, args, setup, warmup_end, end).await }));
    }
    let mut all = WorkerStats::default();
    for w in workers {
        let s = w.await?;
        all.latencies_us.extend(s.latencies_us);
        all.errors += s.errors;
    }
    report(&args, all);
    Ok(())
}

#[derive(Clone)]
struct Setup {
    session: String,
    skus: Vec<String>,
    /// Orders placed during the warm-up, for the read mix.
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
    let base = &args.targets[0];
    let session = post(client, format!("{base}/v1/sessions"), json!({"user": "bench"})).await?["token"].as_str().unwrap_or_default().to_string();
    let run = format!("{:08x}", rand::random::<u32>());
    let skus: Vec<String> = (0..args.skus).map(|i| format!("bench-{run}-{i}")).collect();
    for sku in &skus {
        let url = format!("{base}/v1/inventory/{sku}");
        let resp = client.put(&url).json(&json!({"add": 1_000_000})).send().await?;
        if !resp.status().is_success() {
            bail!("{url}: {}", resp.status());
        }
    }
    let mut orders = Vec::new();
    if args.mix == Mix::ReadHeavy {
        for sku in skus.iter().take(16) {
            let o = post(client, format!("{base}/v1/orders"), json!({"session": session, "sku": sku, "qty": 1})).await?;
            orders.push(o["id"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(Setup { session, skus, orders })
}

async fn worker(w: usize, client: reqwest::Client, args: BenchArgs, setup: Setup, warmup_end: Instant, end: Instant) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let base = &args.targets[w % args.targets.len()];
    let mut i = w;
    while Instant::now() < end {
        i = i.wrapping_add(args.concurrency);
        let started = Instant::now();
        let ok = one_request(&client, base, &args, &setup, i).await;
        if started < warmup_end {
            continue;
        }
        match ok {
            true => stats.latencies_us.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32),
            false => stats.errors += 1,
        }
    }
    stats
}

async fn one_request(client: &reqwest::Client, base: &str, args: &BenchArgs, setup: &Setup, i: usize) -> bool {
    let sku = &setup.skus[i % setup.skus.len()];
    let req = match args.mix {
        Mix::ReadHeavy if i % 5 != 0 => client.get(format!("{base}/v1/orders/{}", setup.orders[i % setup.orders.len()])),
        Mix::Sessions => client.post(format!("{base}/v1/sessions")).json(&json!({"user": "bench"})),
        _ => client.post(format!("{base}/v1/orders")).json(&json!({"session": setup.session, "sku": sku, "qty": 1})),
    };
    match req.send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            let _ = r.bytes().await;
            ok
        }
        Err(_) => false,
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn report(args: &BenchArgs, mut all: WorkerStats) {
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
}
