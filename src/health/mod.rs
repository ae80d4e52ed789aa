//! Health plane: active probes (`active`) and the exchange of verdicts with peers through
//! gossip (`shared`). Both write the per-backend health atomics in `live`, which the proxy
//! reads; the proxy's own outcomes feed the breaker there directly.

pub mod active;
pub mod shared;
