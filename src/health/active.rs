//! Active health checks: HTTP GET on the health path, or a TCP connect when the path is "".
//! Each backend is probed by `probers_per_backend` of the live nodes (`owners`), at its own
//! offset in the interval (`schedule`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet, VecDeque};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::task::JoinSet;

use super::owners::Probers;
use super::schedule::Schedule;
use crate::cluster::store::StateMachineStore;
use crate::config::HealthCheckConfig;
use crate::gossip::{backend_hash, Gossip};
use crate::live::breaker::BreakerState;
use crate::live::health::{ActiveState, Thresholds};
use crate::live::Live;
use crate::proxy_protocol::{self, Version};
use crate::schema::{BackendTls, HostPort, SendProxyProtocol};
use crate::state::Backend;
use crate::upstream_tls::UpstreamTls;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    pub healthy: bool,
    pub detail: String,
    pub latency_ms: u64,
}

/// A backend as the prober sees it: what a probe needs of its replicated fields.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub id: String,
    pub address: HostPort,
    /// Overrides `[health_check] path`.
    pub path: Option<String>,
    pub send_proxy: Option<SendProxyProtocol>,
    pub tls: Option<Box<BackendTls>>,
}

impl ProbeTarget {
    pub fn of(b: &Backend) -> Self {
        Self {
            id: b.id.to_string(),
            address: b.address.clone(),
            path: b.health_check_path.as_ref().map(|p| p.to_string()),
            send_proxy: b.send_proxy_protocol,
            tls: b.tls.clone(),
        }
    }
}

/// Probes one backend once, at `addr` (what its `address` resolved to; `address` is the
/// `Host` of an HTTP probe). A backend that wants the PROXY protocol gets a `LOCAL` /
/// `UNKNOWN` header first (a probe relays no client); one that wants TLS gets the handshake
/// requests to it get (same name, CAs, client certificate), so a probe fails exactly when
/// they would.
pub async fn probe(
    client: &reqwest::Client,
    target: &ProbeTarget,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> ProbeResult {
    let started = Instant::now();
    let address: &str = &target.address;
    let (healthy, detail) = if target.send_proxy.is_some() || target.tls.is_some() {
        let header = target.send_proxy.map(|version| {
            proxy_protocol::local(match version {
                SendProxyProtocol::V1 => Version::V1,
                SendProxyProtocol::V2 => Version::V2,
            })
        });
        let tls = match &target.tls {
            None => None,
            Some(tls) => match UpstreamTls::for_backend(tls, &target.address) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    return ProbeResult {
                        healthy: false,
                        detail: format!("TLS to the backend cannot be set up: {e}"),
                        latency_ms: 0,
                    }
                }
            },
        };
        let raw = probe_raw(address, addr, path, header, tls.as_deref());
        match tokio::time::timeout(timeout, raw).await {
            Ok(r) => r,
            Err(_) if path.is_empty() => (
                false,
                format!("connect timed out after {}ms", timeout.as_millis()),
            ),
            Err(_) => (
                false,
                format!("GET {path} timed out after {}ms", timeout.as_millis()),
            ),
        }
    } else if path.is_empty() {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => (true, "TCP connect succeeded".to_string()),
            Ok(Err(e)) => (false, format!("TCP connect failed: {e}")),
            Err(_) => (
                false,
                format!("TCP connect timed out after {}ms", timeout.as_millis()),
            ),
        }
    } else {
        let url = format!("http://{addr}{path}");
        let get = client
            .get(&url)
            .header(reqwest::header::HOST, address)
            .timeout(timeout);
        match get.send().await {
            Ok(r) if r.status().is_success() || r.status().is_redirection() => {
                (true, format!("GET {path} answered {}", r.status().as_u16()))
            }
            Ok(r) => (
                false,
                format!("GET {path} answered {}", r.status().as_u16()),
            ),
            Err(e) if e.is_timeout() => (
                false,
                format!("GET {path} timed out after {}ms", timeout.as_millis()),
            ),
            Err(e) if e.is_connect() => (false, format!("GET {path}: connection failed")),
            Err(e) => (false, format!("GET {path} failed: {e}")),
        }
    };
    ProbeResult {
        healthy,
        detail,
        latency_ms: started.elapsed().as_millis() as u64,
    }
}

