//! The write path of a 3-node cluster on loopback, with real processes and signals: a write
//! applies at most once whatever is retried (write ids, `Idempotency-Key`), forwarded writes
//! past their deadline, without a valid proof, replayed or stale are refused and counted, and a follower stops
//! waiting on a leader that was replaced.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::{signal, try_status, wait_new_leader, Frozen};
use crate::common::*;

/// An API write with optional `Idempotency-Key`; returns (status, body).
async fn send(
    n: &Node,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut req = client.request(method, n.api_url(path)).bearer_auth(TOKEN);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}\n{}", n.logs()));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn tag_of(n: &Node, domain: &str) -> String {
    let (status, body) = n.api_get(&format!("/api/v1/domains/{domain}")).await;
    assert_eq!(status, 200, "GET {domain}: {body}");
    body["enabled_backends_tag"].as_str().unwrap().to_string()
}

/// Waits until `n` shows `domain` on `tag`.
async fn wait_tag(n: &Node, domain: &str, tag: &str) {
    wait_for(
        Duration::from_secs(10),
        &format!("{domain} on tag {tag}"),
        || async { (tag_of(n, domain).await == tag).then_some(()) },
    )
    .await;
}

/// `POST /cluster/write` straight to a node, signed with a key derived from `secret` as a
/// follower would forward it: (status, body).
async fn forward_raw(n: &Node, secret: &str, body: &Value) -> (u16, Value) {
    let (auth, bytes) = sign_forward(secret, body);
    forward_signed(n, &auth, bytes).await
}

/// The proof header and body of a forwarded write signed with a key derived from `secret`.
fn sign_forward(secret: &str, body: &Value) -> (String, Vec<u8>) {
    use pingora_vhost::cluster::network::auth_header;
    use pingora_vhost::keyring::Keyring;
    let bytes = serde_json::to_vec(body).unwrap();
    let keys = Keyring::new(Some(secret), None, "default");
    (auth_header(&keys, "POST", "/cluster/write", &bytes), bytes)
}

