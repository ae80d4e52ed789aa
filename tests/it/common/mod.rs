//! Test harness: runs the real `pingora-vhost` binary as a child process against real backend
//! HTTP servers, real temp data dirs and real signals.
//!
//! Every test builds its own [`Node`] (own ports, own temp dir), so tests run in parallel.
//! Every wait is bounded by a deadline. When a test panics while a [`Node`] is alive, the node's
//! stdout/stderr are printed so the failure can be debugged from the test output alone.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bearer token every test node is configured with.
pub const TOKEN: &str = "test-token";
/// How long a node gets to answer `GET /api/v1/health` after spawn.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn bin_path() -> &'static str {
    env!("CARGO_BIN_EXE_pingora-vhost")
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback port that is free for both TCP and UDP right now and was never handed out before
/// in this test process (the kernel may recycle a just-released ephemeral port).
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        // gossip is UDP: make sure the same number is free there too.
        let udp_ok = UdpSocket::bind(("127.0.0.1", port)).is_ok();
        drop(listener);
        if !udp_ok {
            continue;
        }
        if handed_out().lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("could not find a free loopback port");
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// An address where nothing listens: connects are refused.
pub fn dead_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Does `msg` mention `field` as a whole word (so "id" does not match inside "invalid")?
pub fn mentions_field(msg: &str, field: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut start = 0;
    while let Some(pos) = msg[start..].find(field) {
        let i = start + pos;
        let before = msg[..i].chars().next_back();
        let after = msg[i + field.len()..].chars().next();
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
            return true;
        }
        start = i + field.len();
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Backend: a real HTTP server on its own port
// ---------------------------------------------------------------------------------------------

struct BackendState {
    name: String,
    /// Requests served, not counting `/health` (health probes would make counts meaningless).
    requests: AtomicUsize,
}

/// An in-process HTTP origin server.
///
/// Routes: `/health` -> 200 "ok"; `/headers` -> JSON object of the received request headers
/// (lower-case names, repeated headers joined with ", "); `/slow?ms=N` -> sleeps N ms then
/// answers the name; `/ws` -> websocket echo (replies "<name>: <text>"); anything else -> 200,
/// body = name, header `x-backend: <name>`.
/// Serves `app` on `listener` until the returned sender fires (or is dropped).
pub fn serve_until_shutdown(
    listener: tokio::net::TcpListener,
    app: axum::Router,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    (tx, task)
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on a given address (e.g. the address of a stopped backend, to bring it back).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind backend listener {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        handed_out().lock().unwrap().insert(addr.port());
        let state = Arc::new(BackendState {
            name: name.to_string(),
            requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/headers", get(headers_handler))
            .route("/slow", get(slow_handler))
            .route("/ws", get(ws_handler))
            .fallback(default_handler)
            .with_state(state.clone());
        let (tx, task) = serve_until_shutdown(listener, app);
        Backend {
            name: name.to_string(),
            addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// "127.0.0.1:<port>", the form registered with the proxy.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Requests served so far (excluding `/health`).
    /// Sends `GET /slow?ms=<ms>` for `host` through `client` and returns once this backend
    /// has received it: a request in flight, for drain and switch tests.
    pub async fn park_slow_request(
        &self,
        client: ProxyClient,
        host: &str,
        ms: u64,
    ) -> tokio::task::JoinHandle<Result<HttpResp, reqwest::Error>> {
        let before = self.requests();
        let host = host.to_string();
        let handle =
            tokio::spawn(async move { client.get(&host, &format!("/slow?ms={ms}")).await });
        wait_for(
            Duration::from_secs(5),
            &format!("the slow request to reach backend {}", self.name),
            || async { (self.requests() > before).then_some(()) },
        )
        .await;
        handle
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Closes the listener (new connects are refused) and closes idle keep-alive connections.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            // Graceful: in-flight requests finish. Bounded anyway.
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                panic!("backend {} did not stop within 5 s", self.name);
            }
        }
        // The port must now refuse connections.
        assert!(
            TcpStream::connect(self.addr).await.is_err(),
            "backend {} still accepts connections after stop()",
            self.name
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn default_handler(State(st): State<Arc<BackendState>>) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    ([("x-backend", st.name.clone())], st.name.clone()).into_response()
}

async fn headers_handler(State(st): State<Arc<BackendState>>, headers: HeaderMap) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let mut map = serde_json::Map::new();
    for (k, v) in headers.iter() {
        let v = String::from_utf8_lossy(v.as_bytes()).to_string();
        let key = k.as_str().to_ascii_lowercase();
        match map.get_mut(&key) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&v);
            }
            _ => {
                map.insert(key, Value::String(v));
            }
        }
    }
    (
        [("x-backend", st.name.clone())],
        axum::Json(Value::Object(map)),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct SlowQuery {
    ms: u64,
}

async fn slow_handler(State(st): State<Arc<BackendState>>, Query(q): Query<SlowQuery>) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(q.ms)).await;
    ([("x-backend", st.name.clone())], st.name.clone()).into_response()
}

async fn ws_handler(State(st): State<Arc<BackendState>>, ws: WebSocketUpgrade) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let name = st.name.clone();
    ws.on_upgrade(move |socket| ws_echo(socket, name))
}

