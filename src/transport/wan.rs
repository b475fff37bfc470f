//! WAN emulation in userspace: every frame a node sends to a node of another DC (a
//! request from its client, an answer from its server) waits the one-way latency of that
//! DC pair, plus jitter, before it is written. Both ends delay what they send, so a round
//! trip takes twice the latency, as over a real link. It needs no kernel support (no
//! `sch_netem`), so it works on every backend; unlike netem it delays Agora's frames only,
//! not TCP's handshakes and acknowledgements.
//!
//! Frames to one peer go through one [`DelayQueue`]: in order (a frame never overtakes
//! the one before it, whatever the jitter drew), without holding up other peers'
//! frames, and bounded — a frame that finds the queue full is refused, as a full socket
//! buffer would refuse it.
//!
//! The latencies come from the cluster file's `[wan]` section and can be changed on a
//! running node (`PUT /v1/admin/wan`, which `agora cluster latency` uses).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{ClusterConfig, WanLink, WanSection};
use crate::raft::NodeId;

/// The latency between two DCs: frames wait `latency_ms` ± `jitter_ms` (uniform), each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkDelay {
    pub latency_ms: u64,
    pub jitter_ms: u64,
}

impl LinkDelay {
    /// One draw of the delay; `None` when there is none.
    fn sample(self) -> Option<Duration> {
        if self.latency_ms == 0 && self.jitter_ms == 0 {
            return None;
        }
        let jitter = i128::from(self.jitter_ms);
        let offset = if jitter == 0 { 0 } else { rand::thread_rng().gen_range(-jitter..=jitter) };
        let ms = (i128::from(self.latency_ms) + offset).max(0);
        Some(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
    }
}

/// The delays this node applies, by destination DC. The default knows no other DC and
/// delays nothing.
#[derive(Clone, Default)]
pub struct Wan {
    me_dc: Arc<str>,
    dc_of: Arc<HashMap<NodeId, String>>,
    queue_len_max: usize,
    // std RwLock: held for a lookup only, never across an await.
    section: Arc<RwLock<WanSection>>,
}

impl Wan {
    pub fn new(config: &ClusterConfig, me_dc: &str) -> Self {
        let dc_of = config.nodes().into_iter().map(|n| (n.id, n.dc)).collect();
        Wan { me_dc: me_dc.into(), dc_of: Arc::new(dc_of), queue_len_max: config.wan.queue_len_max, section: Arc::new(RwLock::new(config.wan.clone())) }
    }

    /// Whether frames to `peer` cross the WAN (it is in another DC).
    pub fn crosses(&self, peer: NodeId) -> bool {
        self.dc_of.get(&peer).is_some_and(|dc| **dc != *self.me_dc)
    }

    pub fn queue_len_max(&self) -> usize {
        self.queue_len_max
    }

    /// The delay for one frame to `peer` now; `None` inside the DC or with no latency set.
    pub fn delay_to(&self, peer: NodeId) -> Option<Duration> {
        let dc = self.dc_of.get(&peer).filter(|dc| **dc != *self.me_dc)?;
        let link = self.section.read().expect("wan lock").link(&self.me_dc, dc);
        link.sample()
    }

    pub fn get(&self) -> WanSection {
        self.section.read().expect("wan lock").clone()
    }

    /// Replaces the latencies (the queue bound stays the configured one).
    pub fn set(&self, mut section: WanSection) {
        section.queue_len_max = self.queue_len_max;
        *self.section.write().expect("wan lock") = section;
    }
}

impl WanSection {
    /// The delay between DCs `a` and `b`: a `[[wan.link]]` naming the pair, else the default.
    pub fn link(&self, a: &str, b: &str) -> LinkDelay {
        let named = |l: &&WanLink| (l.dcs[0] == a && l.dcs[1] == b) || (l.dcs[0] == b && l.dcs[1] == a);
        match self.links.iter().find(named) {
            Some(l) => LinkDelay { latency_ms: l.latency_ms, jitter_ms: l.jitter_ms },
            None => LinkDelay { latency_ms: self.latency_ms, jitter_ms: self.jitter_ms },
        }
    }