/// Sends a forwarded write with the given proof header, as captured or built.
async fn forward_signed(n: &Node, auth: &str, bytes: Vec<u8>) -> (u16, Value) {
    let r = RpcClient::to(n, "test-cluster-secret", 99)
        .post("/cluster/write")
        .header(pingora_vhost::cluster::network::AUTH_HEADER, auth)
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .expect("POST /cluster/write");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn switch_request(seq: u64, domain: &str, tag: &str, deadline_unix_ms: u64) -> Value {
    json!({
        "id": {"Node": {"node": 99, "boot": 12345, "seq": seq}},
        "deadline_unix_ms": deadline_unix_ms,
        "cmd": {"SwitchTag": {"domain": domain, "tag": tag}},
    })
}

/// A client's retry with the same `Idempotency-Key` gets the first answer, on another node and
/// after the leader was killed, and applies nothing again; the key is validated, and reusing it
/// for another request is refused with 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_retry_across_a_leader_kill_applies_once() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let (leader, followers) = cluster.leader_and_followers().await;
    let (f1, f2) = (followers[0], followers[1]);
    let post = reqwest::Method::POST;

    let create = json!({"domain": "key.test", "enabled_backends_tag": "a"});
    let (s1, first_create) = send(
        cluster.node(f1),
        post.clone(),
        "/api/v1/domains",
        Some("create-key.test"),
        Some(create.clone()),
    )
    .await;
    assert_eq!(s1, 201, "{first_create}");
    // A tag-less switch toggles: applied twice it would come back to "a".
    let toggle = json!({"force": true});
    let (s2, first_switch) = send(
        cluster.node(f1),
        post.clone(),
        "/api/v1/domains/key.test/switch",
        Some("switch-1"),
        Some(toggle.clone()),
    )
    .await;
    assert_eq!(s2, 200, "{first_switch}");
    assert_eq!(first_switch["previous_tag"], "a");
    cluster.wait_converged(Duration::from_secs(10)).await;

    cluster.node_mut(leader).kill9();
    let others: Vec<&Node> = followers.iter().map(|id| cluster.node(*id)).collect();
    let new_leader = wait_new_leader(&others, leader, Duration::from_secs(20)).await;
    eprintln!("leader {leader} killed; new leader {new_leader}");

    for via in [f2, f1] {
        let n = cluster.node(via);
        let (s, body) = send(
            n,
            post.clone(),
            "/api/v1/domains",
            Some("create-key.test"),
            Some(create.clone()),
        )
        .await;
        assert_eq!(
            (s, &body),
            (201, &first_create),
            "create retried on node {via}"
        );
        let (s, body) = send(
            n,
            post.clone(),
            "/api/v1/domains/key.test/switch",
            Some("switch-1"),
            Some(toggle.clone()),
        )
        .await;
        assert_eq!(
            (s, &body),
            (200, &first_switch),
            "switch retried on node {via}"
        );
        assert_eq!(tag_of(n, "key.test").await, "b", "toggled once on {via}");
    }

    // The same key with another body is refused, and applies nothing.
    let (s, body) = send(
        cluster.node(f2),
        post.clone(),
        "/api/v1/domains/key.test/switch",
        Some("switch-1"),
        Some(json!({"force": true, "tag": "c"})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{body}"
    );
    assert_eq!(tag_of(cluster.node(f2), "key.test").await, "b");

    // Keys are checked: 400 naming the header.
    for bad in ["", &"k".repeat(256)] {
        let (s, body) = send(
            cluster.node(f1),
            post.clone(),
            "/api/v1/domains/key.test/switch",
            Some(bad),
            Some(toggle.clone()),
        )
        .await;
        assert_eq!(s, 400, "key {bad:?}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("Idempotency-Key"),
            "{body}"
        );
    }

    // A keyed write made under the new leader replays too (an error result as well).
    for _ in 0..2 {
        let (s, body) = send(
            cluster.node(f1),
            post.clone(),
            "/api/v1/domains",
            Some("create-again"),
            Some(create.clone()),
        )
        .await;
        assert_eq!(s, 409, "the first answer was 409 already exists: {body}");
    }
    let (s, _) = send(
        cluster.node(f2),
        reqwest::Method::DELETE,
        "/api/v1/domains/key.test",
        Some("delete-1"),
        None,
    )
    .await;
    assert_eq!(s, 204);
    // Retried on a node that has applied the delete: its lookup alone would say 404.
    wait_for(
        Duration::from_secs(10),
        "the delete reaches node f1",
        || async {
            (cluster.node(f1).api_get("/api/v1/domains/key.test").await.0 == 404).then_some(())
        },
    )
    .await;
    let (s, body) = send(
        cluster.node(f1),
        reqwest::Method::DELETE,
        "/api/v1/domains/key.test",
        Some("delete-1"),
        None,
    )
    .await;
    assert_eq!(s, 204, "a retried delete answers as the first did: {body}");
}

/// The leader's write table across a leader kill: a forwarded write sent again with the same id
/// (as a follower re-forwards after a lost answer) returns the first result, on the old leader
/// and on the new one, and a tag-less switch stays toggled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_forwarded_write_applies_once_across_a_leader_kill() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let (leader, followers) = cluster.leader_and_followers().await;
    cluster.node(leader).add_domain("ids.test", "a").await;

    let req = |tag: &str| switch_request(7, "ids.test", tag, unix_ms() + 3000);
    let (s, first) = forward_raw(cluster.node(leader), "test-cluster-secret", &req("b")).await;
    assert_eq!(s, 200, "{first}");
    let applied = &first["Done"]["outcome"]["Applied"]["Ok"]["DomainSwitched"];
    assert_eq!(applied["previous_tag"], "a", "{first}");
    let (_, again) = forward_raw(cluster.node(leader), "test-cluster-secret", &req("b")).await;
    assert_eq!(
        again["Done"]["outcome"]["Replayed"]["Ok"]["DomainSwitched"], *applied,
        "{again}"
    );

    cluster.node_mut(leader).kill9();
    let others: Vec<&Node> = followers.iter().map(|id| cluster.node(*id)).collect();
    let new_leader = wait_new_leader(&others, leader, Duration::from_secs(20)).await;
    // Even rebuilt from a later state (toggle back to "a"), the same id is not applied again.
    let (_, on_new) = forward_raw(cluster.node(new_leader), "test-cluster-secret", &req("a")).await;
    assert_eq!(
        on_new["Done"]["outcome"]["Replayed"]["Ok"]["DomainSwitched"], *applied,
        "{on_new}"
    );
    for id in &followers {
        wait_tag(cluster.node(*id), "ids.test", "b").await;
    }
}

