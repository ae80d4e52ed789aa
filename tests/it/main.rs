//! The integration tests, one test crate: each module starts the real `pingora-vhost` binary
//! (see `common`) and checks one area from the outside. One crate means the harness in
//! `common` is compiled once and every test of the suite shares one process, so everything
//! that must not collide (ports, names) is handed out process-wide by `common`.
//!
//! Run one area with a filter: `cargo test --test it http1::`.

mod common;

mod access_log;
mod acme;
mod api_errors;
mod backend_tls;
mod cluster;
mod dashboard;
mod deploy;
mod edge;
mod field_rules;
mod flood;
mod health;
mod http1;
mod lifecycle;
mod observability;
mod partition;
mod resolver;
mod scale;
mod security;
mod single_node;
mod supervision;
mod tls_sessions;
mod writes;
