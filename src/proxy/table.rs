//! The routing table: an immutable snapshot compiled from the replicated state and read by
//! the data plane without locks.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::health::{now_ms, BackendHealth};
use crate::state::State;

/// Live counters and health of one backend. Survives table recompiles (looked up by id), so
/// in-flight counts stay right across config changes.
#[derive(Debug)]
pub struct BackendRuntime {
    pub id: String,
    pub in_flight: AtomicI64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub health: BackendHealth,
}

impl BackendRuntime {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            in_flight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            health: BackendHealth::default(),
        }
    }
}

/// One backend as the proxy sees it.
#[derive(Debug)]
pub struct Upstream {
    pub id: String,
    pub address: String,
    /// Resolved when the table is compiled, so the hot path never does DNS. `None` if the
    /// name did not resolve (the backend is then skipped).
    pub addr: Option<SocketAddr>,
    pub draining: bool,
    pub runtime: Arc<BackendRuntime>,
}

impl Upstream {
    fn usable(&self, now: u64, merged: bool) -> bool {
        !self.draining
            && self.addr.is_some()
            && if merged {
                self.runtime.health.merged_usable(now)
            } else {
                self.runtime.health.locally_usable(now)
            }
    }
}

/// The backend chosen for one attempt.
pub struct Pick<'a> {
    pub index: usize,
    pub upstream: &'a Arc<Upstream>,
    /// True when the merged (cluster) view had nothing and this node's own view was used.
    pub guard_rail: bool,
}

/// A virtual host and its active pool.
#[derive(Debug)]
pub struct Route {
    pub domain: String,
    pub tag: String,
    pub http_to_https: bool,
    pub upstreams: Vec<Arc<Upstream>>,
    next: AtomicUsize,
}

impl Route {
    /// Round-robin over usable upstreams not yet tried by this request: first by the
    /// cluster's merged health view, then (guard rail) by this node's own view.
    pub fn pick(&self, tried: &[usize]) -> Option<Pick<'_>> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for merged in [true, false] {
            let found = (0..n)
                .map(|i| (start.wrapping_add(i)) % n)
                .find(|idx| !tried.contains(idx) && self.upstreams[*idx].usable(now, merged));
            if let Some(index) = found {
                let upstream = &self.upstreams[index];
                upstream.runtime.health.breaker.on_pick(now);
                return Some(Pick {
                    index,
                    upstream,
                    guard_rail: !merged,
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
            .any(|(i, u)| !tried.contains(&i) && u.usable(now, false))
    }
}

#[derive(Debug, Default)]
pub struct RoutingTable {
    exact: HashMap<String, Arc<Route>>,
    /// "*.example.com" stored as "example.com".
    wildcard: HashMap<String, Arc<Route>>,
    /// ACME HTTP-01 answers: token -> key authorization (replicated, so any node answers).
    challenges: HashMap<String, String>,
}

impl RoutingTable {
    /// `host` must already be lower-case without port.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        if let Some(r) = self.exact.get(host) {
            return Some(r);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// The key authorization to answer for an ACME HTTP-01 `token`.
    pub fn challenge(&self, token: &str) -> Option<&str> {
        self.challenges.get(token).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps per-backend runtimes and resolved addresses between compiles.
#[derive(Default)]
pub struct BackendRegistry {
    runtimes: Mutex<HashMap<String, Arc<BackendRuntime>>>,
    resolved: Mutex<HashMap<String, Option<SocketAddr>>>,
    /// Bumped whenever a runtime is added or dropped, so periodic tasks can skip full passes.
    generation: AtomicU64,
}

impl BackendRegistry {
    pub fn runtime(&self, id: &str) -> Arc<BackendRuntime> {
        let mut map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_string())
            .or_insert_with(|| {
                self.generation.fetch_add(1, Ordering::Relaxed);
                Arc::new(BackendRuntime::new(id))
            })
            .clone()
    }

    /// Changes whenever the set of runtimes changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn get(&self, id: &str) -> Option<Arc<BackendRuntime>> {
        let map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).cloned()
    }

    /// Every backend's runtime (for the health tasks).
    pub fn all(&self) -> Vec<Arc<BackendRuntime>> {
        let map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    fn resolve(&self, address: &str) -> Option<SocketAddr> {
        let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cache.get(address) {
            return *a;
        }
        let addr = address.to_socket_addrs().ok().and_then(|mut it| {
            // Prefer IPv4: "localhost" often lists ::1 first while backends listen on 127.0.0.1.
            let all: Vec<SocketAddr> = it.by_ref().collect();
            all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
        });
        if addr.is_none() {
            tracing::warn!(address, "backend address does not resolve; backend skipped");
        }
        cache.insert(address.to_string(), addr);
        addr
    }

    /// Drops runtimes of backends that no longer exist.
    fn retain(&self, state: &State) {
        let mut map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|id, _| state.backends.contains_key(id));
        if map.len() != before {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Builds the table for `state`.
pub fn compile(state: &State, registry: &BackendRegistry) -> RoutingTable {
    registry.retain(state);
    let upstreams: HashMap<&str, Arc<Upstream>> = state
        .backends
        .values()
        .map(|b| {
            let u = Upstream {
                id: b.id.clone(),
                address: b.address.clone(),
                addr: registry.resolve(&b.address),
                draining: b.draining,
                runtime: registry.runtime(&b.id),
            };
            (b.id.as_str(), Arc::new(u))
        })
        .collect();
    let mut by_tag: HashMap<&str, Vec<Arc<Upstream>>> = HashMap::new();
    for b in state.backends.values() {
        for t in &b.tags {
            by_tag
                .entry(t.as_str())
                .or_default()
                .push(upstreams[b.id.as_str()].clone());
        }
    }
    let mut table = RoutingTable::default();
    for d in state.domains.values() {
        let route = Arc::new(Route {
            domain: d.domain.clone(),
            tag: d.enabled_backends_tag.clone(),
            http_to_https: d.http_to_https,
            upstreams: by_tag
                .get(d.enabled_backends_tag.as_str())
                .cloned()
                .unwrap_or_default(),
            next: AtomicUsize::new(0),
        });
        match d.domain.strip_prefix("*.") {
            Some(parent) => table.wildcard.insert(parent.to_string(), route),
            None => table.exact.insert(d.domain.clone(), route),
        };
    }
    table.challenges = state
        .acme
        .challenges
        .iter()
        .map(|(t, k)| (t.clone(), k.clone()))
        .collect();
    table
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
                    address: format!("127.0.0.1:{port}"),
                    tags: tags.into_iter().map(String::from).collect(),
                    health_check_path: None,
                    draining: false,
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
                    cert: None,
                },
            );
        }
        s
    }

