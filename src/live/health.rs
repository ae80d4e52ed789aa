//! One backend's health as atomics: this node's active-probe verdict, its passive circuit
//! breaker, and whether a live peer reports it down. The proxy reads them per request; the
//! health plane writes them.
//!
//! A backend is used when: this node's probes do not say it is down, its breaker lets requests
//! through, and no live peer reports it down. A node that does not probe the backend (the
//! probes are shared, `health::owners`) takes the verdict of its probers as its own view: down
//! when every other prober reports it down. If that leaves a pool empty while this node's own
//! view still has usable backends, the pool falls back to the local view (guard rail: one bad
//! observer cannot empty a pool).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::breaker::{self, Breaker};
use super::ejection::{Ejection, EjectionReport};

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

use crate::clock::unix_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveState {
    Unknown,
    Up,
    Down,
}

/// One node's verdict on a backend, as gossip carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Active probes fail, or the breaker is open (connect failures).
    Down,
    /// Passively ejected until this Unix time (ms).
    EjectedUntil(u64),
}

/// Thresholds from `[health_check]`.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub unhealthy: u32,
    pub healthy: u32,
}

#[derive(Debug, Default)]
pub struct BackendHealth {
    active: AtomicU8,
    consecutive_ok: AtomicU32,
    consecutive_fail: AtomicU32,
    last_check_unix_ms: AtomicU64,
    last_detail: Mutex<String>,
    /// Some live peer reports this backend down.
    peer_down: AtomicBool,
    /// False while this node leaves the active probes of this backend to other nodes.
    not_probed_here: AtomicBool,
    /// Every live prober of this backend other than this node reports it down (meaningful
    /// only when this node does not probe it).
    probers_down: AtomicBool,
    peers_down: Mutex<Vec<u64>>,
    pub breaker: Breaker,
    /// Passive ejection: this node's and its peers' (not cleared by probes).
    pub ejection: Ejection,
    pub checks_total: AtomicU64,
    pub checks_failed: AtomicU64,
}

/// Snapshot for the API.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// Whether this node runs the active probes of this backend (or leaves them to others).
    pub probed_here: bool,
    pub active: ActiveState,
    pub breaker: breaker::BreakerState,
    pub peers_reporting_down: Vec<u64>,
    /// A passive ejection in force (this node's or a peer's), `null` when none.
    pub ejection: Option<EjectionReport>,
    pub last_check_unix_ms: Option<u64>,
    pub last_check_detail: String,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub checks_total: u64,
    pub checks_failed: u64,
}

/// Whether an active state change changes what this node publishes (only "down" is).
fn changes_verdict(before: u8, after: u8) -> bool {
    (before == DOWN) != (after == DOWN)
}

impl BackendHealth {
    fn set_active(&self, state: u8, order: Ordering) {
        // Only "down" is published: unknown -> up (every backend's first probe) changes no
        // verdict, and signalling it made the exchange pass over all 100,000 backends every
        // tick while a first round of probes was spread over the interval.
        if changes_verdict(self.active.swap(state, order), state) {
            super::verdicts_changed();
        }
    }

    pub fn active(&self) -> ActiveState {
        match self.active.load(Ordering::Acquire) {
            UP => ActiveState::Up,
            DOWN => ActiveState::Down,
            _ => ActiveState::Unknown,
        }
    }

    /// This node's own view: not probed down (or, when other nodes probe it, not reported
    /// down by all of them), breaker closed or ready for a trial.
    pub fn locally_usable(&self, now_ms: u64) -> bool {
        self.usable_despite_ejection(now_ms) && !self.ejection.blocks_locally()
    }

    /// This node's own view with passive ejections set aside: what a pool falls back to when
    /// ejections would leave it empty (they never do: a backend that answers some requests
    /// badly beats a 503 for all).
    pub fn usable_despite_ejection(&self, now_ms: u64) -> bool {
        let down = if self.not_probed_here.load(Ordering::Acquire) {
            self.probers_down.load(Ordering::Acquire)
        } else {
            self.active.load(Ordering::Acquire) == DOWN
        };
        !down && self.breaker.allows(now_ms)
    }

    pub fn probed_here(&self) -> bool {
        !self.not_probed_here.load(Ordering::Acquire)
    }

    /// This node takes over the active probes of this backend. Returns true when it did not
    /// probe it before.
    pub fn start_probing(&self) -> bool {
        self.not_probed_here.swap(false, Ordering::AcqRel)
    }