    /// Every DC pair's delay, for display (`agora cluster latency` prints it).
    pub fn table(&self, dcs: &[String]) -> BTreeMap<String, LinkDelay> {
        let mut t = BTreeMap::new();
        for (i, a) in dcs.iter().enumerate() {
            for b in &dcs[i + 1..] {
                t.insert(format!("{a}-{b}"), self.link(a, b));
            }
        }
        t
    }
}

/// Frames waiting for their time, in the order they came. Only the first frame is ever
/// taken out: a frame leaves at its own time or, if the one before it drew a longer
/// delay, right after that one — jitter never reorders a connection's frames.
pub struct DelayQueue<T> {
    items: VecDeque<(Instant, T)>,
    len_max: usize,
}

impl<T> DelayQueue<T> {
    pub fn new(len_max: usize) -> Self {
        DelayQueue { items: VecDeque::new(), len_max }
    }

    /// Queues `item` to leave `delay` after `now`; gives it back when the queue is full.
    pub fn push(&mut self, now: Instant, delay: Duration, item: T) -> Result<(), T> {
        if self.items.len() >= self.len_max {
            return Err(item);
        }
        let due = now.checked_add(delay).unwrap_or(now);
        self.items.push_back((due, item));
        Ok(())
    }

    /// When the first frame is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.items.front().map(|(due, _)| *due)
    }

    /// The first frame, if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_due()? <= now {
            self.items.pop_front().map(|(_, item)| item)
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Where a delay line takes frames from: the client's unbounded request channel or the
/// server's bounded answer channel.
pub trait Inbox<T>: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Option<T>> + Send;
}

impl<T: Send + 'static> Inbox<T> for mpsc::UnboundedReceiver<T> {
    fn next(&mut self) -> impl Future<Output = Option<T>> + Send {
        self.recv()
    }
}

impl<T: Send + 'static> Inbox<T> for mpsc::Receiver<T> {
    fn next(&mut self) -> impl Future<Output = Option<T>> + Send {
        self.recv()
    }
}

/// Where a delay line puts frames that are due; `false` once the other end is gone. A
/// bounded channel waits for room, so a slow connection backs up into the delay queue,
/// which then refuses frames.
pub trait Outbox<T>: Send + 'static {
    fn put(&self, item: T) -> impl Future<Output = bool> + Send;
}

impl<T: Send + 'static> Outbox<T> for mpsc::UnboundedSender<T> {
    async fn put(&self, item: T) -> bool {
        self.send(item).is_ok()
    }
}

impl<T: Send + 'static> Outbox<T> for mpsc::Sender<T> {
    async fn put(&self, item: T) -> bool {
        self.send(item).await.is_ok()
    }
}

