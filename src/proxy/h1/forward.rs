//! Forwarding to the backend: pick from the route's pool (retries and failure classification
//! from the shared `outcome` rules), open or reuse a backend connection, send the request
//! head and body.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::super::backend_io::BackendIo;
use super::super::deadline::IoDeadline;
use super::super::outcome::{self, AttemptFailure};
use super::super::pool;
use super::super::rules::MAX_ATTEMPTS;
use super::super::send_proxy::ProxyHeader;
use super::super::table::{Target, Upstream};
use super::buffers;
use super::client::Client;
use super::parse::RequestHead;
use super::{Outcome, VhostApp, MAX_HEAD};
use crate::live::{BackendRuntime, InFlight};
use crate::proxy_protocol::Version;
use crate::upstream_tls::{HandshakeFailure, UpstreamTls};

/// Request bodies up to this size are read before sending, so a failed attempt can be sent
/// again (to a fresh connection or another backend). Larger bodies stream, without retry.
const REPLAY_LIMIT: usize = 64 * 1024;
const RELAY_CHUNK: usize = 64 * 1024;

pub(super) async fn write_upstream(
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
pub(super) enum AttemptError {
    /// The client went away or sent less than it announced: nothing to answer.
    Client,
    /// Could not open a connection to the backend.
    Connect,
    /// Connected, but no TLS session with it.
    Tls(HandshakeFailure),
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

impl AttemptError {
    /// What the failure means for the backend and the answer (`outcome`). The client's
    /// own failure is handled before this is asked; it reads as the backend's upstream
    /// failure here only so the mapping stays total.
    pub(super) fn failure(self) -> AttemptFailure {
        match self {
            AttemptError::Connect => AttemptFailure::Connect,
            AttemptError::Tls(kind) => AttemptFailure::Tls(kind),
            AttemptError::NoAddress => AttemptFailure::NoAddress,
            AttemptError::Timeout => AttemptFailure::Timeout,
            AttemptError::Upstream { fault, .. } => AttemptFailure::Upstream(fault.label()),
            AttemptError::Client => AttemptFailure::Upstream("ClientGone"),
        }
    }
}

/// How a backend failed before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UpstreamFault {
    /// It stopped taking the request (it may have answered early: see `attempt`).
    Write,
    Read,
    Closed,
    InvalidHead,
}

impl UpstreamFault {
    /// Pingora's names for the same failures, for the 502 body.
    pub(super) fn label(self) -> &'static str {
        match self {
            UpstreamFault::Write => "WriteError",
            UpstreamFault::Read => "ReadError",
            UpstreamFault::Closed => "ConnectionClosed",
            UpstreamFault::InvalidHead => "InvalidHTTPHeader",
        }
    }
}
impl VhostApp {
    /// Proxies the request to the route's pool: round-robin, the next backend when one
    /// cannot be reached, and (for idempotent requests whose body is held) when one fails
    /// before answering.
    pub(super) async fn forward(
        &self,
        client: &mut Client,
        head: &RequestHead,
        route: &Target,
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
            let addr = upstream.addr();
            client.trace.attempts = attempts as u16;
            client.trace.backend = Some(pick.index);
            client.trace.backend_addr = addr;
            client.trace.connect_us = None;
            let attempt_started = client.trace.timing.then(Instant::now);
            let result = match addr {
                Some(addr) => self.attempt(client, head, addr, upstream, replayable).await,
                None => Err(AttemptError::NoAddress),
            };
            client.trace.upstream_us = attempt_started.map(|t| t.elapsed().as_micros() as u64);
            if let (Some(us), Some(_)) = (client.trace.upstream_us, addr) {
                upstream.runtime.traffic.counters().observe(us);
            }
            let can_retry = attempts < MAX_ATTEMPTS && n_tried < MAX_ATTEMPTS;
            let failure = match result {
                Ok(done) => return done,
                Err(AttemptError::Client) => return (0, Outcome::Close),
                Err(AttemptError::Upstream { reused: true, .. }) if retry_allowed && can_retry => {
                    // A pooled connection the backend had closed: not the backend's fault.
                    n_tried -= 1;
                    continue;
                }
                Err(e) => e.failure(),
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

    /// One attempt on one backend at `addr` (with the PROXY protocol header and the TLS it
    /// wants): send the request, relay the response.
    async fn attempt(
        &self,
        client: &mut Client,
        head: &RequestHead,
        addr: SocketAddr,
        target: &Upstream,
        replayable: bool,
    ) -> Result<(u16, Outcome), AttemptError> {
        let runtime: &BackendRuntime = &target.runtime;
        let send_proxy = target.send_proxy;
        let tls = match &target.tls {
            None => None,
            Some(Ok(tls)) => Some(&**tls),
            Some(Err(_)) => return Err(AttemptError::Tls(HandshakeFailure::Setup)),
        };
        let key = (addr, target.tls_id());
        let started = client.trace.timing.then(Instant::now);
        let (mut upstream, reused) = match send_proxy {
            None => match pool::take(addr, key.1) {
                Some(conn) => (conn, true),
                None => (
                    Box::pin(self.connect(&mut client.deadline, addr, None, tls)).await?,
                    false,
                ),
            },
            Some(version) => Box::pin(self.connect_proxied(client, key, version, tls)).await?,
        };
        // A kept connection took no connect time.
        client.trace.connect_us = match (started, reused) {
            (None, _) => None,
            (Some(_), true) => Some(0),
            (Some(t), false) => Some(t.elapsed().as_micros() as u64),
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
        let mut resp = buffers::take(buffers::RESPONSE_BUF);
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
        buffers::give(resp);
        let (status, upstream_reusable, outcome) = match (result, stopped_taking) {
            (Ok(done), None) => done,
            // The client's request was cut off: its connection ends after the answer.
            (Ok((status, _, _)), Some(_)) => (status, false, Outcome::Close),
            (Err(_), Some(write_error)) => return Err(write_error),
            (Err(e), None) => return Err(e),
        };
        outcome::record_response(status, runtime);
        if upstream_reusable {
            match send_proxy {
                None => pool::put(addr, key.1, upstream),
                Some(_) => client.private_upstream = Some((key, upstream)),
            }
        }
        Ok((status, outcome))
    }

    /// Sends the request head and body to the backend. A backend that stops reading without
    /// answering gets the read timeout, as one that stops answering does.
    async fn send_request(
        &self,
        client: &mut Client,
        head: &RequestHead,
        upstream: &mut BackendIo,
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
        // read timeout. Peeked, not read: readiness alone can be stale. (Over TLS the socket
        // cannot be peeked while the session writes: a write error or the read timeout ends it.)
        let tcp = match upstream {
            BackendIo::Plain(tcp) => tcp,
            tls => return Box::pin(self.stream_body(client, head, tls, reused)).await,
        };
        let (upstream_rd, mut upstream_wr) = tcp.split();
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

    /// A connection to a backend that wants the PROXY protocol header: this client's own
    /// from its last request, or a new one that starts with the header.
    async fn connect_proxied(
        &self,
        client: &mut Client,
        key: (SocketAddr, u64),
        version: Version,
        tls: Option<&UpstreamTls>,
    ) -> Result<(BackendIo, bool), AttemptError> {
        if let Some((kept, conn)) = client.private_upstream.take() {
            if kept == key && pool::still_open(&conn) {
                return Ok((conn, true));
            }
        }
        let header = ProxyHeader::new(version, client.client_addr, client.stream.local_addr());
        let conn = self
            .connect(&mut client.deadline, key.0, Some(&header), tls)
            .await?;
        Ok((conn, false))
    }

    /// A new connection: TCP, the PROXY protocol header if one is given, the TLS handshake if
    /// the backend wants TLS. Connect and handshake are each bounded by the connect timeout.
    pub(super) async fn connect(
        &self,
        deadline: &mut IoDeadline,
        addr: SocketAddr,
        header: Option<&ProxyHeader>,
        tls: Option<&UpstreamTls>,
    ) -> Result<BackendIo, AttemptError> {
        let mut tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(conn)) => {
                    let _ = conn.set_nodelay(true);
                    conn
                }
                _ => return Err(AttemptError::Connect),
            };
        if let Some(header) = header {
            let timeout = self.read_timeout;
            write_upstream(&mut tcp, header.as_bytes(), deadline, timeout, false).await?;
        }
        let Some(tls) = tls else {
            return Ok(BackendIo::Plain(tcp));
        };
        match tokio::time::timeout(self.connect_timeout, tls.handshake(tcp)).await {
            Ok(Ok(session)) => Ok(BackendIo::Tls(Box::new(session))),
            Ok(Err(e)) => Err(AttemptError::Tls(e.kind)),
            Err(_) => Err(AttemptError::Tls(HandshakeFailure::Timeout)),
        }
    }
}
