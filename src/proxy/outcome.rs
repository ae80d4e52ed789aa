//! Classification of what happened on one backend, once for both request paths: what a
//! failure tells the backend's breaker and counters, whether the request may go to another
//! backend, and which answer the client gets when it does not.

use super::answers;
use super::table::Route;
use crate::clock::coarse_unix_ms;
use crate::live::breaker::{self, Failure, Tripped};
use crate::live::{ejection, now_ms, BackendRuntime};
use crate::observability::Metrics;
use crate::upstream_tls::HandshakeFailure;

/// How an attempt on one backend failed (the client's own failures are not here: they are
/// nobody's fault and get no answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// No connection (refused, unreachable, connect timeout, TLS handshake).
    Connect,
    /// The backend's name has no address yet: not the backend's fault.
    NoAddress,
    /// No answer within the read (or write) timeout.
    Timeout,
    /// Failed before answering; the label names how (Pingora's error names).
    Upstream(&'static str),
    /// Connected, but the TLS handshake failed (or TLS to it could not be set up).
    Tls(HandshakeFailure),
}

impl AttemptFailure {
    /// What the backend's circuit breaker learns from it.
    pub fn breaker(self) -> Option<Failure> {
        match self {
            AttemptFailure::Connect | AttemptFailure::Tls(_) => Some(Failure::Connect),
            AttemptFailure::NoAddress => None,
            AttemptFailure::Timeout | AttemptFailure::Upstream(_) => Some(Failure::Soft),
        }
    }

    /// May the request go to another backend? Nothing reached the backend on a failed
    /// connect; otherwise only a request that is idempotent and whose body is still held
    /// (`resendable`) may be sent again.
    pub fn retriable(self, resendable: bool) -> bool {
        match self {
            AttemptFailure::Connect | AttemptFailure::NoAddress | AttemptFailure::Tls(_) => true,
            AttemptFailure::Timeout | AttemptFailure::Upstream(_) => resendable,
        }
    }

    /// The answer when no other backend is tried.
    pub fn answer(self, host: &str) -> (u16, String) {
        match self {
            AttemptFailure::Timeout => (504, answers::backend_timed_out(host)),
            AttemptFailure::Upstream(what) => (502, answers::backend_failed(host, what)),
            AttemptFailure::Connect | AttemptFailure::NoAddress => {
                (502, answers::could_not_connect(host))
            }
            // As the seed says: a backend that cannot be reached securely is unavailable.
            AttemptFailure::Tls(kind) => (503, answers::backend_tls_failed(host, kind.describe())),
        }
    }
}

/// Counts a failure against the backend: connect failures in its counters and metric, and
/// whatever [`AttemptFailure::breaker`] says in its breaker.
pub fn record_failure(failure: AttemptFailure, runtime: &BackendRuntime, metrics: &Metrics) {
    if matches!(failure, AttemptFailure::Connect | AttemptFailure::Tls(_)) {
        runtime
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics.upstream_connect_failure(runtime.traffic.label(&runtime.id));
    }
    if let AttemptFailure::Tls(kind) = failure {
        metrics.upstream_tls_failure(kind.label());
        // A probe confirms it at once (the seed's rule); logged once per probe asked.
        if runtime.ask_probe() {
            tracing::warn!(backend = %runtime.id, reason = kind.label(), "TLS handshake with the backend failed: {}", kind.describe());
        }
    }
    let Some(kind) = failure.breaker() else {
        return;
    };
    match runtime.health.breaker.record_failure(kind, now_ms()) {
        Tripped::Opened => {
            tracing::warn!(backend = %runtime.id, "circuit breaker opened after a failed connect or trial")
        }
        Tripped::Eject => eject(runtime, "timeouts or 5xx answers"),
        Tripped::Nothing => {}
    }
}

/// Takes the backend out of rotation for the policy's time (`live::ejection`).
fn eject(runtime: &BackendRuntime, after: &str) {
    let now = coarse_unix_ms();
    let already = runtime.health.ejection.own_until(now).is_some();
    let until = runtime.health.ejection.eject(now, ejection::policy());
    if !already {
        tracing::warn!(
            backend = %runtime.id,
            secs = (until - now) / 1000,
            "backend ejected after {} consecutive {after}", breaker::SOFT_FAILURE_THRESHOLD
        );
    }
}

/// A response head arrived from the backend: a 5xx is a soft failure, anything else closes
/// its breaker.
pub fn record_response(status: u16, runtime: &BackendRuntime) {
    runtime.traffic.counters().count_status(status);
    let breaker = &runtime.health.breaker;
    if (500..600).contains(&status) {
        match breaker.record_failure(Failure::Soft, now_ms()) {
            Tripped::Eject => eject(runtime, "5xx answers"),
            Tripped::Opened => {
                tracing::warn!(backend = %runtime.id, "circuit breaker reopened: its trial request failed")
            }
            Tripped::Nothing => {}
        }
    } else {
        breaker.record_success();
    }
}

/// The answer when the pool has nothing (left) to pick: 503 when no backend could even be
/// tried, 502 when every one tried failed to connect.
pub fn nothing_to_pick(route: &Route, tried_any: bool) -> (u16, String) {
    if tried_any {
        (502, answers::every_backend_failed(route))
    } else {
        (503, answers::no_healthy_backend(route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttemptFailure::*;

    #[test]
    fn classification() {
        // (failure, breaker, retriable when resendable, retriable otherwise, status)
        let table = [
            (Connect, Some(Failure::Connect), true, true, 502),
            (NoAddress, None, true, true, 502),
            (Timeout, Some(Failure::Soft), true, false, 504),
            (Upstream("ReadError"), Some(Failure::Soft), true, false, 502),
            (
                Tls(HandshakeFailure::Expired),
                Some(Failure::Connect),
                true,
                true,
                503,
            ),
        ];
        for (f, breaker, resendable, not_resendable, status) in table {
            assert_eq!(f.breaker(), breaker, "{f:?}");
            assert_eq!(f.retriable(true), resendable, "{f:?}");
            assert_eq!(f.retriable(false), not_resendable, "{f:?}");
            assert_eq!(f.answer("a.test").0, status, "{f:?}");
        }
        assert!(Upstream("ReadError")
            .answer("a.test")
            .1
            .contains("ReadError"));
    }
}