/// A probe written by hand (HTTP/1.1, `Connection: close`; only the status line is read):
/// reqwest can send neither a PROXY protocol header nor our TLS client's handshake.
async fn probe_raw(
    address: &str,
    addr: SocketAddr,
    path: &str,
    header: Option<&[u8]>,
    tls: Option<&UpstreamTls>,
) -> (bool, String) {
    let mut tcp = match tokio::net::TcpStream::connect(addr).await {
        Ok(c) => c,
        Err(e) if path.is_empty() => return (false, format!("TCP connect failed: {e}")),
        Err(_) => return (false, format!("GET {path}: connection failed")),
    };
    if let Some(header) = header {
        if let Err(e) = tcp.write_all(header).await {
            return (
                false,
                format!("sending the PROXY protocol header failed: {e}"),
            );
        }
    }
    let conn = match tls {
        None => BackendStream::Plain(tcp),
        Some(tls) => match tls.handshake(tcp).await {
            Ok(session) => BackendStream::Tls(Box::new(session)),
            Err(e) => return (false, format!("TLS handshake failed: {e}")),
        },
    };
    if path.is_empty() {
        return match conn {
            BackendStream::Plain(_) => (true, "TCP connect succeeded".to_string()),
            BackendStream::Tls(_) => (true, "TLS handshake succeeded".to_string()),
        };
    }
    // A backend spoken to in HTTP/2 (it selected `h2`) is asked in HTTP/2.
    let mut conn = match (conn, tls) {
        (BackendStream::Tls(session), Some(tls)) if tls.http2 => {
            return probe_h2(*session, address, path).await;
        }
        (conn, _) => conn,
    };
    // The `Host` of requests: the address's host (and port), as for a plain probe.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if let Err(e) = conn.write_all(request.as_bytes()).await {
        return (false, format!("GET {path}: sending failed: {e}"));
    }
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let status = head
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) if (200..400).contains(&code) => (true, format!("GET {path} answered {code}")),
        Some(code) => (false, format!("GET {path} answered {code}")),
        None => (false, format!("GET {path} failed: no HTTP answer")),
    }
}

/// An HTTP/2 probe: `GET path` with `:authority` the backend's address, the status only.
async fn probe_h2(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    address: &str,
    path: &str,
) -> (bool, String) {
    let (client, connection) = match h2::client::handshake(stream).await {
        Ok(pair) => pair,
        Err(e) => return (false, format!("GET {path}: HTTP/2 handshake failed: {e}")),
    };
    // The connection is driven while the request is under way, and dropped with it.
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = async {
        let request = http::Request::get(format!("https://{address}{path}"))
            .body(())
            .map_err(|e| format!("GET {path}: {e}"))?;
        let mut client = client
            .ready()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let (response, _) = client
            .send_request(request, true)
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = response
            .await
            .map_err(|e| format!("GET {path} failed: {e}"))?
            .status()
            .as_u16();
        Ok::<u16, String>(status)
    }
    .await;
    driver.abort();
    match result {
        Ok(code) if (200..400).contains(&code) => {
            (true, format!("GET {path} answered {code} (HTTP/2)"))
        }
        Ok(code) => (false, format!("GET {path} answered {code} (HTTP/2)")),
        Err(e) => (false, e),
    }
}

/// A probe's connection: plain, or TLS over it.
enum BackendStream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl BackendStream {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.write_all(bytes).await,
            BackendStream::Tls(s) => s.write_all(bytes).await,
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BackendStream::Plain(s) => s.read(buf).await,
            BackendStream::Tls(s) => s.read(buf).await,
        }
    }
}

/// The probe client: no redirects followed, no connection reuse surprises.
pub fn client() -> reqwest::Client {
    client_with_agent(format!(
        "pingora-vhost-health/{}",
        env!("CARGO_PKG_VERSION")
    ))
}

/// The client of a node's periodic probes: its `User-Agent` names the node, so a backend's
/// logs show which nodes probe it (`pingora-vhost-health/0.1.0 (node 2)`).
pub fn node_client(node_id: u64) -> reqwest::Client {
    client_with_agent(format!(
        "pingora-vhost-health/{} (node {node_id})",
        env!("CARGO_PKG_VERSION")
    ))
}

