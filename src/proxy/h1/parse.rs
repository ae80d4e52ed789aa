//! Parsing of HTTP/1.1 heads on the lean path: a request head from the client (and the head
//! sent upstream, written as it is parsed), a response head from the backend (and, when it
//! cannot pass through unchanged, the head sent to the client). One `httparse` pass each.

use super::super::answers;
use super::super::replay::RequestEnd;
use super::super::request_id::RequestId;
use super::super::strict::{self, Refusal, Strictness, MAX_HEADERS};

/// What the head of a request says, once parsed.
pub(super) struct RequestHead {
    pub(super) head_len: usize,
    pub(super) content_length: usize,
    pub(super) host: String,
    /// Request target (origin form), as a range of the client buffer.
    pub(super) target: std::ops::Range<usize>,
    pub(super) idempotent: bool,
    pub(super) head_method: bool,
    /// The client asked to close after this request.
    pub(super) close: bool,
    /// For the access log: where these are in the client buffer (empty when absent).
    pub(super) method: std::ops::Range<usize>,
    pub(super) user_agent: std::ops::Range<usize>,
    pub(super) referer: std::ops::Range<usize>,
    /// The id sent upstream (`X-Request-Id`); none when request ids are off.
    pub(super) request_id: RequestId,
}

pub(super) enum Parsed {
    Partial,
    /// Pingora's proxy serves this request (the reason is a metric label). When the head was
    /// read whole and is not an upgrade: its length and where the body ends (Pingora's proxy
    /// then reads this request only; a chunked body already buffered is checked first).
    HandOver(&'static str, Option<(usize, RequestEnd)>),
    Request(RequestHead),
    /// Answered by us (400, 413, 431) and the connection closed: no backend sees it.
    Refuse(Refusal),
}

/// After an `httparse` error in the request line: a line that ends in ` HTTP/1.x` but whose
/// target holds a raw space, control byte or NUL (`GET /a b HTTP/1.1`, `GET  /x HTTP/1.1`).
/// Pingora's parser would percent-encode such a target and forward it; it is refused.
/// `None` while the line is not complete.
fn bad_target(buf: &[u8]) -> Option<bool> {
    let end = buf.iter().position(|b| *b == b'\n')?;
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let Some(rest) = line
        .strip_suffix(b" HTTP/1.1")
        .or_else(|| line.strip_suffix(b" HTTP/1.0"))
    else {
        return Some(false);
    };
    let Some(space) = rest.iter().position(|b| *b == b' ') else {
        return Some(false);
    };
    let target = &rest[space + 1..];
    Some(target.is_empty() || !strict::clean_target(target))
}

/// Parses a request head from `buf` and writes the upstream request head into `out`.
/// `trust_forwarded`: the client is a trusted forwarder (`[proxy] trusted_forwarders`), whose
/// `X-Forwarded-*` headers are kept; anyone else's are replaced.
pub(super) fn parse_request(
    buf: &[u8],
    out: &mut Vec<u8>,
    client_ip: Option<&str>,
    tls: bool,
    trust_forwarded: bool,
    rules: Strictness,
    request_ids: bool,
) -> Parsed {
    // Uninitialised: httparse writes only the headers it finds (no 3 KiB memset per request).
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Refuse(Refusal::HeadTooLarge),
        Err(httparse::Error::Token | httparse::Error::Version) => match bad_target(buf) {
            None => return Parsed::Partial,
            Some(true) => return Parsed::Refuse(Refusal::BadRequest("invalid request target")),
            Some(false) => return Parsed::HandOver("malformed", None),
        },
        // Pingora's parser answers malformed requests (400) and takes the rare ones.
        Err(_) => return Parsed::HandOver("malformed", None),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::HandOver("malformed", None);
    };
    // Why Pingora's proxy takes this request; the head is still read to the end, as the
    // rules below hold for every request.
    let mut hand_over = if version != 1 {
        Some("http/1.0")
    } else if !target.starts_with('/') || method == "CONNECT" {
        Some("request-target")
    } else {
        None
    };
    let offset = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let range = |s: &[u8]| offset(s)..offset(s) + s.len();
    let target_start = offset(target.as_bytes());

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let mut host: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut forwarded_for: Option<&[u8]> = None;
    let mut forwarded_host: Option<&[u8]> = None;
    let mut forwarded_proto: Option<&[u8]> = None;
    let mut transfer_encoding: Vec<&[u8]> = Vec::new();
    let mut client_request_id: Option<&[u8]> = None;
    let mut user_agent = 0..0;
    let mut referer = 0..0;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if rules.drops_header(name.as_bytes()) {
            continue;
        }
        let copy = match name.len() {
            4 if name.eq_ignore_ascii_case("host") => {
                if host.replace(h.value).is_some() {
                    return Parsed::HandOver("malformed", None);
                }
                true
            }
            14 if name.eq_ignore_ascii_case("content-length") => {
                if content_length.is_some() || !h.value.iter().all(u8::is_ascii_digit) {
                    return Parsed::HandOver("malformed", None);
                }
                match rules.content_length(h.value) {
                    Ok(n) => content_length = Some(n),
                    Err(Refusal::BadRequest(_)) if h.value.is_empty() => {
                        return Parsed::HandOver("malformed", None)
                    }
                    Err(refusal) => return Parsed::Refuse(refusal),
                }
                true
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        connection_upgrade = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        // Hop-by-hop headers named by the client.
                        hand_over.get_or_insert("connection-header");
                    }
                }
                false
            }
            15 if name.eq_ignore_ascii_case("x-forwarded-for") => {
                if forwarded_for.replace(h.value).is_some() {
                    hand_over.get_or_insert("repeated-x-forwarded-for");
                }
                false
            }
            16 if name.eq_ignore_ascii_case("x-forwarded-host") => {
                forwarded_host.get_or_insert(h.value);
                false
            }
            // Replaced by the id checked (or made) below; the first one counts.
            12 if request_ids && name.eq_ignore_ascii_case("x-request-id") => {
                client_request_id.get_or_insert(h.value);
                false
            }
            10 if name.eq_ignore_ascii_case("user-agent") => {
                user_agent = range(h.value);
                true
            }
            7 if name.eq_ignore_ascii_case("referer") => {
                referer = range(h.value);
                true
            }
            17 if name.eq_ignore_ascii_case("x-forwarded-proto") => {
                forwarded_proto.get_or_insert(h.value);
                false
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => {
                transfer_encoding.push(h.value);
                false
            }
            // Not forwarded on this path: only a real upgrade request (below) goes on, to
            // Pingora's proxy, which keeps it.
            7 if name.eq_ignore_ascii_case("upgrade") => {
                upgrade = true;
                false
            }
            6 if name.eq_ignore_ascii_case("expect") => {
                hand_over.get_or_insert("expect");
                true
            }
            10 if name.eq_ignore_ascii_case("keep-alive") => false,
            16 if name.eq_ignore_ascii_case("proxy-connection") => false,
            2 if name.eq_ignore_ascii_case("te") => false,
            7 if name.eq_ignore_ascii_case("trailer") => false,
            _ => true,
        };
        if copy {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    // `Upgrade` without `Connection: upgrade` (or on anything but an HTTP/1.1 GET) is not an
    // upgrade: the header is dropped and the request served as any other.
    // A real upgrade: Pingora's proxy keeps the connection (a tunnel after a 101).
    if upgrade && strict::is_upgrade(method, version == 1, connection_upgrade) {
        return Parsed::HandOver(hand_over.unwrap_or("upgrade"), None);
    }
    if !transfer_encoding.is_empty() {
        if version != 1 || !strict::transfer_encoding_ok(transfer_encoding) {
            return Parsed::Refuse(Refusal::BadRequest("invalid Transfer-Encoding"));
        }
        let reason = hand_over.unwrap_or("chunked-body");
        return Parsed::HandOver(reason, Some((head_len, RequestEnd::Chunked)));
    }
    if let Some(reason) = hand_over {
        let end = RequestEnd::Length(content_length.unwrap_or(0));
        return Parsed::HandOver(reason, Some((head_len, end)));
    }
    let Ok(content_length) = content_length.map(usize::try_from).transpose() else {
        return Parsed::Refuse(Refusal::BodyTooLarge);
    };
    let Some(host_raw) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
        let end = RequestEnd::Length(content_length.unwrap_or(0) as u64);
        return Parsed::HandOver("no-host", Some((head_len, end)));
    };
    let host = answers::normalize_host(host_raw.trim());

    // From anyone but a trusted forwarder, what the client claims is replaced.
    if !trust_forwarded {
        (forwarded_for, forwarded_host, forwarded_proto) = (None, None, None);
    }
    if let Some(ip) = client_ip {
        out.extend_from_slice(b"X-Forwarded-For: ");
        if let Some(prev) = forwarded_for.filter(|p| !p.is_empty()) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    } else if let Some(prev) = forwarded_for {
        out.extend_from_slice(b"X-Forwarded-For: ");
        out.extend_from_slice(prev);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-Proto: ");
    out.extend_from_slice(match forwarded_proto {
        Some(proto) => proto,
        None if tls => b"https",
        None => b"http",
    });
    out.extend_from_slice(b"\r\nX-Forwarded-Host: ");
    out.extend_from_slice(forwarded_host.unwrap_or(host.as_bytes()));
    out.extend_from_slice(b"\r\n");
    let request_id = if request_ids {
        let id = RequestId::keep_or_generate(client_request_id);
        out.extend_from_slice(b"X-Request-Id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
        id
    } else {
        RequestId::NONE
    };
    out.extend_from_slice(b"\r\n");

    Parsed::Request(RequestHead {
        head_len,
        content_length: content_length.unwrap_or(0),
        host,
        target: target_start..target_start + target.len(),
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS" | "TRACE"
        ),
        head_method: method == "HEAD",
        close,
        method: range(method.as_bytes()),
        user_agent,
        referer,
        request_id,
    })
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

pub(super) struct ResponseHead {
    pub(super) head_len: usize,
    pub(super) status: u16,
    pub(super) framing: Framing,
    /// The backend keeps the connection open after this response.
    pub(super) keep_alive: bool,
    /// The head can go to the client as the backend sent it.
    pub(super) pass_through: bool,
}

pub(super) enum ParsedResponse {
    Partial,
    /// Not a valid HTTP/1 response head.
    Invalid,
    Response(ResponseHead),
}

pub(super) fn is_hop_by_hop(name: &str) -> bool {
    name.eq_ignore_ascii_case("connection")
        || name.eq_ignore_ascii_case("keep-alive")
        || name.eq_ignore_ascii_case("proxy-connection")
}

/// What a backend's response head says about its body and its connection, and what must
/// change on its way to a client (both client protocols: HTTP/1.1 here, HTTP/2 in `h2`).
pub(super) struct ResponseFacts {
    pub(super) framing: Framing,
    /// The backend keeps the connection open after this response.
    pub(super) keep_alive: bool,
    /// It has hop-by-hop header fields (dropped on the way to the client).
    pub(super) hop_by_hop: bool,
    /// `Content-Length` beside `Transfer-Encoding`: the length is dropped (RFC 9112 6.3).
    pub(super) drop_length: bool,
    /// It has no `X-Request-Id` and the request had one: ours is added.
    pub(super) add_request_id: bool,
}

/// The framing rules for a parsed response head; `None` when they make it invalid
/// (conflicting or malformed `Content-Length`).
pub(super) fn response_facts(
    version: u8,
    status: u16,
    headers: &[httparse::Header<'_>],
    head_method: bool,
    request_id: &[u8],
) -> Option<ResponseFacts> {
    let mut keep_alive = version == 1;
    let mut hop_by_hop = false;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    // The backend's own X-Request-Id (often the one it was sent) is kept; else ours is added.
    let mut add_request_id = !request_id.is_empty();
    for h in headers {
        if add_request_id && h.name.len() == 12 && h.name.eq_ignore_ascii_case("x-request-id") {
            add_request_id = false;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (parsed, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return None,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides; anything but chunked is read until close.
            let last = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            chunked = last.eq_ignore_ascii_case(b"chunked");
            other_coding = !chunked;
        } else if is_hop_by_hop(h.name) {
            hop_by_hop = true;
            if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        keep_alive = false;
                    }
                }
            }
        }
    }
    let framing = if head_method || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if other_coding {
        Framing::UntilClose
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    Some(ResponseFacts {
        framing,
        keep_alive,
        hop_by_hop,
        drop_length: (chunked || other_coding) && length.is_some(),
        add_request_id,
    })
}

/// Parses a response head. When it cannot pass through unchanged (HTTP/1.0, hop-by-hop
/// headers, or `close_client`), writes the head to send to the client into `out`.
pub(super) fn parse_response(
    buf: &[u8],
    head_method: bool,
    close_client: bool,
    request_id: &[u8],
    out: &mut Vec<u8>,
) -> ParsedResponse {
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return ParsedResponse::Partial,
        Err(_) => return ParsedResponse::Invalid,
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return ParsedResponse::Invalid;
    };
    let Some(ResponseFacts {
        framing,
        keep_alive,
        hop_by_hop,
        drop_length,
        add_request_id,
    }) = response_facts(version, status, resp.headers, head_method, request_id)
    else {
        return ParsedResponse::Invalid;
    };
    let close_client = close_client || framing == Framing::UntilClose;
    let unchanged = version == 1 && !hop_by_hop && !close_client && !drop_length;
    let pass_through = unchanged && !add_request_id;
    if unchanged && add_request_id && buf[..head_len].ends_with(b"\r\n\r\n") {
        // Only the id to add: the head as it came, the id line before its blank line (a copy,
        // cheaper than writing the fields one by one).
        out.clear();
        out.extend_from_slice(&buf[..head_len - 2]);
        out.extend_from_slice(b"X-Request-Id: ");
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\n\r\n");
    } else if !pass_through {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in resp.headers.iter() {
            let dropped_length = drop_length && h.name.eq_ignore_ascii_case("content-length");
            if !(is_hop_by_hop(h.name) || dropped_length) {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        if close_client {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        if add_request_id {
            out.extend_from_slice(b"X-Request-Id: ");
            out.extend_from_slice(request_id);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    ParsedResponse::Response(ResponseHead {
        head_len,
        status,
        framing,
        keep_alive,
        pass_through,
    })
}

/// A backend's response head parsed for an HTTP/2 client.
// Made once per response and moved straight into the stream: boxing the head would cost an
// allocation per response for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum H2Response {
    Partial,
    Invalid,
    /// A 1xx answer of this many bytes: skipped (an HTTP/2 stream has one response head).
    Informational(usize),
    Final {
        head_len: usize,
        /// Without the fields HTTP/2 forbids (`Connection` and the others it names,
        /// `Transfer-Encoding`, `Upgrade`, `TE`), `X-Request-Id` added as for HTTP/1.1.
        header: pingora_http::ResponseHeader,
        facts: ResponseFacts,
    },
}

/// Parses a response head for an HTTP/2 client: the framing rules of `response_facts`, the
/// fields as `http` types (a name or value they refuse makes the head invalid: 502).
pub(super) fn parse_response_for_h2(
    buf: &[u8],
    head_method: bool,
    request_id: &[u8],
) -> H2Response {
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return H2Response::Partial,
        Err(_) => return H2Response::Invalid,
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return H2Response::Invalid;
    };
    // Only an upgrade request may be answered with 101; HTTP/2 has no such request here.
    if status == 101 {
        return H2Response::Invalid;
    }
    if (100..200).contains(&status) {
        return H2Response::Informational(head_len);
    }
    let Some(facts) = response_facts(version, status, resp.headers, head_method, request_id) else {
        return H2Response::Invalid;
    };
    let Ok(status) = http::StatusCode::from_u16(status) else {
        return H2Response::Invalid;
    };
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = status;
    parts.headers.reserve(resp.headers.len() + 1);
    for h in resp.headers.iter() {
        let name = h.name;
        let forbidden = is_hop_by_hop(name)
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("te")
            || (facts.drop_length && name.eq_ignore_ascii_case("content-length"));
        if forbidden {
            continue;
        }
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) else {
            return H2Response::Invalid;
        };
        parts.headers.append(name, value);
    }
    if facts.add_request_id {
        if let Ok(id) = http::HeaderValue::from_bytes(request_id) {
            parts.headers.append("x-request-id", id);
        }
    }
    H2Response::Final {
        head_len,
        header: parts.into(),
        facts,
    }
}

/// Whether a request head (already parsed once) asks for `100 Continue` before its body.
pub(super) fn expects_continue(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if request.parse(head).is_err() {
        return false;
    }
    request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `parse_request` decided, in a comparable form.
    #[derive(Debug, PartialEq, Eq)]
    enum Req {
        Partial,
        HandOver(&'static str),
        /// Refused by us with this status.
        Refuse(u16),
        /// host, content length, idempotent, HEAD, close
        Lean(&'static str, usize, bool, bool, bool),
    }

    /// What the tests run with: a small body limit, underscores dropped.
    const RULES: Strictness = Strictness {
        max_body_bytes: 1000,
        underscores_in_headers: false,
    };

    fn req(raw: &str) -> (Req, String) {
        req_with(raw, RULES)
    }

    fn req_with(raw: &str, rules: Strictness) -> (Req, String) {
        req_from(raw, rules, false)
    }

    fn req_from(raw: &str, rules: Strictness, trusted: bool) -> (Req, String) {
        let mut out = Vec::new();
        let client = Some("10.0.0.9");
        let r = match parse_request(
            raw.as_bytes(),
            &mut out,
            client,
            false,
            trusted,
            rules,
            false,
        ) {
            Parsed::Partial => Req::Partial,
            Parsed::HandOver(why, _) => Req::HandOver(why),
            Parsed::Refuse(refusal) => Req::Refuse(refusal.status()),
            Parsed::Request(h) => {
                assert_eq!(h.head_len, raw.find("\r\n\r\n").map_or(0, |i| i + 4));
                let host: &'static str = Box::leak(h.host.into_boxed_str());
                Req::Lean(host, h.content_length, h.idempotent, h.head_method, h.close)
            }
        };
        (r, String::from_utf8(out).unwrap_or_default())
    }

    #[test]
    fn parse_request_cases() {
        use Req::*;
        let cases: &[(&str, Req)] = &[
            ("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", Lean("a.test", 0, true, false, false)),
            ("GET / HTTP/1.1\r\nHost: A.Test:8080\r\n\r\n", Lean("a.test", 0, true, false, false)),
            ("HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n", Lean("a", 0, true, true, false)),
            (
                "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                Lean("a", 5, false, false, false),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                Lean("a", 0, true, false, true),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
                Lean("a", 0, true, false, false),
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\n", Partial),
            ("GET / HTTP/1.0\r\nHost: a\r\n\r\n", HandOver("http/1.0")),
            ("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", HandOver("request-target")),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", HandOver("request-target")),
            ("GET / HTTP/1.1\r\n\r\n", HandOver("no-host")),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HandOver("malformed")),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                HandOver("malformed"),
            ),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", HandOver("malformed")),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", HandOver("malformed")),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                HandOver("chunked-body"),
            ),
            // An upgrade needs `Connection: upgrade` on an HTTP/1.1 GET; else `Upgrade` is
            // dropped and the request served as any other.
            ("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", Lean("a", 0, true, false, false)),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                HandOver("upgrade"),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, upgrade\r\nUpgrade: h2c\r\n\r\n",
                HandOver("upgrade"),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                Lean("a", 0, false, false, false),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
                Lean("a", 0, true, false, false),
            ),
            // Request targets with raw spaces, control bytes or NUL.
            ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", Refuse(400)),
            ("GET  /x HTTP/1.1\r\nHost: a\r\n\r\n", Refuse(400)),
            ("GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n", Refuse(400)),
            ("GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", Refuse(400)),
            ("GET /a\x7fb HTTP/1.0\r\nHost: a\r\n\r\n", Refuse(400)),
            ("GET /a b", Partial),
            // Bodies: overflow is a 400, over the limit a 413.
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\n\r\n",
                Refuse(400),
            ),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n", Lean("a", 1000, false, false, false)),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n", Refuse(413)),
            ("POST / HTTP/1.0\r\nHost: a\r\nContent-Length: 1001\r\n\r\n", Refuse(413)),
            // Transfer-Encoding: `chunked` once and last, HTTP/1.1 only.
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                Refuse(400),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refuse(400),
            ),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", Refuse(400)),
            ("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Refuse(400)),
            (
                "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
                HandOver("expect"),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\n\r\n",
                HandOver("connection-header"),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n",
                HandOver("repeated-x-forwarded-for"),
            ),
            ("GET / HTTP/1.1\r\nHost a\r\n\r\n", HandOver("malformed")),
            ("NOT HTTP AT ALL\r\n\r\n", HandOver("malformed")),
        ];
        for (raw, want) in cases {
            assert_eq!(&req(raw).0, want, "{raw:?}");
        }
    }

    #[test]
    fn head_limits() {
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..MAX_HEADERS - 1 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        assert_eq!(
            req(&format!("{many}\r\n")).0,
            Req::Lean("a", 0, true, false, false)
        );
        many.push_str("X-last: v\r\n");
        assert_eq!(req(&format!("{many}\r\n")).0, Req::Refuse(431));
    }

    #[test]
    fn header_names_with_underscores_are_dropped_unless_allowed() {
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 51\r\nX_Y: 1\r\nContent-Length: 0\r\n\r\n";
        let (r, out) = req(raw);
        assert_eq!(r, Req::Lean("a", 0, false, false, false));
        assert!(!out.contains('_'), "{out}");
        let allowed = Strictness {
            underscores_in_headers: true,
            ..RULES
        };
        let (_, out) = req_with(raw, allowed);
        assert!(out.contains("Content_Length: 51\r\nX_Y: 1\r\n"), "{out}");
    }

    #[test]
    fn the_upstream_head_drops_hop_by_hop_and_sets_forwarding_headers() {
        let raw = "GET /p?q=1 HTTP/1.1\r\nHost: a\r\nKeep-Alive: 5\r\nTE: trailers\r\nTrailer: x\r\n\
             Proxy-Connection: keep-alive\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-Host: evil\r\nAccept: */*\r\n\r\n";
        // From anyone: the forwarding headers are ours only.
        let (r, out) = req(raw);
        assert!(matches!(r, Req::Lean(..)), "{r:?}");
        assert_eq!(
            out,
            "GET /p?q=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.9\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n\r\n"
        );
        // From a trusted forwarder: kept, the client address appended.
        let (_, out) = req_from(raw, RULES, true);
        assert_eq!(
            out,
            "GET /p?q=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Forwarded-For: 1.1.1.1, 10.0.0.9\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\r\n"
        );
        // A trusted forwarder that sent none: ours.
        let (_, out) = req_from("GET / HTTP/1.1\r\nHost: a\r\n\r\n", RULES, true);
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.9\r\n\
             X-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n\r\n"
        );
    }

    /// What `parse_response` decided: status, framing, keep-alive, pass-through, and the
    /// rewritten head when it is not passed through.
    fn resp(raw: &str, head: bool, close: bool) -> Option<(u16, Framing, bool, bool, String)> {
        let mut out = Vec::new();
        match parse_response(raw.as_bytes(), head, close, b"", &mut out) {
            ParsedResponse::Response(r) => Some((
                r.status,
                r.framing,
                r.keep_alive,
                r.pass_through,
                if r.pass_through {
                    String::new()
                } else {
                    String::from_utf8(out).unwrap_or_default()
                },
            )),
            ParsedResponse::Partial | ParsedResponse::Invalid => None,
        }
    }

    /// status, framing, keep-alive, pass-through
    type Decision = Option<(u16, Framing, bool, bool)>;

    /// Responses for HTTP/2 clients: the same framing rules, the fields HTTP/2 forbids
    /// dropped, 1xx skipped, 101 and fields `http` refuses invalid.
    #[test]
    fn responses_for_http2_clients() {
        use Framing::*;
        // (response, HEAD request, framing and keep-alive or what else, fields sent on)
        type Case<'a> = (&'a str, bool, Result<(Framing, bool), &'a str>, &'a str);
        let cases: &[Case] = &[
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n",
                false,
                Ok((Length(3), true)),
                "content-length: 3|x-a: 1|x-request-id: id-1",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                true,
                Ok((Empty, true)),
                "content-length: 3|x-request-id: id-1",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\
                 Connection: keep-alive, x-a\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\n\
                 TE: trailers\r\nX-Request-Id: theirs\r\n\r\n",
                false,
                Ok((Chunked, true)),
                "x-request-id: theirs",
            ),
            (
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
                false,
                Ok((Empty, false)),
                "x-request-id: id-1",
            ),
            (
                "HTTP/1.0 200 OK\r\n\r\n",
                false,
                Ok((UntilClose, false)),
                "x-request-id: id-1",
            ),
            (
                "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                false,
                Err("1xx"),
                "",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                false,
                Err("invalid"),
                "",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                Err("invalid"),
                "",
            ),
            (
                "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
                false,
                Err("invalid"),
                "",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n",
                false,
                Err("partial"),
                "",
            ),
        ];
        for (raw, head, want, fields) in cases {
            let got = match parse_response_for_h2(raw.as_bytes(), *head, b"id-1") {
                H2Response::Partial => Err("partial"),
                H2Response::Invalid => Err("invalid"),
                H2Response::Informational(n) => {
                    assert_eq!(n, raw.len(), "{raw:?}");
                    Err("1xx")
                }
                H2Response::Final {
                    head_len,
                    header,
                    facts,
                } => {
                    assert_eq!(head_len, raw.len(), "{raw:?}");
                    let sent: Vec<String> = header
                        .headers
                        .iter()
                        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                        .collect();
                    assert_eq!(sent.join("|"), *fields, "{raw:?}");
                    Ok((facts.framing, facts.keep_alive))
                }
            };
            assert_eq!(got, *want, "{raw:?}");
        }
    }

    #[test]
    fn parse_response_cases() {
        use Framing::*;
        let cases: &[(&str, bool, Decision)] = &[
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                false,
                Some((200, Length(3), true, true)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                true,
                Some((200, Empty, true, true)),
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                Some((204, Empty, true, true)),
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                Some((304, Empty, true, true)),
            ),
            (
                "HTTP/1.1 100 Continue\r\n\r\n",
                false,
                Some((100, Empty, true, true)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Some((200, Chunked, true, true)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false,
                Some((200, Chunked, true, true)),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                false,
                Some((200, UntilClose, false, false)),
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                false,
                Some((200, UntilClose, false, false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false,
                Some((200, Length(1), false, false)),
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                false,
                Some((200, Length(1), false, false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                false,
                Some((200, Length(1), true, true)),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                None,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false, None),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
                false,
                None,
            ),
            ("HTTP/1.1 2000 OK\r\n\r\n", false, None),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n", false, None),
            ("SSH-2.0-OpenSSH\r\n\r\n", false, None),
        ];
        for (raw, head, want) in cases {
            let got = resp(raw, *head, false).map(|(s, f, k, p, _)| (s, f, k, p));
            assert_eq!(&got, want, "{raw:?}");
        }
    }

    #[test]
    fn rewritten_response_heads() {
        // Transfer-Encoding wins over Content-Length, and the client never sees both.
        let (_, framing, _, pass, head) = resp(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n",
            false,
            false,
        )
        .expect("valid");
        assert_eq!((framing, pass), (Framing::Chunked, false));
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: y\r\n\r\n"
        );
        // Hop-by-hop headers are dropped; closing the client adds `Connection: close`.
        let (_, _, _, _, head) = resp(
            "HTTP/1.1 404 Not Found\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            false,
            true,
        )
        .expect("valid");
        assert_eq!(
            head,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    /// The upstream head's `X-Request-Id` (and the head's id) for a request.
    fn request_id_of(raw: &str) -> (String, Vec<String>) {
        let mut out = Vec::new();
        let Parsed::Request(h) =
            parse_request(raw.as_bytes(), &mut out, None, false, false, RULES, true)
        else {
            panic!("not a lean request: {raw}");
        };
        let upstream = String::from_utf8(out).unwrap();
        let sent: Vec<String> = upstream
            .lines()
            .filter_map(|l| l.strip_prefix("X-Request-Id: "))
            .map(str::to_string)
            .collect();
        (h.request_id.as_str().to_string(), sent)
    }

    #[test]
    fn request_ids_upstream() {
        let cases = [
            // (request, kept: Some(id) or None = generated)
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-1\r\n\r\n",
                Some("abc-1"),
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nx-request-id: A/b+c=\r\n\r\n",
                Some("A/b+c="),
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: a b\r\n\r\n",
                None,
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: \r\n\r\n", None),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: \"x\"\r\n\r\n",
                None,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: one\r\nX-Request-Id: two\r\n\r\n",
                Some("one"),
            ),
        ];
        for (raw, kept) in cases {
            let (id, sent) = request_id_of(raw);
            assert_eq!(sent, vec![id.clone()], "exactly one id upstream: {raw:?}");
            match kept {
                Some(k) => assert_eq!(id, k, "{raw:?}"),
                None => assert!(
                    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                    "generated: {id} for {raw:?}"
                ),
            }
        }
        // Off: the header passes as any other, none is added.
        let mut out = Vec::new();
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: a b\r\n\r\n";
        assert!(matches!(
            parse_request(raw.as_bytes(), &mut out, None, false, false, RULES, false),
            Parsed::Request(_)
        ));
        let upstream = String::from_utf8(out).unwrap();
        assert_eq!(upstream.matches("X-Request-Id").count(), 1, "{upstream}");
        assert!(upstream.contains("X-Request-Id: a b\r\n"), "{upstream}");
    }

    #[test]
    fn request_ids_in_responses() {
        let head = |raw: &str| {
            let mut out = Vec::new();
            match parse_response(raw.as_bytes(), false, false, b"id-1", &mut out) {
                ParsedResponse::Response(r) => (
                    r.pass_through,
                    String::from_utf8(if r.pass_through { Vec::new() } else { out }).unwrap(),
                ),
                _ => panic!("{raw}"),
            }
        };
        // Added before the blank line; the rest as it came.
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok"),
            (
                false,
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nX-Request-Id: id-1\r\n\r\n"
                    .to_string()
            )
        );
        // The backend's own is kept (nothing added).
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-request-id: theirs\r\n\r\n"),
            (true, String::new())
        );
        // A head rewritten anyway gets it too, once.
        let (pass, out) = head("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: x\r\n\r\n");
        assert!(!pass);
        assert_eq!(out.matches("X-Request-Id: id-1\r\n").count(), 1, "{out}");
        assert!(!out.contains("Connection: x"), "{out}");
        // Bare LF line ends: rewritten field by field.
        let (pass, out) = head("HTTP/1.1 200 OK\nContent-Length: 0\n\n");
        assert!(!pass);
        assert!(out.ends_with("X-Request-Id: id-1\r\n\r\n"), "{out}");
    }
}
