//! One-node integration tests: the real binary, real origin servers, real sockets.
//!
//! Each test starts its own node (own ports, own temp dir) so tests run in parallel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

/// Sends `n` proxied GETs and asserts every one is 200 from `expected` (body and x-backend).
async fn assert_all_from(node: &Node, host: &str, n: usize, expected: &str, when: &str) {
    for i in 0..n {
        let r = node.proxy_get(host, "/").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, expected),
            "{when}: request {i} to {host} should be answered by backend {expected}"
        );
        assert_eq!(
            r.header("x-backend").as_deref(),
            Some(expected),
            "{when}: request {i} to {host}: x-backend header of the origin must pass through"
        );
    }
}

fn error_message(body: &Value) -> String {
    body.get("error")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("error body must be {{\"error\": \"...\"}}, got {body}"))
        .to_string()
}

/// Asserts a plain-text proxy error response (non-empty, short, says something).
fn assert_plain_error(r: &HttpResp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: status (body {:?})", r.body);
    assert!(
        !r.body.trim().is_empty(),
        "{what}: {status} must carry a short plain-text body saying why"
    );
    assert!(
        r.body.len() < 1024,
        "{what}: body should be short, got {} bytes",
        r.body.len()
    );
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain"),
        "{what}: content-type should be text/plain, got {ct:?} (body {:?})",
        r.body
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Seed scenario: a/b switch
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_switch_moves_all_traffic_between_tags() {
    let a = Backend::start("A").await;
    let b = Backend::start("B").await;
    let node = Node::start_default().await;

    let created = node.add_backend("web-a", &a.address(), &["a"]).await;
    assert_eq!(
        created["id"], "web-a",
        "created backend echoes id: {created}"
    );
    assert_eq!(created["address"], a.address(), "{created}");
    assert_eq!(created["tags"], json!(["a"]), "{created}");
    node.add_backend("web-b", &b.address(), &["b"]).await;
    let d = node.add_domain("test.local", "a").await;
    assert_eq!(d["domain"], "test.local", "{d}");
    assert_eq!(d["enabled_backends_tag"], "a", "{d}");

    node.wait_route("test.local", "/", "A").await;
    assert_all_from(&node, "test.local", 10, "A", "tag a").await;
    // A Host header with a port routes the same.
    let host_with_port = format!("test.local:{}", node.http_addr.port());
    let r = node.proxy_get(&host_with_port, "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "A"),
        "Host: {host_with_port} should route like test.local"
    );
    assert_eq!(
        b.requests(),
        0,
        "B must get nothing while the domain is on tag a"
    );

    // The switch is refused for an unhealthy target, so wait until B is seen healthy.
    node.wait_backend_health("web-b", true, Duration::from_secs(15))
        .await;
    let (status, body) = node
        .api_post_empty("/api/v1/domains/test.local/switch")
        .await;
    assert_eq!(status, 200, "switch with no body (toggle a->b): {body}");
    assert_eq!(body["enabled_backends_tag"], "b", "switch result: {body}");
    assert_eq!(body["previous_tag"], "a", "switch result: {body}");

    // The write answered after local apply: the very next request goes to B.
    let a_before = a.requests();
    assert_all_from(&node, "test.local", 10, "B", "after switch to b").await;
    assert_eq!(
        a.requests(),
        a_before,
        "A must get nothing after the switch to b"
    );
    let (_, got) = node.api_get("/api/v1/domains/test.local").await;
    assert_eq!(got["enabled_backends_tag"], "b", "GET after switch: {got}");

    node.wait_backend_health("web-a", true, Duration::from_secs(15))
        .await;
    let (status, body) = node
        .api_post("/api/v1/domains/test.local/switch", json!({"tag": "a"}))
        .await;
    assert_eq!(status, 200, "switch back with {{\"tag\":\"a\"}}: {body}");
    assert_eq!(body["enabled_backends_tag"], "a", "{body}");
    assert_eq!(body["previous_tag"], "b", "{body}");
    assert_all_from(&node, "test.local", 10, "A", "after switch back to a").await;

    // The active pool endpoint shows the tag-a backend.
    let (status, pool) = node.api_list("/api/v1/domains/test.local/backends").await;
    assert_eq!(status, 200, "{pool}");
    let ids: Vec<&str> = pool
        .as_array()
        .unwrap_or_else(|| panic!("pool must be an array: {pool}"))
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["web-a"], "active pool of test.local on tag a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_lets_in_flight_requests_on_the_old_pool_finish() {
    let a = Backend::start("A").await;
    let b = Backend::start("B").await;
    let node = Node::start_default().await;
    node.add_backend("old", &a.address(), &["a"]).await;
    node.add_backend("new", &b.address(), &["b"]).await;
    node.add_domain("inflight.test", "a").await;
    node.wait_route("inflight.test", "/", "A").await;
    node.wait_backend_health("new", true, Duration::from_secs(15))
        .await;

    let slow = a
        .park_slow_request(node.proxy_client(), "inflight.test", 1500)
        .await;
    let (status, body) = node
        .api_post("/api/v1/domains/inflight.test/switch", json!({"tag": "b"}))
        .await;
    assert_eq!(status, 200, "switch while a request is in flight: {body}");
    assert_all_from(
        &node,
        "inflight.test",
        5,
        "B",
        "new requests after the switch",
    )
    .await;
    let r = slow
        .await
        .expect("request task")
        .expect("the in-flight request on the old pool must complete, not be cut off");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "A"),
        "the in-flight request finishes on the old pool's backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_to_tag_without_healthy_backend_is_refused_unless_forced() {
    let a = Backend::start("A").await;
    let node = Node::start_default().await;
    node.add_backend("only-a", &a.address(), &["a"]).await;
    node.add_backend("dead-b", &dead_address(), &["b"]).await;
    node.add_domain("guarded.test", "a").await;
    node.wait_route("guarded.test", "/", "A").await;
    node.wait_backend_health("dead-b", false, Duration::from_secs(15))
        .await;

    let (status, body) = node
        .api_post("/api/v1/domains/guarded.test/switch", json!({"tag": "b"}))
        .await;
    assert_eq!(
        status, 409,
        "switch to a tag with no healthy backend: {body}"
    );
    let msg = error_message(&body);
    assert!(
        msg.contains("dead-b"),
        "409 should name the unhealthy backend dead-b: {msg:?}"
    );
    let (_, got) = node.api_get("/api/v1/domains/guarded.test").await;
    assert_eq!(
        got["enabled_backends_tag"], "a",
        "refused switch changes nothing: {got}"
    );
    assert_all_from(&node, "guarded.test", 3, "A", "after refused switch").await;

    let (status, body) = node
        .api_post(
            "/api/v1/domains/guarded.test/switch",
            json!({"tag": "b", "force": true}),
        )
        .await;
    assert_eq!(status, 200, "forced switch: {body}");
    let r = node.proxy_get("guarded.test", "/").await;
    assert_plain_error(&r, 503, "forced switch to a tag with no healthy backend");
}

