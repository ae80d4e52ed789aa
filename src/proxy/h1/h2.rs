//! HTTP/2 clients on the lean path. Pingora's HTTP/2 server (the `h2` crate) runs the
//! connection and hands us its streams. A stream whose request has no body and whose pool has
//! only HTTP/1.1 backends without the PROXY protocol goes to a backend here, over the lean
//! path's pooled HTTP/1.1 connections, with the same request policy (`rules`, `strict`), pick,
//! retries and failure rules (`outcome`) as an HTTP/1.1 request. Every other stream (a request
//! body, CONNECT, our own answers, a refused request, HTTP/2 or PROXY protocol backends) is
//! served by Pingora's proxy, as all of HTTP/2 was before.
//!
//! Why: on Pingora's proxy an HTTP/2 request cost 2.5 times HAProxy's CPU (#16,
//! bench/README.md); the HTTP/2 framing and HPACK are the smaller part of that.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora_core::apps::HttpServerApp;
use pingora_core::protocols::http::v2::server::{handshake, H2Accept, HttpSession};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::{Digest, Stream};
use pingora_core::server::ShutdownWatch;
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use super::super::backend_io::BackendIo;
use super::super::chunked::ChunkedTracker;
use super::super::deadline::{deadline_after, IoDeadline, Spares, Timer};
use super::super::outcome;
use super::super::pool;
use super::super::request_id::RequestId;
use super::super::rules::{self, Decision, MAX_ATTEMPTS};
use super::super::service::{check_request, request_host, LogTimes, Served};
use super::super::table::{Target, Upstream};
use super::buffers;
use super::forward::{write_upstream, AttemptError, UpstreamFault};
use super::parse::{parse_response_for_h2, Framing, H2Response};
use super::{Counted, VhostApp};
use crate::live::{BackendRuntime, InFlight};
use crate::upstream_tls::HandshakeFailure;

/// Streams of one connection refused as malformed (a bad `:path`, conflicting lengths) before
/// the connection is closed: Pingora's own accept loop keeps this budget, its accept call
/// used here does not keep it across calls.
const MAX_REFUSED_STREAMS: usize = 32;

/// The streams of one connection being served: the connection is idle (and closed after the
/// client timeout) only while there are none.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    none_open: Notify,
}

struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.none_open.notify_one();
        }
    }
}

impl Streams {
    fn start(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    /// Ends after `timeout` without a stream open (on the connection's one timer).
    async fn idle_for(&self, timer: &mut Timer, timeout: Duration) {
        while self.open.load(Ordering::Relaxed) != 0 {
            self.none_open.notified().await;
        }
        timer.reset(deadline_after(timeout));
        timer.await;
    }
}

/// One stream served here: its session and what its answer needs.
struct H2Stream {
    session: HttpSession,
    request_id: RequestId,
    head_method: bool,
    /// Times out backend reads and writes.
    deadline: IoDeadline,
}

impl H2Stream {
    /// Sends an answer of ours (plain text).
    async fn answer(&mut self, status: u16, body: String) {
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        let headers = &mut parts.headers;
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(http::header::CONTENT_LENGTH, body.len().into());
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        if let Ok(id) = http::HeaderValue::from_bytes(self.request_id.as_bytes()) {
            if !self.request_id.is_none() {
                headers.insert("x-request-id", id);
            }
        }
        let end = body.is_empty() || self.head_method;
        let header = Box::new(ResponseHeader::from(parts));
        if self.session.write_response_header(header, end).is_ok() && !end {
            let _ = self.session.write_body(Bytes::from(body), true).await;
        }
    }

