//! The HTTP/1.1 request path: a lean keep-alive loop over Pingora's listeners.
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

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerOptions, ServerApp};
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

mod client;
mod conn;
mod forward;
mod parse;
mod relay;

use super::client_io::ClientIo;
use super::replay::Replayed;
use super::service::VhostProxy;
use super::strict::{self, Strictness};
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
}

impl VhostApp {
    pub fn new(proxy: VhostProxy, conf: &Arc<ServerConf>) -> Self {
        let data = proxy.data.clone();
        let metrics = proxy.metrics.clone();
        let (connect_timeout, read_timeout, https_port, client_timeout, strict) = (
            proxy.connect_timeout,
            proxy.read_timeout,
            proxy.https_port,
            proxy.client_timeout,
            proxy.strict,
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
        }
    }
}

#[async_trait]
impl ServerApp for VhostApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            self.metrics.handed_over("h2");
            return self.fallback.process_new(stream, shutdown).await;
        }
        let io = ClientIo::from_accepted(stream)?;
        let mut client = Client::new(io, self.client_timeout);
        if let End::HandOver(reason) = self.serve(&mut client, shutdown).await {
            self.metrics.handed_over(reason);
            let (stream, unread) = client.into_parts();
            let replayed: Stream = Box::new(Replayed::new(unread, stream));
            return self.fallback.process_new(replayed, shutdown).await;
        }
        // Bounded: closing a TLS connection flushes, and a client that stopped reading
        // would hold it.
        let _ = tokio::time::timeout(self.client_timeout, client.stream.close()).await;
        if client.linger {
            client.drain_unread().await;
        }
        None
    }

    async fn cleanup(&self) {
        self.fallback.cleanup().await;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The connection is finished (closed by either side, or after a `close` answer).
    Close,
    /// Pingora's proxy takes over the connection, starting with the unread bytes.
    HandOver(&'static str),
}

/// How a request ended, for the client connection.
enum Outcome {
    KeepAlive,
    Close,
}