// ---------------------------------------------------------------------------------------------
// 2. Config-seeded vhosts/backends
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_seeded_vhosts_and_backends_are_live_at_first_start() {
    let s = Backend::start("S").await;
    let t = Backend::start("T").await;
    let cert = self_signed(&["tls-seeded.test"]);
    let cert_dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = cert.write_files(cert_dir.path(), "tls-seeded");
    let extra = format!(
        r#"
[[virtual_hosts]]
domain = "seeded.test"
enabled_backends_tag = "a"
http_to_https = false

[[virtual_hosts]]
domain = "tls-seeded.test"
enabled_backends_tag = "t"
tls = "manual"
cert_path = '{}'
key_path = '{}'

[[backends]]
id = "seed-s"
address = "{}"
tags = ["a"]

[[backends]]
id = "seed-t"
address = "{}"
tags = ["t"]
"#,
        cert_path.display(),
        key_path.display(),
        s.address(),
        t.address()
    );
    let node = Node::start(NodeOptions::new().extra(&extra)).await;

    let (status, domains) = node.api_list("/api/v1/domains").await;
    assert_eq!(status, 200, "{domains}");
    let names: Vec<&str> = domains
        .as_array()
        .unwrap_or_else(|| panic!("domain list must be an array: {domains}"))
        .iter()
        .filter_map(|d| d["domain"].as_str())
        .collect();
    assert_eq!(
        names,
        vec!["seeded.test", "tls-seeded.test"],
        "seeded domains"
    );
    let (status, be) = node.api_get("/api/v1/backends/seed-s").await;
    assert_eq!(status, 200, "seeded backend is visible in the API: {be}");
    assert_eq!(be["address"], s.address(), "{be}");
    assert_eq!(be["tags"], json!(["a"]), "{be}");
    let (_, tls_dom) = node.api_get("/api/v1/domains/tls-seeded.test").await;
    assert_eq!(tls_dom["tls"], "manual", "{tls_dom}");

    node.wait_route("seeded.test", "/", "S").await;
    assert_all_from(&node, "seeded.test", 5, "S", "config-seeded domain").await;

    // The file-based manual certificate is served for its SNI name.
    let n = &node;
    let r = wait_for(
        Duration::from_secs(15),
        "tls-seeded.test over TLS",
        move || async move {
            match n.https_get("tls-seeded.test", "/").await {
                Ok(r) if r.status == 200 => Some(r),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(r.body, "T", "tls-seeded.test routes to seed-t over TLS");
    assert_eq!(
        r.peer_cert.as_deref(),
        Some(cert.der.as_slice()),
        "the cert_path certificate is presented for SNI tls-seeded.test"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. API CRUD: happy and error paths
// ---------------------------------------------------------------------------------------------

/// The replicated, user-set fields of every domain and backend (health fields excluded since
/// probes change them).
async fn snapshot(node: &Node) -> Value {
    let (s1, domains) = node.api_list("/api/v1/domains").await;
    let (s2, backends) = node.api_list("/api/v1/backends").await;
    assert_eq!((s1, s2), (200, 200), "list domains/backends");
    let backends: Vec<Value> = backends
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            json!({"id": b["id"], "address": b["address"], "tags": b["tags"],
                   "health_check_path": b["health_check_path"]})
        })
        .collect();
    json!({"domains": domains, "backends": backends})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_crud_happy_and_error_paths() {
    let node = Node::start_default().await;

    // Empty list.
    let (status, list) = node.api_get("/api/v1/domains").await;
    assert_eq!(
        (status, &list),
        (200, &json!({"items": [], "total": 0, "next_cursor": null})),
        "fresh node has no domains"
    );

    // Create (defaults applied).
    let d = node
        .create(
            "/api/v1/domains",
            json!({"domain": "b-crud.test", "enabled_backends_tag": "a"}),
        )
        .await;
    assert_eq!(d["domain"], "b-crud.test", "{d}");
    assert_eq!(d["enabled_backends_tag"], "a", "{d}");
    assert_eq!(
        d["http_to_https"], false,
        "http_to_https defaults to false: {d}"
    );
    assert_eq!(d["tls"], "none", "tls defaults to none: {d}");
    assert_eq!(d["certificate"], Value::Null, "{d}");
    node.create(
        "/api/v1/domains",
        json!({"domain": "a-crud.test", "enabled_backends_tag": "b", "http_to_https": true}),
    )
    .await;

    // Get + list sorted by name.
    let (status, got) = node.api_get("/api/v1/domains/b-crud.test").await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got, d, "GET returns what POST returned");
    let (_, list) = node.api_list("/api/v1/domains").await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["domain"].as_str())
        .collect();
    assert_eq!(
        names,
        vec!["a-crud.test", "b-crud.test"],
        "list sorted by name"
    );

    // Update: given fields change, absent fields keep their value.
    let (status, up) = node
        .api_put(
            "/api/v1/domains/a-crud.test",
            json!({"enabled_backends_tag": "c"}),
        )
        .await;
    assert_eq!(status, 200, "PUT domain: {up}");
    assert_eq!(up["enabled_backends_tag"], "c", "{up}");
    assert_eq!(
        up["http_to_https"], true,
        "absent field keeps its value: {up}"
    );
    let (_, got) = node.api_get("/api/v1/domains/a-crud.test").await;
    assert_eq!(got, up, "GET after PUT");

    // Duplicate.
    let (status, body) = node
        .api_post(
            "/api/v1/domains",
            json!({"domain": "b-crud.test", "enabled_backends_tag": "z"}),
        )
        .await;
    assert_eq!(status, 409, "duplicate domain: {body}");
    error_message(&body);

    // Unknown.
    for (method, path, body) in [
        ("GET", "/api/v1/domains/nope.test", None),
        (
            "PUT",
            "/api/v1/domains/nope.test",
            Some(json!({"enabled_backends_tag": "a"})),
        ),
        ("DELETE", "/api/v1/domains/nope.test", None),
        (
            "POST",
            "/api/v1/domains/nope.test/switch",
            Some(json!({"tag": "b", "force": true})),
        ),
        ("GET", "/api/v1/domains/nope.test/backends", None),
    ] {
        let m: reqwest::Method = method.parse().unwrap();
        let body_text = body.map(|b: Value| b.to_string());
        let (status, resp) = node
            .api_request(
                m,
                path,
                body_text.as_deref(),
                Some(&format!("Bearer {TOKEN}")),
            )
            .await;
        assert_eq!(status, 404, "{method} {path} on an unknown domain: {resp}");
        error_message(&resp);
    }

    // Invalid bodies: 400, {"error"}, message names the field; nothing changes.
    let before = snapshot(&node).await;
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "missing domain",
            "domain",
            json!({"enabled_backends_tag": "a"}).to_string(),
        ),
        (
            "missing enabled_backends_tag",
            "enabled_backends_tag",
            json!({"domain": "x.test"}).to_string(),
        ),
        (
            "wrong type for http_to_https",
            "http_to_https",
            json!({"domain": "x.test", "enabled_backends_tag": "a", "http_to_https": "yes"})
                .to_string(),
        ),
        (
            "empty tag",
            "enabled_backends_tag",
            json!({"domain": "x.test", "enabled_backends_tag": ""}).to_string(),
        ),
        (
            "bad domain name",
            "domain",
            json!({"domain": "not a domain!", "enabled_backends_tag": "a"}).to_string(),
        ),
        (
            "unknown tls mode",
            "tls",
            json!({"domain": "x.test", "enabled_backends_tag": "a", "tls": "sometimes"})
                .to_string(),
        ),
        (
            "manual tls without certificate",
            "cert_pem",
            json!({"domain": "x.test", "enabled_backends_tag": "a", "tls": "manual"}).to_string(),
        ),
        (
            "manual tls with garbage certificate",
            "cert_pem",
            json!({"domain": "x.test", "enabled_backends_tag": "a", "tls": "manual",
                   "cert_pem": "not a pem", "key_pem": self_signed(&["x.test"]).key_pem})
            .to_string(),
        ),
    ];
    for (what, field, body) in &cases {
        let (status, resp) = node
            .api_raw(reqwest::Method::POST, "/api/v1/domains", body)
            .await;
        assert_eq!(status, 400, "POST domain with {what} ({body}): {resp}");
        let msg = error_message(&resp);
        assert!(
            mentions_field(&msg, field),
            "POST domain with {what}: error should name the field `{field}`, got {msg:?}"
        );
    }
    let (status, resp) = node
        .api_raw(
            reqwest::Method::POST,
            "/api/v1/domains",
            r#"{"domain": "x.test","#,
        )
        .await;
    assert_eq!(status, 400, "malformed JSON: {resp}");
    error_message(&resp);
    let (status, resp) = node
        .api_put(
            "/api/v1/domains/a-crud.test",
            json!({"enabled_backends_tag": ""}),
        )
        .await;
    assert_eq!(status, 400, "PUT with empty tag: {resp}");
    assert!(
        mentions_field(&error_message(&resp), "enabled_backends_tag"),
        "PUT error names the field: {resp}"
    );
    let (status, resp) = node
        .api_put("/api/v1/domains/a-crud.test", json!({"http_to_https": 3}))
        .await;
    assert_eq!(status, 400, "PUT with wrong type: {resp}");
    assert!(
        mentions_field(&error_message(&resp), "http_to_https"),
        "PUT error names the field: {resp}"
    );
    let after = snapshot(&node).await;
    assert_eq!(before, after, "rejected writes must not change the state");

    // Delete.
    let (status, body) = node.api_delete("/api/v1/domains/b-crud.test").await;
    assert_eq!(status, 204, "DELETE domain: {body}");
    assert_eq!(body, Value::Null, "204 has no body");
    let (status, _) = node.api_get("/api/v1/domains/b-crud.test").await;
    assert_eq!(status, 404, "deleted domain is gone");
    let (status, _) = node.api_delete("/api/v1/domains/b-crud.test").await;
    assert_eq!(status, 404, "second DELETE is 404");
    let (_, list) = node.api_list("/api/v1/domains").await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "one domain left: {list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_crud_happy_and_error_paths() {
    let node = Node::start_default().await;
    let (status, list) = node.api_list("/api/v1/backends").await;
    assert_eq!(
        (status, &list),
        (200, &json!([])),
        "fresh node has no backends"
    );

    let be = node
        .create(
            "/api/v1/backends",
            json!({"id": "web-2", "address": "127.0.0.1:3002", "tags": ["b"]}),
        )
        .await;
    assert_eq!(be["id"], "web-2", "{be}");
    assert_eq!(be["address"], "127.0.0.1:3002", "{be}");
    assert_eq!(be["tags"], json!(["b"]), "{be}");
    assert_eq!(be["draining"], false, "{be}");
    assert_eq!(be["in_flight"], 0, "{be}");
    assert!(
        be["healthy"].is_boolean(),
        "healthy is a read-only bool: {be}"
    );
    let be1 = node
        .create(
            "/api/v1/backends",
            json!({"id": "web-1", "address": "localhost:3001", "health_check_path": "/ready"}),
        )
        .await;
    assert_eq!(be1["tags"], json!([]), "tags default to []: {be1}");
    assert_eq!(be1["health_check_path"], "/ready", "{be1}");

    let (_, list) = node.api_list("/api/v1/backends").await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["web-1", "web-2"], "backends sorted by id");

    let (status, got) = node.api_get("/api/v1/backends/web-2").await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["address"], "127.0.0.1:3002", "{got}");

    let (status, up) = node
        .api_put("/api/v1/backends/web-2", json!({"tags": ["b", "c"]}))
        .await;
    assert_eq!(status, 200, "PUT backend: {up}");
    assert_eq!(up["tags"], json!(["b", "c"]), "{up}");
    assert_eq!(
        up["address"], "127.0.0.1:3002",
        "absent field keeps its value: {up}"
    );
    let (status, up) = node
        .api_put(
            "/api/v1/backends/web-2",
            json!({"address": "127.0.0.1:3003"}),
        )
        .await;
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["address"], "127.0.0.1:3003", "{up}");
    assert_eq!(up["tags"], json!(["b", "c"]), "{up}");

    let (status, body) = node
        .api_post(
            "/api/v1/backends",
            json!({"id": "web-2", "address": "127.0.0.1:9999"}),
        )
        .await;
    assert_eq!(status, 409, "duplicate backend id: {body}");
    error_message(&body);

    for (method, path) in [
        ("GET", "/api/v1/backends/nope"),
        ("PUT", "/api/v1/backends/nope"),
        ("DELETE", "/api/v1/backends/nope"),
        ("POST", "/api/v1/backends/nope/drain"),
    ] {
        let m: reqwest::Method = method.parse().unwrap();
        let body = (method == "PUT").then(|| json!({"tags": ["a"]}).to_string());
        let (status, resp) = node
            .api_request(m, path, body.as_deref(), Some(&format!("Bearer {TOKEN}")))
            .await;
        assert_eq!(status, 404, "{method} {path} on an unknown backend: {resp}");
        error_message(&resp);
    }

    let before = snapshot(&node).await;
    let cases: Vec<(&str, &str, Value)> = vec![
        ("missing id", "id", json!({"address": "127.0.0.1:1"})),
        ("missing address", "address", json!({"id": "x"})),
        (
            "bad address",
            "address",
            json!({"id": "x", "address": "not-an-address"}),
        ),
        (
            "port out of range",
            "address",
            json!({"id": "x", "address": "127.0.0.1:70000"}),
        ),
        (
            "wrong type for tags",
            "tags",
            json!({"id": "x", "address": "127.0.0.1:1", "tags": "a"}),
        ),
        (
            "empty tag",
            "tags",
            json!({"id": "x", "address": "127.0.0.1:1", "tags": [""]}),
        ),
        (
            "bad id",
            "id",
            json!({"id": "bad id!", "address": "127.0.0.1:1"}),
        ),
        (
            "wrong type for address",
            "address",
            json!({"id": "x", "address": 3001}),
        ),
    ];
    for (what, field, body) in &cases {
        let (status, resp) = node.api_post("/api/v1/backends", body.clone()).await;
        assert_eq!(status, 400, "POST backend with {what} ({body}): {resp}");
        let msg = error_message(&resp);
        assert!(
            mentions_field(&msg, field),
            "POST backend with {what}: error should name the field `{field}`, got {msg:?}"
        );
    }
    let (status, resp) = node
        .api_raw(reqwest::Method::POST, "/api/v1/backends", "{not json")
        .await;
    assert_eq!(status, 400, "malformed JSON: {resp}");
    error_message(&resp);
    let (status, resp) = node
        .api_put(
            "/api/v1/backends/web-2",
            json!({"address": "not-an-address"}),
        )
        .await;
    assert_eq!(status, 400, "PUT backend with bad address: {resp}");
    assert!(
        mentions_field(&error_message(&resp), "address"),
        "PUT error names the field: {resp}"
    );
    let after = snapshot(&node).await;
    assert_eq!(before, after, "rejected writes must not change the state");

    let (status, body) = node.api_delete("/api/v1/backends/web-1").await;
    assert_eq!(status, 204, "DELETE backend: {body}");
    let (status, _) = node.api_get("/api/v1/backends/web-1").await;
    assert_eq!(status, 404, "deleted backend is gone");
    let (status, _) = node.api_delete("/api/v1/backends/web-1").await;
    assert_eq!(status, 404, "second DELETE is 404");
}

