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

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::apps::{HttpServerOptions, ServerApp};
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod parse;

use super::answers;
use super::chunked::ChunkedTracker;
use super::client_io::ClientIo;
use super::deadline::{deadline_after, IoDeadline};
use super::outcome::{self, AttemptFailure};
use super::replay::Replayed;
use super::rules::{self, Decision, MAX_ATTEMPTS};
use super::service::VhostProxy;
use super::table::Route;
use super::{pool, DataPlane};
use crate::live::{BackendRuntime, InFlight};
use crate::observability::Metrics;
use parse::{parse_request, parse_response, Framing, Parsed, ParsedResponse, RequestHead};

/// Largest request or response head read; a bigger request goes to Pingora's path.
const MAX_HEAD: usize = 64 * 1024;
/// Request bodies up to this size are read before sending, so a failed attempt can be sent
/// again (to a fresh connection or another backend). Larger bodies stream, without retry.
const REPLAY_LIMIT: usize = 64 * 1024;
const RELAY_CHUNK: usize = 64 * 1024;
/// Closing with a request body unread: the rest is read and dropped for up to this long
/// between reads, and this long in all (nginx's `lingering_timeout`, `lingering_time`), so the
/// kernel does not answer it with a reset that can destroy our answer in flight.
const LINGER_BETWEEN_READS: Duration = Duration::from_secs(5);
const LINGER_TOTAL: Duration = Duration::from_secs(30);

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
}

