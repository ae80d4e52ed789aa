//! A connection to a backend on the HTTP/1.1 path: plain TCP or TLS over it. One type, so the
//! pool, the request writer and the response relay serve both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub enum BackendIo {
    Plain(TcpStream),
    /// Boxed: a TLS session is ~1 KiB of state the plain case does not carry.
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendIo {
    /// The socket under it (readiness of an idle connection, socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            BackendIo::Plain(tcp) => tcp,
            BackendIo::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            BackendIo::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            BackendIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            BackendIo::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            BackendIo::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            BackendIo::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Plain(tcp) => tcp.is_write_vectored(),
            BackendIo::Tls(tls) => tls.is_write_vectored(),
        }
    }
}