async fn ws_echo(mut socket: WebSocket, name: String) {
    while let Some(Ok(msg)) = socket.recv().await {
        match msg {
            Message::Text(t) => {
                let reply = format!("{name}: {}", t.as_str());
                if socket.send(Message::Text(reply.into())).await.is_err() {
                    return;
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Node: the real binary
// ---------------------------------------------------------------------------------------------

/// Extra config text for a node.
#[derive(Clone, Default)]
pub struct NodeOptions {
    /// Lines added inside `[proxy]` (e.g. `upstream_read_timeout_secs = 1`).
    pub proxy_extra: String,
    /// Lines added inside `[health_check]` (interval_secs = 1 and timeout_secs = 1 are set).
    pub health_extra: String,
    /// Text appended at the end (`[[virtual_hosts]]`, `[[backends]]`).
    pub extra: String,
    /// `[cluster]` settings; defaults give a lone node (id 1, bootstrap_expect 1, no seeds).
    pub node_id: Option<u64>,
    pub bootstrap_expect: Option<usize>,
    pub seeds: Vec<SocketAddr>,
    pub secret: Option<String>,
    /// Lines added inside `[cluster]` (e.g. `snapshot_logs = 10`).
    pub cluster_extra: String,
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
    pub fn cluster(mut self, lines: &str) -> Self {
        self.cluster_extra.push_str(lines);
        self.cluster_extra.push('\n');
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
    pub version: reqwest::Version,
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
        let version = resp.version();
        let body = resp.text().await?;
        Ok(HttpResp {
            status,
            headers,
            body,
            version,
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
    api_client: reqwest::Client,
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
        let http_addr = free_addr();
        let node = Node {
            config_path,
            https_addr: free_addr(),
            http_addr,
            api_addr: free_addr(),
            rpc_addr: free_addr(),
            gossip_addr: free_addr(),
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
interval_secs = 1
timeout_secs = 1
{health_extra}
{extra}
"#,
            https = self.https_addr,
            http = self.http_addr,
            api = self.api_addr,
            proxy_extra = o.proxy_extra,
            data_dir = self.data_dir().display(),
            rpc = self.rpc_addr,
            gossip = self.gossip_addr,
            health_extra = o.health_extra,
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
        Command::new(bin_path())
            .arg("--config")
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
        let deadline = Instant::now() + START_TIMEOUT;
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
                    "node not ready within {START_TIMEOUT:?} (GET /api/v1/health 200 and proxy \
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
// Certificates
// ---------------------------------------------------------------------------------------------

pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// A fresh self-signed certificate for `names`.
pub fn self_signed(names: &[&str]) -> TestCert {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen self-signed cert");
    TestCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        der: ck.cert.der().to_vec(),
    }
}

impl TestCert {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`; returns their paths.
    pub fn write_files(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        File::create(&cert)
            .and_then(|mut f| f.write_all(self.cert_pem.as_bytes()))
            .expect("write cert file");
        File::create(&key)
            .and_then(|mut f| f.write_all(self.key_pem.as_bytes()))
            .expect("write key file");
        (cert, key)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw websocket client (enough for one text echo; no extra dependency)
// ---------------------------------------------------------------------------------------------

/// Connects to `addr`, sends an HTTP/1.1 websocket upgrade for `path` with `Host: host`, and
/// returns the stream after a valid `101` (checks `Sec-WebSocket-Accept`).
pub async fn ws_connect(addr: SocketAddr, host: &str, path: &str) -> TcpStream {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("ws connect timed out")
        .expect("ws connect");
    // RFC 6455 §1.3 sample key and its accept value.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read ws handshake");
            assert!(
                n == 1,
                "connection closed during websocket handshake: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
            assert!(
                head.len() < 16 * 1024,
                "websocket handshake response too large"
            );
        }
        String::from_utf8_lossy(&head).to_string()
    })
    .await
    .expect("websocket handshake response timed out");
    let status_line = head.lines().next().unwrap_or_default().to_string();
    assert!(
        status_line.starts_with("HTTP/1.1 101"),
        "websocket upgrade through the proxy should answer 101, got:\n{head}"
    );
    let accept = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-accept")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    assert_eq!(
        accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        "Sec-WebSocket-Accept must be passed through; response:\n{head}"
    );
    stream
}

/// Sends one masked text frame.
pub async fn ws_send_text(stream: &mut TcpStream, text: &str) {
    let payload = text.as_bytes();
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81u8];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).await.unwrap();
}

/// Reads frames until a text frame arrives (skipping pings/pongs); returns its text.
pub async fn ws_recv_text(stream: &mut TcpStream) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut h = [0u8; 2];
            stream
                .read_exact(&mut h)
                .await
                .expect("read ws frame header");
            let opcode = h[0] & 0x0f;
            let masked = h[1] & 0x80 != 0;
            let mut len = (h[1] & 0x7f) as u64;
            if len == 126 {
                let mut b = [0u8; 2];
                stream.read_exact(&mut b).await.unwrap();
                len = u16::from_be_bytes(b) as u64;
            } else if len == 127 {
                let mut b = [0u8; 8];
                stream.read_exact(&mut b).await.unwrap();
                len = u64::from_be_bytes(b);
            }
            let mut mask = [0u8; 4];
            if masked {
                stream.read_exact(&mut mask).await.unwrap();
            }
            let mut payload = vec![0u8; len as usize];
            stream.read_exact(&mut payload).await.unwrap();
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x1 => return String::from_utf8(payload).expect("utf-8 text frame"),
                0x8 => panic!("websocket closed by peer instead of echoing"),
                _ => continue,
            }
        }
    })
    .await
    .expect("no websocket frame within 10 s")
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

// ---------------------------------------------------------------------------------------------
// Cluster: several real nodes on loopback
// ---------------------------------------------------------------------------------------------

pub const CLUSTER_SECRET: &str = "test-cluster-secret";

/// `n` nodes (ids 1..=n) that find each other by gossip with `bootstrap_expect = n`.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes; `options(i)` gives node i's extra options (cluster keys are set here).
    pub async fn start(n: usize, options: impl Fn(u64) -> NodeOptions) -> Cluster {
        let mut nodes: Vec<Node> = (1..=n as u64)
            .map(|id| Node::new_unstarted(options(id).node_id(id).bootstrap_expect(n)))
            .collect();
        let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.gossip_addr).collect();
        for node in nodes.iter_mut() {
            node.options.seeds = seeds.clone();
            node.write_config();
            node.spawn();
        }
        for node in nodes.iter_mut() {
            node.wait_ready().await;
        }
        let cluster = Cluster { nodes };
        cluster.wait_converged(Duration::from_secs(20)).await;
        cluster
    }

    /// Gossip seeds of the running cluster (for a node that joins later).
    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.gossip_addr).collect()
    }

    /// Starts one more node with `id` that joins through gossip.
    pub async fn join(&mut self, id: u64, options: NodeOptions) -> &mut Node {
        let expect = self.nodes.len();
        let node = Node::start(
            options
                .node_id(id)
                .bootstrap_expect(expect)
                .seeds(&self.seeds()),
        )
        .await;
        self.nodes.push(node);
        self.nodes.last_mut().unwrap()
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.options.node_id == Some(id))
            .expect("no such node")
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.options.node_id == Some(id))
            .expect("no such node")
    }

    /// Running nodes.
    pub fn running(&mut self) -> Vec<&mut Node> {
        self.nodes
            .iter_mut()
            .filter_map(|n| if n.is_running() { Some(n) } else { None })
            .collect()
    }

    /// The leader id as seen by a running node.
    /// (leader id, ids of the other nodes).
    pub async fn leader_and_followers(&mut self) -> (u64, Vec<u64>) {
        let leader = self.leader().await.expect("a leader");
        let ids = self
            .nodes
            .iter()
            .filter_map(|n| n.options.node_id)
            .filter(|id| *id != leader)
            .collect();
        (leader, ids)
    }

    /// (leader id, id of one follower): for tests that act through a follower.
    pub async fn leader_and_follower(&mut self) -> (u64, u64) {
        let (leader, followers) = self.leader_and_followers().await;
        (leader, *followers.first().expect("a follower"))
    }

    pub async fn leader(&mut self) -> Option<u64> {
        for n in self.running() {
            let (status, v) = n.api_get("/api/v1/cluster/status").await;
            if status == 200 {
                if let Some(l) = v["leader_id"].as_u64() {
                    return Some(l);
                }
            }
        }
        None
    }

    /// Waits until every running node reports the same leader, the same voters, and the same
    /// last applied index.
    pub async fn wait_converged(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            last.clear();
            for n in &self.nodes {
                if let Ok(r) = n
                    .api_client
                    .get(n.api_url("/api/v1/cluster/status"))
                    .bearer_auth(TOKEN)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                {
                    if let Ok(v) = r.json::<Value>().await {
                        last.push(v);
                        continue;
                    }
                }
                last.push(Value::Null);
            }
            let ok = last.iter().all(|v| !v.is_null())
                && last.windows(2).all(|w| {
                    w[0]["leader_id"] == w[1]["leader_id"]
                        && w[0]["last_applied"] == w[1]["last_applied"]
                        && w[0]["members"] == w[1]["members"]
                })
                && !last[0]["leader_id"].is_null()
                && last[0]["members"].as_array().is_some_and(|m| {
                    m.len() == self.nodes.len() && m.iter().all(|x| x["voter"] == true)
                });
            if ok {
                return;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self.nodes.iter().map(|n| n.logs()).collect();
                panic!(
                    "cluster did not converge within {timeout:?}; statuses: {last:#?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
