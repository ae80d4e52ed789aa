//! Passive health: a lock-free circuit breaker per backend, fed by the proxy's own outcomes.
//!
//! closed --(connect failure)--> open
//! open --(backoff elapsed; the next request is the trial)--> half-open
//! half-open --success--> closed; --failure--> open with doubled backoff (capped).
//!
//! A run of `SOFT_FAILURE_THRESHOLD` 5xx answers or timeouts does not open the breaker: it
//! asks for a passive ejection (`ejection`), which lasts a set time that probes do not cut
//! short. A backend that cannot be reached is another matter: a passing probe proves it is
//! back, so the breaker may close on it.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

pub const BASE_BACKOFF_MS: u64 = 1_000;
pub const MAX_BACKOFF_MS: u64 = 30_000;
/// A half-open trial that never reports back (client gone) frees the slot after this.
const TRIAL_TIMEOUT_MS: u64 = 5_000;
/// Consecutive soft failures (5xx, timeouts) that open the breaker.
pub const SOFT_FAILURE_THRESHOLD: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// What a recorded failure set off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tripped {
    Nothing,
    /// The breaker opened (a failed connect, or a failed trial).
    Opened,
    /// A run of soft failures: eject the backend (`ejection`).
    Eject,
}

/// What went wrong with a request to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect: the backend is not there. Opens at once.
    Connect,
    /// Timeout or 5xx: the backend is there but struggling. Opens after a few in a row.
    Soft,
}

#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    /// Open: when the next trial may go. Half-open: when a lost trial is given up.
    until_ms: AtomicU64,
    backoff_ms: AtomicU64,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            until_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(BASE_BACKOFF_MS),
        }
    }
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// May a request be sent now? (Does not claim the trial; see `on_pick`.)
    pub fn allows(&self, now_ms: u64) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            _ => now_ms >= self.until_ms.load(Ordering::Acquire),
        }
    }

    /// Called when the proxy picked this backend: an elapsed open breaker becomes half-open
    /// and this request is its trial.
    pub fn on_pick(&self, now_ms: u64) {
        let s = self.state.load(Ordering::Acquire);
        if s != CLOSED && now_ms >= self.until_ms.load(Ordering::Acquire) {
            if s != HALF_OPEN {
                super::verdicts_changed();
            }
            self.state.store(HALF_OPEN, Ordering::Release);
            self.until_ms
                .store(now_ms + TRIAL_TIMEOUT_MS, Ordering::Release);
        }
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.state.load(Ordering::Acquire) != CLOSED {
            self.backoff_ms.store(BASE_BACKOFF_MS, Ordering::Relaxed);
            self.state.store(CLOSED, Ordering::Release);
            super::verdicts_changed();
        }
    }

    /// Records a failure; says whether it opened the breaker or calls for an ejection.
    pub fn record_failure(&self, kind: Failure, now_ms: u64) -> Tripped {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let state = self.state.load(Ordering::Acquire);
        let backoff = match state {
            HALF_OPEN => (self.backoff_ms.load(Ordering::Relaxed) * 2).min(MAX_BACKOFF_MS),
            OPEN => return Tripped::Nothing,
            _ if kind == Failure::Connect => BASE_BACKOFF_MS,
            _ if failures >= SOFT_FAILURE_THRESHOLD => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                return Tripped::Eject;
            }
            _ => return Tripped::Nothing,
        };
        self.backoff_ms.store(backoff, Ordering::Relaxed);
        self.until_ms.store(now_ms + backoff, Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
        super::verdicts_changed();
        Tripped::Opened
    }

    /// An active probe succeeded: the backend is back, no need to wait out the backoff.
    pub fn reset(&self) {
        self.record_success();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_failure_opens_then_half_open_then_closes() {
        let b = Breaker::default();
        assert!(b.allows(0));
        assert_eq!(b.record_failure(Failure::Connect, 100), Tripped::Opened);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allows(500));
        assert!(b.allows(100 + BASE_BACKOFF_MS));
        b.on_pick(100 + BASE_BACKOFF_MS);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Only one trial at a time.
        assert!(!b.allows(100 + BASE_BACKOFF_MS + 1));
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allows(0));
    }

    #[test]
    fn failed_trial_doubles_backoff_up_to_cap() {
        let b = Breaker::default();
        b.record_failure(Failure::Connect, 0);
        let mut now = 0;
        let mut expected = BASE_BACKOFF_MS;
        for _ in 0..10 {
            now += expected;
            b.on_pick(now);
            assert_eq!(b.record_failure(Failure::Connect, now), Tripped::Opened);
            expected = (expected * 2).min(MAX_BACKOFF_MS);
            assert!(!b.allows(now + expected - 1));
            assert!(b.allows(now + expected));
        }
        assert_eq!(expected, MAX_BACKOFF_MS);
    }

    #[test]
    fn a_streak_of_soft_failures_asks_for_an_ejection_and_leaves_the_breaker_closed() {
        let b = Breaker::default();
        assert_eq!(b.record_failure(Failure::Soft, 0), Tripped::Nothing);
        assert_eq!(b.record_failure(Failure::Soft, 0), Tripped::Nothing);
        b.record_success();
        assert_eq!(b.record_failure(Failure::Soft, 0), Tripped::Nothing);
        assert_eq!(b.record_failure(Failure::Soft, 0), Tripped::Nothing);
        assert_eq!(b.record_failure(Failure::Soft, 0), Tripped::Eject);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(
            b.record_failure(Failure::Soft, 0),
            Tripped::Nothing,
            "the streak starts again"
        );
    }

    #[test]
    fn lost_trial_frees_the_slot() {
        let b = Breaker::default();
        b.record_failure(Failure::Connect, 0);
        b.on_pick(BASE_BACKOFF_MS);
        assert!(!b.allows(BASE_BACKOFF_MS + 1));
        assert!(b.allows(BASE_BACKOFF_MS + TRIAL_TIMEOUT_MS));
    }
}