/// A tag-less switch through a follower whose leader is frozen and then killed while the
/// forwarded write is in flight: the follower re-forwards it to the new leader and the domain
/// toggles exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tagless_switch_forwarded_across_a_leader_kill_toggles_once() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let (leader, followers) = cluster.leader_and_followers().await;
    let via = followers[0];
    cluster.node(via).add_domain("toggle.test", "a").await;
    cluster.wait_converged(Duration::from_secs(10)).await;

    let frozen = Frozen::new(cluster.node(leader));
    let node = cluster.node(via);
    let switch = send(
        node,
        reqwest::Method::POST,
        "/api/v1/domains/toggle.test/switch",
        None,
        Some(json!({"force": true})),
    );
    let kill_later = async {
        // The forward is now waiting on the frozen leader: kill it there.
        tokio::time::sleep(Duration::from_millis(500)).await;
        signal(cluster.node(leader), libc::SIGKILL);
    };
    let started = Instant::now();
    let ((status, body), ()) = tokio::join!(switch, kill_later);
    let took = started.elapsed();
    eprintln!("switch answered {status} after {took:?}: {body}");
    drop(frozen);
    cluster.node_mut(leader).kill9(); // reaps it
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous_tag"], "a", "{body}");
    for id in &followers {
        wait_tag(cluster.node(*id), "toggle.test", "b").await;
    }
}

/// The leader refuses a forwarded write past its deadline (a copy delivered late) and one with a
/// wrong secret, applies neither, and counts both by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_writes_past_their_deadline_or_with_a_wrong_secret_are_refused_and_counted() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let (leader, _) = cluster.leader_and_followers().await;
    let n = cluster.node(leader);
    n.add_domain("late.test", "a").await;

    let late = switch_request(1, "late.test", "b", unix_ms() - 1);
    let (s, body) = forward_raw(n, "test-cluster-secret", &late).await;
    assert_eq!((s, body.as_str()), (200, Some("Expired")), "{body}");
    let (s, body) = forward_raw(
        n,
        "wrong-secret",
        &switch_request(2, "late.test", "b", unix_ms() + 3000),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(tag_of(n, "late.test").await, "a", "nothing was applied");
    assert_eq!(
        n.metric("pingora_vhost_cluster_rpc_refused_total{reason=\"expired\"}")
            .await,
        1.0
    );
    assert_eq!(
        n.metric("pingora_vhost_cluster_rpc_refused_total{reason=\"auth\"}")
            .await,
        1.0
    );
    // In time and with the secret, the same request applies.
    let (auth, bytes) = sign_forward(
        "test-cluster-secret",
        &switch_request(3, "late.test", "b", unix_ms() + 3000),
    );
    let (_, body) = forward_signed(n, &auth, bytes.clone()).await;
    assert!(
        body["Done"]["outcome"]["Applied"]["Ok"].is_object(),
        "{body}"
    );
    assert_eq!(tag_of(n, "late.test").await, "b");
    // The very same signed request again (a captured one, replayed): refused, counted.
    let (s, body) = forward_signed(n, &auth, bytes.clone()).await;
    assert_eq!(s, 403, "a replayed request: {body}");
    assert_eq!(
        n.metric("pingora_vhost_cluster_rpc_refused_total{reason=\"replay\"}")
            .await,
        1.0
    );
    // Its proof on another body: the MAC does not match.
    let other = serde_json::to_vec(&switch_request(4, "late.test", "a", unix_ms() + 3000)).unwrap();
    let (s, _) = forward_signed(n, &auth, other).await;
    assert_eq!(s, 403);
    assert_eq!(
        n.metric("pingora_vhost_cluster_rpc_refused_total{reason=\"auth\"}")
            .await,
        2.0
    );
    // A proof made 31 s ago (a capture kept, or a clock that far behind).
    let stale = {
        use pingora_vhost::keyring::{hex, rpc_message, Keyring};
        let keys = Keyring::new(Some("test-cluster-secret"), None, "default");
        let t = unix_ms() - 31_000;
        let nonce = hex(&keys.random::<16>());
        let mac = keys.sign_rpc(&rpc_message("POST", "/cluster/write", t, &nonce, &bytes));
        format!("v1 t={t} n={nonce} m={}", hex(&mac))
    };
    let (s, _) = forward_signed(n, &stale, bytes).await;
    assert_eq!(s, 403);
    assert_eq!(
        n.metric("pingora_vhost_cluster_rpc_refused_total{reason=\"clock\"}")
            .await,
        1.0
    );
    assert_eq!(tag_of(n, "late.test").await, "b", "nothing applied twice");
}

