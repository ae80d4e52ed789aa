//! Live backend state, shared by the data plane (`proxy`) and the health plane (`health`):
//! per-backend runtimes (in-flight and request counters, health atomics, the circuit
//! breaker), the addresses backend names resolve to, and the peer-view gate. Both planes
//! depend on this module and never on each other; it depends on neither.
//!
//! The proxy reads atomics and immutable snapshots here; only the control plane writes the
//! registry's maps (when a table is compiled, or a name resolves), never the request path.

pub mod addrs;
pub mod breaker;
pub mod ejection;
pub mod gate;
pub mod health;

use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::observability::traffic::{Kind, Series};
use addrs::AddressBook;
use gate::PeerViewGate;
use health::BackendHealth;

/// Bumped whenever an input of this node's health verdicts changes (a probe verdict, a
/// breaker state, an ejection, peers' ejections), so the health exchange passes over every
/// backend only when something changed (and every 15 s anyway), not ten times a second:
/// at 100,000 backends that pass was most of an idle node's CPU.
static VERDICT_EPOCH: AtomicU64 = AtomicU64::new(0);

pub fn verdicts_changed() {
    VERDICT_EPOCH.fetch_add(1, Ordering::Release);
}

pub fn verdict_epoch() -> u64 {
    VERDICT_EPOCH.load(Ordering::Acquire)
}

/// Bumped when the data plane asks for an immediate probe of a backend
/// ([`BackendRuntime::ask_probe`]); the prober looks for the asking backends only then.
static PROBES_ASKED: AtomicU64 = AtomicU64::new(0);

pub fn probes_asked() -> u64 {
    PROBES_ASKED.load(Ordering::Acquire)
}

/// Milliseconds on a coarse monotonic clock, for breaker deadlines (see `clock`).
pub fn now_ms() -> u64 {
    crate::clock::coarse_monotonic_ms()
}

/// Everything live about the backends of this node.
#[derive(Default)]
pub struct Live {
    pub backends: BackendRegistry,
    /// What backend names resolve to (filled by the control plane's resolver).
    pub addrs: AddressBook,
    /// Open once peers' health verdicts are known (see `health::shared`).
    pub peer_view: PeerViewGate,
}

/// Live counters and health of one backend. Survives table recompiles (looked up by id), so
/// in-flight counts stay right across config changes.
#[derive(Debug)]
pub struct BackendRuntime {
    pub id: String,
    pub in_flight: AtomicI64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub health: BackendHealth,
    /// Set by the data plane when a request saw something a probe should confirm at once (a
    /// failed TLS handshake); cleared by the prober when it takes the request.
    probe_asked: AtomicBool,
    /// Its answers and their durations (`observability::traffic`, bounded series).
    pub traffic: Series,
}

impl BackendRuntime {
    /// A runtime not in any registry (what the API shows for a backend no table has
    /// compiled yet: nothing counted, health unknown).
    pub fn detached(id: &str) -> Self {
        Self {
            id: id.to_string(),
            in_flight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            health: BackendHealth::default(),
            probe_asked: AtomicBool::new(false),
            traffic: Series::new(Kind::Backend),
        }
    }

    /// Asks the prober for a probe of this backend now. True when this call asked (not
    /// already pending): the caller logs then, once per probe rather than per request.
    pub fn ask_probe(&self) -> bool {
        let asked = !self.probe_asked.swap(true, Ordering::AcqRel);
        if asked {
            PROBES_ASKED.fetch_add(1, Ordering::Release);
        }
        asked
    }

    /// Takes a pending probe request (the prober).
    pub fn take_probe_request(&self) -> bool {
        self.probe_asked.swap(false, Ordering::AcqRel)
    }
}

/// Keeps per-backend runtimes between compiles. Entries are created only when a routing
/// table is compiled ([`BackendRegistry::ensure`]); readers (API, probes, gossip) only look up.
#[derive(Default)]
pub struct BackendRegistry {
    runtimes: Mutex<HashMap<String, Arc<BackendRuntime>>>,
    /// Bumped whenever a runtime is added or dropped, so periodic tasks can skip full passes.
    generation: AtomicU64,
}

impl BackendRegistry {
    /// The runtime of `id`, created if missing. For table compiles only.
    pub fn ensure(&self, id: &str) -> Arc<BackendRuntime> {
        let mut map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_string())
            .or_insert_with(|| {
                self.generation.fetch_add(1, Ordering::Relaxed);
                Arc::new(BackendRuntime::detached(id))
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

    /// Runs `f` on every runtime, under the registry's lock and without copying the list (the
    /// health exchange looks at every backend ten times a second).
    pub fn for_each(&self, mut f: impl FnMut(&BackendRuntime)) {
        let map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        for rt in map.values() {
            f(rt);
        }
    }

    /// Drops runtimes of backends for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|id, _| keep(id));
        if map.len() != before {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The ids of the runtimes for which `f` holds, in one pass under the lock (for the API's
    /// `healthy` filter: a set of the few down backends, not a lookup per backend).
    pub fn ids_where(&self, f: impl Fn(&BackendRuntime) -> bool) -> HashSet<String> {
        let map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(_, rt)| f(rt))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Drops the runtime of a removed backend.
    pub fn remove(&self, id: &str) {
        let mut map = self.runtimes.lock().unwrap_or_else(|p| p.into_inner());
        if map.remove(id).is_some() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn len(&self) -> usize {
        self.runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts one request on the backend of its current attempt, for as long as it lives (drain
/// and stats read the count). `R` is a reference on the HTTP/1.1 path (no reference-count
/// traffic) and an `Arc` where the request context must own it.
pub struct InFlight<R: Deref<Target = BackendRuntime>>(Option<R>);

impl<R: Deref<Target = BackendRuntime>> Default for InFlight<R> {
    fn default() -> Self {
        Self(None)
    }
}

impl<R: Deref<Target = BackendRuntime>> InFlight<R> {
    /// Moves the count to `backend` (a new attempt), counting one more request on it.
    pub fn set(&mut self, backend: R) {
        self.clear();
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.requests.fetch_add(1, Ordering::Relaxed);
        self.0 = Some(backend);
    }

    pub fn clear(&mut self) {
        if let Some(b) = self.0.take() {
            b.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<R: Deref<Target = BackendRuntime>> Drop for InFlight<R> {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_never_create_entries() {
        let reg = BackendRegistry::default();
        assert!(reg.get("a").is_none());
        assert!(reg.all().is_empty());
        let g = reg.generation();
        let a = reg.ensure("a");
        assert_ne!(reg.generation(), g, "a new runtime bumps the generation");
        assert!(Arc::ptr_eq(&a, &reg.get("a").expect("created by ensure")));
        reg.retain(|id| id != "a");
        assert!(reg.get("a").is_none());
    }

    #[test]
    fn in_flight_moves_with_the_attempt_and_ends_with_the_guard() {
        let (a, b) = (BackendRuntime::detached("a"), BackendRuntime::detached("b"));
        {
            let mut g = InFlight::default();
            g.set(&a);
            assert_eq!(a.in_flight.load(Ordering::Relaxed), 1);
            g.set(&b);
            assert_eq!(a.in_flight.load(Ordering::Relaxed), 0);
            assert_eq!(b.in_flight.load(Ordering::Relaxed), 1);
        }
        assert_eq!(b.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(a.requests.load(Ordering::Relaxed), 1);
        assert_eq!(b.requests.load(Ordering::Relaxed), 1);
    }
}
