//! One client connection on the lean path: its stream, the bytes read but not yet consumed,
//! the buffers reused from request to request, and the timed writes to the client.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::client_io::ClientIo;
use super::super::deadline::IoDeadline;
use super::super::request_id::RequestId;
use super::buffers;
use crate::proxy::backend_io::BackendIo;

/// Closing with a request body unread: the rest is read and dropped for up to this long
/// between reads, and this long in all (nginx's `lingering_timeout`, `lingering_time`), so the
/// kernel does not answer it with a reset that can destroy our answer in flight.
const LINGER_BETWEEN_READS: Duration = Duration::from_secs(5);
const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// One client connection: the stream and the bytes read from it but not yet consumed.
pub(super) struct Client {
    pub(super) stream: ClientIo,
    pub(super) buf: Vec<u8>,
    pub(super) filled: usize,
    pub(super) tls: bool,
    /// The client's address, after a PROXY protocol header: known once per connection.
    pub(super) client_addr: Option<SocketAddr>,
    pub(super) client_ip: Option<String>,
    /// The client is a trusted forwarder (`[proxy] trusted_forwarders`): its
    /// `X-Forwarded-*` headers are kept.
    pub(super) trusted_forwarder: bool,
    /// Upstream request (or our own answer) being built.
    pub(super) out: Vec<u8>,
    /// Response head rewritten for the client, when it cannot pass through as it came.
    pub(super) resp_head: Vec<u8>,
    /// The request being answered is a HEAD: our own answers carry no body.
    pub(super) head_request: bool,
    /// Times out backend reads and writes (upstream read timeout) and writes to the client
    /// (client timeout) that wait too long.
    pub(super) deadline: IoDeadline,
    /// `[proxy] client_timeout_secs`.
    pub(super) client_timeout: Duration,
    /// The connection ends with a request body (maybe) unread: read it away before closing.
    pub(super) linger: bool,
    /// A backend connection that started with this client's PROXY protocol header
    /// (`send_proxy_protocol`): kept for this client's next request, never pooled.
    pub(super) private_upstream: Option<((SocketAddr, u64), BackendIo)>,
    /// For the access log: the TLS facts, bytes sent so far.
    pub(super) ssl: Option<std::sync::Arc<pingora_core::protocols::tls::SslDigest>>,
    pub(super) sni: Option<std::sync::Arc<str>>,
    pub(super) sent: u64,
    /// The request being answered: its id (none when ids are off), and what its forwarding
    /// did (for the access log).
    pub(super) request_id: RequestId,
    pub(super) trace: Trace,
    /// A plain connection read through Pingora's stream (back from Pingora's proxy after a
    /// hand-over): its socket is taken (`ClientIo::take_socket`) once the connection is kept
    /// alive after a request.
    pub(super) socket_to_take: bool,
    /// A new connection: its first request is most likely in already, so the first read
    /// goes straight to the socket rather than through a wait for readiness (a trip through
    /// the reactor per connection).
    fresh: bool,
}

/// What forwarding one request did, for its access log line. Times are taken only when
/// `timing` is set (the request is logged).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Trace {
    pub(super) timing: bool,
    pub(super) attempts: u16,
    /// Index in the route's pool of the last backend tried, and the address used.
    pub(super) backend: Option<usize>,
    pub(super) backend_addr: Option<std::net::SocketAddr>,
    pub(super) connect_us: Option<u64>,
    pub(super) upstream_us: Option<u64>,
}

impl Client {
    pub(super) fn new(stream: ClientIo, client_timeout: Duration) -> Self {
        let tls = stream.is_tls();
        let client_addr = stream.client_addr();
        let client_ip = client_addr.map(|a| a.ip().to_string());
        let ssl = stream.ssl_digest();
        let sni = super::super::tls::sni_of(ssl.as_deref());
        Self {
            stream,
            buf: buffers::take(buffers::REQUEST_BUF),
            filled: 0,
            tls,
            client_addr,
            client_ip,
            trusted_forwarder: false,
            out: buffers::take_head(),
            resp_head: Vec::new(),
            head_request: false,
            deadline: IoDeadline::default(),
            client_timeout,
            linger: false,
            private_upstream: None,
            ssl,
            sni,
            sent: 0,
            request_id: RequestId::NONE,
            trace: Trace::default(),
            socket_to_take: false,
            fresh: true,
        }
    }

