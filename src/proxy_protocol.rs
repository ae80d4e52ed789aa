//! The PROXY protocol (HAProxy's spec, v1 text and v2 binary): reading the header an L4 load
//! balancer puts before a connection's first byte, and writing one for backends that want the
//! client address. Pure: bytes in, header out; the connection handling is in `edge`.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature (12 bytes).
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest v1 header, CRLF included (the spec's bound).
pub const V1_MAX: usize = 107;
/// Longest v2 header accepted, signature and fixed part included. The spec allows 64 KiB of
/// TLVs; balancers send far less (HAProxy's SSL and unique-id TLVs, AWS NLB's endpoint id fit
/// in a few hundred bytes). A bigger one is refused rather than buffered.
pub const V2_MAX: usize = 4096;
/// Room a reader needs for any header this module accepts.
pub const MAX_HEADER: usize = V2_MAX;
/// Largest header `encode` writes (v1 with two IPv6 addresses: 104 bytes).
pub const ENCODED_MAX: usize = V1_MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn label(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// The addresses a header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client connection relayed: its source and the address it connected to.
    Proxied { src: SocketAddr, dst: SocketAddr },
    /// v2 `LOCAL` (the balancer's own health check) or v1 `UNKNOWN` / v2 unspecified or
    /// UNIX family: the connection's own addresses stand, as the spec asks.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub source: Source,
}

/// Why a header was refused (the `reason` label of the rejection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The bytes do not start with either signature.
    #[error("no PROXY protocol header")]
    Missing,
    /// Starts like a header but breaks the spec.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// Longer than [`V1_MAX`] (v1) or [`V2_MAX`] (v2).
    #[error("PROXY protocol header too long")]
    TooLong,
}

/// What the first bytes of a connection are, as far as they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A v1 or v2 signature.
    Header,
    /// Not a header (an HTTP request, a TLS ClientHello).
    Other,
    /// Too few bytes to tell: all of them match the start of a signature.
    Undecided,
}

/// Looks at the first bytes only (for connections that must not carry a header).
pub fn classify(buf: &[u8]) -> Start {
    let matches = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    match (matches(V1_PREFIX), matches(V2_SIGNATURE)) {
        (false, false) => Start::Other,
        _ if buf.len() >= V1_PREFIX.len() && matches(V1_PREFIX) => Start::Header,
        _ if buf.len() >= V2_SIGNATURE.len() && matches(V2_SIGNATURE) => Start::Header,
        _ => Start::Undecided,
    }
}

/// Parses a header at the start of `buf`: `Ok(Some((header, length)))` when it is complete,
/// `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    match classify(buf) {
        Start::Other => Err(ParseError::Missing),
        Start::Undecided => Ok(None),
        Start::Header if buf[0] == b'P' => parse_v1(buf),
        Start::Header => parse_v2(buf),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|b| *b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ParseError::TooLong)
        } else {
            Ok(None)
        };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ParseError::Malformed("v1 line does not end in CRLF"));
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..lf - 1])
        .map_err(|_| ParseError::Malformed("v1 line is not ASCII"))?;
    let mut fields = line.split(' ');
    let source = match fields.next() {
        // Anything may follow UNKNOWN; the receiver ignores it.
        Some("UNKNOWN") => Source::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let v6 = family == "TCP6";
            let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return Err(ParseError::Malformed("v1 line needs 4 address fields"));
            };
            let ip = |s: &str| -> Result<IpAddr, ParseError> {
                let parsed = if v6 {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                } else {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                };
                parsed.map_err(|_| ParseError::Malformed("v1 address"))
            };
            Source::Proxied {
                src: SocketAddr::new(ip(src)?, v1_port(sport)?),
                dst: SocketAddr::new(ip(dst)?, v1_port(dport)?),
            }
        }
        _ => {
            return Err(ParseError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let header = Header {
        version: Version::V1,
        source,
    };
    Ok(Some((header, lf + 1)))
}

/// A port: decimal 0-65535 without leading zeros, as the spec writes it.
fn v1_port(s: &str) -> Result<u16, ParseError> {
    let bad = ParseError::Malformed("v1 port");
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::Malformed("v2 version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ParseError::Malformed("v2 command is not LOCAL or PROXY")),
    };
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ParseError::TooLong);
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    // Address block size by family; the rest of the body is TLVs.
    let addr_len = match family {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(ParseError::Malformed("v2 address family")),
    };
    if body.len() < addr_len {
        return Err(ParseError::Malformed(
            "v2 length shorter than its addresses",
        ));
    }
    check_tlvs(&body[addr_len..])?;
    let header = |source| {
        let h = Header {
            version: Version::V2,
            source,
        };
        Ok(Some((h, total)))
    };
    if local {
        return header(Source::Local);
    }
    // A PROXY command over a listener that is TCP: stream or unspecified transport.
    if !matches!(transport, 0 | 1) {
        return Err(ParseError::Malformed("v2 transport is not a stream"));
    }
    let a = body;
    let source = match family {
        1 => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Source::Proxied {
                src: SocketAddr::new(ip(0), port(8)),
                dst: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Source::Proxied {
                src: SocketAddr::new(ip(0), port(32)),
                dst: SocketAddr::new(ip(16), port(34)),
            }
        }
        // Unspecified or UNIX: no address to use, the connection's own stands.
        _ => Source::Local,
    };
    header(source)
}

