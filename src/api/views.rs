//! What the API answers, as types: every JSON body the management API sends is one of these
//! views (docs/api.md documents them field by field). The handlers gather the facts; the
//! views only shape them, so this module uses no handler and no `ApiState`.
//!
//! An `Option` field is `null` when empty, never left out: clients read a fixed set of keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;

use super::rfc3339;
use crate::cluster::{NodeState, Status};
use crate::live::addrs::Resolution;
use crate::live::health::{ActiveState, HealthReport};
use crate::observability::metrics::Rates;
use crate::state::{AcmeStatus, Backend, BackendTls, CertPair, Domain, SendProxyProtocol, TlsMode};

/// Every error answer: `{"error": ...}`, plus what some errors add (see [`ErrorExtra`]).
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    #[serde(flatten)]
    pub extra: Option<&'a ErrorExtra>,
}

/// Fields some error answers carry beside `"error"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ErrorExtra {
    /// A write that failed: what is known about it (docs/api.md, "Write answers").
    Outcome { outcome: WriteOutcome },
    /// A refused switch: the target tag's backends that cannot serve, as `"<id> (why)"`.
    UnhealthyBackends { unhealthy_backends: Vec<String> },
}

/// Whether a failed write was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOutcome {
    NotApplied,
    Unknown,
    Applied,
}

/// `GET /api/v1/health`.
#[derive(Debug, Serialize)]
pub struct HealthView {
    pub status: &'static str,
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub last_applied: u64,
}

impl From<&Status> for HealthView {
    fn from(s: &Status) -> Self {
        Self {
            status: "ok",
            node_id: s.node_id,
            leader_id: s.leader_id,
            last_applied: s.last_applied,
        }
    }
}

/// `GET /api/v1/cluster/status`.
#[derive(Debug, Serialize)]
pub struct ClusterStatusView {
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    /// `"Leader"`, `"Follower"`, `"Candidate"`, `"Learner"` or `"Shutdown"`.
    pub state: NodeState,
    pub last_applied: u64,
    /// On a leader: a majority acknowledged it within the leader lease; elsewhere: it heard
    /// from a leader within that lease.
    pub quorum: bool,
    pub members: Vec<MemberView>,
}

#[derive(Debug, Serialize)]
pub struct MemberView {
    pub node_id: u64,
    pub rpc_addr: String,
    pub voter: bool,
    pub alive: bool,
}

impl From<Status> for ClusterStatusView {
    fn from(s: Status) -> Self {
        Self {
            node_id: s.node_id,
            leader_id: s.leader_id,
            term: s.term,
            state: s.state,
            last_applied: s.last_applied,
            quorum: s.quorum,
            members: s
                .members
                .into_iter()
                .map(|m| MemberView {
                    node_id: m.node_id,
                    rpc_addr: m.rpc_addr,
                    voter: m.voter,
                    alive: m.alive,
                })
                .collect(),
        }
    }
}

/// `GET /api/v1/stats`.
#[derive(Debug, Serialize)]
pub struct StatsView {
    pub uptime_secs: u64,
    pub rates: Rates,
    pub requests_total: u64,
    pub responses_5xx: u64,
    /// Status code (`"200"`, `"0"` for no answer sent) to count.
    pub requests_by_code: BTreeMap<String, u64>,
    pub requests_in_flight: i64,
    pub routes: usize,
}

/// One page of a list (docs/api.md, "Lists"): the items, how many match on all pages, and
/// the cursor of the next page (`null` on the last).
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: usize,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    pub fn new(items: Vec<T>, total: usize, next_cursor: Option<String>) -> Self {
        Self {
            items,
            total,
            next_cursor,
        }
    }
}

/// A domain (docs/api.md, "Objects"). Private keys are never part of it.
#[derive(Debug, Serialize)]
pub struct DomainView {
    pub domain: String,
    pub enabled_backends_tag: String,
    pub http_to_https: bool,
    pub tls: TlsMode,
    pub certificate: Option<DomainCertView>,
    pub access_log: bool,
    pub access_log_query: bool,
}

