//! Multi-node cluster behaviour with real processes on loopback: real `kill -9`, SIGTERM,
//! SIGSTOP/SIGCONT, real data dirs. Every test asserts what a user of the cluster sees: the
//! proxy answers, the API answers, the status endpoint.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::*;
use futures::StreamExt;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers local to the cluster tests
// ---------------------------------------------------------------------------------------------

/// A client with short timeouts, for polling nodes that may be dead or frozen.
pub(crate) fn poll_client() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    })
}

/// `GET /api/v1/cluster/status`, or `None` when the node does not answer within 2 s.
pub(crate) async fn try_status(n: &Node) -> Option<Value> {
    let r = poll_client()
        .get(n.api_url("/api/v1/cluster/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?;
    if r.status().as_u16() != 200 {
        return None;
    }
    r.json().await.ok()
}

/// `(node_id, voter)` of every member listed in a status, sorted by id.
pub(crate) fn members_of(status: &Value) -> Vec<(u64, bool)> {
    let mut m: Vec<(u64, bool)> = status["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| (x["node_id"].as_u64().unwrap_or(0), x["voter"] == true))
                .collect()
        })
        .unwrap_or_default();
    m.sort();
    m
}

/// Waits until every node in `nodes` lists exactly `ids` as members, all of them voters, and
/// agrees on one leader. Returns the statuses.
async fn wait_voters(nodes: &[&Node], ids: &[u64], timeout: Duration) -> Vec<Value> {
    let want: Vec<(u64, bool)> = ids.iter().map(|i| (*i, true)).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let mut statuses = Vec::new();
        for n in nodes {
            statuses.push(try_status(n).await.unwrap_or(Value::Null));
        }
        let ok = statuses.iter().all(|s| members_of(s) == want)
            && statuses
                .iter()
                .all(|s| s["leader_id"].is_u64() && s["leader_id"] == statuses[0]["leader_id"]);
        if ok {
            return statuses;
        }
        if Instant::now() >= deadline {
            let membership_log: Vec<String> = nodes
                .iter()
                .flat_map(|n| {
                    let id = n.options.node_id;
                    n.logs()
                        .lines()
                        .filter(|l| {
                            l.contains("member") || l.contains("learner") || l.contains("promot")
                        })
                        .map(|l| format!("node {id:?}: {l}"))
                        .collect::<Vec<_>>()
                })
                .collect();
            panic!(
                "nodes {:?} did not all show voters {ids:?} with one leader within {timeout:?}; \
                 last statuses: {statuses:#?}\nmembership log lines:\n{}",
                nodes.iter().map(|n| n.options.node_id).collect::<Vec<_>>(),
                membership_log.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node in `nodes` reports the same leader, different from `old`, and that
/// leader reports itself `Leader`. Returns the new leader's id.
pub(crate) async fn wait_new_leader(nodes: &[&Node], old: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let mut statuses = Vec::new();
        for n in nodes {
            statuses.push(try_status(n).await.unwrap_or(Value::Null));
        }
        let leaders: BTreeSet<Option<u64>> =
            statuses.iter().map(|s| s["leader_id"].as_u64()).collect();
        if let [Some(l)] = leaders.iter().copied().collect::<Vec<_>>()[..] {
            let leader_says_leader = statuses
                .iter()
                .any(|s| s["node_id"].as_u64() == Some(l) && s["state"] == "Leader");
            if l != old && leader_says_leader {
                return l;
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "no new leader (other than {old}) agreed on by nodes {:?} within {timeout:?}; \
                 last statuses: {statuses:#?}",
                nodes.iter().map(|n| n.options.node_id).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Domain names listed by `GET /api/v1/domains` on `n`.
async fn domain_names(n: &Node) -> BTreeSet<String> {
    let (status, body) = n.api_list("/api/v1/domains").await;
    assert_eq!(
        status, 200,
        "GET /api/v1/domains on node {:?}: {body}",
        n.options.node_id
    );
    body.as_array()
        .expect("domain list is an array")
        .iter()
        .map(|d| d["domain"].as_str().unwrap_or_default().to_string())
        .collect()
}

pub(crate) fn signal(n: &Node, sig: libc::c_int) {
    let rc = unsafe { libc::kill(n.pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig}) failed", n.pid());
}

/// Sends SIGCONT to a node when dropped, so a failing test never leaves a stopped process
/// (the harness's SIGKILL works on stopped processes too, but SIGCONT keeps logs flushing).
pub(crate) struct Frozen(u32);
impl Frozen {
    pub(crate) fn new(n: &Node) -> Frozen {
        signal(n, libc::SIGSTOP);
        Frozen(n.pid())
    }
    pub(crate) fn thaw(self) {}
}
impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

/// Proxied GETs in a loop from background tasks, counting what the client sees.
pub(crate) struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// One sequential client per `ProxyClient`, each GETting `host` and expecting 200 `body`.
    pub(crate) fn start(clients: Vec<ProxyClient>, host: &str, body: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = clients
            .into_iter()
            .map(|c| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                let (host, body) = (host.to_string(), body.to_string());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        match c.get(&host, "/").await {
                            Ok(r) if r.status == 200 && r.body == body => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            other => failures.lock().unwrap().push(format!(
                                "via {} after {:?}: {:?}",
                                c.http_addr,
                                started.elapsed(),
                                other.map(|r| (r.status, r.body))
                            )),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    pub(crate) fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops the clients (bounded) and returns (successes, failures).
    pub(crate) async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(35), t)
                .await
                .expect("traffic task did not stop")
                .expect("traffic task panicked");
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

/// Like `Cluster::start(n, ..)`, with extra lines inside every node's `[cluster]` table.
async fn start_cluster_with(n: usize, cluster_lines: &str) -> Cluster {
    Cluster::start(n, |_| NodeOptions::new().cluster(cluster_lines)).await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// A write on a follower is committed through the leader and served by every node's proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_follower_is_served_by_every_node() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let (_, follower) = cluster.leader_and_follower().await;
    let f = cluster.node(follower);
    let (status, body) = f
        .api_post(
            "/api/v1/backends",
            json!({"id": "web-a", "address": backend.address(), "tags": ["a"]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = f
        .api_post(
            "/api/v1/domains",
            json!({"domain": "app.test", "enabled_backends_tag": "a"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Read-your-writes on the node that answered: its proxy serves the route right away.
    let r = f.proxy_get("app.test", "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "web-a"));
    for n in &cluster.nodes {
        n.wait_route("app.test", "/", "web-a").await;
    }
}

/// A partial update that clears a field (`null`), sent to a follower: it travels as JSON to the
/// leader and in the Raft log to every node, and must stay "clear" (not "keep") everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_a_field_through_a_follower_clears_it_on_every_node() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let (_, follower) = cluster.leader_and_follower().await;
    let f = cluster.node(follower);
    let (status, body) = f
        .api_post(
            "/api/v1/backends",
            json!({"id": "hc", "address": "127.0.0.1:9", "tags": ["a"], "health_check_path": "/ready"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = f
        .api_put("/api/v1/backends/hc", json!({"health_check_path": null}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["health_check_path"], Value::Null, "answer: {body}");
    for n in &cluster.nodes {
        let v = wait_for(
            Duration::from_secs(5),
            "the update on every node",
            || async {
                let (_, v) = n.api_get("/api/v1/backends/hc").await;
                (v["health_check_path"] != json!("/ready")).then_some(v)
            },
        )
        .await;
        assert_eq!(v["health_check_path"], Value::Null, "{v}");
    }
}

/// kill -9 of the leader while clients send requests through the two other nodes: no client
/// request fails, a new leader is elected within seconds, nothing acknowledged is lost, and
/// writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_loses_no_request_and_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let (old_leader, followers) = cluster.leader_and_followers().await;

    cluster
        .node(followers[0])
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(followers[1]).add_domain("app.test", "a").await;
    // Acknowledged writes through every node, the leader included.
    let writers = [followers[0], old_leader, followers[1]];
    let mut acked = vec!["app.test".to_string()];
    for i in 0..9 {
        let d = format!("acked-{i}.test");
        cluster.node(writers[i % 3]).add_domain(&d, "a").await;
        acked.push(d);
    }
    for id in &followers {
        cluster.node(*id).wait_route("app.test", "/", "web-a").await;
    }

    let clients: Vec<ProxyClient> = followers
        .iter()
        .flat_map(|id| {
            let c = cluster.node(*id).proxy_client();
            [c.clone(), c]
        })
        .collect();
    let traffic = Traffic::start(clients, "app.test", "web-a");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        traffic.ok() > 0,
        "the background clients should be getting answers"
    );

    cluster.node_mut(old_leader).kill9();
    let killed_at = Instant::now();
    let survivors: Vec<&Node> = followers.iter().map(|id| cluster.node(*id)).collect();
    let new_leader = wait_new_leader(&survivors, old_leader, Duration::from_secs(20)).await;
    let election = killed_at.elapsed();
    // Keep the traffic going a little after the election too.
    let ok_at_election = traffic.ok();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failures) = traffic.finish().await;

    assert!(
        failures.is_empty(),
        "{} of {} requests through the surviving nodes failed during the leader kill; first: {:?}",
        failures.len(),
        failures.len() + ok,
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok > ok_at_election,
        "requests kept flowing after the election ({ok_at_election} -> {ok})"
    );
    assert!(
        election < Duration::from_secs(10),
        "new leader {new_leader} elected only {election:?} after the leader was killed"
    );
    eprintln!("leader {old_leader} killed; node {new_leader} elected after {election:?}; {ok} requests ok");

    // Every acknowledged write is still there, in the API and in the proxy of both survivors.
    for n in &survivors {
        let names = domain_names(n).await;
        for d in &acked {
            assert!(
                names.contains(d),
                "node {:?} lost acknowledged domain {d}: {names:?}",
                n.options.node_id
            );
            let r = n.proxy_get(d, "/").await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "web-a"),
                "{d} via node {:?}",
                n.options.node_id
            );
        }
    }

    // A new write on a surviving follower succeeds and is served by both survivors.
    let follower_now = *followers.iter().find(|id| **id != new_leader).unwrap();
    let (status, body) = cluster
        .node(follower_now)
        .api_post(
            "/api/v1/domains",
            json!({"domain": "after-failover.test", "enabled_backends_tag": "a"}),
        )
        .await;
    assert_eq!(
        status, 201,
        "write on follower {follower_now} after the failover: {body}"
    );
    for n in &survivors {
        n.wait_route("after-failover.test", "/", "web-a").await;
    }
}

/// SIGTERM every node, start them all again on the same data dirs: every domain and backend is
/// still there and routed (even before the cluster re-forms), and the cluster comes back with
/// the same members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_restart_keeps_everything() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let web_a = Backend::start("web-a").await;
    let web_b = Backend::start("web-b").await;
    cluster
        .node(1)
        .add_backend("web-a", &web_a.address(), &["a"])
        .await;
    cluster
        .node(2)
        .add_backend("web-b", &web_b.address(), &["b"])
        .await;
    let routes = [
        ("one.test", "a", "web-a"),
        ("two.test", "b", "web-b"),
        ("three.test", "a", "web-a"),
    ];
    for (i, (d, tag, _)) in routes.iter().enumerate() {
        cluster.node(i as u64 % 3 + 1).add_domain(d, tag).await;
    }
    for n in &cluster.nodes {
        for (d, _, body) in &routes {
            n.wait_route(d, "/", body).await;
        }
    }
    cluster.wait_converged(Duration::from_secs(10)).await;
    let before = try_status(cluster.node(1)).await.expect("status");
    let member_key = |s: &Value| -> Vec<(u64, String, bool)> {
        let mut m: Vec<(u64, String, bool)> = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["node_id"].as_u64().unwrap(),
                    x["rpc_addr"].as_str().unwrap().to_string(),
                    x["voter"] == true,
                )
            })
            .collect();
        m.sort();
        m
    };
    let (_, backends_before) = cluster.node(1).api_list("/api/v1/backends").await;
    let (_, domains_before) = cluster.node(1).api_list("/api/v1/domains").await;

    for n in cluster.nodes.iter_mut() {
        n.sigterm();
    }
    for n in cluster.nodes.iter_mut() {
        let status = n.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "node {:?} should exit 0 on SIGTERM, got {status:?}\n{}",
            n.options.node_id,
            n.logs()
        );
    }

    for n in cluster.nodes.iter_mut() {
        n.spawn();
    }
    for n in cluster.nodes.iter_mut() {
        n.wait_ready().await;
        // Its proxy serves the last state from disk as soon as it is up, before any election.
        for (d, _, body) in &routes {
            let r = n.proxy_get(d, "/").await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, *body),
                "{d} via restarted node {:?}",
                n.options.node_id
            );
        }
    }
    cluster.wait_converged(Duration::from_secs(20)).await;
    for n in &cluster.nodes {
        let s = try_status(n).await.expect("status after restart");
        assert_eq!(
            member_key(&s),
            member_key(&before),
            "members after restart on node {:?}",
            n.options.node_id
        );
        assert!(
            s["last_applied"].as_u64() >= before["last_applied"].as_u64(),
            "last_applied went back: {s} vs {before}"
        );
        assert_eq!(
            n.api_list("/api/v1/domains").await,
            (200, domains_before.clone())
        );
        assert_eq!(n.api_list("/api/v1/backends").await.0, 200);
        let (_, backends) = n.api_list("/api/v1/backends").await;
        let ids = |v: &Value| -> Vec<(String, String)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["id"].as_str().unwrap().into(),
                        b["address"].as_str().unwrap().into(),
                    )
                })
                .collect()
        };
        assert_eq!(ids(&backends), ids(&backends_before));
    }
    // And the restarted cluster takes writes.
    cluster.node(3).add_domain("after-restart.test", "b").await;
    for n in &cluster.nodes {
        n.wait_route("after-restart.test", "/", "web-b").await;
    }
}

/// A 4th node joins through gossip, becomes a voter everywhere and serves the replicated
/// routes; DELETE /api/v1/cluster/members/{id} removes it while it runs, and removes a dead
/// member too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_joins_as_voter_and_members_are_removed_alive_or_dead() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    cluster
        .node(1)
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(2).add_domain("app.test", "a").await;

    cluster.join(4, NodeOptions::new()).await;
    // 4 voters on every node, same leader, same last_applied.
    cluster.wait_converged(Duration::from_secs(20)).await;
    cluster.node(4).wait_route("app.test", "/", "web-a").await;
    // The new member is a full member: a write through it is served everywhere.
    cluster.node(4).add_domain("via-four.test", "a").await;
    for n in &cluster.nodes {
        n.wait_route("via-four.test", "/", "web-a").await;
    }

    // Remove node 4 while it runs, through a follower (forwarded to the leader).
    let (_, via) = cluster.leader_and_follower().await;
    let (status, body) = cluster
        .node(via)
        .api_delete("/api/v1/cluster/members/4")
        .await;
    assert_eq!(status, 204, "DELETE live member 4 via node {via}: {body}");
    let originals: Vec<&Node> = (1..=3).map(|id| cluster.node(id)).collect();
    wait_voters(&originals, &[1, 2, 3], Duration::from_secs(10)).await;
    // Removed again: not a member any more.
    let (status, body) = cluster
        .node(via)
        .api_delete("/api/v1/cluster/members/4")
        .await;
    assert_eq!(status, 404, "DELETE of a non-member: {body}");
    // The 3-node cluster keeps working while the removed node still runs, and does not take it
    // back.
    cluster.node(via).add_domain("after-remove.test", "a").await;
    for n in &originals {
        n.wait_route("after-remove.test", "/", "web-a").await;
    }
    let before = wait_voters(&originals, &[1, 2, 3], Duration::from_secs(5)).await;
    // Longer than an election timeout of the removed node (1-2 s): it must not disturb the
    // cluster (no new election, same leader).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = wait_voters(&originals, &[1, 2, 3], Duration::from_secs(5)).await;
    assert_eq!(
        (&after[0]["leader_id"], &after[0]["term"]),
        (&before[0]["leader_id"], &before[0]["term"]),
        "the removed node (still running) disturbed the cluster: before {:#?} after {:#?}\nremoved node's status: {:?}",
        before[0],
        after[0],
        try_status(cluster.node(4)).await
    );
    cluster.node_mut(4).kill9();

    // A 5th node joins, then dies; removing the dead member works.
    cluster.join(5, NodeOptions::new()).await;
    let five: Vec<&Node> = [1, 2, 3, 5].iter().map(|id| cluster.node(*id)).collect();
    wait_voters(&five, &[1, 2, 3, 5], Duration::from_secs(20)).await;
    cluster.node_mut(5).kill9();
    let (status, body) = cluster
        .node(1)
        .api_delete("/api/v1/cluster/members/5")
        .await;
    assert_eq!(status, 204, "DELETE dead member 5: {body}");
    let originals: Vec<&Node> = (1..=3).map(|id| cluster.node(id)).collect();
    wait_voters(&originals, &[1, 2, 3], Duration::from_secs(10)).await;
    cluster
        .node(2)
        .add_domain("after-dead-remove.test", "a")
        .await;
    for n in &originals {
        n.wait_route("after-dead-remove.test", "/", "web-a").await;
    }
}

/// A node started with the wrong cluster secret never becomes a member and cannot write, and
/// the real secret never reaches it (a packet capture of its RPC port); a cluster RPC without
/// a valid MAC is refused with 403, even one carrying the real secret in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_cannot_join_or_write() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let (leader, _) = cluster.leader_and_followers().await;
    cluster.join(4, NodeOptions::new().secret("wrong")).await;
    let capture = Capture::tcp_on_loopback(&[cluster.node(4).rpc_addr.port()]);

    let real: Vec<&Node> = (1..=3).map(|id| cluster.node(id)).collect();
    let intruder = cluster.node(4);
    // While the intruder's write waits for an answer, watch the real cluster for 5 s.
    let write = async {
        let started = Instant::now();
        let r = intruder
            .api_post(
                "/api/v1/domains",
                json!({"domain": "intruder.test", "enabled_backends_tag": "a"}),
            )
            .await;
        (r, started.elapsed())
    };
    let observe = async {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            for n in &real {
                if let Some(s) = try_status(n).await {
                    assert!(
                        !members_of(&s).iter().any(|(id, _)| *id == 4),
                        "node 4 (wrong secret) appears as a member on node {:?}: {s}",
                        n.options.node_id
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (((status, body), took), ()) = tokio::join!(write, observe);
    assert_eq!(
        status, 503,
        "write on the wrong-secret node: {body} (after {took:?})"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "503 without a reason: {body}"
    );
    eprintln!("wrong-secret node's write answered 503 after {took:?}: {body}");
    // Its gossip, sealed under another key, is dropped unread: the leader never even learns
    // its RPC address.
    let leader_node = cluster.node(leader);
    wait_for(
        Duration::from_secs(5),
        "the leader drops node 4's gossip as forged",
        || async {
            let text = leader_node.metrics_text().await;
            metric_value(
                &text,
                "pingora_vhost_gossip_dropped_total{reason=\"forged\"}",
            )
            .filter(|n| *n > 0.0)
        },
    )
    .await;
    for n in &real {
        let (status, _) = n.api_get("/api/v1/domains/intruder.test").await;
        assert_eq!(
            status, 404,
            "the intruder's domain must not exist on node {:?}",
            n.options.node_id
        );
        assert_eq!(
            members_of(&try_status(n).await.unwrap()),
            vec![(1, true), (2, true), (3, true)]
        );
    }

    // Cluster RPC straight to a member with a wrong secret (or none) is refused: in plaintext
    // with 426 (TLS required), over TLS with a certificate of the cluster CA but no valid
    // request MAC with 403.
    let cmd = json!({"CreateDomain": {"domain": "rpc-intruder.test", "enabled_backends_tag": "a",
        "http_to_https": false, "tls": "none", "cert": null}});
    let target = cluster.node(leader);
    let plain = poll_client()
        .post(format!("http://{}/cluster/write", target.rpc_addr))
        .header("x-pingora-vhost-secret", "test-cluster-secret")
        .json(&cmd)
        .send()
        .await
        .expect("plaintext POST /cluster/write");
    assert_eq!(plain.status().as_u16(), 426, "plaintext cluster RPC");
    let rpc = RpcClient::to(target, "test-cluster-secret", 99);
    for secret in [Some("wrong"), None, Some("test-cluster-secret")] {
        let mut req = rpc
            .post("/cluster/write")
            .header("x-pingora-vhost-cluster", "default")
            .json(&cmd);
        if let Some(s) = secret {
            req = req.header("x-pingora-vhost-secret", s);
        }
        let r = req.send().await.expect("POST /cluster/write");
        assert_eq!(
            r.status().as_u16(),
            403,
            "cluster RPC with secret {secret:?}"
        );
    }
    let (status, _) = target.api_get("/api/v1/domains/rpc-intruder.test").await;
    assert_eq!(status, 404, "a refused RPC must not write");
    wait_for(
        Duration::from_secs(5),
        "the member logs the refused RPC",
        || async { target.logs().contains("refused cluster RPC").then_some(()) },
    )
    .await;
    let (flows, _) = capture.finish();
    let received: usize = flows.values().map(Vec::len).sum();
    eprintln!("node 4's RPC port saw {received} bytes");
    for (flow, bytes) in &flows {
        assert!(
            !contains(bytes, b"test-cluster-secret"),
            "the real secret reached the intruder in flow {flow:?}"
        );
    }
}

/// SIGSTOP of a follower does not stop the others; after SIGCONT it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_follower_does_not_block_and_catches_up() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let (leader, followers) = cluster.leader_and_followers().await;
    let (frozen_id, other) = (followers[0], followers[1]);
    cluster
        .node(other)
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(leader).add_domain("app.test", "a").await;
    for n in &cluster.nodes {
        n.wait_route("app.test", "/", "web-a").await;
    }

    let frozen = Frozen::new(cluster.node(frozen_id));
    let frozen_at = Instant::now();
    let mut written = Vec::new();
    for i in 0..4 {
        let d = format!("while-frozen-{i}.test");
        let via = if i % 2 == 0 { other } else { leader };
        let started = Instant::now();
        cluster.node(via).add_domain(&d, "a").await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "write via node {via} took {:?} with one follower frozen",
            started.elapsed()
        );
        written.push(d);
    }
    for id in [leader, other] {
        for d in &written {
            cluster.node(id).wait_route(d, "/", "web-a").await;
        }
    }
    // Stay frozen long enough for the failure detector and the leader's replication to notice.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(frozen_at.elapsed())).await;
    frozen.thaw();

    for d in &written {
        cluster.node(frozen_id).wait_route(d, "/", "web-a").await;
    }
    cluster.wait_converged(Duration::from_secs(15)).await;
}

/// SIGSTOP of the leader: the two others elect a new leader and take writes; after SIGCONT the
/// old leader follows the new one and serves what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_leader_is_replaced_and_follows_after_thaw() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let (old_leader, followers) = cluster.leader_and_followers().await;
    cluster
        .node(followers[0])
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(followers[1]).add_domain("app.test", "a").await;
    for n in &cluster.nodes {
        n.wait_route("app.test", "/", "web-a").await;
    }

    let frozen = Frozen::new(cluster.node(old_leader));
    let frozen_at = Instant::now();
    let others: Vec<&Node> = followers.iter().map(|id| cluster.node(*id)).collect();
    let new_leader = wait_new_leader(&others, old_leader, Duration::from_secs(20)).await;
    let election = frozen_at.elapsed();
    assert!(
        election < Duration::from_secs(10),
        "new leader elected only {election:?} after the leader froze"
    );
    let other_follower = *followers.iter().find(|id| **id != new_leader).unwrap();
    let mut written = Vec::new();
    for (i, via) in [other_follower, new_leader].iter().enumerate() {
        let d = format!("while-leader-frozen-{i}.test");
        cluster.node(*via).add_domain(&d, "a").await;
        written.push(d);
    }
    for n in &others {
        for d in &written {
            n.wait_route(d, "/", "web-a").await;
        }
    }
    frozen.thaw();

    let old = cluster.node(old_leader);
    let s = wait_for(
        Duration::from_secs(15),
        "the thawed old leader follows the new one",
        || async {
            try_status(old)
                .await
                .filter(|s| s["leader_id"].as_u64() == Some(new_leader) && s["state"] == "Follower")
        },
    )
    .await;
    eprintln!("old leader after thaw: {s}");
    for d in &written {
        old.wait_route(d, "/", "web-a").await;
    }
    cluster.wait_converged(Duration::from_secs(15)).await;
}

/// kill -9 of two of three nodes: the survivor (the leader) keeps proxying from its table and
/// answering API reads; a write answers 503 with a reason within ~10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_survivor_serves_and_refuses_writes() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let (leader, followers) = cluster.leader_and_followers().await;
    cluster
        .node(followers[0])
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(followers[1]).add_domain("app.test", "a").await;
    cluster.node(leader).add_domain("two.test", "a").await;
    cluster
        .node(leader)
        .wait_route("app.test", "/", "web-a")
        .await;

    for id in &followers {
        cluster.node_mut(*id).kill9();
    }
    let survivor = cluster.node(leader);
    for _ in 0..10 {
        for d in ["app.test", "two.test"] {
            let r = survivor.proxy_get(d, "/").await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, "web-a"),
                "{d} without quorum"
            );
        }
    }
    assert_eq!(
        domain_names(survivor).await,
        BTreeSet::from(["app.test".to_string(), "two.test".to_string()])
    );
    let (status, body) = survivor.api_get("/api/v1/backends/web-a").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        try_status(survivor).await.is_some(),
        "status answers without quorum"
    );

    let started = Instant::now();
    let (status, body) = survivor
        .api_post(
            "/api/v1/domains",
            json!({"domain": "refused.test", "enabled_backends_tag": "a"}),
        )
        .await;
    let took = started.elapsed();
    eprintln!("write without quorum on the leader: {status} {body} after {took:?}");
    assert_eq!(status, 503, "write without quorum: {body}");
    let msg = body["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        msg.contains("quorum") || msg.contains("leader"),
        "the 503 should say why (quorum/leader): {body}"
    );
    assert!(took < Duration::from_secs(12), "the 503 took {took:?}");
    // Proxying and reads still work after the refused write.
    let r = survivor.proxy_get("app.test", "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "web-a"));
    let (status, _) = survivor.api_get("/api/v1/domains/refused.test").await;
    assert_eq!(status, 404, "a refused write must not be visible");
}

