//! The edge of a client connection, before any HTTP: who the client is.
//!
//! - PROXY protocol receiving (`[proxy.proxy_protocol] trusted`): a connection from a trusted
//!   source (an L4 balancer) must start with a header, whose source becomes the client
//!   address; a header from anyone else, or a bad one, closes the connection. Read once per
//!   connection: on the plain listener when the lean path starts (`h1`), on the TLS listener
//!   before our handshake ([`Edge::before_tls`]), as the header comes before the ClientHello.
//!   With no trusted source configured nothing is looked for.
//! - Trust in forwarded headers (`[proxy] trusted_forwarders`): whether a peer's
//!   `X-Forwarded-*` headers are kept; the two request paths ask [`Edge::trusts_forwarder`]
//!   once per connection.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest, Stream};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyConfig;
use crate::observability::Metrics;
use crate::proxy_protocol::{self, Header, ParseError, Source, Start};
use crate::schema::Cidr;

/// Why a connection was closed at its start (the `reason` label of
/// `pingora_vhost_proxy_protocol_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("PROXY protocol header from an untrusted source")]
    Untrusted,
    #[error("no PROXY protocol header from a trusted source")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("PROXY protocol header too long")]
    TooLong,
    #[error("connection closed in the middle of the PROXY protocol header")]
    Truncated,
    #[error("no complete PROXY protocol header in time")]
    Timeout,
}

impl Rejected {
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::Untrusted => "untrusted",
            Rejected::Missing => "missing",
            Rejected::Malformed(_) => "malformed",
            Rejected::TooLong => "too_long",
            Rejected::Truncated => "truncated",
            Rejected::Timeout => "timeout",
        }
    }
}

impl From<ParseError> for Rejected {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Missing => Rejected::Missing,
            ParseError::Malformed(why) => Rejected::Malformed(why),
            ParseError::TooLong => Rejected::TooLong,
        }
    }
}

/// What the start of a connection from some source must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A trusted balancer: a PROXY protocol header, read within the deadline.
    Header(Duration),
    /// Anyone else, while some source is trusted: no header.
    NoHeader,
}

pub struct Edge {
    /// Empty: PROXY protocol is off, nothing is looked for.
    pp_trusted: Box<[Cidr]>,
    pp_timeout: Duration,
    forwarders: Box<[Cidr]>,
    metrics: Arc<Metrics>,
}

impl Edge {
    pub fn new(cfg: &ProxyConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            pp_trusted: cfg.proxy_protocol.trusted.clone().into(),
            pp_timeout: Duration::from_millis(cfg.proxy_protocol.header_timeout_ms),
            forwarders: cfg.trusted_forwarders.clone().into(),
            metrics,
        }
    }

    /// `None` when PROXY protocol is off (the connection is not looked at).
    pub fn expect(&self, peer: Option<IpAddr>) -> Option<Expect> {
        if self.pp_trusted.is_empty() {
            return None;
        }
        let trusted = peer.is_some_and(|ip| self.pp_trusted.iter().any(|c| c.contains(ip)));
        Some(if trusted {
            Expect::Header(self.pp_timeout)
        } else {
            Expect::NoHeader
        })
    }

    /// Whether `X-Forwarded-*` headers from a client at `ip` are kept (the client address
    /// after PROXY protocol).
    pub fn trusts_forwarder(&self, ip: Option<IpAddr>) -> bool {
        !self.forwarders.is_empty()
            && ip.is_some_and(|ip| self.forwarders.iter().any(|c| c.contains(ip)))
    }

    /// Checks the start of a connection as `expect` says, reading into `buf[..*filled]` (the
    /// header is taken out; what follows it stays). The client address the header gives, if
    /// any. Counted in the metrics either way.
    pub async fn start<R: AsyncRead + Unpin>(
        &self,
        expect: Expect,
        io: &mut R,
        buf: &mut [u8],
        filled: &mut usize,
        idle_timeout: Duration,
    ) -> Result<Option<SocketAddr>, Rejected> {
        let result = match expect {
            Expect::Header(deadline) => {
                match tokio::time::timeout(deadline, read_header(io, buf, filled)).await {
                    Ok(Ok(header)) => {
                        self.metrics.proxy_protocol_header(header.version.label());
                        Ok(match header.source {
                            Source::Proxied { src, .. } => Some(src),
                            Source::Local => None,
                        })
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(Rejected::Timeout),
                }
            }
            // An idle client is the request path's business (its own timeout): a connection
            // that sends nothing is not refused here.
            Expect::NoHeader => {
                match tokio::time::timeout(idle_timeout, refuse_header(io, buf, filled)).await {
                    Ok(r) => r.map(|()| None),
                    Err(_) => Ok(None),
                }
            }
        };
        if let Err(e) = &result {
            self.metrics.proxy_protocol_rejected(e.reason());
            tracing::debug!(reason = e.reason(), "client connection closed: {e}");
        }
        result
    }
}

