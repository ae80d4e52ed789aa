//! The routing table: an immutable snapshot compiled from the replicated state and read by
//! the data plane without locks.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::live::{now_ms, BackendRuntime, Live};
use crate::observability::traffic::{Kind, Series};
use crate::proxy_protocol::Version;
use crate::schema::SendProxyProtocol;
use crate::state::{Changes, State};
use crate::upstream_tls::UpstreamTls;

use super::name_map::NameMap;

/// One backend as the proxy sees it.
#[derive(Debug)]
pub struct Upstream {
    pub id: String,
    /// What the address resolved to when the table was compiled (the hot path never does
    /// DNS; the resolver recompiles when an answer changes). Empty while a name has no
    /// answer: the backend is then skipped.
    addrs: Box<[SocketAddr]>,
    /// Spreads connections over several addresses of one name.
    next_addr: AtomicUsize,
    pub draining: bool,
    pub runtime: Arc<BackendRuntime>,
    /// PROXY protocol header to send on each new connection (`send_proxy_protocol`).
    pub send_proxy: Option<Version>,
    /// TLS to the backend (`tls`); `Err` says why its client could not be set up (every
    /// attempt then fails as a handshake would).
    pub tls: Option<Result<Arc<UpstreamTls>, Arc<str>>>,
}

impl Upstream {
    /// The address for the next connection: round-robin over the name's answers.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self.addrs.len() {
            0 => None,
            1 => Some(self.addrs[0]),
            n => Some(self.addrs[self.next_addr.fetch_add(1, Ordering::Relaxed) % n]),
        }
    }

    /// The backend wants HTTP/2 (`tls.http2`): only Pingora's proxy speaks it.
    pub fn http2(&self) -> bool {
        matches!(&self.tls, Some(Ok(t)) if t.http2)
    }

    /// The pool key part of this backend's connections: 0 for plain TCP.
    pub fn tls_id(&self) -> u64 {
        match &self.tls {
            Some(Ok(t)) => t.id,
            _ => 0,
        }
    }

    fn usable(&self, now: u64, view: View) -> bool {
        let health = &self.runtime.health;
        !self.draining
            && !self.addrs.is_empty()
            && match view {
                View::Merged => health.merged_usable(now),
                View::Local => health.locally_usable(now),
                View::DespiteEjection => health.usable_despite_ejection(now),
            }
    }
}

/// The health views a pick tries in turn: the cluster's, then (guard rail) this node's own,
/// then this node's own without passive ejections (they must not empty a pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Merged,
    Local,
    DespiteEjection,
}

impl View {
    const ORDER: [View; 3] = [View::Merged, View::Local, View::DespiteEjection];
}

/// The backend chosen for one attempt.
pub struct Pick<'a> {
    pub index: usize,
    pub upstream: &'a Arc<Upstream>,
    /// True when the merged (cluster) view had nothing and this node's own view was used.
    pub guard_rail: bool,
}

/// The backends of one tag, in id order: every domain on that tag proxies to the same list, so
/// 100,000 domains on one pool of 100,000 backends is one list, not 10^10 pointers.
pub type Pool = Arc<[Arc<Upstream>]>;

/// A virtual host. Kept (same `Arc`) across table updates that do not touch the domain.
#[derive(Debug)]
pub struct Route {
    pub domain: String,
    pub tag: String,
    pub http_to_https: bool,
    /// This domain's requests go to the access log.
    pub access_log: bool,
    /// ... with their query strings.
    pub access_log_query: bool,
    /// Its traffic series (`observability::traffic`): kept across recompiles of the route.
    pub traffic: Arc<Series>,
    next: AtomicUsize,
}

/// What one request proxies to: its domain's route and, from the same table, the pool of the
/// route's tag. The pool is looked up per request (one hash lookup) rather than stored in the
/// route, so a backend change rebuilds its tags' pools and no route.
#[derive(Debug, Clone)]
pub struct Target {
    pub route: Arc<Route>,
    pub upstreams: Pool,
}

impl std::ops::Deref for Target {
    type Target = Route;
    fn deref(&self) -> &Route {
        &self.route
    }
}

