//! Health plane with real processes and real backends: active checks, the passive breaker,
//! observations shared through gossip (merged view, guard rail, expiry), safe switch, drain,
//! and a restarted node starting from its peers' view. Assertions are what users see: status
//! codes, which backend answered, what the API reports.

use tokio::io::AsyncWriteExt;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers local to this file
// ---------------------------------------------------------------------------------------------

/// An origin whose health paths can be made to fail: `/health*` answers 200 "ok" unless the
/// exact path is in `failing` (then 500); anything else answers 200 with the name (header
/// `x-backend`) and is counted. Used to give one node a failing view of a backend: that node's
/// `[health_check] path` is a path only it probes.
struct Origin {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    /// Health probes received: when, and from which node (its `User-Agent`).
    probes: Arc<Mutex<Vec<(Instant, u64)>>>,
    failing: Arc<Mutex<HashSet<String>>>,
    /// Answers 500 to everything but its health paths (which keep passing).
    broken: Arc<AtomicBool>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct OriginState {
    name: String,
    requests: Arc<AtomicUsize>,
    probes: Arc<Mutex<Vec<(Instant, u64)>>>,
    failing: Arc<Mutex<HashSet<String>>>,
    /// Answers 500 to everything but its health paths (which keep passing).
    broken: Arc<AtomicBool>,
}

async fn origin_handler(
    State(st): State<OriginState>,
    uri: Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    if path.starts_with("/health") {
        // The prober's User-Agent names its node: "pingora-vhost-health/<v> (node <id>)".
        let node = headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split("(node ").nth(1))
            .and_then(|rest| rest.trim_end_matches(')').parse().ok());
        if let Some(node) = node {
            st.probes.lock().unwrap().push((Instant::now(), node));
        }
        if st.failing.lock().unwrap().contains(&path) {
            return (StatusCode::INTERNAL_SERVER_ERROR, "failing on purpose").into_response();
        }
        return "ok".into_response();
    }
    st.requests.fetch_add(1, Ordering::SeqCst);
    if st.broken.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "broken on purpose").into_response();
    }
    ([("x-backend", st.name.clone())], st.name.clone()).into_response()
}

impl Origin {
    async fn start(name: &str, failing_health_paths: &[&str]) -> Origin {
        // free_port() records the port so no node of this process is given it later.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .expect("bind origin");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(Mutex::new(
            failing_health_paths.iter().map(|s| s.to_string()).collect(),
        ));
        let broken = Arc::new(AtomicBool::new(false));
        let st = OriginState {
            name: name.to_string(),
            requests: requests.clone(),
            probes: probes.clone(),
            failing: failing.clone(),
            broken: broken.clone(),
        };
        let app = Router::new().fallback(origin_handler).with_state(st);
        let (tx, task) = serve_until_shutdown(listener, app);
        Origin {
            addr,
            requests,
            probes,
            failing,
            broken,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    fn address(&self) -> String {
        self.addr.to_string()
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The nodes that probed it since `since`, and how often each.
    fn probers_since(&self, since: Instant) -> std::collections::BTreeMap<u64, usize> {
        let mut out = std::collections::BTreeMap::new();
        for (at, node) in self.probes.lock().unwrap().iter() {
            if *at >= since {
                *out.entry(*node).or_insert(0) += 1;
            }
        }
        out
    }

    /// Its health path answers 500 from now on (`/health`; it keeps serving traffic).
    /// Real traffic gets 500 from now on (or again 200); `/health` keeps passing.
    fn break_traffic(&self, broken: bool) {
        self.broken.store(broken, Ordering::SeqCst);
    }

    fn fail_health(&self) {
        self.failing.lock().unwrap().insert("/health".to_string());
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One proxied GET as the client saw it.
#[derive(Debug, Clone)]
struct Sample {
    /// Which node's proxy it went through (node id).
    node: u64,
    start: Instant,
    end: Instant,
    /// 0 when the request failed at the transport level.
    status: u16,
    /// `x-backend` of the answer ("" if none).
    backend: String,
    error: Option<String>,
}

impl Sample {
    fn ok(&self) -> bool {
        self.status == 200 && self.error.is_none()
    }
}

/// Continuous GET load: `per_node` sequential clients per target, until `finish()`.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(targets: Vec<(u64, ProxyClient)>, host: &str, path: &str, per_node: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (node, client) in targets {
            for _ in 0..per_node {
                let (stop, client, host, path) = (
                    stop.clone(),
                    client.clone(),
                    host.to_string(),
                    path.to_string(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        out.push(one_get(node, &client, &host, &path).await);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    out
                }));
            }
        }
        Load { stop, tasks }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("load task panicked"));
        }
        all.sort_by_key(|s| s.start);
        all
    }
}

async fn one_get(node: u64, client: &ProxyClient, host: &str, path: &str) -> Sample {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), client.get(host, path)).await;
    let end = Instant::now();
    let (status, backend, error) = match r {
        Ok(Ok(r)) => {
            let err = (r.status != 200).then(|| format!("{} {:?}", r.status, r.body));
            (r.status, r.header("x-backend").unwrap_or_default(), err)
        }
        Ok(Err(e)) => (0, String::new(), Some(format!("transport error: {e}"))),
        Err(_) => (0, String::new(), Some("no answer within 10 s".to_string())),
    };
    Sample {
        node,
        start,
        end,
        status,
        backend,
        error,
    }
}

fn errors(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter(|s| !s.ok())
        .map(|s| {
            format!(
                "node {} at +{:?}: {}",
                s.node,
                s.start.elapsed(),
                s.error.clone().unwrap_or_default()
            )
        })
        .collect()
}

fn assert_no_errors(samples: &[Sample], what: &str, nodes: &[&Node]) {
    let errs = errors(samples);
    if !errs.is_empty() {
        for n in nodes {
            eprintln!("{}", n.logs());
        }
        panic!(
            "{what}: {} of {} GETs failed (expected 0): {:#?}",
            errs.len(),
            samples.len(),
            &errs[..errs.len().min(20)]
        );
    }
}

