//! Passive ejection (outlier detection): a backend that answers real traffic with a run of
//! 5xx or timeouts is taken out of rotation for a set time, as nginx's `max_fails` /
//! `fail_timeout`, Envoy's outlier detection and Caddy's `fail_duration` do. A passing active
//! probe does not end it (a probe is not real traffic: a half-broken backend passes its
//! `/health` and fails users). Each repeat ejection lasts twice as long as the one before, up
//! to a cap; a backend that stayed in for a whole cap starts again from the base time.
//!
//! The ejecting node publishes "ejected until T" through gossip (`health::shared`), so every
//! node keeps the backend out until the same moment. A cap on the share of each pool that
//! passive verdicts may eject (`health::shared` computes it) waives the excess: ejection must
//! not empty a pool that still answers most requests.
//!
//! Times are Unix milliseconds (coarse clock): nodes compare each other's deadlines.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::clock::coarse_unix_ms;

/// `[health_check] passive_ejection_secs`, `passive_ejection_max_secs` and
/// `passive_max_ejected_percent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub base_ms: u64,
    pub max_ms: u64,
    pub max_ejected_percent: u8,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            base_ms: 30_000,
            max_ms: 300_000,
            max_ejected_percent: 50,
        }
    }
}

impl Policy {
    /// How many of a pool of `n` backends passive verdicts may hold out at once.
    pub fn max_ejected(&self, n: usize) -> usize {
        n * usize::from(self.max_ejected_percent.min(100)) / 100
    }
}

/// The process's policy: set once from the config at start, read where the proxy records an
/// outcome (which has only the backend's runtime at hand).
static BASE_MS: AtomicU64 = AtomicU64::new(30_000);
static MAX_MS: AtomicU64 = AtomicU64::new(300_000);
static MAX_PERCENT: AtomicU32 = AtomicU32::new(50);

pub fn configure(p: Policy) {
    BASE_MS.store(p.base_ms, Ordering::Relaxed);
    MAX_MS.store(p.max_ms.max(p.base_ms), Ordering::Relaxed);
    MAX_PERCENT.store(u32::from(p.max_ejected_percent.min(100)), Ordering::Relaxed);
}

pub fn policy() -> Policy {
    Policy {
        base_ms: BASE_MS.load(Ordering::Relaxed),
        max_ms: MAX_MS.load(Ordering::Relaxed),
        max_ejected_percent: MAX_PERCENT.load(Ordering::Relaxed) as u8,
    }
}

/// What ended a backend's turn in rotation.
pub const REASON: &str = "consecutive 5xx answers or timeouts from real traffic";

/// One backend's ejection state: its own (this node's) and its peers'.
#[derive(Debug, Default)]
pub struct Ejection {
    since_ms: AtomicU64,
    until_ms: AtomicU64,
    /// Ejections in a row (each doubles the time); 0 after a cap's time without one.
    count: AtomicU32,
    /// The latest deadline a live peer reports (0: none).
    peer_until_ms: AtomicU64,
    peers: Mutex<Vec<PeerEjection>>,
    /// The pool cap lets this backend serve although it is ejected.
    waived: AtomicBool,
}

/// A peer's report, for the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PeerEjection {
    pub node_id: u64,
    pub until_unix_ms: u64,
}

/// What the API shows of an ejection in force.
#[derive(Debug, Clone, Serialize)]
pub struct EjectionReport {
    pub reason: &'static str,
    /// This node's own ejection (`None` when only peers report one).
    pub since_unix_ms: Option<u64>,
    pub until_unix_ms: u64,
    /// Ejections in a row on this node (each lasts twice as long as the one before).
    pub ejections_in_a_row: u32,
    pub reported_by_peers: Vec<PeerEjection>,
    /// The pool cap (`passive_max_ejected_percent`) keeps this backend serving anyway.
    pub waived_by_pool_cap: bool,
}

