//! How Pingora's proxy connects to a backend: a TCP connection (with TLS over it when the
//! backend wants it, `upstream_tls`) whose responses are relayed byte for byte, except chunk
//! sizes written with leading zeros, which lose them.
//!
//! Why: Pingora's HTTP/1 client parses chunk sizes with httparse, which counts leading zeros
//! towards a 16-digit limit, so a valid `00000000000000003` answers 502 on that path only
//! (nginx and HAProxy accept it, and so does the lean path's `chunked` tracker). Pingora takes
//! a custom L4 connector per peer; the stream it returns follows the response framing
//! (heads, `Content-Length`, chunked, informational answers, answers without a body) and
//! rewrites nothing else. Whenever it cannot be sure of the framing it stops rewriting for the
//! rest of the connection, which is exactly what Pingora sees without it.
//!
//! It also keeps the connections alive between requests, which Pingora's own pool cannot do
//! for a virtual socket (see [`NormalizingStream`]): the stream follows the requests too, and
//! goes back to the worker's pool when dropped between two exchanges.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::connectors::l4::Connect;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_core::{Error, ErrorType, Result};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::backend_io::BackendIo;
use super::chunked::ChunkedTracker;
use super::pool;
use super::send_proxy::ProxyHeader;
use super::strict::{MAX_HEAD, MAX_HEADERS};
use crate::clock::coarse_monotonic_ms;
use crate::upstream_tls::{HandshakeError, HandshakeFailure, UpstreamTls};

/// Connects to plaintext backends for Pingora's proxy (`HttpPeer::options.custom_l4`).
#[derive(Debug)]
pub struct BackendConnector {
    /// Pingora applies no connect timeout to a custom connector: this one does.
    pub connect_timeout: Duration,
    /// Sent first on the connection (`send_proxy_protocol`, `send_proxy`).
    pub proxy_header: Option<ProxyHeader>,
    /// TLS to the backend, after the header.
    pub tls: Option<Arc<UpstreamTls>>,
    /// Set when `connect` handed out a pooled connection: Pingora sees every connection of
    /// this connector as new, and a failure on a pooled one (the backend closed it while it
    /// was idle) may be retried like one on a connection Pingora reused itself.
    pub reused: AtomicBool,
}

#[async_trait]
impl Connect for BackendConnector {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(addr) = addr else {
            return Error::e_explain(ErrorType::ConnectError, "not an IP address");
        };
        if let Some(stream) = self.pooled(*addr) {
            return Ok(stream);
        }
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ConnectTimedout,
                    format!("timeout {:?} connecting to {addr}", self.connect_timeout),
                )
            }
            Ok(Err(e)) => {
                let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
                    ErrorType::ConnectRefused
                } else {
                    ErrorType::ConnectError
                };
                return Error::e_because(kind, format!("connecting to {addr}"), e);
            }
            Ok(Ok(tcp)) => tcp,
        };
        let mut tcp = tcp;
        if let Some(header) = &self.proxy_header {
            if let Err(e) = tcp.write_all(header.as_bytes()).await {
                let what = format!("sending the PROXY protocol header to {addr}");
                return Error::e_because(ErrorType::ConnectError, what, e);
            }
        }
        let io = match &self.tls {
            None => BackendIo::Plain(tcp),
            Some(tls) => match tokio::time::timeout(self.connect_timeout, tls.handshake(tcp)).await
            {
                Ok(Ok(session)) => BackendIo::Tls(Box::new(session)),
                Ok(Err(e)) => {
                    let what = format!("TLS handshake with {addr}");
                    return Error::e_because(ErrorType::TLSHandshakeFailure, what, e);
                }
                Err(_) => {
                    let e = HandshakeError {
                        kind: HandshakeFailure::Timeout,
                        detail: format!("no TLS session within {:?}", self.connect_timeout),
                    };
                    let what = format!("TLS handshake with {addr}");
                    return Error::e_because(ErrorType::TLSHandshakeFailure, what, e);
                }
            },
        };
        Ok(self.stream(io, *addr))
    }
}

