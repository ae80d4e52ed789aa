//! Access log lines from records: JSON (one object per line) and the combined format
//! (Apache/nginx). Everything taken from the request is escaped, so no byte a client sends
//! can end a line early, break out of a string or forge a field.

use std::io::Write;

use super::record::{Field, Record};

/// UTC civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Broken-down UTC time of a Unix millisecond count.
struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl Utc {
    fn of(unix_ms: u64) -> Self {
        let secs = (unix_ms / 1000) as i64;
        let (year, month, day) = civil(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400) as u32;
        Utc {
            year,
            month,
            day,
            hour: sod / 3600,
            minute: sod / 60 % 60,
            second: sod % 60,
        }
    }
}

/// Decimal digits of `n` (the writer formats several numbers per line: `write!` costs more).
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `n` as exactly `width` digits (zero-padded; `n` must fit).
fn push_padded(out: &mut Vec<u8>, n: u32, width: usize) {
    let mut digits = [b'0'; 4];
    let mut n = n;
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

std::thread_local! {
    /// The writer thread's last formatted second (`2026-12-06T02:04:22`): lines come in
    /// thousands per second, the date changes once.
    static SECOND: std::cell::RefCell<(u64, Vec<u8>)> = const {
        std::cell::RefCell::new((u64::MAX, Vec::new()))
    };
}

std::thread_local! {
    static LAST_ADDR: std::cell::RefCell<(Option<std::net::SocketAddr>, Vec<u8>)> = const {
        std::cell::RefCell::new((None, Vec::new()))
    };
}

/// `2026-12-06T02:04:22.123Z`
pub fn rfc3339_ms(out: &mut Vec<u8>, unix_ms: u64) {
    let sec = unix_ms / 1000;
    SECOND.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != sec {
            let t = Utc::of(unix_ms);
            cache.1.clear();
            let _ = write!(
                cache.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year, t.month, t.day, t.hour, t.minute, t.second
            );
            cache.0 = sec;
        }
        out.extend_from_slice(&cache.1);
    });
    out.push(b'.');
    push_padded(out, (unix_ms % 1000) as u32, 3);
    out.push(b'Z');
}

/// `06/Dec/2026:02:04:22 +0000` (nginx's `$time_local`, in UTC).
fn clf_time(out: &mut Vec<u8>, unix_ms: u64) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = Utc::of(unix_ms);
    let month = MONTHS[(t.month as usize).clamp(1, 12) - 1];
    let _ = write!(
        out,
        "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000",
        t.day, t.year, t.hour, t.minute, t.second
    );
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Escapes ASCII text for a JSON string (no quotes added).
fn json_ascii(out: &mut Vec<u8>, s: &[u8]) {
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
}

/// Writes `s` as a JSON string. Valid UTF-8 is kept; a byte that is not part of valid
/// UTF-8 is written as `\u00XX` (its Latin-1 reading), so the line stays valid JSON.
pub fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    // Almost every field is printable ASCII with nothing to escape: one pass that the
    // compiler vectorizes (no early exit), then one copy. The byte-by-byte escaper below was
    // the writer thread's top symbol under load.
    let plain = s.iter().fold(true, |ok, &b| {
        ok & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.extend_from_slice(s);
        out.push(b'"');
        return;
    }
    let mut rest = s;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                json_ascii(out, valid.as_bytes());
                break;
            }
            Err(e) => {
                let (valid, bad) = rest.split_at(e.valid_up_to());
                json_ascii(out, valid);
                let n = e.error_len().unwrap_or(bad.len());
                for &b in &bad[..n] {
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
                rest = &bad[n..];
            }
        }
    }
    out.push(b'"');
}

/// A JSON string, or `null` when empty.
fn json_opt(out: &mut Vec<u8>, s: &[u8]) {
    if s.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        json_string(out, s);
    }
}

/// Microseconds as milliseconds with three decimals.
fn ms(out: &mut Vec<u8>, us: u64) {
    push_u64(out, us / 1000);
    out.push(b'.');
    push_padded(out, (us % 1000) as u32, 3);
}

fn ms_opt(out: &mut Vec<u8>, us: Option<u64>) {
    match us {
        Some(us) => ms(out, us),
        None => out.extend_from_slice(b"null"),
    }
}