    #[test]
    fn lookup_exact_and_wildcard() {
        let reg = BackendRegistry::default();
        let t = compile(&state(), &reg);
        assert_eq!(t.lookup("x.test").unwrap().tag, "a");
        assert_eq!(t.lookup("foo.wild.test").unwrap().tag, "b");
        assert!(t.lookup("wild.test").is_none());
        assert!(t.lookup("a.b.wild.test").is_none());
        assert!(t.lookup("nope.test").is_none());
    }

    #[test]
    fn round_robin_skips_tried_draining_and_unhealthy() {
        let reg = BackendRegistry::default();
        let mut s = state();
        let t = compile(&s, &reg);
        let r = t.lookup("x.test").unwrap();
        let first = r.pick(&[]).unwrap().upstream.id.clone();
        let second = r.pick(&[]).unwrap().upstream.id.clone();
        assert_ne!(first, second, "round robin alternates");
        let idx = r.pick(&[]).unwrap().index;
        let other = r.pick(&[idx]).unwrap().index;
        assert_ne!(idx, other);
        assert!(r.pick(&[0, 1]).is_none());
        assert!(t.lookup("empty.test").unwrap().pick(&[]).is_none());

        let t3 = crate::health::Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        reg.runtime("a1")
            .health
            .record_probe(false, "down".into(), t3);
        for _ in 0..4 {
            assert_eq!(r.pick(&[]).unwrap().upstream.id, "a2");
        }
        s.backends.get_mut("a2").unwrap().draining = true;
        let t = compile(&s, &reg);
        assert!(t.lookup("x.test").unwrap().pick(&[]).is_none());
    }

    #[test]
    fn runtimes_survive_recompile() {
        let reg = BackendRegistry::default();
        let s = state();
        let t1 = compile(&s, &reg);
        t1.lookup("x.test").unwrap().upstreams[0]
            .runtime
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        let t2 = compile(&s, &reg);
        assert_eq!(
            t2.lookup("x.test").unwrap().upstreams[0]
                .runtime
                .in_flight
                .load(Ordering::Relaxed),
            1
        );
    }
}

#[cfg(test)]
mod guard_rail_tests {
    use super::*;
    use crate::state::{Backend, Domain, TlsMode};

    #[test]
    fn peers_view_avoids_then_guard_rail_keeps_pool_alive() {
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
                cert: None,
            },
        );
        let reg = BackendRegistry::default();
        let t = compile(&s, &reg);
        let r = t.lookup("x.test").unwrap();
        // A peer reports a1 down: everyone avoids it.
        reg.runtime("a1").health.set_peers_down(vec![2]);
        for _ in 0..4 {
            let p = r.pick(&[]).unwrap();
            assert_eq!(p.upstream.id, "a2");
            assert!(!p.guard_rail);
        }
        // Peers report every backend down, but locally both work: fall back to local view.
        reg.runtime("a2").health.set_peers_down(vec![3]);
        let p = r.pick(&[]).unwrap();
        assert!(p.guard_rail);
        // Down locally as well: nothing to pick (503).
        let t1 = crate::health::Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        reg.runtime("a1").health.record_probe(false, "x".into(), t1);
        reg.runtime("a2").health.record_probe(false, "x".into(), t1);
        assert!(r.pick(&[]).is_none());
    }
}
