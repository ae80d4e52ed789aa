//! The routing table: an immutable snapshot compiled from the replicated state and read by
//! the data plane without locks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::live::{now_ms, BackendRuntime, Live};
use crate::proxy_protocol::Version;
use crate::schema::SendProxyProtocol;
use crate::state::State;

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

    fn usable(&self, now: u64, merged: bool) -> bool {
        !self.draining
            && !self.addrs.is_empty()
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
    /// The pool of the domain's active tag, shared by every domain on that tag: 100,000
    /// domains on one pool of 100,000 backends is one list, not 10^10 pointers.
    pub upstreams: Arc<[Arc<Upstream>]>,
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

/// Builds the table for `state`.
pub fn compile(state: &State, live: &Live) -> RoutingTable {
    live.backends.retain(|id| state.backends.contains_key(id));
    let upstreams: HashMap<&str, Arc<Upstream>> = state
        .backends
        .values()
        .map(|b| {
            let u = Upstream {
                id: b.id.to_string(),
                addrs: live.addrs.addrs_for(&b.address).into(),
                next_addr: AtomicUsize::new(0),
                draining: b.draining,
                runtime: live.backends.ensure(&b.id),
                send_proxy: b.send_proxy_protocol.map(|v| match v {
                    SendProxyProtocol::V1 => Version::V1,
                    SendProxyProtocol::V2 => Version::V2,
                }),
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
    let pools: HashMap<&str, Arc<[Arc<Upstream>]>> = by_tag
        .into_iter()
        .map(|(tag, list)| (tag, Arc::from(list)))
        .collect();
    let no_pool: Arc<[Arc<Upstream>]> = Arc::from(Vec::new());
    let mut table = RoutingTable::default();
    for d in state.domains.values() {
        let route = Arc::new(Route {
            domain: d.domain.to_string(),
            tag: d.enabled_backends_tag.to_string(),
            http_to_https: d.http_to_https,
            upstreams: pools
                .get(d.enabled_backends_tag.as_str())
                .unwrap_or(&no_pool)
                .clone(),
            next: AtomicUsize::new(0),
        });
        match d.domain.strip_prefix("*.") {
            Some(parent) => table.wildcard.insert(parent.to_string(), route),
            None => table.exact.insert(d.domain.to_string(), route),
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
                    address: format!("127.0.0.1:{port}").as_str().into(),
                    tags: tags.into_iter().map(Into::into).collect(),
                    health_check_path: None,
                    draining: false,
                    send_proxy_protocol: None,
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
                    send_proxy_protocol: None,
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
}
