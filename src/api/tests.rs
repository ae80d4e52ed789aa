//! The router in-process: a real one-node cluster (Raft on a redb store in a temp dir, gossip
//! on a loopback port) behind `api::router`, called with `tower::ServiceExt::oneshot`. No
//! binary, no listener; the JSON shapes are checked against docs/api.md.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{router, ApiState};
use crate::cluster::{store, ClusterNode};
use crate::config::{ClusterConfig, HealthCheckConfig};
use crate::gossip::Gossip;
use crate::observability::log_stream::LogStream;
use crate::observability::Metrics;
use crate::proxy::tls::{self, CertStore};
use crate::proxy::DataPlane;

/// One running node and its API.
struct TestNode {
    app: Router,
    state: ApiState,
    _dir: tempfile::TempDir,
}

/// A free loopback UDP port for gossip (released just before chitchat binds it).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// Wires a one-node cluster as the control plane does (control.rs), minus the listeners and
/// background tasks (probes, resolver, membership, ACME): the API needs none of them.
async fn start(token: Option<&str>) -> TestNode {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = ClusterConfig::default();
    cluster.data_dir = dir.path().to_path_buf();
    cluster.gossip_addr = ([127, 0, 0, 1], free_udp_port()).into();
    let (chain, key) = tls::self_signed(&["localhost"]).expect("self-signed certificate");
    let certs = CertStore::new(tls::certified_key(&chain, &key).expect("certified key"));
    let data = Arc::new(DataPlane::new(certs));
    let publisher: store::Publisher = {
        let data = data.clone();
        Arc::new(move |state, changes| data.publish(state, changes))
    };
    let (log, sm) = store::open(&cluster.data_dir, publisher).expect("open store");
    let keys = Arc::new(crate::keyring::Keyring::new(
        None,
        None,
        &cluster.cluster_id,
    ));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let gossip = Arc::new(
        Gossip::start(&cluster, keys.clone(), metrics.clone())
            .await
            .expect("gossip"),
    );
    let tls = Arc::new(
        crate::cluster::tls::ClusterTls::load(
            cluster.rpc_tls,
            cluster.node_id,
            crate::cluster::tls::Source::Derived {
                seeds: keys.ca_seeds(),
            },
        )
        .expect("cluster TLS"),
    );
    let node = ClusterNode::start(&cluster, log, sm, gossip, keys, tls)
        .await
        .expect("raft");
    assert_eq!(
        node.wait_for_leader(Duration::from_secs(10)).await,
        Some(1),
        "a lone node elects itself"
    );
    let state = ApiState::new(
        node,
        data,
        metrics,
        Arc::new(LogStream::default()),
        token.map(str::to_string),
        HealthCheckConfig::default(),
    );
    TestNode {
        app: router(state.clone()),
        state,
        _dir: dir,
    }
}

impl TestNode {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.send(Request::builder().method(method).uri(path), body)
            .await
    }

    /// Sends a request; the answer's body as JSON (`Null` when empty).
    async fn send(
        &self,
        req: axum::http::request::Builder,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(
                resp.headers()["content-type"],
                "application/json",
                "errors are JSON"
            );
        }
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        };
        (status, value)
    }
}

/// The object's keys, sorted.
fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

/// An error answer: `{"error": <message>}` and nothing else.
fn error_message(v: &Value) -> &str {
    assert_eq!(keys(v), ["error"], "{v}");
    v["error"].as_str().expect("error is a string")
}

const BACKEND_KEYS: [&str; 16] = [
    "address",
    "connect_failures",
    "draining",
    "health",
    "health_check_path",
    "healthy",
    "id",
    "in_flight",
    "nodes",
    "requests",
    "resolve_error",
    "resolved_addrs",
    "resolved_unix_ms",
    "send_proxy_protocol",
    "tags",
    "tls",
];

const DOMAIN_KEYS: [&str; 7] = [
    "access_log",
    "access_log_query",
    "certificate",
    "domain",
    "enabled_backends_tag",
    "http_to_https",
    "tls",
];

