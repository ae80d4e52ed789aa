//! The access log and request ids, through the real binary: both request paths (the lean
//! HTTP/1.1 loop on plain HTTP and TLS; Pingora's proxy for HTTP/2 and handed-over
//! requests), the per-domain switches, SIGUSR1 reopening, and a queue too small for the load.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn file_log_options(path: &Path, extra: &str) -> NodeOptions {
    NodeOptions::new().extra(&format!(
        "[access_log]\nenabled = true\noutput = \"file\"\nfile_path = '{}'\nflush_interval_ms = 20\n{extra}\n",
        path.display()
    ))
}

fn read_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A batch being written can be read in part (the kernel copies a write into the file page
    // by page; seen once, a line cut at 249 bytes): only whole lines count, as for `tail -f`.
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole.lines().map(str::to_string).collect()
}

/// The JSON lines of `path` once there are at least `n`.
async fn wait_json_lines(path: &Path, n: usize) -> Vec<Value> {
    wait_for(
        Duration::from_secs(10),
        &format!("{n} lines in {}", path.display()),
        || async {
            let lines = read_lines(path);
            (lines.len() >= n).then(|| {
                lines
                    .iter()
                    .map(|l| {
                        serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
                    })
                    .collect()
            })
        },
    )
    .await
}

/// Sends raw request bytes (which should ask for `Connection: close`) to `addr`; returns
/// what came back.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}

fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn line_for<'a>(lines: &'a [Value], request_id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no line with request id {request_id}: {lines:#?}"))
}