    /// A connection back from Pingora's proxy, with the bytes it did not read.
    pub(super) fn resume(stream: ClientIo, unread: &[u8], client_timeout: Duration) -> Self {
        let mut client = Self::new(stream, client_timeout);
        client.fresh = false;
        client.socket_to_take = !client.tls && matches!(client.stream, ClientIo::Pingora(_));
        if unread.len() > client.buf.len() {
            client.buf.resize(unread.len(), 0);
        }
        client.buf[..unread.len()].copy_from_slice(unread);
        client.filled = unread.len();
        client
    }

    pub(super) fn into_parts(self) -> (Stream, Bytes) {
        let unread = Bytes::copy_from_slice(&self.buf[..self.filled]);
        (self.stream.into_pingora(), unread)
    }

    pub(super) fn ip(&self) -> Option<std::net::IpAddr> {
        self.client_addr.map(|a| a.ip())
    }

    /// Serves the rest of a plain connection on its own socket (`ClientIo::take_socket`);
    /// `false` when that failed and the connection must close.
    pub(super) fn take_socket(&mut self) -> bool {
        self.socket_to_take = false;
        self.stream.take_socket()
    }

    /// The client is at `addr`, as a PROXY protocol header said.
    pub(super) fn set_client_addr(&mut self, addr: SocketAddr) {
        self.stream.set_client_addr(addr);
        self.client_addr = Some(addr);
        self.client_ip = Some(addr.ip().to_string());
    }

    /// Drops the first `n` buffered bytes (a request that has been handled).
    pub(super) fn consume(&mut self, n: usize) {
        let n = n.min(self.filled);
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// Reads more bytes; `Ok(0)` at end of stream. Grows the buffer up to `limit`. With
    /// nothing buffered (a keep-alive connection between requests), the buffer is given back
    /// while the connection waits.
    pub(super) async fn read_more(&mut self, limit: usize) -> io::Result<usize> {
        let fresh = std::mem::take(&mut self.fresh);
        if self.filled == 0 {
            buffers::give(std::mem::take(&mut self.buf));
            buffers::give_head(std::mem::take(&mut self.out));
            buffers::give_head(std::mem::take(&mut self.resp_head));
            match &mut self.stream {
                ClientIo::Tcp(..) if fresh => {}
                // Readiness comes from the reactor: no system call more per request.
                ClientIo::Tcp(tcp, _) => tcp.readable().await?,
                // A new plain connection's first request: read straight into the buffer
                // (Pingora's stream has no readiness to wait on).
                ClientIo::Pingora(_) if self.socket_to_take => {}
                // TLS: one byte, the rest of the record stays decrypted in the TLS buffers.
                ClientIo::Pingora(stream) => {
                    let mut first = [0u8; 1];
                    let n = stream.read(&mut first).await?;
                    if n == 0 {
                        return Ok(0);
                    }
                    self.buf = buffers::take(buffers::REQUEST_BUF);
                    self.out = buffers::take_head();
                    self.buf[0] = first[0];
                    self.filled = 1;
                    return Ok(1);
                }
            }
        }
        if self.buf.is_empty() {
            self.buf = buffers::take(buffers::REQUEST_BUF);
        }
        if self.out.capacity() == 0 {
            self.out = buffers::take_head();
        }
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
    pub(super) async fn drain_unread(&mut self) {
        let per_read = self.client_timeout.min(LINGER_BETWEEN_READS);
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

    pub(super) async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_out(bytes, true).await
    }

    /// Writes to the client (and flushes, if asked), giving up when the client takes nothing
    /// for the client timeout, as nginx's `send_timeout` (the timer restarts after every
    /// write that makes progress, so a slow reader is not cut off): a client that stops
    /// reading must not hold its connection, its task and a backend connection for good.
    pub(super) async fn write_out(&mut self, bytes: &[u8], flush: bool) -> io::Result<()> {
        let (stream, deadline, timeout) =
            (&mut self.stream, &mut self.deadline, self.client_timeout);
        let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading");
        let mut rest = bytes;
        while !rest.is_empty() {
            match deadline.run(timeout, stream.write(rest)).await {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => {
                    self.sent += n as u64;
                    rest = &rest[n..];
                }
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