impl VhostApp {
    pub fn new(proxy: VhostProxy, conf: &Arc<ServerConf>) -> Self {
        let data = proxy.data.clone();
        let metrics = proxy.metrics.clone();
        let (connect_timeout, read_timeout, https_port, client_timeout) = (
            proxy.connect_timeout,
            proxy.read_timeout,
            proxy.https_port,
            proxy.client_timeout,
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

/// One client connection: the stream and the bytes read from it but not yet consumed.
struct Client {
    stream: ClientIo,
    buf: Vec<u8>,
    filled: usize,
    tls: bool,
    client_ip: Option<String>,
    /// Upstream request (or our own answer) being built.
    out: Vec<u8>,
    /// Response head rewritten for the client, when it cannot pass through as it came.
    resp_head: Vec<u8>,
    /// The request being answered is a HEAD: our own answers carry no body.
    head_request: bool,
    /// Response bytes read from the backend.
    resp: Vec<u8>,
    /// Times out backend reads and writes (upstream read timeout) and writes to the client
    /// (client timeout) that wait too long.
    deadline: IoDeadline,
    /// `[proxy] client_timeout_secs`.
    client_timeout: Duration,
    /// The connection ends with a request body (maybe) unread: read it away before closing.
    linger: bool,
}

impl Client {
    fn new(stream: ClientIo, client_timeout: Duration) -> Self {
        let tls = stream.is_tls();
        let client_ip = stream.peer_ip();
        Self {
            stream,
            buf: vec![0; 8 * 1024],
            filled: 0,
            tls,
            client_ip,
            out: Vec::with_capacity(2048),
            resp_head: Vec::new(),
            head_request: false,
            resp: vec![0; 16 * 1024],
            deadline: IoDeadline::default(),
            client_timeout,
            linger: false,
        }
    }

    fn into_parts(self) -> (Stream, Bytes) {
        let unread = Bytes::copy_from_slice(&self.buf[..self.filled]);
        (self.stream.into_pingora(), unread)
    }

    /// Drops the first `n` buffered bytes (a request that has been handled).
    fn consume(&mut self, n: usize) {
        let n = n.min(self.filled);
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// Reads more bytes; `Ok(0)` at end of stream. Grows the buffer up to `limit`.
    async fn read_more(&mut self, limit: usize) -> io::Result<usize> {
        if self.filled == self.buf.len() {
            let grown = (self.buf.len() * 2).min(limit.max(self.buf.len()));
            if grown == self.buf.len() {
                return Err(io::Error::other("buffer limit reached"));
            }
            self.buf.resize(grown, 0);
        }
        let n = self.stream.read(&mut self.buf[self.filled..]).await?;
        self.filled += n;
        Ok(n)
    }

    /// Reads and drops what the client still sends after our answer and FIN, until it closes
    /// or the linger limits pass. Closing a socket with unread data makes the kernel send a
    /// reset, and a reset can reach the client before it has read our answer (an early
    /// 413 or 502 during an upload would then be lost).
    async fn drain_unread(&mut self) {
        let per_read = self.client_timeout.min(LINGER_BETWEEN_READS);
        // The connection's own buffers: lingering connections hold nothing more.
        self.resp = Vec::new();
        let mut scratch = std::mem::take(&mut self.buf);
        scratch.resize(scratch.len().max(16 * 1024), 0);
        let drain = async {
            loop {
                match tokio::time::timeout(per_read, self.stream.read(&mut scratch)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TOTAL, drain).await;
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_out(bytes, true).await
    }

    /// Writes to the client (and flushes, if asked), giving up when the client takes nothing
    /// for the client timeout, as nginx's `send_timeout` (the timer restarts after every
    /// write that makes progress, so a slow reader is not cut off): a client that stops
    /// reading must not hold its connection, its task and a backend connection for good.
    async fn write_out(&mut self, bytes: &[u8], flush: bool) -> io::Result<()> {
        let (stream, deadline, timeout) =
            (&mut self.stream, &mut self.deadline, self.client_timeout);
        let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading");
        let mut rest = bytes;
        while !rest.is_empty() {
            match deadline.run(timeout, stream.write(rest)).await {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => rest = &rest[n..],
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(stalled()),
            }
        }
        if flush {
            deadline
                .run(timeout, stream.flush())
                .await
                .map_err(|_| stalled())??;
        }
        Ok(())
    }
}

/// Counts a request in flight on the node for as long as it lives.
struct NodeInFlight<'a>(&'a DataPlane);

impl<'a> NodeInFlight<'a> {
    fn new(node: &'a DataPlane) -> Self {
        node.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        Self(node)
    }
}

impl Drop for NodeInFlight<'_> {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn write_upstream(
    upstream: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    deadline: &mut IoDeadline,
    timeout: Duration,
    reused: bool,
) -> Result<(), AttemptError> {
    match deadline.run(timeout, upstream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(AttemptError::Upstream {
            fault: UpstreamFault::Write,
            reused,
        }),
        Err(_) => Err(AttemptError::Timeout),
    }
}

/// Why an attempt on one backend failed.
enum AttemptError {
    /// The client went away or sent less than it announced: nothing to answer.
    Client,
    /// Could not open a connection to the backend.
    Connect,
    /// The backend's address did not resolve when the table was built: nothing to count
    /// against the backend's health, but another backend may serve.
    NoAddress,
    /// The backend failed before answering.
    Upstream {
        fault: UpstreamFault,
        reused: bool,
    },
    Timeout,
}

/// How a backend failed before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamFault {
    /// It stopped taking the request (it may have answered early: see `attempt`).
    Write,
    Read,
    Closed,
    InvalidHead,
}

impl UpstreamFault {
    /// Pingora's names for the same failures, for the 502 body.
    fn label(self) -> &'static str {
        match self {
            UpstreamFault::Write => "WriteError",
            UpstreamFault::Read => "ReadError",
            UpstreamFault::Closed => "ConnectionClosed",
            UpstreamFault::InvalidHead => "InvalidHTTPHeader",
        }
    }
}

/// How a request ended, for the client connection.
enum Outcome {
    KeepAlive,
    Close,
}

impl VhostApp {
    async fn serve(&self, client: &mut Client, shutdown: &ShutdownWatch) -> End {
        // Registered once per connection, not once per request: both showed up in profiles.
        let mut shutdown_rx = shutdown.clone();
        let shutdown_signal = shutdown_rx.changed();
        tokio::pin!(shutdown_signal);
        let idle = tokio::time::sleep(self.client_timeout);
        tokio::pin!(idle);
        let mut served: u64 = 0;
        let mut served_at_arm: u64 = 0;
        loop {
            // Wait for a complete request head.
            let head = loop {
                if client.filled > 0 {
                    match parse_request(
                        &client.buf[..client.filled],
                        &mut client.out,
                        client.client_ip.as_deref(),
                        client.tls,
                    ) {
                        Parsed::Request(head) => break head,
                        Parsed::HandOver(reason) => return End::HandOver(reason),
                        Parsed::Partial if client.filled >= MAX_HEAD => {
                            return End::HandOver("large-head")
                        }
                        Parsed::Partial => {}
                    }
                } else if *shutdown.borrow() {
                    return End::Close;
                }
                let read = tokio::select! {
                    biased;
                    r = client.read_more(MAX_HEAD) => r,
                    // Shutdown closes idle connections; a request being read still finishes.
                    _ = &mut shutdown_signal, if client.filled == 0 => return End::Close,
                    _ = &mut idle => {
                        // The timer is re-armed only when it fires: a connection is closed
                        // after one to two client timeouts without a request.
                        if served == served_at_arm {
                            return End::Close;
                        }
                        served_at_arm = served;
                        idle.as_mut().reset(deadline_after(self.client_timeout));
                        continue;
                    }
                };
                match read {
                    Ok(n) if n > 0 => {}
                    _ if client.filled >= MAX_HEAD => return End::HandOver("large-head"),
                    // End of stream or error.
                    _ => return End::Close,
                }
            };
            served += 1;
            client.head_request = head.head_method;
            let _in_flight = NodeInFlight::new(&self.data);
            let (status, outcome) = self.handle(client, &head).await;
            self.metrics.request_done(status);
            match outcome {
                Outcome::KeepAlive if !head.close && !*shutdown.borrow() => {}
                Outcome::KeepAlive => return End::Close,
                Outcome::Close => {
                    // Ended early (our own answer, a failure, the backend's early answer):
                    // its body may be partly unread.
                    client.linger = head.content_length > 0;
                    return End::Close;
                }
            }
        }
    }

    /// Answers one request; returns the status sent (0 when none) and what comes next.
    async fn handle(&self, client: &mut Client, head: &RequestHead) -> (u16, Outcome) {
        // Read the request target before the client buffer moves on.
        let decision = {
            let target = std::str::from_utf8(&client.buf[head.target.clone()]).unwrap_or("/");
            let table = self.data.routes.load();
            Decision::for_request(&table, &head.host, target, client.tls, self.https_port)
        };
        // An answer of ours leaves any request body unread: close unless there is none.
        let own_answer_outcome = if head.content_length == 0 {
            Outcome::KeepAlive
        } else {
            Outcome::Close
        };
        match decision {
            Decision::AcmeChallenge(key_authorization) => {
                client.consume(head.head_len);
                self.answer(client, 200, &key_authorization, None, own_answer_outcome)
                    .await
            }
            Decision::UnknownHost => {
                client.consume(head.head_len);
                let body = answers::no_virtual_host(&head.host);
                self.answer(client, 404, &body, None, own_answer_outcome)
                    .await
            }
            Decision::Redirect(location) => {
                client.consume(head.head_len);
                self.answer(client, 301, "", Some(&location), own_answer_outcome)
                    .await
            }
            Decision::Proxy(route) => {
                rules::await_peer_view(&self.data.live).await;
                self.forward(client, head, &route).await
            }
        }
    }

    /// Sends an answer of ours (plain text, or an empty redirect).
    async fn answer(
        &self,
        client: &mut Client,
        status: u16,
        body: &str,
        location: Option<&str>,
        outcome: Outcome,
    ) -> (u16, Outcome) {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut out = std::mem::take(&mut client.out);
        out.clear();
        out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
        if let Some(location) = location {
            out.extend_from_slice(format!("location: {location}\r\n").as_bytes());
        } else {
            out.extend_from_slice(
                b"content-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n",
            );
        }
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        if matches!(outcome, Outcome::Close) {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !client.head_request {
            out.extend_from_slice(body.as_bytes());
        }
        let sent = client.send(&out).await;
        client.out = out;
        match sent {
            Ok(()) => (status, outcome),
            Err(_) => (status, Outcome::Close),
        }
    }

    /// Proxies the request to the route's pool: round-robin, the next backend when one
    /// cannot be reached, and (for idempotent requests whose body is held) when one fails
    /// before answering.
    async fn forward(
        &self,
        client: &mut Client,
        head: &RequestHead,
        route: &Route,
    ) -> (u16, Outcome) {
        let replayable = head.content_length <= REPLAY_LIMIT;
        if replayable && head.content_length > 0 {
            let end = head.head_len + head.content_length;
            while client.filled < end {
                let read = client.read_more(end.max(MAX_HEAD));
                match tokio::time::timeout(self.client_timeout, read).await {
                    Ok(Ok(n)) if n > 0 => {}
                    // Gone, or stalled for the client timeout in the middle of its body.
                    _ => return (0, Outcome::Close),
                }
            }
            let body = &client.buf[head.head_len..end];
            client.out.extend_from_slice(body);
        }
        let retry_allowed = head.idempotent && replayable;
        let mut tried = [0usize; MAX_ATTEMPTS];
        let mut n_tried = 0;
        let mut in_flight_backend = InFlight::<&BackendRuntime>::default();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let Some(pick) = route.pick(&tried[..n_tried]) else {
                let body = outcome::nothing_to_pick(route, n_tried > 0);
                client.consume(head.head_len);
                return self
                    .answer(client, body.0, &body.1, None, Outcome::Close)
                    .await;
            };
            if pick.guard_rail {
                self.metrics.guard_rail_used();
            }
            tried[n_tried] = pick.index;
            n_tried += 1;
            let upstream = pick.upstream;
            in_flight_backend.set(&upstream.runtime);
            let result = match upstream.addr() {
                Some(addr) => {
                    self.attempt(client, head, addr, &upstream.runtime, replayable)
                        .await
                }
                None => Err(AttemptError::NoAddress),
            };
            let can_retry = attempts < MAX_ATTEMPTS && n_tried < MAX_ATTEMPTS;
            let failure = match result {
                Ok(done) => return done,
                Err(AttemptError::Client) => return (0, Outcome::Close),
                Err(AttemptError::Upstream { reused: true, .. }) if retry_allowed && can_retry => {
                    // A pooled connection the backend had closed: not the backend's fault.
                    n_tried -= 1;
                    continue;
                }
                Err(AttemptError::Connect) => AttemptFailure::Connect,
                Err(AttemptError::NoAddress) => AttemptFailure::NoAddress,
                Err(AttemptError::Timeout) => AttemptFailure::Timeout,
                Err(AttemptError::Upstream { fault, .. }) => {
                    AttemptFailure::Upstream(fault.label())
                }
            };
            outcome::record_failure(failure, &upstream.runtime, &self.metrics);
            if failure.retriable(retry_allowed) && can_retry && route.has_untried(&tried[..n_tried])
            {
                continue;
            }
            let (status, body) = failure.answer(&head.host);
            return self
                .answer(client, status, &body, None, Outcome::Close)
                .await;
        }
    }

    /// One attempt on one backend: send the request, relay the response.
    async fn attempt(
        &self,
        client: &mut Client,
        head: &RequestHead,
        addr: SocketAddr,
        runtime: &BackendRuntime,
        replayable: bool,
    ) -> Result<(u16, Outcome), AttemptError> {
        let (mut upstream, reused) = match pool::take(addr) {
            Some(conn) => (conn, true),
            None => (self.connect(addr).await?, false),
        };

        let sent = self
            .send_request(client, head, &mut upstream, reused, replayable)
            .await;
        // A backend may answer before it has read the whole request (a 413 for an upload
        // that is too large, a 401), then close or stop reading: sending stops, and the
        // answer is there to be read. Without one, the write error stands (and a stale
        // pooled connection is retried as before).
        let stopped_taking = match sent {
            Ok(()) => None,
            Err(
                e @ AttemptError::Upstream {
                    fault: UpstreamFault::Write,
                    ..
                },
            ) => Some(e),
            Err(e) => return Err(e),
        };

        // Response head (informational 1xx heads are passed on as they come).
        let mut resp = std::mem::take(&mut client.resp);
        let close_client = head.close || stopped_taking.is_some();
        let result = self
            .relay_response(
                client,
                head,
                &mut upstream,
                &mut resp,
                (reused, replayable, close_client),
            )
            .await;
        client.resp = resp;
        let (status, upstream_reusable, outcome) = match (result, stopped_taking) {
            (Ok(done), None) => done,
            // The client's request was cut off: its connection ends after the answer.
            (Ok((status, _, _)), Some(_)) => (status, false, Outcome::Close),
            (Err(_), Some(write_error)) => return Err(write_error),
            (Err(e), None) => return Err(e),
        };
        outcome::record_response(status, runtime);
        if upstream_reusable {
            pool::put(addr, upstream);
        }
        Ok((status, outcome))
    }

    /// Sends the request head and body to the backend. A backend that stops reading without
    /// answering gets the read timeout, as one that stops answering does.
    async fn send_request(
        &self,
        client: &mut Client,
        head: &RequestHead,
        upstream: &mut TcpStream,
        reused: bool,
        replayable: bool,
    ) -> Result<(), AttemptError> {
        let timeout = self.read_timeout;
        write_upstream(upstream, &client.out, &mut client.deadline, timeout, reused).await?;
        if replayable {
            return Ok(());
        }
        // A large body streams. A backend that answers before taking all of it (a 413 for an
        // upload that is too large) may keep its connection open without reading: stop
        // sending as soon as its answer (or its close) is there, instead of waiting for the
        // read timeout. Peeked, not read: readiness alone can be stale.
        let (upstream_rd, mut upstream_wr) = upstream.split();
        let mut probe = [0u8; 1];
        tokio::select! {
            biased;
            sent = self.stream_body(client, head, &mut upstream_wr, reused) => sent,
            _ = upstream_rd.as_ref().peek(&mut probe) => Err(AttemptError::Upstream {
                fault: UpstreamFault::Write,
                reused,
            }),
        }
    }

    /// Sends the rest of a request body that is too large to hold: what is buffered, then
    /// the rest as it comes from the client.
    async fn stream_body(
        &self,
        client: &mut Client,
        head: &RequestHead,
        upstream: &mut (impl AsyncWrite + Unpin),
        reused: bool,
    ) -> Result<(), AttemptError> {
        let timeout = self.read_timeout;
        let buffered = (client.filled - head.head_len).min(head.content_length);
        let start = head.head_len;
        write_upstream(
            upstream,
            &client.buf[start..start + buffered],
            &mut client.deadline,
            timeout,
            reused,
        )
        .await?;
        client.consume(head.head_len + buffered);
        let mut left = head.content_length - buffered;
        let mut chunk = vec![0u8; RELAY_CHUNK];
        while left > 0 {
            let want = left.min(chunk.len());
            let read = client.stream.read(&mut chunk[..want]);
            let n = match tokio::time::timeout(self.client_timeout, read).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return Err(AttemptError::Client),
            };
            write_upstream(upstream, &chunk[..n], &mut client.deadline, timeout, reused).await?;
            left -= n;
        }
        Ok(())
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, AttemptError> {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(conn)) => {
                let _ = conn.set_nodelay(true);
                Ok(conn)
            }
            _ => Err(AttemptError::Connect),
        }
    }