impl BackendConnector {
    /// The TLS setting part of the pool key (0 for plain TCP), as on the lean path.
    fn tls_id(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.id)
    }

    /// Connections this connector may take from and give back to the worker's pool
    /// (`proxy::pool`, shared with the lean path): not one that carries a client's PROXY
    /// header, nor HTTP/2 (whose frames are not followed here).
    fn poolable(&self) -> bool {
        self.proxy_header.is_none() && !self.tls.as_ref().is_some_and(|t| t.http2)
    }

    /// An idle pooled connection to `addr`, if one is still open.
    fn pooled(&self, addr: std::net::SocketAddr) -> Option<Stream> {
        if !self.poolable() {
            return None;
        }
        let io = pool::take(addr, self.tls_id())?;
        self.reused.store(true, Ordering::Relaxed);
        Some(self.stream(io, addr))
    }

    fn stream(&self, io: BackendIo, addr: std::net::SocketAddr) -> Stream {
        // Pingora reads the HTTP/2 frames itself: nothing of its stream is rewritten.
        let rewrite = !self.tls.as_ref().is_some_and(|t| t.http2);
        let socket = NormalizingStream {
            io: Some(io),
            framing: ResponseFraming::default(),
            rewrite,
            pool_key: self.poolable().then(|| (addr, self.tls_id())),
            last_read_ms: coarse_monotonic_ms(),
            broken: false,
        };
        VirtualSocketStream::new(Box::new(socket)).into()
    }
}

/// The backend connection, rewriting what it reads with [`ResponseFraming`].
///
/// Pingora cannot pool it itself: its pool checks a connection's file descriptor against
/// the peer's address, and a virtual socket has none (-1), so every request on this path
/// used to open a new backend connection (51,741 connections for 51,179 requests, #16).
/// So a connection dropped between two exchanges goes back to the worker's pool
/// (`proxy::pool`), and [`BackendConnector::connect`] takes from it first.
struct NormalizingStream {
    /// `None` only once given back to the pool (in `drop`).
    io: Option<BackendIo>,
    framing: ResponseFraming,
    /// False for HTTP/2: its frames are relayed untouched.
    rewrite: bool,
    /// Where the connection goes back to when dropped at rest; `None`: it is closed.
    pool_key: Option<(std::net::SocketAddr, u64)>,
    /// `coarse_monotonic_ms` of the last read: Pingora's own pool may hold the stream for its
    /// idle timeout before dropping it, and a connection idle that long is not pooled again.
    last_read_ms: u64,
    /// An error, the end of the stream or a shutdown was seen: never pooled.
    broken: bool,
}

/// A connection dropped after being idle this long is closed, not pooled (the pool keeps a
/// connection for at most `pool::MAX_IDLE_MS` from when it is put back).
const REPOOL_WITHIN_MS: u64 = 5_000;

impl NormalizingStream {
    fn io(&mut self) -> io::Result<&mut BackendIo> {
        self.io
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for NormalizingStream {
    fn drop(&mut self) {
        let Some((addr, tls)) = self.pool_key else {
            return;
        };
        let fresh = coarse_monotonic_ms().saturating_sub(self.last_read_ms) < REPOOL_WITHIN_MS;
        if fresh && !self.broken && self.framing.at_rest() {
            if let Some(io) = self.io.take() {
                pool::put(addr, tls, io);
            }
        }
    }
}

impl fmt::Debug for NormalizingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NormalizingStream")
            .field("tcp", &self.io.as_ref().map(BackendIo::tcp))
            .finish()
    }
}

impl VirtualSocket for NormalizingStream {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => match &self.io {
                Some(io) => io.tcp().set_nodelay(true),
                None => Ok(()),
            },
            // Not asked for by our peers (no `tcp_keepalive` option is set), nor anything else.
            _ => Ok(()),
        }
    }
}

