//! The lean request path: a keep-alive HTTP/1.1 loop over Pingora's listeners, and HTTP/2
//! streams (`h2`) forwarded over the same pooled HTTP/1.1 backend connections.
//!
//! Pingora accepts the connections (TCP and TLS, graceful upgrade, shutdown). For HTTP/1.1
//! requests of the common shapes — no body or a `Content-Length` body, no upgrade, no
//! `Expect` — this module parses the head once with `httparse`, writes the upstream request
//! into a reused buffer and relays the response bytes as they come, over idle backend
//! connections kept per worker thread (`pool`). Everything else (HTTP/2, websockets and other
//! upgrades, chunked request bodies, HTTP/1.0, malformed requests) is handed, with the bytes
//! already read, to Pingora's full proxy running the same rules (`service::VhostProxy`).
//!
//! Why: Pingora's general HTTP/1 path costs ~13 µs of user-space CPU per proxied request on
//! the benchmark machine; the routing rules themselves are ~1 % of that (bench/README.md).
//!
//! By concern: `conn` (the connection loop and our own answers), `parse` (heads), `forward`
//! (pool pick, retries, sending the request), `relay` (the response), `client` (the client
//! connection's buffers and timed writes). What a request gets and what a backend failure
//! means are decided in `rules` and `outcome`, shared with Pingora's path.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

mod buffers;
mod client;
mod conn;
mod forward;
mod h2;
mod parse;
mod relay;

use super::client_io::ClientIo;
use super::edge::Edge;
use super::replay::{Replayed, RequestEnd};
use super::service::VhostProxy;
use super::strict::{self, Strictness};
use super::tls_accept::TlsListener;
use super::DataPlane;
use crate::observability::Metrics;
use client::Client;

/// Largest request or response head read: a bigger request is a 431, a bigger response a 502.
const MAX_HEAD: usize = strict::MAX_HEAD;

pub struct VhostApp {
    fallback: Arc<HttpProxy<VhostProxy>>,
    data: Arc<DataPlane>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    read_timeout: Duration,
    /// Idle keep-alive connections, stalled request bodies and clients that stop reading are
    /// given up after this (`[proxy] client_timeout_secs`).
    client_timeout: Duration,
    https_port: u16,
    /// What a request must look like (`[proxy] max_body_bytes`, `underscores_in_headers`).
    strict: Strictness,
    /// `[proxy] request_id`: keep or make `X-Request-Id`.
    request_ids: bool,
    /// PROXY protocol and forwarded-header trust.
    edge: Arc<Edge>,
    /// The HTTPS listener's handshake (`tls_accept`), when it has one.
    tls: Option<TlsListener>,
}

impl VhostApp {
    pub fn new(proxy: VhostProxy, conf: &Arc<ServerConf>) -> Self {
        let data = proxy.data.clone();
        let metrics = proxy.metrics.clone();
        let edge = proxy.edge.clone();
        let (connect_timeout, read_timeout, https_port, client_timeout, strict, request_ids) = (
            proxy.connect_timeout,
            proxy.read_timeout,
            proxy.https_port,
            proxy.client_timeout,
            proxy.strict,
            proxy.request_ids,
        );
        let mut fallback = HttpProxy::new(proxy, conf.clone());
        fallback.handle_init_modules();
        // Idle HTTP/2 connections are closed after the client timeout too (Pingora: never).
        let mut server_options = HttpServerOptions::default();
        server_options.h2_idle_timeout = Some(client_timeout);
        fallback.server_options = Some(server_options);
        Self {
            fallback: Arc::new(fallback),
            data,
            metrics,
            connect_timeout,
            read_timeout,
            client_timeout,
            https_port,
            strict,
            request_ids,
            edge,
            tls: None,
        }
    }