#[derive(Debug, Serialize)]
pub struct DomainCertView {
    pub not_after: String,
    pub names: Vec<String>,
}

impl From<&Domain> for DomainView {
    fn from(d: &Domain) -> Self {
        Self {
            domain: d.domain.to_string(),
            enabled_backends_tag: d.enabled_backends_tag.to_string(),
            http_to_https: d.http_to_https,
            tls: d.tls,
            certificate: d.cert.as_ref().map(|c| DomainCertView {
                not_after: rfc3339(c.not_after),
                names: c.names.clone(),
            }),
            access_log: d.access_log,
            access_log_query: d.access_log_query,
        }
    }
}

/// The answer to a switch: the domain after it, and the tag it had before.
#[derive(Debug, Serialize)]
pub struct SwitchedView {
    #[serde(flatten)]
    pub domain: DomainView,
    pub previous_tag: String,
}

/// A node's verdict on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Up,
    Down,
    /// Passively ejected (a run of 5xx answers or timeouts), until a deadline.
    Ejected,
}

/// A backend (docs/api.md, "Objects"): its replicated fields and this node's live view of it.
#[derive(Debug, Serialize)]
pub struct BackendView {
    pub id: String,
    pub address: String,
    pub resolved_addrs: Vec<SocketAddr>,
    pub resolved_unix_ms: Option<u64>,
    pub resolve_error: Option<String>,
    pub tags: Vec<String>,
    pub health_check_path: Option<String>,
    /// "v1" | "v2" | null.
    pub send_proxy_protocol: Option<SendProxyProtocol>,
    /// TLS to the backend, or null for plain TCP. Never a key.
    pub tls: Option<BackendTlsView>,
    pub healthy: bool,
    pub draining: bool,
    pub in_flight: i64,
    pub requests: u64,
    pub connect_failures: u64,
    pub health: HealthReport,
    /// Node id to its verdict: this node's own, and each live peer's from gossip.
    pub nodes: BTreeMap<u64, Verdict>,
}

/// A backend's `tls`, as shown: its settings and what was given, never the client key (nor the
/// PEM text: a CA bundle would make every list page large).
#[derive(Debug, Serialize)]
pub struct BackendTlsView {
    /// The name sent (SNI) and checked: `server_name`, else the address's host.
    pub server_name: String,
    pub verify: bool,
    pub http2: bool,
    /// How many CA certificates `ca_pem` holds; null: the system's CAs.
    pub ca_certificates: Option<usize>,
    /// A client certificate is sent (mTLS).
    pub client_certificate: bool,
}

impl BackendTlsView {
    fn new(b: &Backend, tls: &BackendTls) -> Self {
        Self {
            server_name: tls.effective_server_name(&b.address).to_string(),
            verify: tls.verify,
            http2: tls.http2,
            ca_certificates: tls
                .ca_pem
                .as_deref()
                .map(|pem| crate::schema::ca_certificates(pem).map_or(0, |c| c.len())),
            client_certificate: tls.client_cert_pem.is_some(),
        }
    }
}

/// This node's live facts about one backend, read by the handler.
pub struct BackendLive {
    pub resolution: Option<Resolution>,
    pub healthy: bool,
    pub in_flight: i64,
    pub requests: u64,
    pub connect_failures: u64,
    pub health: HealthReport,
    pub nodes: BTreeMap<u64, Verdict>,
}

