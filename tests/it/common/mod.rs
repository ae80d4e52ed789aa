//! Test harness: runs the real `pingora-vhost` binary as a child process against real backend
//! HTTP servers, real temp data dirs and real signals.
//!
//! Every test builds its own [`Node`] (own ports, own temp dir), so tests run in parallel.
//! Every wait is bounded by a deadline. When a test panics while a [`Node`] is alive, the node's
//! stdout/stderr are printed so the failure can be debugged from the test output alone.
//!
//! All tests of the suite share this one process: ports are handed out process-wide (see
//! [`free_port`] and [`bind_loopback`]), so no two tests, whatever their module, get the same.
//!
//! - `backend`: in-process origin servers ([`Backend`]).
//! - `node`: one real node ([`Node`], [`NodeOptions`]), its API, its proxy, its metrics, and
//!   `--check` ([`run_check`]).
//! - `cluster`: several real nodes ([`Cluster`]).
//! - `netns`: network namespaces for partition tests ([`Netns`]).
//! - `certs`: self-signed test certificates ([`TestCert`]).
//! - `websocket`: a websocket client for proxied upgrades ([`ws_connect`]).
//! - `capture`: a packet capture on `lo` ([`Capture`]), to see what crosses the wire.
//! - `rpc`: a mutual-TLS client of a node's cluster RPC port ([`RpcClient`]).

mod backend;
mod capture;
mod certs;
mod cluster;
mod netns;
mod node;
mod rpc;
mod websocket;

pub use backend::*;
pub use capture::*;
pub use certs::*;
pub use cluster::*;
pub use netns::*;
pub use node::*;
pub use rpc::*;
pub use websocket::*;

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The bearer token every test node is configured with.
pub const TOKEN: &str = "test-token";
/// How long a node gets to answer `GET /api/v1/health` after spawn.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn bin_path() -> &'static str {
    env!("CARGO_BIN_EXE_pingora-vhost")
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback port that is free for both TCP and UDP right now and was never handed out before
/// in this test process (the kernel may recycle a just-released ephemeral port).
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        // gossip is UDP: make sure the same number is free there too.
        let udp_ok = UdpSocket::bind(("127.0.0.1", port)).is_ok();
        drop(listener);
        if !udp_ok {
            continue;
        }
        if handed_out().lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("could not find a free loopback port");
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// An address where nothing listens: connects are refused.
pub fn dead_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A TCP listener on a loopback port from [`free_port`], for a server inside the test process.
///
/// Not `bind(127.0.0.1:0)`: [`free_port`] releases the port it checked, and a node binds it
/// only once it has started, so until then the kernel would offer that very port to any
/// `bind(..:0)` of another test. A port taken by someone else in between is skipped.
pub async fn bind_loopback() -> tokio::net::TcpListener {
    for _ in 0..20 {
        let port = free_port();
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
    panic!("could not bind a free loopback port");
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Does `msg` mention `field` as a whole word (so "id" does not match inside "invalid")?
pub fn mentions_field(msg: &str, field: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut start = 0;
    while let Some(pos) = msg[start..].find(field) {
        let i = start + pos;
        let before = msg[..i].chars().next_back();
        let after = msg[i + field.len()..].chars().next();
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
            return true;
        }
        start = i + field.len();
    }
    false
}
