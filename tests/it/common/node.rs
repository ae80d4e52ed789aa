//! One real node: the `pingora-vhost` binary as a child process, with its own ports, config
//! file and data dir; its management API, its proxy listeners and its metrics; and `--check`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::TcpStream;

use super::{bin_path, free_addr, START_TIMEOUT, TOKEN};

/// Extra config text for a node.
#[derive(Clone, Default)]
pub struct NodeOptions {
    /// Lines added inside `[proxy]` (e.g. `upstream_read_timeout_secs = 1`).
    pub proxy_extra: String,
    /// Lines added inside `[health_check]` (interval_secs and timeout_secs = 1 are set).
    pub health_extra: String,
    /// `[health_check] interval_secs` (default 1).
    pub health_interval_secs: Option<u64>,
    /// How long start-up may take (default `START_TIMEOUT`; a huge config takes longer).
    pub start_timeout: Option<Duration>,
    /// Text appended at the end (`[[virtual_hosts]]`, `[[backends]]`).
    pub extra: String,
    /// `[cluster]` settings; defaults give a lone node (id 1, bootstrap_expect 1, no seeds).
    pub node_id: Option<u64>,
    pub bootstrap_expect: Option<usize>,
    pub seeds: Vec<SocketAddr>,
    pub secret: Option<String>,
    /// Lines added inside `[cluster]` (e.g. `snapshot_logs = 10`).
    pub cluster_extra: String,
    /// Run inside this network namespace, listening on this address (fixed ports: the
    /// namespace has its own port space). See `netns.rs`.
    pub netns: Option<(String, std::net::Ipv4Addr)>,
    /// Lines added inside `[api]` (after the token).
    pub api_extra: String,
}

impl NodeOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn proxy(mut self, lines: &str) -> Self {
        self.proxy_extra.push_str(lines);
        self.proxy_extra.push('\n');
        self
    }
    pub fn start_timeout(mut self, t: Duration) -> Self {
        self.start_timeout = Some(t);
        self
    }
    pub fn health_interval(mut self, secs: u64) -> Self {
        self.health_interval_secs = Some(secs);
        self
    }
    pub fn health(mut self, lines: &str) -> Self {
        self.health_extra.push_str(lines);
        self.health_extra.push('\n');
        self
    }
    pub fn extra(mut self, text: &str) -> Self {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }
    pub fn node_id(mut self, id: u64) -> Self {
        self.node_id = Some(id);
        self
    }
    pub fn bootstrap_expect(mut self, n: usize) -> Self {
        self.bootstrap_expect = Some(n);
        self
    }
    pub fn seeds(mut self, seeds: &[SocketAddr]) -> Self {
        self.seeds = seeds.to_vec();
        self
    }
    pub fn api(mut self, lines: &str) -> Self {
        self.api_extra.push_str(lines);
        self.api_extra.push('\n');
        self
    }

    pub fn cluster(mut self, lines: &str) -> Self {
        self.cluster_extra.push_str(lines);
        self.cluster_extra.push('\n');
        self
    }
    /// Runs the node as node `id` of `net`, in its namespace, on its address.
    pub fn in_netns(mut self, net: &super::Netns, id: u64) -> Self {
        self.netns = Some((net.node_ns(id), net.node_ip(id)));
        // The API listens on the namespace's address, beyond loopback: plaintext must be
        // allowed explicitly (the test's private bridge carries it).
        self.api_extra.push_str("allow_plaintext = true\n");
        self
    }
    pub fn secret(mut self, secret: &str) -> Self {
        self.secret = Some(secret.to_string());
        self
    }
}

/// A plain HTTP response as the client saw it.
#[derive(Debug)]
pub struct HttpResp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl HttpResp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
    }
}

/// A response over TLS, with the certificate the server presented.
#[derive(Debug)]
pub struct TlsResp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub version: reqwest::Version,
    /// DER of the leaf certificate the server presented.
    pub peer_cert: Option<Vec<u8>>,
}

/// A cloneable handle for sending proxied requests from spawned tasks.
#[derive(Clone)]
pub struct ProxyClient {
    client: reqwest::Client,
    pub http_addr: SocketAddr,
}

