//! Bounds at the door: what every listening socket (HTTP and peer) applies to a new
//! connection before it costs anything.
//!
//! - [`ConnGuard`]: a global cap on open connections and a cap per source IP. Admitting
//!   a connection returns a [`ConnPermit`] that frees its slot when dropped; a refusal is
//!   counted and logged (rate-limited), and the caller closes the socket at once.
//! - [`IdleTimeout`]: wraps a stream so that a read that makes no progress for a given
//!   time sees the end of the stream; whoever reads it then drops the connection.
//!
//! Both are independent of what runs over the connection, so a TLS layer can be put
//! above or below the idle timeout.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Connection caps of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at most, from everyone.
    pub total_max: usize,
    /// Open connections at most from one source IP.
    pub per_source_max: usize,
}

/// Where a door exports what it does.
#[derive(Clone)]
pub struct DoorMetrics {
    /// Refused connections, by listener and reason.
    pub refused: prometheus::IntCounterVec,
    /// Open connections, by listener.
    pub open: prometheus::IntGaugeVec,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerSource,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerSource => "per_source",
        }
    }
}

struct State {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

struct Inner {
    /// `http` or `peer`: names the listener in logs.
    name: &'static str,
    limits: ConnLimits,
    state: Mutex<State>,
    refused: AtomicU64,
    /// Exported figures, if any.
    metric: Option<DoorMetrics>,
}

/// Counts open connections of one listener; cheap to clone.
#[derive(Clone)]
pub struct ConnGuard(Arc<Inner>);

/// One admitted connection: holds its slot until dropped.
pub struct ConnPermit {
    guard: Arc<Inner>,
    source: IpAddr,
}

impl ConnGuard {
    pub fn new(name: &'static str, limits: ConnLimits) -> Self {
        Self::counted(name, limits, None)
    }

    /// Also exports refusals and open connections in `metric`.
    pub fn counted(name: &'static str, limits: ConnLimits, metric: Option<DoorMetrics>) -> Self {
        let state = Mutex::new(State { total: 0, by_source: HashMap::new() });
        ConnGuard(Arc::new(Inner { name, limits, state, refused: AtomicU64::new(0), metric }))
    }

    /// Admits a connection from `source`, or refuses it (counted and logged, at most one
    /// line per interval with the number of refusals since the last line).
    pub fn admit(&self, source: IpAddr) -> Result<ConnPermit, Refusal> {
        let r = self.try_admit(source);
        if let Err(why) = r {
            self.0.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &self.0.metric {
                m.refused.with_label_values(&[self.0.name, why.as_str()]).inc();
            }
            crate::warn_limited!(
                self.0.name,
                listener = self.0.name,
                reason = why.as_str(),
                %source,
                total_max = self.0.limits.total_max,
                per_source_max = self.0.limits.per_source_max,
                "connection refused: over the connection limit"
            );
        }
        r
    }

    fn try_admit(&self, source: IpAddr) -> Result<ConnPermit, Refusal> {
        let mut st = self.0.state.lock().expect("conn guard lock");
        if st.total >= self.0.limits.total_max {
            return Err(Refusal::Total);
        }
        let n = st.by_source.entry(source).or_insert(0);
        if *n >= self.0.limits.per_source_max {
            return Err(Refusal::PerSource);
        }
        *n += 1;
        st.total += 1;
        if let Some(m) = &self.0.metric {
            m.open.with_label_values(&[self.0.name]).set(st.total as i64);
        }
        Ok(ConnPermit { guard: self.0.clone(), source })
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.0.state.lock().expect("conn guard lock").total
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut st = self.guard.state.lock().expect("conn guard lock");
        st.total -= 1;
        if let Some(m) = &self.guard.metric {
            m.open.with_label_values(&[self.guard.name]).set(st.total as i64);
        }
        if let Some(n) = st.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                // The map holds only sources with open connections: it cannot grow with
                // the number of addresses ever seen.
                st.by_source.remove(&self.source);
            }
        }
    }
}

/// A stream whose reads end (as at end of stream) once no byte has arrived for
/// `timeout` while the reader was waiting. Writes pass through untouched. A reader that stops
/// reading (back-pressure) is not timed: the clock only runs out inside a pending read.
/// An admitted connection also holds its slot under the caps here, freed when it drops.
pub struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: Option<ConnPermit>,
}

/// An admitted connection: the stream under its idle timeout, holding its slot.
pub type Admitted<S> = IdleTimeout<S>;

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        IdleTimeout { inner, timeout, deadline: Box::pin(tokio::time::sleep(timeout)), _permit: None }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + this.timeout;
                    this.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                // Reads as the end of the stream: the reader closes the connection as it
                // would when the other side hangs up (a frame cut short still counts as
                // truncated).
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One listener's door: the connection caps and the idle timeout together.
#[derive(Clone)]
pub struct Door {
    pub guard: ConnGuard,
    pub idle: Duration,
}

impl Door {
    pub fn new(name: &'static str, limits: ConnLimits, idle: Duration) -> Self {
        Door { guard: ConnGuard::new(name, limits), idle }
    }

    /// A door that also exports refusals and open connections in `metric`.
    pub fn counted(name: &'static str, limits: ConnLimits, idle: Duration, metric: DoorMetrics) -> Self {
        Door { guard: ConnGuard::counted(name, limits, Some(metric)), idle }
    }

    /// Admits `stream` from `source`, wrapped in the idle timeout and holding its slot
    /// until dropped; `None` (after counting and logging) when it is over a cap: the
    /// caller drops the stream, which closes it at once.
    pub fn admit<S>(&self, stream: S, source: IpAddr) -> Option<Admitted<S>> {
        let permit = self.guard.admit(source).ok()?;
        Some(IdleTimeout { _permit: Some(permit), ..IdleTimeout::new(stream, self.idle) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn caps_total_and_per_source_and_frees_on_drop() {
        let g = ConnGuard::new("test", ConnLimits { total_max: 3, per_source_max: 2 });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let p1 = g.admit(a).unwrap();
        let _p2 = g.admit(a).unwrap();
        assert_eq!(g.admit(a).err(), Some(Refusal::PerSource));
        let _p3 = g.admit(b).unwrap();
        assert_eq!(g.admit(c).err(), Some(Refusal::Total));
        assert_eq!(g.refused(), 2);
        drop(p1);
        assert_eq!(g.open(), 2);
        let _p4 = g.admit(a).unwrap();
        assert_eq!(g.0.state.lock().unwrap().by_source.len(), 2);
    }

    #[tokio::test]
    async fn idle_reads_time_out_and_progress_resets_the_clock() {
        let (client, server) = tokio::io::duplex(64);
        let mut s = IdleTimeout::new(server, Duration::from_millis(200));
        let (_r, mut w) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                w.write_all(b"x").await.unwrap();
            }
            // Then silence, with the stream still open.
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(w);
        });
        let start = std::time::Instant::now();
        let mut buf = [0u8; 1];
        for _ in 0..4 {
            s.read_exact(&mut buf).await.expect("bytes arrive within the idle time");
        }
        assert_eq!(s.read(&mut buf).await.expect("silence reads as the end"), 0);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(550) && took < Duration::from_millis(2000), "{took:?}");
        writer.abort();
    }
}
