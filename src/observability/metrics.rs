//! Prometheus metrics. Counters are lock-free on the hot path (prometheus atomics); label
//! sets are small and fixed (status code, backend id).

use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    connect_failures: IntCounterVec,
    guard_rail: prometheus::IntCounter,
    pub raft_term: IntGauge,
    pub raft_last_applied: IntGauge,
    pub raft_is_leader: IntGauge,
    pub routes: IntGauge,
    pub requests_in_flight: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_requests_total",
                "Client requests answered, by HTTP status code",
            ),
            &["code"],
        )?;
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_upstream_connect_failures_total",
                "Failed connection attempts to a backend",
            ),
            &["backend"],
        )?;
        let guard_rail = prometheus::IntCounter::new(
            "pingora_vhost_health_guard_rail_total",
            "Backend picks that fell back to this node's own health view because peers reported the whole pool down",
        )?;
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let raft_term = gauge("pingora_vhost_raft_term", "Current Raft term")?;
        let raft_last_applied = gauge(
            "pingora_vhost_raft_last_applied",
            "Index of the last applied Raft entry",
        )?;
        let raft_is_leader = gauge(
            "pingora_vhost_raft_is_leader",
            "1 when this node is the Raft leader",
        )?;
        let routes = gauge("pingora_vhost_routes", "Virtual hosts in the routing table")?;
        let requests_in_flight = gauge(
            "pingora_vhost_requests_in_flight",
            "Client requests being served",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(connect_failures.clone()))?;
        registry.register(Box::new(guard_rail.clone()))?;
        for g in [
            &raft_term,
            &raft_last_applied,
            &raft_is_leader,
            &routes,
            &requests_in_flight,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            registry,
            requests,
            connect_failures,
            guard_rail,
            raft_term,
            raft_last_applied,
            raft_is_leader,
            routes,
            requests_in_flight,
        })
    }

    pub fn request_done(&self, status: u16) {
        // Status codes are a small closed set; format once per request is cheap enough but an
        // itoa buffer keeps it allocation-free.
        let mut buf = itoa::Buffer::new();
        self.requests.with_label_values(&[buf.format(status)]).inc();
    }

    pub fn guard_rail_used(&self) {
        self.guard_rail.inc();
    }

    pub fn upstream_connect_failure(&self, backend: &str) {
        self.connect_failures.with_label_values(&[backend]).inc();
    }

    pub fn requests_by_code(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for mf in prometheus::core::Collector::collect(&self.requests) {
            for m in mf.get_metric() {
                let code = m
                    .get_label()
                    .first()
                    .map(|l| l.get_value().to_string())
                    .unwrap_or_default();
                out.push((code, m.get_counter().get_value() as u64));
            }
        }
        out
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
