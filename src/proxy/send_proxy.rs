//! PROXY protocol sending (`send_proxy_protocol` on a backend): the header each new backend
//! connection starts with, for both request paths.
//!
//! A backend connection that carried one client's header must not carry another client's
//! requests, so these connections are not shared: the lean path keeps one per client
//! connection (`h1::client::Client::private_upstream`), Pingora's proxy keys its pool by the
//! client address (`HttpPeer::group_key`), as HAProxy makes such connections private. There
//! the header is written by our backend connector (`backend_conn`).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use crate::proxy_protocol::{self, Version, ENCODED_MAX};

/// One header, built once per connection (no allocation).
#[derive(Clone, Copy)]
pub struct ProxyHeader {
    bytes: [u8; ENCODED_MAX],
    len: usize,
}

impl std::fmt::Debug for ProxyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl ProxyHeader {
    /// For a client at `src` that connected to `dst`; without both, a `LOCAL` / `UNKNOWN`
    /// header (the backend then uses our address, as the spec says).
    pub fn new(version: Version, src: Option<SocketAddr>, dst: Option<SocketAddr>) -> Self {
        let mut bytes = [0u8; ENCODED_MAX];
        let len = match (src, dst) {
            (Some(src), Some(dst)) => proxy_protocol::encode(version, src, dst, &mut bytes),
            _ => {
                let local = proxy_protocol::local(version);
                bytes[..local.len()].copy_from_slice(local);
                local.len()
            }
        };
        Self { bytes, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The pool key of Pingora's connections to a backend for one client address.
pub fn group_key(client: Option<SocketAddr>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client.hash(&mut h);
    // Never 0: Pingora's key of connections without a header.
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let src = Some("192.0.2.7:51000".parse().unwrap());
        let dst = Some("10.0.0.1:80".parse().unwrap());
        assert_eq!(
            ProxyHeader::new(Version::V1, src, dst).as_bytes(),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 80\r\n"
        );
        assert_eq!(
            ProxyHeader::new(Version::V1, None, dst).as_bytes(),
            b"PROXY UNKNOWN\r\n"
        );
        assert_eq!(ProxyHeader::new(Version::V2, src, dst).as_bytes().len(), 28);
        assert_ne!(group_key(src), group_key(None));
        assert_ne!(group_key(None), 0);
    }
}
