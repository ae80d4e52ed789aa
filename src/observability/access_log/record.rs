//! What one request leaves for the access log: a compact record built on the request path
//! (numbers, and the request's text fields copied into one buffer), formatted into a line
//! later, on the writer thread.

use std::net::SocketAddr;

/// The text fields of a record, in the order they are packed. `BackendId` is last: on the
/// lean path the backend is known only after the request's bytes have left the client
/// buffer, so it is appended then (`Record::set_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    ClientIp,
    Method,
    Host,
    Path,
    Query,
    RequestId,
    UserAgent,
    Referer,
    Sni,
    Tag,
    BackendId,
}

const FIELDS: usize = 11;

/// Room kept for the backend id appended later, so that append does not reallocate
/// (`schema::MAX_NAME_LEN` is 63).
const BACKEND_ROOM: usize = 64;

/// The protocol of the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http10,
    Http11,
    Http2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http10 => "HTTP/1.0",
            Protocol::Http11 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2.0",
        }
    }
}

/// The text fields as borrowed from the request (all but the backend id). Empty means
/// absent (written as `null` in JSON, `-` in combined).
#[derive(Debug, Default, Clone, Copy)]
pub struct Text<'a> {
    pub client_ip: &'a [u8],
    pub method: &'a [u8],
    pub host: &'a [u8],
    pub path: &'a [u8],
    pub query: &'a [u8],
    pub request_id: &'a [u8],
    pub user_agent: &'a [u8],
    pub referer: &'a [u8],
    pub sni: &'a [u8],
    pub tag: &'a [u8],
}

/// One request, as the access log writes it.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request head had been read (coarse wall clock, Unix ms).
    pub unix_ms: u64,
    /// 0 when no answer was sent (the client went away).
    pub status: u16,
    pub protocol: Protocol,
    /// e.g. "TLSv1.3"; `None` on plain HTTP.
    pub tls_version: Option<&'static str>,
    pub client_port: u16,
    /// Backends tried (0: none, the proxy answered itself).
    pub attempts: u16,
    /// Request bytes read from the client (head and body, as HTTP/1.1).
    pub bytes_in: u64,
    /// Response bytes sent to the client (head and body, as HTTP/1.1).
    pub bytes_out: u64,
    pub duration_us: u64,
    /// Of the last attempt: the connect (0 on a reused connection), and from the start of
    /// the attempt to the end of the response (nginx's `$upstream_response_time`).
    pub upstream_connect_us: Option<u64>,
    pub upstream_duration_us: Option<u64>,
    pub backend_addr: Option<SocketAddr>,
    /// The text fields, packed; `ends[i]` is where field `i` ends in `text`.
    text: Vec<u8>,
    ends: [u32; FIELDS],
}

impl Record {
    /// A record with the request's text (one allocation, sized to fit the backend id too).
    pub fn new(t: &Text<'_>, protocol: Protocol) -> Self {
        let parts = [
            t.client_ip,
            t.method,
            t.host,
            t.path,
            t.query,
            t.request_id,
            t.user_agent,
            t.referer,
            t.sni,
            t.tag,
        ];
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut text = Vec::with_capacity(len + BACKEND_ROOM);
        let mut ends = [0u32; FIELDS];
        for (i, part) in parts.iter().enumerate() {
            text.extend_from_slice(part);
            ends[i] = text.len() as u32;
        }
        ends[FIELDS - 1] = text.len() as u32;
        Record {
            unix_ms: 0,
            status: 0,
            protocol,
            tls_version: None,
            client_port: 0,
            attempts: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_us: 0,
            upstream_connect_us: None,
            upstream_duration_us: None,
            backend_addr: None,
            text,
            ends,
        }
    }

    /// The backend that served (or last failed) the request.
    pub fn set_backend(&mut self, id: &[u8], addr: Option<SocketAddr>) {
        let start = self.ends[FIELDS - 2] as usize;
        self.text.truncate(start);
        self.text.extend_from_slice(id);
        self.ends[FIELDS - 1] = self.text.len() as u32;
        self.backend_addr = addr;
    }

    pub fn get(&self, field: Field) -> &[u8] {
        let i = field as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_backend_is_appended() {
        let t = Text {
            client_ip: b"10.0.0.1",
            method: b"GET",
            host: b"a.test",
            path: b"/x",
            query: b"",
            request_id: b"id",
            user_agent: b"ua",
            referer: b"",
            sni: b"a.test",
            tag: b"blue",
        };
        let mut r = Record::new(&t, Protocol::Http11);
        assert_eq!(r.get(Field::ClientIp), b"10.0.0.1");
        assert_eq!(r.get(Field::Query), b"");
        assert_eq!(r.get(Field::Tag), b"blue");
        assert_eq!(r.get(Field::BackendId), b"");
        r.set_backend(b"be-1", None);
        assert_eq!(r.get(Field::BackendId), b"be-1");
        assert_eq!(r.get(Field::Tag), b"blue");
        r.set_backend(b"be-22", None);
        assert_eq!(r.get(Field::BackendId), b"be-22");
        assert_eq!(r.get(Field::Sni), b"a.test");
    }
}