impl AsyncRead for NormalizingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let start = buf.filled().len();
            match Pin::new(this.io()?).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    this.broken = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
            let read = buf.filled().len() - start;
            if read == 0 {
                this.broken = true;
            } else if this.pool_key.is_some() {
                this.last_read_ms = coarse_monotonic_ms();
            }
            if read == 0 || !this.rewrite {
                // End of stream.
                return Poll::Ready(Ok(()));
            }
            let kept = this.framing.rewrite(&mut buf.filled_mut()[start..]);
            buf.set_filled(start + kept);
            // Bytes that were all dropped (leading zeros) are not an end of stream: read on.
            if kept > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for NormalizingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(this.io()?).poll_write(cx, buf);
        match &written {
            Poll::Ready(Ok(n)) if this.rewrite => this.framing.request_bytes(&buf[..*n]),
            Poll::Ready(Err(_)) => this.broken = true,
            _ => {}
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io()?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.broken = true;
        Pin::new(this.io()?).poll_shutdown(cx)
    }
}

/// Where the backend's byte stream is.
#[derive(Debug)]
enum Phase {
    /// In a response head: the bytes so far.
    Head(Vec<u8>),
    /// In a chunked body.
    Chunked(ChunkedTracker),
    /// In a body of known length: the bytes left.
    Length(u64),
    /// Nothing more is rewritten on this connection (a tunnel, a body that ends with the
    /// connection, or framing this module does not follow).
    Relay,
}

/// Where the requests written to the backend are: with the responses' [`Phase`], this tells
/// when the connection is between two exchanges and may carry another request.
#[derive(Debug)]
enum RequestPhase {
    /// Between requests (or before the first).
    Idle,
    /// In a request head: the bytes so far.
    Head(Vec<u8>),
    Chunked(ChunkedTracker),
    /// In a body of known length: the bytes left.
    Length(u64),
    /// Not followed (an upgrade, CONNECT, a head this module cannot read): never at rest.
    Unknown,
}

/// Follows the responses on one backend connection (one request at a time: Pingora does not
/// pipeline to backends) and takes the leading zeros out of chunk sizes; follows the requests
/// too, to know when the connection is at rest.
#[derive(Debug)]
pub struct ResponseFraming {
    phase: Phase,
    request: RequestPhase,
    /// False once either side asked to close, spoke HTTP/1.0 without keep-alive, or a response
    /// ended before its request did: the connection is not reused then.
    keep_alive: bool,
    /// The first bytes of the request being written (its method), until a response ends.
    request_start: Vec<u8>,
    /// Whether the next request written starts a new exchange.
    awaiting_request: bool,
    scratch: Vec<u8>,
}

impl Default for ResponseFraming {
    fn default() -> Self {
        Self {
            phase: Phase::Head(Vec::new()),
            request: RequestPhase::Idle,
            keep_alive: true,
            request_start: Vec::new(),
            awaiting_request: true,
            scratch: Vec::new(),
        }
    }
}

impl ResponseFraming {
    /// Notes the bytes of a request written to the backend: a `HEAD` request's answer has no
    /// body whatever its headers say.
    pub fn request_bytes(&mut self, bytes: &[u8]) {
        if self.awaiting_request {
            self.request_start.clear();
            self.awaiting_request = false;
        }
        let want = 5usize.saturating_sub(self.request_start.len());
        self.request_start
            .extend_from_slice(&bytes[..want.min(bytes.len())]);
        self.follow_request(bytes);
    }

    /// True between two exchanges: every request written ended, its response was read to its
    /// end and nothing more, and neither side asked to close.
    pub fn at_rest(&self) -> bool {
        self.keep_alive
            && self.awaiting_request
            && matches!(self.request, RequestPhase::Idle)
            && matches!(&self.phase, Phase::Head(seen) if seen.is_empty())
    }