impl ProxyClient {
    /// A client that opens a new connection for every request (as separate clients would).
    pub fn without_keepalive(&self) -> ProxyClient {
        ProxyClient {
            client: base_client_builder()
                .http1_only()
                .pool_max_idle_per_host(0)
                .build()
                .expect("proxy client"),
            http_addr: self.http_addr,
        }
    }

    /// Plain HTTP GET to the node's HTTP listener with the given Host header.
    pub async fn get(&self, host: &str, path: &str) -> Result<HttpResp, reqwest::Error> {
        let url = format!("http://{}{}", self.http_addr, path);
        let resp = self
            .client
            .get(url)
            .header(reqwest::header::HOST, host)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await?;
        Ok(HttpResp {
            status,
            headers,
            body,
        })
    }
}

/// GETs sent one after another (each on a new connection) until stopped; each outcome is
/// Ok, or the status/body or error that a client would have seen.
pub struct GetLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Result<(), String>>>,
}

impl GetLoop {
    pub fn start(client: ProxyClient, host: &str, expect_body: &str) -> GetLoop {
        let client = client.without_keepalive();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (host, expect) = (host.to_string(), expect_body.to_string());
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    outcomes.push(match client.get(&host, "/").await {
                        Ok(r) if r.status == 200 && r.body == expect => Ok(()),
                        Ok(r) => Err(format!("{} {:?}", r.status, r.body)),
                        Err(e) => Err(format!("{e:?}")),
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                outcomes
            }
        });
        GetLoop { stop, task }
    }

    /// Stops the loop; returns (requests sent, the failures).
    pub async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let outcomes = self.task.await.expect("GET loop task");
        let n = outcomes.len();
        (n, outcomes.into_iter().filter_map(Result::err).collect())
    }
}

fn base_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(5))
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub https_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub rpc_addr: SocketAddr,
    pub gossip_addr: SocketAddr,
    pub options: NodeOptions,
    child: Option<Child>,
    pub(super) api_client: reqwest::Client,
    proxy: ProxyClient,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    starts: usize,
}

impl Node {
    /// A node with no seeded vhosts/backends.
    pub async fn start_default() -> Node {
        Node::start(NodeOptions::new()).await
    }

    /// Writes the config, spawns the binary, waits until it is ready.
    pub async fn start(options: NodeOptions) -> Node {
        let node = Node::new_unstarted(options);
        node.start_spawned().await
    }

