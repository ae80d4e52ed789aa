//! Metrics and stats as an operator's tooling sees them.

use std::io::Write;
use std::process::{Command, Stdio};

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
