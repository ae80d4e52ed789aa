//! #13: one error format. Every error answer of the management API, including what the
//! framework answers itself, is `{"error": "..."}` with `Content-Type: application/json`; the
//! `Authorization` scheme is case-insensitive.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Sends `head` (and `body`) on a new connection; returns (status, headers, body).
async fn raw(node: &Node, head: &[u8], body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(node.api_addr).await.expect("connect");
    s.write_all(head).await.expect("write head");
    // A refused request may close the connection before the body is sent.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn request(method: &str, target: &str, extra: &str, body_len: usize) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {TOKEN}\r\n\
         Connection: close\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn assert_json_error(case: &str, want: u16, got: &(u16, String, String)) {
    let (status, head, body) = got;
    assert_eq!(*status, want, "{case}: status\n{head}\n{body}");
    assert!(
        head.contains("content-type: application/json"),
        "{case}: not JSON:\n{head}"
    );
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {body:?}"));
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "{case}: no error message: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_json_and_the_scheme_is_case_insensitive() {
    let node = Node::start_default().await;

    let big = vec![b' '; 3 * 1024 * 1024];
    let got = raw(
        &node,
        &request("POST", "/api/v1/backends", "", big.len()),
        &big,
    )
    .await;
    assert_json_error("body over 2 MiB", 413, &got);

    let got = raw(&node, &request("PATCH", "/api/v1/backends", "", 0), b"").await;
    assert_json_error("method not allowed", 405, &got);
    assert!(
        got.1.contains("allow:"),
        "405 keeps its Allow header:\n{}",
        got.1
    );

    let got = raw(&node, &request("GET", "/api/v1/backends/%FF", "", 0), b"").await;
    assert_json_error("path that does not decode", 400, &got);

    let got = raw(
        &node,
        &request("GET", "/api/v1/logs/stream?level=warn&level=info", "", 0),
        b"",
    )
    .await;
    assert_json_error("duplicate query parameter", 400, &got);

    let long = format!("/api/v1/backends/{}", "x".repeat(10_000));
    let got = raw(&node, &request("GET", &long, "", 0), b"").await;
    assert_json_error("request target over 8 KiB", 414, &got);

    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let got = raw(&node, &request("GET", "/api/v1/backends", &many, 0), b"").await;
    assert_json_error("150 headers", 431, &got);

    let fat = format!("X-Fat: {}\r\n", "v".repeat(100 * 1024));
    let got = raw(&node, &request("GET", "/api/v1/backends", &fat, 0), b"").await;
    assert_json_error("100 KiB of headers", 431, &got);

    // Refused by the HTTP layer itself (hyper), in the same format.
    let got = raw(
        &node,
        b"GET /api/v1/backends/\xff\xfe HTTP/1.1\r\nHost: api\r\n\r\n",
        b"",
    )
    .await;
    assert_json_error("non-UTF-8 request target", 400, &got);
    let huge = format!("X-Huge: {}\r\n", "v".repeat(300 * 1024));
    let got = raw(&node, &request("GET", "/api/v1/backends", &huge, 0), b"").await;
    assert_json_error("head over hyper's limit", 431, &got);

    let got = raw(&node, &request("GET", "/api/v1/nope", "", 0), b"").await;
    assert_json_error("unknown endpoint", 404, &got);

    let got = raw(&node, &request("POST", "/api/v1/backends", "", 1), b"{").await;
    assert_json_error("invalid JSON", 400, &got);

    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let head = format!(
            "GET /api/v1/backends HTTP/1.1\r\nHost: api\r\nAuthorization: {scheme} {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        let (status, _, body) = raw(&node, head.as_bytes(), b"").await;
        assert_eq!(status, 200, "scheme {scheme:?}: {body}");
    }
    let head = "GET /api/v1/backends HTTP/1.1\r\nHost: api\r\nAuthorization: Basic x\r\nConnection: close\r\n\r\n";
    let got = raw(&node, head.as_bytes(), b"").await;
    assert_json_error("another scheme", 401, &got);
}

/// #13: a junk certificate is blamed on `cert_pem` (it was blamed on `key_pem`), a junk key on
/// `key_pem`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_or_key_names_the_field_at_fault() {
    let node = Node::start_default().await;
    let good = self_signed(&["pair.test"]);
    let junk_cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let junk_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    let other = self_signed(&["other.test"]);
    for (cert, key, field) in [
        (junk_cert, good.key_pem.as_str(), "cert_pem"),
        ("no pem at all", good.key_pem.as_str(), "cert_pem"),
        (good.cert_pem.as_str(), junk_key, "key_pem"),
        (good.cert_pem.as_str(), "no pem at all", "key_pem"),
        (good.cert_pem.as_str(), other.key_pem.as_str(), "key_pem"),
    ] {
        let (status, body) = node
            .api_post(
                "/api/v1/domains",
                serde_json::json!({
                    "domain": "pair.test",
                    "enabled_backends_tag": "a",
                    "cert_pem": cert,
                    "key_pem": key,
                }),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&format!("`{field}`")),
            "want {field} blamed: {body}"
        );
    }
}
