//! The proxy's two listeners, plain HTTP and HTTPS, as one Pingora service with accept loops
//! of our own.
//!
//! Why not Pingora's listeners: through them a new connection cost a task of Pingora's (its
//! future carries the TLS accept state inline, ~20 KiB moved into place per connection), a
//! boxed `process_new` future, a second task of ours (so that an idle connection does not hold
//! the first one's size), Pingora's stream wrapper around a plain socket (with a `getsockopt`
//! when it drops) and a `getsockname` to tell the two listeners apart. Plain connections cost
//! 1.08-1.11x nginx's CPU per connection-per-request that way (bench/README.md, session 14).
//! Here a connection is one `accept4` and one task, which owns the socket from the start and
//! boxes its TLS handshake so that it does not keep the handshake's size. What Pingora's
//! listeners gave is kept: the listening sockets are taken from, and put into, the table
//! Pingora hands to the next process in a graceful upgrade (same keys: the addresses as
//! configured), the loops stop when shutdown starts, and a full descriptor table pauses
//! accepting instead of spinning.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::Service;
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::h1::VhostApp;

/// As Pingora's listeners (and nginx's `backlog` on Linux, capped by `somaxconn`).
const BACKLOG: i32 = 65535;
/// A restart without a handover may find the old process still holding the port.
const BIND_TRIES: u32 = 30;
const BIND_RETRY: Duration = Duration::from_secs(1);
/// Out of descriptors (EMFILE, ENFILE): accepting again at once would spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Plain,
    Https,
}

impl Kind {
    fn setting(self) -> &'static str {
        match self {
            Self::Plain => "proxy.listen_addr_http",
            Self::Https => "proxy.listen_addr",
        }
    }
}

/// The proxy service: both listeners, on Pingora's worker runtimes.
pub struct ProxyListeners {
    app: Arc<VhostApp>,
    http: SocketAddr,
    https: SocketAddr,
}

impl ProxyListeners {
    pub fn new(app: Arc<VhostApp>, http: SocketAddr, https: SocketAddr) -> Self {
        Self { app, http, https }
    }
}

#[async_trait]
impl Service for ProxyListeners {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let mut loops = Vec::with_capacity(2);
        for (addr, kind) in [(self.http, Kind::Plain), (self.https, Kind::Https)] {
            match open(addr, fds.as_ref()).await {
                Ok(socket) => loops.push(accept_loop(
                    socket,
                    kind,
                    self.app.clone(),
                    shutdown.clone(),
                )),
                Err(e) => {
                    // A proxy that cannot take its port must not look as if it ran.
                    tracing::error!("cannot listen on {addr} ({}): {e}", kind.setting());
                    std::process::exit(1);
                }
            }
        }
        futures::future::join_all(loops).await;
        self.app.cleanup().await;
    }

    fn name(&self) -> &str {
        "proxy"
    }

    /// What a process started with `--upgrade` claims of the sockets handed to it: Pingora
    /// closes the rest (a listen address changed across an upgrade must not stay open,
    /// filling a backlog nobody accepts from).
    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(vec![self.http.to_string(), self.https.to_string()])
    }
}

/// The listening socket for `addr`: the one a process being upgraded handed over, else a new
/// one (put into the table for the next upgrade).
async fn open(addr: SocketAddr, fds: Option<&ListenFds>) -> io::Result<Socket> {
    let key = addr.to_string();
    let handed = fds.and_then(|fds| fds.lock().get(&key).copied());
    let socket = match handed {
        Some(fd) => {
            // SAFETY: the table's descriptors are listening sockets received from the old
            // process; each address is taken by one listener only.
            let socket = unsafe { Socket::from_raw_fd(fd) };
            // Listening again only updates the backlog (Linux), as Pingora does.
            socket.listen(BACKLOG)?;
            socket
        }
        None => {
            let socket = bind(addr).await?;
            if let Some(fds) = fds {
                fds.lock().add(key, socket.as_raw_fd());
            }
            socket
        }
    };
    socket.set_nonblocking(true)?;
    Ok(socket)
}

