//! Request ids (`X-Request-Id`), the same on both request paths: a valid id from the client
//! is kept, anything else is replaced by one made here. The id goes to the backend, back to
//! the client and into the access log.
//!
//! Valid: 1 to [`MAX_LEN`] bytes of ASCII letters, digits and `-_.:+/=@` (UUIDs, hex, base64,
//! the ids of nginx, Envoy, Heroku and AWS load balancers). Anything else (control bytes,
//! spaces, quotes, a very long value) is not passed on: it could be used to forge lines in a
//! backend's logs.
//!
//! Made here: 32 hex digits, a random per-process prefix and a per-thread counter: no lock, no
//! system call, no shared cache line per request.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const MAX_LEN: usize = 128;

/// An id held inline (no allocation); empty means none.
#[derive(Clone, Copy)]
pub struct RequestId {
    len: u8,
    bytes: [u8; MAX_LEN],
}

impl Default for RequestId {
    fn default() -> Self {
        Self::NONE
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+' | b'/' | b'=' | b'@')
}

/// Random per process: ids of two processes (or nodes) do not collide.
fn process_prefix() -> u64 {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        if random.is_err() {
            // No randomness: time and pid still tell processes apart.
            let t = crate::clock::unix_ms() ^ (u64::from(std::process::id()) << 40);
            b = t.to_le_bytes();
        }
        u64::from_le_bytes(b)
    })
}

/// Threads get disjoint counter ranges (2^48 ids each).
static THREADS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static NEXT: Cell<u64> = Cell::new(THREADS.fetch_add(1, Ordering::Relaxed) << 48);
}

impl RequestId {
    pub const NONE: RequestId = RequestId {
        len: 0,
        bytes: [0; MAX_LEN],
    };

    /// A client's id, if it is valid.
    pub fn from_client(value: &[u8]) -> Option<Self> {
        if value.is_empty() || value.len() > MAX_LEN || !value.iter().all(|b| allowed(*b)) {
            return None;
        }
        let mut id = Self::NONE;
        id.bytes[..value.len()].copy_from_slice(value);
        id.len = value.len() as u8;
        Some(id)
    }

    /// A new id: 32 lowercase hex digits.
    pub fn generate() -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = NEXT.with(|c| {
            let n = c.get();
            c.set(n.wrapping_add(1));
            n
        });
        let mut id = Self::NONE;
        for (i, word) in [process_prefix(), n].into_iter().enumerate() {
            for j in 0..16 {
                id.bytes[i * 16 + j] = HEX[((word >> (60 - 4 * j)) & 0xf) as usize];
            }
        }
        id.len = 32;
        id
    }

    /// The client's id when valid, else a new one.
    pub fn keep_or_generate(client: Option<&[u8]>) -> Self {
        client
            .and_then(Self::from_client)
            .unwrap_or_else(Self::generate)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    pub fn is_none(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        let long = "a".repeat(MAX_LEN);
        let too_long = "a".repeat(MAX_LEN + 1);
        let cases: [(&[u8], bool); 12] = [
            (b"abc", true),
            (b"f81d4fae-7dec-11d0-a765-00a0c91e6bf6", true),
            (b"Root=1-5759e988-bd862e3fe1be46a994272793", true),
            (b"aGVsbG8/d29ybGQ+IQ==", true),
            (b"user@host:1.2_3", true),
            (long.as_bytes(), true),
            (too_long.as_bytes(), false),
            (b"", false),
            (b"a b", false),
            (b"a\r\nX-Evil: 1", false),
            (b"\"quoted\"", false),
            ("é".as_bytes(), false),
        ];
        for (value, valid) in cases {
            let got = RequestId::from_client(value);
            assert_eq!(got.is_some(), valid, "{value:?}");
            if let Some(id) = got {
                assert_eq!(id.as_bytes(), value);
            }
        }
    }

    #[test]
    fn generated_ids_are_hex_and_distinct() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.as_str()[..16], b.as_str()[..16], "one prefix per process");
        let other_thread = std::thread::spawn(|| RequestId::generate().as_str().to_string())
            .join()
            .unwrap();
        assert_ne!(other_thread, a.as_str());
        assert_ne!(other_thread, b.as_str());
        assert_eq!(
            RequestId::keep_or_generate(Some(b"bad id")).as_str().len(),
            32
        );
        assert_eq!(RequestId::keep_or_generate(Some(b"ok")).as_str(), "ok");
    }
}