    /// Other nodes probe this backend now: this node forgets its probe verdict (it would
    /// otherwise publish a stale "down" for ever) and keeps only its breaker.
    pub fn stop_probing(&self) {
        self.not_probed_here.store(true, Ordering::Release);
        self.forget_active();
    }

    /// Drops the active verdict (back to unknown) and the runs of results behind it.
    pub fn forget_active(&self) {
        self.set_active(UNKNOWN, Ordering::Release);
        self.consecutive_ok.store(0, Ordering::Relaxed);
        self.consecutive_fail.store(0, Ordering::Relaxed);
    }

    /// Whether every other live prober of this backend reports it down.
    pub fn set_probers_down(&self, down: bool) {
        self.probers_down.store(down, Ordering::Release);
    }

    /// The cluster's view: usable here and no live peer reports it down.
    pub fn merged_usable(&self, now_ms: u64) -> bool {
        !self.peer_down.load(Ordering::Acquire)
            && self.locally_usable(now_ms)
            && !self.ejection.blocks_by_peers()
    }

    /// What this node tells its peers at `now_unix_ms`: down, ejected until a deadline, or
    /// nothing.
    pub fn local_verdict(&self, now_unix_ms: u64) -> Option<Verdict> {
        if self.local_verdict_down() {
            Some(Verdict::Down)
        } else {
            self.ejection
                .own_until(now_unix_ms)
                .map(Verdict::EjectedUntil)
        }
    }

    /// Down when probes or the breaker say so.
    pub fn local_verdict_down(&self) -> bool {
        self.active.load(Ordering::Acquire) == DOWN
            || self.breaker.state() == breaker::BreakerState::Open
    }

    /// Records one probe result; returns the new state when it flipped.
    pub fn record_probe(&self, ok: bool, detail: String, t: Thresholds) -> Option<ActiveState> {
        self.checks_total.fetch_add(1, Ordering::Relaxed);
        self.last_check_unix_ms.store(unix_ms(), Ordering::Relaxed);
        *self.last_detail.lock().unwrap_or_else(|p| p.into_inner()) = detail;
        let current = self.active.load(Ordering::Acquire);
        if ok {
            self.consecutive_fail.store(0, Ordering::Relaxed);
            let n = self.consecutive_ok.fetch_add(1, Ordering::Relaxed) + 1;
            // A success also clears the breaker: the backend answers again.
            self.breaker.reset();
            if current != UP && (current == UNKNOWN || n >= t.healthy) {
                self.set_active(UP, Ordering::Release);
                return (current == DOWN).then_some(ActiveState::Up);
            }
        } else {
            self.checks_failed.fetch_add(1, Ordering::Relaxed);
            self.consecutive_ok.store(0, Ordering::Relaxed);
            let n = self.consecutive_fail.fetch_add(1, Ordering::Relaxed) + 1;
            if current != DOWN && n >= t.unhealthy {
                self.set_active(DOWN, Ordering::Release);
                return Some(ActiveState::Down);
            }
        }
        None
    }

    /// Takes over a "down" verdict this node reached before (in the process a graceful upgrade
    /// replaced): down until this node's own probes see the backend healthy again.
    pub fn assume_down(&self) {
        self.set_active(DOWN, Ordering::Release);
    }

    /// Some live peer reports this backend down.
    pub fn peer_down(&self) -> bool {
        self.peer_down.load(Ordering::Acquire)
    }