/// The same, seen from a follower that survives alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_surviving_follower_serves_and_refuses_writes() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let (leader, followers) = cluster.leader_and_followers().await;
    let survivor_id = followers[0];
    cluster
        .node(leader)
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(survivor_id).add_domain("app.test", "a").await;

    cluster.node_mut(leader).kill9();
    cluster.node_mut(followers[1]).kill9();
    let survivor = cluster.node(survivor_id);
    let r = survivor.proxy_get("app.test", "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "web-a"));
    assert!(domain_names(survivor).await.contains("app.test"));

    let started = Instant::now();
    let (status, body) = survivor
        .api_post(
            "/api/v1/domains",
            json!({"domain": "refused.test", "enabled_backends_tag": "a"}),
        )
        .await;
    let took = started.elapsed();
    eprintln!("write without quorum on a follower: {status} {body} after {took:?}");
    assert_eq!(status, 503, "write without quorum: {body}");
    let msg = body["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        msg.contains("quorum") || msg.contains("leader"),
        "503 reason: {body}"
    );
    assert!(took < Duration::from_secs(12), "the 503 took {took:?}");
    let r = survivor.proxy_get("app.test", "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "web-a"));
}

/// A write refused with 503 for lack of quorum must not show up later when the quorum comes
/// back ("a rejected request changes nothing", docs/api.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_refused_without_quorum_is_not_applied_when_quorum_returns() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let (leader, followers) = cluster.leader_and_followers().await;
    cluster
        .node(leader)
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(leader).add_domain("app.test", "a").await;
    cluster.wait_converged(Duration::from_secs(10)).await;

    for id in &followers {
        cluster.node_mut(*id).kill9();
    }
    let (status, body) = cluster
        .node(leader)
        .api_post(
            "/api/v1/domains",
            json!({"domain": "refused.test", "enabled_backends_tag": "a"}),
        )
        .await;
    assert_eq!(status, 503, "write without quorum: {body}");

    for id in &followers {
        cluster.node_mut(*id).restart().await;
    }
    cluster.wait_converged(Duration::from_secs(20)).await;
    // Give a re-proposed entry time to commit and apply everywhere.
    cluster
        .node(followers[0])
        .add_domain("after-quorum.test", "a")
        .await;
    cluster.wait_converged(Duration::from_secs(10)).await;
    for n in &cluster.nodes {
        let (status, body) = n.api_get("/api/v1/domains/refused.test").await;
        assert_eq!(
            status, 404,
            "node {:?}: the write answered 503 earlier, yet refused.test exists now: {body}",
            n.options.node_id
        );
    }
}