/// Reads until a complete header is in `buf`, then takes it out.
async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut [u8],
    filled: &mut usize,
) -> Result<Header, Rejected> {
    loop {
        if let Some((header, len)) = proxy_protocol::parse(&buf[..*filled])? {
            buf.copy_within(len..*filled, 0);
            *filled -= len;
            return Ok(header);
        }
        if *filled == buf.len() {
            return Err(Rejected::TooLong);
        }
        match io.read(&mut buf[*filled..]).await {
            Ok(0) if *filled == 0 => return Err(Rejected::Missing),
            Ok(0) | Err(_) => return Err(Rejected::Truncated),
            Ok(n) => *filled += n,
        }
    }
}

/// Reads until the first bytes tell a header from anything else; a header is refused.
async fn refuse_header<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut [u8],
    filled: &mut usize,
) -> Result<(), Rejected> {
    loop {
        match proxy_protocol::classify(&buf[..*filled]) {
            Start::Header => return Err(Rejected::Untrusted),
            Start::Other => return Ok(()),
            Start::Undecided if *filled == buf.len() => return Ok(()),
            Start::Undecided => {}
        }
        match io.read(&mut buf[*filled..]).await {
            // The request path sees the end (or error) again and closes.
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => *filled += n,
        }
    }
}

impl Edge {
    /// The TLS listener's raw stream, before the handshake: its PROXY protocol header (the
    /// header comes before the ClientHello). What was read past the header is put back for
    /// the handshake; the client address goes into the socket digest, where both request
    /// paths read it. `None` closes the connection. Off (no trusted source): untouched.
    pub async fn before_tls(&self, stream: Stream, idle_timeout: Duration) -> Option<Stream> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let Some(expect) = self.expect(peer) else {
            return Some(stream);
        };
        let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        let mut buf = vec![0u8; proxy_protocol::MAX_HEADER];
        let mut filled = 0;
        let started = self
            .start(expect, l4.as_mut(), &mut buf, &mut filled, idle_timeout)
            .await;
        l4.rewind(&buf[..filled]);
        match started {
            Ok(Some(client)) => set_client_addr(&mut l4, client),
            Ok(None) => {}
            Err(_) => return None,
        }
        Some(l4)
    }
}