fn client_with_agent(agent: String) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(1)
        .user_agent(agent)
        .build()
        .unwrap_or_default()
}

/// Probes `target` now and records the result in its health state (if a routing table knows
/// the backend yet).
pub async fn check_backend(
    live: &Live,
    client: &reqwest::Client,
    cfg: &HealthCheckConfig,
    target: &ProbeTarget,
) -> ProbeResult {
    let path = target.path.as_deref().unwrap_or(&cfg.path);
    let (id, address): (&str, &str) = (&target.id, &target.address);
    // A name with several addresses is probed at its first: health is kept per backend.
    let result = match live.addrs.addrs_for(address).first() {
        Some(addr) => {
            let timeout = Duration::from_secs(cfg.timeout_secs);
            probe(client, target, *addr, path, timeout).await
        }
        None => ProbeResult {
            healthy: false,
            detail: match live.addrs.resolution(address).and_then(|r| r.error) {
                Some(e) => format!("{address} does not resolve: {e}"),
                None => format!("{address} is not resolved yet"),
            },
            latency_ms: 0,
        },
    };
    let Some(runtime) = live.backends.get(id) else {
        return result;
    };
    let thresholds = Thresholds {
        unhealthy: cfg.unhealthy_threshold,
        healthy: cfg.healthy_threshold,
    };
    if let Some(flip) =
        runtime
            .health
            .record_probe(result.healthy, result.detail.clone(), thresholds)
    {
        match flip {
            ActiveState::Down => {
                tracing::warn!(backend = id, detail = %result.detail, "backend marked unhealthy")
            }
            _ => tracing::info!(backend = id, "backend healthy again"),
        }
    }
    result
}

/// Probes at most this many backends at a time (a backend that does not answer holds its slot
/// for `timeout_secs`).
const CONCURRENCY: usize = 256;
/// How often the prober looks at the schedule, the membership and the set of backends.
const TICK: Duration = Duration::from_millis(100);

/// A backend this node probes.
type Target = ProbeTarget;

/// What this node probes, and since when it stopped probing the backends it handed over.
#[derive(Default)]
struct Plan {
    schedule: Option<Schedule<Arc<Target>>>,
    /// Ids probed here as one of their probers (or handing them over).
    probed: HashSet<String>,
    /// Every id in the schedule: `probed`, and those probed only to settle an open breaker.
    scheduled: HashSet<String>,
    /// Backends whose probes moved to other nodes, and when: probed one more interval, so
    /// that this node's verdict does not lapse before the new prober has its own.
    handed_over: HashMap<String, Instant>,
}

