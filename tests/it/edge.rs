//! The edge of a connection (src/proxy/edge.rs, src/proxy/send_proxy.rs): PROXY protocol from a
//! real HAProxy in front (`send-proxy`, `send-proxy-v2`, plain and TLS listeners), raw
//! malformed headers, PROXY protocol sent to a real nginx backend that requires it
//! (`listen ... proxy_protocol`), and which peers' `X-Forwarded-*` headers are kept.
//!
//! Addresses: every loopback address is local on Linux, so a client binds its socket to
//! 127.0.0.2 (the balancer, trusted), 127.0.0.3.. (end clients) or 127.0.0.1 (untrusted), and
//! the proxy sees that source.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::*;

const BALANCER: &str = "127.0.0.2";

/// A child process (HAProxy, nginx) killed when dropped.
pub(crate) struct Daemon {
    child: Child,
    name: &'static str,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Sends `signal` (e.g. "HUP": nginx reloads its configuration and certificates).
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master killed outright leaves its workers running (holding
        // their ports, answering later tests); on SIGTERM it stops them. Bounded: then SIGKILL.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- {} log ---\n{log}", self.name);
        }
    }
}

pub(crate) fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> Daemon {
    let log = dir.join(format!("{name}.log"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} (scripts/bootstrap.sh installs it): {e}"));
    Daemon { child, name, log }
}

pub(crate) async fn wait_listening(addr: SocketAddr) {
    wait_for(
        Duration::from_secs(10),
        &format!("{addr} listening"),
        || async move { TcpStream::connect(addr).await.ok().map(|_| ()) },
    )
    .await;
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `bytes` from `from` and reads until the proxy closes (bounded): what came back.
async fn exchange(from: &str, to: SocketAddr, bytes: &[u8], shut_write: bool) -> Vec<u8> {
    let mut conn = connect_from(from, to).await;
    conn.write_all(bytes).await.unwrap();
    if shut_write {
        conn.shutdown().await.unwrap();
    }
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the proxy neither answered nor closed");
    got
}

/// The JSON body of a raw HTTP answer (the common backend's `/headers`).
fn json_body(raw: &[u8]) -> Value {
    let text = String::from_utf8_lossy(raw);
    assert!(
        text.starts_with("HTTP/1.") && text[8..].starts_with(" 200"),
        "{text}"
    );
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    let body = body.trim();
    // Chunked answers (Pingora's path may chunk): the JSON object is the one line that is one.
    let json = body
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::from_str(json).unwrap()
}

fn header(v: &Value, name: &str) -> String {
    v[name].as_str().unwrap_or_default().to_string()
}

/// A client whose connections come from `from`; `pp.test` resolves to `to`.
fn client_from(from: &str, https_to: Option<SocketAddr>, http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10));
    if let Some(to) = https_to {
        b = b.resolve("pp.test", to);
    }
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

async fn node_with(proxy_lines: &str, extra: &str) -> (Node, Backend) {
    let backend = Backend::start("b").await;
    let node = Node::start(NodeOptions::new().proxy(proxy_lines).extra(extra)).await;
    node.add_backend("b", &backend.address(), &["t"]).await;
    node.add_domain("pp.test", "t").await;
    node.wait_route("pp.test", "/", "b").await;
    (node, backend)
}

const PP_TRUSTED: &str =
    "[proxy.proxy_protocol]\ntrusted = [\"127.0.0.2/32\"]\nheader_timeout_ms = 500\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_with_send_proxy_v1_and_v2_on_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    // The access log names the client the header gave, not the balancer.
    let log = dir.path().join("access.log");
    let access_log = format!(
        "[access_log]\nenabled = true\noutput = \"file\"\nfile_path = '{}'\nflush_interval_ms = 20\n",
        log.display()
    );
    let (node, _backend) = node_with("", &format!("{PP_TRUSTED}{access_log}")).await;
    // (path, client address) of each request sent through HAProxy.
    let mut sent: Vec<(String, String)> = Vec::new();
    let mut fronts = Vec::new();
    let mut cfg = String::from(
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n",
    );
    for (name, to, send) in [
        ("http_v1", node.http_addr, "send-proxy"),
        ("http_v2", node.http_addr, "send-proxy-v2"),
        ("https_v1", node.https_addr, "send-proxy"),
        ("https_v2", node.https_addr, "send-proxy-v2"),
    ] {
        let front = free_addr();
        cfg.push_str(&format!(
            "frontend {name}\n  bind {front}\n  default_backend to_{name}\nbackend to_{name}\n  server node {to} {send} source {BALANCER}\n"
        ));
        fronts.push((name, front));
    }
    std::fs::write(dir.path().join("haproxy.cfg"), &cfg).unwrap();
    let _haproxy = spawn(
        "haproxy",
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(dir.path().join("haproxy.cfg")),
        dir.path(),
    );
    for (_, front) in &fronts {
        wait_listening(*front).await;
    }

    for (name, front) in &fronts {
        let tls = name.starts_with("https");
        // Lean path (HTTP/1.1) and Pingora's (h2 over TLS, HTTP/1.0 over plain).
        if tls {
            for http1_only in [true, false] {
                let client = client_from("127.0.0.3", Some(*front), http1_only);
                let path = format!("/headers?{name}-{http1_only}");
                sent.push((path.clone(), "127.0.0.3".into()));
                let url = format!("https://pp.test:{}{path}", front.port());
                let resp = client.get(&url).send().await.unwrap();
                let version = resp.version();
                let v: Value = resp.json().await.unwrap();
                assert_eq!(
                    header(&v, "x-forwarded-for"),
                    "127.0.0.3",
                    "{name} {version:?}: the backend sees the real client"
                );
                assert_eq!(header(&v, "x-forwarded-proto"), "https", "{name}");
                if !http1_only {
                    assert_eq!(
                        version,
                        reqwest::Version::HTTP_2,
                        "{name}: h2 goes to Pingora's proxy"
                    );
                }
            }
        } else {
            let client = client_from("127.0.0.3", None, true);
            let path = format!("/headers?{name}");
            sent.push((path.clone(), "127.0.0.3".into()));
            let resp = client
                .get(format!("http://{front}{path}"))
                .header("host", "pp.test")
                .send()
                .await
                .unwrap();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(header(&v, "x-forwarded-for"), "127.0.0.3", "{name}");
            // Raw, to know the client's port too: HTTP/1.0 goes to Pingora's path, HTTP/1.1
            // stays on the lean one.
            for (version, extra) in [("1.0", ""), ("1.1", "Connection: close\r\n")] {
                let mut conn = connect_from("127.0.0.4", *front).await;
                let port = conn.local_addr().unwrap().port();
                let path = format!("/headers?{name}-raw-{version}");
                sent.push((path.clone(), format!("127.0.0.4:{port}")));
                let request = format!("GET {path} HTTP/{version}\r\nHost: pp.test\r\n{extra}\r\n");
                conn.write_all(request.as_bytes()).await.unwrap();
                let mut raw = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw));
                assert!(read.await.is_ok(), "no answer");
                let v = json_body(&raw);
                assert_eq!(
                    header(&v, "x-forwarded-for"),
                    "127.0.0.4",
                    "{name}: HTTP/{version}"
                );
            }
        }
    }
    // One line per request, each with the client's address from the PROXY header (its port
    // too where the test knows it): both listeners, both paths.
    let lines: Vec<Value> = wait_for(Duration::from_secs(10), "access log lines", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|l: &Value| l["path"] == "/headers")
            .collect();
        (lines.len() >= sent.len()).then_some(lines)
    })
    .await;
    for (path, client) in &sent {
        let line = lines
            .iter()
            .find(|l| Some(l["query"].as_str().unwrap_or("")) == path.split_once('?').map(|q| q.1))
            .unwrap_or_else(|| panic!("no access log line for {path}: {lines:#?}"));
        let (ip, port) = client.split_once(':').unwrap_or((client, ""));
        assert_eq!(line["client_ip"], ip, "{path}: {line}");
        if !port.is_empty() {
            assert_eq!(line["client_port"].to_string(), port, "{path}: {line}");
        }
    }
    assert!(
        node.metric("pingora_vhost_proxy_protocol_headers_total{version=\"v1\"}")
            .await
            >= 3.0
    );
    assert!(
        node.metric("pingora_vhost_proxy_protocol_headers_total{version=\"v2\"}")
            .await
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_proxy_protocol_headers_close_the_connection_and_are_counted() {
    let (node, backend) = node_with("", PP_TRUSTED).await;
    let http = node.http_addr;
    let request = b"GET /headers HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n";
    let with = |prefix: &[u8]| [prefix, request.as_slice()].concat();
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[192, 0, 2, 7, 10, 0, 0, 1, 0xc7, 0x38, 0, 80]);
    let served_before = backend.requests();
    let cases: Vec<(&str, &str, Vec<u8>, bool)> = vec![
        ("missing", BALANCER, request.to_vec(), false),
        (
            "malformed",
            BALANCER,
            with(b"PROXY TCP4 192.0.2.7\r\n"),
            false,
        ),
        (
            "malformed",
            BALANCER,
            with(b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x00"),
            false,
        ),
        (
            "truncated",
            BALANCER,
            b"PROXY TCP4 192.0.2.7 10.0".to_vec(),
            true,
        ),
        (
            "timeout",
            BALANCER,
            b"PROXY TCP4 192.0.2.7 10.0".to_vec(),
            false,
        ),
        (
            "too_long",
            BALANCER,
            with(format!("PROXY UNKNOWN {}\r\n", "x".repeat(200)).as_bytes()),
            false,
        ),
        (
            "untrusted",
            "127.0.0.1",
            with(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 80\r\n"),
            false,
        ),
        ("untrusted", "127.0.0.1", with(&v2), false),
    ];
    for (reason, from, bytes, shut) in &cases {
        let got = exchange(from, http, bytes, *shut).await;
        assert!(
            got.is_empty(),
            "{reason}: nothing is answered: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // TLS listener: the header comes before the ClientHello.
    let https = node.https_addr;
    let no_header = client_from(BALANCER, Some(https), true)
        .get(format!("https://pp.test:{}/headers", https.port()))
        .send()
        .await;
    assert!(
        no_header.is_err(),
        "a trusted source without a header gets no TLS"
    );
    let got = exchange(
        "127.0.0.1",
        https,
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n\x16\x03\x01",
        false,
    )
    .await;
    assert!(got.is_empty(), "TLS untrusted: {got:?}");
    assert_eq!(backend.requests(), served_before, "nothing was forwarded");

    for (reason, want) in [
        ("missing", 2.0),
        ("malformed", 2.0),
        ("truncated", 1.0),
        ("timeout", 1.0),
        ("too_long", 1.0),
        ("untrusted", 3.0),
    ] {
        let series = format!("pingora_vhost_proxy_protocol_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(node.metric(&series).await, want, "{series}");
    }

    // Good connections still pass: a trusted LOCAL header (the balancer's own health check)
    // keeps the real address; an untrusted client without a header is served as always.
    let local = with(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    let v = json_body(&exchange(BALANCER, http, &local, false).await);
    assert_eq!(header(&v, "x-forwarded-for"), BALANCER);
    let v = json_body(&exchange("127.0.0.1", http, request, false).await);
    assert_eq!(header(&v, "x-forwarded-for"), "127.0.0.1");
    let v = json_body(&exchange(BALANCER, http, &with(&v2), false).await);
    assert_eq!(
        header(&v, "x-forwarded-for"),
        "192.0.2.7",
        "v2 from the balancer"
    );
}

/// An nginx that requires the PROXY protocol and answers what it got.
fn nginx_requiring_proxy_protocol(dir: &Path, port: u16) -> Daemon {
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port} proxy_protocol;
    location /health {{ return 200 "ok\n"; }}
    location / {{ return 200 "pp=$proxy_protocol_addr:$proxy_protocol_port xff=$http_x_forwarded_for conn=$connection\n"; }}
  }}
}}
"#,
        dir = dir.display()
    );
    spawn_nginx(dir, &conf)
}