impl Ejection {
    /// Ejects the backend now; returns the deadline. An ejection in force is not extended.
    pub fn eject(&self, now: u64, p: Policy) -> u64 {
        let until = self.until_ms.load(Ordering::Acquire);
        if until > now {
            return until;
        }
        // A backend that stayed in for a whole cap's time starts again from the base time.
        let count = if until > 0 && now.saturating_sub(until) >= p.max_ms {
            1
        } else {
            self.count.load(Ordering::Relaxed).saturating_add(1)
        };
        let shift = count.saturating_sub(1).min(20);
        let duration = p
            .base_ms
            .saturating_mul(1 << shift)
            .min(p.max_ms.max(p.base_ms));
        let until = now.saturating_add(duration);
        self.count.store(count, Ordering::Relaxed);
        self.since_ms.store(now, Ordering::Relaxed);
        self.until_ms.store(until, Ordering::Release);
        super::verdicts_changed();
        until
    }

    /// This node's ejection deadline, if one is in force at `now`.
    pub fn own_until(&self, now: u64) -> Option<u64> {
        let until = self.until_ms.load(Ordering::Acquire);
        (until > now).then_some(until)
    }

    /// The latest deadline of this node's or a peer's ejection in force at `now`.
    pub fn any_until(&self, now: u64) -> Option<u64> {
        let until = self
            .until_ms
            .load(Ordering::Acquire)
            .max(self.peer_until_ms.load(Ordering::Acquire));
        (until > now).then_some(until)
    }

    /// Hot path: this node's own ejection keeps the backend out (and the cap does not waive it).
    pub fn blocks_locally(&self) -> bool {
        let until = self.until_ms.load(Ordering::Acquire);
        until != 0 && until > coarse_unix_ms() && !self.waived.load(Ordering::Acquire)
    }

    /// Hot path: a peer's ejection keeps the backend out (and the cap does not waive it).
    pub fn blocks_by_peers(&self) -> bool {
        let until = self.peer_until_ms.load(Ordering::Acquire);
        until != 0 && until > coarse_unix_ms() && !self.waived.load(Ordering::Acquire)
    }

    pub fn set_peers(&self, peers: Vec<PeerEjection>) {
        let latest = peers.iter().map(|p| p.until_unix_ms).max().unwrap_or(0);
        if self.peer_until_ms.swap(latest, Ordering::AcqRel) != latest {
            super::verdicts_changed();
        }
        *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    pub fn set_waived(&self, waived: bool) {
        self.waived.store(waived, Ordering::Release);
    }

    pub fn waived(&self) -> bool {
        self.waived.load(Ordering::Acquire)
    }

    pub fn report(&self, now: u64) -> Option<EjectionReport> {
        let until = self.any_until(now)?;
        let own = self.own_until(now);
        Some(EjectionReport {
            reason: REASON,
            since_unix_ms: own.map(|_| self.since_ms.load(Ordering::Relaxed)),
            until_unix_ms: until,
            ejections_in_a_row: if own.is_some() {
                self.count.load(Ordering::Relaxed)
            } else {
                0
            },
            reported_by_peers: self
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .filter(|p| p.until_unix_ms > now)
                .collect(),
            waived_by_pool_cap: self.waived(),
        })
    }
}

/// Which of the ejected backends the pool cap lets back in. `until` holds each backend's
/// ejection deadline in force (0: none); `pools` lists each pool's members as indexes into it.
/// In each pool at most `p.max_ejected(len)` stay out; the others are waived, latest deadline
/// first (about the ones ejected last: the cap refuses them, as Envoy refuses an ejection over
/// its cap). Ties go by index, so every node that knows the same deadlines agrees.
pub fn waivers(until: &[u64], pools: &[Vec<usize>], p: Policy) -> Vec<bool> {
    let mut waived = vec![false; until.len()];
    for pool in pools {
        let mut ejected: Vec<usize> = pool.iter().copied().filter(|i| until[*i] > 0).collect();
        let allowed = p.max_ejected(pool.len());
        if ejected.len() <= allowed {
            continue;
        }
        ejected.sort_by_key(|i| (until[*i], *i));
        for i in &ejected[allowed..] {
            waived[*i] = true;
        }
    }
    waived
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        base_ms: 1_000,
        max_ms: 8_000,
        max_ejected_percent: 50,
    };

