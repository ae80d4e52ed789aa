//! Metrics and stats as an operator's tooling sees them.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::json;

/// Runs `promtool check metrics` on `text`; returns (success, output).
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool must be installed (scripts/bootstrap.sh installs the prometheus package)",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_requests() {
    let metrics_addr = free_addr();
    let node = Node::start(NodeOptions::new().extra(&format!(
        "[metrics]\nenabled = true\nlisten_addr = \"{metrics_addr}\"\n"
    )))
    .await;
    let backend = Backend::start("m1").await;
    node.add_backend("m1", &backend.address(), &["a"]).await;
    node.add_domain("metrics.test", "a").await;
    for _ in 0..5 {
        assert_eq!(node.proxy_get("metrics.test", "/").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(node.proxy_get("unknown.test", "/").await.status, 404);
    }

    let resp = reqwest::Client::new()
        .get(node.api_url("/api/v1/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(ctype.starts_with("text/plain"), "content-type {ctype}");
    let text = resp.text().await.unwrap();
    let (ok, out) = promtool_check(&text);
    assert!(ok, "promtool check metrics failed:\n{out}\n---\n{text}");
    assert_eq!(
        metric_value(&text, "pingora_vhost_requests_total{code=\"200\"}"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "pingora_vhost_requests_total{code=\"404\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "pingora_vhost_raft_is_leader"),
        Some(1.0)
    );
    assert_eq!(metric_value(&text, "pingora_vhost_routes"), Some(1.0));

    // The dedicated listener serves the same registry without a token.
    let text2 = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (ok, out) = promtool_check(&text2);
    assert!(ok, "promtool on the metrics listener:\n{out}");
    assert!(text2.contains("pingora_vhost_requests_total"));

    let (status, stats) = node.api_get("/api/v1/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["requests_total"], json!(8), "{stats}");
    assert_eq!(stats["requests_by_code"]["404"], json!(3), "{stats}");
    assert_eq!(stats["routes"], json!(1), "{stats}");
}

/// Reads SSE chunks from `resp` until `needle` shows up (or 15 s pass); returns all read.
async fn read_sse_until(resp: &mut reqwest::Response, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut seen = String::new();
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(bytes))) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            other => panic!("no {needle:?} in the log stream ({other:?}); read so far:\n{seen}"),
        }
    }
    seen
}

