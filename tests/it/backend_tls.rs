//! TLS to backends (src/upstream_tls.rs) against a real nginx whose certificates come from a
//! CA the test makes: a good certificate (name checked, SNI sent, sessions resumed, pooled
//! keep-alive connections), one that requires a client certificate, one with the wrong name,
//! an expired one, and HTTP/2 to the backend. Both request paths (the lean HTTP/1.1 loop and
//! Pingora's proxy, reached with HTTP/1.0) and the health probes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;
use crate::edge::{spawn_nginx, wait_listening, Daemon};

struct Ports {
    good: u16,
    mtls: u16,
    wrong_name: u16,
    expired: u16,
    h2: u16,
}

/// One nginx with a server per case. Each answers what it saw of the connection.
fn nginx(dir: &Path, ca: &TestCa, p: &Ports) -> Daemon {
    let good = ca.issue(&["api.internal"]);
    let wrong = ca.issue(&["someone-else.internal"]);
    good.write_files(dir, "good");
    // Good for now; the test replaces it with an expired one.
    good.write_files(dir, "expiring");
    wrong.write_files(dir, "wrong");
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    let answer = r#"return 200 "proto=$server_protocol sni=$ssl_server_name reused=$ssl_session_reused conn=$connection client=$ssl_client_s_dn host=$http_host\n";"#;
    let server = |port: u16, cert: &str, extra: &str| {
        format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl{h2};\n    ssl_certificate {d}/{cert}.crt;\n    ssl_certificate_key {d}/{cert}.key;\n    {extra}\n    location /health {{ return 200 \"ok\\n\"; }}\n    location / {{ {answer} }}\n  }}\n",
            h2 = if extra.contains("#h2") { " http2" } else { "" },
            d = dir.display(),
        )
    };
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log info;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  ssl_session_cache shared:S:1m;\n{a}{b}{c}{e}{f}}}\n",
        d = dir.display(),
        a = server(p.good, "good", ""),
        b = server(
            p.mtls,
            "good",
            &format!(
                "ssl_verify_client on; ssl_client_certificate {}/ca.pem;",
                dir.display()
            )
        ),
        c = server(p.wrong_name, "wrong", ""),
        e = server(p.expired, "expiring", ""),
        f = server(p.h2, "good", "#h2"),
    );
    spawn_nginx(dir, &conf)
}