async fn backend_view(node: &Node, id: &str) -> Value {
    let (status, v) = node.api_get(&format!("/api/v1/backends/{id}")).await;
    assert_eq!(status, 200, "GET /api/v1/backends/{id}: {v}");
    v
}

/// Polls `GET /api/v1/backends/{id}` on `node` until `pred` holds; returns that body.
async fn wait_view(
    node: &Node,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = backend_view(node, id).await;
        if pred(&v) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what} (backend {id} on node {:?}); \
                 last view: {v:#}\n{}",
                node.options.node_id,
                node.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn peers_down(v: &Value) -> Vec<u64> {
    v["health"]["peers_reporting_down"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Polls until a proxied GET through `node` answers 200.
async fn wait_serving(node: &Node, host: &str) {
    let client = node.proxy_client();
    wait_for(Duration::from_secs(15), "the proxy answers 200", || {
        let client = client.clone();
        let host = host.to_string();
        async move {
            matches!(client.get(&host, "/").await, Ok(r) if r.status == 200).then_some(())
        }
    })
    .await;
}

/// Sends `n` GETs through `node` one after the other; returns the samples.
async fn burst(node: &Node, host: &str, n: usize) -> Vec<Sample> {
    let client = node.proxy_client();
    let id = node.options.node_id.unwrap_or(1);
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(one_get(id, &client, host, "/").await);
    }
    out
}

/// A single node whose `[health_check] interval_secs` is `interval` (the harness writes 1 and
/// TOML refuses a duplicate key, so the written file is patched before the spawn).
async fn node_with_interval(interval: u64, options: NodeOptions) -> Node {
    let node = Node::new_unstarted(options);
    let text = node.config_text();
    assert!(text.contains("\ninterval_secs = 1\n"), "{text}");
    std::fs::write(
        &node.config_path,
        text.replace(
            "\ninterval_secs = 1\n",
            &format!("\ninterval_secs = {interval}\n"),
        ),
    )
    .unwrap();
    node.start_spawned().await
}

fn all_nodes(cluster: &Cluster) -> Vec<&Node> {
    cluster.nodes.iter().collect()
}

// ---------------------------------------------------------------------------------------------
// 1. A backend killed under traffic: avoided by all nodes, 0 errors, used again after recovery
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_avoided_by_every_node_without_errors_and_used_again_after_recovery() {
    let cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let mut k1 = Backend::start("k1").await;
    let k2 = Backend::start("k2").await;
    let addr1 = k1.addr;
    let n1 = cluster.node(1);
    n1.add_backend("k1", &k1.address(), &["a"]).await;
    n1.add_backend("k2", &k2.address(), &["a"]).await;
    n1.add_domain("kill.test", "a").await;
    for n in &cluster.nodes {
        wait_serving(n, "kill.test").await;
        wait_view(n, "k1", Duration::from_secs(10), "k1 up", |v| {
            v["health"]["active"] == "up"
        })
        .await;
    }

    let targets: Vec<(u64, ProxyClient)> = cluster
        .nodes
        .iter()
        .map(|n| (n.options.node_id.unwrap(), n.proxy_client()))
        .collect();
    let load = Load::start(targets.clone(), "kill.test", "/", 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_stop = k1.requests();
    assert!(before_stop > 0, "k1 served nothing before the kill");

    k1.stop().await;
    let stopped_at = Instant::now();
    // Every node ends up avoiding it (merged view), bounded.
    for n in &cluster.nodes {
        wait_view(n, "k1", Duration::from_secs(10), "k1 not healthy", |v| {
            v["healthy"] == false
        })
        .await;
    }
    let all_see_down = stopped_at.elapsed();
    // Once every node has settled, none of them even tries k1: its attempt counter on every
    // node stays put while traffic flows through every node.
    // (A node that does not probe k1, probers_per_backend = 2 of 3, has it down through
    // both probers' verdicts.)
    for n in &cluster.nodes {
        wait_view(n, "k1", Duration::from_secs(10), "k1 probed down", |v| {
            v["health"]["active"] == "down"
                || (v["health"]["probed_here"] == false && peers_down(v).len() == 2)
        })
        .await;
    }
    let mut attempts = Vec::new();
    for n in &cluster.nodes {
        attempts.push(backend_view(n, "k1").await["requests"].as_u64().unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, n) in cluster.nodes.iter().enumerate() {
        let v = backend_view(n, "k1").await;
        assert_eq!(
            v["requests"].as_u64().unwrap(),
            attempts[i],
            "node {} still sends requests to the dead k1: {v:#}",
            i + 1
        );
    }
    let samples = load.finish().await;
    assert_no_errors(&samples, "GETs while k1 was killed", &all_nodes(&cluster));
    let after = samples
        .iter()
        .filter(|s| s.start > stopped_at && s.backend == "k1")
        .count();
    assert_eq!(after, 0, "no answer can come from a stopped backend");
    eprintln!(
        "killed k1: {} GETs, 0 errors; every node saw it down after {all_see_down:?}",
        samples.len()
    );

    // Recovery: same address, every node uses it again.
    let k1 = Backend::start_on("k1", addr1).await;
    let revived_at = Instant::now();
    for n in &cluster.nodes {
        wait_view(n, "k1", Duration::from_secs(15), "k1 healthy again", |v| {
            v["healthy"] == true
        })
        .await;
    }
    for n in &cluster.nodes {
        let before = k1.requests();
        let client = n.proxy_client();
        let id = n.options.node_id.unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while k1.requests() == before {
            assert!(
                Instant::now() < deadline,
                "node {id} never sent a request to the revived k1 within 10 s: {:?}\n{}",
                got.iter()
                    .map(|s: &Sample| s.backend.clone())
                    .collect::<Vec<_>>(),
                n.logs()
            );
            got.push(one_get(id, &client, "kill.test", "/").await);
        }
        assert_no_errors(&got, "GETs after recovery", &[n]);
        assert!(
            got.iter().any(|s| s.backend == "k1"),
            "node {id}: the revived k1 counted a request but no answer came from it"
        );
    }
    eprintln!(
        "k1 used again by every node {:?} after revival",
        revived_at.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 2 and 4. One node sees a backend failing: everyone avoids it; the verdict dies with the node
// ---------------------------------------------------------------------------------------------

/// 3 nodes; node 2 probes `/health-n2` (its own `[health_check] path`), which `x1` fails and
/// `x2` answers. Pool "a" of `one.test` = x1, x2. Returns when node 2 reports x1 down and nodes
/// 1 and 3 have taken its verdict.
async fn one_observer_cluster() -> (Cluster, Origin, Origin) {
    // Every node probes every backend (probers_per_backend >= 3): node 2 is a prober of x1.
    let cluster = Cluster::start(3, |id| {
        let o = NodeOptions::new().health("probers_per_backend = 3");
        if id == 2 {
            o.health("path = \"/health-n2\"")
        } else {
            o
        }
    })
    .await;
    let x1 = Origin::start("x1", &["/health-n2"]).await;
    let x2 = Origin::start("x2", &[]).await;
    let n1 = cluster.node(1);
    n1.add_backend("x1", &x1.address(), &["a"]).await;
    n1.add_backend("x2", &x2.address(), &["a"]).await;
    n1.add_domain("one.test", "a").await;
    for n in &cluster.nodes {
        wait_serving(n, "one.test").await;
    }
    let v = wait_view(
        cluster.node(2),
        "x1",
        Duration::from_secs(10),
        "node 2 probes x1 down",
        |v| v["health"]["active"] == "down",
    )
    .await;
    assert_eq!(v["healthy"], false, "node 2's own view: {v:#}");
    for id in [1, 3] {
        let v = wait_view(
            cluster.node(id),
            "x1",
            Duration::from_secs(5),
            "node 2's down verdict reaches this node",
            |v| peers_down(v).contains(&2),
        )
        .await;
        assert_eq!(
            v["health"]["active"], "up",
            "node {id} probes /health and sees x1 up itself: {v:#}"
        );
        assert_eq!(v["nodes"]["2"], "down", "node {id}: {v:#}");
        assert_eq!(v["nodes"][id.to_string()], "up", "node {id}: {v:#}");
        assert_eq!(v["healthy"], false, "node {id}: merged view: {v:#}");
        // x2 is fine everywhere.
        let v2 = backend_view(cluster.node(id), "x2").await;
        assert_eq!(v2["healthy"], true, "node {id}: {v2:#}");
    }
    (cluster, x1, x2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_seen_failing_by_one_node_is_avoided_by_the_others() {
    let (cluster, x1, x2) = one_observer_cluster().await;
    let (before1, before2) = (x1.requests(), x2.requests());
    let mut samples = Vec::new();
    for id in [1, 3] {
        samples.extend(burst(cluster.node(id), "one.test", 30).await);
    }
    assert_no_errors(&samples, "GETs through nodes 1 and 3", &all_nodes(&cluster));
    assert_eq!(
        x1.requests(),
        before1,
        "nodes 1 and 3 see x1 up themselves, but node 2 reports it down: they must not send \
         it requests; answers: {:?}",
        samples.iter().map(|s| &s.backend).collect::<Vec<_>>()
    );
    assert_eq!(x2.requests() - before2, 60, "every GET served by x2");
    assert!(samples.iter().all(|s| s.backend == "x2"));
    // The safe switch uses the merged view too: a tag whose only backend a peer reports down
    // is refused on a node that sees it up itself.
    let n1 = cluster.node(1);
    let (status, _) = n1
        .api_put("/api/v1/backends/x1", json!({"tags": ["a", "solo"]}))
        .await;
    assert_eq!(status, 200);
    let (status, body) = n1
        .api_post("/api/v1/domains/one.test/switch", json!({"tag": "solo"}))
        .await;
    assert_eq!(
        status, 409,
        "switch to a pool whose only backend a live peer reports down: {body}"
    );
    assert!(
        mentions_field(body["error"].as_str().unwrap_or_default(), "x1"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_of_a_dead_node_expire() {
    let (mut cluster, x1, _x2) = one_observer_cluster().await;
    let before = x1.requests();
    let mut samples = Vec::new();
    for id in [1, 3] {
        samples.extend(burst(cluster.node(id), "one.test", 10).await);
    }
    assert_eq!(x1.requests(), before, "precondition: x1 avoided");

    cluster.node_mut(2).kill9();
    let killed_at = Instant::now();
    for id in [1, 3] {
        let n = cluster.node(id);
        let client = n.proxy_client();
        let start = x1.requests();
        let deadline = killed_at + Duration::from_secs(15);
        while x1.requests() == start {
            assert!(
                Instant::now() < deadline,
                "node {id} still avoids x1 15 s after the only node reporting it down was \
                 killed; view: {:#}\n{}",
                backend_view(n, "x1").await,
                n.logs()
            );
            samples.push(one_get(id, &client, "one.test", "/").await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "node {id} routes to x1 again {:?} after node 2 was killed",
            killed_at.elapsed()
        );
        let v = backend_view(n, "x1").await;
        assert!(
            !peers_down(&v).contains(&2),
            "a dead node's verdict must be gone: {v:#}"
        );
        assert_eq!(v["healthy"], true, "{v:#}");
    }
    let nodes: Vec<&Node> = [1, 3].iter().map(|id| cluster.node(*id)).collect();
    assert_no_errors(&samples, "GETs through nodes 1 and 3", &nodes);
}

// ---------------------------------------------------------------------------------------------
// 3. Guard rail
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_wrong_observer_cannot_empty_a_pool() {
    // Every node probes (probers_per_backend >= 3): node 2 is the wrong observer of both.
    let cluster = Cluster::start(3, |id| {
        let o = NodeOptions::new().health("probers_per_backend = 3");
        if id == 2 {
            o.health("path = \"/health-n2\"")
        } else {
            o
        }
    })
    .await;
    let y1 = Origin::start("y1", &["/health-n2"]).await;
    let y2 = Origin::start("y2", &["/health-n2"]).await;
    let n1 = cluster.node(1);
    n1.add_backend("y1", &y1.address(), &["a"]).await;
    n1.add_backend("y2", &y2.address(), &["a"]).await;
    n1.add_domain("rail.test", "a").await;
    for n in &cluster.nodes {
        wait_serving(n, "rail.test").await;
    }
    for id in ["y1", "y2"] {
        wait_view(
            cluster.node(2),
            id,
            Duration::from_secs(10),
            "node 2 probes it down",
            |v| v["health"]["active"] == "down",
        )
        .await;
        for n in [1, 3] {
            wait_view(
                cluster.node(n),
                id,
                Duration::from_secs(5),
                "node 2's verdict arrives",
                |v| peers_down(v).contains(&2) && v["health"]["active"] == "up",
            )
            .await;
        }
    }
    let before = (y1.requests(), y2.requests());
    for id in [1, 3] {
        let n = cluster.node(id);
        let samples = burst(n, "rail.test", 20).await;
        assert_no_errors(
            &samples,
            &format!("node {id}: node 2 alone reports the whole pool down"),
            &[n, cluster.node(2)],
        );
        let g = n.metric("pingora_vhost_health_guard_rail_total").await;
        assert!(
            g > 0.0,
            "node {id}: guard rail metric should count the fallback: {g}"
        );
    }
    assert!(
        y1.requests() > before.0 && y2.requests() > before.1,
        "the local view (both up) is used: y1 +{}, y2 +{}",
        y1.requests() - before.0,
        y2.requests() - before.1
    );
    // Node 2 itself sees nothing usable: 503, as documented.
    let r = cluster.node(2).proxy_get("rail.test", "/").await;
    assert_eq!(r.status, 503, "node 2 has no usable backend locally: {r:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Safe switch
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_to_a_dead_tag_is_refused_unless_forced() {
    let a1 = Backend::start("a1").await;
    let mut b1 = Backend::start("b1").await;
    let mut b2 = Backend::start("b2").await;
    let node = Node::start_default().await;
    node.add_backend("a1", &a1.address(), &["a"]).await;
    node.add_backend("b1", &b1.address(), &["b"]).await;
    node.add_backend("b2", &b2.address(), &["b"]).await;
    node.add_domain("sw.test", "a").await;
    node.wait_route("sw.test", "/", "a1").await;
    b1.stop().await;
    b2.stop().await;
    for id in ["b1", "b2"] {
        wait_view(&node, id, Duration::from_secs(10), "down", |v| {
            v["healthy"] == false
        })
        .await;
    }
    let (status, body) = node
        .api_post("/api/v1/domains/sw.test/switch", json!({"tag": "b"}))
        .await;
    assert_eq!(
        status, 409,
        "switch to a tag with every backend down: {body}"
    );
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        mentions_field(msg, "b1") && mentions_field(msg, "b2"),
        "the error names the unhealthy backends: {body}"
    );
    let (_, d) = node.api_get("/api/v1/domains/sw.test").await;
    assert_eq!(
        d["enabled_backends_tag"], "a",
        "a refused switch changes nothing: {d}"
    );
    let r = node.proxy_get("sw.test", "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "a1"));

    let (status, body) = node
        .api_post(
            "/api/v1/domains/sw.test/switch",
            json!({"tag": "b", "force": true}),
        )
        .await;
    assert_eq!(status, 200, "forced switch: {body}");
    assert_eq!(body["enabled_backends_tag"], "b", "{body}");
    assert_eq!(body["previous_tag"], "a", "{body}");
    let r = node.proxy_get("sw.test", "/").await;
    assert_eq!(r.status, 503, "nothing healthy in tag b: {r:?}");
}

// ---------------------------------------------------------------------------------------------
// 6. Drain under load
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_has_no_errors_and_is_undone_everywhere() {
    let cluster = Cluster::start(2, |_| NodeOptions::new()).await;
    let d1 = Backend::start("d1").await;
    let d2 = Backend::start("d2").await;
    let n1 = cluster.node(1);
    let n2 = cluster.node(2);
    // d1 also serves slow.test (tag "s", d1 only): slow requests there are surely on d1.
    n1.add_backend("d1", &d1.address(), &["a", "s"]).await;
    n1.add_backend("d2", &d2.address(), &["a"]).await;
    n1.add_domain("drain.test", "a").await;
    n1.add_domain("slow.test", "s").await;
    for n in &cluster.nodes {
        wait_serving(n, "drain.test").await;
    }
    let targets: Vec<(u64, ProxyClient)> = vec![(1, n1.proxy_client()), (2, n2.proxy_client())];
    let load = Load::start(targets.clone(), "drain.test", "/", 2);

    // Two slow requests in flight on d1 (through node 1), visible in the API.
    let c1 = n1.proxy_client();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let c = c1.clone();
            tokio::spawn(async move { one_get(1, &c, "slow.test", "/slow?ms=2500").await })
        })
        .collect();
    wait_view(
        n1,
        "d1",
        Duration::from_secs(5),
        "2 slow requests in flight",
        |v| v["in_flight"].as_u64().unwrap_or(0) >= 2,
    )
    .await;

    let (status, body) = n1.api_post_empty("/api/v1/backends/d1/drain").await;
    let drained_at = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["draining"], true, "{body}");
    let v = backend_view(n1, "d1").await;
    assert!(
        v["in_flight"].as_u64().unwrap_or(0) >= 1,
        "the slow request still on d1 is visible as in flight after the drain: {v:#}"
    );
    let n2_sees = {
        wait_view(n2, "d1", Duration::from_secs(5), "drain replicated", |v| {
            v["draining"] == true
        })
        .await;
        Instant::now()
    };
    let count_after_drain = d1.requests();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        d1.requests(),
        count_after_drain,
        "d1 got new requests after the drain was applied on both nodes"
    );
    // In-flight ones finish (200) and the count drops to 0.
    let mut slow_samples = Vec::new();
    for t in slow {
        slow_samples.push(t.await.unwrap());
    }
    for s in &slow_samples {
        assert!(
            s.ok() && s.backend == "d1" && s.end > drained_at,
            "a request in flight on d1 when it was drained finishes there: {s:?}"
        );
    }
    wait_view(
        n1,
        "d1",
        Duration::from_secs(5),
        "in_flight back to 0",
        |v| v["in_flight"] == 0,
    )
    .await;

    // Node 1 may apply the undrain before node 2 answers: only requests that ended before the
    // DELETE was sent count as "during the drain".
    let undrain_sent = Instant::now();
    let (status, body) = n2.api_delete("/api/v1/backends/d1/drain").await;
    let undrained_at = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["draining"], false, "{body}");
    for n in &cluster.nodes {
        wait_view(n, "d1", Duration::from_secs(5), "undrain replicated", |v| {
            v["draining"] == false
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut samples = load.finish().await;
    samples.extend(slow_samples);
    assert_no_errors(&samples, "GETs during drain/undrain", &all_nodes(&cluster));
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.backend == "d1"
                && s.end < undrain_sent
                && ((s.node == 1 && s.start > drained_at) || (s.node == 2 && s.start > n2_sees))
        })
        .collect();
    assert!(
        late.is_empty(),
        "requests started after the drain was applied were sent to d1 (times relative to the \
         drain answer on node 1; node 2 saw it at +{:?}): {:#?}",
        n2_sees - drained_at,
        late.iter()
            .map(|s| format!(
                "node {} +{:?}..+{:?}",
                s.node,
                s.start - drained_at,
                s.end - drained_at
            ))
            .collect::<Vec<_>>()
    );
    for id in [1u64, 2] {
        assert!(
            samples
                .iter()
                .any(|s| s.node == id && s.start > undrained_at && s.backend == "d1"),
            "node {id} sends d1 requests again after DELETE …/drain"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. A restarted node starts from its peers' view
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_does_not_send_traffic_to_a_backend_its_peers_know_is_down() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let mut r1 = Backend::start("r1").await;
    let r2 = Backend::start("r2").await;
    let n1 = cluster.node(1);
    n1.add_backend("r1", &r1.address(), &["a"]).await;
    n1.add_backend("r2", &r2.address(), &["a"]).await;
    n1.add_domain("restart.test", "a").await;
    for n in &cluster.nodes {
        wait_serving(n, "restart.test").await;
    }
    r1.stop().await;
    for n in &cluster.nodes {
        wait_view(n, "r1", Duration::from_secs(10), "r1 probed down", |v| {
            (v["health"]["active"] == "down" || v["health"]["probed_here"] == false)
                && v["healthy"] == false
        })
        .await;
    }
    let n3 = cluster.node_mut(3);
    n3.kill9();
    n3.spawn();
    n3.wait_ready().await;
    let ready = Instant::now();
    let n3 = cluster.node(3);
    let client = n3.proxy_client();
    // Traffic right away, and the API view, concurrently.
    let traffic = tokio::spawn({
        let client = client.clone();
        async move {
            let mut out = Vec::new();
            while ready.elapsed() < Duration::from_millis(2000) {
                out.push(one_get(3, &client, "restart.test", "/").await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out
        }
    });
    let mut seen_down = None;
    let mut peers_seen = None;
    let mut last = Value::Null;
    while ready.elapsed() < Duration::from_millis(2000)
        && (seen_down.is_none() || peers_seen.is_none())
    {
        last = backend_view(n3, "r1").await;
        if seen_down.is_none() && last["healthy"] == false {
            seen_down = Some(ready.elapsed());
        }
        if peers_seen.is_none() && !peers_down(&last).is_empty() {
            peers_seen = Some(ready.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let samples = traffic.await.unwrap();
    assert_no_errors(
        &samples,
        "GETs through the restarted node",
        &all_nodes(&cluster),
    );
    let seen_down = seen_down.unwrap_or_else(|| {
        panic!(
            "restarted node 3 still reports r1 healthy 2 s after it was ready: {last:#}\n{}",
            n3.logs()
        )
    });
    let v = backend_view(n3, "r1").await;
    eprintln!(
        "restarted node 3 reported r1 unhealthy {seen_down:?} after ready (peers' verdicts \
         seen after {peers_seen:?}); {} GETs, 0 errors; r1 picked {} time(s) (connect failures \
         {}), breaker {}",
        samples.len(),
        v["requests"],
        v["connect_failures"],
        v["health"]["breaker"]
    );
    assert!(
        seen_down <= Duration::from_millis(1000),
        "restarted node 3 took {seen_down:?} (> 1 s) to report r1 (down on every peer) unhealthy"
    );
    let attempts = v["requests"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        attempts, 0,
        "restarted node 3 sent {attempts} request(s) to r1, which its peers know is down: {v:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Passive breaker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_detects_a_dead_backend_from_real_traffic() {
    let mut p1 = Backend::start("p1").await;
    let p2 = Backend::start("p2").await;
    let node = node_with_interval(3600, NodeOptions::new()).await;
    node.add_backend("p1", &p1.address(), &["a"]).await;
    node.add_backend("p2", &p2.address(), &["a"]).await;
    node.add_domain("brk.test", "a").await;
    node.wait_route("brk.test", "/", "p1").await;
    node.wait_route("brk.test", "/", "p2").await;
    p1.stop().await;
    let base = backend_view(&node, "p1").await;
    assert_eq!(base["health"]["breaker"], "closed", "{base:#}");
    let base_failures = base["connect_failures"].as_u64().unwrap();

    // Round robin: within two GETs one picks p1 first; it must still be answered (by p2).
    let client = node.proxy_client();
    let mut samples = Vec::new();
    let mut opened_by = None;
    for _ in 0..4 {
        let s = one_get(1, &client, "brk.test", "/").await;
        let started = s.start;
        samples.push(s);
        let v = backend_view(&node, "p1").await;
        if v["connect_failures"].as_u64().unwrap() > base_failures {
            opened_by = Some((started, v));
            break;
        }
    }
    assert_no_errors(&samples, "the GETs that met the dead p1", &[&node]);
    let (t_fail, v) = opened_by.expect("no GET ever tried p1 in 4 round-robin picks");
    assert_eq!(
        v["health"]["breaker"], "open",
        "breaker after a failed connect: {v:#}"
    );
    assert_ne!(
        v["health"]["active"], "down",
        "active checks are off (interval 3600 s): the detection is passive: {v:#}"
    );
    assert_eq!(v["healthy"], false, "{v:#}");
    assert!(samples.iter().all(|s| s.backend == "p2"));

    // While open (1 s backoff from the failure), p1 is not tried at all.
    let attempts = v["requests"].as_u64().unwrap();
    let mut during = Vec::new();
    while t_fail.elapsed() < Duration::from_millis(900) {
        during.push(one_get(1, &client, "brk.test", "/").await);
    }
    assert_no_errors(&during, "GETs while the breaker is open", &[&node]);
    let v = backend_view(&node, "p1").await;
    assert_eq!(
        v["requests"].as_u64().unwrap(),
        attempts,
        "p1 was tried while its breaker was open ({} GETs in the window): {v:#}",
        during.len()
    );
    assert!(
        during.len() >= 5,
        "too few GETs in the window: {}",
        during.len()
    );
}

/// Clients that give up on a slow request (close their connection before the answer) are not
/// the backend's fault: they must not open its circuit breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborts_do_not_open_the_backend_breaker() {
    let backend = Backend::start("web-a").await;
    let node = Node::start_default().await;
    node.add_backend("web-a", &backend.address(), &["a"]).await;
    node.add_domain("app.test", "a").await;
    node.wait_route("app.test", "/", "web-a").await;
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(node.http_addr)
            .await
            .unwrap();
        s.write_all(b"GET /slow?ms=1000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s); // the client gives up
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = node.proxy_get("app.test", "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "web-a"),
        "three clients that gave up on a slow request made the healthy backend unusable"
    );
}

// ---------------------------------------------------------------------------------------------
// Gossip cannot be poisoned by a long backend id
// ---------------------------------------------------------------------------------------------

/// A backend id far larger than a gossip packet, down on every node, must not stop the
/// nodes from hearing each other's verdicts about any other backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_with_a_huge_id_does_not_end_health_sharing() {
    // Every node probes every backend, so every node publishes a verdict for each.
    let cluster = Cluster::start(3, |_| NodeOptions::new().health("probers_per_backend = 3")).await;
    let n1 = cluster.node(1);
    // #13: an id over the bound is refused up front, naming the field and the bound...
    let (status, body) = n1
        .api_post(
            "/api/v1/backends",
            json!({"id": "x".repeat(200_000), "address": dead_address(), "tags": ["a"]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(msg.contains("`id`") && msg.contains("63"), "{body}");
    // ...and the longest allowed one does not end health sharing either.
    let huge = "x".repeat(63);
    let (status, body) = n1
        .api_post(
            "/api/v1/backends",
            json!({"id": huge, "address": dead_address(), "tags": ["a"]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Its address refuses connections: every node's probes find it down and publish that
    // first (a key that cannot be sent holds back every later one).
    for node in all_nodes(&cluster) {
        wait_for(
            Duration::from_secs(20),
            "the huge-id backend down",
            || async {
                let (_, list) = node.api_list("/api/v1/backends").await;
                list.as_array()?
                    .iter()
                    .find(|b| b["id"].as_str().map(str::len) == Some(huge.len()))
                    .filter(|b| b["health"]["active"] == "down")
                    .map(|_| ())
            },
        )
        .await;
    }
    n1.add_backend("plain", &dead_address(), &["a"]).await;
    // Down on every node too: each node must hear that from both of its peers.
    for node in all_nodes(&cluster) {
        wait_view(
            node,
            "plain",
            Duration::from_secs(30),
            "both peers reporting `plain` down",
            |v| peers_down(v).len() == 2,
        )
        .await;
    }
}

/// #13: gossip keys have a fixed size, so 10,000 verdicts at once still reach every peer
/// within a few gossip rounds (a node's verdicts go out in version order, MTU by MTU).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_backends_down_at_once_reach_every_peer() {
    const N: usize = 10_000;
    let dead = dead_address();
    let seed: String = (0..N)
        .map(|i| {
            format!("[[backends]]\nid = \"dead-{i:05}\"\naddress = \"{dead}\"\ntags = [\"a\"]\n")
        })
        .collect();
    let cluster = Cluster::start(3, |_| {
        // One probe round finds them all down; later rounds (every 10 s, 10,000 probes each)
        // only keep the verdicts. (Every 5 s, three debug nodes probing 6,000 times a second
        // on a 2-core machine starved their gossip: a peer dropped out of liveness now and
        // then, and its verdicts with it.)
        // Every node probes every backend (probers_per_backend >= 3): 3 verdicts each.
        NodeOptions::new()
            .health_interval(10)
            .health("unhealthy_threshold = 1")
            .health("probers_per_backend = 3")
            .extra(&seed)
    })
    .await;
    let started = Instant::now();
    for node in all_nodes(&cluster) {
        wait_for(
            Duration::from_secs(120),
            "every backend down in every node's own and peers' verdicts",
            || async {
                let (status, list) = node.api_list("/api/v1/backends").await;
                let list = list.as_array().filter(|_| status == 200)?;
                let all_down = list.len() == N
                    && list.iter().all(|b| {
                        b["nodes"]
                            .as_object()
                            .is_some_and(|m| m.len() == 3 && m.values().all(|v| v == "down"))
                    });
                all_down.then_some(())
            },
        )
        .await;
    }
    eprintln!(
        "10,000 verdicts from each of 3 nodes seen everywhere {:?} after start",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Shared probing: each backend is probed by `probers_per_backend` of the live nodes
// ---------------------------------------------------------------------------------------------

/// 3 nodes, default `probers_per_backend` (2), interval 1 s, 6 backends. (a) Each backend is
/// probed by exactly 2 nodes (counted at the backend, by the probes' `User-Agent`): the ones
/// rendezvous hashing names, and the API says so; (b) a backend whose probers see it failing
/// is avoided by all 3 nodes, the one that does not probe it included; (c) killing one of its
/// probers moves its probes to the third node within a few intervals, and the backend stays
/// avoided throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_backend_is_probed_by_k_nodes_and_their_verdicts_hold_everywhere() {
    use pingora_vhost::gossip::backend_hash;
    use pingora_vhost::health::owners::Probers;
    use std::collections::BTreeSet;

    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let mut origins = Vec::new();
    for i in 0..6 {
        origins.push(Origin::start(&format!("s{i}"), &[]).await);
    }
    let n1 = cluster.node(1);
    for (i, o) in origins.iter().enumerate() {
        n1.add_backend(&format!("s{i}"), &o.address(), &["a"]).await;
    }
    n1.add_domain("share.test", "a").await;
    for n in &cluster.nodes {
        wait_serving(n, "share.test").await;
    }
    // A node that saw the others late probed everything for a moment, and keeps probing what
    // it hands over for one more interval: let that pass.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // (a) Over 4 intervals: exactly the 2 probers hashing names, about once a second each.
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ring = Probers::new(vec![1, 2, 3], 2);
    let mut probers_of = Vec::new();
    for (i, o) in origins.iter().enumerate() {
        let id = format!("s{i}");
        let seen = o.probers_since(window);
        let expected: BTreeSet<u64> = ring.of(backend_hash(&id)).into_iter().collect();
        assert_eq!(
            seen.keys().copied().collect::<BTreeSet<u64>>(),
            expected,
            "{id}: probes per node in 4 s: {seen:?} (at {:?})\n{}",
            o.probes
                .lock()
                .unwrap()
                .iter()
                .map(|(at, n)| (n, at.checked_duration_since(window)))
                .collect::<Vec<_>>(),
            cluster
                .nodes
                .iter()
                .map(|n| n.logs())
                .collect::<Vec<_>>()
                .join("\n")
        );
        for (node, count) in &seen {
            assert!(
                (2..=6).contains(count),
                "{id}: node {node} probed it {count} times in 4 s at an interval of 1 s"
            );
        }
        for n in &cluster.nodes {
            let node = n.options.node_id.unwrap();
            let v = backend_view(n, &id).await;
            assert_eq!(
                v["health"]["probed_here"],
                expected.contains(&node),
                "node {node}, {id}: {v:#}"
            );
        }
        probers_of.push(expected);
    }
    eprintln!("probers per backend: {probers_of:?}");

    // (b) s0's health fails; it keeps answering traffic. Every node avoids it.
    let probers: Vec<u64> = probers_of[0].iter().copied().collect();
    let outsider = (1..=3).find(|n| !probers_of[0].contains(n)).unwrap();
    origins[0].fail_health();
    for n in &cluster.nodes {
        wait_view(n, "s0", Duration::from_secs(10), "s0 unhealthy", |v| {
            v["healthy"] == false
        })
        .await;
    }
    // Each prober reaches its own verdict (3 failures) at its own pace: wait for both.
    let v = wait_view(
        cluster.node(outsider),
        "s0",
        Duration::from_secs(5),
        "both probers report s0 down",
        |v| peers_down(v) == probers,
    )
    .await;
    assert_eq!(v["health"]["probed_here"], false, "{v:#}");
    assert_eq!(v["health"]["active"], "unknown", "never probed here: {v:#}");
    let before = origins[0].requests();
    let mut samples = Vec::new();
    for n in &cluster.nodes {
        samples.extend(burst(n, "share.test", 20).await);
    }
    assert_no_errors(&samples, "GETs with s0 failing", &all_nodes(&cluster));
    assert_eq!(
        origins[0].requests(),
        before,
        "s0 got requests although its probers report it down (node {outsider} does not probe \
         it); answers: {:?}",
        samples.iter().map(|s| &s.backend).collect::<Vec<_>>()
    );

    // (c) Kill one of s0's probers: the outsider takes the probes over, and s0 stays avoided.
    let victim = probers[1];
    let survivors: BTreeSet<u64> = (1..=3).filter(|n| *n != victim).collect();
    cluster.node_mut(victim).kill9();
    let killed_at = Instant::now();
    let n_out = cluster.node(outsider);
    let took_over = loop {
        let v = backend_view(n_out, "s0").await;
        assert_eq!(
            v["healthy"],
            false,
            "s0 looked healthy on node {outsider} {:?} after prober {victim} was killed: {v:#}",
            killed_at.elapsed()
        );
        if origins[0].probers_since(killed_at).contains_key(&outsider) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "node {outsider} did not take over s0's probes within 20 s of node {victim}'s \
             death: {v:#}\n{}",
            n_out.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v = backend_view(n_out, "s0").await;
    assert_eq!(v["health"]["probed_here"], true, "{v:#}");
    assert_eq!(v["healthy"], false, "{v:#}");
    eprintln!("node {outsider} probed s0 {took_over:?} after prober {victim} was killed");
    // Settled: with 2 nodes left and k = 2 both probe every backend; nobody probes twice.
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, o) in origins.iter().enumerate() {
        let seen = o.probers_since(window);
        assert_eq!(
            seen.keys().copied().collect::<BTreeSet<u64>>(),
            survivors,
            "s{i} after node {victim} died: {seen:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Passive ejection
// ---------------------------------------------------------------------------------------------

/// `GET /api/v1/backends/<id>` on `node`: its `health.ejection` (null when none).
async fn ejection_on(node: &Node, id: &str) -> Value {
    let (_, v) = node.api_get(&format!("/api/v1/backends/{id}")).await;
    v["health"]["ejection"].clone()
}

/// A backend that answers real traffic with 500 but passes its `/health` probe is ejected by
/// the node that saw the 5xx, and every node keeps it out for the whole ejection time although
/// probes pass every second (before, a passing probe closed the breaker within a second and the
/// backend flapped in and out). A repeat ejection lasts twice as long. The API shows why, since
/// when and until when, on the ejecting node and, as a peer report, on the others. A pool of
/// one is never emptied by passive verdicts (the cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_real_traffic_but_passing_probes_stays_ejected_on_every_node() {
    const EJECTION_SECS: u64 = 4;
    let bad = Origin::start("bad", &[]).await;
    let good = Origin::start("good", &[]).await;
    let alone = Origin::start("alone", &[]).await;
    let cluster = Cluster::start(3, |_| {
        NodeOptions::new().health_interval(1).health(&format!(
            "passive_ejection_secs = {EJECTION_SECS}\npassive_ejection_max_secs = 60"
        ))
    })
    .await;
    let n1 = cluster.node(1);
    n1.add_backend("bad", &bad.address(), &["pool"]).await;
    n1.add_backend("good", &good.address(), &["pool"]).await;
    n1.add_backend("alone", &alone.address(), &["solo"]).await;
    n1.add_domain("eject.test", "pool").await;
    n1.add_domain("solo.test", "solo").await;
    for n in &cluster.nodes {
        n.wait_route("solo.test", "/", "alone").await;
        wait_for(
            Duration::from_secs(20),
            "both pool backends serve",
            || async {
                let mut seen = HashSet::new();
                for _ in 0..6 {
                    if let Ok(r) = n.proxy_client().get("eject.test", "/").await {
                        seen.insert(r.body);
                    }
                }
                (seen.len() == 2).then_some(())
            },
        )
        .await;
    }

    // Node 1 sees the 500s: three in a row from "bad" eject it.
    bad.break_traffic(true);
    let c1 = n1.proxy_client();
    let ejected_at = Instant::now();
    wait_for(Duration::from_secs(10), "node 1 ejects bad", || async {
        let _ = c1.get("eject.test", "/").await;
        let e = ejection_on(n1, "bad").await;
        (!e.is_null()).then_some(e)
    })
    .await;
    let e = ejection_on(n1, "bad").await;
    let (since, until) = (
        e["since_unix_ms"].as_u64().expect("since"),
        e["until_unix_ms"].as_u64().expect("until"),
    );
    assert_eq!(
        until - since,
        EJECTION_SECS * 1000,
        "the first ejection lasts the base time: {e:#}"
    );
    assert_eq!(e["ejections_in_a_row"], 1, "{e:#}");
    assert!(
        e["reason"].as_str().is_some_and(|r| r.contains("5xx")),
        "{e:#}"
    );
    // Every node learns it through gossip, with the same deadline.
    for id in [2u64, 3] {
        let n = cluster.node(id);
        let e = wait_for(
            Duration::from_secs(5),
            "a peer reports the ejection",
            || async {
                let e = ejection_on(n, "bad").await;
                (!e.is_null()).then_some(e)
            },
        )
        .await;
        assert_eq!(
            e["reported_by_peers"],
            json!([{"node_id": 1, "until_unix_ms": until}]),
            "node {id}: {e:#}"
        );
        assert_eq!(e["until_unix_ms"], until, "node {id}: {e:#}");
    }

    // For the rest of the ejection (probes pass every second meanwhile), no node sends "bad"
    // a single request: every answer comes from "good".
    let before = bad.requests();
    let mut answers = 0;
    while ejected_at.elapsed() < Duration::from_millis(EJECTION_SECS * 1000 - 700) {
        for n in &cluster.nodes {
            let r = n.proxy_client().get("eject.test", "/").await.expect("GET");
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "good"),
                "node {:?}",
                n.options.node_id
            );
            answers += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        bad.requests(),
        before,
        "an ejected backend got traffic while its probes passed ({answers} requests sent)"
    );
    let mut probed = Vec::new();
    for n in &cluster.nodes {
        let (_, b) = n.api_get("/api/v1/backends/bad").await;
        probed.push(b["health"]["active"].as_str().unwrap_or("").to_string());
    }
    assert!(
        probed.iter().any(|a| a == "up") && !probed.iter().any(|a| a == "down"),
        "its probers see it up all along (the nodes' active views: {probed:?})"
    );

    // Past the deadline it is back in rotation; still broken, it is ejected again, for twice
    // as long.
    let again = wait_for(Duration::from_secs(15), "the repeat ejection", || async {
        let _ = c1.get("eject.test", "/").await;
        let e = ejection_on(n1, "bad").await;
        (e["ejections_in_a_row"] == 2).then_some(e)
    })
    .await;
    let span = again["until_unix_ms"].as_u64().unwrap() - again["since_unix_ms"].as_u64().unwrap();
    assert_eq!(
        span,
        2 * EJECTION_SECS * 1000,
        "the repeat doubles: {again:#}"
    );
    assert!(
        bad.requests() > before,
        "it was tried again once its ejection ended"
    );
    // The dashboard says so, with the ejection's end (rendered by headless Chromium).
    let url = format!("http://{}/dashboard#token={TOKEN}", n1.api_addr);
    let dom = tokio::task::spawn_blocking(move || crate::dashboard::rendered_dom(&url))
        .await
        .expect("chromium");
    let bad_row = crate::dashboard::row(&dom, "backends", "bad").expect("a row for bad");
    assert!(
        bad_row.contains("ejected until"),
        "the dashboard shows the ejection: {bad_row}"
    );

    // A pool of one: 50 % of one backend is none, so 500s pass through rather than a pool
    // emptied by passive verdicts.
    alone.break_traffic(true);
    for _ in 0..10 {
        let r = c1.get("solo.test", "/").await.expect("GET");
        assert_eq!(r.status, 500, "the lone backend's own answer");
    }
    // Its ejection is waived by the cap (50 % of one backend is none) within a health tick.
    wait_for(
        Duration::from_secs(3),
        "the cap waives the lone backend's ejection",
        || async {
            let e = ejection_on(n1, "alone").await;
            (e.is_null() || e["waived_by_pool_cap"] == true).then_some(())
        },
    )
    .await;
}
