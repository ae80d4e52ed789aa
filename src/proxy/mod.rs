//! Data plane: the HTTP/1 request path (`h1`) and Pingora's full proxy behind it (`service`),
//! their routing table and certificate map.
//!
//! The control plane calls [`DataPlane::publish`] after every applied Raft batch; the proxy
//! only ever `load()`s the current snapshots.

pub mod answers;
mod backend_conn;
mod backend_io;
mod chunked;
mod client_io;
mod deadline;
pub mod edge;
pub mod h1;
pub mod listeners;
pub mod name_map;
pub mod outcome;
mod pool;
mod replay;
pub mod request_id;
pub mod rules;
mod send_proxy;
pub mod service;
mod session_cache;
pub mod strict;
pub mod table;
pub mod tickets;
pub mod tls;
pub mod tls_accept;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::live::Live;
use crate::observability::access_log::AccessLog;
use crate::observability::traffic;
use crate::state::{Changes, State};
use table::RoutingTable;
use tickets::Tickets;
use tls::CertStore;

/// `[proxy] tls_ticket_rotation_secs` by default.
const DEFAULT_TICKET_ROTATION: Duration = Duration::from_secs(43_200);

/// What [`DataPlane::owned_series`] found, and the table and counts it found it in.
#[derive(Default)]
struct OwnedSeries {
    /// (table generation, backend registry generation, domain slots, backend slots).
    seen: Option<(u64, u64, usize, usize)>,
    /// Weak: a deleted domain or backend must give its slot back at once.
    domains: Vec<std::sync::Weak<table::Route>>,
    backends: Vec<std::sync::Weak<crate::live::BackendRuntime>>,
}

pub struct DataPlane {
    pub routes: ArcSwap<RoutingTable>,
    pub certs: Arc<CertStore>,
    /// Backend runtimes, resolved addresses and the peer-view gate, shared with the health
    /// plane.
    pub live: Arc<Live>,
    /// Client requests being served right now (for graceful drain on SIGTERM).
    pub requests_in_flight: AtomicI64,
    /// Client connections open right now: shutdown waits for them to drain too.
    pub connections_open: AtomicI64,
    /// ... of which came in on the HTTPS listener.
    pub https_connections_open: AtomicI64,
    /// TLS handshakes of client connections: done, failed (or timed out).
    pub tls_handshakes: [AtomicU64; 2],
    /// Where both request paths leave their access log records (off unless configured).
    pub access_log: AccessLog,
    /// TLS session tickets, sealed with the cluster's shared keys.
    pub tickets: Arc<Tickets>,
    /// Keeps what the last compile built (callers already serialise publishes under the
    /// state machine's lock; this lock only makes that explicit).
    compiler: Mutex<table::Compiler>,
    /// Bumped by every publish of a routing table.
    table_generation: AtomicU64,
    owned_series: Mutex<OwnedSeries>,
}

impl DataPlane {
    pub fn new(certs: CertStore) -> Self {
        Self {
            routes: ArcSwap::from_pointee(RoutingTable::default()),
            certs: Arc::new(certs),
            live: Arc::new(Live::default()),
            requests_in_flight: AtomicI64::new(0),
            connections_open: AtomicI64::new(0),
            https_connections_open: AtomicI64::new(0),
            tls_handshakes: Default::default(),
            access_log: AccessLog::off(),
            tickets: Arc::new(Tickets::new(DEFAULT_TICKET_ROTATION)),
            compiler: Mutex::new(table::Compiler::default()),
            table_generation: AtomicU64::new(0),
            owned_series: Mutex::new(OwnedSeries::default()),
        }
    }

