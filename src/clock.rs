//! Clocks. Wall-clock time in Unix units, for values that are stored, gossiped or shown to
//! users; a coarse monotonic clock for the request path's bookkeeping.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (0 if the system clock is before it).
pub fn unix_secs() -> i64 {
    (unix_ms() / 1000) as i64
}

/// Milliseconds on a monotonic clock (since boot) that advances in steps of the kernel tick
/// (1-10 ms). For the request path's bookkeeping (breaker deadlines, idle connection ages),
/// which needs no better: reading it costs a few nanoseconds, a precise clock read several
/// times that, and the request path read the precise clock several times per request.
pub fn coarse_monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own; this clock id exists on every
    // Linux since 2.6.32, and on failure `ts` stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// Milliseconds since the Unix epoch from the kernel's coarse wall clock (1-10 ms steps, a
/// few nanoseconds to read): for the access log's timestamps, read once per request.
pub fn coarse_unix_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `coarse_monotonic_ms`.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    (ts.tv_sec.max(0) as u64) * 1000 + (ts.tv_nsec.max(0) as u64) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_monotonic_clock_advances_with_time() {
        let a = coarse_monotonic_ms();
        assert!(a > 0);
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = coarse_monotonic_ms();
        assert!(
            (20..1000).contains(&(b - a)),
            "30 ms of sleep read as {} ms",
            b - a
        );
    }
}