    /// Sends a piece of the body; `false` when the client is gone (or took nothing for the
    /// client timeout).
    async fn send(&mut self, body: &[u8], end: bool) -> bool {
        let data = Bytes::copy_from_slice(body);
        self.session.write_body(data, end).await.is_ok()
    }
}

/// The HTTP/1.1 request head sent upstream for an HTTP/2 request, with the forwarding headers
/// as Pingora's path writes them (`service`): `Host` (from `:authority` when the client sent
/// none), `X-Forwarded-*` replaced unless the client is a trusted forwarder, our
/// `X-Request-Id`, and the `Cookie` fields HTTP/2 may split joined into one (RFC 9113 8.2.3).
pub(super) fn write_request_head(
    out: &mut Vec<u8>,
    req: &RequestHeader,
    host: &str,
    client_ip: Option<IpAddr>,
    trusted: bool,
    tls: bool,
    request_id: &RequestId,
) {
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let (mut has_host, mut has_proto, mut has_forwarded_host) = (false, false, false);
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let mut cookies: Vec<&[u8]> = Vec::new();
    for (name, value) in req.headers.iter() {
        let value = value.as_bytes();
        match name.as_str() {
            "host" => has_host = true,
            // Connection-specific: HTTP/2 clients may send `te: trailers` only.
            "te" | "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding"
            | "upgrade" => continue,
            "x-forwarded-for" => {
                if trusted && !value.is_empty() {
                    forwarded_for.push(value);
                }
                continue;
            }
            "x-forwarded-proto" if trusted => has_proto = true,
            "x-forwarded-host" if trusted => has_forwarded_host = true,
            "x-forwarded-proto" | "x-forwarded-host" => continue,
            "x-request-id" if !request_id.is_none() => continue,
            "cookie" => {
                cookies.push(value);
                continue;
            }
            _ => {}
        }
        header_line(out, name.as_str().as_bytes(), value);
    }
    if !has_host && !host.is_empty() {
        header_line(out, b"host", host.as_bytes());
    }
    if let Some(ip) = client_ip {
        out.extend_from_slice(b"x-forwarded-for: ");
        for prev in forwarded_for {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        let _ = write!(out, "{ip}\r\n");
    }
    if !has_proto {
        let proto: &[u8] = if tls { b"https" } else { b"http" };
        header_line(out, b"x-forwarded-proto", proto);
    }
    if !has_forwarded_host {
        header_line(out, b"x-forwarded-host", host.as_bytes());
    }
    if !request_id.is_none() {
        header_line(out, b"x-request-id", request_id.as_bytes());
    }
    if !cookies.is_empty() {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(&cookies.join(&b"; "[..]));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl VhostApp {
    /// Serves an HTTP/2 connection: accepts its streams until it closes, is idle for the
    /// client timeout, or shutdown has drained it (GOAWAY, then the streams in flight).
    pub(super) async fn serve_h2(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) {
        let digest = Arc::new(Digest {
            ssl_digest: stream.get_ssl_digest(),
            timing_digest: stream.get_timing_digest(),
            proxy_digest: stream.get_proxy_digest(),
            socket_digest: stream.get_socket_digest(),
        });
        let Ok(mut conn) = handshake(stream, None).await else {
            return;
        };
        let streams = Arc::new(Streams::default());
        let mut idle = Timer::new(Spares::Idle, deadline_after(self.client_timeout));
        let mut shutdown_rx = shutdown.clone();
        let mut closing = false;
        let mut refused = 0;
        loop {
            let accepted = if closing {
                HttpSession::from_h2_conn(&mut conn, digest.clone()).await
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown_rx.changed() => {
                        conn.graceful_shutdown();
                        closing = true;
                        continue;
                    }
                    accepted = HttpSession::from_h2_conn(&mut conn, digest.clone()) => accepted,
                    _ = streams.idle_for(&mut idle, self.client_timeout) => return,
                }
            };
            match accepted {
                Ok(Some(H2Accept::Session(session))) => {
                    let open = streams.start();
                    let (app, shutdown) = (self.clone(), shutdown.clone());
                    // Same worker thread (each runs its own runtime).
                    tokio::spawn(async move {
                        let _open = open;
                        app.serve_stream(session, &shutdown).await;
                    });
                }
                Ok(Some(H2Accept::Rejected)) => {
                    refused += 1;
                    if refused >= MAX_REFUSED_STREAMS {
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    async fn serve_stream(self: &Arc<Self>, mut session: HttpSession, shutdown: &ShutdownWatch) {
        match self.lean_target(&mut session) {
            Some((host, target)) => self.proxy_stream(session, host, target).await,
            None => {
                self.metrics.handed_over("h2");
                // Boxed: Pingora's proxy future is large, and most streams do not need it.
                let session = ServerSession::new_http2(session);
                Box::pin(self.fallback.process_new_http(session, shutdown)).await;
            }
        }
    }

    /// The host and pool a stream goes to on this path; `None` sends it to Pingora's proxy.
    fn lean_target(&self, session: &mut HttpSession) -> Option<(String, Target)> {
        if session.req_header().method == http::Method::CONNECT || !session.is_body_empty() {
            return None;
        }
        // A request refused by the rules is answered by Pingora's path, which checks again.
        check_request(self.strict, session.req_header_mut()).ok()?;
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let req = session.req_header();
        let host = request_host(req);
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let table = self.data.routes.load();
        match Decision::for_request(&table, &host, target, tls, self.https_port) {
            Decision::Proxy(target) if table.h2_lean(&target) => Some((host, target)),
            _ => None,
        }
    }

    async fn proxy_stream(&self, mut session: HttpSession, host: String, target: Target) {
        let _in_flight = Counted::new(&self.data.requests_in_flight);
        let mut times = LogTimes::now();
        session.set_write_timeout(Some(self.client_timeout));
        let req = session.req_header();
        let request_id = if self.request_ids {
            let client_id = req.headers.get("x-request-id").map(|v| v.as_bytes());
            RequestId::keep_or_generate(client_id)
        } else {
            RequestId::NONE
        };
        let client = session.client_addr().and_then(|a| a.as_inet()).copied();
        let client_ip = client.map(|a| a.ip());
        let ssl = session.digest().and_then(|d| d.ssl_digest.clone());
        let mut head = buffers::take_head();
        write_request_head(
            &mut head,
            req,
            &host,
            client_ip,
            self.edge.trusts_forwarder(client_ip),
            ssl.is_some(),
            &request_id,
        );
        let idempotent = req.method.is_idempotent();
        let head_method = req.method == http::Method::HEAD;
        rules::await_peer_view(&self.data.live).await;
        let mut stream = H2Stream {
            session,
            request_id,
            head_method,
            deadline: IoDeadline::default(),
        };
        let (backend, attempts) = self
            .forward_stream(&mut stream, &head, &host, &target, idempotent, &mut times)
            .await;
        buffers::give_head(head);
        let session = &stream.session;
        let served = Served {
            req: session.req_header(),
            response: session.response_written(),
            body_in: 0,
            body_out: session.body_bytes_sent() as u64,
            client,
            ssl: ssl.as_deref(),
            host: &host,
            route: Some(&target),
            backend,
            attempts,
            request_id: &stream.request_id,
        };
        served.finish(&self.data, times);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.metrics.request_done(status);
    }

    /// Tries the route's pool as the HTTP/1.1 path does (`forward`): the next backend after a
    /// failed connect, or after a failure before an answer (all requests here are without a
    /// body, so idempotent ones can be sent again). Returns the last backend tried and the
    /// number of attempts.
    async fn forward_stream<'t>(
        &self,
        s: &mut H2Stream,
        head: &[u8],
        host: &str,
        route: &'t Target,
        idempotent: bool,
        times: &mut LogTimes,
    ) -> (Option<&'t Upstream>, u16) {
        let mut tried = [0usize; MAX_ATTEMPTS];
        let mut n_tried = 0;
        let mut in_flight = InFlight::<&BackendRuntime>::default();
        let mut attempts = 0;
        let mut last = None;
        loop {
            attempts += 1;
            let Some(pick) = route.pick(&tried[..n_tried]) else {
                let (status, body) = outcome::nothing_to_pick(route, n_tried > 0);
                s.answer(status, body).await;
                return (last, attempts as u16);
            };
            if pick.guard_rail {
                self.metrics.guard_rail_used();
            }
            tried[n_tried] = pick.index;
            n_tried += 1;
            let upstream = pick.upstream;
            last = Some(&**upstream);
            in_flight.set(&upstream.runtime);
            let addr = upstream.addr();
            let started = Instant::now();
            times.attempt_started = Some(started);
            times.backend_addr = addr;
            times.connect_us = None;
            let result = match addr {
                Some(addr) => self.stream_attempt(s, head, addr, upstream, times).await,
                None => Err(AttemptError::NoAddress),
            };
            times.upstream_us = Some(started.elapsed().as_micros() as u64);
            let can_retry = attempts < MAX_ATTEMPTS && n_tried < MAX_ATTEMPTS;
            let failure = match result {
                Ok(()) => return (last, attempts as u16),
                Err(AttemptError::Client) => return (last, attempts as u16),
                Err(AttemptError::Upstream { reused: true, .. }) if idempotent && can_retry => {
                    // A pooled connection the backend had closed: not the backend's fault.
                    n_tried -= 1;
                    self.observe_failed_attempt(upstream, addr, started);
                    continue;
                }
                Err(e) => e.failure(),
            };
            outcome::record_failure(failure, &upstream.runtime, &self.metrics);
            if failure.retriable(idempotent) && can_retry && route.has_untried(&tried[..n_tried]) {
                self.observe_failed_attempt(upstream, addr, started);
                continue;
            }
            let (status, body) = failure.answer(host);
            s.answer(status, body).await;
            return (last, attempts as u16);
        }
    }

    /// An attempt given up for another: its time counts in its backend's latency series (the
    /// last attempt's is counted with the request, `Served`).
    fn observe_failed_attempt(
        &self,
        upstream: &Upstream,
        addr: Option<SocketAddr>,
        started: Instant,
    ) {
        if addr.is_some() {
            let us = started.elapsed().as_micros() as u64;
            upstream.runtime.traffic.counters().observe(us);
        }
    }

    /// One attempt on one backend: send the request head, relay the response. `Ok` once the
    /// response head went to the client (whatever happened to the body after it).
    async fn stream_attempt(
        &self,
        s: &mut H2Stream,
        head: &[u8],
        addr: SocketAddr,
        target: &Upstream,
        times: &mut LogTimes,
    ) -> Result<(), AttemptError> {
        let tls = match &target.tls {
            None => None,
            Some(Ok(tls)) => Some(&**tls),
            Some(Err(_)) => return Err(AttemptError::Tls(HandshakeFailure::Setup)),
        };
        let key = target.tls_id();
        let (mut upstream, reused) = match pool::take(addr, key) {
            Some(conn) => (conn, true),
            None => {
                let conn = Box::pin(self.connect(&mut s.deadline, addr, None, tls)).await?;
                (conn, false)
            }
        };
        times.connect_us = Some(match (reused, times.attempt_started) {
            (false, Some(t)) => t.elapsed().as_micros() as u64,
            _ => 0,
        });
        let timeout = self.read_timeout;
        write_upstream(&mut upstream, head, &mut s.deadline, timeout, reused).await?;
        let mut resp = buffers::take(buffers::RESPONSE_BUF);
        let result = self
            .relay_to_stream(s, &mut upstream, &mut resp, reused)
            .await;
        buffers::give(resp);
        let (status, reusable) = result?;
        outcome::record_response(status, &target.runtime);
        if reusable {
            pool::put(addr, key, upstream);
        }
        Ok(())
    }

    /// Reads the backend's response and sends it on the stream: the head, then the body by
    /// its framing (a chunked one decoded into DATA frames; trailers are not passed on).
    /// Returns the status and whether the backend connection can be reused. A failure after
    /// the head went out leaves the stream unfinished: it is reset when dropped, so the
    /// client sees a broken response, not a short one.
    async fn relay_to_stream(
        &self,
        s: &mut H2Stream,
        upstream: &mut BackendIo,
        resp: &mut Vec<u8>,
        reused: bool,
    ) -> Result<(u16, bool), AttemptError> {
        let failed = |fault: UpstreamFault| AttemptError::Upstream { fault, reused };
        let mut filled = 0;
        let (head_len, header, facts) = loop {
            if filled > 0 {
                match parse_response_for_h2(&resp[..filled], s.head_method, s.request_id.as_bytes())
                {
                    H2Response::Partial => {}
                    H2Response::Invalid => return Err(failed(UpstreamFault::InvalidHead)),
                    H2Response::Informational(n) => {
                        resp.copy_within(n..filled, 0);
                        filled -= n;
                        continue;
                    }
                    H2Response::Final {
                        head_len,
                        header,
                        facts,
                    } => break (head_len, header, facts),
                }
            }
            filled += self
                .read_head_more(upstream, resp, filled, &mut s.deadline, reused)
                .await?;
        };
        let status = header.status.as_u16();
        let body_in_buf = filled - head_len;
        let empty = match facts.framing {
            Framing::Empty | Framing::Length(0) => true,
            Framing::Length(_) | Framing::Chunked | Framing::UntilClose => false,
        };
        if s.session
            .write_response_header(Box::new(header), empty)
            .is_err()
        {
            return Ok((status, false));
        }
        if empty {
            return Ok((status, facts.keep_alive && body_in_buf == 0));
        }
        let clean = match facts.framing {
            Framing::Length(n) => {
                self.relay_length(s, upstream, resp, head_len, filled, n)
                    .await
            }
            Framing::Chunked => {
                self.relay_chunked(s, upstream, resp, head_len, filled)
                    .await
            }
            _ => {
                self.relay_until_close(s, upstream, resp, head_len, filled)
                    .await
            }
        };
        Ok((status, clean && facts.keep_alive))
    }

    /// A `Content-Length` body; `true` when it ended where its length says, nothing after it.
    async fn relay_length(
        &self,
        s: &mut H2Stream,
        upstream: &mut BackendIo,
        resp: &mut [u8],
        head_len: usize,
        filled: usize,
        length: u64,
    ) -> bool {
        let here = ((filled - head_len) as u64).min(length) as usize;
        let extra = filled - head_len > here;
        let mut left = length - here as u64;
        if here > 0 && !s.send(&resp[head_len..head_len + here], left == 0).await {
            return false;
        }
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(resp.len());
            let read = s
                .deadline
                .run(self.read_timeout, upstream.read(&mut resp[..want]));
            let n = match read.await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return false,
            };
            left -= n as u64;
            if !s.send(&resp[..n], left == 0).await {
                return false;
            }
        }
        !extra
    }

    /// A chunked body, decoded; `true` when it ended cleanly with nothing after it.
    async fn relay_chunked(
        &self,
        s: &mut H2Stream,
        upstream: &mut BackendIo,
        resp: &mut [u8],
        head_len: usize,
        filled: usize,
    ) -> bool {
        let mut tracker = ChunkedTracker::default();
        let mut data = Vec::new();
        let (mut start, mut end) = (head_len, filled);
        loop {
            data.clear();
            let ended = match tracker.feed_decoded(&resp[start..end], &mut data) {
                Ok(ended) => ended,
                Err(_) => return false,
            };
            let piece = ended.is_some() || !data.is_empty();
            if piece && !s.send(&data, ended.is_some()).await {
                return false;
            }
            if let Some(used) = ended {
                // Bytes after the body: the backend connection is not reused.
                return start + used == end;
            }
            let read = s.deadline.run(self.read_timeout, upstream.read(resp));
            end = match read.await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return false,
            };
            start = 0;
        }
    }

    /// A body that ends when the backend closes; the connection is never reused.
    async fn relay_until_close(
        &self,
        s: &mut H2Stream,
        upstream: &mut BackendIo,
        resp: &mut [u8],
        head_len: usize,
        filled: usize,
    ) -> bool {
        if filled > head_len && !s.send(&resp[head_len..filled], false).await {
            return false;
        }
        loop {
            let read = s.deadline.run(self.read_timeout, upstream.read(resp));
            match read.await {
                Ok(Ok(0)) => {
                    s.send(&[], true).await;
                    return false;
                }
                Ok(Ok(n)) => {
                    if !s.send(&resp[..n], false).await {
                        return false;
                    }
                }
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        trusted: bool,
        id: &RequestId,
    ) -> String {
        let mut req = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        req.set_version(http::Version::HTTP_2);
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        let mut out = Vec::new();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        write_request_head(&mut out, &req, "a.test", Some(ip), trusted, true, id);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn upstream_heads_for_http2_requests() {
        let none = RequestId::NONE;
        // (path, header fields, trusted forwarder, head sent upstream)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool, &'a str);
        let cases: &[Case] = &[
            (
                "/x?y=1",
                &[("accept", "*/*")],
                false,
                "GET /x?y=1 HTTP/1.1\r\naccept: */*\r\nhost: a.test\r\n\
                 x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: https\r\n\
                 x-forwarded-host: a.test\r\n\r\n",
            ),
            // What an untrusted client claims is replaced; `te` is dropped; its own Host kept.
            (
                "/",
                &[
                    ("host", "A.test:8443"),
                    ("x-forwarded-for", "10.0.0.1"),
                    ("x-forwarded-proto", "http"),
                    ("x-forwarded-host", "evil.test"),
                    ("te", "trailers"),
                ],
                false,
                "GET / HTTP/1.1\r\nhost: A.test:8443\r\nx-forwarded-for: 192.0.2.7\r\n\
                 x-forwarded-proto: https\r\nx-forwarded-host: a.test\r\n\r\n",
            ),
            // A trusted forwarder's are kept, the client appended to its list.
            (
                "/",
                &[
                    ("x-forwarded-for", "10.0.0.1"),
                    ("x-forwarded-for", "10.0.0.2"),
                    ("x-forwarded-proto", "http"),
                ],
                true,
                "GET / HTTP/1.1\r\nx-forwarded-proto: http\r\nhost: a.test\r\n\
                 x-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\n\
                 x-forwarded-host: a.test\r\n\r\n",
            ),
            // Cookies split by HTTP/2 go upstream as one field.
            (
                "/",
                &[("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2")],
                false,
                "GET / HTTP/1.1\r\naccept: */*\r\nhost: a.test\r\n\
                 x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: https\r\n\
                 x-forwarded-host: a.test\r\ncookie: a=1; b=2\r\n\r\n",
            ),
        ];
        for (path, headers, trusted, want) in cases {
            let got = head_of("GET", path, headers, *trusted, &none);
            assert_eq!(got, *want, "{path} {headers:?}");
        }
    }

    #[test]
    fn the_request_id_replaces_the_clients_when_ids_are_on() {
        let id = RequestId::keep_or_generate(Some(b"client-id"));
        let got = head_of("HEAD", "/", &[("x-request-id", "client-id")], false, &id);
        assert!(got.starts_with("HEAD / HTTP/1.1\r\n"), "{got}");
        assert_eq!(got.matches("x-request-id").count(), 1, "{got}");
        assert!(got.contains("x-request-id: client-id\r\n"), "{got}");
        let got = head_of(
            "GET",
            "/",
            &[("x-request-id", "client-id")],
            false,
            &RequestId::NONE,
        );
        assert!(
            got.contains("x-request-id: client-id\r\n"),
            "ids off: kept as sent: {got}"
        );
    }
}