    /// The domains and backends whose traffic series own a slot, with their names. At
    /// 100,000 domains and backends, finding them is a pass over 200,000 structures (a cache
    /// miss each): the traffic sampler (every `STEP_SECS`) and each metrics scrape did that
    /// pass, which was a tenth of an idle node's CPU. It is made again only when the table,
    /// the set of backends or the number of slots taken changed.
    fn owned_series(&self) -> std::sync::MutexGuard<'_, OwnedSeries> {
        // The generation first: a table published after it is looked at again next time.
        let key = (
            self.table_generation.load(Ordering::Acquire),
            self.live.backends.generation(),
            traffic::slots_used(traffic::Kind::Domain),
            traffic::slots_used(traffic::Kind::Backend),
        );
        let mut owned = self.owned_series.lock().unwrap_or_else(|p| p.into_inner());
        if owned.seen != Some(key) {
            let table = self.routes.load();
            owned.domains = table
                .routes()
                .filter(|r| r.traffic.own().is_some())
                .map(Arc::downgrade)
                .collect();
            owned.backends = self
                .live
                .backends
                .all()
                .iter()
                .filter(|rt| rt.traffic.own().is_some())
                .map(Arc::downgrade)
                .collect();
            // A series claiming its slot right now is counted but not yet found: look again
            // next time.
            let complete = owned.domains.len() >= key.2 && owned.backends.len() >= key.3;
            owned.seen = complete.then_some(key);
        }
        owned
    }

    /// The data plane's own series in Prometheus' text format: per-domain and per-backend
    /// traffic (bounded, `observability::traffic`), connections per listener, handshakes.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let owned = self.owned_series();
        traffic::render(
            out,
            &mut |f| {
                for route in owned.domains.iter().filter_map(std::sync::Weak::upgrade) {
                    if let Some(c) = route.traffic.own() {
                        f(&route.domain, c);
                    }
                }
            },
            &mut |f| {
                for rt in owned.backends.iter().filter_map(std::sync::Weak::upgrade) {
                    if let Some(c) = rt.traffic.own() {
                        f(&rt.id, c);
                    }
                }
            },
        );
        drop(owned);
        let all = self.connections_open.load(Ordering::Relaxed).max(0);
        let https = self.https_connections_open.load(Ordering::Relaxed).max(0);
        let _ = writeln!(
            out,
            "# HELP pingora_vhost_connections_active Client connections open, by listener"
        );
        let _ = writeln!(out, "# TYPE pingora_vhost_connections_active gauge");
        let _ = writeln!(
            out,
            "pingora_vhost_connections_active{{listener=\"http\"}} {}",
            (all - https).max(0)
        );
        let _ = writeln!(
            out,
            "pingora_vhost_connections_active{{listener=\"https\"}} {https}"
        );
        let _ = writeln!(out, "# HELP pingora_vhost_tls_handshakes_total TLS handshakes with clients on the HTTPS listener, by result (ok, failed: an error or no ClientHello in time)");
        let _ = writeln!(out, "# TYPE pingora_vhost_tls_handshakes_total counter");
        for (i, result) in ["ok", "failed"].iter().enumerate() {
            let n = self.tls_handshakes[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "pingora_vhost_tls_handshakes_total{{result=\"{result}\"}} {n}"
            );
        }
    }

    /// Points of the last 15 minutes' charts: every domain and backend with a series.
    pub fn traffic_snapshot(&self) -> Vec<(traffic::Kind, String, traffic::Snapshot)> {
        let mut out = Vec::new();
        let owned = self.owned_series();
        for route in owned.domains.iter().filter_map(std::sync::Weak::upgrade) {
            if let Some(c) = route.traffic.own() {
                out.push((traffic::Kind::Domain, route.domain.clone(), c.snapshot()));
            }
        }
        for rt in owned.backends.iter().filter_map(std::sync::Weak::upgrade) {
            if let Some(c) = rt.traffic.own() {
                out.push((traffic::Kind::Backend, rt.id.clone(), c.snapshot()));
            }
        }
        out
    }

    pub fn with_access_log(mut self, access_log: AccessLog) -> Self {
        self.access_log = access_log;
        self
    }

    /// Tickets whose lifetime (told to clients) is the rotation period of their keys.
    pub fn with_ticket_rotation(mut self, rotation: Duration) -> Self {
        self.tickets = Arc::new(Tickets::new(rotation));
        self
    }

    /// Swaps in new snapshots for `state`, which differs from the last published one by at
    /// most `changes`: only what they name is rebuilt.
    pub fn publish(&self, state: &State, changes: &Changes) {
        // Two keys at most: cheap to take every time.
        self.tickets.publish(state);
        if changes.is_empty() {
            return;
        }
        self.publish_table(state, changes);
        self.certs.publish(state, changes);
    }

    /// Recompiles the whole routing table (backend addresses changed, certificates did not).
    pub fn publish_routes(&self, state: &State) {
        self.publish_table(state, &Changes::everything());
    }

    fn publish_table(&self, state: &State, changes: &Changes) {
        let mut compiler = self.compiler.lock().unwrap_or_else(|p| p.into_inner());
        let table = compiler.compile(state, &self.live, changes);
        self.routes.store(Arc::new(table));
        self.table_generation.fetch_add(1, Ordering::Release);
    }
}

/// What one write costs with 100,000 domains and 100,000 backends in the state (prints
/// timings; asserts nothing about them): `cargo test --lib write_cost_at_scale -- --ignored
/// --nocapture`. Numbers: bench/README.md.
#[cfg(test)]
mod scale {
    use std::time::Instant;

    use super::*;
    use crate::state::fixtures::{backend, domain};
    use crate::state::{apply, Command};

    fn seeded(n: usize) -> State {
        let mut s = State::default();
        let cmd = Command::Seed {
            domains: (0..n)
                .map(|i| domain(&format!("h{i}.bench"), &format!("t{i}")))
                .collect(),
            backends: (0..n)
                .map(|i| backend(&format!("b{i}"), &[&format!("t{i}")]))
                .collect(),
        };
        apply(&mut s, &cmd).unwrap();
        s
    }

    fn plane() -> DataPlane {
        let (c, k) = tls::self_signed(&["default.test"]).unwrap();
        let ck = tls::certified_key(&c, &k).unwrap();
        DataPlane::new(tls::CertStore::new(ck))
    }