    /// Reads the response and sends it to the client. Returns the status, whether the
    /// backend connection can be reused, and what happens to the client connection.
    async fn relay_response(
        &self,
        client: &mut Client,
        head: &RequestHead,
        upstream: &mut TcpStream,
        resp: &mut Vec<u8>,
        (reused, replayable, close_client): (bool, bool, bool),
    ) -> Result<(u16, bool, Outcome), AttemptError> {
        let failed = |fault: UpstreamFault| AttemptError::Upstream { fault, reused };
        let mut filled = 0;
        let parsed = loop {
            if filled > 0 {
                match parse_response(
                    &resp[..filled],
                    head.head_method,
                    close_client,
                    &mut client.resp_head,
                ) {
                    ParsedResponse::Partial => {}
                    ParsedResponse::Invalid => return Err(failed(UpstreamFault::InvalidHead)),
                    ParsedResponse::Response(r) if r.status == 101 => {
                        // Only an upgrade request may be answered with 101; those go to Pingora.
                        return Err(failed(UpstreamFault::InvalidHead));
                    }
                    ParsedResponse::Response(r) if (100..200).contains(&r.status) => {
                        // Informational answer: pass it on, then read the final one.
                        if client.send(&resp[..r.head_len]).await.is_err() {
                            return Err(AttemptError::Client);
                        }
                        resp.copy_within(r.head_len..filled, 0);
                        filled -= r.head_len;
                        continue;
                    }
                    ParsedResponse::Response(r) => break r,
                }
            }
            if filled == resp.len() {
                if resp.len() >= MAX_HEAD {
                    return Err(failed(UpstreamFault::InvalidHead));
                }
                resp.resize(resp.len() * 2, 0);
            }
            let read = client
                .deadline
                .run(self.read_timeout, upstream.read(&mut resp[filled..]));
            filled += match read.await {
                Err(_) => return Err(AttemptError::Timeout),
                Ok(Err(_)) => return Err(failed(UpstreamFault::Read)),
                Ok(Ok(0)) => return Err(failed(UpstreamFault::Closed)),
                Ok(Ok(n)) => n,
            };
        };
        let body_in_buf = filled - parsed.head_len;
        let (first_body, mut left, mut chunks) = match parsed.framing {
            Framing::Empty => (0, 0u64, None),
            Framing::Length(n) => {
                let here = (body_in_buf as u64).min(n);
                (here as usize, n - here, None)
            }
            Framing::Chunked => {
                let mut tracker = ChunkedTracker::default();
                match tracker.feed(&resp[parsed.head_len..filled]) {
                    Ok(Some(end)) => (end, 0, None),
                    Ok(None) => (body_in_buf, 0, Some(tracker)),
                    Err(_) => return Err(failed(UpstreamFault::InvalidHead)),
                }
            }
            Framing::UntilClose => (body_in_buf, 0, None),
        };
        // From here on bytes reach the client: no more retries.
        if replayable {
            client.consume(head.head_len + head.content_length);
        }
        let extra = body_in_buf > first_body;
        let body = &resp[parsed.head_len..parsed.head_len + first_body];
        let sent = if parsed.pass_through {
            let head_and_body = &resp[..parsed.head_len + first_body];
            client.write_out(head_and_body, false).await
        } else {
            let mut rewritten = std::mem::take(&mut client.resp_head);
            rewritten.extend_from_slice(body);
            let sent = client.write_out(&rewritten, false).await;
            client.resp_head = rewritten;
            sent
        };
        if sent.is_err() {
            return Ok((parsed.status, false, Outcome::Close));
        }
        // Pingora's client stream buffers writes: the rest of a body may come slowly (SSE,
        // long polls), so the client gets what has arrived at once.
        let complete = left == 0 && chunks.is_none() && parsed.framing != Framing::UntilClose;
        if !complete && client.write_out(&[], true).await.is_err() {
            return Ok((parsed.status, false, Outcome::Close));
        }
        let mut clean_end = true;
        match parsed.framing {
            Framing::Empty => {}
            Framing::Length(_) => {
                while left > 0 {
                    let want = usize::try_from(left).unwrap_or(usize::MAX).min(resp.len());
                    match self.relay_some(client, upstream, &mut resp[..want]).await {
                        Some(n) => left -= n as u64,
                        None => {
                            clean_end = false;
                            break;
                        }
                    }
                }
            }
            Framing::Chunked => {
                if let Some(mut tracker) = chunks.take() {
                    loop {
                        let n = match client
                            .deadline
                            .run(self.read_timeout, upstream.read(resp))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => n,
                            _ => {
                                clean_end = false;
                                break;
                            }
                        };
                        let end = match tracker.feed(&resp[..n]) {
                            Ok(Some(end)) => Some(end),
                            Ok(None) => None,
                            Err(_) => {
                                clean_end = false;
                                break;
                            }
                        };
                        let upto = end.unwrap_or(n);
                        if client.write_out(&resp[..upto], true).await.is_err() {
                            clean_end = false;
                            break;
                        }
                        if let Some(end) = end {
                            if end < n {
                                // Bytes after the body: the backend connection is not reused.
                                let _ = client.write_out(&[], true).await;
                                return Ok((parsed.status, false, Outcome::KeepAlive));
                            }
                            break;
                        }
                    }
                }
            }
            Framing::UntilClose => loop {
                match client
                    .deadline
                    .run(self.read_timeout, upstream.read(resp))
                    .await
                {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        if client.write_out(&resp[..n], true).await.is_err() {
                            clean_end = false;
                            break;
                        }
                    }
                    _ => {
                        clean_end = false;
                        break;
                    }
                }
            },
        }
        if client.write_out(&[], true).await.is_err() {
            return Ok((parsed.status, false, Outcome::Close));
        }
        if !clean_end {
            return Ok((parsed.status, false, Outcome::Close));
        }
        let outcome = if parsed.framing == Framing::UntilClose {
            Outcome::Close
        } else {
            Outcome::KeepAlive
        };
        Ok((parsed.status, parsed.keep_alive && !extra, outcome))
    }

    /// Copies one read of the backend's body to the client; `None` on error or timeout.
    async fn relay_some(
        &self,
        client: &mut Client,
        upstream: &mut TcpStream,
        chunk: &mut [u8],
    ) -> Option<usize> {
        let n = match client
            .deadline
            .run(self.read_timeout, upstream.read(chunk))
            .await
        {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        client.write_out(&chunk[..n], true).await.ok()?;
        Some(n)
    }
}
