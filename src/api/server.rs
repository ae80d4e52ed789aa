//! The HTTP server under the management API, the metrics listener and the cluster RPC:
//! hyper with limits set so that requests over our documented limits reach the router, which
//! answers them in the API's error format (see [`super::errors`]), instead of hyper closing
//! them with an empty answer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

/// Hyper's own ceiling on a request head: above [`super::errors::MAX_HEAD_BYTES`], so heads
/// between the two get a JSON 431; beyond it hyper closes the connection with an empty 431.
const HYPER_MAX_BUF: usize = 256 * 1024;
/// Hyper's own ceiling on the header count (above [`super::errors::MAX_HEADERS`]).
const HYPER_MAX_HEADERS: usize = 1000;

pub async fn serve(listener: TcpListener, app: axum::Router) -> Result<(), String> {
    serve_maybe_tls(listener, app, None).await
}

/// How long a client gets to finish the TLS handshake (and to send its first byte).
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A TLS listener's settings.
#[derive(Clone)]
pub struct TlsListen {
    /// The configuration for the next connection (it may change: certificate rotation).
    pub config: Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>,
    /// What a connection that does not start with a TLS handshake gets.
    pub plaintext: Plaintext,
    /// Told of refused and plaintext connections (for metrics).
    pub on_event: Arc<dyn Fn(ConnEvent) + Send + Sync>,
}

impl TlsListen {
    /// One fixed configuration; plaintext connections just fail the handshake.
    pub fn fixed(config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            config: Arc::new(move || config.clone()),
            plaintext: Plaintext::FailHandshake,
            on_event: Arc::new(|_| {}),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Plaintext {
    /// Handed to TLS as it is, which fails (the management API).
    FailHandshake,
    /// Answered `426 Upgrade Required` and closed, so a plaintext client gets an answer it
    /// can act on instead of a reset (cluster RPC, `rpc_tls = "required"`).
    Refuse,
    /// Served without TLS (cluster RPC, `rpc_tls = "mixed"`).
    Serve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEvent {
    HandshakeFailed,
    PlaintextRefused,
    PlaintextServed,
}

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

const UPGRADE_REQUIRED: &[u8] = b"HTTP/1.1 426 Upgrade Required\r\nupgrade: TLS/1.3\r\n\
connection: close\r\ncontent-type: application/json\r\ncontent-length: 48\r\n\r\n\
{\"error\":\"this port requires TLS (mutual TLS)\"}\n";

/// [`serve`], over TLS when `tls` is given (each connection's handshake runs in its own task).
pub async fn serve_maybe_tls(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<TlsListen>,
) -> Result<(), String> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(HYPER_MAX_BUF)
        .max_headers(HYPER_MAX_HEADERS);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            // Out of descriptors and the like: back off instead of spinning.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            // A client that goes away mid-request (or mid-handshake) is not worth a log line.
            let Some(tls) = tls else {
                let io = TokioIo::new(JsonParseErrors::new(stream));
                let _ = builder.serve_connection_with_upgrades(io, service).await;
                return;
            };
            let started = tokio::time::Instant::now() + TLS_HANDSHAKE_TIMEOUT;
            if tls.plaintext != Plaintext::FailHandshake {
                let mut first = [0u8; 1];
                let peeked = tokio::time::timeout_at(started, stream.peek(&mut first)).await;
                if !matches!(peeked, Ok(Ok(1))) {
                    return;
                }
                if first[0] != TLS_HANDSHAKE_RECORD {
                    if tls.plaintext == Plaintext::Serve {
                        (tls.on_event)(ConnEvent::PlaintextServed);
                        let io = TokioIo::new(JsonParseErrors::new(stream));
                        let _ = builder.serve_connection_with_upgrades(io, service).await;
                    } else {
                        (tls.on_event)(ConnEvent::PlaintextRefused);
                        refuse_plaintext(stream).await;
                    }
                    return;
                }
            }
            let acceptor = tokio_rustls::TlsAcceptor::from((tls.config)());
            match tokio::time::timeout_at(started, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let io = TokioIo::new(JsonParseErrors::new(stream));
                    let _ = builder.serve_connection_with_upgrades(io, service).await;
                }
                _ => (tls.on_event)(ConnEvent::HandshakeFailed),
            }
        });
    }
}

/// Answers 426 to a plaintext request. What the client sent is read first (a little, briefly):
/// closing a socket with unread data resets it, and the client might lose the answer.
async fn refuse_plaintext(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), async {
        let mut total = 0;
        while total < 1024 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    let _ = stream.write_all(UPGRADE_REQUIRED).await;
    let _ = stream.shutdown().await;
}

/// hyper answers a request it cannot parse (a request target that is not ASCII, a head over
/// its own limits) by itself, with an empty 400/414/431, before any handler runs. Every 4xx of
/// ours carries a JSON body (`super::errors`), so a 4xx head with `content-length: 0` is
/// hyper's: this gives it the API's error format on its way out.
struct JsonParseErrors<T> {
    inner: T,
    /// A rewritten answer still being written.
    pending: Vec<u8>,
    written: usize,
}

impl<T> JsonParseErrors<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

/// The JSON version of hyper's own empty 4xx answer in `buf`, if that is what `buf` holds.
fn rewrite_empty_4xx(buf: &[u8]) -> Option<Vec<u8>> {
    const EMPTY: &[u8] = b"content-length: 0\r\n";
    if !buf.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = &buf[..head_end];
    let at = head.windows(EMPTY.len()).position(|w| w == EMPTY)?;
    let message = match &buf[9..12] {
        b"414" => "the request target is too long",
        b"431" => "the request head is too large",
        _ => "the request could not be parsed (a request target must be ASCII: percent-encode other bytes)",
    };
    let body = serde_json::json!({ "error": message }).to_string();
    let mut out = Vec::with_capacity(buf.len() + body.len() + 64);
    out.extend_from_slice(&head[..at]);
    out.extend_from_slice(
        format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&head[at + EMPTY.len()..]);
    out.extend_from_slice(body.as_bytes());
    out.extend_from_slice(&buf[head_end..]);
    Some(out)
}

impl<T: AsyncWrite + Unpin> JsonParseErrors<T> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(rewritten) = rewrite_empty_4xx(buf) {
            self.pending = rewritten;
            // Taken whole; the rest goes out on the next write, flush or shutdown.
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite_empty_4xx;

    #[test]
    fn only_empty_4xx_heads_are_rewritten() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(rewrite_empty_4xx(hyper_400).expect("rewritten")).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(
            head.contains("connection: close") && head.contains("date: x"),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("ASCII"));
        // Ours (a body), successes and 5xx pass unchanged.
        for kept in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{\"e\":\"x\"}"[..],
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n",
            b"data that is not a head",
        ] {
            assert!(rewrite_empty_4xx(kept).is_none());
        }
    }
}
