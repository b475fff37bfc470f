//! The signals that stop a process: SIGINT (Ctrl-C) and SIGTERM.

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Listens from the moment it is made: a signal that arrives before [`Stop::requested`]
/// is awaited (while the process is busy starting, say) is kept, not fatal.
pub struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    /// Installs the handlers (inside a tokio runtime).
    pub fn listen() -> anyhow::Result<Stop> {
        let interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        Ok(Stop { interrupt, terminate })
    }

    /// Returns once SIGINT or SIGTERM has arrived.
    pub async fn requested(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