    #[test]
    fn repeat_ejections_double_up_to_the_cap_and_reset_after_a_cap_without_one() {
        let e = Ejection::default();
        let mut now = 10_000;
        // (time the backend stayed in before failing again, expected duration)
        for (gap, want) in [
            (0, 1_000),
            (10, 2_000),
            (10, 4_000),
            (10, 8_000),
            (10, 8_000),
            (8_000, 1_000),
            (7_999, 2_000),
        ] {
            now = e.own_until(0).unwrap_or(now) + gap;
            let until = e.eject(now, P);
            assert_eq!(until - now, want, "after {gap} ms back in");
            assert_eq!(e.own_until(now), Some(until));
            assert_eq!(e.own_until(until), None, "over at its deadline");
        }
    }

    #[test]
    fn an_ejection_in_force_is_not_extended() {
        let e = Ejection::default();
        let until = e.eject(0, P);
        assert_eq!(e.eject(500, P), until);
        assert_eq!(e.count.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn peers_reports_count_until_their_latest_deadline() {
        let e = Ejection::default();
        assert_eq!(e.any_until(0), None);
        e.set_peers(vec![
            PeerEjection {
                node_id: 2,
                until_unix_ms: 5_000,
            },
            PeerEjection {
                node_id: 3,
                until_unix_ms: 7_000,
            },
        ]);
        assert_eq!(e.any_until(6_000), Some(7_000));
        let r = e.report(6_000).unwrap();
        assert_eq!(r.since_unix_ms, None, "not this node's own");
        assert_eq!(r.reported_by_peers.len(), 1, "node 2's is over: {r:?}");
        assert_eq!(e.any_until(7_000), None);
        assert!(e.report(7_000).is_none());
    }

    #[test]
    fn the_pool_cap_waives_the_latest_ejections_over_it() {
        // (deadlines, pools, percent, expected waivers)
        type Case<'a> = (&'a [u64], &'a [&'a [usize]], u8, &'a [bool]);
        let cases: &[Case] = &[
            // A lone backend: 50 % of 1 is 0, never ejected.
            (&[5], &[&[0]], 50, &[true]),
            // Two backends: one may be out.
            (&[5, 0], &[&[0, 1]], 50, &[false, false]),
            (&[5, 6], &[&[0, 1]], 50, &[false, true]),
            (&[6, 5], &[&[0, 1]], 50, &[true, false]),
            // Equal deadlines: the higher index is waived.
            (&[5, 5], &[&[0, 1]], 50, &[false, true]),
            // 100 %: everything may be ejected.
            (&[5, 6], &[&[0, 1]], 100, &[false, false]),
            // 0 %: nothing may be.
            (&[5, 0, 0], &[&[0, 1, 2]], 0, &[true, false, false]),
            // A backend in two pools is waived if either pool is over its cap.
            (
                &[5, 6, 0, 0],
                &[&[0, 1], &[1, 2, 3]],
                50,
                &[false, true, false, false],
            ),
            (
                &[5, 6, 0, 0],
                &[&[0, 1, 2, 3], &[1]],
                50,
                &[false, true, false, false],
            ),
        ];
        for (until, pools, percent, want) in cases {
            let pools: Vec<Vec<usize>> = pools.iter().map(|p| p.to_vec()).collect();
            let p = Policy {
                max_ejected_percent: *percent,
                ..P
            };
            assert_eq!(
                waivers(until, &pools, p),
                want.to_vec(),
                "deadlines {until:?}, pools {pools:?}, {percent} %"
            );
        }
    }
}