async fn open_log_stream(node: &Node, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(node.api_url(&format!("/api/v1/logs/stream{query}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /api/v1/logs/stream")
}

/// A request to the cluster RPC without a proof (over mutual TLS): refused and logged as a
/// warning.
async fn provoke_refused_rpc_warning(node: &Node) {
    let status = RpcClient::to(node, "test-cluster-secret", 99)
        .post("/cluster/join-challenge")
        .json(&json!(99))
        .send()
        .await
        .expect("POST to the cluster RPC")
        .status();
    assert_eq!(status.as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_stream_sends_recent_lines_then_live_ones() {
    let node = Node::start_default().await;

    let mut resp = open_log_stream(&node, "").await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    // The backlog: lines logged before we connected.
    let backlog = read_sse_until(&mut resp, "node started").await;
    assert!(backlog.contains("event: log"), "{backlog}");
    // A line logged now arrives live.
    provoke_refused_rpc_warning(&node).await;
    let live = read_sse_until(&mut resp, "refused cluster RPC").await;
    let data = live
        .lines()
        .find(|l| l.contains("refused cluster RPC"))
        .and_then(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let line: serde_json::Value = serde_json::from_str(data).expect("JSON log line");
    assert_eq!(line["level"], "WARN", "{line}");
    assert!(line["unix_ms"].as_u64().unwrap_or(0) > 0, "{line}");

    // ?level=warn drops info lines (like "node started") from backlog and live.
    let mut warn_only = open_log_stream(&node, "?level=warn").await;
    provoke_refused_rpc_warning(&node).await;
    let seen = read_sse_until(&mut warn_only, "refused cluster RPC").await;
    assert!(
        !seen.contains("\"INFO\""),
        "info lines with level=warn:\n{seen}"
    );

    let bad = open_log_stream(&node, "?level=loud").await;
    assert_eq!(bad.status().as_u16(), 400);
    let body: serde_json::Value = bad.json().await.expect("JSON error");
    assert!(
        mentions_field(body["error"].as_str().unwrap_or(""), "level"),
        "{body}"
    );
}

/// Per-domain and per-backend series (issue #14 item 7): counted on both request paths,
/// bounded by `[metrics] max_domain_series` / `max_backend_series` (the rest under `_other`),
/// valid for promtool; and every query of the shipped Grafana dashboard names a metric the
/// node exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_domain_and_backend_series_are_bounded_and_feed_the_grafana_dashboard() {
    let node = Node::start(NodeOptions::new().extra(
        "[metrics]\nmax_domain_series = 2\nmax_backend_series = 1\n\
         [lets_encrypt]\ncheck_interval_secs = 1\n",
    ))
    .await;
    let one = Backend::start("one").await;
    let two = Backend::start("two").await;
    node.add_backend("b1", &one.address(), &["a"]).await;
    node.add_backend("b2", &two.address(), &["b"]).await;
    for (domain, tag) in [
        ("d1.test", "a"),
        ("d2.test", "a"),
        ("d3.test", "a"),
        ("d4.test", "b"),
    ] {
        node.add_domain(domain, tag).await;
    }
    // A certificate, for the dashboard's expiry panel (its gauge exists per certificate).
    let cert = self_signed(&["cert.test"]);
    let (status, b) = node
        .api_post(
            "/api/v1/domains",
            json!({"domain": "cert.test", "enabled_backends_tag": "a", "tls": "manual",
                   "cert_pem": cert.cert_pem, "key_pem": cert.key_pem}),
        )
        .await;
    assert_eq!(status, 201, "{b}");
    node.wait_route("d1.test", "/", "one").await; // 1 request to d1
    for (domain, n) in [
        ("d1.test", 2),
        ("d2.test", 2),
        ("d3.test", 4),
        ("d4.test", 1),
    ] {
        for _ in 0..n {
            assert_eq!(node.proxy_get(domain, "/").await.status, 200, "{domain}");
        }
    }
    // Pingora's path (HTTP/1.0 is handed over) counts the same way.
    let mut conn = tokio::net::TcpStream::connect(node.http_addr)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"GET / HTTP/1.0\r\nHost: d1.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200"));

    // The certificate expiry gauges are refreshed by the certificate loop (every second here).
    let text = wait_for(
        Duration::from_secs(10),
        "the certificate's expiry gauge",
        || async {
            let text = reqwest::Client::new()
                .get(node.api_url("/api/v1/metrics"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("pingora_vhost_certificate_expiry_timestamp_seconds{")
                .then_some(text)
        },
    )
    .await;
    let (ok, out) = promtool_check(&text);
    assert!(ok, "promtool check metrics failed:\n{out}\n---\n{text}");
    let v = |series: &str| metric_value(&text, series);
    let requests = |domain: &str| {
        v(&format!(
            "pingora_vhost_domain_requests_total{{domain=\"{domain}\",class=\"2xx\"}}"
        ))
    };
    assert_eq!(requests("d1.test"), Some(4.0), "both paths:\n{text}");
    assert_eq!(requests("d2.test"), Some(2.0));
    assert_eq!(
        requests("_other"),
        Some(5.0),
        "d3 and d4 share the aggregate"
    );
    assert!(
        !text.contains("d3.test") && !text.contains("d4.test"),
        "no series past the bound"
    );
    assert_eq!(
        v("pingora_vhost_request_duration_seconds_count{domain=\"d1.test\"}"),
        Some(4.0)
    );
    assert!(
        v("pingora_vhost_domain_sent_bytes_total{domain=\"d1.test\"}").is_some_and(|b| b > 0.0)
    );
    assert!(
        v("pingora_vhost_domain_received_bytes_total{domain=\"d1.test\"}").is_some_and(|b| b > 0.0)
    );
    let backend = |id: &str| {
        v(&format!(
            "pingora_vhost_backend_responses_total{{backend=\"{id}\",class=\"2xx\"}}"
        ))
    };
    assert_eq!(backend("b1"), Some(10.0), "{text}");
    assert_eq!(
        backend("_other"),
        Some(1.0),
        "b2 is past max_backend_series = 1"
    );
    assert!(!text.contains("backend=\"b2\""));
    assert_eq!(
        v("pingora_vhost_upstream_duration_seconds_count{backend=\"b1\"}"),
        Some(10.0)
    );
    assert!(v("pingora_vhost_connections_active{listener=\"http\"}").is_some());
    assert_eq!(
        v("pingora_vhost_tls_handshakes_total{result=\"ok\"}"),
        Some(0.0)
    );

    // The Grafana dashboard in deploy/ queries only metrics the node exports.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in &exprs {
        for name in metric_names(expr) {
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {base} ")),
                "the dashboard's {expr:?} uses {name}, which the node does not export"
            );
        }
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x.as_str()) {
                    ("expr", Some(e)) => out.push(e.to_string()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// The `pingora_vhost_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("pingora_vhost_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}
