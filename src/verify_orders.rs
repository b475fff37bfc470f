//! `agora verify-orders`: asks one node for every order id a run recorded (`agora bench
//! --record-ids`), as that node holds it (`?consistency=stale`: its own state machine,
//! not its leader's), and reports the orders it does not serve. Run against a node
//! restarted from its data dir, once caught up, it shows whether every acknowledged
//! order survived the restart.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// File of order ids, one per line (`agora bench --record-ids`).
    #[arg(long)]
    pub ids: PathBuf,
    /// API base URL of the node to ask.
    #[arg(long, default_value = "http://127.0.1.1:8080")]
    pub target: String,
    /// Requests in flight.
    #[arg(long, short = 'c', default_value_t = 32)]
    pub concurrency: usize,
}

/// Missing (or failed) ids named in the report, at most.
const EXAMPLES_MAX: usize = 10;
/// Tries per id before it counts as an error rather than missing: a busy node may time
/// out, and a 404 is an answer, not a failure.
const TRIES: usize = 3;
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Ids read ahead of the requests, per request in flight: the file is streamed, never
/// held in memory (a long soak records millions).
const READ_AHEAD: usize = 4;

/// What one id turned out to be.
#[derive(Debug, PartialEq)]
enum Check {
    Served,
    Missing,
    Failed(String),
}

#[derive(Default)]
struct Tally {
    served: u64,
    missing: u64,
    failed: u64,
    missing_examples: Vec<String>,
    failed_examples: Vec<String>,
}

impl Tally {
    fn add(&mut self, id: &str, check: Check) {
        match check {
            Check::Served => self.served = self.served.saturating_add(1),
            Check::Missing => {
                self.missing = self.missing.saturating_add(1);
                if self.missing_examples.len() < EXAMPLES_MAX {
                    self.missing_examples.push(id.to_string());
                }
            }
            Check::Failed(why) => {
                self.failed = self.failed.saturating_add(1);
                if self.failed_examples.len() < EXAMPLES_MAX {
                    self.failed_examples.push(format!("{id}: {why}"));
                }
            }
        }
    }
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let file = std::fs::File::open(&args.ids).with_context(|| format!("open {}", args.ids.display()))?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).timeout(Duration::from_secs(10)).build()?;
    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(args.concurrency.saturating_mul(READ_AHEAD));
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for line in std::io::BufReader::new(file).lines() {
            let line = line.context("read the ids file")?;
            let id = line.trim();
            if !id.is_empty() && tx.blocking_send(id.to_string()).is_err() {
                break;
            }
        }
        Ok(())
    });
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, rx, tally, target) = (client.clone(), rx.clone(), tally.clone(), args.target.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let Some(id) = rx.lock().await.recv().await else { break };
                let check = check(&client, &target, &id).await;
                tally.lock().expect("tally lock").add(&id, check);
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    reader.await??;
    let t = std::mem::take(&mut *tally.lock().expect("tally lock"));
    let checked = t.served.saturating_add(t.missing).saturating_add(t.failed);
    let report = json!({
        "target": args.target,
        "checked": checked,
        "served": t.served,
        "missing": t.missing,
        "failed": t.failed,
        "missing_examples": t.missing_examples,
        "failed_examples": t.failed_examples,
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    println!("{report}");
    if checked == 0 {
        bail!("{} holds no order ids", args.ids.display());
    }
    if t.missing > 0 || t.failed > 0 {
        bail!("{} of {checked} orders not served by {} ({} missing, {} not answered)", t.missing.saturating_add(t.failed), args.target, t.missing, t.failed);
    }
    Ok(())
}

/// Whether `target` serves order `id` from its own state.
async fn check(client: &reqwest::Client, target: &str, id: &str) -> Check {
    if let Err(why) = crate::domain::validate::name("order id", id) {
        return Check::Failed(why);
    }
    let url = format!("{target}/v1/orders/{id}?consistency=stale");
    let mut last = String::new();
    for attempt in 0..TRIES {
        if attempt > 0 {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        match client.get(&url).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => return Check::Missing,
            Ok(r) if r.status().is_success() => {
                let body: Value = r.json().await.unwrap_or(Value::Null);
                return match body["id"].as_str() {
                    Some(got) if got == id => Check::Served,
                    _ => Check::Failed(format!("answered {body}")),
                };
            }
            Ok(r) => last = r.status().to_string(),
            Err(e) => last = e.to_string(),
        }
    }
    Check::Failed(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ids_that_cannot_go_into_a_path_are_refused_before_any_request() {
        // Nothing listens on port 9 of this address: a request would fail otherwise.
        let client = reqwest::Client::new();
        for bad in ["", "a/b", "x?consistency=linearizable", "a b", &"a".repeat(129)] {
            let check = check(&client, "http://127.0.0.1:9", bad).await;
            assert!(matches!(&check, Check::Failed(why) if why.contains("order id must be")), "{bad:?}: {check:?}");
        }
    }

    #[test]
    fn the_tally_counts_each_kind_and_names_a_few() {
        let mut t = Tally::default();
        t.add("a", Check::Served);
        for i in 0..(EXAMPLES_MAX + 2) {
            t.add(&format!("m{i}"), Check::Missing);
        }
        t.add("f", Check::Failed("503".into()));
        assert_eq!((t.served, t.missing, t.failed), (1, EXAMPLES_MAX as u64 + 2, 1));
        assert_eq!(t.missing_examples.len(), EXAMPLES_MAX);
        assert_eq!(t.failed_examples, vec!["f: 503".to_string()]);
    }
}