    fn follow_request(&mut self, mut rest: &[u8]) {
        while !rest.is_empty() {
            match &mut self.request {
                RequestPhase::Unknown => return,
                RequestPhase::Idle => self.request = RequestPhase::Head(Vec::new()),
                RequestPhase::Head(seen) => {
                    let before = seen.len();
                    let Some(end) = extend_head(seen, rest) else {
                        if seen.len() > MAX_HEAD {
                            self.request = RequestPhase::Unknown;
                        }
                        return;
                    };
                    let head = std::mem::take(seen);
                    rest = &rest[end - before..];
                    self.request = self.request_body(&head[..end]);
                }
                RequestPhase::Length(left) => {
                    let take = rest.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= take as u64;
                    rest = &rest[take..];
                    if *left == 0 {
                        self.request = RequestPhase::Idle;
                    }
                }
                RequestPhase::Chunked(tracker) => match tracker.feed(rest) {
                    Ok(Some(used)) => {
                        rest = &rest[used..];
                        self.request = RequestPhase::Idle;
                    }
                    Ok(None) => return,
                    Err(_) => self.request = RequestPhase::Unknown,
                },
            }
        }
    }

    /// The framing of what follows a request head.
    fn request_body(&mut self, head: &[u8]) -> RequestPhase {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = request.parse(head) else {
            return RequestPhase::Unknown;
        };
        if request.method == Some("CONNECT") {
            return RequestPhase::Unknown;
        }
        if request.version != Some(1) || asks_to_close(request.headers) {
            self.keep_alive = false;
        }
        if request
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"))
        {
            return RequestPhase::Unknown;
        }
        match body_framing(request.headers) {
            Some(BodyFraming::Chunked) => RequestPhase::Chunked(ChunkedTracker::default()),
            Some(BodyFraming::Length(0)) | Some(BodyFraming::None) => RequestPhase::Idle,
            Some(BodyFraming::Length(n)) => RequestPhase::Length(n),
            None => RequestPhase::Unknown,
        }
    }

    fn head_request(&self) -> bool {
        self.request_start.starts_with(b"HEAD ")
    }

    /// Rewrites `data` (bytes just read from the backend) in place; returns how many bytes
    /// of it are kept.
    pub fn rewrite(&mut self, data: &mut [u8]) -> usize {
        let mut read = 0;
        let mut kept = 0;
        while read < data.len() {
            match &mut self.phase {
                Phase::Relay => {
                    data.copy_within(read.., kept);
                    kept += data.len() - read;
                    read = data.len();
                }
                Phase::Length(left) => {
                    let take =
                        (data.len() - read).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    data.copy_within(read..read + take, kept);
                    (read, kept) = (read + take, kept + take);
                    *left -= take as u64;
                    if *left == 0 {
                        self.response_done();
                    }
                }
                Phase::Head(seen) => {
                    let before = seen.len();
                    let Some(end) = extend_head(seen, &data[read..]) else {
                        if seen.len() > MAX_HEAD {
                            // Pingora refuses it anyway.
                            self.phase = Phase::Relay;
                        }
                        data.copy_within(read.., kept);
                        kept += data.len() - read;
                        read = data.len();
                        continue;
                    };
                    // The head is relayed as it is.
                    let in_this_read = end - before;
                    data.copy_within(read..read + in_this_read, kept);
                    (read, kept) = (read + in_this_read, kept + in_this_read);
                    let head = std::mem::take(seen);
                    self.phase = self.after_head(&head[..end]);
                }
                Phase::Chunked(tracker) => {
                    self.scratch.clear();
                    match tracker.feed_normalized(&data[read..], &mut self.scratch) {
                        Ok(ended) => {
                            // Never longer than what it came from (`feed_normalized`).
                            let n = self.scratch.len();
                            data[kept..kept + n].copy_from_slice(&self.scratch);
                            kept += n;
                            match ended {
                                Some(used) => {
                                    read += used;
                                    self.response_done();
                                }
                                None => read = data.len(),
                            }
                        }
                        Err(_) => {
                            // Relayed as it is: Pingora finds the error itself.
                            self.phase = Phase::Relay;
                        }
                    }
                }
            }
        }
        kept
    }