// ---------------------------------------------------------------------------------------------
// 4. Auth
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_bearer_token_except_health() {
    let node = Node::start_default().await;
    node.add_backend("auth-be", "127.0.0.1:3001", &["a"]).await;
    node.add_domain("auth.test", "a").await;
    let before = snapshot(&node).await;

    let domain_body = json!({"domain": "sneaky.test", "enabled_backends_tag": "a"}).to_string();
    let backend_body = json!({"id": "sneaky", "address": "127.0.0.1:1"}).to_string();
    let endpoints: Vec<(&str, &str, Option<&str>)> = vec![
        ("GET", "/api/v1/domains", None),
        ("POST", "/api/v1/domains", Some(domain_body.as_str())),
        ("GET", "/api/v1/domains/auth.test", None),
        (
            "PUT",
            "/api/v1/domains/auth.test",
            Some(r#"{"enabled_backends_tag":"b"}"#),
        ),
        ("DELETE", "/api/v1/domains/auth.test", None),
        (
            "POST",
            "/api/v1/domains/auth.test/switch",
            Some(r#"{"tag":"b","force":true}"#),
        ),
        ("GET", "/api/v1/domains/auth.test/backends", None),
        ("GET", "/api/v1/backends", None),
        ("POST", "/api/v1/backends", Some(backend_body.as_str())),
        ("GET", "/api/v1/backends/auth-be", None),
        ("PUT", "/api/v1/backends/auth-be", Some(r#"{"tags":["z"]}"#)),
        ("DELETE", "/api/v1/backends/auth-be", None),
        ("POST", "/api/v1/backends/auth-be/drain", None),
        ("DELETE", "/api/v1/backends/auth-be/drain", None),
        ("POST", "/api/v1/backends/auth-be/health", None),
        ("GET", "/api/v1/cluster/status", None),
        ("DELETE", "/api/v1/cluster/members/2", None),
        ("GET", "/api/v1/metrics", None),
        ("GET", "/api/v1/stats", None),
        ("GET", "/api/v1/logs/stream", None),
        ("GET", "/api/v1/certs", None),
        ("GET", "/api/v1/certs/auth.test", None),
        ("POST", "/api/v1/certs/auth.test/renew", None),
    ];
    let bad_auth: [(&str, Option<&str>); 4] = [
        ("no Authorization header", None),
        ("wrong token", Some("Bearer wrong-token")),
        ("token without Bearer scheme", Some(TOKEN)),
        ("Basic scheme", Some("Basic dGVzdC10b2tlbjp4")),
    ];
    for (method, path, body) in &endpoints {
        for (what, auth) in &bad_auth {
            let m: reqwest::Method = method.parse().unwrap();
            let (status, resp) = node.api_request(m, path, *body, *auth).await;
            assert_eq!(status, 401, "{method} {path} with {what}: {resp}");
            error_message(&resp);
        }
    }
    assert_eq!(
        snapshot(&node).await,
        before,
        "unauthenticated writes must change nothing"
    );

    // Health needs no token.
    let (status, health) = node
        .api_request(reqwest::Method::GET, "/api/v1/health", None, None)
        .await;
    assert_eq!(status, 200, "health without token: {health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["node_id"], 1, "{health}");

    // A single node with bootstrap_expect = 1 leads its own cluster.
    let n = &node;
    let status = wait_for(
        Duration::from_secs(10),
        "node 1 to be leader",
        move || async move {
            let (s, st) = n.api_get("/api/v1/cluster/status").await;
            (s == 200 && st["leader_id"] == 1).then_some(st)
        },
    )
    .await;
    assert_eq!(status["node_id"], 1, "{status}");
    assert!(
        status["state"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("leader")),
        "single node state should be leader: {status}"
    );
    let members = status["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 1, "one member: {status}");
    assert_eq!(members[0]["node_id"], 1, "{status}");
    assert_eq!(members[0]["voter"], true, "{status}");
    assert_eq!(
        members[0]["rpc_addr"],
        node.rpc_addr.to_string(),
        "member advertises its rpc_addr: {status}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Proxy error responses
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_error_statuses_have_plain_text_bodies() {
    let slow = Backend::start("SLOW").await;
    let node = Node::start(NodeOptions::new().proxy("upstream_read_timeout_secs = 1")).await;

    // Unknown Host.
    let r = node.proxy_get("nobody-configured-this.test", "/").await;
    assert_plain_error(&r, 404, "unknown Host");

    // Domain whose tag has no backend at all.
    node.add_domain("notag.test", "nobody-has-this-tag").await;
    let r = node.proxy_get("notag.test", "/").await;
    assert_plain_error(&r, 503, "domain whose tag has no backend");

    // Only backend refuses connections. Ask right after registration, before the active
    // health check could have marked it down: the proxy really tries and fails to connect.
    node.add_backend("refuser", &dead_address(), &["refuse"])
        .await;
    node.add_domain("refused.test", "refuse").await;
    let r = node.proxy_get("refused.test", "/").await;
    assert_plain_error(&r, 502, "only backend refuses connections");

    // Slow backend beyond upstream_read_timeout_secs = 1.
    node.add_backend("slowpoke", &slow.address(), &["slow"])
        .await;
    node.add_domain("slow.test", "slow").await;
    node.wait_route("slow.test", "/", "SLOW").await;
    let started = Instant::now();
    let r = node.proxy_get("slow.test", "/slow?ms=3000").await;
    let took = started.elapsed();
    assert_plain_error(&r, 504, "backend slower than upstream_read_timeout_secs");
    assert!(
        took < Duration::from_millis(2900),
        "504 should come at the 1 s read timeout, not after the backend answered (took {took:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Retry on another backend + active health check
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connect_is_retried_on_the_live_backend() {
    let live = Backend::start("LIVE").await;
    let node = Node::start_default().await;
    // Dead one first, so round-robin certainly picks it among the first requests.
    node.add_backend("a-dead", &dead_address(), &["a"]).await;
    node.add_backend("b-live", &live.address(), &["a"]).await;
    node.add_domain("retry.test", "a").await;

    // Straight away (before any health verdict on a-dead): every request must succeed.
    let before = live.requests();
    for i in 0..20 {
        let r = node.proxy_get("retry.test", "/").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "LIVE"),
            "request {i}: a failed connect to the dead backend must be retried on the live one"
        );
    }
    assert_eq!(
        live.requests() - before,
        20,
        "the live backend served all 20"
    );

    // The on-demand probe reports what it finds.
    let (status, probe) = node.api_post_empty("/api/v1/backends/a-dead/health").await;
    assert_eq!(status, 200, "on-demand probe: {probe}");
    assert_eq!(probe["id"], "a-dead", "{probe}");
    assert_eq!(probe["healthy"], false, "probe of a closed port: {probe}");
    let (status, probe) = node.api_post_empty("/api/v1/backends/b-live/health").await;
    assert_eq!(status, 200, "on-demand probe: {probe}");
    assert_eq!(probe["healthy"], true, "probe of a live backend: {probe}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_backend_gets_no_new_requests_but_finishes_in_flight() {
    let d1 = Backend::start("D1").await;
    let d2 = Backend::start("D2").await;
    let node = Node::start_default().await;
    node.add_backend("d1", &d1.address(), &["a"]).await;
    node.add_backend("d2", &d2.address(), &["a"]).await;
    node.add_domain("drain.test", "a").await;
    node.wait_route("drain.test", "/", "D1").await;
    node.wait_route("drain.test", "/", "D2").await;

    // Park a slow request on D1 (retry until round-robin lands it there).
    let client = node.proxy_client();
    let mut in_flight = None;
    for _ in 0..6 {
        let before = d1.requests();
        let c = client.clone();
        let task = tokio::spawn(async move { c.get("drain.test", "/slow?ms=1500").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        if d1.requests() > before {
            in_flight = Some(task);
            break;
        }
        let _ = task.await;
    }
    let in_flight = in_flight.expect("round-robin never sent a request to D1");

    let (status, be) = node.api_post_empty("/api/v1/backends/d1/drain").await;
    assert_eq!(status, 200, "drain: {be}");
    assert_eq!(be["draining"], true, "{be}");
    assert_eq!(
        be["in_flight"], 1,
        "the parked request is visible as in flight: {be}"
    );

    let d1_before = d1.requests();
    assert_all_from(&node, "drain.test", 10, "D2", "while d1 drains").await;
    assert_eq!(
        d1.requests(),
        d1_before,
        "a draining backend gets no new requests"
    );

    let r = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight request on the drained backend did not finish")
        .unwrap()
        .expect("in-flight request on the drained backend must complete");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "D1"),
        "in-flight request finishes on D1"
    );

    let (status, be) = node.api_delete("/api/v1/backends/d1/drain").await;
    assert_eq!(status, 200, "undo drain: {be}");
    assert_eq!(be["draining"], false, "{be}");
    node.wait_route("drain.test", "/", "D1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_goes_away_is_routed_around() {
    let one = Backend::start("ONE").await;
    let mut two = Backend::start("TWO").await;
    let node = Node::start_default().await;
    node.add_backend("one", &one.address(), &["a"]).await;
    node.add_backend("two", &two.address(), &["a"]).await;
    node.add_domain("failover.test", "a").await;
    node.wait_route("failover.test", "/", "ONE").await;
    node.wait_route("failover.test", "/", "TWO").await;

    two.stop().await;
    for i in 0..20 {
        let r = node.proxy_get("failover.test", "/").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "ONE"),
            "request {i} after backend TWO stopped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_check_marks_backends_down_and_up() {
    let mut x = Backend::start("X").await;
    let node = Node::start_default().await;
    node.add_backend("never-up", &dead_address(), &["z"]).await;
    node.add_backend("x", &x.address(), &["a"]).await;
    node.add_domain("hc.test", "a").await;
    node.wait_route("hc.test", "/", "X").await;

    // interval 1 s, 3 failures -> unhealthy.
    node.wait_backend_health("never-up", false, Duration::from_secs(10))
        .await;
    node.wait_backend_health("x", true, Duration::from_secs(5))
        .await;

    // The only backend of the tag goes down: once it is marked unhealthy, requests get 503
    // ("no healthy backend"), not a connect attempt.
    let addr = x.addr;
    x.stop().await;
    node.wait_backend_health("x", false, Duration::from_secs(10))
        .await;
    let r = node.proxy_get("hc.test", "/").await;
    assert_plain_error(&r, 503, "only backend marked unhealthy");

    // It comes back on the same port: 2 successes -> healthy, traffic resumes.
    let x2 = Backend::start_on("X", addr).await;
    node.wait_backend_health("x", true, Duration::from_secs(10))
        .await;
    node.wait_route("hc.test", "/", "X").await;
    assert!(x2.requests() >= 1, "the restarted backend serves again");
}

// ---------------------------------------------------------------------------------------------
// 8. X-Forwarded-*
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_reach_the_backend() {
    let h = Backend::start("H").await;
    let node = Node::start_default().await;
    node.add_backend("hdr", &h.address(), &["a"]).await;
    node.add_domain("fwd.test", "a").await;
    node.wait_route("fwd.test", "/", "H").await;

    let r = node.proxy_get("fwd.test", "/headers").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let headers: Value = serde_json::from_str(&r.body).expect("backend /headers JSON");
    let xff = headers["x-forwarded-for"].as_str().unwrap_or_default();
    assert!(
        xff.split(',').map(str::trim).any(|ip| ip == "127.0.0.1"),
        "x-forwarded-for should carry the client address 127.0.0.1: {headers}"
    );
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    assert_eq!(headers["x-forwarded-host"], "fwd.test", "{headers}");
    assert_eq!(
        headers["host"], "fwd.test",
        "the original Host header is passed to the backend: {headers}"
    );

    // Over TLS the proto is https.
    let n = &node;
    let r = wait_for(
        Duration::from_secs(10),
        "fwd.test over TLS",
        move || async move {
            match n.https_get("fwd.test", "/headers").await {
                Ok(r) if r.status == 200 => Some(r),
                _ => None,
            }
        },
    )
    .await;
    let headers: Value = serde_json::from_str(&r.body).expect("backend /headers JSON");
    assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-host"], "fwd.test", "{headers}");
}

// ---------------------------------------------------------------------------------------------
// 9. http_to_https
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_https_redirects_except_acme_challenges() {
    let r_be = Backend::start("R").await;
    let node = Node::start_default().await;
    node.add_backend("r", &r_be.address(), &["a"]).await;
    node.create(
        "/api/v1/domains",
        json!({"domain": "redir.test", "enabled_backends_tag": "a", "http_to_https": true}),
    )
    .await;
    node.add_domain("plain.test", "a").await;
    node.wait_route("plain.test", "/", "R").await;

    let before = r_be.requests();
    let r = node.proxy_get("redir.test", "/some/path?q=1").await;
    assert!(
        r.status == 301 || r.status == 308,
        "http_to_https must redirect permanently (301/308), got {} {:?}",
        r.status,
        r.body
    );
    let location = r.header("location").unwrap_or_default();
    let with_port = format!(
        "https://redir.test:{}/some/path?q=1",
        node.https_addr.port()
    );
    assert!(
        location == "https://redir.test/some/path?q=1" || location == with_port,
        "Location should be https://redir.test/some/path?q=1, got {location:?}"
    );

    assert_eq!(
        r_be.requests(),
        before,
        "the backend is not contacted for a redirect"
    );

    let r = node
        .proxy_get("redir.test", "/.well-known/acme-challenge/x")
        .await;
    assert!(
        r.status != 301 && r.status != 308 && r.header("location").is_none(),
        "ACME challenge paths must not be redirected, got {} location {:?}",
        r.status,
        r.header("location")
    );

    // A domain without http_to_https is served over plain HTTP.
    let r = node.proxy_get("plain.test", "/x").await;
    assert_eq!((r.status, r.body.as_str()), (200, "R"));

    // Turning it on through the API takes effect at once.
    let (status, body) = node
        .api_put("/api/v1/domains/plain.test", json!({"http_to_https": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    let r = node.proxy_get("plain.test", "/x").await;
    assert!(
        r.status == 301 || r.status == 308,
        "after PUT http_to_https=true: {} {:?}",
        r.status,
        r.body
    );
}

/// An origin that counts the connections it accepts and answers each request on them
/// `200 ok` (reading its body first); after `close_after` answers on one connection it reads
/// the next request and closes the connection without answering: a backend whose keep-alive
/// timeout fired as the request arrived, the worst moment for a pooled connection.
async fn counting_origin(close_after: usize) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = bind_loopback().await;
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let chunked = head.contains("transfer-encoding: chunked");
                    let body_end = |buf: &[u8]| {
                        if chunked {
                            buf[end + 4..]
                                .windows(5)
                                .position(|w| w == b"0\r\n\r\n")
                                .map(|at| end + 4 + at + 5)
                        } else {
                            (buf.len() >= end + 4 + length).then_some(end + 4 + length)
                        }
                    };
                    let used = loop {
                        if let Some(used) = body_end(&buf) {
                            break used;
                        }
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..used);
                    if answered == close_after {
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if conn.write_all(answer).await.is_err() {
                        return;
                    }
                    answered += 1;
                }
            });
        }
    });
    (addr, accepted)
}

/// HTTP/2 requests go through Pingora's proxy, whose own pool cannot hold our backend
/// connections (#16: one new backend connection per request before): they come back to the
/// worker's pool between exchanges, and a pooled connection the backend closes as a request
/// arrives costs no failed idempotent request (it is sent again on a new connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_reuse_backend_connections() {
    let (keeps, kept_conns) = counting_origin(usize::MAX).await;
    let (closes, closing_conns) = counting_origin(5).await;
    let node = Node::start_default().await;
    node.add_backend("keeps", &keeps, &["k"]).await;
    node.add_backend("closes", &closes, &["c"]).await;
    let cert = self_signed(&["k.test", "c.test"]);
    for (domain, tag) in [("k.test", "k"), ("c.test", "c")] {
        node.create(
            "/api/v1/domains",
            json!({"domain": domain, "enabled_backends_tag": tag, "tls": "manual",
                   "cert_pem": cert.cert_pem, "key_pem": cert.key_pem}),
        )
        .await;
    }
    for (domain, conns) in [("k.test", &kept_conns), ("c.test", &closing_conns)] {
        let client = node.https_client(domain);
        let url = format!("https://{domain}:{}/", node.https_addr.port());
        wait_for(Duration::from_secs(15), &format!("{domain} served"), || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client.get(&url).send().await.ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
        let before = conns.load(Ordering::SeqCst);
        for i in 0..60 {
            let r = if i % 3 == 0 && domain == "k.test" {
                client.post(&url).body("a body of some bytes").send().await
            } else {
                client.get(&url).send().await
            }
            .unwrap_or_else(|e| panic!("{domain} request {i}: {e}"));
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
            assert_eq!(r.status(), 200, "{domain} request {i}");
            assert_eq!(r.text().await.unwrap(), "ok");
        }
        let opened = conns.load(Ordering::SeqCst) - before;
        // c.test: a new connection after every 5 answers (and a retried request).
        let at_most = if domain == "k.test" { 3 } else { 60 / 5 + 3 };
        assert!(
            opened <= at_most,
            "{domain}: 60 requests opened {opened} backend connections (at most {at_most})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 10. HTTPS: per-SNI manual certificates, HTTP/2, default certificate
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_each_domain_its_own_certificate_over_h2() {
    let a = Backend::start("A").await;
    let b = Backend::start("B").await;
    let node = Node::start_default().await;
    node.add_backend("a1", &a.address(), &["a"]).await;
    node.add_backend("b1", &b.address(), &["b"]).await;
    let cert_a = self_signed(&["a.test"]);
    let cert_b = self_signed(&["b.test"]);
    for (domain, tag, cert) in [("a.test", "a", &cert_a), ("b.test", "b", &cert_b)] {
        let d = node
            .create(
                "/api/v1/domains",
                json!({"domain": domain, "enabled_backends_tag": tag, "tls": "manual",
                       "cert_pem": cert.cert_pem, "key_pem": cert.key_pem}),
            )
            .await;
        assert_eq!(d["tls"], "manual", "{d}");
        let names = d["certificate"]["names"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            names.contains(&json!(domain)),
            "certificate.names should list {domain}: {d}"
        );
        assert!(
            d["certificate"]["not_after"].is_string(),
            "certificate.not_after: {d}"
        );
        assert!(
            !d.to_string().contains("PRIVATE KEY") && d.get("key_pem").is_none(),
            "private keys are never returned: {d}"
        );
    }
    let (_, listed) = node.api_list("/api/v1/domains").await;
    assert!(
        !listed.to_string().contains("PRIVATE KEY"),
        "private keys are never returned in lists"
    );

    for (sni, cert, body) in [("a.test", &cert_a, "A"), ("b.test", &cert_b, "B")] {
        let n = &node;
        let r = wait_for(
            Duration::from_secs(15),
            &format!("{sni} over TLS answered by {body}"),
            move || async move {
                match n.https_get(sni, "/").await {
                    Ok(r) if r.status == 200 && r.body == body => Some(r),
                    _ => None,
                }
            },
        )
        .await;
        assert_eq!(
            r.peer_cert.as_deref(),
            Some(cert.der.as_slice()),
            "SNI {sni} must get {sni}'s own certificate"
        );
        assert_eq!(
            r.version,
            reqwest::Version::HTTP_2,
            "HTTP/2 should be negotiated over TLS (ALPN h2) for {sni}"
        );
        assert_eq!(r.headers.get("x-backend").unwrap(), body);
    }

    // No SNI (connecting to the IP): the handshake still completes with the default cert,
    // and routing uses the Host header.
    let r = node
        .https_get_no_sni("a.test", "/")
        .await
        .expect("TLS handshake without SNI must complete (default certificate)");
    let presented = r.peer_cert.clone().expect("a certificate is presented");
    assert_ne!(
        presented, cert_a.der,
        "without SNI the default cert is served, not a.test's"
    );
    assert_ne!(
        presented, cert_b.der,
        "without SNI the default cert is served, not b.test's"
    );
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "A"),
        "no SNI, Host: a.test routes to a.test"
    );

    // Unknown SNI: default certificate too, and unknown host 404.
    let r = node
        .https_get("unknown.test", "/")
        .await
        .expect("TLS handshake with an unknown SNI must complete (default certificate)");
    assert_eq!(
        r.peer_cert.as_deref(),
        Some(presented.as_slice()),
        "unknown SNI gets the default cert"
    );
    assert_eq!(r.status, 404, "unknown host over TLS: {:?}", r.body);

    // Rotating a certificate through the API takes effect for new handshakes at once.
    let cert_a2 = self_signed(&["a.test"]);
    let (status, body) = node
        .api_put(
            "/api/v1/domains/a.test",
            json!({"cert_pem": cert_a2.cert_pem, "key_pem": cert_a2.key_pem}),
        )
        .await;
    assert_eq!(status, 200, "PUT new certificate: {body}");
    let r = node
        .https_get("a.test", "/")
        .await
        .expect("TLS after rotation");
    assert_eq!(
        r.peer_cert.as_deref(),
        Some(cert_a2.der.as_slice()),
        "after PUT, a.test presents the new certificate"
    );
    let r = node.https_get("b.test", "/").await.expect("TLS b.test");
    assert_eq!(
        r.peer_cert.as_deref(),
        Some(cert_b.der.as_slice()),
        "b.test keeps its own certificate"
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Websocket
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_proxied() {
    let w = Backend::start("W").await;
    let node = Node::start_default().await;
    node.add_backend("ws", &w.address(), &["a"]).await;
    node.add_domain("ws.test", "a").await;
    node.wait_route("ws.test", "/", "W").await;

    let mut stream = ws_connect(node.http_addr, "ws.test", "/ws").await;
    ws_send_text(&mut stream, "hello through the proxy").await;
    assert_eq!(
        ws_recv_text(&mut stream).await,
        "W: hello through the proxy",
        "echo from backend W through the proxy"
    );
    ws_send_text(&mut stream, "second message").await;
    assert_eq!(ws_recv_text(&mut stream).await, "W: second message");
}
