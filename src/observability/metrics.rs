//! Prometheus metrics. The per-request counter is a plain array of atomics indexed by status
//! code (prometheus' labelled vectors take a lock on every lookup); the rest use the prometheus
//! registry and are touched only off the hot path or on failures.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Status codes 0..=599 (0 = no response written, e.g. the client went away).
const CODES: usize = 600;

pub struct Metrics {
    pub registry: Registry,
    requests: Box<[AtomicU64]>,
    connect_failures: IntCounterVec,
    upstream_tls_failures: IntCounterVec,
    guard_rail: prometheus::IntCounter,
    handovers: IntCounterVec,
    proxy_protocol: IntCounterVec,
    proxy_protocol_rejected: IntCounterVec,
    acme_orders: IntCounterVec,
    cluster_rpc_refused: IntCounterVec,
    cluster_rpc_plaintext: prometheus::IntCounter,
    gossip_dropped: IntCounterVec,
    cert_expiry: prometheus::IntGaugeVec,
    pub raft_term: IntGauge,
    pub raft_last_applied: IntGauge,
    pub raft_is_leader: IntGauge,
    pub raft_quorum: IntGauge,
    pub routes: IntGauge,
    pub requests_in_flight: IntGauge,
    /// Access log lines written, and lines lost by reason (queue_full: the writer thread
    /// was behind and the request went on without waiting; write_error: the output failed).
    pub access_log_lines: prometheus::IntCounter,
    pub access_log_dropped: IntCounterVec,
    /// Series rendered by their owner at each scrape (the data plane's, see `set_renderer`).
    renderer: std::sync::OnceLock<Renderer>,
    /// The last 15 minutes of the per-domain and per-backend series, for the dashboard.
    pub history: super::traffic::History,
    /// (when, requests so far, 5xx so far), one per second for the last minute.
    samples: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64, u64)>>,
}

/// Renders series another module owns into the scrape text.
type Renderer = Box<dyn Fn(&mut String) + Send + Sync>;