impl Target {
    /// Round-robin over usable upstreams not yet tried by this request: first by the
    /// cluster's merged health view, then (guard rail) by this node's own view.
    pub fn pick(&self, tried: &[usize]) -> Option<Pick<'_>> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let start = self.route.next.fetch_add(1, Ordering::Relaxed);
        for view in View::ORDER {
            let found = (0..n)
                .map(|i| (start.wrapping_add(i)) % n)
                .find(|idx| !tried.contains(idx) && self.upstreams[*idx].usable(now, view));
            if let Some(index) = found {
                let upstream = &self.upstreams[index];
                upstream.runtime.health.breaker.on_pick(now);
                return Some(Pick {
                    index,
                    upstream,
                    guard_rail: view != View::Merged,
                });
            }
        }
        None
    }

    /// True when some upstream could still serve (used to decide whether to retry).
    pub fn has_untried(&self, tried: &[usize]) -> bool {
        let now = now_ms();
        self.upstreams
            .iter()
            .enumerate()
            .any(|(i, u)| !tried.contains(&i) && u.usable(now, View::DespiteEjection))
    }
}

/// One immutable snapshot, swapped whole into the data plane. Cloning a table is O(1) and an
/// update costs what it changes: its name maps are flat tables for lookups with the recent
/// writes in a persistent overlay (`name_map`).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    exact: NameMap<Arc<Route>>,
    /// "*.example.com" stored as "example.com".
    wildcard: NameMap<Arc<Route>>,
    pools: NameMap<Pool>,
    /// Tags whose pool has a backend spoken to in HTTP/2: their requests go to Pingora's proxy.
    http2_tags: imbl::HashSet<String>,
    /// Tags whose pool has a backend that wants the PROXY protocol header: their HTTP/2
    /// requests go to Pingora's proxy (a connection that carries one client's header serves
    /// only that client; the lean HTTP/2 path shares backend connections between clients).
    send_proxy_tags: imbl::HashSet<String>,
    /// The pool of a tag no backend carries.
    no_pool: Pool,
    /// ACME HTTP-01 answers: token -> key authorization (replicated, so any node answers).
    challenges: Arc<HashMap<String, String>>,
}

impl Default for RoutingTable {
    fn default() -> Self {
        Self {
            exact: NameMap::default(),
            wildcard: NameMap::default(),
            pools: NameMap::default(),
            http2_tags: imbl::HashSet::new(),
            send_proxy_tags: imbl::HashSet::new(),
            no_pool: Arc::from(Vec::new()),
            challenges: Arc::default(),
        }
    }
}

impl RoutingTable {
    /// `host` must already be lower-case without port.
    pub fn lookup(&self, host: &str) -> Option<Target> {
        let route = match self.exact.get(host) {
            Some(r) => r,
            None => {
                let (_, parent) = host.split_once('.')?;
                self.wildcard.get(parent)?
            }
        };
        Some(Target {
            route: route.clone(),
            upstreams: self.pool(&route.tag).clone(),
        })
    }

    /// The pool of `tag` (empty when no backend carries it).
    /// The backend ids of every pool (for the cap on passive ejections, `health::shared`).
    pub fn pool_members(&self) -> Vec<Vec<String>> {
        self.pools
            .values()
            .map(|pool| pool.iter().map(|u| u.id.clone()).collect())
            .collect()
    }

    /// Requests to `host` must be served by Pingora's proxy: its pool has an HTTP/2 backend.
    /// No lookup at all while no backend is HTTP/2.
    pub fn needs_http2(&self, host: &str) -> bool {
        if self.http2_tags.is_empty() {
            return false;
        }
        self.lookup(host)
            .is_some_and(|t| self.http2_tags.contains(&t.route.tag))
    }

    /// HTTP/2 requests to `target` may take the lean path: no backend of its pool is spoken
    /// to in HTTP/2 or wants the PROXY protocol header. No lookup while no backend does.
    pub fn h2_lean(&self, target: &Target) -> bool {
        let tag = &target.route.tag;
        (self.http2_tags.is_empty() || !self.http2_tags.contains(tag))
            && (self.send_proxy_tags.is_empty() || !self.send_proxy_tags.contains(tag))
    }

    pub fn pool(&self, tag: &str) -> &Pool {
        self.pools.get(tag).unwrap_or(&self.no_pool)
    }

    /// The tags whose pool has a backend the proxy may pick by the cluster's view (not
    /// draining, an address known, not down). A domain on any other tag is answered 503 (or
    /// served only through this node's guard rail). One pass over the pools.
    pub fn serving_tags(&self) -> HashSet<&str> {
        let now = now_ms();
        self.pools
            .iter()
            .filter(|(_, pool)| pool.iter().any(|u| u.usable(now, View::Merged)))
            .map(|(tag, _)| tag)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Every route (the traffic series are rendered from them).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.exact.values().chain(self.wildcard.values())
    }