    fn response_done(&mut self) {
        self.phase = Phase::Head(Vec::new());
        self.awaiting_request = true;
        if !matches!(self.request, RequestPhase::Idle) {
            // Answered before its request ended: what the backend makes of the rest is
            // unknown.
            self.keep_alive = false;
        }
    }

    /// The framing of what follows a response head, as Pingora's client decides it.
    fn after_head(&mut self, head: &[u8]) -> Phase {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = response.parse(head) else {
            return Phase::Relay;
        };
        let status = response.code.unwrap_or(0);
        let keeps_alive = if response.version == Some(1) {
            !asks_to_close(response.headers)
        } else {
            has_token(response.headers, "connection", "keep-alive")
                && !asks_to_close(response.headers)
        };
        if !keeps_alive && !(100..=199).contains(&status) {
            self.keep_alive = false;
        }
        match status {
            // A tunnel (or whatever Pingora makes of it): not followed.
            101 => return Phase::Relay,
            100..=199 => return Phase::Head(Vec::new()),
            204 | 304 => {
                self.response_done();
                return Phase::Head(Vec::new());
            }
            _ if self.head_request() => {
                self.response_done();
                return Phase::Head(Vec::new());
            }
            _ => {}
        }
        match body_framing(response.headers) {
            Some(BodyFraming::Chunked) => Phase::Chunked(ChunkedTracker::default()),
            Some(BodyFraming::Length(0)) => {
                self.response_done();
                Phase::Head(Vec::new())
            }
            Some(BodyFraming::Length(n)) => Phase::Length(n),
            // A body until close, or something unusual: left to Pingora, untouched.
            Some(BodyFraming::None) | None => Phase::Relay,
        }
    }
}

/// Appends `bytes` to the head read so far; returns where the head ends (after its blank
/// line) once it does. Only the new bytes and the 3 before them are searched.
fn extend_head(seen: &mut Vec<u8>, bytes: &[u8]) -> Option<usize> {
    let from = seen.len().saturating_sub(3);
    seen.extend_from_slice(bytes);
    seen[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| from + at + 4)
}

/// How a message's body is delimited, by its headers.
enum BodyFraming {
    Chunked,
    Length(u64),
    /// Neither header.
    None,
}