/// Request rates over a recent window, for `/api/v1/stats` and the dashboard.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Rates {
    pub window_secs: f64,
    pub requests_per_sec: f64,
    pub responses_5xx_per_sec: f64,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = (0..CODES).map(|_| AtomicU64::new(0)).collect();
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_upstream_connect_failures_total",
                "Failed connection attempts to a backend",
            ),
            &["backend"],
        )?;
        let upstream_tls_failures = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_upstream_tls_failures_total",
                "Failed TLS handshakes with backends, by reason (certificate_expired, certificate_wrong_name, certificate_unknown_issuer, client_certificate, no_http2, timeout, handshake, setup)",
            ),
            &["reason"],
        )?;
        let guard_rail = prometheus::IntCounter::new(
            "pingora_vhost_health_guard_rail_total",
            "Backend picks that fell back to this node's own health view because peers reported the whole pool down",
        )?;
        let handovers = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_full_proxy_connections_total",
                "Client connections handed from the lean HTTP/1.1 path to Pingora's general proxy, by reason",
            ),
            &["reason"],
        )?;
        let proxy_protocol = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_proxy_protocol_headers_total",
                "PROXY protocol headers accepted from trusted sources, by version (v1, v2)",
            ),
            &["version"],
        )?;
        let proxy_protocol_rejected = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_proxy_protocol_rejected_total",
                "Client connections closed over their PROXY protocol header, by reason (untrusted: a header from a source not in [proxy.proxy_protocol] trusted; missing: a trusted source sent no header; malformed; too_long; truncated: closed in the middle of the header; timeout: no complete header within header_timeout_ms)",
            ),
            &["reason"],
        )?;
        let acme_orders = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_acme_orders_total",
                "ACME orders this node ran as leader, by result (ok, error)",
            ),
            &["result"],
        )?;
        let cluster_rpc_refused = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_cluster_rpc_refused_total",
                "Cluster RPC calls this node refused, by reason (auth: missing or wrong request MAC, i.e. another secret or cluster id; clock: timestamp outside the 30 s window; replay: a request received before; body: over the size limit; expired: a forwarded write that arrived after its deadline; tls: a failed TLS handshake, e.g. no certificate from the cluster CA; plaintext: a plaintext connection while rpc_tls = \"required\")",
            ),
            &["reason"],
        )?;
        let cluster_rpc_plaintext = prometheus::IntCounter::new(
            "pingora_vhost_cluster_rpc_plaintext_connections_total",
            "Plaintext cluster RPC connections this node accepted (rpc_tls = \"mixed\"; 0 growth on every node means the migration to \"required\" can finish)",
        )?;
        let gossip_dropped = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_gossip_dropped_total",
                "Gossip datagrams this node dropped, by reason (unsealed: not sealed at all; forged: no accepted key opens it, i.e. forged, altered, or another secret or cluster id; clock: timestamp outside the 30 s window; replay: received before)",
            ),
            &["reason"],
        )?;
        let cert_expiry = prometheus::IntGaugeVec::new(
            Opts::new(
                "pingora_vhost_certificate_expiry_timestamp_seconds",
                "When each domain's certificate expires (Unix seconds); alert on time() - this",
            ),
            &["domain"],
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
        let raft_quorum = gauge(
            "pingora_vhost_raft_quorum",
            "1 when this node is in contact with a quorum (leader: acknowledged by a majority \
             within the leader lease; others: heard from a leader within it)",
        )?;
        let routes = gauge("pingora_vhost_routes", "Virtual hosts in the routing table")?;
        let requests_in_flight = gauge(
            "pingora_vhost_requests_in_flight",
            "Client requests being served",
        )?;
        let access_log_lines = prometheus::IntCounter::new(
            "pingora_vhost_access_log_lines_total",
            "Access log lines written",
        )?;
        let access_log_dropped = IntCounterVec::new(
            Opts::new(
                "pingora_vhost_access_log_dropped_total",
                "Access log lines lost, by reason (queue_full: the writer thread was behind; the request did not wait. write_error: writing to the output failed)",
            ),
            &["reason"],
        )?;
        // Series that exist from the start, at 0: an alert or a dashboard panel on them needs
        // no absent series.
        connect_failures.with_label_values(&[super::traffic::OTHER]);
        for reason in [
            "certificate_expired",
            "certificate_wrong_name",
            "certificate_unknown_issuer",
            "client_certificate",
            "no_http2",
            "timeout",
            "handshake",
            "setup",
        ] {
            upstream_tls_failures.with_label_values(&[reason]);
        }
        for reason in ["queue_full", "write_error"] {
            access_log_dropped.with_label_values(&[reason]);
        }
        registry.register(Box::new(access_log_lines.clone()))?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        registry.register(Box::new(connect_failures.clone()))?;
        registry.register(Box::new(upstream_tls_failures.clone()))?;
        registry.register(Box::new(guard_rail.clone()))?;
        registry.register(Box::new(handovers.clone()))?;
        registry.register(Box::new(proxy_protocol.clone()))?;
        registry.register(Box::new(proxy_protocol_rejected.clone()))?;
        registry.register(Box::new(acme_orders.clone()))?;
        registry.register(Box::new(cluster_rpc_refused.clone()))?;
        registry.register(Box::new(cluster_rpc_plaintext.clone()))?;
        registry.register(Box::new(gossip_dropped.clone()))?;
        registry.register(Box::new(cert_expiry.clone()))?;
        for g in [
            &raft_term,
            &raft_last_applied,
            &raft_is_leader,
            &raft_quorum,
            &routes,
            &requests_in_flight,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            registry,
            requests,
            connect_failures,
            upstream_tls_failures,
            guard_rail,
            handovers,
            proxy_protocol,
            proxy_protocol_rejected,
            acme_orders,
            cluster_rpc_refused,
            cluster_rpc_plaintext,
            gossip_dropped,
            cert_expiry,
            raft_term,
            raft_last_applied,
            raft_is_leader,
            raft_quorum,
            routes,
            requests_in_flight,
            access_log_lines,
            access_log_dropped,
            samples: Default::default(),
            renderer: Default::default(),
            history: Default::default(),
        })
    }

    pub fn request_done(&self, status: u16) {
        let i = usize::from(status).min(CODES - 1);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn guard_rail_used(&self) {
        self.guard_rail.inc();
    }

    /// A client connection went to Pingora's general proxy (`reason`: h2, http/1.0, upgrade, ...).
    pub fn handed_over(&self, reason: &str) {
        self.handovers.with_label_values(&[reason]).inc();
    }

    /// A trusted source's PROXY protocol header was read (`version`: v1, v2).
    pub fn proxy_protocol_header(&self, version: &str) {
        self.proxy_protocol.with_label_values(&[version]).inc();
    }

    /// A connection was closed over its PROXY protocol header (reasons: see the help text).
    pub fn proxy_protocol_rejected(&self, reason: &str) {
        self.proxy_protocol_rejected
            .with_label_values(&[reason])
            .inc();
    }

    pub fn acme_order(&self, ok: bool) {
        self.acme_orders
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// A cluster RPC call refused (`reason`: auth, clock, replay, body, expired).
    pub fn cluster_rpc_refused(&self, reason: &str) {
        self.cluster_rpc_refused.with_label_values(&[reason]).inc();
    }

    /// A plaintext cluster RPC connection accepted (mixed mode).
    pub fn cluster_rpc_plaintext(&self) {
        self.cluster_rpc_plaintext.inc();
    }

    /// A gossip datagram dropped (`reason`: unsealed, forged, clock, replay).
    pub fn gossip_dropped(&self, reason: &str) {
        self.gossip_dropped.with_label_values(&[reason]).inc();
    }

    /// Replaces the per-domain certificate expiry gauges.
    pub fn set_cert_expiries(&self, expiries: &[(String, i64)]) {
        self.cert_expiry.reset();
        for (domain, not_after) in expiries {
            self.cert_expiry
                .with_label_values(&[domain.as_str()])
                .set(*not_after);
        }
    }

    pub fn upstream_connect_failure(&self, backend: &str) {
        self.connect_failures.with_label_values(&[backend]).inc();
    }

    /// A TLS handshake with a backend failed (`reason`: `upstream_tls::HandshakeFailure`).
    pub fn upstream_tls_failure(&self, reason: &str) {
        self.upstream_tls_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// Totals of all requests and of 5xx answers.
    fn totals(&self) -> (u64, u64) {
        let mut all = 0;
        let mut errors = 0;
        for (code, n) in self.requests.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            all += n;
            if (500..600).contains(&code) {
                errors += n;
            }
        }
        (all, errors)
    }

    /// Records the current totals; called once a second.
    pub fn sample(&self) {
        let (all, errors) = self.totals();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() >= 61 {
            samples.pop_front();
        }
        samples.push_back((std::time::Instant::now(), all, errors));
    }

    /// Rates over the last `window` (or what has been sampled of it), up to now.
    pub fn rates(&self, window: std::time::Duration) -> Rates {
        let (all, errors) = self.totals();
        let now = std::time::Instant::now();
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&(t0, all0, err0)) = samples
            .iter()
            .find(|(t, _, _)| now.duration_since(*t) <= window)
        else {
            return Rates::default();
        };
        let secs = now.duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            return Rates::default();
        }
        Rates {
            window_secs: secs,
            requests_per_sec: all.saturating_sub(all0) as f64 / secs,
            responses_5xx_per_sec: errors.saturating_sub(err0) as f64 / secs,
        }
    }

    /// (code, count) for every code seen at least once.
    pub fn requests_by_code(&self) -> Vec<(String, u64)> {
        self.requests
            .iter()
            .enumerate()
            .filter_map(|(code, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| (code.to_string(), n))
            })
            .collect()
    }

    /// Adds series that another module renders at each scrape (set once, at start).
    pub fn set_renderer(&self, render: impl Fn(&mut String) + Send + Sync + 'static) {
        let _ = self.renderer.set(Box::new(render));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let mut text = String::from_utf8(buf).unwrap_or_default();
        text.push_str("# HELP pingora_vhost_requests_total Client requests answered, by HTTP status code (0 = no response sent).\n");
        text.push_str("# TYPE pingora_vhost_requests_total counter\n");
        for (code, n) in self.requests_by_code() {
            text.push_str(&format!(
                "pingora_vhost_requests_total{{code=\"{code}\"}} {n}\n"
            ));
        }
        if let Some(render) = self.renderer.get() {
            render(&mut text);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates_count_requests_and_5xx_since_the_oldest_sample_in_the_window() {
        let m = Metrics::new().expect("metrics");
        assert_eq!(m.rates(Duration::from_secs(10)).requests_per_sec, 0.0);
        m.sample();
        for status in [200, 200, 200, 502] {
            m.request_done(status);
        }
        std::thread::sleep(Duration::from_millis(20));
        let r = m.rates(Duration::from_secs(10));
        assert!(r.window_secs > 0.0);
        let total = r.requests_per_sec * r.window_secs;
        let errors = r.responses_5xx_per_sec * r.window_secs;
        assert!((total - 4.0).abs() < 1e-6, "{r:?}");
        assert!((errors - 1.0).abs() < 1e-6, "{r:?}");
    }
}