/// One request on a new connection (`Connection: close`), the whole answer.
async fn get(node: &Node, host: &str, version: &str) -> String {
    let mut conn = TcpStream::connect(node.http_addr).await.unwrap();
    let req = format!("GET / {version}\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

async fn backend(node: &Node, id: &str, body: Value) -> Value {
    let (status, b) = node.api_post("/api/v1/backends", body).await;
    assert_eq!(status, 201, "{id}: {b}");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_nginx_backends_verifies_names_expiry_and_client_certificates_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca("backend test CA");
    let ports = Ports {
        good: free_port(),
        mtls: free_port(),
        wrong_name: free_port(),
        expired: free_port(),
        h2: free_port(),
    };
    let nginx = nginx(dir.path(), &ca, &ports);
    for port in [
        ports.good,
        ports.mtls,
        ports.wrong_name,
        ports.expired,
        ports.h2,
    ] {
        wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await;
    }
    // Probes ten minutes apart: within the test a backend is probed when it is new, when how
    // it is reached changes, and when a request asks.
    let node = Node::start(NodeOptions::new().health_interval(600)).await;
    let tls = |extra: Value| {
        let mut t = json!({"server_name": "api.internal", "ca_pem": ca.cert_pem});
        for (k, v) in extra.as_object().unwrap() {
            t[k] = v.clone();
        }
        t
    };

    // A good certificate: the name is checked against server_name, sent as SNI.
    let b = backend(
        &node,
        "good",
        json!({"id": "good", "address": format!("https://127.0.0.1:{}", ports.good),
               "tags": ["good"], "tls": tls(json!({}))}),
    )
    .await;
    assert_eq!(b["address"], format!("127.0.0.1:{}", ports.good));
    assert_eq!(b["tls"]["server_name"], "api.internal");
    assert_eq!(b["tls"]["verify"], true);
    assert_eq!(b["tls"]["ca_certificates"], 1);
    assert_eq!(b["tls"]["client_certificate"], false);
    node.add_domain("good.test", "good").await;
    // Its probe (GET /health over TLS) passes.
    node.wait_backend_health("good", true, Duration::from_secs(10))
        .await;
    let answer = wait_for(Duration::from_secs(10), "route to good", || async {
        let a = get(&node, "good.test", "HTTP/1.1").await;
        a.starts_with("HTTP/1.1 200").then_some(a)
    })
    .await;
    assert!(
        answer.contains("proto=HTTP/1.1 sni=api.internal") && answer.contains("host=good.test"),
        "{answer}"
    );
    // Keep-alive: the lean path's pool reuses the TLS connection to nginx.
    let client = node.proxy_client();
    let first = client.get("good.test", "/").await.unwrap();
    let second = client.get("good.test", "/").await.unwrap();
    let conn_of = |body: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix("conn="))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(
        conn_of(&first.body),
        conn_of(&second.body),
        "one pooled backend connection: {} / {}",
        first.body,
        second.body
    );
    // Pingora's path (HTTP/1.0 is handed over) connects over TLS too.
    let answer = get(&node, "good.test", "HTTP/1.0").await;
    assert!(
        answer.contains(" 200 ") && answer.contains("sni=api.internal"),
        "{answer}"
    );

    // A backend that requires a client certificate: refused without one, 200 with one. Its
    // probe is the TLS handshake alone (path ""), which a missing certificate does not fail.
    backend(
        &node,
        "mtls",
        json!({"id": "mtls", "address": format!("127.0.0.1:{}", ports.mtls),
               "tags": ["mtls"], "health_check_path": "", "tls": tls(json!({}))}),
    )
    .await;
    node.add_domain("mtls.test", "mtls").await;
    node.wait_backend_health("mtls", true, Duration::from_secs(10))
        .await;
    // nginx finishes the handshake and answers a missing certificate with a 400.
    let answer = wait_for(Duration::from_secs(10), "mtls route", || async {
        let a = get(&node, "mtls.test", "HTTP/1.1").await;
        (!a.is_empty() && !a.contains(" 404 ")).then_some(a)
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let client_cert = ca.issue(&["pingora-vhost.client"]);
    let (status, b) = node
        .api_put(
            "/api/v1/backends/mtls",
            json!({"tls": tls(json!({"client_cert_pem": client_cert.cert_pem,
                                     "client_key_pem": client_cert.key_pem}))}),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["tls"]["client_certificate"], true);
    assert!(
        !b.to_string().contains("PRIVATE KEY"),
        "the key never leaves the node: {b}"
    );
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let answer = wait_for(
            Duration::from_secs(10),
            "mtls with a certificate",
            || async {
                let a = get(&node, "mtls.test", version).await;
                a.contains(" 200 ").then_some(a)
            },
        )
        .await;
        assert!(answer.contains("client=CN="), "{version}: {answer}");
    }

    // The wrong name: 503 naming why, on each path (a backend each: after a failed handshake
    // its breaker is open and the next request hears only that no backend is healthy);
    // verify = false takes it.
    for (i, version) in ["HTTP/1.1", "HTTP/1.0"].into_iter().enumerate() {
        let (id, domain) = (format!("wrong{i}"), format!("wrong{i}.test"));
        backend(
            &node,
            &id,
            json!({"id": id, "address": format!("127.0.0.1:{}", ports.wrong_name),
                   "tags": [id], "tls": tls(json!({}))}),
        )
        .await;
        node.add_domain(&domain, &id).await;
        let answer = wait_for(Duration::from_secs(10), "wrong-name answer", || async {
            let a = get(&node, &domain, version).await;
            (!a.is_empty() && !a.contains(" 404 ")).then_some(a)
        })
        .await;
        assert!(
            answer.contains(" 503 ") && answer.contains("not valid for its server name"),
            "{version}: {answer}"
        );
    }
    let (status, b) = node
        .api_put(
            "/api/v1/backends/wrong0",
            json!({"tls": tls(json!({"verify": false}))}),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["tls"]["verify"], false);
    // The changed backend is probed again at once; its breaker's trial request closes it.
    wait_for(
        Duration::from_secs(15),
        "wrong name, not verified",
        || async {
            get(&node, "wrong0.test", "HTTP/1.1")
                .await
                .starts_with("HTTP/1.1 200")
                .then_some(())
        },
    )
    .await;

    // A certificate that expires under a running backend (nginx reloads an expired one): a
    // request's failed handshake asks for a probe at once. Probes are ten minutes apart here,
    // so the probe that reports it is (but for a <1% chance) the one asked for.
    backend(
        &node,
        "expiring",
        json!({"id": "expiring", "address": format!("127.0.0.1:{}", ports.expired),
               "tags": ["expiring"], "tls": tls(json!({}))}),
    )
    .await;
    node.add_domain("expiring.test", "expiring").await;
    wait_for(Duration::from_secs(10), "expiring route", || async {
        get(&node, "expiring.test", "HTTP/1.1")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    // Its first probe (at once, as a new backend) is done before the certificate changes.
    wait_for(Duration::from_secs(10), "the first probe", || async {
        let (_, b) = node.api_get("/api/v1/backends/expiring").await;
        (b["health"]["checks_total"].as_u64()? >= 1).then_some(())
    })
    .await;
    ca.issue_expired(&["api.internal"])
        .write_files(dir.path(), "expiring");
    nginx.signal("HUP");
    let answer = wait_for(Duration::from_secs(10), "expired answer", || async {
        let a = get(&node, "expiring.test", "HTTP/1.1").await;
        a.contains(" 503 ").then_some(a)
    })
    .await;
    assert!(answer.contains("expired"), "{answer}");
    let detail = wait_for(Duration::from_secs(5), "the asked-for probe", || async {
        let (_, b) = node.api_get("/api/v1/backends/expiring").await;
        let detail = b["health"]["last_check_detail"].as_str()?.to_string();
        detail.contains("TLS handshake failed").then_some(detail)
    })
    .await;
    assert!(detail.contains("expired"), "{detail}");
    let metrics = node.metrics_text().await;
    for reason in ["certificate_expired", "certificate_wrong_name"] {
        let series = format!("pingora_vhost_upstream_tls_failures_total{{reason=\"{reason}\"}}");
        assert!(
            metric_value(&metrics, &series).is_some_and(|v| v >= 1.0),
            "{series}"
        );
    }

    // HTTP/2 to the backend: both paths' requests reach nginx over h2.
    backend(
        &node,
        "h2",
        json!({"id": "h2", "address": format!("127.0.0.1:{}", ports.h2),
               "tags": ["h2"], "tls": tls(json!({"http2": true}))}),
    )
    .await;
    node.add_domain("h2.test", "h2").await;
    // Its probe asks in HTTP/2 too (an HTTP/1.1 request on an h2 connection would fail it).
    let detail = wait_for(
        Duration::from_secs(10),
        "the h2 backend's probe",
        || async {
            let (_, b) = node.api_get("/api/v1/backends/h2").await;
            let detail = b["health"]["last_check_detail"].as_str()?.to_string();
            (!detail.is_empty()).then_some(detail)
        },
    )
    .await;
    assert_eq!(detail, "GET /health answered 200 (HTTP/2)");
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let answer = wait_for(Duration::from_secs(10), "h2 route", || async {
            let a = get(&node, "h2.test", version).await;
            a.contains(" 200 ").then_some(a)
        })
        .await;
        assert!(answer.contains("proto=HTTP/2.0"), "{version}: {answer}");
    }
    // A backend that does not speak h2 is not reached with `http2 = true`.
    let (status, b) = node
        .api_put(
            "/api/v1/backends/good",
            json!({"tls": tls(json!({"http2": true}))}),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    let answer = wait_for(Duration::from_secs(10), "no h2 answer", || async {
        let a = get(&node, "good.test", "HTTP/1.1").await;
        a.contains(" 503 ").then_some(a)
    })
    .await;
    assert!(answer.contains("HTTP/2"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_fields_are_checked_and_named() {
    let node = Node::start(NodeOptions::new()).await;
    let ca = test_ca("checks");
    let key_only = ca.issue(&["x"]);
    let cases = [
        (json!({"tls": {"ca_pem": "junk"}}), "ca_pem"),
        (json!({"tls": {"server_name": "not a name"}}), "server_name"),
        (
            json!({"tls": {"client_key_pem": key_only.key_pem}}),
            "client_cert_pem",
        ),
        (json!({"tls": {"sni": "x"}}), "unknown field"),
        (json!({"tls": "on"}), "tls"),
        (
            json!({"address": "http://127.0.0.1:1", "tls": {}}),
            "http://",
        ),
        (json!({"address": "https://127.0.0.1:1/path"}), "no path"),
    ];
    for (extra, expected) in cases {
        let mut body = json!({"id": "x", "address": "127.0.0.1:1", "tags": ["t"]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, b) = node.api_post("/api/v1/backends", body.clone()).await;
        assert_eq!(status, 400, "{body}: {b}");
        let error = b["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{body}: {error}");
    }
    let (status, _) = node.api_get("/api/v1/backends/x").await;
    assert_eq!(status, 404, "nothing was created");
    // `https://` alone turns TLS on with its defaults; `http://` turns it off.
    let (status, b) = node
        .api_post(
            "/api/v1/backends",
            json!({"id": "x", "address": "https://localhost:8443", "tags": ["t"]}),
        )
        .await;
    assert_eq!(status, 201, "{b}");
    assert_eq!(b["tls"]["server_name"], "localhost");
    assert_eq!(b["tls"]["verify"], true);
    assert!(b["tls"]["ca_certificates"].is_null());
    let (status, b) = node
        .api_put(
            "/api/v1/backends/x",
            json!({"address": "http://localhost:8080"}),
        )
        .await;
    assert_eq!(status, 200, "{b}");
    assert!(b["tls"].is_null(), "{b}");
    assert_eq!(b["address"], "localhost:8080");
}