/// A follower that was away while the log was compacted catches up from a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_catches_up_by_snapshot_after_compaction() {
    // Snapshot (and compact) every 10 entries, so a few dozen writes purge the log.
    let mut cluster = start_cluster_with(3, "snapshot_logs = 10").await;
    let backend = Backend::start("web-a").await;
    let (leader, followers) = cluster.leader_and_followers().await;
    let (away, other) = (followers[0], followers[1]);
    cluster
        .node(leader)
        .add_backend("web-a", &backend.address(), &["a"])
        .await;
    cluster.node(other).add_domain("app.test", "a").await;
    cluster.wait_converged(Duration::from_secs(10)).await;

    cluster.node_mut(away).kill9();
    let names: Vec<String> = (0..60).map(|i| format!("snap-{i}.test")).collect();
    {
        let (l, o) = (cluster.node(leader), cluster.node(other));
        futures::stream::iter(names.iter().enumerate())
            .for_each_concurrent(8, |(i, d)| async move {
                let via = if i % 2 == 0 { l } else { o };
                via.add_domain(d, "a").await;
            })
            .await;
    }
    cluster.node_mut(away).restart().await;
    let n = cluster.node(away);
    n.wait_route(names.last().unwrap(), "/", "web-a").await;
    cluster.wait_converged(Duration::from_secs(20)).await;
    // Make sure this test exercised the path it is about: the log was compacted while the node
    // was away, so it must have received a snapshot (the node logs it at info level).
    let log = std::fs::read_to_string(n.dir.path().join("stderr.log")).unwrap_or_default();
    assert!(
        log.contains("installed a snapshot received from the leader"),
        "node {away} caught up without installing a snapshot; the test did not compact the log \
         enough\n{}",
        n.logs()
    );
    // ... as bytes (`/raft/snapshot-chunk`), not in the JSON form kept for older peers.
    assert!(
        !log.contains("snapshot received as JSON"),
        "node {away} got the snapshot in the JSON form meant for older versions\n{}",
        n.logs()
    );
    let names_there = domain_names(n).await;
    for d in &names {
        assert!(
            names_there.contains(d),
            "node {away} misses {d} after catching up"
        );
        let r = n.proxy_get(d, "/").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "web-a"),
            "{d} via node {away}"
        );
    }
}

