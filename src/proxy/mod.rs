//! Data plane: the HTTP/1 request path (`h1`) and Pingora's full proxy behind it (`service`),
//! their routing table and certificate map.
//!
//! The control plane calls [`DataPlane::publish`] after every applied Raft batch; the proxy
//! only ever `load()`s the current snapshots.

pub mod answers;
mod backend_conn;
mod chunked;
mod client_io;
mod deadline;
pub mod h1;
pub mod outcome;
mod pool;
mod replay;
pub mod rules;
pub mod service;
pub mod strict;
pub mod table;
pub mod tickets;
pub mod tls;
pub mod tls_accept;

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::live::Live;
use crate::state::State;
use table::RoutingTable;
use tickets::Tickets;
use tls::CertStore;

/// `[proxy] tls_ticket_rotation_secs` by default.
const DEFAULT_TICKET_ROTATION: Duration = Duration::from_secs(43_200);

pub struct DataPlane {
    pub routes: ArcSwap<RoutingTable>,
    pub certs: Arc<CertStore>,
    /// Backend runtimes, resolved addresses and the peer-view gate, shared with the health
    /// plane.
    pub live: Arc<Live>,
    /// Client requests being served right now (for graceful drain on SIGTERM).
    pub requests_in_flight: AtomicI64,
    /// TLS session tickets, sealed with the cluster's shared keys.
    pub tickets: Arc<Tickets>,
}

impl DataPlane {
    pub fn new(certs: CertStore) -> Self {
        Self {
            routes: ArcSwap::from_pointee(RoutingTable::default()),
            certs: Arc::new(certs),
            live: Arc::new(Live::default()),
            requests_in_flight: AtomicI64::new(0),
            tickets: Arc::new(Tickets::new(DEFAULT_TICKET_ROTATION)),
        }
    }

    /// Tickets whose lifetime (told to clients) is the rotation period of their keys.
    pub fn with_ticket_rotation(mut self, rotation: Duration) -> Self {
        self.tickets = Arc::new(Tickets::new(rotation));
        self
    }

    /// Compiles and swaps in new snapshots for `state`.
    pub fn publish(&self, state: &State) {
        self.publish_routes(state);
        self.certs.publish(state);
        self.tickets.publish(state);
    }

    /// Recompiles the routing table only (backend addresses changed, certificates did not).
    pub fn publish_routes(&self, state: &State) {
        let table = table::compile(state, &self.live);
        self.routes.store(Arc::new(table));
    }
}