const FIELDS: [&str; 24] = [
    "time",
    "node_id",
    "request_id",
    "client_ip",
    "client_port",
    "method",
    "host",
    "path",
    "query",
    "protocol",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_connect_ms",
    "upstream_duration_ms",
    "backend_id",
    "backend_addr",
    "tag",
    "attempts",
    "tls_version",
    "sni",
    "user_agent",
    "referer",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_paths_log_json_lines_with_request_ids_and_redaction() {
    let log = tempfile::tempdir().unwrap();
    let path = log.path().join("logs").join("access.log");
    let node = Node::start(file_log_options(&path, "").node_id(7)).await;
    let backend = Backend::start("b1").await;
    node.add_backend("b1", &backend.address(), &["a"]).await;
    node.add_domain("logs.test", "a").await;
    let cert = self_signed(&["tls.test"]);
    node.create(
        "/api/v1/domains",
        json!({"domain": "tls.test", "enabled_backends_tag": "a", "tls": "manual",
               "cert_pem": cert.cert_pem, "key_pem": cert.key_pem}),
    )
    .await;
    let quiet = node
        .create(
            "/api/v1/domains",
            json!({"domain": "quiet.test", "enabled_backends_tag": "a", "access_log": false}),
        )
        .await;
    assert_eq!(quiet["access_log"], false, "{quiet}");
    let secret = node
        .create(
            "/api/v1/domains",
            json!({"domain": "secret.test", "enabled_backends_tag": "a",
                   "access_log_query": false}),
        )
        .await;
    assert_eq!(secret["access_log_query"], false, "{secret}");
    node.wait_route("quiet.test", "/", "b1").await;
    node.wait_route("secret.test", "/", "b1").await;
    node.wait_route("logs.test", "/", "b1").await;

    // 1. Lean path, plain HTTP: a client id kept and forwarded; hostile bytes in headers;
    // credentials that must never be logged.
    let request = b"GET /headers?token=abc&x=1 HTTP/1.1\r\nHost: logs.test\r\n\
        User-Agent: evil\"agent\\ \xff\xfe}{\r\nReferer: https://ref.test/?a=\"b\"\r\n\
        Authorization: Bearer SECRET-AUTH-VALUE\r\nCookie: session=SECRET-COOKIE-VALUE\r\n\
        X-Request-Id: client-id-1\r\nConnection: close\r\n\r\n";
    let answer = raw(node.http_addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(header_of(&answer, "x-request-id"), Some("client-id-1"));
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["x-request-id"], "client-id-1", "forwarded: {body}");

    // 2. An invalid id is replaced by a generated one, the same upstream and back.
    let r = raw(
        node.http_addr,
        b"GET /headers HTTP/1.1\r\nHost: logs.test\r\nX-Request-Id: bad id \"x\"\r\nConnection: close\r\n\r\n",
    )
    .await;
    let generated = header_of(&r, "x-request-id").unwrap().to_string();
    assert_eq!(generated.len(), 32, "{r}");
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()), "{r}");
    let body: Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["x-request-id"], generated.as_str(), "{body}");

    // 3. Pingora's path on the plain listener (HTTP/1.0 is handed over).
    let r = raw(
        node.http_addr,
        b"GET /p10?q=2 HTTP/1.0\r\nHost: logs.test\r\nX-Request-Id: old-http\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"),
        "{r}"
    );
    assert_eq!(header_of(&r, "x-request-id"), Some("old-http"), "{r}");

    // 4. Pingora's path over TLS: HTTP/2 with SNI.
    let h2 = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("tls.test", node.https_addr)
        .build()
        .unwrap();
    let url = format!("https://tls.test:{}/headers?h=2", node.https_addr.port());
    let resp = h2
        .get(&url)
        .header("x-request-id", "h2-id")
        .header("cookie", "c=SECRET-COOKIE-VALUE")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.headers()["x-request-id"], "h2-id");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["x-request-id"], "h2-id", "{body}");

    // 5. The lean path over TLS (HTTP/1.1, no SNI: an IP address).
    let r = node.https_get_no_sni("logs.test", "/tls11").await.unwrap();
    assert_eq!(r.status, 200);
    let tls_id = r.headers["x-request-id"].to_str().unwrap().to_string();

    // 6. Our own answer (unknown host), a domain with logs off, a domain without queries.
    let r = node.proxy_get("nowhere.test", "/nope?z=1").await;
    assert_eq!(r.status, 404);
    let nowhere_id = r.header("x-request-id").expect("id on our own answers");
    let r = node.proxy_get("quiet.test", "/quiet?token=q").await;
    assert_eq!(r.status, 200);
    let r = node.proxy_get("secret.test", "/s?token=SECRET-QUERY").await;
    assert_eq!(r.status, 200);
    let secret_id = r.header("x-request-id").unwrap();

    let ids = [
        "client-id-1",
        generated.as_str(),
        "old-http",
        "h2-id",
        tls_id.as_str(),
        nowhere_id.as_str(),
        secret_id.as_str(),
    ];
    let all = wait_for(
        Duration::from_secs(10),
        "a line for each request",
        || async {
            let lines = wait_json_lines(&path, 1).await;
            ids.iter()
                .all(|id| lines.iter().any(|l| l["request_id"] == *id))
                .then_some(lines)
        },
    )
    .await;
    let lines: Vec<Value> = all
        .into_iter()
        .filter(|l| ids.iter().any(|id| l["request_id"] == *id))
        .collect();
    let lines = &lines[..];
    assert_eq!(lines.len(), ids.len(), "one line per request: {lines:#?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("quiet.test"),
        "logs are off for quiet.test:\n{text}"
    );
    for l in lines {
        let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
        for f in FIELDS {
            assert!(keys.contains(&f), "field {f} missing: {l}");
        }
        assert_eq!(l["node_id"], 7);
        assert_eq!(l["client_ip"], "127.0.0.1");
        assert!(l["client_port"].as_u64().unwrap() > 0, "{l}");
        assert!(l["duration_ms"].as_f64().unwrap() >= 0.0, "{l}");
        assert!(l["time"].as_str().unwrap().ends_with('Z'), "{l}");
    }
    for secret in [
        "SECRET-AUTH-VALUE",
        "SECRET-COOKIE-VALUE",
        "SECRET-QUERY",
        "Bearer",
    ] {
        assert!(!text.contains(secret), "{secret} logged:\n{text}");
    }

    let l = line_for(lines, "client-id-1");
    assert_eq!(l["method"], "GET");
    assert_eq!(l["host"], "logs.test");
    assert_eq!(l["path"], "/headers");
    assert_eq!(l["query"], "token=abc&x=1");
    assert_eq!(l["protocol"], "HTTP/1.1");
    assert_eq!(l["status"], 200);
    assert_eq!(l["backend_id"], "b1");
    assert_eq!(l["backend_addr"], backend.address());
    assert_eq!(l["tag"], "a");
    assert_eq!(l["attempts"], 1);
    assert_eq!(l["tls_version"], Value::Null);
    assert_eq!(l["sni"], Value::Null);
    assert_eq!(l["user_agent"], "evil\"agent\\ \u{ff}\u{fe}}{");
    assert_eq!(l["referer"], "https://ref.test/?a=\"b\"");
    assert_eq!(l["bytes_in"].as_u64(), Some(request.len() as u64));
    assert_eq!(l["bytes_out"].as_u64(), Some(answer.len() as u64));
    assert!(l["upstream_connect_ms"].is_number(), "{l}");
    assert!(l["upstream_duration_ms"].as_f64().unwrap() > 0.0, "{l}");

    let l = line_for(lines, &generated);
    assert_eq!(l["path"], "/headers");
    assert_eq!(l["query"], Value::Null);

    let l = line_for(lines, "old-http");
    assert_eq!(l["protocol"], "HTTP/1.0");
    assert_eq!(l["query"], "q=2");
    assert_eq!(l["backend_id"], "b1");
    assert_eq!(l["status"], 200);

    let l = line_for(lines, "h2-id");
    assert_eq!(l["protocol"], "HTTP/2.0");
    assert_eq!(l["host"], "tls.test");
    assert_eq!(l["path"], "/headers");
    assert_eq!(l["query"], "h=2");
    assert_eq!(l["tls_version"], "TLSv1.3");
    assert_eq!(l["sni"], "tls.test");
    assert_eq!(l["backend_id"], "b1");
    assert_eq!(l["attempts"], 1);
    assert!(l["upstream_duration_ms"].is_number(), "{l}");

    let l = line_for(lines, &tls_id);
    assert_eq!(l["protocol"], "HTTP/1.1");
    assert_eq!(l["tls_version"], "TLSv1.3");
    assert_eq!(l["sni"], Value::Null);
    assert_eq!(l["path"], "/tls11");

    let l = line_for(lines, &nowhere_id);
    assert_eq!(l["status"], 404);
    assert_eq!(l["backend_id"], Value::Null);
    assert_eq!(l["attempts"], 0);
    assert_eq!(l["query"], "z=1");

    let l = line_for(lines, &secret_id);
    assert_eq!(l["path"], "/s");
    assert_eq!(
        l["query"],
        Value::Null,
        "query strings are off for secret.test"
    );

    // The switch turns back on through the API.
    node.api_put("/api/v1/domains/quiet.test", json!({"access_log": true}))
        .await;
    let id = wait_for(Duration::from_secs(10), "quiet.test logged", || async {
        let r = node.proxy_get("quiet.test", "/again").await;
        let id = r.header("x-request-id")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        read_lines(&path)
            .iter()
            .any(|l| l.contains(&id))
            .then_some(id)
    })
    .await;
    assert!(!id.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_after_logrotate_renamed_it() {
    let log = tempfile::tempdir().unwrap();
    let path = log.path().join("access.log");
    let mut node = Node::start(file_log_options(&path, "")).await;
    let backend = Backend::start("b1").await;
    node.add_backend("b1", &backend.address(), &["a"]).await;
    node.add_domain("rot.test", "a").await;
    node.wait_route("rot.test", "/", "b1").await;
    node.proxy_get("rot.test", "/before").await;
    wait_for(Duration::from_secs(10), "/before logged", || async {
        read_lines(&path)
            .iter()
            .any(|l| l.contains("\"/before\""))
            .then_some(())
    })
    .await;

    let rotated: PathBuf = log.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    // Until the signal, lines still go to the renamed file (its descriptor is open).
    node.proxy_get("rot.test", "/renamed").await;
    wait_for(
        Duration::from_secs(10),
        "/renamed in the old file",
        || async {
            read_lines(&rotated)
                .iter()
                .any(|l| l.contains("\"/renamed\""))
                .then_some(())
        },
    )
    .await;
    let status = std::process::Command::new("kill")
        .args(["-USR1", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(
        Duration::from_secs(10),
        "a new file after SIGUSR1",
        || async { path.exists().then_some(()) },
    )
    .await;
    node.proxy_get("rot.test", "/after").await;
    let lines = wait_json_lines(&path, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["path"], "/after");
    assert!(node.is_running(), "SIGUSR1 must not end the process");
    let old = read_lines(&rotated).join("\n");
    assert!(!old.contains("\"/after\""), "{old}");
    assert!(
        node.logs().contains("access log reopened"),
        "{}",
        node.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_lines_without_holding_requests() {
    // One record of room and a writer that wakes once in 3 s: nearly every line is dropped.
    // Combined format on stdout.
    let mut node = Node::start(NodeOptions::new().extra(
        "[access_log]\nenabled = true\nformat = \"combined\"\nqueue_size = 1\nflush_interval_ms = 3000\n",
    ))
    .await;
    let backend = Backend::start("b1").await;
    node.add_backend("b1", &backend.address(), &["a"]).await;
    node.add_domain("flood.test", "a").await;
    node.wait_route("flood.test", "/", "b1").await;
    let n = 200;
    let started = std::time::Instant::now();
    let client = node.proxy_client();
    for i in 0..n {
        let r = client.get("flood.test", &format!("/f{i}")).await.unwrap();
        assert_eq!(r.status, 200);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{n} requests took {took:?}: requests waited for the log"
    );
    // Every request is either written or counted as dropped.
    let stdout = node.dir.path().join("stdout.log");
    let (written, dropped) = wait_for(Duration::from_secs(15), "lines accounted", || async {
        let text = node.metrics_text().await;
        let written = metric_value(&text, "pingora_vhost_access_log_lines_total")?;
        let dropped = metric_value(
            &text,
            "pingora_vhost_access_log_dropped_total{reason=\"queue_full\"}",
        )?;
        // wait_route's requests count too; the one queued record is written at the
        // writer's next wake-up.
        (written >= 1.0 && written + dropped >= f64::from(n)).then_some((written, dropped))
    })
    .await;
    assert!(
        dropped >= f64::from(n) / 2.0,
        "dropped {dropped}, written {written}"
    );
    assert!(written >= 1.0, "written {written}");
    let lines = read_lines(&stdout);
    // The harness writes a marker line per start; the rest is the access log.
    let written_lines: Vec<&String> = lines
        .iter()
        .filter(|l| !l.is_empty() && !l.starts_with("====="))
        .collect();
    assert_eq!(written_lines.len() as f64, written, "{lines:?}");
    for l in &written_lines {
        // `127.0.0.1 - - [06/Dec/2026:02:04:22 +0000] "GET /f1 HTTP/1.1" 200 123 "-" "-"`
        assert!(l.starts_with("127.0.0.1 - - ["), "{l}");
        assert!(l.contains(" +0000] \"GET /"), "{l}");
        assert!(l.ends_with(" HTTP/1.1\" 200 181 \"-\" \"-\""), "{l}");
    }
    node.sigterm();
    assert!(node.wait_exit(Duration::from_secs(20)).await.is_some());
}
