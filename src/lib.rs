//! pingora-vhost: a clustered virtual-host reverse proxy on Pingora.
//!
//! Data flows one way: API call -> Raft log -> `state::apply` on every node -> compiled
//! routing/cert snapshots (`proxy::DataPlane`) -> the Pingora proxy reads them lock-free.

pub mod acme;
pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod control;
pub mod gossip;
pub mod health;
pub mod keyring;
pub mod live;
pub mod observability;
pub mod proxy;
pub mod proxy_protocol;
pub mod resolve;
pub mod schema;
pub mod state;
pub mod supervise;
pub mod ticket_keys;
pub mod upgrade;
pub mod upstream_tls;