async fn bind(addr: SocketAddr) -> io::Result<Socket> {
    let mut tries = 0;
    loop {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // As Pingora's listeners: a restarted node binds while old connections linger.
        socket.set_reuse_address(true)?;
        match socket.bind(&addr.into()) {
            Ok(()) => {
                socket.listen(BACKLOG)?;
                return Ok(socket);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries + 1 < BIND_TRIES => {
                tries += 1;
                tracing::warn!("{addr} is in use, trying again");
                tokio::time::sleep(BIND_RETRY).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Accepts until shutdown starts; each connection is served in a task of its own on one of
/// the worker threads (as Pingora's listener spreads them), registered with that thread's
/// reactor.
async fn accept_loop(
    listener: Socket,
    kind: Kind,
    app: Arc<VhostApp>,
    mut shutdown: ShutdownWatch,
) {
    // SAFETY: the `Socket` owns its descriptor and the `AsyncFd` owns the `Socket`: it stays
    // open, the same descriptor, for as long as the registration lives. Readable only.
    let registered = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) };
    let listener = match registered {
        Ok(listener) => listener,
        Err(e) => {
            let e = io::Error::from(e);
            tracing::error!("cannot watch the listener ({}): {e}", kind.setting());
            std::process::exit(1);
        }
    };
    loop {
        let ready = tokio::select! {
            ready = listener.readable() => ready,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
                continue;
            }
        };
        let mut ready = match ready {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!("listener ({}) failed: {e}", kind.setting());
                break;
            }
        };
        match ready.try_io(|listener| accept(listener.get_ref())) {
            Ok(Ok((socket, peer))) => {
                let (app, shutdown) = (app.clone(), shutdown.clone());
                pingora_runtime::current_handle().spawn(async move {
                    match kind {
                        Kind::Plain => app.serve_plain(socket, peer, &shutdown).await,
                        Kind::Https => app.serve_tls(socket, peer, &shutdown).await,
                    }
                });
            }
            Ok(Err(e)) if is_out_of_descriptors(&e) => {
                tracing::warn!("accepting paused: {e}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
            // The connection went before it was taken (ECONNABORTED and the like).
            Ok(Err(e)) => tracing::debug!("accept failed: {e}"),
            // Nothing more to take: wait for the reactor.
            Err(_would_block) => {}
        }
    }
    tracing::info!("listener ({}) closed", kind.setting());
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One `accept4`: the socket non-blocking and close-on-exec from the start, and the peer's
/// address without a `getpeername`.
fn accept(listener: &Socket) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let fd = listener.as_raw_fd();
    // SAFETY: accept4 writes at most `len` bytes of address into the zeroed storage that
    // `try_init` gives, and sets `len` to what it wrote.
    let (socket, peer) = unsafe {
        SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                fd,
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(OwnedFd::from_raw_fd(fd))
            }
        })?
    };
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((std::net::TcpStream::from(socket), peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::server::Fds;
    use std::io::Read;

    fn table() -> ListenFds {
        Arc::new(Fds::new().into())
    }

    #[tokio::test]
    async fn a_new_socket_goes_into_the_upgrade_table_and_a_handed_one_is_taken() {
        let fds = table();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = open(addr, Some(&fds)).await.unwrap();
        let recorded = fds.lock().get("127.0.0.1:0").copied();
        assert_eq!(recorded, Some(first.as_raw_fd()));
        // What a process started with --upgrade finds: the same socket, not a new bind.
        let bound = first.local_addr().unwrap();
        let fd = first.as_raw_fd();
        std::mem::forget(first);
        let taken = open(addr, Some(&fds)).await.unwrap();
        assert_eq!(taken.as_raw_fd(), fd);
        assert_eq!(taken.local_addr().unwrap(), bound);
    }

    #[tokio::test]
    async fn a_port_in_use_is_tried_again_until_it_is_free() {
        // SO_REUSEADDR does not let a second socket listen where one listens already.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let bound = tokio::time::timeout(Duration::from_secs(3), bind(addr)).await;
        // Still trying after 3 s (a restarted node waits for its predecessor's exit)...
        assert!(bound.is_err(), "bind on a held port returned: {bound:?}");
        // ...and once the port is free, it gets it.
        drop(held);
        let socket = bind(addr).await.unwrap();
        assert_eq!(socket.local_addr().unwrap().as_socket(), Some(addr));
    }

    #[test]
    fn accept_gives_a_non_blocking_socket_and_the_peer_address() {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        listener.listen(BACKLOG).unwrap();
        listener.set_nonblocking(true).unwrap();
        let to = listener.local_addr().unwrap().as_socket().unwrap();
        // Nothing waiting: the listener says so rather than blocking.
        let none = accept(&listener).unwrap_err();
        assert_eq!(none.kind(), io::ErrorKind::WouldBlock);
        let client = std::net::TcpStream::connect(to).unwrap();
        let (mut accepted, peer) = accept(&listener).unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let mut byte = [0u8; 1];
        let read = accepted.read(&mut byte).unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::WouldBlock);
        // SAFETY: fcntl on a descriptor `accepted` owns.
        let flags = unsafe { libc::fcntl(accepted.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn running_out_of_descriptors_pauses_and_other_failures_do_not() {
        let cases = [
            (libc::EMFILE, true),
            (libc::ENFILE, true),
            (libc::ENOBUFS, true),
            (libc::ENOMEM, true),
            (libc::ECONNABORTED, false),
            (libc::EPROTO, false),
            (libc::EPERM, false),
        ];
        for (i, (errno, pauses)) in cases.into_iter().enumerate() {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(is_out_of_descriptors(&e), pauses, "row {i}: {e}");
        }
    }
}
