//! How promptly the node's async runtime runs its tasks. Raft's heartbeats, election
//! timers and replies all wait their turn on the same few worker threads: a worker held
//! by long synchronous work, or a process starved of CPU, delays all of them, and a
//! delay past the election timeout looks to the DC like a dead node. The probe asks to
//! wake every few milliseconds and records how late it woke.

use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::Metrics;

const PERIOD: Duration = Duration::from_millis(10);
/// A delay this long gets a log line of its own: it is how long a follower waits for a
/// heartbeat at the shortest election timeouts anyone would configure.
const LOG_AT: Duration = Duration::from_millis(200);

/// Probes until dropped.
pub async fn run(metrics: Metrics) {
    let mut due = Instant::now() + PERIOD;
    loop {
        tokio::time::sleep_until(due).await;
        let late = Instant::now().saturating_duration_since(due);
        metrics.runtime_delay.observe(late.as_secs_f64());
        if late >= LOG_AT {
            // At most one line per `LOG_AT` of stall: the log cannot flood.
            tracing::warn!(late_ms = late.as_millis() as u64, "runtime stalled: a task ran late");
        }
        due = Instant::now() + PERIOD;
    }
}