/// Probes, spread over each `interval_secs`, the backends this node is one of the
/// `probers_per_backend` probers of (`owners`), among the nodes live in gossip. A backend it
/// becomes a prober of (at start, or taking over from a node that left) is probed at once.
/// Unhealthy backends keep being probed so they can come back.
pub async fn run(
    live: Arc<Live>,
    sm: StateMachineStore,
    gossip: Arc<Gossip>,
    cfg: HealthCheckConfig,
) {
    let me = gossip.node_id;
    let client = node_client(me);
    let cfg = Arc::new(cfg);
    let interval = Duration::from_secs(cfg.interval_secs);
    // Who probes what depends on who is live: wait until the peers are heard from (or known
    // to be missing), like the proxy does.
    live.peer_view.wait().await;

    let clock = Instant::now();
    let now_ms = || clock.elapsed().as_millis() as u64;
    let mut plan = Plan::default();
    let mut planned_for: Option<(Probers, u64)> = None;
    let mut planned_at = Instant::now();
    let mut last_ms = now_ms();
    // Backends waiting for a probe slot; `pending` also holds those being probed, so a backend
    // is never probed twice at once.
    let mut queue: VecDeque<Arc<Target>> = VecDeque::new();
    let mut pending: HashSet<String> = HashSet::new();
    let mut running: JoinSet<String> = JoinSet::new();
    // Backends queued because the data plane asked (probed even if not ours to probe).
    let mut asked: HashSet<String> = HashSet::new();
    let mut asked_seen = crate::live::probes_asked();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut started, mut replans, mut since) = (0u64, 0u64, Instant::now());
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if since.elapsed() >= interval {
                    tracing::debug!(
                        started,
                        replans,
                        queued = queue.len(),
                        running = running.len(),
                        scheduled = plan.schedule.as_ref().map_or(0, Schedule::len),
                        "health probes in the last interval"
                    );
                    (started, replans, since) = (0, 0, Instant::now());
                }
                let probers = Probers::new(gossip.probing_members(), cfg.probers_per_backend);
                let key = (probers, live.backends.generation());
                // Again when the membership or the set of backends changed, and every interval
                // (addresses and paths can change without either).
                if planned_for.as_ref() != Some(&key) || planned_at.elapsed() >= interval {
                    let (probers, _) = key.clone();
                    if planned_for.as_ref().map(|(p, _)| p) != Some(&probers) {
                        tracing::info!(
                            nodes = ?probers.nodes(),
                            probers_per_backend = cfg.probers_per_backend,
                            "health probes shared between the live nodes"
                        );
                    }
                    let (l, s) = (live.clone(), sm.clone());
                    let (next, gained) = tokio::task::spawn_blocking(move || {
                        let gained = replan(&l, &s, &probers, me, &mut plan, interval);
                        (plan, gained)
                    })
                    .await
                    .expect("planning the health probes panicked");
                    plan = next;
                    for t in at_once(gained, &live) {
                        if pending.insert(t.id.clone()) {
                            queue.push_back(t);
                        }
                    }
                    planned_for = Some(key);
                    planned_at = Instant::now();
                    replans += 1;
                }
                // Probes the data plane asked for (a failed TLS handshake): now, whoever the
                // backend's probers are. Looked for only when one was asked.
                let asked_now = crate::live::probes_asked();
                if asked_now != asked_seen {
                    asked_seen = asked_now;
                    let mut ids = Vec::new();
                    live.backends.for_each(|rt| {
                        if rt.take_probe_request() {
                            ids.push(rt.id.clone());
                        }
                    });
                    for id in ids {
                        let target = sm.with_state(|s| s.backends.get(id.as_str()).map(Target::of));
                        if let Some(t) = target {
                            if pending.insert(t.id.clone()) {
                                asked.insert(t.id.clone());
                                queue.push_front(Arc::new(t));
                            }
                        }
                    }
                }
                let now = now_ms();
                if let Some(schedule) = &plan.schedule {
                    for t in schedule.due(last_ms, now) {
                        if pending.insert(t.id.clone()) {
                            queue.push_back(t.clone());
                        }
                    }
                }
                last_ms = now;
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                match done {
                    Ok(id) => { pending.remove(&id); }
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => {}
                }
            }
        }
        while running.len() < CONCURRENCY {
            let Some(t) = queue.pop_front() else { break };
            // Queued when it was ours, but the membership changed since (a peer seen dead for
            // a moment): its probers probe it.
            if !plan.scheduled.contains(&t.id) && !asked.remove(&t.id) {
                pending.remove(&t.id);
                continue;
            }
            started += 1;
            let (live, client, cfg) = (live.clone(), client.clone(), cfg.clone());
            running.spawn(async move {
                check_backend(&live, &client, &cfg, &t).await;
                t.id.clone()
            });
        }
    }
}

/// Of the backends a node has just become a prober of, those probed at once rather than at
/// their slot in the schedule (within one interval): all of them up to [`AT_ONCE_MAX`]; beyond
/// that only those their other probers report down (taken over as "down", they are routed
/// around until a probe of this node's own sees them healthy). A node starting with 67,000
/// backends to probe spent its first seconds on nothing else (a quarter of both cores of the
/// benchmark machine, and its catch-up with the leader slowed).
fn at_once(gained: Vec<Arc<Target>>, live: &Live) -> Vec<Arc<Target>> {
    if gained.len() <= AT_ONCE_MAX {
        if !gained.is_empty() {
            tracing::debug!(count = gained.len(), "probing newly owned backends now");
        }
        return gained;
    }
    let total = gained.len();
    let now: Vec<Arc<Target>> = gained
        .into_iter()
        .filter(|t| {
            live.backends
                .get(&t.id)
                .is_some_and(|rt| rt.health.peer_down())
        })
        .collect();
    tracing::info!(
        total,
        now = now.len(),
        "newly owned backends: those reported down probed now, the rest at their slots over the interval"
    );
    now
}

