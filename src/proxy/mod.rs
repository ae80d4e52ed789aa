//! Data plane: the HTTP/1 request path (`h1`) and Pingora's full proxy behind it (`service`),
//! their routing table and certificate map.
//!
//! The control plane calls [`DataPlane::publish`] after every applied Raft batch; the proxy
//! only ever `load()`s the current snapshots.

pub mod answers;
mod chunked;
mod client_io;
mod deadline;
pub mod h1;
mod pool;
mod replay;
pub mod service;
pub mod table;
pub mod tls;

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::health::shared::PeerViewGate;
use crate::state::State;
use table::{BackendRegistry, RoutingTable};
use tls::CertStore;

pub struct DataPlane {
    pub routes: ArcSwap<RoutingTable>,
    pub certs: Arc<CertStore>,
    pub backends: BackendRegistry,
    /// Client requests being served right now (for graceful drain on SIGTERM).
    pub requests_in_flight: AtomicI64,
    /// Open once peers' health verdicts are known (see `health::shared`).
    pub peer_view: PeerViewGate,
}

impl DataPlane {
    pub fn new(certs: CertStore) -> Self {
        Self {
            routes: ArcSwap::from_pointee(RoutingTable::default()),
            certs: Arc::new(certs),
            backends: BackendRegistry::default(),
            requests_in_flight: AtomicI64::new(0),
            peer_view: PeerViewGate::default(),
        }
    }

    /// Compiles and swaps in new snapshots for `state`.
    pub fn publish(&self, state: &State) {
        let table = table::compile(state, &self.backends);
        self.routes.store(Arc::new(table));
        self.certs.publish(state);
    }
}