/// One JSON object and a newline.
pub fn json_line(out: &mut Vec<u8>, r: &Record, node_id: u64) {
    out.extend_from_slice(b"{\"time\":\"");
    rfc3339_ms(out, r.unix_ms);
    out.extend_from_slice(b"\",\"node_id\":");
    push_u64(out, node_id);
    out.extend_from_slice(b",\"request_id\":");
    json_opt(out, r.get(Field::RequestId));
    out.extend_from_slice(b",\"client_ip\":");
    json_opt(out, r.get(Field::ClientIp));
    out.extend_from_slice(b",\"client_port\":");
    push_u64(out, u64::from(r.client_port));
    out.extend_from_slice(b",\"method\":");
    json_opt(out, r.get(Field::Method));
    out.extend_from_slice(b",\"host\":");
    json_opt(out, r.get(Field::Host));
    out.extend_from_slice(b",\"path\":");
    json_opt(out, r.get(Field::Path));
    out.extend_from_slice(b",\"query\":");
    json_opt(out, r.get(Field::Query));
    out.extend_from_slice(b",\"protocol\":\"");
    out.extend_from_slice(r.protocol.as_str().as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    push_u64(out, u64::from(r.status));
    out.extend_from_slice(b",\"bytes_in\":");
    push_u64(out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    push_u64(out, r.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    ms(out, r.duration_us);
    out.extend_from_slice(b",\"upstream_connect_ms\":");
    ms_opt(out, r.upstream_connect_us);
    out.extend_from_slice(b",\"upstream_duration_ms\":");
    ms_opt(out, r.upstream_duration_us);
    out.extend_from_slice(b",\"backend_id\":");
    json_opt(out, r.get(Field::BackendId));
    out.extend_from_slice(b",\"backend_addr\":");
    match r.backend_addr {
        Some(a) => {
            // Consecutive lines mostly name the same few backends.
            LAST_ADDR.with(|cache| {
                let mut cache = cache.borrow_mut();
                if cache.0 != Some(a) {
                    cache.1.clear();
                    let _ = write!(cache.1, "\"{a}\"");
                    cache.0 = Some(a);
                }
                out.extend_from_slice(&cache.1);
            });
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"tag\":");
    json_opt(out, r.get(Field::Tag));
    out.extend_from_slice(b",\"attempts\":");
    push_u64(out, u64::from(r.attempts));
    out.extend_from_slice(b",\"tls_version\":");
    json_opt(out, r.tls_version.unwrap_or("").as_bytes());
    out.extend_from_slice(b",\"sni\":");
    json_opt(out, r.get(Field::Sni));
    out.extend_from_slice(b",\"user_agent\":");
    json_opt(out, r.get(Field::UserAgent));
    out.extend_from_slice(b",\"referer\":");
    json_opt(out, r.get(Field::Referer));
    out.extend_from_slice(b"}\n");
}

/// Text inside a combined-format quoted field: `"`, `\`, control bytes and bytes >= 0x7f
/// as `\xXX`, as nginx does.
fn clf_escaped(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.extend_from_slice(b"\\x");
            out.push(HEX[usize::from(b >> 4)].to_ascii_uppercase());
            out.push(HEX[usize::from(b & 0xf)].to_ascii_uppercase());
        } else {
            out.push(b);
        }
    }
}

/// A combined-format field: escaped, or `-` when empty.
fn clf_opt(out: &mut Vec<u8>, s: &[u8]) {
    if s.is_empty() {
        out.push(b'-');
    } else {
        clf_escaped(out, s);
    }
}

/// `client - - [time] "METHOD path?query PROTO" status bytes "referer" "user-agent"` and a
/// newline. The user field is always `-`: credentials are never logged.
pub fn combined_line(out: &mut Vec<u8>, r: &Record) {
    clf_opt(out, r.get(Field::ClientIp));
    out.extend_from_slice(b" - - [");
    clf_time(out, r.unix_ms);
    out.extend_from_slice(b"] \"");
    clf_opt(out, r.get(Field::Method));
    out.push(b' ');
    clf_opt(out, r.get(Field::Path));
    let query = r.get(Field::Query);
    if !query.is_empty() {
        out.push(b'?');
        clf_escaped(out, query);
    }
    out.push(b' ');
    out.extend_from_slice(r.protocol.as_str().as_bytes());
    out.extend_from_slice(b"\" ");
    push_u64(out, u64::from(r.status));
    out.push(b' ');
    push_u64(out, r.bytes_out);
    out.extend_from_slice(b" \"");
    clf_opt(out, r.get(Field::Referer));
    out.extend_from_slice(b"\" \"");
    clf_opt(out, r.get(Field::UserAgent));
    out.extend_from_slice(b"\"\n");
}

#[cfg(test)]
mod tests {
    use super::super::record::{Protocol, Text};
    use super::*;

    #[test]
    fn json_strings_escape_hostile_bytes() {
        let cases: [(&[u8], &str); 10] = [
            (b"plain", r#""plain""#),
            (b"a\"b", r#""a\"b""#),
            (b"back\\slash", r#""back\\slash""#),
            (b"line\nbreak\r", r#""line\nbreak\r""#),
            (b"\x00\x01\x1f\x7f", r#""\u0000\u0001\u001f\u007f""#),
            (b"tab\there", r#""tab\there""#),
            ("héllo €".as_bytes(), "\"héllo €\""),
            // Not UTF-8: each bad byte as \u00XX; good text around it kept.
            (b"a\xffb\xc3", r#""a\u00ffb\u00c3""#),
            (b"\xe2\x82", r#""\u00e2\u0082""#),
            (b"\"}\n{\"status\":200", r#""\"}\n{\"status\":200""#),
        ];
        for (input, want) in cases {
            let mut out = Vec::new();
            json_string(&mut out, input);
            assert_eq!(String::from_utf8(out.clone()).unwrap(), want, "{input:?}");
            // Whatever came in, the result is one valid JSON string.
            let back: String = serde_json::from_slice(&out).unwrap();
            assert!(!back.is_empty() || input.is_empty());
        }
    }

    #[test]
    fn numbers() {
        for (n, want) in [
            (0u64, "0"),
            (7, "7"),
            (10, "10"),
            (65535, "65535"),
            (u64::MAX, "18446744073709551615"),
        ] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
        for (us, want) in [
            (0u64, "0.000"),
            (7, "0.007"),
            (1_000, "1.000"),
            (12_345, "12.345"),
            (1_000_999, "1000.999"),
        ] {
            let mut out = Vec::new();
            ms(&mut out, us);
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn times() {
        let cases = [
            (
                0u64,
                "1970-01-01T00:00:00.000Z",
                "01/Jan/1970:00:00:00 +0000",
            ),
            (
                951_782_400_123,
                "2000-02-29T00:00:00.123Z",
                "29/Feb/2000:00:00:00 +0000",
            ),
            (
                1_796_523_862_999,
                "2026-12-06T02:24:22.999Z",
                "06/Dec/2026:02:24:22 +0000",
            ),
            (
                4_107_542_399_000,
                "2100-02-28T23:59:59.000Z",
                "28/Feb/2100:23:59:59 +0000",
            ),
        ];
        // The same second again (from the cache), then the next one.
        let mut out = Vec::new();
        for ms in [1_796_523_862_000u64, 1_796_523_862_001, 1_796_523_863_000] {
            rfc3339_ms(&mut out, ms);
            out.push(b' ');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-06T02:24:22.000Z 2026-12-06T02:24:22.001Z 2026-12-06T02:24:23.000Z "
        );
        for (ms, iso, clf) in cases {
            let mut out = Vec::new();
            rfc3339_ms(&mut out, ms);
            assert_eq!(String::from_utf8(out).unwrap(), iso);
            let mut out = Vec::new();
            clf_time(&mut out, ms);
            assert_eq!(String::from_utf8(out).unwrap(), clf);
        }
    }

    fn hostile() -> Record {
        let t = Text {
            client_ip: b"192.0.2.7",
            method: b"GET",
            host: b"a.test",
            path: b"/p\"a\\th",
            query: b"q=\"x\"\n",
            request_id: b"abc",
            user_agent: b"evil\r\n\"agent\x00\xff",
            referer: b"",
            sni: b"",
            tag: b"blue",
        };
        let mut r = Record::new(&t, Protocol::Http11);
        r.unix_ms = 1_796_523_862_999;
        r.status = 502;
        r.client_port = 40000;
        r.bytes_in = 100;
        r.bytes_out = 230;
        r.duration_us = 12_345;
        r.upstream_connect_us = Some(7);
        r.attempts = 2;
        r.set_backend(b"b1", Some("127.0.0.1:9000".parse().unwrap()));
        r
    }

    #[test]
    fn json_line_is_one_valid_object_with_every_field() {
        let mut out = Vec::new();
        json_line(&mut out, &hostile(), 3);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let want = serde_json::json!({
            "time": "2026-12-06T02:24:22.999Z", "node_id": 3, "request_id": "abc",
            "client_ip": "192.0.2.7", "client_port": 40000, "method": "GET", "host": "a.test",
            "path": "/p\"a\\th", "query": "q=\"x\"\n", "protocol": "HTTP/1.1", "status": 502,
            "bytes_in": 100, "bytes_out": 230, "duration_ms": 12.345,
            "upstream_connect_ms": 0.007, "upstream_duration_ms": null, "backend_id": "b1",
            "backend_addr": "127.0.0.1:9000", "tag": "blue", "attempts": 2,
            "tls_version": null, "sni": null, "user_agent": "evil\r\n\"agent\u{0}\u{ff}",
            "referer": null,
        });
        assert_eq!(v, want);
        // Another backend on the next line, then the first again (the address cache).
        for addr in ["[::1]:8080", "127.0.0.1:9000"] {
            let mut r = hostile();
            r.set_backend(b"b2", Some(addr.parse().unwrap()));
            let mut out = Vec::new();
            json_line(&mut out, &r, 3);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["backend_addr"], addr);
            assert_eq!(v["backend_id"], "b2");
        }
    }

    #[test]
    fn combined_line_quotes_and_escapes() {
        let mut out = Vec::new();
        combined_line(&mut out, &hostile());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "192.0.2.7 - - [06/Dec/2026:02:24:22 +0000] \"GET /p\\x22a\\x5Cth?q=\\x22x\\x22\\x0A HTTP/1.1\" 502 230 \"-\" \"evil\\x0D\\x0A\\x22agent\\x00\\xFF\"\n"
        );
        let mut empty = Record::new(&Text::default(), Protocol::Http2);
        empty.status = 400;
        let mut out = Vec::new();
        combined_line(&mut out, &empty);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "- - - [01/Jan/1970:00:00:00 +0000] \"- - HTTP/2.0\" 400 0 \"-\" \"-\"\n"
        );
    }
}
