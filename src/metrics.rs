//! Prometheus metrics, named `agora_<thing>_<unit>`.

use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub actor_restarts: IntCounterVec,
    pub forwarded_writes: IntCounterVec,
    pub lookups: IntCounterVec,
    /// Connections refused at the door, by listener (`http`, `peer`) and cap.
    pub conns_refused: IntCounterVec,
    /// Connections open now, by listener.
    pub conns_open: IntGaugeVec,
    /// Per shard (label `shard`): each is its own Raft group.
    pub raft_term: IntGaugeVec,
    pub raft_commit_index: IntGaugeVec,
    pub raft_applied_index: IntGaugeVec,
    pub raft_is_leader: IntGaugeVec,
    pub raft_leader_known: IntGaugeVec,
    /// Read-index rounds this node ran per shard, and the linearizable reads and
    /// rejections they answered: how much one quorum round is shared.
    pub read_index_rounds: IntCounterVec,
    pub read_index_reads: IntCounterVec,
    pub replication_lag_events: IntGaugeVec,
    pub replication_lag_ms: IntGaugeVec,
    pub replication_link_up: IntGaugeVec,
    pub replication_link_health_changes: IntCounterVec,
    pub replication_last_contact_ms: IntGaugeVec,
    pub replication_apply_lag: HistogramVec,
    /// How late the runtime ran a task that asked to wake at a given instant.
    pub runtime_delay: Histogram,
}

fn shard_gauge(name: &str, help: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &["shard"]).expect("metric")
}

fn shard_counter(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &["shard"]).expect("metric")
}

impl Metrics {
    /// What the listeners' doors export.
    pub fn door(&self) -> crate::door::DoorMetrics {
        crate::door::DoorMetrics { refused: self.conns_refused.clone(), open: self.conns_open.clone() }
    }

    pub fn new(node: &str, dc: &str) -> Self {
        let labels = [("node".to_string(), node.to_string()), ("dc".to_string(), dc.to_string())].into_iter().collect();
        let registry = Registry::new_custom(Some("agora".into()), Some(labels)).expect("metrics registry");
        let m = Metrics {
            http_requests: IntCounterVec::new(Opts::new("http_requests_total", "HTTP requests by route and status"), &["route", "status"]).expect("metric"),
            http_seconds: HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                &["route"],
            )
            .expect("metric"),
            actor_restarts: IntCounterVec::new(Opts::new("actor_restarts_total", "actors restarted by their supervisor"), &["actor"]).expect("metric"),
            conns_refused: IntCounterVec::new(Opts::new("conns_refused_total", "connections closed at accept for being over a cap"), &["listener", "reason"])
                .expect("metric"),
            conns_open: IntGaugeVec::new(Opts::new("conns_open", "connections open now"), &["listener"]).expect("metric"),
            forwarded_writes: IntCounterVec::new(Opts::new("forwarded_writes_total", "writes forwarded to the DC leader, by result"), &["result"])
                .expect("metric"),
            lookups: IntCounterVec::new(
                Opts::new("owner_lookups_total", "ids and tokens asked of the DC that owns them, by owner and result"),
                &["owner", "result"],
            )
            .expect("metric"),
            raft_term: shard_gauge("raft_term", "current Raft term of the shard"),
            raft_commit_index: shard_gauge("raft_commit_index", "last committed log index of the shard"),
            raft_applied_index: shard_gauge("raft_applied_index", "last applied log index of the shard"),
            raft_is_leader: shard_gauge("raft_is_leader", "1 where this node leads the shard"),
            raft_leader_known: shard_gauge("raft_leader_known", "1 if this node knows a leader of the shard"),
            read_index_rounds: shard_counter("read_index_rounds_total", "read-index rounds (leadership confirmed by a quorum) this node ran for the shard"),
            read_index_reads: shard_counter("read_index_reads_total", "linearizable reads and rejections the shard's read-index rounds answered"),
            replication_lag_events: IntGaugeVec::new(Opts::new("replication_lag_events", "our events the peer DC has not applied (leader only)"), &["peer"])
                .expect("metric"),
            replication_lag_ms: IntGaugeVec::new(
                Opts::new("replication_lag_ms", "age of our oldest event the peer DC has not applied (leader only)"),
                &["peer"],
            )
            .expect("metric"),
            replication_link_up: IntGaugeVec::new(Opts::new("replication_link_up", "1 if the peer DC answered recently and has a leader"), &["peer"])
                .expect("metric"),
            replication_link_health_changes: IntCounterVec::new(
                Opts::new("replication_link_health_changes_total", "times the peer DC's health (replication_link_up) changed, as the probes saw it"),
                &["peer"],
            )
            .expect("metric"),
            replication_apply_lag: HistogramVec::new(
                HistogramOpts::new("replication_apply_lag_seconds", "from an event's origin timestamp to its commit in this DC")
                    .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]),
                &["origin"],
            )
            .expect("metric"),
            replication_last_contact_ms: IntGaugeVec::new(Opts::new("replication_last_contact_ms", "milliseconds since the peer DC last answered"), &["peer"])
                .expect("metric"),
            runtime_delay: Histogram::with_opts(
                HistogramOpts::new("runtime_delay_seconds", "how late a task due at an instant was run (runtime busy or starved of CPU)")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )
            .expect("metric"),
            registry,
        };
        m.register_all();
        m
    }

    fn register_all(&self) {
        let r = &self.registry;
        r.register(Box::new(self.http_requests.clone())).expect("register");
        r.register(Box::new(self.http_seconds.clone())).expect("register");
        r.register(Box::new(self.actor_restarts.clone())).expect("register");
        r.register(Box::new(self.forwarded_writes.clone())).expect("register");
        r.register(Box::new(self.lookups.clone())).expect("register");
        r.register(Box::new(self.conns_refused.clone())).expect("register");
        r.register(Box::new(self.conns_open.clone())).expect("register");
        r.register(Box::new(self.raft_term.clone())).expect("register");
        r.register(Box::new(self.raft_commit_index.clone())).expect("register");
        r.register(Box::new(self.raft_applied_index.clone())).expect("register");
        r.register(Box::new(self.raft_is_leader.clone())).expect("register");
        r.register(Box::new(self.raft_leader_known.clone())).expect("register");
        r.register(Box::new(self.read_index_rounds.clone())).expect("register");
        r.register(Box::new(self.read_index_reads.clone())).expect("register");
        r.register(Box::new(self.replication_lag_events.clone())).expect("register");
        r.register(Box::new(self.replication_lag_ms.clone())).expect("register");
        r.register(Box::new(self.replication_link_up.clone())).expect("register");
        r.register(Box::new(self.replication_link_health_changes.clone())).expect("register");
        r.register(Box::new(self.replication_last_contact_ms.clone())).expect("register");
        r.register(Box::new(self.replication_apply_lag.clone())).expect("register");
        r.register(Box::new(self.runtime_delay.clone())).expect("register");
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encode metrics");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}

/// The `# HELP` and `# TYPE` lines of a metric rendered by hand, for the measures that
/// live outside the registry (state machines, the DNS server, the process).
pub fn text_header(name: &str, kind: &str, help: &str) -> String {
    format!("# HELP agora_{name} {help}\n# TYPE agora_{name} {kind}\n")
}

/// A metric rendered by hand with its one sample.
pub fn text_sample(name: &str, kind: &str, help: &str, labels: &str, value: impl std::fmt::Display) -> String {
    format!("{}agora_{name}{{{labels}}} {value}\n", text_header(name, kind, help))
}