    pub fn set_peers_down(&self, peers: Vec<u64>) {
        self.peer_down.store(!peers.is_empty(), Ordering::Release);
        *self.peers_down.lock().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    pub fn report(&self) -> HealthReport {
        let last = self.last_check_unix_ms.load(Ordering::Relaxed);
        HealthReport {
            probed_here: self.probed_here(),
            active: self.active(),
            breaker: self.breaker.state(),
            peers_reporting_down: self
                .peers_down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            ejection: self.ejection.report(crate::clock::coarse_unix_ms()),
            last_check_unix_ms: (last > 0).then_some(last),
            last_check_detail: self
                .last_detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            consecutive_failures: self.consecutive_fail.load(Ordering::Relaxed),
            consecutive_successes: self.consecutive_ok.load(Ordering::Relaxed),
            checks_total: self.checks_total.load(Ordering::Relaxed),
            checks_failed: self.checks_failed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        unhealthy: 3,
        healthy: 2,
    };

    #[test]
    fn thresholds() {
        let h = BackendHealth::default();
        assert_eq!(h.active(), ActiveState::Unknown);
        assert!(h.locally_usable(0));
        assert_eq!(h.record_probe(false, "x".into(), T), None);
        assert_eq!(h.record_probe(false, "x".into(), T), None);
        assert!(h.locally_usable(0));
        assert_eq!(
            h.record_probe(false, "x".into(), T),
            Some(ActiveState::Down)
        );
        assert!(!h.locally_usable(0));
        assert!(h.local_verdict_down());
        assert_eq!(h.record_probe(true, "ok".into(), T), None);
        assert!(
            !h.locally_usable(0),
            "one success is not enough to come back"
        );
        assert_eq!(h.record_probe(true, "ok".into(), T), Some(ActiveState::Up));
        assert!(h.locally_usable(0));
        assert_eq!(h.report().checks_total, 5);
    }

    #[test]
    fn first_success_from_unknown_is_up() {
        let h = BackendHealth::default();
        assert_eq!(h.record_probe(true, "ok".into(), T), None);
        assert_eq!(h.active(), ActiveState::Up);
    }

    #[test]
    fn a_node_that_does_not_probe_takes_its_probers_verdict() {
        let h = BackendHealth::default();
        assert!(h.probed_here(), "a lone node probes everything");
        assert_eq!(h.record_probe(false, "x".into(), T), None);
        assert_eq!(h.record_probe(false, "x".into(), T), None, "two failures");
        h.stop_probing();
        assert!(!h.probed_here());
        assert_eq!(h.active(), ActiveState::Unknown, "the verdict is forgotten");
        assert!(!h.local_verdict_down(), "nothing stale is published");
        assert!(h.locally_usable(0));
        h.set_peers_down(vec![2]);
        assert!(
            h.locally_usable(0),
            "one prober of two says down: its own view stays usable (guard rail)"
        );
        assert!(!h.merged_usable(0));
        h.set_probers_down(true);
        assert!(!h.locally_usable(0), "every prober says down");
        assert!(!h.local_verdict_down(), "still not this node's observation");
        assert!(h.start_probing(), "taking the probes over");
        assert!(!h.start_probing());
        assert!(
            h.locally_usable(0),
            "a prober routes on its own probes, not on probers_down"
        );
        assert_eq!(
            h.record_probe(false, "x".into(), T),
            None,
            "the runs start again: one failure"
        );
    }

    #[test]
    fn every_change_of_a_verdict_input_is_signalled_to_the_health_exchange() {
        use crate::live::breaker::Failure;
        use crate::live::verdict_epoch;
        let h = BackendHealth::default();
        let bumped = |what: &str, f: &dyn Fn()| {
            let before = verdict_epoch();
            f();
            assert!(verdict_epoch() > before, "{what} was not signalled");
        };
        bumped("probes say down", &|| {
            for _ in 0..3 {
                h.record_probe(false, "x".into(), T);
            }
        });
        bumped("probes say up", &|| {
            for _ in 0..2 {
                h.record_probe(true, "ok".into(), T);
            }
        });
        bumped("breaker opens", &|| {
            h.breaker.record_failure(Failure::Connect, 0);
        });
        bumped("breaker half-open", &|| h.breaker.on_pick(u64::MAX / 2));
        bumped("breaker closes", &|| h.breaker.record_success());
        bumped("ejected", &|| {
            h.ejection
                .eject(1_000, crate::live::ejection::Policy::default());
        });
        bumped("a peer's ejection", &|| {
            h.ejection
                .set_peers(vec![crate::live::ejection::PeerEjection {
                    node_id: 2,
                    until_unix_ms: 5_000,
                }])
        });
        bumped("assumed down", &|| h.assume_down());
        bumped("verdict forgotten", &|| h.forget_active());
        // What changes no verdict is not signalled: a first probe success (unknown -> up).
        // (A table, not the epoch: other tests bump the global epoch meanwhile.)
        for (before, after, signalled) in [
            (UNKNOWN, UP, false),
            (UP, UNKNOWN, false),
            (UP, UP, false),
            (UNKNOWN, DOWN, true),
            (UP, DOWN, true),
            (DOWN, UP, true),
            (DOWN, UNKNOWN, true),
            (DOWN, DOWN, false),
        ] {
            assert_eq!(
                changes_verdict(before, after),
                signalled,
                "{before} -> {after}"
            );
        }
    }

    #[test]
    fn peers_down_only_affects_merged_view() {
        let h = BackendHealth::default();
        h.set_peers_down(vec![2]);
        assert!(h.locally_usable(0));
        assert!(!h.merged_usable(0));
        assert!(
            !h.local_verdict_down(),
            "we only publish our own observations"
        );
        h.set_peers_down(vec![]);
        assert!(h.merged_usable(0));
    }
}