/// Gives `stream` a socket digest whose peer address is `client` (the rest is read from the
/// socket as before).
pub fn set_client_addr(stream: &mut L4Stream, client: SocketAddr) {
    let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(client)));
    stream.set_socket_digest(digest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(trusted: &[&str], forwarders: &[&str]) -> Edge {
        use crate::schema::FieldRule;
        let mut cfg = ProxyConfig::default();
        cfg.proxy_protocol.trusted = trusted.iter().map(|c| Cidr::parse(c).unwrap()).collect();
        cfg.trusted_forwarders = forwarders.iter().map(|c| Cidr::parse(c).unwrap()).collect();
        Edge::new(&cfg, Arc::new(Metrics::new().unwrap()))
    }

    /// Feeds `chunks` one read at a time; then end of stream.
    struct Chunks(Vec<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if !self.0.is_empty() {
                let chunk = self.0.remove(0);
                buf.put_slice(&chunk);
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn who_must_send_a_header() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let off = edge(&[], &[]);
        assert_eq!(off.expect(ip("10.0.0.1")), None);
        let on = edge(&["10.0.0.0/8"], &["192.0.2.0/24"]);
        assert!(matches!(on.expect(ip("10.0.0.1")), Some(Expect::Header(_))));
        assert!(matches!(
            on.expect(ip("::ffff:10.0.0.1")),
            Some(Expect::Header(_))
        ));
        assert_eq!(on.expect(ip("11.0.0.1")), Some(Expect::NoHeader));
        assert_eq!(on.expect(None), Some(Expect::NoHeader));
        assert!(on.trusts_forwarder(ip("192.0.2.9")));
        assert!(!on.trusts_forwarder(ip("10.0.0.1")));
        assert!(!off.trusts_forwarder(ip("192.0.2.9")));
    }

    #[tokio::test]
    async fn connection_starts() {
        let e = edge(&["10.0.0.0/8"], &[]);
        let header = Expect::Header(Duration::from_secs(1));
        let long = Duration::from_secs(1);
        let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n".to_vec();
        type Case = (
            &'static str,
            Expect,
            Vec<Vec<u8>>,
            Result<Option<&'static str>, Rejected>,
            &'static [u8],
        );
        let cases: Vec<Case> = vec![
            (
                "header then request",
                header,
                vec![[v1.clone(), b"GET /".to_vec()].concat()],
                Ok(Some("192.0.2.7:51000")),
                b"GET /",
            ),
            (
                "header in pieces",
                header,
                vec![
                    v1[..3].to_vec(),
                    v1[3..20].to_vec(),
                    v1[20..].to_vec(),
                    b"GET".to_vec(),
                ],
                Ok(Some("192.0.2.7:51000")),
                b"",
            ),
            (
                "local",
                header,
                vec![b"PROXY UNKNOWN\r\nGET".to_vec()],
                Ok(None),
                b"GET",
            ),
            (
                "missing",
                header,
                vec![b"GET / HTTP/1.1\r\n".to_vec()],
                Err(Rejected::Missing),
                b"GET / HTTP/1.1\r\n",
            ),
            (
                "closed at once",
                header,
                vec![],
                Err(Rejected::Missing),
                b"",
            ),
            (
                "truncated",
                header,
                vec![v1[..20].to_vec()],
                Err(Rejected::Truncated),
                b"PROXY TCP4 192.0.2.7",
            ),
            (
                "malformed",
                header,
                vec![b"PROXY TCP4 1.2.3.4\r\n".to_vec()],
                Err(Rejected::Malformed("v1 line needs 4 address fields")),
                b"PROXY TCP4 1.2.3.4\r\n",
            ),
            (
                "untrusted header",
                Expect::NoHeader,
                vec![b"PRO".to_vec(), b"XY TCP4".to_vec()],
                Err(Rejected::Untrusted),
                b"PROXY TCP4",
            ),
            (
                "untrusted v2",
                Expect::NoHeader,
                vec![proxy_protocol::V2_SIGNATURE.to_vec()],
                Err(Rejected::Untrusted),
                proxy_protocol::V2_SIGNATURE,
            ),
            (
                "untrusted request",
                Expect::NoHeader,
                vec![b"P".to_vec(), b"OST /".to_vec()],
                Ok(None),
                b"POST /",
            ),
            ("untrusted closed", Expect::NoHeader, vec![], Ok(None), b""),
        ];
        for (name, expect, chunks, want, rest) in cases {
            let mut io = Chunks(chunks);
            let mut buf = vec![0u8; 4096];
            let mut filled = 0;
            let got = e.start(expect, &mut io, &mut buf, &mut filled, long).await;
            let want = want.map(|o| o.map(|a| a.parse::<SocketAddr>().unwrap()));
            assert_eq!(got, want, "{name}");
            assert_eq!(&buf[..filled], rest, "{name}: bytes left");
        }
        // A header that never completes: the deadline closes the connection.
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4")
            .await
            .unwrap();
        let (mut buf, mut filled) = (vec![0u8; 4096], 0);
        let quick = Expect::Header(Duration::from_millis(50));
        let got = e
            .start(quick, &mut server, &mut buf, &mut filled, long)
            .await;
        assert_eq!(got, Err(Rejected::Timeout));
    }
}
