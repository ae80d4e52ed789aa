//! Wall-clock time in Unix units, for values that are stored, gossiped or shown to users.
//! (Deadlines use the monotonic `health::now_ms`.)

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