impl BackendView {
    pub fn new(b: &Backend, live: BackendLive) -> Self {
        let (resolved_addrs, resolved_unix_ms, resolve_error) = match live.resolution {
            Some(r) => (r.addrs, r.resolved_unix_ms, r.error),
            None => (Vec::new(), None, None),
        };
        Self {
            id: b.id.to_string(),
            address: b.address.to_string(),
            resolved_addrs,
            resolved_unix_ms,
            resolve_error,
            tags: b.tags.iter().map(|t| t.to_string()).collect(),
            health_check_path: b.health_check_path.as_ref().map(|p| p.to_string()),
            send_proxy_protocol: b.send_proxy_protocol,
            tls: b.tls.as_ref().map(|tls| BackendTlsView::new(b, tls)),
            healthy: live.healthy,
            draining: b.draining,
            in_flight: live.in_flight.max(0),
            requests: live.requests,
            connect_failures: live.connect_failures,
            health: live.health,
            nodes: live.nodes,
        }
    }
}

/// `POST /api/v1/backends/{id}/health`: the probe just made.
#[derive(Debug, Serialize)]
pub struct ProbeView {
    pub id: String,
    pub healthy: bool,
    pub detail: String,
    pub latency_ms: u64,
    /// The backend's active-check state after this probe.
    pub state: ActiveState,
}

/// A certificate entry of `/api/v1/certs` (docs/api.md, "Cert").
#[derive(Debug, Serialize)]
pub struct CertView {
    pub domain: String,
    pub tls: TlsMode,
    pub certificate: Option<CertDetailView>,
    /// `null` unless `tls` is `"acme"`.
    pub acme: Option<AcmeView>,
}

#[derive(Debug, Serialize)]
pub struct CertDetailView {
    pub names: Vec<String>,
    pub issuer: String,
    pub serial: String,
    pub not_after: String,
    pub days_left: i64,
    pub expiring_soon: bool,
}

impl CertDetailView {
    /// `issuer` and `serial` are read from the leaf by the caller (empty if unreadable).
    pub fn new(
        c: &CertPair,
        issuer: String,
        serial: String,
        now_secs: i64,
        warn_days: i64,
    ) -> Self {
        let days_left = (c.not_after - now_secs).div_euclid(86_400);
        Self {
            names: c.names.clone(),
            issuer,
            serial,
            not_after: rfc3339(c.not_after),
            days_left,
            expiring_soon: days_left < warn_days,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AcmeView {
    pub order_in_flight: Option<OrderView>,
    pub last_attempt: Option<String>,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub renew_requested: bool,
}

/// The ACME order running now: on which node, since when.
#[derive(Debug, Serialize)]
pub struct OrderView {
    pub node_id: u64,
    pub since: String,
}

fn ms_rfc3339(ms: u64) -> String {
    rfc3339((ms / 1000) as i64)
}

impl From<AcmeStatus> for AcmeView {
    fn from(s: AcmeStatus) -> Self {
        Self {
            order_in_flight: s.in_flight.map(|(node_id, since)| OrderView {
                node_id,
                since: ms_rfc3339(since),
            }),
            last_attempt: s.last_attempt_unix_ms.map(ms_rfc3339),
            last_success: s.last_success_unix_ms.map(ms_rfc3339),
            last_error: s.last_error,
            consecutive_failures: s.consecutive_failures,
            renew_requested: s.renew_requested,
        }
    }
}

/// `POST /api/v1/certs/{domain}/renew` (202).
#[derive(Debug, Serialize)]
pub struct RenewView {
    pub domain: String,
    pub renew_requested: bool,
}

/// `GET /api/v1/stats/series` (docs/api.md): the last 15 minutes of traffic per domain and
/// per backend, as kept by this node.
#[derive(Debug, Serialize)]
pub struct SeriesView {
    pub step_secs: u64,
    pub domains: Vec<SeriesTrack>,
    pub backends: Vec<SeriesTrack>,
}

#[derive(Debug, Serialize)]
pub struct SeriesTrack {
    pub name: String,
    /// Oldest first: `unix_ms`, `requests_per_sec`, `errors_per_sec` (5xx), `p50_ms` and
    /// `p99_ms` (null when the step had no request).
    pub points: Vec<crate::observability::traffic::Point>,
}
