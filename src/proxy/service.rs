//! The Pingora `ProxyHttp` implementation: host routing, redirects, backend choice with
//! retry on failed connects, forwarding headers and the plain-text error answers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use super::answers;
use super::backend_conn::BackendConnector;
use super::edge::Edge;
use super::outcome::{self, AttemptFailure};
use super::request_id::RequestId;
use super::rules::{self, Decision, MAX_ATTEMPTS};
use super::send_proxy::{self, ProxyHeader};
use super::strict::{self, Refusal, Strictness};
use super::table::{Route, Target, Upstream};
use super::DataPlane;
use crate::clock;
use crate::live::{BackendRuntime, InFlight};
use crate::observability::access_log::{Protocol, Record, Text};
use crate::observability::Metrics;
use crate::upstream_tls::{HandshakeError, HandshakeFailure};

pub struct VhostProxy {
    pub data: Arc<DataPlane>,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// Port used in http->https redirects (omitted when 443).
    pub https_port: u16,
    /// `[proxy] client_timeout_secs`: idle keep-alive connections, stalled request bodies and
    /// clients that take nothing of their response are given up after this.
    pub client_timeout: Duration,
    /// What a request must look like, as on the lean path (`strict`).
    pub strict: Strictness,
    /// `[proxy] request_id`: keep or make `X-Request-Id` (`request_id`).
    pub request_ids: bool,
    /// PROXY protocol and forwarded-header trust (`edge`).
    pub edge: Arc<Edge>,
}

#[derive(Default)]
pub struct Ctx {
    route: Option<Target>,
    host: String,
    tls: bool,
    /// Pool indexes this request already tried.
    tried: Vec<usize>,
    current: Option<Arc<Upstream>>,
    /// The current attempt's connector: it says whether it handed out a pooled connection.
    connector: Option<Arc<BackendConnector>>,
    in_flight: InFlight<Arc<BackendRuntime>>,
    /// Set when we decide the answer ourselves (status, plain-text reason).
    failure: Option<(u16, String)>,
    counted: bool,
    /// Request body bytes received so far (a chunked body has no length to check up front).
    body_bytes: u64,
    request_id: RequestId,
    /// For the access log (set only when it is on): when the request and the current
    /// attempt started, and what the attempt took.
    log: Option<LogTimes>,
}

/// When a request and its current attempt started, and what the attempt took.
pub(super) struct LogTimes {
    pub(super) started: Instant,
    pub(super) unix_ms: u64,
    pub(super) attempt_started: Option<Instant>,
    pub(super) backend_addr: Option<SocketAddr>,
    pub(super) connect_us: Option<u64>,
    pub(super) upstream_us: Option<u64>,
}

impl LogTimes {
    pub(super) fn now() -> Self {
        Self {
            started: Instant::now(),
            unix_ms: clock::coarse_unix_ms(),
            attempt_started: None,
            backend_addr: None,
            connect_us: None,
            upstream_us: None,
        }
    }
}

impl Ctx {
    /// The current attempt got a connection from our pool (Pingora counts it as new).
    fn pooled_connection(&self) -> bool {
        self.connector
            .as_ref()
            .is_some_and(|c| c.reused.load(Ordering::Relaxed))
    }

    fn release_current(&mut self) {
        self.current = None;
        self.in_flight.clear();
    }
}

/// A Pingora error in the shared classification (`outcome`); `None` when it is not the
/// backend's (the client's, or ours).
fn classify(e: &Error) -> Option<AttemptFailure> {
    match (e.etype(), e.esource()) {
        // Our connector's handshake failure carries its kind as the cause (`backend_conn`).
        (ErrorType::TLSHandshakeFailure, _) => Some(AttemptFailure::Tls(
            e.root_cause()
                .downcast_ref::<HandshakeError>()
                .map_or(HandshakeFailure::Other, |h| h.kind),
        )),
        (
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError,
            _,
        ) => Some(AttemptFailure::Connect),
        (ErrorType::ReadTimedout | ErrorType::WriteTimedout, ErrorSource::Upstream) => {
            Some(AttemptFailure::Timeout)
        }
        (other, ErrorSource::Upstream) => Some(AttemptFailure::Upstream(other.as_str())),
        _ => None,
    }
}