    /// Writes the config file but does not spawn the process.
    pub fn new_unstarted(options: NodeOptions) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("pvh-test-")
            .tempdir()
            .expect("create temp dir");
        let config_path = dir.path().join("node.toml");
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        // In its own namespace a node has the whole port space: fixed ports.
        let addr = |port: u16| match &options.netns {
            Some((_, ip)) => SocketAddr::from((*ip, port)),
            None => free_addr(),
        };
        let (https_addr, http_addr, api_addr, rpc_addr, gossip_addr) =
            (addr(8443), addr(8080), addr(9090), addr(7101), addr(7946));
        let node = Node {
            config_path,
            https_addr,
            http_addr,
            api_addr,
            rpc_addr,
            gossip_addr,
            options,
            child: None,
            api_client: base_client_builder().build().expect("api client"),
            proxy: ProxyClient {
                client: base_client_builder()
                    .http1_only()
                    .build()
                    .expect("proxy client"),
                http_addr,
            },
            stdout_path,
            stderr_path,
            starts: 0,
            dir,
        };
        node.write_config();
        node
    }

    pub async fn start_spawned(mut self) -> Node {
        self.spawn();
        self.wait_ready().await;
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_text(&self) -> String {
        let o = &self.options;
        format!(
            r#"[proxy]
listen_addr = "{https}"
listen_addr_http = "{http}"
management_api_addr = "{api}"
threads = 1
{proxy_extra}
[api]
token = "{TOKEN}"
{api_extra}
[cluster]
node_id = {node_id}
data_dir = '{data_dir}'
rpc_addr = "{rpc}"
gossip_addr = "{gossip}"
seeds = [{seeds}]
bootstrap_expect = {bootstrap_expect}
secret = "{secret}"
{cluster_extra}

[health_check]
interval_secs = {health_interval}
timeout_secs = 1
{health_extra}
{extra}
"#,
            https = self.https_addr,
            api_extra = o.api_extra,
            http = self.http_addr,
            api = self.api_addr,
            proxy_extra = o.proxy_extra,
            data_dir = self.data_dir().display(),
            rpc = self.rpc_addr,
            gossip = self.gossip_addr,
            health_extra = o.health_extra,
            health_interval = o.health_interval_secs.unwrap_or(1),
            extra = o.extra,
            node_id = o.node_id.unwrap_or(1),
            bootstrap_expect = o.bootstrap_expect.unwrap_or(1),
            seeds = o
                .seeds
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", "),
            secret = o.secret.as_deref().unwrap_or("test-cluster-secret"),
            cluster_extra = o.cluster_extra,
        )
    }

    pub fn write_config(&self) {
        std::fs::write(&self.config_path, self.config_text()).expect("write node config");
    }

    /// Replaces the appended `[[virtual_hosts]]`/`[[backends]]` text and rewrites the file
    /// (takes effect at the next `restart()`).
    pub fn set_extra(&mut self, extra: &str) {
        self.options.extra = extra.to_string();
        self.write_config();
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "spawn() while a process is running");
        self.child = Some(self.spawn_process(&[]));
    }

    /// Pingora's graceful upgrade: starts a second process with `--upgrade` on the same config
    /// and data dir, then sends SIGQUIT to the running one. The new process becomes this
    /// node's process; the old one is returned (it drains and exits on its own).
    pub fn upgrade_in_place(&mut self) -> Child {
        let old = self.child.take().expect("node is not running");
        self.child = Some(self.spawn_process(&["--upgrade"]));
        // The new process fetches the old one's state, then waits (up to 5 s) for the sockets.
        std::thread::sleep(Duration::from_millis(500));
        let rc = unsafe { libc::kill(old.id() as libc::pid_t, libc::SIGQUIT) };
        assert_eq!(rc, 0, "kill(SIGQUIT) failed");
        old
    }

    /// [`Node::upgrade_in_place`], then waits for the old process to drain and exit.
    pub async fn upgrade_and_wait_old(&mut self) -> ExitStatus {
        let mut old = self.upgrade_in_place();
        tokio::task::spawn_blocking(move || old.wait())
            .await
            .expect("join")
            .expect("wait for the old process")
    }

    fn spawn_process(&mut self, extra_args: &[&str]) -> Child {
        self.starts += 1;
        let banner = format!(
            "\n===== start #{} of {} =====\n",
            self.starts,
            self.config_path.display()
        );
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stdout_path)
            .expect("open stdout log");
        let mut err = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open stderr log");
        let _ = out.write_all(banner.as_bytes());
        let _ = err.write_all(banner.as_bytes());
        let mut cmd = match &self.options.netns {
            // `ip netns exec` execs the binary: the child's pid is the node's.
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), bin_path()]);
                c
            }
            None => Command::new(bin_path()),
        };
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(extra_args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn pingora-vhost")
    }

    /// Waits until the API health endpoint answers 200 and both proxy listeners accept TCP.
    pub async fn wait_ready(&mut self) {
        let timeout = self.options.start_timeout.unwrap_or(START_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let url = format!("http://{}/api/v1/health", self.api_addr);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "pingora-vhost exited during startup with {status}\n{}",
                    self.logs()
                );
            }
            let api_ok = matches!(
                self.api_client.get(&url).timeout(Duration::from_secs(2)).send().await,
                Ok(r) if r.status().as_u16() == 200
            );
            if api_ok
                && TcpStream::connect(self.http_addr).await.is_ok()
                && TcpStream::connect(self.https_addr).await.is_ok()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "node not ready within {timeout:?} (GET /api/v1/health 200 and proxy \
                     listeners {} / {} accepting)\n{}",
                    self.http_addr,
                    self.https_addr,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is not running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().unwrap().is_none(),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on unix
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (the process keeps running until it exits on its own).
    pub fn sigterm(&mut self) {
        let pid = self.pid() as libc::pid_t;
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// Waits for the process to exit on its own; `None` if it is still running at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("node is not running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts with the same config file and data dir (kill -9 first if still running).
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready().await;
    }

    /// stdout + stderr of every start of this node.
    pub fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "----- node stdout ({}) -----\n{}\n----- node stderr ({}) -----\n{}\n----- end of node logs -----",
            self.stdout_path.display(),
            tail(&read(&self.stdout_path), 200),
            self.stderr_path.display(),
            tail(&read(&self.stderr_path), 200),
        )
    }

    // ---------------- management API ----------------

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{}", self.api_addr, path)
    }

    /// Any API request; `token: None` sends no Authorization header. Returns the status, the
    /// body parsed as JSON (`Value::Null` when empty, `Value::String(raw)` when not JSON) and
    /// the content type.
    pub async fn api_request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
        auth: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.api_client.request(method.clone(), self.api_url(path));
        if let Some(a) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} failed: {e}\n{}", self.logs()));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    fn bearer() -> String {
        format!("Bearer {TOKEN}")
    }

    pub async fn api_get(&self, path: &str) -> (u16, Value) {
        self.api_request(reqwest::Method::GET, path, None, Some(&Self::bearer()))
            .await
    }

    /// Every item of a paged list (`{"items","total","next_cursor"}`), following the cursors
    /// with the largest page: the status of the first failing page (or 200) and the items as
    /// one array.
    pub async fn api_list(&self, path: &str) -> (u16, Value) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let first = format!("{path}{sep}limit=1000");
        let mut url = first.clone();
        let mut items = Vec::new();
        loop {
            let (status, page) = self.api_get(&url).await;
            if status != 200 {
                return (status, page);
            }
            items.extend(
                page["items"].as_array().cloned().unwrap_or_else(|| {
                    panic!("GET {url}: a page must have an items array: {page}")
                }),
            );
            match page["next_cursor"].as_str() {
                Some(c) => url = format!("{first}&cursor={c}"),
                None => return (200, Value::Array(items)),
            }
        }
    }

    pub async fn api_post(&self, path: &str, body: Value) -> (u16, Value) {
        self.api_request(
            reqwest::Method::POST,
            path,
            Some(&body.to_string()),
            Some(&Self::bearer()),
        )
        .await
    }

    /// POST with no body at all.
    pub async fn api_post_empty(&self, path: &str) -> (u16, Value) {
        self.api_request(reqwest::Method::POST, path, None, Some(&Self::bearer()))
            .await
    }

    pub async fn api_put(&self, path: &str, body: Value) -> (u16, Value) {
        self.api_request(
            reqwest::Method::PUT,
            path,
            Some(&body.to_string()),
            Some(&Self::bearer()),
        )
        .await
    }

    pub async fn api_delete(&self, path: &str) -> (u16, Value) {
        self.api_request(reqwest::Method::DELETE, path, None, Some(&Self::bearer()))
            .await
    }

    /// Raw body (e.g. malformed JSON) with the valid token.
    pub async fn api_raw(&self, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
        self.api_request(method, path, Some(body), Some(&Self::bearer()))
            .await
    }

    /// POST that must answer 201; returns the body.
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (status, resp) = self.api_post(path, body.clone()).await;
        assert_eq!(
            status, 201,
            "POST {path} {body} should answer 201, got {status} {resp}"
        );
        resp
    }

    pub async fn add_backend(&self, id: &str, address: &str, tags: &[&str]) -> Value {
        self.create(
            "/api/v1/backends",
            json!({"id": id, "address": address, "tags": tags}),
        )
        .await
    }

    pub async fn add_domain(&self, domain: &str, tag: &str) -> Value {
        self.create(
            "/api/v1/domains",
            json!({"domain": domain, "enabled_backends_tag": tag}),
        )
        .await
    }

    /// Polls `GET /api/v1/backends/{id}` until `healthy` equals `want` (bounded).
    pub async fn wait_backend_health(&self, id: &str, want: bool, timeout: Duration) {
        let path = format!("/api/v1/backends/{id}");
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.api_get(&path).await;
            if status == 200 && body["healthy"] == Value::Bool(want) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "backend {id} did not become healthy={want} within {timeout:?}; last: \
                     {status} {body}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // ---------------- proxy ----------------

    pub fn proxy_client(&self) -> ProxyClient {
        self.proxy.clone()
    }

    /// Plain HTTP GET through the proxy with the given Host header.
    pub async fn proxy_get(&self, host: &str, path: &str) -> HttpResp {
        self.proxy.get(host, path).await.unwrap_or_else(|e| {
            panic!(
                "proxy GET http://{host}{path} via {} failed: {e}\n{}",
                self.http_addr,
                self.logs()
            )
        })
    }

    /// Polls until a proxied GET answers 200 with `body` (bounded); returns that response.
    pub async fn wait_route(&self, host: &str, path: &str, body: &str) -> HttpResp {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let last = match self.proxy.get(host, path).await {
                Ok(r) if r.status == 200 && r.body == body => return r,
                Ok(r) => format!("{} {:?}", r.status, r.body),
                Err(e) => format!("error {e}"),
            };
            if Instant::now() >= deadline {
                panic!(
                    "GET http://{host}{path} never answered 200 {body:?} within 15 s; last: {last}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET over TLS to the HTTPS listener with SNI = `sni_host` (and Host = `sni_host`).
    /// Accepts any certificate; returns the presented leaf certificate.
    pub async fn https_get(&self, sni_host: &str, path: &str) -> Result<TlsResp, reqwest::Error> {
        let client = base_client_builder()
            .danger_accept_invalid_certs(true)
            .tls_info(true)
            .resolve(sni_host, self.https_addr)
            .build()?;
        let url = format!("https://{}:{}{}", sni_host, self.https_addr.port(), path);
        tls_send(client.get(url)).await
    }

    /// A client for `https://<sni_host>:<https port>` that keeps its connection (HTTP/2 when
    /// the node offers it), accepting any certificate.
    pub fn https_client(&self, sni_host: &str) -> reqwest::Client {
        base_client_builder()
            .danger_accept_invalid_certs(true)
            .resolve(sni_host, self.https_addr)
            .build()
            .expect("https client")
    }

    /// GET over TLS to `https://127.0.0.1:<port>` (no SNI is sent for an IP address) with the
    /// given Host header, HTTP/1.1.
    pub async fn https_get_no_sni(
        &self,
        host: &str,
        path: &str,
    ) -> Result<TlsResp, reqwest::Error> {
        let client = base_client_builder()
            .danger_accept_invalid_certs(true)
            .tls_info(true)
            .http1_only()
            .build()?;
        let url = format!("https://{}{}", self.https_addr, path);
        tls_send(client.get(url).header(reqwest::header::HOST, host)).await
    }
}

async fn tls_send(req: reqwest::RequestBuilder) -> Result<TlsResp, reqwest::Error> {
    let resp = req.send().await?;
    let peer_cert = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(|d| d.to_vec());
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let version = resp.version();
    let body = resp.text().await?;
    Ok(TlsResp {
        status,
        headers,
        body,
        version,
        peer_cert,
    })
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("\n{}", self.logs());
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    out.push_str(&all[start..].join("\n"));
    out
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

impl Node {
    /// The text of `GET /api/v1/metrics` (with the token); panics unless it answers 200.
    pub async fn metrics_text(&self) -> String {
        let resp = self
            .api_client
            .get(self.api_url("/api/v1/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /api/v1/metrics failed: {e}\n{}", self.logs()));
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("metrics body");
        assert_eq!(status, 200, "GET /api/v1/metrics: {text}");
        text
    }

    /// The value of `series` in [`Node::metrics_text`] (see [`metric_value`]); panics, showing
    /// the text, when the series is absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        metric_value(&text, series)
            .unwrap_or_else(|| panic!("metric {series} not found in /api/v1/metrics:\n{text}"))
    }
}

/// The value of one series in Prometheus text format: `series` is the metric name with its
/// labels as exposed (`pingora_vhost_requests_total{code="200"}`), matched whole, so a name is
/// not found inside a longer one. `None` when the text has no such sample.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------
// `--check`
// ---------------------------------------------------------------------------------------------

pub struct CheckOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `pingora-vhost --config <path> --check` with a 20 s bound.
pub async fn run_check(path: &Path) -> CheckOutput {
    let dir = path.parent().unwrap();
    let stem = path.file_name().unwrap().to_string_lossy().to_string();
    let out_path = dir.join(format!("{stem}.check-stdout"));
    let err_path = dir.join(format!("{stem}.check-stderr"));
    let mut child = Command::new(bin_path())
        .arg("--config")
        .arg(path)
        .arg("--check")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn pingora-vhost --check");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`--check` on {} did not exit within 20 s; stderr:\n{}",
                path.display(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    CheckOutput {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}