    /// The key authorization to answer for an ACME HTTP-01 `token`.
    pub fn challenge(&self, token: &str) -> Option<&str> {
        self.challenges.get(token).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds the table for `state` from scratch.
pub fn compile(state: &State, live: &Live) -> RoutingTable {
    Compiler::default().compile(state, live, &Changes::everything())
}

/// Builds routing tables and keeps what it built, so the next table after a write rebuilds
/// only what the write touched ([`Changes`]): the touched domains' routes, the touched
/// backends' upstreams and the pools of their tags (old and new). Before, every write
/// compiled the whole table: about 2 s per write in a debug build at 100,000 domains and
/// 100,000 backends (bench/README.md).
#[derive(Default)]
pub struct Compiler {
    table: RoutingTable,
    /// Backend id -> its upstream and the tags it was compiled with.
    upstreams: HashMap<String, (Arc<Upstream>, Vec<String>)>,
    /// Tag -> ids of the backends carrying it (a pool lists them in id order).
    members: HashMap<String, BTreeSet<String>>,
    /// Domain -> its traffic series, kept while the domain exists (across full compiles too:
    /// counters and their slot stay with the domain).
    traffic: HashMap<String, Arc<Series>>,
}

impl Compiler {
    /// The table for `state`, which differs from the state of the previous call by at most
    /// `changes` (anything, when `changes.all`).
    pub fn compile(&mut self, state: &State, live: &Live, changes: &Changes) -> RoutingTable {
        if changes.all {
            let mut traffic = std::mem::take(&mut self.traffic);
            traffic.retain(|name, _| state.domains.contains_key(name));
            *self = Compiler {
                traffic,
                ..Compiler::default()
            };
            live.backends.retain(|id| state.backends.contains_key(id));
            let mut tags = HashSet::new();
            for id in state.backends.keys() {
                self.set_backend(state, live, id, &mut tags);
            }
            for tag in &tags {
                self.rebuild_pool(tag);
            }
            for name in state.domains.keys() {
                self.set_domain(state, name);
            }
            self.set_challenges(state);
        } else {
            let mut tags = HashSet::new();
            for id in &changes.backends {
                self.set_backend(state, live, id, &mut tags);
            }
            for tag in &tags {
                self.rebuild_pool(tag);
            }
            for name in &changes.domains {
                self.set_domain(state, name);
            }
            if changes.challenges {
                self.set_challenges(state);
            }
        }
        self.table.exact.settle();
        self.table.wildcard.settle();
        self.table.pools.settle();
        self.table.clone()
    }

    /// Rebuilds backend `id`'s upstream from `state` (or drops it); adds its old and new tags
    /// to `tags`, whose pools must be rebuilt.
    fn set_backend(&mut self, state: &State, live: &Live, id: &str, tags: &mut HashSet<String>) {
        let before = self.upstreams.get(id).map(|(u, _)| u.clone());
        if let Some((_, old_tags)) = self.upstreams.remove(id) {
            for t in old_tags {
                if let Some(m) = self.members.get_mut(&t) {
                    m.remove(id);
                }
                tags.insert(t);
            }
        }
        let Some(b) = state.backends.get(id) else {
            live.backends.remove(id);
            return;
        };
        let u = Arc::new(Upstream {
            id: b.id.to_string(),
            addrs: live.addrs.addrs_for(&b.address).into(),
            next_addr: AtomicUsize::new(0),
            draining: b.draining,
            runtime: live.backends.ensure(&b.id),
            send_proxy: b.send_proxy_protocol.map(|v| match v {
                SendProxyProtocol::V1 => Version::V1,
                SendProxyProtocol::V2 => Version::V2,
            }),
            tls: b.tls.as_ref().map(|tls| {
                UpstreamTls::for_backend(tls, &b.address).map_err(|e| {
                    tracing::error!(backend = %b.id, error = %e, "TLS to the backend cannot be set up");
                    Arc::from(e.to_string())
                })
            }),
        });
        // How the backend is reached changed: its health verdict is about the old way, so it
        // is probed again at once (on every node, as every node compiles the change).
        if let Some(before) = before {
            let reached_as_before = before.addrs == u.addrs
                && before.send_proxy == u.send_proxy
                && before.tls_id() == u.tls_id();
            if !reached_as_before {
                u.runtime.ask_probe();
            }
        }
        let new_tags: Vec<String> = b.tags.iter().map(|t| t.to_string()).collect();
        for t in &new_tags {
            self.members
                .entry(t.clone())
                .or_default()
                .insert(id.to_string());
            tags.insert(t.clone());
        }
        self.upstreams.insert(id.to_string(), (u, new_tags));
    }

    fn rebuild_pool(&mut self, tag: &str) {
        let pool: Vec<Arc<Upstream>> = self
            .members
            .get(tag)
            .into_iter()
            .flatten()
            .filter_map(|id| self.upstreams.get(id).map(|(u, _)| u.clone()))
            .collect();
        for (set, any) in [
            (&mut self.table.http2_tags, pool.iter().any(|u| u.http2())),
            (
                &mut self.table.send_proxy_tags,
                pool.iter().any(|u| u.send_proxy.is_some()),
            ),
        ] {
            if any {
                set.insert(tag.to_string());
            } else {
                set.remove(tag);
            }
        }
        if pool.is_empty() {
            self.members.remove(tag);
            self.table.pools.remove(tag);
        } else {
            self.table.pools.insert(tag, Arc::from(pool));
        }
    }

    fn set_domain(&mut self, state: &State, name: &str) {
        let (map, key) = match name.strip_prefix("*.") {
            Some(parent) => (&mut self.table.wildcard, parent),
            None => (&mut self.table.exact, name),
        };
        match state.domains.get(name) {
            Some(d) => {
                let traffic = self
                    .traffic
                    .entry(name.to_string())
                    .or_insert_with(|| Arc::new(Series::new(Kind::Domain)))
                    .clone();
                let route = Arc::new(Route {
                    domain: d.domain.to_string(),
                    tag: d.enabled_backends_tag.to_string(),
                    http_to_https: d.http_to_https,
                    access_log: d.access_log,
                    access_log_query: d.access_log_query,
                    traffic,
                    next: AtomicUsize::new(0),
                });
                map.insert(key, route);
            }
            None => {
                map.remove(key);
                self.traffic.remove(name);
            }
        }
    }

    fn set_challenges(&mut self, state: &State) {
        self.table.challenges = Arc::new(
            state
                .acme
                .challenges
                .iter()
                .map(|(t, k)| (t.clone(), k.clone()))
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Backend, Domain, TlsMode};

    fn state() -> State {
        let mut s = State::default();
        for (id, port, tags) in [
            ("a1", 1, vec!["a"]),
            ("a2", 2, vec!["a"]),
            ("b1", 3, vec!["b"]),
        ] {
            s.backends.insert(
                id.into(),
                Backend {
                    id: id.into(),
                    address: format!("127.0.0.1:{port}").as_str().into(),
                    tags: tags.into_iter().map(Into::into).collect(),
                    health_check_path: None,
                    draining: false,
                    send_proxy_protocol: None,
                    tls: None,
                },
            );
        }
        for (name, tag) in [("x.test", "a"), ("*.wild.test", "b"), ("empty.test", "zzz")] {
            s.domains.insert(
                name.into(),
                Domain {
                    domain: name.into(),
                    enabled_backends_tag: tag.into(),
                    http_to_https: false,
                    tls: TlsMode::None,
                    access_log: true,
                    access_log_query: true,
                    cert: None,
                },
            );
        }
        s
    }

    #[test]
    fn lookup_exact_and_wildcard() {
        let live = Live::default();
        let t = compile(&state(), &live);
        assert_eq!(t.lookup("x.test").unwrap().tag, "a");
        assert_eq!(t.lookup("foo.wild.test").unwrap().tag, "b");
        assert!(t.lookup("wild.test").is_none());
        assert!(t.lookup("a.b.wild.test").is_none());
        assert!(t.lookup("nope.test").is_none());
    }

    #[test]
    fn round_robin_skips_tried_draining_and_unhealthy() {
        let live = Live::default();
        let mut s = state();
        let t = compile(&s, &live);
        let r = t.lookup("x.test").unwrap();
        let first = r.pick(&[]).unwrap().upstream.id.clone();
        let second = r.pick(&[]).unwrap().upstream.id.clone();
        assert_ne!(first, second, "round robin alternates");
        let idx = r.pick(&[]).unwrap().index;
        let other = r.pick(&[idx]).unwrap().index;
        assert_ne!(idx, other);
        assert!(r.pick(&[0, 1]).is_none());
        assert!(t.lookup("empty.test").unwrap().pick(&[]).is_none());

        let t3 = crate::live::health::Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        live.backends
            .ensure("a1")
            .health
            .record_probe(false, "down".into(), t3);
        for _ in 0..4 {
            assert_eq!(r.pick(&[]).unwrap().upstream.id, "a2");
        }
        s.backends.get_mut("a2").unwrap().draining = true;
        let t = compile(&s, &live);
        assert!(t.lookup("x.test").unwrap().pick(&[]).is_none());
    }

    #[test]
    fn names_take_the_resolvers_answers_spread_over_connections() {
        let live = Live::default();
        let mut s = state();
        s.backends.get_mut("a1").unwrap().address = "svc.test:80".into();
        let t = compile(&s, &live);
        let a1 = |t: &RoutingTable| {
            t.lookup("x.test")
                .unwrap()
                .upstreams
                .iter()
                .find(|u| u.id == "a1")
                .unwrap()
                .clone()
        };
        assert_eq!(a1(&t).addr(), None, "no answer yet: not usable");
        let addrs: Vec<SocketAddr> = vec![
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        ];
        live.addrs.store(
            "svc.test:80",
            crate::live::addrs::Resolution::new(addrs.clone(), None, None),
        );
        let t = compile(&s, &live);
        let u = a1(&t);
        let picked: Vec<SocketAddr> = (0..4).filter_map(|_| u.addr()).collect();
        assert_eq!(picked, [addrs[0], addrs[1], addrs[0], addrs[1]]);
    }

    #[test]
    fn runtimes_survive_recompile() {
        let live = Live::default();
        let s = state();
        let t1 = compile(&s, &live);
        t1.lookup("x.test").unwrap().upstreams[0]
            .runtime
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        let t2 = compile(&s, &live);
        assert_eq!(
            t2.lookup("x.test").unwrap().upstreams[0]
                .runtime
                .in_flight
                .load(Ordering::Relaxed),
            1
        );
    }
}

/// The incremental compiler against a compile from scratch.
#[cfg(test)]
mod incremental_tests {
    use super::*;
    use crate::state::fixtures::{backend, domain};
    use crate::state::{apply, BackendPatch, Command, DomainPatch};

    /// Everything the proxy reads from a table, in a comparable form.
    fn dump(t: &RoutingTable) -> Vec<String> {
        let mut out: Vec<String> = t
            .exact
            .iter()
            .map(|(k, r)| ("", k, r))
            .chain(t.wildcard.iter().map(|(k, r)| ("*.", k, r)))
            .map(|(prefix, key, r)| {
                let pool: Vec<String> = t
                    .pool(&r.tag)
                    .iter()
                    .map(|u| format!("{}{:?}{}", u.id, u.addrs, u.draining))
                    .collect();
                format!(
                    "{prefix}{key} {} {} {} {} {} {pool:?}",
                    r.domain, r.tag, r.http_to_https, r.access_log, r.access_log_query
                )
            })
            .collect();
        out.extend(
            t.challenges
                .iter()
                .map(|(k, v)| format!("challenge {k} {v}")),
        );
        out.sort();
        out
    }

    /// A deterministic mix of every command that changes what the table holds.
    fn command(i: u64) -> Command {
        let r = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            >> 33;
        let d = format!(
            "{}d{}.test",
            if r.is_multiple_of(5) { "*." } else { "" },
            r % 7
        );
        let b = format!("b{}", (r / 7) % 6);
        let tag = ["a", "b", "c"][(r / 3 % 3) as usize];
        match (r / 11) % 11 {
            0 => Command::CreateDomain(domain(&d, tag)),
            1 => Command::DeleteDomain(d.as_str().into()),
            2 => Command::SwitchTag {
                domain: d.as_str().into(),
                tag: tag.into(),
            },
            3 => Command::UpdateDomain {
                domain: d.as_str().into(),
                patch: DomainPatch {
                    http_to_https: Some(r.is_multiple_of(2)),
                    access_log: Some(r.is_multiple_of(3)),
                    access_log_query: Some(r.is_multiple_of(4)),
                    ..Default::default()
                },
            },
            4 | 5 => Command::CreateBackend(backend(&b, &[tag])),
            6 => Command::DeleteBackend(b.as_str().into()),
            7 => Command::UpdateBackend {
                id: b.as_str().into(),
                patch: BackendPatch {
                    tags: Some(vec![tag.into(), "c".into()]),
                    address: Some(format!("127.0.0.1:{}", 1 + r % 3).as_str().into()),
                    ..Default::default()
                },
            },
            8 => Command::SetDraining {
                id: b.as_str().into(),
                draining: r.is_multiple_of(2),
            },
            9 => Command::PutChallenge {
                token: format!("t{}", r % 3),
                key_authorization: format!("k{r}"),
            },
            _ => Command::RemoveChallenge {
                token: format!("t{}", r % 3),
            },
        }
    }

    #[test]
    fn updates_give_the_table_a_full_compile_gives() {
        let live = Live::default();
        let mut state = State::default();
        let mut compiler = Compiler::default();
        compiler.compile(&state, &live, &Changes::everything());
        for i in 0..2000 {
            // Batches of 1-3 commands, as Raft applies them.
            let mut changes = Changes::default();
            for j in 0..=(i % 3) {
                let cmd = command(i * 3 + j);
                let _ = apply(&mut state, &cmd);
                changes.add(&cmd);
            }
            let updated = compiler.compile(&state, &live, &changes);
            let full = compile(&state, &live);
            assert_eq!(dump(&updated), dump(&full), "after batch {i}");
        }
        assert!(!state.domains.is_empty() && !state.backends.is_empty());
    }

    #[test]
    fn a_write_rebuilds_only_what_it_touches() {
        let live = Live::default();
        let mut state = State::default();
        for i in 0..100 {
            apply(
                &mut state,
                &Command::CreateBackend(backend(&format!("b{i}"), &["a"])),
            )
            .unwrap();
            apply(
                &mut state,
                &Command::CreateDomain(domain(&format!("d{i}.test"), "a")),
            )
            .unwrap();
        }
        apply(
            &mut state,
            &Command::CreateBackend(backend("other", &["b"])),
        )
        .unwrap();
        let mut compiler = Compiler::default();
        let before = compiler.compile(&state, &live, &Changes::everything());
        let route = |t: &RoutingTable, d: &str| t.exact.get(d).cloned().unwrap();

        // A new domain: every other route and every pool is the same object as before.
        let cmd = Command::CreateDomain(domain("new.test", "a"));
        apply(&mut state, &cmd).unwrap();
        let mut changes = Changes::default();
        changes.add(&cmd);
        let after = compiler.compile(&state, &live, &changes);
        assert!(after.lookup("new.test").is_some());
        for i in 0..100 {
            let d = format!("d{i}.test");
            assert!(Arc::ptr_eq(&route(&before, &d), &route(&after, &d)), "{d}");
        }
        assert!(Arc::ptr_eq(before.pool("a"), after.pool("a")));

        // Draining one backend of the shared pool: a new pool "a", the same routes, the
        // same upstreams for the other backends, and pool "b" untouched.
        let cmd = Command::SetDraining {
            id: "b7".into(),
            draining: true,
        };
        apply(&mut state, &cmd).unwrap();
        let mut changes = Changes::default();
        changes.add(&cmd);
        let drained = compiler.compile(&state, &live, &changes);
        assert!(!Arc::ptr_eq(after.pool("a"), drained.pool("a")));
        assert!(Arc::ptr_eq(after.pool("b"), drained.pool("b")));
        for i in 0..100 {
            let d = format!("d{i}.test");
            assert!(Arc::ptr_eq(&route(&after, &d), &route(&drained, &d)), "{d}");
            let (old, new) = (&after.pool("a")[i], &drained.pool("a")[i]);
            assert_eq!(Arc::ptr_eq(old, new), old.id != "b7", "{}", old.id);
        }
        assert!(drained.pool("a").iter().any(|u| u.id == "b7" && u.draining));
    }
}

#[cfg(test)]
mod guard_rail_tests {
    use super::*;
    use crate::state::{Backend, Domain, TlsMode};

    /// Domain x.test on tag a, served by a1 and a2.
    fn two_backend_state() -> State {
        let mut s = State::default();
        for id in ["a1", "a2"] {
            s.backends.insert(
                id.into(),
                Backend {
                    id: id.into(),
                    address: "127.0.0.1:1".into(),
                    tags: vec!["a".into()],
                    health_check_path: None,
                    draining: false,
                    send_proxy_protocol: None,
                    tls: None,
                },
            );
        }
        s.domains.insert(
            "x.test".into(),
            Domain {
                domain: "x.test".into(),
                enabled_backends_tag: "a".into(),
                http_to_https: false,
                tls: TlsMode::None,
                access_log: true,
                access_log_query: true,
                cert: None,
            },
        );
        s
    }

    #[test]
    fn peers_view_avoids_then_guard_rail_keeps_pool_alive() {
        let s = two_backend_state();
        let live = Live::default();
        let t = compile(&s, &live);
        let r = t.lookup("x.test").unwrap();
        // A peer reports a1 down: everyone avoids it.
        live.backends.ensure("a1").health.set_peers_down(vec![2]);
        for _ in 0..4 {
            let p = r.pick(&[]).unwrap();
            assert_eq!(p.upstream.id, "a2");
            assert!(!p.guard_rail);
        }
        // Peers report every backend down, but locally both work: fall back to local view.
        live.backends.ensure("a2").health.set_peers_down(vec![3]);
        let p = r.pick(&[]).unwrap();
        assert!(p.guard_rail);
        // Down locally as well: nothing to pick (503).
        let t1 = crate::live::health::Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        live.backends
            .ensure("a1")
            .health
            .record_probe(false, "x".into(), t1);
        live.backends
            .ensure("a2")
            .health
            .record_probe(false, "x".into(), t1);
        assert!(r.pick(&[]).is_none());
    }

    #[test]
    fn passive_ejections_steer_picks_but_never_empty_a_pool() {
        let (s, live) = (two_backend_state(), Live::default());
        let t = compile(&s, &live);
        let r = t.lookup("x.test").unwrap();
        let now = crate::clock::coarse_unix_ms();
        let p = crate::live::ejection::Policy::default();
        live.backends.ensure("a1").health.ejection.eject(now, p);
        for _ in 0..4 {
            let pick = r.pick(&[]).unwrap();
            assert_eq!(pick.upstream.id, "a2", "a1 is ejected here");
            assert!(!pick.guard_rail);
        }
        // A peer ejects a2 as well: a2 by the peer's word, a1 by ours; nothing in either
        // view, so the pool falls back to both rather than answering 503.
        live.backends.ensure("a2").health.ejection.set_peers(vec![
            crate::live::ejection::PeerEjection {
                node_id: 2,
                until_unix_ms: now + 60_000,
            },
        ]);
        let picked: std::collections::HashSet<String> = (0..4)
            .map(|_| {
                let pick = r.pick(&[]).unwrap();
                assert!(pick.guard_rail);
                pick.upstream.id.clone()
            })
            .collect();
        assert_eq!(
            picked.len(),
            1,
            "the local view still avoids our own ejection: {picked:?}"
        );
        assert!(picked.contains("a2"));
        live.backends.ensure("a2").health.ejection.eject(now, p);
        assert_eq!(
            (0..4).filter_map(|_| r.pick(&[])).count(),
            4,
            "every backend ejected: they serve anyway"
        );
        assert!(r.has_untried(&[0]));
        // The pool cap's waiver lets an ejected backend back into the cluster view.
        live.backends.ensure("a1").health.ejection.set_waived(true);
        let pick = r.pick(&[]).unwrap();
        assert_eq!(pick.upstream.id, "a1");
        assert!(!pick.guard_rail);
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use crate::schema::BackendTls;
    use crate::state::{apply, Backend, BackendPatch, Command, Domain, TlsMode};

    fn backend(id: &str, tag: &str, tls: Option<BackendTls>) -> Backend {
        Backend {
            id: id.into(),
            address: "127.0.0.1:8443".into(),
            tags: vec![tag.into()],
            health_check_path: None,
            draining: false,
            send_proxy_protocol: None,
            tls: tls.map(Box::new),
        }
    }

    fn domain(name: &str, tag: &str) -> Domain {
        Domain {
            domain: name.into(),
            enabled_backends_tag: tag.into(),
            http_to_https: false,
            tls: TlsMode::None,
            access_log: true,
            access_log_query: true,
            cert: None,
        }
    }

    fn recompile(c: &mut Compiler, s: &mut State, live: &Live, cmd: Command) -> RoutingTable {
        apply(s, &cmd).unwrap();
        let mut changes = Changes::default();
        changes.add(&cmd);
        c.compile(s, live, &changes)
    }

    /// A pool with an HTTP/2 backend sends its domains to Pingora's proxy; others stay lean.
    #[test]
    fn http2_backends_mark_their_tags_only() {
        let live = Live::default();
        let mut s = State::default();
        let mut c = Compiler::default();
        let h2 = BackendTls {
            http2: true,
            verify: false,
            ..BackendTls::default()
        };
        for cmd in [
            Command::CreateBackend(backend("plain", "a", None)),
            Command::CreateBackend(backend("h2", "b", Some(h2))),
            Command::CreateDomain(domain("a.test", "a")),
            Command::CreateDomain(domain("b.test", "b")),
        ] {
            recompile(&mut c, &mut s, &live, cmd);
        }
        let t = c.compile(&s, &live, &Changes::everything());
        assert!(!t.needs_http2("a.test"));
        assert!(t.needs_http2("b.test"));
        assert!(!t.needs_http2("unknown.test"));
        let t = recompile(&mut c, &mut s, &live, Command::DeleteBackend("h2".into()));
        assert!(
            !t.needs_http2("b.test"),
            "the tag's last HTTP/2 backend is gone"
        );
    }

    /// HTTP/2 requests take the lean path unless their pool has an HTTP/2 backend or one
    /// that wants the PROXY protocol header.
    #[test]
    fn the_lean_http2_path_is_for_pools_of_plain_http1_backends() {
        let live = Live::default();
        let mut s = State::default();
        let mut c = Compiler::default();
        let h2 = BackendTls {
            http2: true,
            verify: false,
            ..BackendTls::default()
        };
        let mut proxied = backend("pp", "c", None);
        proxied.send_proxy_protocol = Some(SendProxyProtocol::V2);
        for cmd in [
            Command::CreateBackend(backend("plain", "a", None)),
            Command::CreateBackend(backend("h2", "b", Some(h2))),
            Command::CreateBackend(proxied),
            Command::CreateBackend(backend("plain-c", "c", None)),
            Command::CreateDomain(domain("a.test", "a")),
            Command::CreateDomain(domain("b.test", "b")),
            Command::CreateDomain(domain("c.test", "c")),
        ] {
            recompile(&mut c, &mut s, &live, cmd);
        }
        let lean = |t: &RoutingTable, host: &str| t.h2_lean(&t.lookup(host).unwrap());
        let t = c.compile(&s, &live, &Changes::everything());
        assert!(lean(&t, "a.test"));
        assert!(!lean(&t, "b.test"));
        assert!(!lean(&t, "c.test"));
        let t = recompile(&mut c, &mut s, &live, Command::DeleteBackend("pp".into()));
        assert!(
            lean(&t, "c.test"),
            "the tag's last PROXY protocol backend is gone"
        );
        assert!(!lean(&t, "b.test"));
    }

    /// A backend reached another way (TLS setting, address) is probed again at once; a change
    /// that does not touch how it is reached (tags) is not.
    #[test]
    fn a_backend_reached_differently_asks_for_a_probe() {
        let live = Live::default();
        let mut s = State::default();
        let mut c = Compiler::default();
        recompile(
            &mut c,
            &mut s,
            &live,
            Command::CreateBackend(backend("x", "a", None)),
        );
        let rt = live.backends.get("x").unwrap();
        assert!(!rt.take_probe_request(), "a new backend is probed as one");
        let update = |patch: BackendPatch| Command::UpdateBackend {
            id: "x".into(),
            patch,
        };
        recompile(
            &mut c,
            &mut s,
            &live,
            update(BackendPatch {
                tags: Some(vec!["a".into(), "b".into()]),
                ..Default::default()
            }),
        );
        assert!(!rt.take_probe_request());
        let tls = BackendTls {
            verify: false,
            ..BackendTls::default()
        };
        recompile(
            &mut c,
            &mut s,
            &live,
            update(BackendPatch {
                tls: Some(Some(Box::new(tls))),
                ..Default::default()
            }),
        );
        assert!(rt.take_probe_request(), "TLS turned on");
        recompile(
            &mut c,
            &mut s,
            &live,
            update(BackendPatch {
                address: Some("127.0.0.1:9443".into()),
                ..Default::default()
            }),
        );
        assert!(rt.take_probe_request(), "a new address");
    }
}