/// TLVs must tile the rest of the header exactly (type, 2-byte length, value). Their values
/// are not used.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ParseError> {
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(ParseError::Malformed("v2 TLV cut short"));
        }
        let len = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        if tlvs.len() < 3 + len {
            return Err(ParseError::Malformed("v2 TLV longer than the header"));
        }
        tlvs = &tlvs[3 + len..];
    }
    Ok(())
}

/// Writes a header for a connection from `src` to `dst` into `out`; returns its length. Mixed
/// families are written as IPv6 (IPv4-mapped), as HAProxy does.
pub fn encode(
    version: Version,
    src: SocketAddr,
    dst: SocketAddr,
    out: &mut [u8; ENCODED_MAX],
) -> usize {
    let (src_ip, dst_ip) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(to_v6(s)), IpAddr::V6(to_v6(d))),
    };
    match version {
        Version::V1 => {
            let family = if src_ip.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut cursor = std::io::Cursor::new(&mut out[..]);
            // Fits: the longest line (two full IPv6 addresses) is 104 bytes.
            let _ = write!(
                cursor,
                "PROXY {family} {src_ip} {dst_ip} {} {}\r\n",
                src.port(),
                dst.port()
            );
            cursor.position() as usize
        }
        Version::V2 => {
            out[..12].copy_from_slice(V2_SIGNATURE);
            out[12] = 0x21; // version 2, PROXY
            let addrs = match (src_ip, dst_ip) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out[13] = 0x11; // INET, STREAM
                    out[16..20].copy_from_slice(&s.octets());
                    out[20..24].copy_from_slice(&d.octets());
                    12
                }
                (s, d) => {
                    out[13] = 0x21; // INET6, STREAM
                    out[16..32].copy_from_slice(&to_v6(s).octets());
                    out[32..48].copy_from_slice(&to_v6(d).octets());
                    36
                }
            };
            out[14..16].copy_from_slice(&(addrs as u16).to_be_bytes());
            let ports = 16 + addrs - 4;
            out[ports..ports + 2].copy_from_slice(&src.port().to_be_bytes());
            out[ports + 2..ports + 4].copy_from_slice(&dst.port().to_be_bytes());
            16 + addrs
        }
    }
}