/// A graceful binary upgrade (SIGQUIT) of one member under traffic: no request through it
/// fails, it keeps its membership and log, and takes writes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_of_a_member_under_traffic() {
    let mut cluster =
        Cluster::start(3, |_| NodeOptions::new().proxy("shutdown_grace_secs = 1")).await;
    let backend = Backend::start("web-a").await;
    let (_, follower) = cluster.leader_and_follower().await;
    let f = cluster.node(follower);
    f.add_backend("web-a", &backend.address(), &["a"]).await;
    f.add_domain("up.test", "a").await;
    for n in &cluster.nodes {
        n.wait_route("up.test", "/", "web-a").await;
    }

    let load = GetLoop::start(cluster.node(follower).proxy_client(), "up.test", "web-a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old_exit = cluster.node_mut(follower).upgrade_and_wait_old().await;
    assert_eq!(
        old_exit.code(),
        Some(0),
        "old process exits 0 after SIGQUIT"
    );
    cluster.node_mut(follower).wait_ready().await;
    // Still a voter of the same cluster, with the replicated state, and writable.
    cluster.wait_converged(Duration::from_secs(20)).await;
    cluster
        .node(follower)
        .add_domain("after-upgrade.test", "a")
        .await;
    for n in &cluster.nodes {
        n.wait_route("after-upgrade.test", "/", "web-a").await;
    }
    let (sent, failed) = load.finish().await;
    eprintln!(
        "member upgrade: {sent} GETs through node {follower}, {} failed",
        failed.len()
    );
    assert!(sent > 100, "the load must span the handover");
    assert!(
        failed.is_empty(),
        "GETs through the upgraded node failed: {failed:?}\n{}",
        cluster.node(follower).logs()
    );
}