/// Host of the request: `:authority` (h2) or `Host`, normalised for routing.
pub(super) fn request_host(req: &RequestHeader) -> String {
    let raw = req
        .uri
        .host()
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .unwrap_or_default();
    answers::normalize_host(raw)
}

/// The rules of `strict` on a request as Pingora parsed it (HTTP/1 requests handed over by
/// the lean path, and those pipelined after them; HTTP/2): refuses what must not be proxied,
/// and drops what must not reach the backend (header names with `_`, an `Upgrade` that is not
/// an upgrade request).
pub(super) fn check_request(rules: Strictness, req: &mut RequestHeader) -> Result<(), Refusal> {
    if req.headers.len() > strict::MAX_HEADERS {
        return Err(Refusal::HeadTooLarge);
    }
    // The head as an HTTP/1.1 request line and header fields would take (for HTTP/2 too).
    let head_len = req.method.as_str().len()
        + req.raw_path().len()
        + " HTTP/1.1\r\n\r\n".len()
        + req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head_len > strict::MAX_HEAD {
        return Err(Refusal::HeadTooLarge);
    }
    if !strict::clean_target(req.raw_path()) {
        return Err(Refusal::BadRequest("invalid request target"));
    }
    for value in req.headers.get_all(http::header::CONTENT_LENGTH) {
        rules.content_length(value.as_bytes())?;
    }
    let te = req.headers.get_all(http::header::TRANSFER_ENCODING);
    if te.iter().next().is_some() && !strict::transfer_encoding_ok(te.iter().map(|v| v.as_bytes()))
    {
        return Err(Refusal::BadRequest("invalid Transfer-Encoding"));
    }
    if req.headers.contains_key(http::header::UPGRADE) {
        let connection_upgrade = req
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .any(|v| strict::connection_upgrade(v.as_bytes()));
        let http11 = req.version == http::Version::HTTP_11;
        // Pingora would turn `Upgrade: websocket` alone into an upgrade (and add
        // `Connection: Upgrade` upstream).
        if !strict::is_upgrade(req.method.as_str(), http11, connection_upgrade) {
            req.remove_header(&http::header::UPGRADE);
        }
    }
    if !rules.underscores_in_headers {
        let dropped: Vec<http::HeaderName> = req
            .headers
            .keys()
            .filter(|n| rules.drops_header(n.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in dropped {
            req.remove_header(&name);
        }
    }
    Ok(())
}

async fn respond_plain(
    session: &mut Session,
    status: u16,
    body: String,
    id: &RequestId,
) -> Result<()> {
    let body = Bytes::from(body);
    let mut resp = ResponseHeader::build(status, Some(4))?;
    if !id.is_none() {
        resp.insert_header("x-request-id", id.as_str())?;
    }
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

impl VhostProxy {
    /// The client timeout on Pingora's path, as on the lean one. Pingora's own defaults: an
    /// idle HTTP/1.1 keep-alive connection waits for its next request for ever, reads from
    /// the client (also of an upgraded connection) time out after a fixed 60 s, and writes to
    /// the client have no time limit.
    fn apply_client_timeout(&self, session: &mut Session) {
        // Only where keep-alive is on: `set_keepalive(Some(_))` would turn it on for an
        // HTTP/1.0 request that did not ask for it.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.client_timeout.as_secs().max(1)));
        }
        session.set_read_timeout(Some(self.client_timeout));
        session.set_write_timeout(Some(self.client_timeout));
    }
}

#[async_trait]
impl ProxyHttp for VhostProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.data.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        ctx.counted = true;
        // Timed always: the access log and the traffic series (`observability::traffic`).
        ctx.log = Some(LogTimes::now());
        if self.request_ids {
            // The first one counts, as on the lean path; it replaces the others upstream.
            let client_id = session.req_header().headers.get("x-request-id");
            ctx.request_id = RequestId::keep_or_generate(client_id.map(|v| v.as_bytes()));
        }
        self.apply_client_timeout(session);
        if let Err(refusal) = check_request(self.strict, session.req_header_mut()) {
            session.set_keepalive(None);
            respond_plain(
                session,
                refusal.status(),
                refusal.to_string(),
                &ctx.request_id,
            )
            .await?;
            return Ok(true);
        }
        ctx.tls = session
            .digest()
            .map(|d| d.ssl_digest.is_some())
            .unwrap_or(false);
        ctx.host = request_host(session.req_header());
        let decision = {
            let target = session
                .req_header()
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let table = self.data.routes.load();
            Decision::for_request(&table, &ctx.host, target, ctx.tls, self.https_port)
        };
        match decision {
            Decision::AcmeChallenge(key_authorization) => {
                respond_plain(session, 200, key_authorization, &ctx.request_id).await?;
                Ok(true)
            }
            Decision::UnknownHost => {
                let body = answers::no_virtual_host(&ctx.host);
                respond_plain(session, 404, body, &ctx.request_id).await?;
                Ok(true)
            }
            Decision::Redirect(location) => {
                let mut resp = ResponseHeader::build(301, Some(3))?;
                resp.insert_header("location", &location)?;
                if !ctx.request_id.is_none() {
                    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
                }
                resp.insert_header("content-length", "0")?;
                session.write_response_header(Box::new(resp), true).await?;
                Ok(true)
            }
            Decision::Proxy(route) => {
                rules::await_peer_view(&self.data.live).await;
                ctx.route = Some(route);
                Ok(false)
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.release_current();
        let Some(route) = ctx.route.clone() else {
            return Err(Error::new(ErrorType::InternalError));
        };
        // Pingora bounds the attempts (`max_retries` = `rules::MAX_ATTEMPTS`).
        let (upstream, addr) = loop {
            let Some(pick) = route.pick(&ctx.tried) else {
                let (status, body) = outcome::nothing_to_pick(&route, !ctx.tried.is_empty());
                ctx.failure = Some((status, body));
                return Err(Error::new(ErrorType::HTTPStatus(status)));
            };
            if pick.guard_rail {
                self.metrics.guard_rail_used();
            }
            ctx.tried.push(pick.index);
            if ctx.tried.len() > MAX_ATTEMPTS {
                return Err(Error::new(ErrorType::ConnectNoRoute));
            }
            match pick.upstream.addr() {
                Some(addr) => break (pick.upstream.clone(), addr),
                // No address yet: not the backend's fault; another one may serve.
                None => continue,
            }
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        if let Some(log) = &mut ctx.log {
            log.attempt_started = Some(Instant::now());
            log.backend_addr = Some(addr);
            log.connect_us = None;
            log.upstream_us = None;
        }
        let mut proxy_header = None;
        if let Some(version) = upstream.send_proxy {
            let inet = |a: Option<&pingora::protocols::l4::socket::SocketAddr>| {
                a.and_then(|a| a.as_inet()).copied()
            };
            let client = inet(session.client_addr());
            proxy_header = Some(ProxyHeader::new(
                version,
                client,
                inet(session.server_addr()),
            ));
            // A connection that carries one client's header serves only that client.
            peer.group_key = send_proxy::group_key(client);
        }
        // TLS to the backend is ours too (one client per setting, shared with the lean path
        // and the probes): Pingora sees a plain stream. Its pool must still tell settings
        // apart, and an HTTP/2 backend is spoken to in HTTP/2 over that stream.
        let tls = match &upstream.tls {
            None => None,
            Some(Ok(tls)) => {
                peer.group_key = peer.group_key.wrapping_mul(31).wrapping_add(tls.id);
                if tls.http2 {
                    peer.options.alpn = pingora::protocols::ALPN::H2;
                }
                Some(tls.clone())
            }
            Some(Err(why)) => {
                let failure = AttemptFailure::Tls(HandshakeFailure::Setup);
                outcome::record_failure(failure, &upstream.runtime, &self.metrics);
                ctx.failure = Some(failure.answer(&ctx.host));
                return Err(Error::explain(
                    ErrorType::TLSHandshakeFailure,
                    why.to_string(),
                ));
            }
        };
        // Chunk sizes with leading zeros are read as nginx reads them (`backend_conn`); a
        // backend that wants the PROXY protocol gets its header first.
        let connector = Arc::new(BackendConnector {
            connect_timeout: self.connect_timeout,
            proxy_header,
            tls,
            reused: AtomicBool::new(false),
        });
        peer.options.custom_l4 = Some(connector.clone());
        ctx.connector = Some(connector);
        ctx.in_flight.set(upstream.runtime.clone());
        ctx.current = Some(upstream);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failure = match classify(&e) {
            Some(tls @ AttemptFailure::Tls(_)) => tls,
            _ => AttemptFailure::Connect,
        };
        if let Some(u) = &ctx.current {
            outcome::record_failure(failure, &u.runtime, &self.metrics);
        }
        let others = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.has_untried(&ctx.tried));
        if failure.retriable(false) && others {
            e.set_retry(true);
        } else if let AttemptFailure::Tls(_) = failure {
            // The last try: its answer is the TLS one (503), not a connect failure's.
            ctx.failure = Some(failure.answer(&ctx.host));
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if e.esource() == &ErrorSource::Downstream {
            // The client went away or misbehaved: not the backend's fault, nothing to retry.
            e.set_retry(false);
            return e;
        }
        let retriable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        // Pingora reuses no connection of our connector itself; the connector's pool does.
        let reused = client_reused || ctx.pooled_connection();
        if reused && retriable {
            // A pooled connection the backend had already closed (keep-alive limit, idle
            // timeout): not the backend's fault. Retry, the same backend allowed.
            ctx.tried.pop();
            e.set_retry(true);
            return e;
        }
        let failure = classify(&e).unwrap_or(AttemptFailure::Upstream("UnknownError"));
        if let Some(u) = &ctx.current {
            outcome::record_failure(failure, &u.runtime, &self.metrics);
        }
        // Idempotent requests whose body we still have may go to another backend.
        let others = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.has_untried(&ctx.tried));
        e.set_retry(failure.retriable(retriable) && others);
        e
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_bytes > self.strict.max_body_bytes {
            let refusal = Refusal::BodyTooLarge;
            ctx.failure = Some((refusal.status(), refusal.to_string()));
            // The client's doing: not counted against the backend (`error_while_proxy`).
            let e = Error::explain(
                ErrorType::HTTPStatus(refusal.status()),
                "body over the limit",
            );
            return Err(e.into_down());
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Only a real upgrade request may be answered with a tunnel.
        if upstream_response.status.as_u16() == 101 && !session.as_downstream().is_upgrade_req() {
            let e = Error::explain(
                ErrorType::InvalidHTTPHeader,
                "101 to a request that is not an upgrade",
            );
            return Err(e.into_up());
        }
        if let Some(u) = &ctx.current {
            outcome::record_response(upstream_response.status.as_u16(), &u.runtime);
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        // From anyone but a trusted forwarder, what the client claims is replaced.
        let trusted = self.edge.trusts_forwarder(client_ip);
        if !trusted {
            for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
                upstream_request.remove_header(name);
            }
        }
        if let Some(ip) = client_ip {
            let prev: Vec<&str> = upstream_request
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .collect();
            let xff = match prev.is_empty() {
                true => ip.to_string(),
                false => format!("{}, {ip}", prev.join(", ")),
            };
            upstream_request.insert_header("x-forwarded-for", xff)?;
        }
        if !upstream_request.headers.contains_key("x-forwarded-proto") {
            upstream_request
                .insert_header("x-forwarded-proto", if ctx.tls { "https" } else { "http" })?;
        }
        if !upstream_request.headers.contains_key("x-forwarded-host") {
            upstream_request.insert_header("x-forwarded-host", ctx.host.as_str())?;
        }
        if !ctx.request_id.is_none() {
            upstream_request.insert_header("x-request-id", ctx.request_id.as_str())?;
        }
        // h2 clients send :authority only; HTTP/1.1 backends need Host.
        if upstream_request.headers.get(http::header::HOST).is_none() && !ctx.host.is_empty() {
            upstream_request.insert_header(http::header::HOST, ctx.host.as_str())?;
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let reused = reused || ctx.pooled_connection();
        if let Some(log) = &mut ctx.log {
            log.connect_us = match (reused, log.attempt_started) {
                (false, Some(t)) => Some(t.elapsed().as_micros() as u64),
                _ => Some(0),
            };
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The backend's own X-Request-Id (often the one it was sent) is kept.
        if !ctx.request_id.is_none() && response.headers.get("x-request-id").is_none() {
            response.insert_header("x-request-id", ctx.request_id.as_str())?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let (true, Some(log)) = (end_of_stream, &mut ctx.log) {
            log.upstream_us = log.attempt_started.map(|t| t.elapsed().as_micros() as u64);
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, body) = match ctx.failure.take() {
            Some(f) => f,
            None => match (e.etype(), e.esource(), classify(e)) {
                (ErrorType::HTTPStatus(c), _, _) => (*c, format!("{c}\n")),
                (_, _, Some(failure)) => failure.answer(&ctx.host),
                (
                    ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
                    ErrorSource::Downstream,
                    _,
                ) => (0, String::new()),
                (_, ErrorSource::Downstream, _) => (400, "400 Bad Request\n".to_string()),
                _ => (500, "500 Internal Server Error\n".to_string()),
            },
        };
        // Once a response head has gone out, an error answer would be read as part of its
        // body: the connection is only cut.
        if code > 0 && session.response_written().is_none() {
            if let Err(err) = respond_plain(session, code, body, &ctx.request_id).await {
                tracing::debug!(error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        if let Some(log) = ctx.log.take() {
            let ssl = session.digest().and_then(|d| d.ssl_digest.clone());
            let served = Served {
                req: session.req_header(),
                response: session.response_written(),
                body_in: ctx.body_bytes,
                body_out: session.as_downstream().body_bytes_sent() as u64,
                client: session.client_addr().and_then(|a| a.as_inet()).copied(),
                ssl: ssl.as_deref(),
                host: &ctx.host,
                route: ctx.route.as_ref(),
                backend: ctx.current.as_deref(),
                attempts: ctx.tried.len() as u16,
                request_id: &ctx.request_id,
            };
            served.finish(&self.data, log);
        }
        ctx.release_current();
        if ctx.counted {
            self.data.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        self.metrics.request_done(status);
    }
}

/// A request answered on Pingora's proxy or the lean HTTP/2 path (heads in Pingora's types):
/// what its traffic series and its access log line are made of.
pub(super) struct Served<'a> {
    pub(super) req: &'a RequestHeader,
    pub(super) response: Option<&'a ResponseHeader>,
    /// Body bytes received and sent.
    pub(super) body_in: u64,
    pub(super) body_out: u64,
    pub(super) client: Option<SocketAddr>,
    pub(super) ssl: Option<&'a pingora::protocols::tls::SslDigest>,
    pub(super) host: &'a str,
    pub(super) route: Option<&'a Target>,
    /// The backend of the last attempt.
    pub(super) backend: Option<&'a Upstream>,
    pub(super) attempts: u16,
    pub(super) request_id: &'a RequestId,
}

impl Served<'_> {
    /// Counts the request in its series and, when the access log is on, logs it.
    pub(super) fn finish(&self, data: &DataPlane, log: LogTimes) {
        self.count_traffic(&log);
        if data.access_log.is_on() {
            self.log_request(data, log);
        }
    }

    fn status(&self) -> u16 {
        self.response.map_or(0, |r| r.status.as_u16())
    }

    /// Bytes in and out, heads counted as HTTP/1.1 would write them (HTTP/2 compresses its
    /// own).
    fn wire_bytes(&self) -> (u64, u64) {
        let head_len = |headers: &http::HeaderMap| {
            headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>()
                + 2
        };
        let req = self.req;
        let bytes_in = (req.method.as_str().len()
            + req.raw_path().len()
            + " HTTP/1.1\r\n".len()
            + head_len(&req.headers)) as u64
            + self.body_in;
        let bytes_out = self.response.map_or(0, |r| {
            self.body_out + ("HTTP/1.1 200 OK\r\n".len() + head_len(&r.headers)) as u64
        });
        (bytes_in, bytes_out)
    }

    /// Counts a proxied request in its domain's traffic series and the last attempt's time in
    /// its backend's (earlier attempts' are counted when they fail).
    fn count_traffic(&self, log: &LogTimes) {
        let Some(target) = self.route else {
            return;
        };
        let (bytes_in, bytes_out) = self.wire_bytes();
        let duration_us = log.started.elapsed().as_micros() as u64;
        target
            .route
            .traffic
            .counters()
            .record(self.status(), bytes_in, bytes_out, duration_us);
        let upstream_us = log
            .upstream_us
            .or_else(|| log.attempt_started.map(|t| t.elapsed().as_micros() as u64));
        if let (Some(u), Some(us)) = (self.backend, upstream_us) {
            u.runtime.traffic.counters().observe(us);
        }
    }

    /// The access log record (none when the domain's log is off).
    fn log_request(&self, data: &DataPlane, log: LogTimes) {
        let looked_up;
        let route: Option<&Route> = match self.route {
            Some(target) => Some(&target.route),
            // Our answers for a known domain (the https redirect) follow its switches too.
            None if !self.host.is_empty() => {
                looked_up = data.routes.load().lookup(self.host);
                looked_up.as_ref().map(|t| &*t.route)
            }
            None => None,
        };
        if route.is_some_and(|r| !r.access_log) {
            return;
        }
        let req = self.req;
        let header = |name: http::header::HeaderName| {
            req.headers.get(name).map_or(&b""[..], |v| v.as_bytes())
        };
        let client_ip = self.client.map(|a| a.ip().to_string()).unwrap_or_default();
        let tls_version = super::tls::tls_version(self.ssl);
        let sni = super::tls::sni_of(self.ssl);
        let keep_query = route.is_none_or(|r| r.access_log_query);
        let text = Text {
            client_ip: client_ip.as_bytes(),
            method: req.method.as_str().as_bytes(),
            host: self.host.as_bytes(),
            path: req.uri.path().as_bytes(),
            query: match req.uri.query() {
                Some(q) if keep_query => q.as_bytes(),
                _ => b"",
            },
            request_id: self.request_id.as_bytes(),
            user_agent: header(http::header::USER_AGENT),
            referer: header(http::header::REFERER),
            sni: sni.as_deref().unwrap_or("").as_bytes(),
            tag: route.map_or(&b""[..], |r| r.tag.as_bytes()),
        };
        let protocol = match req.version {
            http::Version::HTTP_10 | http::Version::HTTP_09 => Protocol::Http10,
            http::Version::HTTP_2 => Protocol::Http2,
            _ => Protocol::Http11,
        };
        let mut record = Record::new(&text, protocol);
        if let Some(u) = self.backend {
            record.set_backend(u.id.as_bytes(), log.backend_addr);
        }
        record.unix_ms = log.unix_ms;
        record.status = self.status();
        record.tls_version = tls_version;
        record.client_port = self.client.map_or(0, |a| a.port());
        record.attempts = self.attempts;
        (record.bytes_in, record.bytes_out) = self.wire_bytes();
        record.duration_us = log.started.elapsed().as_micros() as u64;
        record.upstream_connect_us = log.connect_us;
        record.upstream_duration_us = log
            .upstream_us
            .or_else(|| log.attempt_started.map(|t| t.elapsed().as_micros() as u64));
        data.access_log.log(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.set_uri(uri.parse().unwrap());
        if let Some(h) = host {
            r.insert_header("host", h).unwrap();
        }
        r
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(
            request_host(&req("/", Some("Example.COM:8080"))),
            "example.com"
        );
        assert_eq!(request_host(&req("/", Some("example.com."))), "example.com");
        assert_eq!(request_host(&req("https://a.test/x", None)), "a.test");
        assert_eq!(request_host(&req("/", Some("[::1]:80"))), "[::1]");
        assert_eq!(request_host(&req("/", None)), "");
    }
}
