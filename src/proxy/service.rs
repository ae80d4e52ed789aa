//! The Pingora `ProxyHttp` implementation: host routing, redirects, backend choice with
//! retry on failed connects, forwarding headers and the plain-text error answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};

use super::answers::{self, ACME_CHALLENGE_PREFIX};
use super::table::{Route, Upstream};
use super::DataPlane;
use crate::live::breaker::Failure;
use crate::live::{now_ms, BackendRuntime, InFlight};
use crate::observability::Metrics;

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
}

#[derive(Default)]
pub struct Ctx {
    route: Option<Arc<Route>>,
    host: String,
    tls: bool,
    /// Pool indexes this request already tried.
    tried: Vec<usize>,
    current: Option<Arc<Upstream>>,
    in_flight: InFlight<Arc<BackendRuntime>>,
    /// Set when we decide the answer ourselves (status, plain-text reason).
    failure: Option<(u16, String)>,
    counted: bool,
}

impl Ctx {
    fn release_current(&mut self) {
        self.current = None;
        self.in_flight.clear();
    }
}

/// Host of the request: `:authority` (h2) or `Host`, normalised for routing.
fn request_host(req: &RequestHeader) -> String {
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

async fn respond_plain(session: &mut Session, status: u16, body: String) -> Result<()> {
    let body = Bytes::from(body);
    let mut resp = ResponseHeader::build(status, Some(3))?;
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
        self.apply_client_timeout(session);
        ctx.tls = session
            .digest()
            .map(|d| d.ssl_digest.is_some())
            .unwrap_or(false);
        ctx.host = request_host(session.req_header());
        let table = self.data.routes.load();
        if let Some(token) = session
            .req_header()
            .uri
            .path()
            .strip_prefix(ACME_CHALLENGE_PREFIX)
        {
            if let Some(key_authorization) = table.challenge(token) {
                // Answered on every node: the CA may validate against any of them.
                respond_plain(session, 200, key_authorization.to_string()).await?;
                return Ok(true);
            }
        }
        let Some(route) = table.lookup(&ctx.host).cloned() else {
            respond_plain(session, 404, answers::no_virtual_host(&ctx.host)).await?;
            return Ok(true);
        };
        let path = session.req_header().uri.path();
        if !ctx.tls && route.http_to_https && !path.starts_with(ACME_CHALLENGE_PREFIX) {
            let pq = session
                .req_header()
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let location = answers::https_location(&ctx.host, self.https_port, pq);
            let mut resp = ResponseHeader::build(301, Some(3))?;
            resp.insert_header("location", &location)?;
            resp.insert_header("content-length", "0")?;
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(true);
        }
        if !self.data.live.peer_view.is_open() {
            // Just started: peers' health verdicts are a gossip round away. Waiting briefly
            // beats sending this request to a backend the cluster knows is down.
            self.data.live.peer_view.wait().await;
        }
        ctx.route = Some(route);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.release_current();
        let Some(route) = ctx.route.clone() else {
            return Err(Error::new(ErrorType::InternalError));
        };
        let Some(pick) = route.pick(&ctx.tried) else {
            ctx.failure = Some(if ctx.tried.is_empty() {
                (503, answers::no_healthy_backend(&route))
            } else {
                (502, answers::every_backend_failed(&route))
            });
            return Err(Error::new(ErrorType::HTTPStatus(
                ctx.failure.as_ref().map(|f| f.0).unwrap_or(502),
            )));
        };
        if pick.guard_rail {
            self.metrics.guard_rail_used();
        }
        let upstream = pick.upstream.clone();
        ctx.tried.push(pick.index);
        let Some(addr) = upstream.addr() else {
            return Err(Error::new(ErrorType::ConnectNoRoute));
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(self.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
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
        if let Some(u) = &ctx.current {
            u.runtime.failures.fetch_add(1, Ordering::Relaxed);
            self.metrics.upstream_connect_failure(&u.id);
            if u.runtime
                .health
                .breaker
                .record_failure(Failure::Connect, now_ms())
            {
                tracing::warn!(backend = %u.id, "circuit breaker opened after a failed connect");
            }
        }
        // A failed connect sent nothing upstream: always safe to try another backend.
        if let Some(route) = &ctx.route {
            if route.has_untried(&ctx.tried) {
                e.set_retry(true);
            }
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
        if client_reused && retriable {
            // A pooled connection the backend had already closed (keep-alive limit, idle
            // timeout): not the backend's fault. Retry, the same backend allowed.
            ctx.tried.pop();
            e.set_retry(true);
            return e;
        }
        if let Some(u) = &ctx.current {
            if u.runtime
                .health
                .breaker
                .record_failure(Failure::Soft, now_ms())
            {
                tracing::warn!(backend = %u.id, "circuit breaker opened after repeated failures");
            }
        }
        // Idempotent requests whose body we still have may go to another backend.
        let others = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.has_untried(&ctx.tried));
        e.set_retry(retriable && others);
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(u) = &ctx.current {
            let breaker = &u.runtime.health.breaker;
            if upstream_response.status.is_server_error() {
                if breaker.record_failure(Failure::Soft, now_ms()) {
                    tracing::warn!(backend = %u.id, "circuit breaker opened after repeated 5xx answers");
                }
            } else {
                breaker.record_success();
            }
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
            .map(|a| a.ip().to_string());
        if let Some(ip) = client_ip {
            let xff = match upstream_request
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
                _ => ip,
            };
            upstream_request.insert_header("x-forwarded-for", xff)?;
        }
        upstream_request
            .insert_header("x-forwarded-proto", if ctx.tls { "https" } else { "http" })?;
        upstream_request.insert_header("x-forwarded-host", ctx.host.as_str())?;
        // h2 clients send :authority only; HTTP/1.1 backends need Host.
        if upstream_request.headers.get(http::header::HOST).is_none() && !ctx.host.is_empty() {
            upstream_request.insert_header(http::header::HOST, ctx.host.as_str())?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, body) = match ctx.failure.take() {
            Some(f) => f,
            None => match (e.etype(), e.esource()) {
                (ErrorType::HTTPStatus(c), _) => (*c, format!("{c}\n")),
                (ErrorType::ConnectTimedout, _)
                | (ErrorType::ConnectRefused, _)
                | (ErrorType::ConnectNoRoute, _)
                | (ErrorType::ConnectError, _)
                | (ErrorType::TLSHandshakeFailure, _) => {
                    (502, answers::could_not_connect(&ctx.host))
                }
                (ErrorType::ReadTimedout, ErrorSource::Upstream)
                | (ErrorType::WriteTimedout, ErrorSource::Upstream) => {
                    (504, answers::backend_timed_out(&ctx.host))
                }
                (_, ErrorSource::Upstream) => {
                    (502, answers::backend_failed(&ctx.host, e.etype().as_str()))
                }
                (
                    ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
                    ErrorSource::Downstream,
                ) => (0, String::new()),
                (_, ErrorSource::Downstream) => (400, "400 Bad Request\n".to_string()),
                _ => (500, "500 Internal Server Error\n".to_string()),
            },
        };
        if code > 0 {
            if let Err(err) = respond_plain(session, code, body).await {
                tracing::debug!(error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
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
