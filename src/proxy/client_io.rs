//! The client side of a connection on the HTTP/1 path: plain TCP as a tokio socket of our
//! own, TLS as Pingora's stream.
//!
//! Why own the plain socket: Pingora's l4 stream reads through a 64 KiB buffer (a copy per
//! read, 64 KiB per connection), buffers writes (a flush per answer) and reads the clock on
//! every pending read to account "pending time". On the benchmark that was ~1 % of the
//! proxy's CPU per request, and the buffer is most of the memory of an idle keep-alive
//! connection. Plain connections come from our own accept loop (`listeners`) as sockets; a
//! connection that Pingora's proxy served a request on comes back as Pingora's stream, and
//! its socket is taken again (five system calls: dup, deregister, close, register, and a
//! socket option read) once it is kept alive after a request.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum ClientIo {
    /// The socket, and the client's address: what a PROXY protocol header gave, or the
    /// peer's as accepted (`None`: asked of the socket when needed).
    Tcp(TcpStream, Option<std::net::SocketAddr>),
    Pingora(Stream),
}

impl ClientIo {
    /// Takes the socket out of a plain-TCP Pingora stream (unbuffered: nothing read ahead
    /// is left behind in it); anything else (TLS, other transports, a socket already taken)
    /// stays as it is. `false` if the socket could not be registered with the reactor (the
    /// connection is then closed).
    pub fn take_socket(&mut self) -> bool {
        let Self::Pingora(stream) = self else {
            return true;
        };
        // `(**stream)`: the stream inside the box, not the box.
        if stream.get_ssl_digest().is_some() {
            return true;
        }
        let Some(l4) = (**stream).as_any().downcast_ref::<L4Stream>() else {
            return true;
        };
        // SAFETY: fcntl on the open descriptor owned by `l4`; F_DUPFD_CLOEXEC makes a new
        // descriptor for the same socket.
        let dup = unsafe { libc::fcntl(l4.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            // Pingora's stream serves on, only a little slower.
            return true;
        }
        // SAFETY: `dup` is a valid descriptor that nothing else owns.
        let socket = unsafe { std::net::TcpStream::from_raw_fd(dup) };
        match TcpStream::from_std(socket) {
            Ok(tcp) => {
                // Drops Pingora's stream: its descriptor is deregistered and closed; the
                // socket lives on in `dup` (non-blocking mode and options belong to it).
                *self = Self::Tcp(tcp, None);
                true
            }
            Err(e) => {
                tracing::warn!("client connection dropped: cannot register its socket: {e}");
                false
            }
        }
    }

    /// Back to a Pingora stream (for Pingora's full proxy), with the socket digest its
    /// rules read the client address from.
    pub fn into_pingora(self) -> Stream {
        match self {
            Self::Pingora(stream) => stream,
            Self::Tcp(tcp, client) => {
                let fd = tcp.as_raw_fd();
                let mut stream = L4Stream::from(tcp);
                match client {
                    Some(client) => super::edge::set_client_addr(&mut stream, client),
                    None => stream.set_socket_digest(SocketDigest::from_raw_fd(fd)),
                }
                Box::new(stream)
            }
        }
    }

    /// The client is at `addr` (from a PROXY protocol header), not at the socket's peer.
    /// Plain TCP only: a TLS stream got its address before the handshake (`Edge::before_tls`).
    pub fn set_client_addr(&mut self, addr: std::net::SocketAddr) {
        if let Self::Tcp(_, client) = self {
            *client = Some(addr);
        }
    }

    pub fn is_tls(&self) -> bool {
        match self {
            Self::Tcp(..) => false,
            Self::Pingora(stream) => stream.get_ssl_digest().is_some(),
        }
    }

    /// The client's address: the peer's, or what a PROXY protocol header said.
    pub fn client_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Tcp(_, Some(client)) => Some(*client),
            Self::Tcp(tcp, None) => tcp.peer_addr().ok(),
            Self::Pingora(stream) => stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied()),
        }
    }

    /// The address of this node the connection came to (a system call, once per backend
    /// connection that sends the PROXY protocol header).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Tcp(tcp, _) => tcp.local_addr().ok(),
            Self::Pingora(stream) => stream
                .get_socket_digest()
                .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied()),
        }
    }

    /// The TLS facts of the connection (version, SNI name), for the access log.
    pub fn ssl_digest(&self) -> Option<std::sync::Arc<pingora_core::protocols::tls::SslDigest>> {
        match self {
            Self::Tcp(..) => None,
            Self::Pingora(stream) => stream.get_ssl_digest(),
        }
    }

    /// Ends the connection after the last answer. TLS sends its close_notify and FIN. A
    /// plain connection is only flushed unless `then_read` (the caller reads what the client
    /// still sends, so the FIN must go first): its FIN is close(2)'s when the stream is
    /// dropped. shutdown(2) first would change nothing the client sees (unread data makes
    /// close(2) answer with a reset either way) and costs a system call per connection, as
    /// nginx does not.
    pub async fn close(&mut self, then_read: bool) {
        match self {
            Self::Tcp(tcp, _) => {
                if then_read {
                    let _ = tokio::io::AsyncWriteExt::shutdown(tcp).await;
                }
            }
            Self::Pingora(stream) => {
                let _ = tokio::io::AsyncWriteExt::flush(stream).await;
                if then_read || stream.get_ssl_digest().is_some() {
                    pingora_core::protocols::Shutdown::shutdown(stream.as_mut()).await;
                }
            }
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp, _) => Pin::new(tcp).poll_read(cx, buf),
            Self::Pingora(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(tcp, _) => Pin::new(tcp).poll_write(cx, buf),
            Self::Pingora(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(..) => Poll::Ready(Ok(())),
            Self::Pingora(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp, _) => Pin::new(tcp).poll_shutdown(cx),
            Self::Pingora(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
