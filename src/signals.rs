//! The signals that stop a process: Ctrl-C (SIGINT) and SIGTERM.

use anyhow::Context;

/// Returns once SIGINT or SIGTERM arrives.
pub async fn stop_requested() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
