//! One backend's health as atomics: this node's active-probe verdict, its passive circuit
//! breaker, and whether a live peer reports it down. The proxy reads them per request; the
//! health plane writes them.
//!
//! A backend is used when: this node's probes do not say it is down, its breaker lets requests
//! through, and no live peer reports it down. If that leaves a pool empty while this node's own
//! view still has usable backends, the pool falls back to the local view (guard rail: one bad
//! observer cannot empty a pool).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::breaker::{self, Breaker};

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
    peers_down: Mutex<Vec<u64>>,
    pub breaker: Breaker,
    pub checks_total: AtomicU64,
    pub checks_failed: AtomicU64,
}

/// Snapshot for the API.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub active: ActiveState,
    pub breaker: breaker::BreakerState,
    pub peers_reporting_down: Vec<u64>,
    pub last_check_unix_ms: Option<u64>,
    pub last_check_detail: String,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub checks_total: u64,
    pub checks_failed: u64,
}

impl BackendHealth {
    pub fn active(&self) -> ActiveState {
        match self.active.load(Ordering::Acquire) {
            UP => ActiveState::Up,
            DOWN => ActiveState::Down,
            _ => ActiveState::Unknown,
        }
    }

    /// This node's own view: not probed down, breaker closed or ready for a trial.
    pub fn locally_usable(&self, now_ms: u64) -> bool {
        self.active.load(Ordering::Acquire) != DOWN && self.breaker.allows(now_ms)
    }

    /// The cluster's view: usable here and no live peer reports it down.
    pub fn merged_usable(&self, now_ms: u64) -> bool {
        !self.peer_down.load(Ordering::Acquire) && self.locally_usable(now_ms)
    }

    /// What this node tells its peers: down when probes or the breaker say so.
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
                self.active.store(UP, Ordering::Release);
                return (current == DOWN).then_some(ActiveState::Up);
            }
        } else {
            self.checks_failed.fetch_add(1, Ordering::Relaxed);
            self.consecutive_ok.store(0, Ordering::Relaxed);
            let n = self.consecutive_fail.fetch_add(1, Ordering::Relaxed) + 1;
            if current != DOWN && n >= t.unhealthy {
                self.active.store(DOWN, Ordering::Release);
                return Some(ActiveState::Down);
            }
        }
        None
    }

    /// Takes over a "down" verdict this node reached before (in the process a graceful upgrade
    /// replaced): down until this node's own probes see the backend healthy again.
    pub fn assume_down(&self) {
        self.active.store(DOWN, Ordering::Release);
    }

    pub fn set_peers_down(&self, peers: Vec<u64>) {
        self.peer_down.store(!peers.is_empty(), Ordering::Release);
        *self.peers_down.lock().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    pub fn report(&self) -> HealthReport {
        let last = self.last_check_unix_ms.load(Ordering::Relaxed);
        HealthReport {
            active: self.active(),
            breaker: self.breaker.state(),
            peers_reporting_down: self
                .peers_down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
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