/// Moves frames for `peer` from `input` to `output`, each after its WAN delay, until
/// `input` closes (or `output` does). A frame that finds the queue full goes to `refuse`.
pub async fn delay_line<T: Send + 'static>(mut input: impl Inbox<T>, output: impl Outbox<T>, wan: Wan, peer: NodeId, refuse: impl Fn(T) + Send + 'static) {
    let mut queue = DelayQueue::new(wan.queue_len_max());
    loop {
        let due = queue.next_due();
        tokio::select! {
            item = input.next() => {
                let Some(item) = item else { break };
                let delay = wan.delay_to(peer).unwrap_or_default();
                if delay.is_zero() && queue.is_empty() {
                    if !output.put(item).await { return; }
                } else if let Err(item) = queue.push(Instant::now(), delay, item) {
                    refuse(item);
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                if !send_due(&mut queue, &output).await { return; }
            }
        }
    }
    // The sender is gone: what is still queued goes out at its time, as it would on a link.
    while let Some(due) = queue.next_due() {
        tokio::time::sleep_until(due).await;
        if !send_due(&mut queue, &output).await {
            return;
        }
    }
}

/// Sends every frame that is due; `false` once `output` is gone.
async fn send_due<T: Send + 'static>(queue: &mut DelayQueue<T>, output: &impl Outbox<T>) -> bool {
    while let Some(item) = queue.pop_due(Instant::now()) {
        if !output.put(item).await {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_in_arrival_order_whatever_their_delays() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new(8);
        // The second frame drew a shorter delay: it still waits for the first.
        q.push(t0, Duration::from_millis(100), "a").unwrap();
        q.push(t0 + Duration::from_millis(1), Duration::from_millis(10), "b").unwrap();
        q.push(t0 + Duration::from_millis(2), Duration::from_millis(300), "c").unwrap();
        assert_eq!(q.pop_due(t0 + Duration::from_millis(50)), None, "nothing is due before the first frame's time");
        let at = t0 + Duration::from_millis(150);
        assert_eq!((q.pop_due(at), q.pop_due(at), q.pop_due(at)), (Some("a"), Some("b"), None));
        assert_eq!(q.pop_due(t0 + Duration::from_millis(302)), Some("c"));
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_gives_the_frame_back() {
        let t0 = Instant::now();
        let mut q = DelayQueue::new(2);
        q.push(t0, Duration::from_millis(10), 1).unwrap();
        q.push(t0, Duration::from_millis(10), 2).unwrap();
        assert_eq!(q.push(t0, Duration::from_millis(10), 3), Err(3));
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop_due(t0 + Duration::from_millis(10)), Some(1));
        q.push(t0, Duration::from_millis(10), 4).expect("room again once a frame left");
    }

    fn wan(section: WanSection) -> Wan {
        let config = ClusterConfig::from_toml(crate::config::DEFAULT_TOML, "default").unwrap();
        let w = Wan::new(&config, "dc1");
        w.set(section);
        w
    }

    #[test]
    fn only_frames_to_other_dcs_are_delayed_and_a_named_pair_overrides_the_default() {
        let links = vec![WanLink { dcs: ["dc3".into(), "dc1".into()], latency_ms: 150, jitter_ms: 0 }];
        let w = wan(WanSection { latency_ms: 80, jitter_ms: 0, links, ..WanSection::default() });
        let config = ClusterConfig::from_toml(crate::config::DEFAULT_TOML, "default").unwrap();
        let id = |name: &str| config.node(name).unwrap().id;
        assert_eq!(w.delay_to(id("dc1-n2")), None, "inside the DC");
        assert_eq!(w.delay_to(id("dc2-n1")), Some(Duration::from_millis(80)));
        assert_eq!(w.delay_to(id("dc3-n1")), Some(Duration::from_millis(150)));
        w.set(WanSection::default());
        assert_eq!(w.delay_to(id("dc2-n1")), None, "set to nothing at run time");
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let link = LinkDelay { latency_ms: 20, jitter_ms: 30 };
        for _ in 0..200 {
            let d = link.sample().unwrap();
            assert!(d <= Duration::from_millis(50), "{d:?}");
        }
    }

    /// The async line keeps order and delays each frame by at least its latency.
    #[tokio::test]
    async fn the_delay_line_holds_each_frame_and_keeps_order() {
        let config = ClusterConfig::from_toml(crate::config::DEFAULT_TOML, "default").unwrap();
        let w = wan(WanSection { latency_ms: 60, jitter_ms: 20, ..WanSection::default() });
        // Test channels: 50 frames in all.
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, mut out) = mpsc::unbounded_channel();
        tokio::spawn(delay_line(rx, out_tx, w, config.node("dc2-n1").unwrap().id, |_: u32| panic!("the queue is large enough")));
        let start = Instant::now();
        for i in 0..50u32 {
            tx.send(i).unwrap();
        }
        for i in 0..50u32 {
            assert_eq!(out.recv().await, Some(i));
            assert!(start.elapsed() >= Duration::from_millis(40), "frame {i} left after {:?}", start.elapsed());
        }
    }
}
