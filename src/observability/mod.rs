//! Metrics, logging and stats.

pub mod access_log;
pub mod log_stream;
pub mod logging;
pub mod metrics;
pub mod traffic;

pub use metrics::Metrics;
