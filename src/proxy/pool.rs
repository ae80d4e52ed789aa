//! Idle keep-alive connections to backends for the fast HTTP/1 path, one pool per worker
//! thread: taking and returning a connection touches no lock and makes no system call.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};

use crate::clock::coarse_monotonic_ms;

use super::backend_io::BackendIo;

/// A connection idle for longer is closed rather than reused (backends commonly close idle
/// keep-alive connections after 60-75 s; reusing one at that moment would fail).
const MAX_IDLE_MS: u64 = 50_000;
/// Idle connections kept per backend address and worker thread. Generous: a connection is
/// only idle here if that many requests were once in flight to the backend at the same time,
/// and closing the surplus after a burst makes the next burst reconnect.
const MAX_IDLE_PER_ADDR: usize = 1024;

struct Idle {
    conn: BackendIo,
    /// `clock::coarse_monotonic_ms` when it was put back.
    since_ms: u64,
}

/// FNV-1a: backend addresses are not attacker-chosen, and SipHash showed up in profiles.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// Pooled by address and TLS setting (`UpstreamTls::id`, 0 for plain TCP): a connection made
/// with one server name or client certificate never carries another backend's request.
type Key = (SocketAddr, u64);

type IdleMap = HashMap<Key, VecDeque<Idle>, BuildHasherDefault<AddrHasher>>;

/// Every this many returns, the whole pool of the thread is swept: connections to addresses
/// that no request uses any more (a removed backend, a changed address) are closed only then.
const SWEEP_EVERY_PUTS: u32 = 4096;

#[derive(Default)]
struct Pool {
    idle: IdleMap,
    puts_since_sweep: u32,
}

thread_local! {
    static IDLE: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Drops the front (oldest) connections idle for `MAX_IDLE_MS` or longer.
fn drop_expired(idle: &mut VecDeque<Idle>, now: u64) {
    while idle
        .front()
        .is_some_and(|oldest| now.saturating_sub(oldest.since_ms) >= MAX_IDLE_MS)
    {
        idle.pop_front();
    }
}

/// Closes expired connections of every address, and forgets addresses left with none.
fn sweep(pool: &mut IdleMap, now: u64) {
    pool.retain(|_, idle| {
        drop_expired(idle, now);
        !idle.is_empty()
    });
}

/// An idle connection to `addr` (with TLS setting `tls`) that still looks open, if there is
/// one.
pub fn take(addr: SocketAddr, tls: u64) -> Option<BackendIo> {
    IDLE.with(|pool| {
        let mut pool = pool.borrow_mut();
        let idle = pool.idle.get_mut(&(addr, tls))?;
        let now = coarse_monotonic_ms();
        // Most recently used first: the warmest connection, the least likely to be closed.
        while let Some(candidate) = idle.pop_back() {
            if now.saturating_sub(candidate.since_ms) < MAX_IDLE_MS && still_open(&candidate.conn) {
                return Some(candidate.conn);
            }
        }
        None
    })
}

/// Returns a connection whose last response was read completely.
pub fn put(addr: SocketAddr, tls: u64, conn: BackendIo) {
    IDLE.with(|pool| {
        let mut pool = pool.borrow_mut();
        let now = coarse_monotonic_ms();
        pool.puts_since_sweep += 1;
        if pool.puts_since_sweep >= SWEEP_EVERY_PUTS {
            pool.puts_since_sweep = 0;
            sweep(&mut pool.idle, now);
        }
        let idle = pool.idle.entry((addr, tls)).or_default();
        // The oldest are at the front: close the ones idle too long (after a burst they would
        // otherwise stay below the warm ones, holding sockets the backend has closed).
        drop_expired(idle, now);
        if idle.len() < MAX_IDLE_PER_ADDR {
            idle.push_back(Idle {
                conn,
                since_ms: now,
            });
        }
    })
}

/// An idle connection has nothing to read. If the reactor saw it readable, the backend
/// closed it (or sent something unasked): either way it must not carry a request. This asks
/// the reactor's cached readiness, so the common case costs no system call.
pub fn still_open(conn: &BackendIo) -> bool {
    let conn = conn.tcp();
    let mut cx = Context::from_waker(Waker::noop());
    match conn.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(conn.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn a_sweep_closes_expired_connections_of_every_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gone: Key = ("127.0.0.1:9".parse().unwrap(), 0);
        let key: Key = (addr, 0);
        let now = 10 * MAX_IDLE_MS;
        let mut pool = IdleMap::default();
        for (key, since_ms) in [
            (gone, now - MAX_IDLE_MS),
            (key, now - MAX_IDLE_MS),
            (key, now),
        ] {
            let conn = BackendIo::Plain(TcpStream::connect(addr).await.unwrap());
            pool.entry(key)
                .or_default()
                .push_back(Idle { conn, since_ms });
        }
        sweep(&mut pool, now);
        assert!(
            !pool.contains_key(&gone),
            "an address left with no connection is forgotten"
        );
        assert_eq!(
            pool[&key].len(),
            1,
            "only the connection still fresh is kept"
        );
        assert_eq!(pool[&key][0].since_ms, now);
    }

    #[tokio::test]
    async fn reuses_open_connections_and_drops_closed_ones() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = BackendIo::Plain(TcpStream::connect(addr).await.unwrap());
        let (server_side, _) = listener.accept().await.unwrap();
        put(addr, 0, client);
        assert!(
            take(addr, 7).is_none(),
            "a connection of another TLS setting is not taken"
        );
        let client = take(addr, 0).expect("an open connection is reused");
        assert!(take(addr, 0).is_none(), "taken connections leave the pool");
        put(addr, 0, client);

        // The backend closes it while it is idle.
        let mut server_side = server_side;
        server_side.shutdown().await.unwrap();
        drop(server_side);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            take(addr, 0).is_none(),
            "a connection the backend closed is not reused"
        );
    }
}
