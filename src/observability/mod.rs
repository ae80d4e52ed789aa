//! Metrics, logging and stats.

pub mod logging;
pub mod metrics;

pub use metrics::Metrics;