/// A backend as docs/api.md shows it, for one with an IP literal address on a node whose
/// probes have not run.
fn assert_backend(b: &Value, id: &str, address: &str, tags: Value, path: Value, draining: bool) {
    assert_eq!(keys(b), BACKEND_KEYS, "{b}");
    assert_eq!(b["id"], id);
    assert_eq!(b["address"], address);
    assert_eq!(b["tags"], tags);
    assert_eq!(b["health_check_path"], path);
    assert_eq!(b["healthy"], true);
    assert_eq!(b["draining"], draining);
    assert_eq!(b["in_flight"], 0);
    assert_eq!(b["requests"], 0);
    assert_eq!(b["connect_failures"], 0);
    // A literal resolves to itself, at no time, with no error.
    assert_eq!(b["resolved_addrs"], json!([address]));
    assert_eq!(b["resolved_unix_ms"], Value::Null);
    assert_eq!(b["resolve_error"], Value::Null);
    assert_eq!(b["health"]["active"], "unknown");
    assert_eq!(b["health"]["breaker"], "closed");
    assert_eq!(b["health"]["peers_reporting_down"], json!([]));
    assert_eq!(b["health"]["last_check_unix_ms"], Value::Null);
    assert_eq!(b["nodes"], json!({"1": "up"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_create_list_get_update_drain_delete() {
    let n = start(None).await;
    let (status, b) = n
        .call(
            "POST",
            "/api/v1/backends",
            Some(json!({"id": "web-1", "address": "127.0.0.1:3001", "tags": ["a"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    assert_backend(
        &b,
        "web-1",
        "127.0.0.1:3001",
        json!(["a"]),
        Value::Null,
        false,
    );

    let (status, list) = n.call("GET", "/api/v1/backends", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    assert_backend(
        &list["items"][0],
        "web-1",
        "127.0.0.1:3001",
        json!(["a"]),
        Value::Null,
        false,
    );

    let (status, b) = n.call("GET", "/api/v1/backends/web-1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_backend(
        &b,
        "web-1",
        "127.0.0.1:3001",
        json!(["a"]),
        Value::Null,
        false,
    );

    let (status, b) = n
        .call(
            "PUT",
            "/api/v1/backends/web-1",
            Some(json!({"address": "127.0.0.1:3002", "tags": ["b", "c"], "health_check_path": "/hz"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_backend(
        &b,
        "web-1",
        "127.0.0.1:3002",
        json!(["b", "c"]),
        json!("/hz"),
        false,
    );

    // `null` clears; status fields echoed back from a GET are ignored.
    let mut echoed = b.clone();
    echoed["health_check_path"] = Value::Null;
    for read_only in ["health", "nodes"] {
        echoed.as_object_mut().map(|o| o.remove(read_only));
    }
    let (status, b) = n.call("PUT", "/api/v1/backends/web-1", Some(echoed)).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_backend(
        &b,
        "web-1",
        "127.0.0.1:3002",
        json!(["b", "c"]),
        Value::Null,
        false,
    );

    let (status, b) = n.call("POST", "/api/v1/backends/web-1/drain", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_backend(
        &b,
        "web-1",
        "127.0.0.1:3002",
        json!(["b", "c"]),
        Value::Null,
        true,
    );
    let (status, b) = n.call("DELETE", "/api/v1/backends/web-1/drain", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b["draining"], false);

    let (status, body) = n.call("DELETE", "/api/v1/backends/web-1", None).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, body) = n.call("GET", "/api/v1/backends/web-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_message(&body), "backend \"web-1\" not found");
    let (_, list) = n.call("GET", "/api/v1/backends", None).await;
    assert_eq!(list, json!({"items": [], "total": 0, "next_cursor": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_create_list_get_update_delete() {
    let n = start(None).await;
    let (status, d) = n
        .call(
            "POST",
            "/api/v1/domains",
            Some(json!({"domain": "Example.COM", "enabled_backends_tag": "a"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{d}");
    let expected = json!({"domain": "example.com", "enabled_backends_tag": "a",
        "http_to_https": false, "tls": "none", "certificate": null,
        "access_log": true, "access_log_query": true});
    assert_eq!(d, expected);
    assert_eq!(keys(&d), DOMAIN_KEYS);

    let (status, list) = n.call("GET", "/api/v1/domains", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!({"items": [expected], "total": 1, "next_cursor": null})
    );
    let (status, d) = n.call("GET", "/api/v1/domains/example.com", None).await;
    assert_eq!((status, &d), (StatusCode::OK, &expected));

    // A manual certificate: its expiry and names are shown, never the key.
    let (chain, key) = tls::self_signed(&["example.com"]).expect("certificate");
    let (status, d) = n
        .call(
            "PUT",
            "/api/v1/domains/example.com",
            Some(
                json!({"http_to_https": true, "tls": "manual", "cert_pem": chain, "key_pem": key}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(keys(&d), DOMAIN_KEYS);
    assert_eq!(d["http_to_https"], true);
    assert_eq!(d["tls"], "manual");
    assert_eq!(keys(&d["certificate"]), ["names", "not_after"]);
    assert_eq!(d["certificate"]["names"], json!(["example.com"]));
    let not_after = d["certificate"]["not_after"].as_str().expect("a string");
    assert!(
        not_after.len() == 20 && not_after.ends_with('Z'),
        "RFC 3339 UTC: {not_after}"
    );

    let (status, c) = n.call("GET", "/api/v1/certs/example.com", None).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(keys(&c), ["acme", "certificate", "domain", "tls"]);
    assert_eq!(c["acme"], Value::Null);
    assert_eq!(
        keys(&c["certificate"]),
        [
            "days_left",
            "expiring_soon",
            "issuer",
            "names",
            "not_after",
            "serial"
        ]
    );
    assert!(c["certificate"]["days_left"].is_i64(), "{c}");
    assert_eq!(c["certificate"]["expiring_soon"], false);
    assert_eq!(c["certificate"]["not_after"], not_after);
    let (status, body) = n
        .call("POST", "/api/v1/certs/example.com/renew", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        error_message(&body).contains("has tls = \"manual\""),
        "{body}"
    );

    let (status, body) = n.call("DELETE", "/api/v1/domains/example.com", None).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, body) = n.call("GET", "/api/v1/domains/example.com", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_message(&body), "domain \"example.com\" not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_cert_and_renewal_shapes() {
    let n = start(None).await;
    let (status, _) = n
        .call(
            "POST",
            "/api/v1/domains",
            Some(json!({"domain": "shop.test", "enabled_backends_tag": "a", "tls": "acme"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, list) = n.call("GET", "/api/v1/certs", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!({"items": [{"domain": "shop.test", "tls": "acme", "certificate": null,
            "acme": {"order_in_flight": null, "last_attempt": null, "last_success": null,
                     "last_error": null, "consecutive_failures": 0, "renew_requested": false}}],
            "total": 1, "next_cursor": null})
    );
    let (status, body) = n.call("POST", "/api/v1/certs/shop.test/renew", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        body,
        json!({"domain": "shop.test", "renew_requested": true})
    );
    let (_, c) = n.call("GET", "/api/v1/certs/shop.test", None).await;
    assert_eq!(c["acme"]["renew_requested"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_field_is_a_400_naming_it() {
    let n = start(None).await;
    let (status, body) = n
        .call(
            "POST",
            "/api/v1/backends",
            Some(json!({"id": "web-1", "address": "no port here"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_message(&body).starts_with("field `address`: "),
        "{body}"
    );

    let (status, body) = n
        .call(
            "POST",
            "/api/v1/domains",
            Some(json!({"domain": "a.test", "enabled_backends_tag": "a", "http_to_https": "yes"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_message(&body),
        "field `http_to_https`: expected true or false, got a string"
    );

    let (status, body) = n
        .call(
            "POST",
            "/api/v1/domains",
            Some(json!({"domain": "a.test", "enabled_backends_tag": "a", "colour": "red"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_message(&body).starts_with("field `colour` is not known here"),
        "{body}"
    );

    // What the framework refuses itself comes in the same format.
    let (status, body) = n.call("PATCH", "/api/v1/domains", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        error_message(&body),
        "this endpoint does not take that method"
    );
    let (status, body) = n.call("GET", "/api/v1/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_message(&body), "no such API endpoint");
    // Nothing was written.
    let (_, list) = n.call("GET", "/api/v1/domains", None).await;
    assert_eq!(list, json!({"items": [], "total": 0, "next_cursor": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_answers_the_domain_with_previous_tag() {
    let n = start(None).await;
    for (id, port, tag) in [("web-a", 3001, "a"), ("web-b", 3002, "b")] {
        let (status, _) = n
            .call(
                "POST",
                "/api/v1/backends",
                Some(json!({"id": id, "address": format!("127.0.0.1:{port}"), "tags": [tag]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, _) = n
        .call(
            "POST",
            "/api/v1/domains",
            Some(json!({"domain": "ab.test", "enabled_backends_tag": "a"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // Refused switches say which backends are at fault, beside "error".
    let (status, body) = n
        .call(
            "POST",
            "/api/v1/domains/ab.test/switch",
            Some(json!({"tag": "c"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(keys(&body), ["error", "unhealthy_backends"], "{body}");
    assert_eq!(body["unhealthy_backends"], json!([]));
    let (status, _) = n.call("POST", "/api/v1/backends/web-b/drain", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = n.call("POST", "/api/v1/domains/ab.test/switch", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["unhealthy_backends"], json!(["web-b (draining)"]));
    let (status, _) = n.call("DELETE", "/api/v1/backends/web-b/drain", None).await;
    assert_eq!(status, StatusCode::OK);

    // No tag toggles a -> b.
    let (status, body) = n.call("POST", "/api/v1/domains/ab.test/switch", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"domain": "ab.test", "enabled_backends_tag": "b", "http_to_https": false,
            "tls": "none", "certificate": null, "previous_tag": "a",
            "access_log": true, "access_log_query": true})
    );
    let (_, active) = n
        .call("GET", "/api/v1/domains/ab.test/backends", None)
        .await;
    assert_eq!(
        active["items"].as_array().map(Vec::len),
        Some(1),
        "{active}"
    );
    assert_eq!(active["total"], 1, "{active}");
    assert_backend(
        &active["items"][0],
        "web-b",
        "127.0.0.1:3002",
        json!(["b"]),
        Value::Null,
        false,
    );

    // force switches to a tag no backend carries.
    let (status, body) = n
        .call(
            "POST",
            "/api/v1/domains/ab.test/switch",
            Some(json!({"tag": "c", "force": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enabled_backends_tag"], "c");
    assert_eq!(body["previous_tag"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_replays_the_answer_and_refuses_another_request() {
    let n = start(None).await;
    let create = |body: Value| {
        Request::builder()
            .method("POST")
            .uri("/api/v1/backends")
            .header("idempotency-key", "k-1")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request")
    };
    let body = json!({"id": "web-1", "address": "127.0.0.1:3001"});
    let first = n.app.clone().oneshot(create(body.clone())).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    // The replay is rendered by the same code from the recorded result.
    let (status, replayed) = n
        .send(
            Request::builder()
                .method("POST")
                .uri("/api/v1/backends")
                .header("idempotency-key", "k-1"),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{replayed}");
    assert_backend(
        &replayed,
        "web-1",
        "127.0.0.1:3001",
        json!([]),
        Value::Null,
        false,
    );

    let (status, refused) = n
        .send(
            Request::builder()
                .method("POST")
                .uri("/api/v1/backends")
                .header("idempotency-key", "k-1"),
            Some(json!({"id": "web-2", "address": "127.0.0.1:3001"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(keys(&refused), ["error", "outcome"], "{refused}");
    assert_eq!(refused["outcome"], "not_applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_health_status_and_stats_shapes() {
    let n = start(Some("s3cret")).await;
    // Only health is open without the token.
    let (status, h) = n.call("GET", "/api/v1/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys(&h), ["last_applied", "leader_id", "node_id", "status"]);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["node_id"], 1);
    assert_eq!(h["leader_id"], 1);
    assert!(h["last_applied"].is_u64());
    let (status, body) = n.call("GET", "/api/v1/cluster/status", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_message(&body), "missing or invalid bearer token");

    let authed = |path: &str| {
        Request::builder()
            .method("GET")
            .uri(path)
            .header("authorization", "Bearer s3cret")
    };
    let (status, s) = n.send(authed("/api/v1/cluster/status"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        keys(&s),
        [
            "last_applied",
            "leader_id",
            "members",
            "node_id",
            "quorum",
            "state",
            "term"
        ]
    );
    assert_eq!(s["state"], "Leader");
    assert!(s["quorum"].is_boolean());
    assert_eq!(s["leader_id"], 1);
    assert!(s["term"].is_u64());
    let member = &s["members"][0];
    assert_eq!(keys(member), ["alive", "node_id", "rpc_addr", "voter"]);
    assert_eq!(member["node_id"], 1);
    assert_eq!(member["rpc_addr"], n.state.node.rpc_addr);
    assert_eq!(member["voter"], true);
    assert!(member["alive"].is_boolean());

    let (status, st) = n.send(authed("/api/v1/stats"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        keys(&st),
        [
            "rates",
            "requests_by_code",
            "requests_in_flight",
            "requests_total",
            "responses_5xx",
            "routes",
            "uptime_secs"
        ]
    );
    assert_eq!(
        keys(&st["rates"]),
        ["requests_per_sec", "responses_5xx_per_sec", "window_secs"]
    );
    assert_eq!(st["requests_by_code"], json!({}));
    assert_eq!(st["requests_in_flight"], 0);
    assert_eq!(st["routes"], 0);
}

/// The write answers' `outcome`, from the one place that maps a `WriteError`.
#[test]
fn write_errors_carry_their_outcome() {
    use crate::cluster::WriteError;
    let body = |e: WriteError| {
        let err = super::ApiError::from(e);
        let v = serde_json::to_value(err.body()).expect("serializes");
        (err.status, v)
    };
    let (status, v) = body(WriteError::NotApplied("no leader".into()));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        v,
        json!({"error": "cannot write: no leader", "outcome": "not_applied"})
    );
    let (status, v) = body(WriteError::OutcomeUnknown("leader gone".into()));
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(keys(&v), ["error", "outcome"]);
    assert_eq!(v["outcome"], "unknown");
}

#[test]
fn rfc3339() {
    assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(super::rfc3339(1_924_991_999), "2030-12-31T23:59:59Z");
    assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
}

/// Writes `cmds` through Raft, each expected to apply.
async fn write_all(n: &TestNode, cmds: Vec<crate::state::Command>) {
    for cmd in cmds {
        n.state
            .node
            .write(cmd)
            .await
            .expect("written")
            .expect("applied");
    }
}

/// Follows `next_cursor` from `first` (a list path with its query) to the last page; returns
/// every page.
async fn all_pages(n: &TestNode, first: &str) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut path = first.to_string();
    loop {
        let (status, page) = n.call("GET", &path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        assert_eq!(keys(&page), ["items", "next_cursor", "total"], "{page}");
        let next = page["next_cursor"].as_str().map(str::to_string);
        pages.push(page);
        let Some(cursor) = next else { return pages };
        let sep = if first.contains('?') { '&' } else { '?' };
        path = format!("{first}{sep}cursor={cursor}");
        assert!(pages.len() < 50, "paging must end");
    }
}

fn ids(pages: &[Value], key: &str) -> Vec<String> {
    pages
        .iter()
        .flat_map(|p| p["items"].as_array().cloned().unwrap_or_default())
        .map(|i| i[key].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_and_filter() {
    use crate::state::fixtures::{backend, domain};
    use crate::state::Command;
    let n = start(None).await;
    let mut cmds = Vec::new();
    for i in 0..7 {
        cmds.push(Command::CreateDomain(domain(&format!("shop{i}.test"), "a")));
    }
    cmds.push(Command::CreateDomain(domain("blog.test", "b")));
    cmds.push(Command::CreateDomain(domain("*.wild.test", "none")));
    cmds.push(Command::CreateBackend(backend("web-a1", &["a"])));
    cmds.push(Command::CreateBackend(backend("web-a2", &["a"])));
    cmds.push(Command::CreateBackend(backend("web-b1", &["b"])));
    write_all(&n, cmds).await;

    // Pages of 3 cover every domain once, in name order, each page reporting the total.
    let pages = all_pages(&n, "/api/v1/domains?limit=3").await;
    assert_eq!(pages.len(), 3);
    assert!(pages.iter().all(|p| p["total"] == 9));
    let mut want: Vec<String> = (0..7).map(|i| format!("shop{i}.test")).collect();
    want.extend(["*.wild.test".to_string(), "blog.test".to_string()]);
    want.sort();
    assert_eq!(ids(&pages, "domain"), want);
    // Without a limit: one page of up to 100.
    let (_, page) = n.call("GET", "/api/v1/domains", None).await;
    assert_eq!(
        (page["total"].clone(), page["next_cursor"].clone()),
        (json!(9), Value::Null)
    );

    // `q`: a prefix of the name, case-insensitive for domains; with paging.
    let pages = all_pages(&n, "/api/v1/domains?q=SHOP&limit=4").await;
    assert_eq!(ids(&pages, "domain"), want[2..].to_vec());
    assert!(pages.iter().all(|p| p["total"] == 7), "{pages:?}");
    // `tag`.
    let pages = all_pages(&n, "/api/v1/domains?tag=b").await;
    assert_eq!(ids(&pages, "domain"), ["blog.test"]);

    // `healthy=false`: web-b1 is reported down; blog.test (tag b) has no backend left to
    // pick, and *.wild.test's tag has none at all.
    let t1 = crate::live::health::Thresholds {
        unhealthy: 1,
        healthy: 1,
    };
    n.state
        .data
        .live
        .backends
        .ensure("web-b1")
        .health
        .record_probe(false, "down".into(), t1);
    let pages = all_pages(&n, "/api/v1/backends?healthy=false").await;
    assert_eq!(ids(&pages, "id"), ["web-b1"]);
    assert_eq!(pages[0]["items"][0]["healthy"], false);
    let pages = all_pages(&n, "/api/v1/backends?healthy=true&limit=1").await;
    assert_eq!(ids(&pages, "id"), ["web-a1", "web-a2"]);
    let pages = all_pages(&n, "/api/v1/domains?healthy=false").await;
    assert_eq!(ids(&pages, "domain"), ["*.wild.test", "blog.test"]);
    let pages = all_pages(&n, "/api/v1/domains?healthy=true&q=shop6").await;
    assert_eq!(ids(&pages, "domain"), ["shop6.test"]);
    // Backends: `tag` and `q` (ids keep their case).
    let pages = all_pages(&n, "/api/v1/backends?tag=a&q=web-a").await;
    assert_eq!(ids(&pages, "id"), ["web-a1", "web-a2"]);
    let pages = all_pages(&n, "/api/v1/backends?q=WEB").await;
    assert_eq!(ids(&pages, "id"), Vec::<String>::new());
    // A domain's active pool, paged.
    let pages = all_pages(&n, "/api/v1/domains/shop1.test/backends?limit=1").await;
    assert_eq!(ids(&pages, "id"), ["web-a1", "web-a2"]);
    assert!(pages.iter().all(|p| p["total"] == 2));

    // Bad parameters: 400 naming the parameter.
    let domains_cursor = pages_cursor(&n, "/api/v1/domains?limit=1").await;
    for (path, param) in [
        ("/api/v1/domains?limit=0", "limit"),
        ("/api/v1/domains?limit=1001", "limit"),
        ("/api/v1/backends?limit=x", "limit"),
        ("/api/v1/domains?cursor=nothex", "cursor"),
        (
            &format!("/api/v1/backends?cursor={domains_cursor}"),
            "cursor",
        ),
        ("/api/v1/domains?tag=a%20b", "tag"),
        ("/api/v1/backends?healthy=maybe", "healthy"),
        ("/api/v1/certs?healthy=false", "healthy"),
        ("/api/v1/domains?page=2", "page"),
        ("/api/v1/domains?limit=1&limit=2", "limit"),
    ] {
        let (status, body) = n.call("GET", path, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(
            error_message(&body).starts_with(&format!("query parameter `{param}`: ")),
            "{path}: {body}"
        );
    }
}

/// The `next_cursor` of the first page of `path`.
async fn pages_cursor(n: &TestNode, path: &str) -> String {
    let (_, page) = n.call("GET", path, None).await;
    page["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("a next page: {page}"))
        .to_string()
}

/// Each list page's time at 100,000 domains and 100,000 backends, through the router (prints;
/// asserts no timing): `cargo test --lib list_pages_at_scale -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "seeds 100k+100k and prints timings; run by hand"]
async fn list_pages_at_scale() {
    use crate::state::fixtures::{backend, domain};
    let n = start(None).await;
    let count = 100_000;
    let domains = (0..count)
        .map(|i| domain(&format!("h{i}.bench"), &format!("t{i}")))
        .collect();
    let backends = (0..count)
        .map(|i| backend(&format!("b{i}"), &[&format!("t{i}")]))
        .collect();
    let t = std::time::Instant::now();
    write_all(
        &n,
        crate::state::seed_parts(1, domains, backends, 256 * 1024),
    )
    .await;
    println!("seeded {count}+{count} in {:?}", t.elapsed());
    let cursor = pages_cursor(&n, "/api/v1/domains?limit=100&q=h5").await;
    for path in [
        "/api/v1/domains".to_string(),
        "/api/v1/domains?limit=1000".to_string(),
        format!("/api/v1/domains?q=h5&cursor={cursor}"),
        "/api/v1/domains?q=h99999".to_string(),
        "/api/v1/domains?tag=t7".to_string(),
        "/api/v1/domains?healthy=false".to_string(),
        "/api/v1/backends".to_string(),
        "/api/v1/backends?limit=1000".to_string(),
        "/api/v1/backends?healthy=false".to_string(),
        "/api/v1/backends?tag=t7".to_string(),
        "/api/v1/certs".to_string(),
        "/api/v1/domains/h7.bench/backends".to_string(),
    ] {
        let mut times = Vec::new();
        let mut total = Value::Null;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let (status, page) = n.call("GET", &path, None).await;
            times.push(t.elapsed());
            assert_eq!(status, StatusCode::OK, "{path}: {page}");
            total = page["total"].clone();
        }
        times.sort();
        println!(
            "GET {path}: total {total}, median {:?}, max {:?}",
            times[2], times[4]
        );
    }
}
