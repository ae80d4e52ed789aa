//! In-process HTTP origin servers, each on its own loopback port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tokio::net::TcpStream;

use super::{bind_loopback, wait_for, HttpResp, ProxyClient};

struct BackendState {
    name: String,
    /// Requests served, not counting `/health` (health probes would make counts meaningless).
    requests: AtomicUsize,
}

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

/// An in-process HTTP origin server.
///
/// Routes: `/health` -> 200 "ok"; `/headers` -> JSON object of the received request headers
/// (lower-case names, repeated headers joined with ", "); `/slow?ms=N` -> sleeps N ms then
/// answers the name; `/ws` -> websocket echo (replies "<name>: <text>"); anything else -> 200,
/// body = name, header `x-backend: <name>`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::serve(name, bind_loopback().await)
    }

    /// Starts on a given address (e.g. the address of a stopped backend, to bring it back).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind backend listener {addr}: {e}"));
        Backend::serve(name, listener)
    }

    fn serve(name: &str, listener: tokio::net::TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
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

    /// Requests served so far (excluding `/health`).
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
