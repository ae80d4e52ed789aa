//! What a request must look like to be proxied, the same on both request paths (the lean
//! HTTP/1.1 loop `h1` and Pingora's `service`): at least as strict as the stricter of nginx
//! and HAProxy where both refuse. Limits on the head, the body length, `Transfer-Encoding`,
//! header names with underscores and what makes an upgrade.

/// Largest request head (request line and header fields, as sent in HTTP/1.1): 431 beyond.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a request: 431 beyond (HAProxy's default is 101).
pub const MAX_HEADERS: usize = 100;

/// The configurable part (`[proxy] max_body_bytes`, `underscores_in_headers`).
#[derive(Debug, Clone, Copy)]
pub struct Strictness {
    /// A request announcing a longer body is refused (413) before any backend is contacted.
    pub max_body_bytes: u64,
    /// Header names with `_` are passed on (nginx's `underscores_in_headers on`); by default
    /// they are dropped: a CGI/WSGI backend reads `Content_Length` as `CONTENT_LENGTH`.
    pub underscores_in_headers: bool,
}

impl Default for Strictness {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 30,
            underscores_in_headers: false,
        }
    }
}

/// Why a request is refused with our own answer (the connection is then closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("400 Bad Request: {0}\n")]
    BadRequest(&'static str),
    #[error("413 Payload Too Large: the request body is over the limit\n")]
    BodyTooLarge,
    #[error("431 Request Header Fields Too Large\n")]
    HeadTooLarge,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::BodyTooLarge => 413,
            Refusal::HeadTooLarge => 431,
        }
    }
}

impl Strictness {
    /// Checks a `Content-Length` value: digits only, at most what a signed 64-bit length
    /// holds (else 400, as nginx and HAProxy), at most the configured maximum (else 413).
    pub fn content_length(self, digits: &[u8]) -> Result<u64, Refusal> {
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(Refusal::BadRequest("invalid Content-Length"));
        }
        let n = digits
            .iter()
            .try_fold(0u64, |n, d| {
                n.checked_mul(10)?
                    .checked_add(u64::from(d.wrapping_sub(b'0')))
            })
            .filter(|n| i64::try_from(*n).is_ok())
            .ok_or(Refusal::BadRequest("Content-Length out of range"))?;
        if n > self.max_body_bytes {
            return Err(Refusal::BodyTooLarge);
        }
        Ok(n)
    }

    /// True when a header of this name is dropped before it reaches the backend.
    pub fn drops_header(self, name: &[u8]) -> bool {
        !self.underscores_in_headers && name.contains(&b'_')
    }
}

/// `Transfer-Encoding` values (all fields, in order) that frame a request: `chunked`
/// exactly once, and last. Anything else (repeated `chunked`, a final coding other than
/// `chunked`) is a 400.
pub fn transfer_encoding_ok<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let mut chunked_seen = false;
    let mut last_chunked = false;
    for token in values
        .into_iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
    {
        last_chunked = token.eq_ignore_ascii_case(b"chunked");
        if last_chunked && std::mem::replace(&mut chunked_seen, true) {
            return false;
        }
    }
    last_chunked
}

/// A `Connection` value that names `upgrade`.
pub fn connection_upgrade(value: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// Only these may open a tunnel: `Upgrade` with `Connection: upgrade` on an HTTP/1.1 GET
/// (a 101 to anything else is not passed on).
pub fn is_upgrade(method: &str, http11: bool, connection_upgrade: bool) -> bool {
    http11 && method == "GET" && connection_upgrade
}

/// A request target with no raw space, control byte or NUL.
pub fn clean_target(target: &[u8]) -> bool {
    !target.iter().any(|b| *b <= b' ' || *b == 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_bounds() {
        let s = Strictness {
            max_body_bytes: 100,
            underscores_in_headers: false,
        };
        assert_eq!(s.content_length(b"0"), Ok(0));
        assert_eq!(s.content_length(b"100"), Ok(100));
        assert_eq!(s.content_length(b"00100"), Ok(100));
        assert_eq!(s.content_length(b"101"), Err(Refusal::BodyTooLarge));
        for bad in ["", "+1", "-1", "1 ", "0x1"] {
            assert_eq!(
                s.content_length(bad.as_bytes()),
                Err(Refusal::BadRequest("invalid Content-Length")),
                "{bad:?}"
            );
        }
        let big = Strictness {
            max_body_bytes: u64::MAX,
            ..s
        };
        assert_eq!(
            big.content_length(b"9223372036854775807"),
            Ok(i64::MAX as u64)
        );
        for overflow in [
            "9223372036854775808",
            "18446744073709551616",
            "99999999999999999999",
        ] {
            assert_eq!(
                big.content_length(overflow.as_bytes()),
                Err(Refusal::BadRequest("Content-Length out of range")),
                "{overflow}"
            );
        }
    }

    #[test]
    fn transfer_encodings() {
        let ok = |vs: &[&str]| transfer_encoding_ok(vs.iter().map(|v| v.as_bytes()));
        assert!(ok(&["chunked"]));
        assert!(ok(&["Chunked"]));
        assert!(ok(&["gzip, chunked"]));
        assert!(ok(&["gzip", "chunked"]));
        assert!(!ok(&["chunked, chunked"]));
        assert!(!ok(&["chunked", "chunked"]));
        assert!(!ok(&["chunked, gzip"]));
        assert!(!ok(&["gzip"]));
        assert!(!ok(&[""]));
    }

    #[test]
    fn targets_and_names() {
        assert!(clean_target(b"/a?b=c%20d"));
        assert!(!clean_target(b"/a b"));
        assert!(!clean_target(b"/a\0"));
        assert!(!clean_target(b"/a\x7f"));
        assert!(!clean_target(b"/a\tb"));
        let s = Strictness::default();
        assert!(s.drops_header(b"Content_Length"));
        assert!(!s.drops_header(b"Content-Length"));
        let on = Strictness {
            underscores_in_headers: true,
            ..s
        };
        assert!(!on.drops_header(b"X_Y"));
        assert!(connection_upgrade(b"keep-alive, Upgrade"));
        assert!(!connection_upgrade(b"keep-alive"));
        assert!(is_upgrade("GET", true, true));
        assert!(!is_upgrade("POST", true, true));
        assert!(!is_upgrade("GET", false, true));
        assert!(!is_upgrade("GET", true, false));
    }
}