/// A write through a follower while the leader is frozen is answered once a new leader is
/// elected, not after the forward's timeout; when the old leader thaws, the copy it finds in its
/// socket is past its deadline and refused, so the domain exists once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_follows_the_new_leader_when_the_old_one_freezes() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let (leader, followers) = cluster.leader_and_followers().await;
    let (via, other) = (followers[0], followers[1]);
    cluster.node(via).add_domain("before.test", "a").await;
    cluster.wait_converged(Duration::from_secs(10)).await;

    let frozen = Frozen::new(cluster.node(leader));
    let frozen_at = Instant::now();
    let write = async {
        let r = cluster
            .node(via)
            .api_post(
                "/api/v1/domains",
                json!({"domain": "frozen.test", "enabled_backends_tag": "a"}),
            )
            .await;
        (r, frozen_at.elapsed())
    };
    // When the other follower first reports a new leader.
    let elected = async {
        let others = [cluster.node(via), cluster.node(other)];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for n in &others {
                if let Some(s) = try_status(n).await {
                    if s["leader_id"].as_u64().is_some_and(|l| l != leader) {
                        return frozen_at.elapsed();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no new leader within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (((status, body), answered), elected) = tokio::join!(write, elected);
    eprintln!("new leader after {elected:?}; write answered {status} after {answered:?}: {body}");
    assert_eq!(status, 201, "{body}");
    assert!(
        answered < elected + Duration::from_millis(1500),
        "the write was answered {answered:?} after the freeze, the new leader was known after \
         {elected:?}: it waited on the frozen leader"
    );
    assert!(answered < Duration::from_secs(6), "{answered:?}");

    // Keep the old leader frozen past the forward's deadline, then thaw it.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(frozen_at.elapsed())).await;
    frozen.thaw();
    let old = cluster.node(leader);
    wait_for(
        Duration::from_secs(15),
        "the thawed old leader follows",
        || async {
            try_status(old)
                .await
                .filter(|s| s["state"] == "Follower")
                .map(|_| ())
        },
    )
    .await;
    let refused = metric_value(
        &old.metrics_text().await,
        "pingora_vhost_cluster_rpc_refused_total{reason=\"expired\"}",
    );
    eprintln!("old leader refused {refused:?} late forwarded write(s)");
    cluster.wait_converged(Duration::from_secs(15)).await;
    for n in &cluster.nodes {
        let (s, list) = n.api_list("/api/v1/domains").await;
        assert_eq!(s, 200);
        let count = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["domain"] == "frozen.test")
            .count();
        assert_eq!(count, 1, "node {:?}: {list}", n.options.node_id);
    }
}
