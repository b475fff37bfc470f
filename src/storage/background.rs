//! Low-priority work: building a snapshot scans and encodes the whole state, up to seconds
//! of CPU on every node of a DC at about the same time. Run at the same priority as the
//! request path, it shows in the latency of the writes going on meanwhile; at nice 10 it
//! takes only the CPU they leave (the scheduler weighs a nice-10 thread about a tenth of
//! a normal one), and still finishes on an idle machine as fast as before.

use std::io;

/// The nice value of background threads (0 is normal, 19 the lowest priority).
pub const NICE: i32 = 10;

/// Runs `f` on a thread of its own at low priority and waits for its result. Snapshots
/// are rare, so a thread per call costs nothing; tokio's blocking pool reuses its threads
/// and would carry the lowered priority on to other work.
pub async fn run_low_priority<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        lower_priority();
        let _ = tx.send(f());
    })?;
    rx.await.map_err(|_| io::Error::other("background thread stopped without a result (panicked)"))
}

/// On Linux a priority set for a thread id applies to that thread only, not its process.
fn lower_priority() {
    // SAFETY: a plain system call on the calling thread; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid(), NICE.max(current_nice())) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not lower a background thread's priority");
    }
}

/// The calling thread's nice value.
pub fn current_nice() -> i32 {
    // SAFETY: as above. getpriority may return -1 legitimately; a failure is not expected
    // for the calling thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, tid()) }
}

/// The calling thread's id (what the priority calls take as "process" for one thread).
fn tid() -> libc::id_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_at_low_priority_and_the_caller_keeps_its_own() {
        let before = current_nice();
        let inside = run_low_priority("test-bg", current_nice).await.unwrap();
        assert!(inside >= NICE, "background work ran at nice {inside}");
        assert_eq!(current_nice(), before, "the caller's priority changed");
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_an_error_not_a_hang() {
        let r = run_low_priority("test-bg", || -> u32 { panic!("boom") }).await;
        assert!(r.is_err());
    }
}
