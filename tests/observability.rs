//! Metrics and stats as an operator's tooling sees them.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
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

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
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