    /// Connections on `tls`'s port are TLS: handshaken here before anything else.
    pub fn with_tls(mut self, tls: TlsListener) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Counts one in a node-wide gauge (requests in flight, connections open: what graceful
/// drain waits for) for as long as it lives.
pub(super) struct Counted<'a>(&'a AtomicI64);

impl<'a> Counted<'a> {
    pub(super) fn new(gauge: &'a AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection counted as open (and as an HTTPS one), for as long as its task holds this.
struct OpenConnection {
    data: Arc<DataPlane>,
    https: bool,
}

impl OpenConnection {
    fn new(data: &Arc<DataPlane>) -> Self {
        data.connections_open.fetch_add(1, Ordering::Relaxed);
        Self {
            data: data.clone(),
            https: false,
        }
    }

    fn https(&mut self) {
        self.data
            .https_connections_open
            .fetch_add(1, Ordering::Relaxed);
        self.https = true;
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.data.connections_open.fetch_sub(1, Ordering::Relaxed);
        if self.https {
            self.data
                .https_connections_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl VhostApp {
    /// A connection accepted on the plain HTTP listener (`listeners`), served until it ends.
    pub(super) async fn serve_plain(
        &self,
        socket: std::net::TcpStream,
        peer: std::net::SocketAddr,
        shutdown: &ShutdownWatch,
    ) {
        let _open = OpenConnection::new(&self.data);
        let Some(tcp) = register(socket) else {
            return;
        };
        let client = Client::new(ClientIo::Tcp(tcp, Some(peer)), self.client_timeout);
        self.serve_connection(client, shutdown).await
    }

    /// A connection accepted on the HTTPS listener (`listeners`): its PROXY protocol header
    /// (if expected), the TLS handshake, then HTTP/2 or the HTTP/1 loop, in this one task.
    pub(super) async fn serve_tls(
        self: &Arc<Self>,
        socket: std::net::TcpStream,
        peer: std::net::SocketAddr,
        shutdown: &ShutdownWatch,
    ) {
        let Some(tls) = &self.tls else {
            return;
        };
        let mut open = OpenConnection::new(&self.data);
        open.https();
        let Some(tcp) = register(socket) else {
            return;
        };
        // Pingora's stream (unbuffered), which the TLS stream wraps; the peer's address as
        // accepted, in the digest both request paths read it from.
        let mut l4 = L4Stream::from(tcp);
        super::edge::set_client_addr(&mut l4, peer);
        // Boxed: the handshake's state is large and lives only until it ends, while the
        // task's size is what an idle keep-alive connection costs.
        let Some(stream) = Box::pin(self.handshake(tls, Box::new(l4))).await else {
            return;
        };
        // For the access log, for as long as the connection is served.
        let _sni = self
            .data
            .access_log
            .is_on()
            .then(|| super::tls::register_sni(&stream));
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            Box::pin(self.serve_h2(stream, shutdown)).await;
            return;
        }
        let client = Client::new(ClientIo::Pingora(stream), self.client_timeout);
        self.serve_connection(client, shutdown).await
    }

    /// The PROXY protocol header (read before the ClientHello) and the TLS handshake; `None`
    /// closes the connection.
    async fn handshake(&self, tls: &TlsListener, stream: Stream) -> Option<Stream> {
        let stream = self.edge.before_tls(stream, self.client_timeout).await?;
        let done = tls.handshake(stream).await;
        let counter = &self.data.tls_handshakes[usize::from(done.is_none())];
        counter.fetch_add(1, Ordering::Relaxed);
        done
    }

    pub(super) async fn cleanup(&self) {
        self.fallback.cleanup().await;
    }
}

impl VhostApp {
    /// Serves an accepted (and handshaken) connection on the lean loop until it ends or
    /// Pingora's proxy takes it for good.
    async fn serve_connection(&self, mut client: Client, shutdown: &ShutdownWatch) {
        // TLS connections had their PROXY protocol header read before the handshake.
        if !client.tls && Box::pin(self.proxy_protocol(&mut client)).await.is_none() {
            return;
        }
        client.trusted_forwarder = self.edge.trusts_forwarder(client.ip());
        while let End::HandOver(reason, one) = self.serve(&mut client, shutdown).await {
            self.metrics.handed_over(reason);
            let (stream, unread) = client.into_parts();
            let Some((head_len, end)) = one else {
                // An upgrade (a tunnel after a 101), or a request Pingora's parser refuses:
                // Pingora's proxy may read past its end, so the connection ends with it.
                let replayed = Replayed::new(unread, stream);
                Box::pin(self.serve_one_by_pingora(replayed, false, shutdown)).await;
                return;
            };
            let replayed = Replayed::one_request(unread, stream, head_len, end);
            // Boxed, as every rare and large await here: the task's size is what an idle
            // keep-alive connection costs.
            let Some((stream, unread)) =
                Box::pin(self.serve_one_by_pingora(replayed, true, shutdown)).await
            else {
                return;
            };
            // Back to the lean loop for the next request (pipelined or not).
            client = Client::resume(ClientIo::Pingora(stream), &unread, self.client_timeout);
            client.trusted_forwarder = self.edge.trusts_forwarder(client.ip());
        }
        // Bounded: closing a TLS connection flushes, and a client that stopped reading
        // would hold it.
        let then_read = client.linger;
        let _ = tokio::time::timeout(self.client_timeout, client.stream.close(then_read)).await;
        if client.linger {
            Box::pin(client.drain_unread()).await;
        }
    }

    /// A plain connection's PROXY protocol header (`edge`): `None` closes the connection.
    async fn proxy_protocol(&self, client: &mut Client) -> Option<()> {
        let Some(expect) = self.edge.expect(client.ip()) else {
            // Off: nothing is looked for.
            return Some(());
        };
        let Client {
            stream,
            buf,
            filled,
            ..
        } = client;
        match self
            .edge
            .start(expect, stream, buf, filled, self.client_timeout)
            .await
        {
            // The address lives with our own socket (`ClientIo::Tcp`), and goes with it to
            // Pingora's proxy on a hand-over.
            Ok(Some(addr)) => {
                if !client.take_socket() {
                    return None;
                }
                client.set_client_addr(addr)
            }
            Ok(None) => {}
            Err(_) => return None,
        }
        Some(())
    }

    /// Pingora's proxy serves the one request `replayed` lets it read; the connection comes
    /// back (with what was read past that request) when it may be reused.
    async fn serve_one_by_pingora(
        &self,
        replayed: Replayed,
        keep_alive: bool,
        shutdown: &ShutdownWatch,
    ) -> Option<(Stream, Bytes)> {
        let mut session = ServerSession::new_http1(Box::new(replayed));
        // As Pingora's own HTTP/1 loop does; `service` sets the client timeout on top.
        session.set_keepalive((keep_alive && !*shutdown.borrow()).then_some(60));
        let reused = self.fallback.process_new_http(session, shutdown).await?;
        let (stream, _) = reused.consume();
        let replayed = stream.into_any().downcast::<Replayed>().ok()?;
        if !replayed.request_done() {
            // Where the request ended is not clear: nothing after it is read.
            return None;
        }
        let (unread, stream) = replayed.into_parts();
        Some((stream, unread))
    }
}

/// An accepted socket, registered with the reactor of the thread that serves it; `None`
/// (logged) drops the connection.
fn register(socket: std::net::TcpStream) -> Option<tokio::net::TcpStream> {
    match tokio::net::TcpStream::from_std(socket) {
        Ok(tcp) => {
            // As Pingora's listeners: answers relayed in several writes must not wait for the
            // client's delayed ACKs.
            let _ = tcp.set_nodelay(true);
            Some(tcp)
        }
        Err(e) => {
            tracing::warn!("client connection dropped: cannot register its socket: {e}");
            None
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The connection is finished (closed by either side, or after a `close` answer).
    Close,
    /// Pingora's proxy takes over the connection, starting with the unread bytes: for this
    /// request only when its end is known (head length, body end), else for good.
    HandOver(&'static str, Option<(usize, RequestEnd)>),
}

/// How a request ended, for the client connection.
enum Outcome {
    KeepAlive,
    Close,
}