/// An nginx running `conf` with `dir` as its prefix (config, pid file, logs).
pub(crate) fn spawn_nginx(dir: &Path, conf: &str) -> Daemon {
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf")),
        dir,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_protocol_to_an_nginx_backend_that_requires_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _nginx = nginx_requiring_proxy_protocol(dir.path(), port);
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let node = Node::start(NodeOptions::new()).await;
    let (status, b) = node
        .api_post(
            "/api/v1/backends",
            json!({"id": "pp", "address": format!("127.0.0.1:{port}"), "tags": ["t"], "send_proxy_protocol": "v1"}),
        )
        .await;
    assert_eq!(status, 201, "{b}");
    assert_eq!(b["send_proxy_protocol"], "v1");
    node.add_domain("pp.test", "t").await;
    // Health probes send a LOCAL header: nginx answers them.
    node.wait_backend_health("pp", true, Duration::from_secs(10))
        .await;

    for version in ["v1", "v2"] {
        let (status, b) = node
            .api_put(
                "/api/v1/backends/pp",
                json!({"send_proxy_protocol": version}),
            )
            .await;
        assert_eq!(status, 200, "{b}");
        assert_eq!(b["send_proxy_protocol"], version);
        let http = node.http_addr;
        let get11 = b"GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n";
        // Lean path, keep-alive: two requests on one client connection, then another client.
        let mut conn = wait_for(Duration::from_secs(10), "route", || async {
            let mut c = connect_from("127.0.0.3", http).await;
            c.write_all(get11).await.ok()?;
            let answer = read_answer(&mut c).await;
            answer.contains("pp=127.0.0.3:").then_some(c)
        })
        .await;
        conn.write_all(get11).await.unwrap();
        let second = read_answer(&mut conn).await;
        assert!(
            second.contains("pp=127.0.0.3:") && second.contains("xff=127.0.0.3"),
            "{version}: {second}"
        );
        let mut other = connect_from("127.0.0.4", http).await;
        other.write_all(get11).await.unwrap();
        let answer = read_answer(&mut other).await;
        assert!(
            answer.contains("pp=127.0.0.4:"),
            "{version}: another client, not a shared connection: {answer}"
        );
        // Pingora's path (HTTP/1.0 is handed over).
        let raw = exchange(
            "127.0.0.5",
            http,
            b"GET / HTTP/1.0\r\nHost: pp.test\r\n\r\n",
            false,
        )
        .await;
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.contains(" 200 ") && text.contains("pp=127.0.0.5:"),
            "{version}: {text}"
        );
        let raw = exchange(
            "127.0.0.6",
            http,
            b"GET / HTTP/1.0\r\nHost: pp.test\r\n\r\n",
            false,
        )
        .await;
        assert!(
            String::from_utf8_lossy(&raw).contains("pp=127.0.0.6:"),
            "{version}: Pingora's pool is per client"
        );
    }
    // Cleared: the backend gets no header, and nginx refuses the request.
    let (status, b) = node
        .api_put("/api/v1/backends/pp", json!({"send_proxy_protocol": null}))
        .await;
    assert_eq!(status, 200, "{b}");
    assert!(b["send_proxy_protocol"].is_null());
    let raw = exchange(
        "127.0.0.3",
        node.http_addr,
        b"GET / HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n",
        false,
    )
    .await;
    assert!(
        String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

/// One answer with a `Content-Length` body (nginx's `return`).
async fn read_answer(conn: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if len.is_some_and(|n| body.len() >= n) {
                return text;
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return String::from_utf8_lossy(&got).to_string(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_kept_only_from_trusted_forwarders() {
    let (node, _backend) = node_with("trusted_forwarders = [\"127.0.0.2/32\"]", "").await;
    let http = node.http_addr;
    for (path, version) in [("lean", "HTTP/1.1"), ("pingora", "HTTP/1.0")] {
        let request = format!(
            "GET /headers {version}\r\nHost: pp.test\r\nX-Forwarded-For: 192.0.2.1\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: public.example\r\nConnection: close\r\n\r\n"
        );
        let v = json_body(&exchange("127.0.0.1", http, request.as_bytes(), false).await);
        assert_eq!(
            header(&v, "x-forwarded-for"),
            "127.0.0.1",
            "{path}: replaced"
        );
        assert_eq!(header(&v, "x-forwarded-proto"), "http", "{path}");
        assert_eq!(header(&v, "x-forwarded-host"), "pp.test", "{path}");
        let v = json_body(&exchange(BALANCER, http, request.as_bytes(), false).await);
        assert_eq!(
            header(&v, "x-forwarded-for"),
            "192.0.2.1, 127.0.0.2",
            "{path}: kept, appended"
        );
        assert_eq!(header(&v, "x-forwarded-proto"), "https", "{path}");
        assert_eq!(header(&v, "x-forwarded-host"), "public.example", "{path}");
        // A trusted forwarder that sends none gets ours.
        let bare = format!("GET /headers {version}\r\nHost: pp.test\r\nConnection: close\r\n\r\n");
        let v = json_body(&exchange(BALANCER, http, bare.as_bytes(), false).await);
        assert_eq!(header(&v, "x-forwarded-for"), "127.0.0.2", "{path}");
        assert_eq!(header(&v, "x-forwarded-proto"), "http", "{path}");
        assert_eq!(header(&v, "x-forwarded-host"), "pp.test", "{path}");
    }
}