/// The header of a connection that relays no client: v1 `UNKNOWN`, v2 `LOCAL` (health
/// probes, and a client whose address is not known).
pub fn local(version: Version) -> &'static [u8] {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n",
        Version::V2 => b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v4_body() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 10, 0, 0, 1];
        b.extend_from_slice(&51000u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    fn v6_body() -> Vec<u8> {
        let mut b = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&51000u16.to_be_bytes());
        b.extend_from_slice(&80u16.to_be_bytes());
        b
    }

    fn proxied(src: &str, dst: &str) -> Source {
        Source::Proxied {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    type Want = Result<Option<(Version, Source, usize)>, ParseError>;

    #[test]
    fn table() {
        let tlvs = {
            let mut b = v4_body();
            // PP2_TYPE_AUTHORITY "example.com", PP2_TYPE_NOOP of length 0.
            b.extend_from_slice(&[0x02, 0, 11]);
            b.extend_from_slice(b"example.com");
            b.extend_from_slice(&[0x04, 0, 0]);
            b
        };
        let tlv_overrun = {
            let mut b = v4_body();
            b.extend_from_slice(&[0x02, 0, 20, b'x']);
            b
        };
        let tlv_cut = {
            let mut b = v4_body();
            b.extend_from_slice(&[0x02, 0]);
            b
        };
        let with_request = {
            let mut b = v2(0x21, 0x11, &v4_body());
            b.extend_from_slice(b"GET / HTTP/1.1\r\n");
            b
        };
        let mut huge = v2(0x21, 0x11, &v4_body());
        huge[14..16].copy_from_slice(&((V2_MAX - 15) as u16).to_be_bytes());
        let long_v1 = format!("PROXY UNKNOWN {}\r\n", "x".repeat(120));
        let v1_tcp4 = "PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n";
        let v1_tcp6 = "PROXY TCP6 2001:db8::7 2001:db8::1 51000 80\r\nGET /";
        let v1_max = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        let malformed = |why| Err(ParseError::Malformed(why));
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            (
                "v1 tcp4",
                v1_tcp4.into(),
                Ok(Some((
                    Version::V1,
                    proxied("192.0.2.7:51000", "10.0.0.1:443"),
                    v1_tcp4.len(),
                ))),
            ),
            (
                "v1 tcp6 then request",
                v1_tcp6.into(),
                Ok(Some((
                    Version::V1,
                    proxied("[2001:db8::7]:51000", "[2001:db8::1]:80"),
                    v1_tcp6.len() - 5,
                ))),
            ),
            (
                "v1 longest",
                v1_max.into(),
                Ok(Some((
                    Version::V1,
                    proxied(
                        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                    ),
                    v1_max.len(),
                ))),
            ),
            (
                "v1 unknown",
                b"PROXY UNKNOWN\r\n".to_vec(),
                Ok(Some((Version::V1, Source::Local, 15))),
            ),
            (
                "v1 unknown with addresses",
                b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                Ok(Some((Version::V1, Source::Local, 35))),
            ),
            (
                "v1 truncated",
                b"PROXY TCP4 192.0.2.7 10.0".to_vec(),
                Ok(None),
            ),
            ("v1 prefix only", b"PRO".to_vec(), Ok(None)),
            ("v1 too long", long_v1.into(), Err(ParseError::TooLong)),
            (
                "v1 bare LF",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
                malformed("v1 line does not end in CRLF"),
            ),
            (
                "v1 family v6 address v4",
                b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                malformed("v1 address"),
            ),
            (
                "v1 family v4 address v6",
                b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(),
                malformed("v1 address"),
            ),
            (
                "v1 port too big",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(),
                malformed("v1 port"),
            ),
            (
                "v1 port leading zero",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n".to_vec(),
                malformed("v1 port"),
            ),
            (
                "v1 port sign",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n".to_vec(),
                malformed("v1 port"),
            ),
            (
                "v1 missing field",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n".to_vec(),
                malformed("v1 line needs 4 address fields"),
            ),
            (
                "v1 extra field",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 80 81 x\r\n".to_vec(),
                malformed("v1 line needs 4 address fields"),
            ),
            (
                "v1 double space",
                b"PROXY TCP4  1.2.3.4 5.6.7.8 80 81\r\n".to_vec(),
                malformed("v1 line needs 4 address fields"),
            ),
            (
                "v1 udp",
                b"PROXY UDP4 1.2.3.4 5.6.7.8 80 81\r\n".to_vec(),
                malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN"),
            ),
            (
                "v1 lower case",
                b"proxy TCP4 1.2.3.4 5.6.7.8 80 81\r\n".to_vec(),
                Err(ParseError::Missing),
            ),
            (
                "v1 not utf8",
                b"PROXY TCP4 \xff\r\n".to_vec(),
                malformed("v1 line is not ASCII"),
            ),
            (
                "v2 tcp4",
                v2(0x21, 0x11, &v4_body()),
                Ok(Some((
                    Version::V2,
                    proxied("192.0.2.7:51000", "10.0.0.1:443"),
                    28,
                ))),
            ),
            (
                "v2 tcp6",
                v2(0x21, 0x21, &v6_body()),
                Ok(Some((
                    Version::V2,
                    proxied("[2001:db8::7]:51000", "[2001:db8::1]:80"),
                    52,
                ))),
            ),
            (
                "v2 tcp4 with TLVs",
                v2(0x21, 0x11, &tlvs),
                Ok(Some((
                    Version::V2,
                    proxied("192.0.2.7:51000", "10.0.0.1:443"),
                    16 + tlvs.len(),
                ))),
            ),
            (
                "v2 then request",
                with_request,
                Ok(Some((
                    Version::V2,
                    proxied("192.0.2.7:51000", "10.0.0.1:443"),
                    28,
                ))),
            ),
            (
                "v2 local",
                v2(0x20, 0x00, &[]),
                Ok(Some((Version::V2, Source::Local, 16))),
            ),
            (
                "v2 local with addresses",
                v2(0x20, 0x11, &v4_body()),
                Ok(Some((Version::V2, Source::Local, 28))),
            ),
            (
                "v2 unspec family",
                v2(0x21, 0x00, &[]),
                Ok(Some((Version::V2, Source::Local, 16))),
            ),
            (
                "v2 unix family",
                v2(0x21, 0x31, &[0; 216]),
                Ok(Some((Version::V2, Source::Local, 232))),
            ),
            ("v2 signature only", V2_SIGNATURE.to_vec(), Ok(None)),
            ("v2 signature part", V2_SIGNATURE[..5].to_vec(), Ok(None)),
            (
                "v2 addresses truncated",
                v2(0x21, 0x11, &v4_body())[..20].to_vec(),
                Ok(None),
            ),
            (
                "v2 version 1",
                v2(0x11, 0x11, &v4_body()),
                malformed("v2 version is not 2"),
            ),
            (
                "v2 command 2",
                v2(0x22, 0x11, &v4_body()),
                malformed("v2 command is not LOCAL or PROXY"),
            ),
            (
                "v2 family 4",
                v2(0x21, 0x41, &v4_body()),
                malformed("v2 address family"),
            ),
            (
                "v2 udp",
                v2(0x21, 0x12, &v4_body()),
                malformed("v2 transport is not a stream"),
            ),
            (
                "v2 length too short for v6",
                v2(0x21, 0x21, &v4_body()),
                malformed("v2 length shorter than its addresses"),
            ),
            (
                "v2 TLV overrun",
                v2(0x21, 0x11, &tlv_overrun),
                malformed("v2 TLV longer than the header"),
            ),
            (
                "v2 TLV cut",
                v2(0x21, 0x11, &tlv_cut),
                malformed("v2 TLV cut short"),
            ),
            ("v2 oversized", huge, Err(ParseError::TooLong)),
            (
                "http request",
                b"GET / HTTP/1.1\r\n".to_vec(),
                Err(ParseError::Missing),
            ),
            (
                "tls hello",
                vec![0x16, 3, 1, 0, 0xc8],
                Err(ParseError::Missing),
            ),
            (
                "garbage",
                b"\r\n\r\nQUIT".to_vec(),
                Err(ParseError::Missing),
            ),
            ("empty", Vec::new(), Ok(None)),
        ];
        for (name, bytes, want) in cases {
            let got = parse(&bytes).map(|o| o.map(|(h, n)| (h.version, h.source, n)));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn local_headers_parse_back() {
        for version in [Version::V1, Version::V2] {
            let h = local(version);
            let want = Header {
                version,
                source: Source::Local,
            };
            assert_eq!(parse(h), Ok(Some((want, h.len()))));
        }
    }

    #[test]
    fn classify_first_bytes() {
        for (bytes, want) in [
            (&b""[..], Start::Undecided),
            (b"P", Start::Undecided),
            (b"PROXY", Start::Undecided),
            (b"PROXY ", Start::Header),
            (b"POST /", Start::Other),
            (b"PRI * HTTP/2.0", Start::Other),
            (b"\r\n\r\n\0\r\nQUI", Start::Undecided),
            (b"\r\n\r\n\0\r\nQUIT\n", Start::Header),
            (b"\r\nGET", Start::Other),
            (&[0x16, 3, 1], Start::Other),
        ] {
            assert_eq!(classify(bytes), want, "{bytes:?}");
        }
    }

    #[test]
    fn encoded_headers_parse_back() {
        let pairs = [
            ("192.0.2.7:51000", "10.0.0.1:443"),
            ("[2001:db8::7]:1", "[2001:db8::1]:65535"),
            ("192.0.2.7:51000", "[2001:db8::1]:80"),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            ),
        ];
        for version in [Version::V1, Version::V2] {
            for (src, dst) in pairs {
                let (src, dst): (SocketAddr, SocketAddr) =
                    (src.parse().unwrap(), dst.parse().unwrap());
                let mut out = [0u8; ENCODED_MAX];
                let n = encode(version, src, dst, &mut out);
                let (h, len) = parse(&out[..n]).unwrap().unwrap();
                assert_eq!(len, n);
                assert_eq!(h.version, version);
                let Source::Proxied { src: s, dst: d } = h.source else {
                    panic!("{version:?} {src} {dst}: {:?}", h.source)
                };
                let canon = |a: SocketAddr| (to_v6(a.ip()), a.port());
                assert_eq!((canon(s), canon(d)), (canon(src), canon(dst)));
            }
        }
        let mut out = [0u8; ENCODED_MAX];
        let n = encode(
            Version::V1,
            "192.0.2.7:51000".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
            &mut out,
        );
        assert_eq!(&out[..n], b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n");
    }
}