/// A start or take-over that gains more backends than this probes most of them at their
/// slots, not at once (`at_once`).
const AT_ONCE_MAX: usize = 512;

/// Works out which backends this node probes now (CPU-bound at 100,000 backends: run it off
/// the async runtime). Returns the backends it has just become a prober of.
fn replan(
    live: &Live,
    sm: &StateMachineStore,
    probers: &Probers,
    me: u64,
    plan: &mut Plan,
    interval: Duration,
) -> Vec<Arc<Target>> {
    let backends: Vec<(u64, Target)> = sm.with_state(|s| {
        s.backends
            .values()
            .map(|b| (backend_hash(&b.id), Target::of(b)))
            .collect()
    });
    let now = Instant::now();
    let mut gained = Vec::new();
    let mut probed = HashSet::new();
    let mut items = Vec::new();
    for (hash, target) in backends {
        let mine = probers.includes(hash, me);
        let runtime = live.backends.get(&target.id);
        if mine {
            plan.handed_over.remove(&target.id);
        } else if plan.probed.contains(&target.id) {
            plan.handed_over.entry(target.id.clone()).or_insert(now);
        }
        let in_handover = plan
            .handed_over
            .get(&target.id)
            .is_some_and(|since| now.duration_since(*since) < interval);
        if !mine && !in_handover {
            plan.handed_over.remove(&target.id);
            if let Some(rt) = &runtime {
                rt.health.stop_probing();
                // Real traffic opened this node's breaker: it tells its peers the backend is
                // down, and without traffic (nobody routes to it) no trial request would ever
                // close it. A probe of its own settles it: success closes the breaker.
                if rt.health.breaker.state() == BreakerState::Open {
                    items.push((hash, Arc::new(target)));
                }
            }
            continue;
        }
        let target = Arc::new(target);
        if let Some(rt) = &runtime {
            let was_elsewhere = rt.health.start_probing();
            // Taking over a backend its probers report down: down until this node's own probes
            // see it healthy (as a restarted node does), not up until they see it failing.
            if was_elsewhere && rt.health.active() == ActiveState::Unknown && rt.health.peer_down()
            {
                rt.health.assume_down();
            }
        }
        if !plan.probed.contains(&target.id) {
            gained.push(target.clone());
        }
        probed.insert(target.id.clone());
        items.push((hash, target));
    }
    // Backends deleted while being handed over.
    plan.handed_over.retain(|id, _| probed.contains(id));
    plan.probed = probed;
    plan.scheduled = items.iter().map(|(_, t)| t.id.clone()).collect();
    plan.schedule = Some(Schedule::new(interval.as_millis() as u64, items));
    gained
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::backend;

    fn targets(n: usize) -> Vec<Arc<Target>> {
        (0..n)
            .map(|i| Arc::new(Target::of(&backend(&format!("b{i}"), &["a"]))))
            .collect()
    }

    #[test]
    fn a_few_new_backends_are_probed_at_once_many_only_those_reported_down() {
        let live = Live::default();
        for t in targets(AT_ONCE_MAX + 100) {
            live.backends.ensure(&t.id);
        }
        // A take-over of a few: all at once.
        assert_eq!(at_once(targets(AT_ONCE_MAX), &live).len(), AT_ONCE_MAX);
        assert!(at_once(Vec::new(), &live).is_empty());
        // A start with many: none at once (their slots spread them over the interval) ...
        assert!(at_once(targets(AT_ONCE_MAX + 100), &live).is_empty());
        // ... except those a peer reports down, which stay routed around until probed here.
        live.backends
            .get("b7")
            .unwrap()
            .health
            .set_peers_down(vec![2]);
        live.backends
            .get("b600")
            .unwrap()
            .health
            .set_peers_down(vec![3]);
        let now: Vec<String> = at_once(targets(AT_ONCE_MAX + 100), &live)
            .iter()
            .map(|t| t.id.clone())
            .collect();
        assert_eq!(now, ["b7", "b600"]);
    }
}