    #[test]
    #[ignore = "prints timings at 100k; run by hand"]
    fn write_cost_at_scale() {
        let n = 100_000;
        let t = Instant::now();
        let mut s = seeded(n);
        println!("seed apply {n}+{n}: {:?}", t.elapsed());
        let data = plane();
        let t = Instant::now();
        data.publish(&s, &Changes::everything());
        println!("first publish: {:?}", t.elapsed());
        let mut applies = Vec::new();
        let mut publishes = Vec::new();
        for i in 0..20 {
            let cmd = Command::CreateDomain(domain(&format!("new{i}.bench"), "t1"));
            let t = Instant::now();
            apply(&mut s, &cmd).unwrap();
            applies.push(t.elapsed());
            let t = Instant::now();
            let mut changes = Changes::default();
            changes.add(&cmd);
            data.publish(&s, &changes);
            publishes.push(t.elapsed());
        }
        applies.sort();
        publishes.sort();
        println!(
            "apply one CreateDomain: median {:?} max {:?}",
            applies[10], applies[19]
        );
        println!(
            "publish after it: median {:?} max {:?}",
            publishes[10], publishes[19]
        );
        // The SaaS shape: every domain on one tag whose pool has 1,000 backends; a drain
        // rebuilds that pool (1,000 entries) and no route.
        let mut shared = State::default();
        let cmd = Command::Seed {
            domains: (0..n)
                .map(|i| domain(&format!("c{i}.bench"), "app"))
                .collect(),
            backends: (0..1000)
                .map(|i| backend(&format!("app{i}"), &["app"]))
                .collect(),
        };
        apply(&mut shared, &cmd).unwrap();
        let data = plane();
        data.publish(&shared, &Changes::everything());
        let mut drains = Vec::new();
        for i in 0..20 {
            let cmd = Command::SetDraining {
                id: format!("app{i}").as_str().into(),
                draining: true,
            };
            apply(&mut shared, &cmd).unwrap();
            let t = Instant::now();
            let mut changes = Changes::default();
            changes.add(&cmd);
            data.publish(&shared, &changes);
            drains.push(t.elapsed());
        }
        drains.sort();
        println!(
            "publish after a drain ({n} domains on one 1,000-backend pool): median {:?} max {:?}",
            drains[10], drains[19]
        );
        let t = Instant::now();
        let json = serde_json::to_vec(&s).unwrap();
        println!("snapshot JSON {} bytes: {:?}", json.len(), t.elapsed());
        let t = Instant::now();
        let c = s.clone();
        println!("state clone: {:?}", t.elapsed());
        drop(c);
    }
}

#[cfg(test)]
mod owned_series_tests {
    use super::*;
    use crate::state::fixtures::{backend, domain};
    use crate::state::{apply, Command};

    fn listed(data: &DataPlane) -> Vec<String> {
        let mut names: Vec<String> = data
            .traffic_snapshot()
            .into_iter()
            .map(|(kind, name, _)| format!("{kind:?} {name}"))
            .collect();
        names.sort();
        names
    }

    fn run(data: &DataPlane, state: &mut State, cmd: Command) {
        apply(state, &cmd).unwrap();
        let mut changes = Changes::default();
        changes.add(&cmd);
        data.publish(state, &changes);
    }

    /// The list of series with a slot is kept between passes, and still follows every claim,
    /// every new table and every deleted domain.
    #[test]
    fn series_with_a_slot_are_listed_from_their_first_request_until_they_go() {
        let (c, k) = tls::self_signed(&["default.test"]).unwrap();
        let data = DataPlane::new(tls::CertStore::new(tls::certified_key(&c, &k).unwrap()));
        let mut state = State::default();
        run(
            &data,
            &mut state,
            Command::CreateBackend(backend("owned-b1", &["t"])),
        );
        run(
            &data,
            &mut state,
            Command::CreateDomain(domain("owned-a.test", "t")),
        );
        run(
            &data,
            &mut state,
            Command::CreateDomain(domain("owned-b.test", "t")),
        );
        assert!(listed(&data).is_empty(), "no request yet: no slot taken");

        let claim = |host: &str| {
            let target = data.routes.load().lookup(host).unwrap();
            target.traffic.counters().count_status(200);
            target.upstreams[0]
                .runtime
                .traffic
                .counters()
                .count_status(200);
        };
        claim("owned-a.test");
        let both = ["Backend owned-b1", "Domain owned-a.test"];
        assert_eq!(listed(&data), both);
        assert_eq!(listed(&data), both, "the same from the kept list");
        // A claim with no new table.
        claim("owned-b.test");
        assert_eq!(
            listed(&data),
            [
                "Backend owned-b1",
                "Domain owned-a.test",
                "Domain owned-b.test"
            ]
        );
        run(
            &data,
            &mut state,
            Command::DeleteDomain("owned-a.test".into()),
        );
        assert_eq!(listed(&data), ["Backend owned-b1", "Domain owned-b.test"]);
        run(&data, &mut state, Command::DeleteBackend("owned-b1".into()));
        assert_eq!(listed(&data), ["Domain owned-b.test"]);
    }
}
