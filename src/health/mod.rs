//! Health plane: active probes (`active`), shared between the nodes (`owners`: who probes
//! which backend; `schedule`: when in the interval), and the exchange of verdicts with peers
//! through gossip (`shared`). Both write the per-backend health atomics in `live`, which the proxy
//! reads; the proxy's own outcomes feed the breaker there directly.

pub mod active;
pub mod owners;
pub mod schedule;
pub mod shared;