/// The body framing `headers` give, as Pingora reads them (Transfer-Encoding wins over
/// Content-Length); `None` for framing this module does not follow (another last coding,
/// differing or malformed lengths).
fn body_framing(headers: &[httparse::Header<'_>]) -> Option<BodyFraming> {
    let last_te = headers
        .iter()
        .rev()
        .find(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    if let Some(te) = last_te {
        let last_token = te.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
        return last_token
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
            .then_some(BodyFraming::Chunked);
    }
    let mut length = None;
    for h in headers {
        if !h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let parsed = std::str::from_utf8(h.value)
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok());
        match (parsed, length) {
            (Some(n), None) => length = Some(n),
            (Some(n), Some(m)) if n == m => {}
            _ => return None,
        }
    }
    Some(length.map_or(BodyFraming::None, BodyFraming::Length))
}

/// A `Connection` header with the `close` token.
fn asks_to_close(headers: &[httparse::Header<'_>]) -> bool {
    has_token(headers, "connection", "close")
}

fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `response` in pieces of `step` bytes after the request `request`.
    fn rewritten(request: &str, response: &str, step: usize) -> String {
        let mut framing = ResponseFraming::default();
        framing.request_bytes(request.as_bytes());
        let mut out = Vec::new();
        for piece in response.as_bytes().chunks(step) {
            let mut data = piece.to_vec();
            let kept = framing.rewrite(&mut data);
            out.extend_from_slice(&data[..kept]);
        }
        String::from_utf8(out).unwrap()
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const HEAD: &str = "HEAD / HTTP/1.1\r\nHost: a\r\n\r\n";

    #[test]
    fn rewrites_only_leading_zeros_of_chunk_sizes() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let cases: &[(&str, &str, &str)] = &[
            // (request, response, what Pingora reads)
            (
                GET,
                &format!("{chunked}00000000000000003\r\nabc\r\n0\r\n\r\n"),
                &format!("{chunked}03\r\nabc\r\n0\r\n\r\n"),
            ),
            (
                GET,
                &format!("{chunked}0003;ext=0\r\n000\r\n00000\r\n\r\n"),
                &format!("{chunked}03;ext=0\r\n000\r\n0\r\n\r\n"),
            ),
            // Chunk data that looks like sizes is data.
            (
                GET,
                &format!("{chunked}6\r\n000003\r\n0\r\n\r\n"),
                &format!("{chunked}6\r\n000003\r\n0\r\n\r\n"),
            ),
            // A Content-Length body is not rewritten, nor the next response's zeros... until
            // its own chunked body.
            (
                GET,
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n00003",
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n00003",
            ),
            // Informational answers come before the real one.
            (
                GET,
                &format!("HTTP/1.1 100 Continue\r\n\r\n{chunked}03\r\nabc\r\n0\r\n\r\n"),
                &format!("HTTP/1.1 100 Continue\r\n\r\n{chunked}03\r\nabc\r\n0\r\n\r\n"),
            ),
            // No body: a HEAD request, 204, 304. What follows is not rewritten as a body.
            (HEAD, &format!("{chunked}0003"), &format!("{chunked}0003")),
            (
                GET,
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n0003",
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n0003",
            ),
            // A tunnel, a body until close, unknown codings, odd lengths: untouched.
            (
                GET,
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n0003\r\n",
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n0003\r\n",
            ),
            (
                GET,
                "HTTP/1.1 200 OK\r\n\r\n0003\r\n",
                "HTTP/1.1 200 OK\r\n\r\n0003\r\n",
            ),
            (
                GET,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0003\r\n",
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0003\r\n",
            ),
            (
                GET,
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n0003",
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n0003",
            ),
            // A malformed chunked body is relayed as it is, for Pingora to refuse.
            (
                GET,
                &format!("{chunked}zz\r\n0003\r\n"),
                &format!("{chunked}zz\r\n0003\r\n"),
            ),
            // Transfer-Encoding wins over Content-Length, as in Pingora.
            (
                GET,
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n03\r\nabc\r\n0\r\n\r\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n03\r\nabc\r\n0\r\n\r\n",
            ),
        ];
        for (request, response, expected) in cases {
            for step in [1, 2, 3, 7, 4096] {
                assert_eq!(
                    &rewritten(request, response, step),
                    expected,
                    "{response:?} in pieces of {step}"
                );
            }
        }
    }

    #[test]
    fn follows_responses_on_a_reused_connection() {
        let mut framing = ResponseFraming::default();
        let mut out = Vec::new();
        let exchanges = [
            (GET, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n0003"),
            (HEAD, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (
                GET,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n003\r\nabc\r\n0\r\nx: 0003\r\n\r\n",
            ),
            (GET, "HTTP/1.1 204 No Content\r\n\r\n"),
            (
                GET,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n00\r\n\r\n",
            ),
        ];
        for (request, response) in exchanges {
            framing.request_bytes(request.as_bytes());
            let mut data = response.as_bytes().to_vec();
            let kept = framing.rewrite(&mut data);
            out.extend_from_slice(&data[..kept]);
        }
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n0003\
             HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n03\r\nabc\r\n0\r\nx: 0003\r\n\r\n\
             HTTP/1.1 204 No Content\r\n\r\n\
             HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        );
    }

    #[test]
    fn a_response_in_one_read_with_the_next_starts_right() {
        // Two responses in one read (Pingora would only read the first; the tracker must
        // still find the second head).
        let mut framing = ResponseFraming::default();
        framing.request_bytes(GET.as_bytes());
        let both = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n01\r\nx\r\n0\r\n\r\n";
        let mut data = both.as_bytes().to_vec();
        let kept = framing.rewrite(&mut data);
        assert_eq!(
            std::str::from_utf8(&data[..kept]).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n01\r\nx\r\n0\r\n\r\n"
        );
    }

    /// Whether the connection is at rest after `exchange` (request and response bytes in the
    /// order written and read), fed in pieces of every size.
    fn at_rest_after(exchange: &[(bool, &str)]) -> bool {
        let mut answers = Vec::new();
        for step in [1, 2, 5, 4096] {
            let mut framing = ResponseFraming::default();
            for (is_request, bytes) in exchange {
                for piece in bytes.as_bytes().chunks(step) {
                    if *is_request {
                        framing.request_bytes(piece);
                    } else {
                        let mut data = piece.to_vec();
                        framing.rewrite(&mut data);
                    }
                }
            }
            answers.push(framing.at_rest());
        }
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{exchange:?}: {answers:?}"
        );
        answers[0]
    }

    #[test]
    fn at_rest_only_between_whole_exchanges_that_keep_alive() {
        const Q: bool = true;
        const A: bool = false;
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let post = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n";
        let chunked_post = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let cases: &[(&[(bool, &str)], bool)] = &[
            (&[], true),
            (&[(Q, GET), (A, ok)], true),
            (&[(Q, GET), (A, ok), (Q, GET), (A, ok)], true),
            (&[(Q, GET), (A, "HTTP/1.1 204 No Content\r\n\r\n")], true),
            (&[(Q, HEAD), (A, "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")], true),
            (&[(Q, post), (Q, "abc"), (A, ok)], true),
            (&[(Q, chunked_post), (Q, "3\r\nabc\r\n0\r\n\r\n"), (A, ok)], true),
            (
                &[
                    (Q, GET),
                    (A, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
                ],
                true,
            ),
            // Mid-exchange.
            (&[(Q, GET)], false),
            (&[(Q, "GET / HT")], false),
            (&[(Q, GET), (A, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")], false),
            (&[(Q, GET), (A, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")], false),
            (&[(Q, GET), (A, "HTTP/1.1 100 Continue\r\n\r\n")], false),
            // More than one response: a byte the backend sent unasked.
            (&[(Q, GET), (A, ok), (A, "H")], false),
            // The request body not all sent, even if answered (an early 413).
            (&[(Q, post), (Q, "ab"), (A, ok)], false),
            (&[(Q, post), (A, ok), (Q, "abc")], false),
            (&[(Q, chunked_post), (Q, "3\r\nabc\r\n"), (A, ok)], false),
            // Either side closes, or speaks HTTP/1.0 without keep-alive.
            (&[(Q, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n"), (A, ok)], false),
            (&[(Q, GET), (A, "HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n")], false),
            (&[(Q, GET), (A, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")], false),
            (&[(Q, GET), (A, "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")], false),
            (&[(Q, GET), (A, "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok")], true),
            // A body until close, a tunnel, CONNECT, an upgrade, framing not followed.
            (&[(Q, GET), (A, "HTTP/1.1 200 OK\r\n\r\nok")], false),
            (&[(Q, "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"), (A, "HTTP/1.1 101 Switching Protocols\r\n\r\n")], false),
            (&[(Q, "GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n"), (A, ok)], false),
            (&[(Q, "CONNECT a:443 HTTP/1.1\r\n\r\n"), (A, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")], false),
            (&[(Q, "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), (A, ok)], false),
            (&[(Q, "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"), (A, ok)], false),
            (&[(Q, GET), (A, "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nok")], false),
        ];
        for (exchange, expected) in cases {
            assert_eq!(at_rest_after(exchange), *expected, "{exchange:?}");
        }
    }
}
