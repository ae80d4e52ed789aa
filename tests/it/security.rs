//! Cluster security from the outside (docs/cluster.md "Security"): the secret never crosses the
//! wire, gossip is sealed (a host without the secret is neither heard nor told anything), and
//! forged or replayed gossip is dropped and counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig};
use tokio::io::AsyncReadExt;

use crate::cluster::{members_of, poll_client, try_status, Traffic};
use crate::common::*;

const SECRET: &str = "s3cret-that-must-never-cross-the-wire";

fn options() -> NodeOptions {
    NodeOptions::new().secret(SECRET)
}

/// A TCP server that records every connection and every byte it receives.
struct Recorder {
    addr: SocketAddr,
    connections: Arc<Mutex<usize>>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(0));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (c, b) = (connections.clone(), bytes.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                *c.lock().unwrap() += 1;
                let b = b.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        b.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Recorder {
            addr,
            connections,
            bytes,
        }
    }
}

async fn dropped(node: &Node, reason: &str) -> f64 {
    let text = node.metrics_text().await;
    metric_value(
        &text,
        &format!("pingora_vhost_gossip_dropped_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// A peer speaking plain chitchat (the crate's own messages and codec, as every node did before
/// gossip was sealed) advertises an RPC address the test listens on. The old leader would POST
/// the secret there within a second; now the nodes drop its gossip unread, so it is never seen,
/// never checked, never a member, and its listener receives nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_gossip_peer_receives_nothing_and_never_joins() {
    let cluster = Cluster::start(3, |_| options()).await;
    let recorder = Recorder::start().await;
    let gossip_addr = free_addr();
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new("99", 1, gossip_addr),
        cluster_id: "default".into(),
        gossip_interval: Duration::from_millis(200),
        listen_addr: gossip_addr,
        seed_nodes: cluster.seeds().iter().map(|s| s.to_string()).collect(),
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    };
    let fake = spawn_chitchat(
        config,
        vec![
            ("rpc_addr".into(), recorder.addr.to_string()),
            ("raft_initialized".into(), "false".into()),
        ],
        &UdpTransport,
    )
    .await
    .expect("fake gossip peer");
    let mut before = Vec::new();
    for n in &cluster.nodes {
        before.push(dropped(n, "unsealed").await);
    }

    // Membership runs every 300 ms: 8 s is many rounds for the leader to act on the peer.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for n in &cluster.nodes {
            if let Some(s) = try_status(n).await {
                assert!(
                    !members_of(&s).iter().any(|(id, _)| *id == 99),
                    "the plain gossip peer became a member: {s}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let connections = *recorder.connections.lock().unwrap();
    let received = recorder.bytes.lock().unwrap().clone();
    assert!(
        !contains(&received, SECRET.as_bytes()),
        "the secret reached the advertised address"
    );
    assert_eq!(
        connections,
        0,
        "the advertised rpc_addr was contacted ({} bytes): {}",
        received.len(),
        String::from_utf8_lossy(&received)
    );
    // It learnt nothing either: it cannot read the sealed answers.
    let seen: Vec<String> = fake
        .chitchat()
        .lock()
        .await
        .live_nodes()
        .map(|id| id.node_id.to_string())
        .collect();
    assert_eq!(seen, vec!["99".to_string()], "the fake peer saw nodes");
    for (n, before) in cluster.nodes.iter().zip(before) {
        let after = dropped(n, "unsealed").await;
        assert!(
            after > before,
            "node {:?} did not count the plain gossip as unsealed ({before} -> {after})",
            n.options.node_id
        );
    }
}

/// Gossip between node 4 and node 1 passes through a UDP relay of ours: the sealed datagrams
/// it records are replayed (many times) and forged (one byte flipped) to the members. They are
/// dropped and counted, and neither liveness nor a health verdict moves, even for node 4 once
/// it is dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_forged_gossip_is_dropped_and_changes_nothing() {
    let cluster = Cluster::start(3, |_| options().health_interval(1)).await;
    let web = Backend::start("web").await;
    cluster
        .node(1)
        .add_backend("web", &web.address(), &["a"])
        .await;
    for n in &cluster.nodes {
        n.wait_backend_health("web", true, Duration::from_secs(10))
            .await;
    }

    // The relay: node 4's only seed. What comes from node 1 goes back to node 4's side.
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let node1 = cluster.node(1).gossip_addr;
    let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let relay_task = tokio::spawn({
        let captured = captured.clone();
        async move {
            let mut buf = vec![0u8; 70_000];
            let mut peer: Option<SocketAddr> = None;
            while let Ok((n, from)) = relay.recv_from(&mut buf).await {
                if from == node1 {
                    if let Some(p) = peer {
                        let _ = relay.send_to(&buf[..n], p).await;
                    }
                } else {
                    peer = Some(from);
                    captured.lock().unwrap().push(buf[..n].to_vec());
                    let _ = relay.send_to(&buf[..n], node1).await;
                }
            }
        }
    });
    let mut node4 = Node::start(
        options()
            .node_id(4)
            .bootstrap_expect(3)
            .seeds(&[relay_addr]),
    )
    .await;
    wait_for(Duration::from_secs(20), "node 4 joins", || async {
        try_status(cluster.node(1))
            .await
            .filter(|s| members_of(s).iter().any(|(id, _)| *id == 4))
    })
    .await;
    relay_task.abort();
    let packets = captured.lock().unwrap().clone();
    assert!(!packets.is_empty(), "the relay saw no gossip");
    assert!(
        packets.iter().all(|p| p.starts_with(b"PVG1")),
        "gossip not sealed"
    );

    let n1 = cluster.node(1);
    let (replay0, forged0) = (dropped(n1, "replay").await, dropped(n1, "forged").await);
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Every captured datagram reached node 1 once already, through the relay.
    for _ in 0..3 {
        for p in &packets {
            attacker.send_to(p, node1).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let forged: Vec<Vec<u8>> = packets
        .iter()
        .map(|p| {
            let mut f = p.clone();
            let i = f.len() - 20;
            f[i] ^= 0x01;
            f
        })
        .collect();
    for f in &forged {
        attacker.send_to(f, node1).await.unwrap();
    }
    let want_replays = (3 * packets.len()) as f64;
    wait_for(
        Duration::from_secs(5),
        "node 1 counts the replays and forgeries",
        || async {
            let r = dropped(n1, "replay").await - replay0;
            let f = dropped(n1, "forged").await - forged0;
            (r >= want_replays && f >= forged.len() as f64).then_some(())
        },
    )
    .await;

    // Node 4 dies; its recorded gossip, replayed for 6 s, must not keep it alive anywhere.
    node4.kill9();
    let flood_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < flood_until {
        for p in packets.iter().chain(&forged) {
            for n in &cluster.nodes {
                let _ = attacker.send_to(p, n.gossip_addr).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in &cluster.nodes {
        let s = try_status(n).await.expect("status");
        for m in s["members"].as_array().unwrap() {
            let (id, alive) = (m["node_id"].as_u64().unwrap(), m["alive"] == true);
            assert_eq!(
                alive,
                id != 4,
                "liveness of node {id} on {n:?}: {s}",
                n = n.options.node_id
            );
        }
        n.wait_backend_health("web", true, Duration::from_secs(1))
            .await;
    }
    for n in &cluster.nodes[1..3] {
        assert!(
            dropped(n, "replay").await + dropped(n, "forged").await > 0.0,
            "node {:?} counted nothing",
            n.options.node_id
        );
    }
}

/// Everything the nodes' RPC ports send and receive, as a packet capture on `lo` sees it,
/// while a follower forwards writes (one of them carries a certificate's private key) and a
/// fourth node is checked, joins and catches up: it is all TLS. Neither the secret, nor the
/// private key, nor a request line, header or domain name appears in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_rpc_traffic_is_tls_and_carries_no_secret_and_no_key() {
    let mut cluster = Cluster::start(3, |_| options()).await;
    let joiner = Node::new_unstarted(
        options()
            .node_id(4)
            .bootstrap_expect(3)
            .seeds(&cluster.seeds()),
    );
    let mut ports: Vec<u16> = cluster.nodes.iter().map(|n| n.rpc_addr.port()).collect();
    ports.push(joiner.rpc_addr.port());
    let capture = Capture::tcp_on_loopback(&ports);

    let (_, follower) = cluster.leader_and_follower().await;
    let f = cluster.node(follower);
    f.add_backend("web", "127.0.0.1:9", &["a"]).await;
    let cert = self_signed(&["captured.test"]);
    let (status, body) = f
        .api_post(
            "/api/v1/domains",
            serde_json::json!({"domain": "captured.test", "enabled_backends_tag": "a",
                "tls": "manual", "cert_pem": cert.cert_pem, "key_pem": cert.key_pem}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let joiner = joiner.start_spawned().await;
    wait_for(
        Duration::from_secs(20),
        "node 4 becomes a voter",
        || async {
            try_status(cluster.node(1))
                .await
                .filter(|s| members_of(s).contains(&(4, true)))
        },
    )
    .await;
    wait_for(Duration::from_secs(10), "node 4 has the domain", || async {
        (joiner.api_get("/api/v1/domains/captured.test").await.0 == 200).then_some(())
    })
    .await;

    let (flows, drops) = capture.finish();
    let all: Vec<u8> = flows.values().flatten().copied().collect();
    eprintln!(
        "captured {} bytes in {} flows ({drops} packets dropped by the kernel)",
        all.len(),
        flows.len()
    );
    // A line of the key's base64 (JSON escapes the newlines between lines, not inside one).
    let key_line = cert
        .key_pem
        .lines()
        .find(|l| l.len() >= 40 && !l.starts_with("-----"))
        .expect("a base64 line in the key")
        .to_string();
    for (flow, bytes) in &flows {
        for (what, needle) in [
            ("the secret", SECRET.as_bytes()),
            ("the private key", key_line.as_bytes()),
            ("a PEM key header", b"PRIVATE KEY"),
            ("the domain name", b"captured.test"),
            ("a request line", b"POST /"),
            ("an HTTP head", b"HTTP/1.1"),
            ("the proof header", b"x-pingora-vhost-auth"),
        ] {
            assert!(
                !contains(bytes, needle),
                "{what} crossed the wire in clear in flow {flow:?}"
            );
        }
    }
    // The capture saw the traffic (so an empty capture cannot pass): the joiner's new
    // connections start with TLS handshake records, and the Raft traffic is substantial.
    let handshakes = flows
        .iter()
        .filter(|((_, dst), b)| ports.contains(dst) && b.starts_with(&[0x16, 0x03]))
        .count();
    assert!(
        handshakes >= 2,
        "fewer than 2 connections started with a TLS handshake ({handshakes})"
    );
    assert!(all.len() > 20_000, "only {} bytes captured", all.len());
}

/// How many TLS handshakes `n` refused on its RPC port.
async fn refused(n: &Node) -> f64 {
    metric_value(
        &n.metrics_text().await,
        "pingora_vhost_cluster_rpc_refused_total{reason=\"tls\"}",
    )
    .unwrap_or(0.0)
}

/// `[cluster.tls]` with the operator's CA files. A node whose certificate comes from another
/// CA (with the right secret, so only TLS stands in its way) is refused: it cannot join, a
/// member restarted with it receives no appends (and catches up once it has the cluster's CA
/// again), and a client with its certificate cannot even send an append, while one with a
/// certificate of the cluster's CA reaches the request check (403 without a proof).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let files = tempfile::tempdir().unwrap();
    let (ca, other) = (test_ca("cluster CA"), test_ca("another CA"));
    let (ca_cert, ca_key) = ca.write_files(files.path(), "ca");
    let (other_cert, other_key) = other.write_files(files.path(), "other");
    let tls_files = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[cluster.tls]\nca_cert_path = '{}'\nca_key_path = '{}'\n",
            cert.display(),
            key.display()
        )
    };
    let cluster_ca = tls_files(&ca_cert, &ca_key);
    let other_ca = tls_files(&other_cert, &other_key);
    let mut cluster = Cluster::start(3, |_| options().extra(&cluster_ca)).await;
    let (leader, _) = cluster.leader_and_followers().await;

    // Cannot join.
    let intruder = Node::start(
        options()
            .extra(&other_ca)
            .node_id(4)
            .bootstrap_expect(3)
            .seeds(&cluster.seeds()),
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "node 4 refuses the leader's handshakes (its challenge)",
        || async { (refused(&intruder).await > 0.0).then_some(()) },
    )
    .await;
    for _ in 0..10 {
        for n in &cluster.nodes {
            let s = try_status(n).await.expect("status");
            assert_eq!(
                members_of(&s),
                vec![(1, true), (2, true), (3, true)],
                "node 4 became a member"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        cluster
            .node(leader)
            .logs()
            .contains("not adding node seen in gossip"),
        "the leader did not turn node 4 down"
    );
    drop(intruder);

    // Cannot append: the handshake fails. With the cluster CA's certificate the same call
    // gets through TLS and is refused by the request check instead.
    let n1 = cluster.node(1);
    let before = refused(n1).await;
    let append = serde_json::json!({"vote": {}, "entries": []});
    let foreign = RpcClient::with(n1, &other.issuer(), &ca.issuer(), 2)
        .post("/raft/append")
        .json(&append)
        .send()
        .await;
    assert!(
        foreign.is_err(),
        "an append with another CA's certificate: {foreign:?}"
    );
    assert!(
        refused(n1).await > before,
        "node 1 did not count the refused handshake"
    );
    let member = RpcClient::with(n1, &ca.issuer(), &ca.issuer(), 2)
        .post("/raft/append")
        .json(&append)
        .send()
        .await
        .expect("an append with the cluster CA's certificate gets an answer");
    assert_eq!(
        member.status().as_u16(),
        403,
        "no request proof: refused by the MAC check"
    );

    // A member restarted with another CA's certificate is cut off.
    let (leader, followers) = cluster.leader_and_followers().await;
    let cut = followers[1];
    {
        let n = cluster.node_mut(cut);
        n.options.extra = other_ca.clone();
        n.write_config();
        n.restart().await;
    }
    cluster
        .node(leader)
        .add_domain("while-cut-off.test", "a")
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = cluster
        .node(cut)
        .api_get("/api/v1/domains/while-cut-off.test")
        .await;
    assert_eq!(status, 404, "node {cut} with another CA received an append");
    assert!(refused(cluster.node(cut)).await > 0.0);
    // Back with the cluster's CA, it catches up.
    {
        let n = cluster.node_mut(cut);
        n.options.extra = cluster_ca.clone();
        n.write_config();
        n.restart().await;
    }
    wait_for(Duration::from_secs(15), "the member catches up", || async {
        (cluster
            .node(cut)
            .api_get("/api/v1/domains/while-cut-off.test")
            .await
            .0
            == 200)
            .then_some(())
    })
    .await;
}

/// Rotation of a node certificate from files (`cert_path`/`key_path`): SIGHUP makes new
/// connections get the new certificate, without a restart (the node keeps running: SIGHUP does
/// not stop it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_node_certificate() {
    let files = tempfile::tempdir().unwrap();
    let ca = test_ca("cluster CA");
    let (ca_cert, _) = ca.write_files(files.path(), "ca");
    let first = ca.issue(&["node-1.pingora-vhost.internal"]);
    let (cert, key) = first.write_files(files.path(), "node");
    let node = Node::start(options().extra(&format!(
        "[cluster.tls]\nca_cert_path = '{}'\ncert_path = '{}'\nkey_path = '{}'\n",
        ca_cert.display(),
        cert.display(),
        key.display()
    )))
    .await;
    let presented = || async {
        let client = RpcClient::with(&node, &ca.issuer(), &ca.issuer(), 7);
        let r = client
            .post("/cluster/applied")
            .json(&7)
            .send()
            .await
            .expect("RPC over mutual TLS");
        r.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .map(|d| d.to_vec())
            .expect("the node's certificate")
    };
    assert_eq!(presented().await, first.der);
    let second = ca.issue(&["node-1.pingora-vhost.internal"]);
    second.write_files(files.path(), "node");
    let pid = node.pid() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for(
        Duration::from_secs(5),
        "new connections get the new certificate",
        || async { (presented().await == second.der).then_some(()) },
    )
    .await;
    let mut node = node;
    assert!(node.is_running(), "SIGHUP stopped the node");
}

/// `[api] client_ca_path`: only a client presenting a certificate of that CA gets past the TLS
/// handshake; one without a certificate, or with another CA's, is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_api_requires_a_client_certificate_of_the_client_ca() {
    let files = tempfile::tempdir().unwrap();
    let server = self_signed(&["api.test"]);
    let (c, k) = server.write_files(files.path(), "api");
    let (clients, other) = (test_ca("API clients"), test_ca("someone else"));
    let (client_ca, _) = clients.write_files(files.path(), "clients");
    let mut node = Node::new_unstarted(NodeOptions::new().api(&format!(
        "tls_cert_path = '{}'\ntls_key_path = '{}'\nclient_ca_path = '{}'",
        c.display(),
        k.display(),
        client_ca.display()
    )));
    node.spawn();
    let api = node.api_addr;
    let client = |identity: Option<&TestCert>| {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(server.cert_pem.as_bytes()).unwrap(),
            )
            .resolve("api.test", api)
            .timeout(Duration::from_secs(2));
        if let Some(id) = identity {
            let pem = format!("{}{}", id.cert_pem, id.key_pem);
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    };
    let url = format!("https://api.test:{}/api/v1/domains", api.port());
    let admin = client(Some(&clients.issue(&["admin"])));
    wait_for(
        Duration::from_secs(20),
        "the API answers a client with a certificate",
        || async {
            let r = admin.get(&url).bearer_auth(TOKEN).send().await.ok()?;
            (r.status().as_u16() == 200).then_some(())
        },
    )
    .await;
    for (who, c) in [
        ("no certificate", client(None)),
        (
            "another CA's certificate",
            client(Some(&other.issue(&["admin"]))),
        ),
    ] {
        let r = c.get(&url).bearer_auth(TOKEN).send().await;
        assert!(r.is_err(), "a client with {who} got an answer: {r:?}");
    }
    drop(node);
}

/// `[api] tls_cert_path`/`tls_key_path`: the management API answers over HTTPS with that
/// certificate (the bearer token never crosses in clear), and a plain HTTP request to it gets
/// no HTTP answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_api_is_served_over_tls_with_the_configured_certificate() {
    let cert = self_signed(&["api.test"]);
    let files = tempfile::tempdir().unwrap();
    let (c, k) = cert.write_files(files.path(), "api");
    let mut node = Node::new_unstarted(NodeOptions::new().api(&format!(
        "tls_cert_path = '{}'\ntls_key_path = '{}'",
        c.display(),
        k.display()
    )));
    node.spawn();
    let api = node.api_addr;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap())
        .resolve("api.test", api)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = |path: &str| format!("https://api.test:{}{path}", api.port());
    wait_for(
        Duration::from_secs(20),
        "GET /api/v1/health over TLS",
        || async {
            let r = client.get(url("/api/v1/health")).send().await.ok()?;
            (r.status().as_u16() == 200).then_some(())
        },
    )
    .await;
    let r = client
        .get(url("/api/v1/domains"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client.get(url("/api/v1/domains")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let plain = reqwest::Client::new()
        .get(format!("http://{api}/api/v1/domains"))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
    // A client that does not trust the certificate does not get through either.
    let untrusting = reqwest::Client::builder()
        .resolve("api.test", api)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    assert!(untrusting.get(url("/api/v1/health")).send().await.is_err());
    drop(node);
}

/// The documented migration from plaintext RPC (docs/cluster.md "Migrating to mutual TLS"): a
/// cluster running `rpc_tls = "off"` under proxied load through every node is upgraded node by
/// node (graceful upgrade, new config) to "mixed", then node by node to "required". No proxied
/// request fails, and a write through another node works after every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_migration_from_plaintext_rpc_to_mutual_tls_fails_no_request() {
    let started = Instant::now();
    let mode = |m: &str| format!("rpc_tls = \"{m}\"\n");
    let (mut cluster, _web) = serving_cluster(options().cluster(&mode("off")), "mig.test").await;
    // Plaintext RPC before: a plain request reaches the request check (403, not 426).
    let plain = |n: &Node| {
        let url = format!("http://{}/cluster/applied", n.rpc_addr);
        async move {
            poll_client()
                .post(url)
                .json(&1)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    assert_eq!(plain(cluster.node(1)).await, Some(403));

    let clients: Vec<ProxyClient> = cluster.nodes.iter().map(|n| n.proxy_client()).collect();
    let traffic = Traffic::start(clients, "mig.test", "web-a");
    let mut writes = 0;
    for target in ["mixed", "required"] {
        rolling_upgrade(&mut cluster, &mut writes, target, |o| {
            o.cluster_extra = mode(target)
        })
        .await;
        if target == "mixed" {
            // The "off" nodes spoke plaintext to the "mixed" ones.
            let mut plaintext = 0.0;
            for n in &cluster.nodes {
                plaintext += n
                    .metric("pingora_vhost_cluster_rpc_plaintext_connections_total")
                    .await;
            }
            assert!(
                plaintext > 0.0,
                "no plaintext connection was accepted in mixed mode"
            );
        }
    }
    let (ok, failures) = traffic.finish().await;
    eprintln!(
        "rolling migration: {ok} proxied requests ok, {} failed, {writes} writes, {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(ok > 300, "the load must span the migration ({ok} requests)");
    assert!(
        failures.is_empty(),
        "{} proxied requests failed during the migration; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Plaintext after: refused before the request check.
    for n in &cluster.nodes {
        assert_eq!(
            plain(n).await,
            Some(426),
            "plaintext RPC after the migration"
        );
    }
}

/// A 3-node cluster (`options`, with a one-second shutdown grace) serving `host` from one
/// backend ("web-a", tag "a") on every node; keep the backend alive for the test.
async fn serving_cluster(options: NodeOptions, host: &str) -> (Cluster, Backend) {
    let cluster = Cluster::start(3, |_| options.clone().proxy("shutdown_grace_secs = 1")).await;
    let web = Backend::start("web-a").await;
    cluster
        .node(1)
        .add_backend("web-a", &web.address(), &["a"])
        .await;
    cluster.node(2).add_domain(host, "a").await;
    for n in &cluster.nodes {
        n.wait_route(host, "/", "web-a").await;
    }
    (cluster, web)
}

/// Upgrades every node of `cluster` in turn (graceful upgrade with the options `change` makes);
/// after each, the cluster converges and a write through another node reaches every node.
async fn rolling_upgrade(
    cluster: &mut Cluster,
    writes: &mut usize,
    step: &str,
    change: impl Fn(&mut NodeOptions),
) {
    let started = Instant::now();
    for id in 1..=3u64 {
        {
            let n = cluster.node_mut(id);
            change(&mut n.options);
            n.write_config();
            let old = n.upgrade_and_wait_old().await;
            assert_eq!(old.code(), Some(0), "the old process of node {id} exits 0");
            n.wait_ready().await;
        }
        cluster.wait_converged(Duration::from_secs(20)).await;
        *writes += 1;
        let domain = format!("w{writes}.test");
        let via = id % 3 + 1;
        cluster.node(via).add_domain(&domain, "a").await;
        for n in &cluster.nodes {
            n.wait_route(&domain, "/", "web-a").await;
        }
        eprintln!(
            "{step}: node {id} upgraded; write through node {via} ok; {:?} into the step",
            started.elapsed()
        );
    }
}

/// The documented secret rollover (docs/cluster.md "Rolling the secret over"): three rolling
/// restarts under proxied load move a cluster from one secret to another (RPC with its derived
/// CA, join proofs and gossip keys all change) without a failed request or a lost write; a node
/// that knows only the old secret is refused afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rollover_by_three_rolling_restarts_fails_no_request() {
    const OLD: &str = "the-old-secret-about-to-be-rolled";
    const NEW: &str = "the-new-secret-after-the-rollover";
    let (mut cluster, _web) = serving_cluster(NodeOptions::new().secret(OLD), "roll.test").await;
    let clients: Vec<ProxyClient> = cluster.nodes.iter().map(|n| n.proxy_client()).collect();
    let traffic = Traffic::start(clients, "roll.test", "web-a");
    let mut writes = 0;
    let steps: [(&str, &str, Option<&str>); 3] = [
        ("1: send old, accept new", OLD, Some(NEW)),
        ("2: send new, accept old", NEW, Some(OLD)),
        ("3: new only", NEW, None),
    ];
    for (step, secret, secondary) in steps {
        rolling_upgrade(&mut cluster, &mut writes, step, |o| {
            o.secret = Some(secret.to_string());
            o.cluster_extra = secondary
                .map(|s| format!("secondary_secret = \"{s}\"\n"))
                .unwrap_or_default();
        })
        .await;
    }
    let (ok, failures) = traffic.finish().await;
    eprintln!(
        "secret rollover: {ok} proxied requests ok, {} failed, {writes} writes",
        failures.len()
    );
    assert!(ok > 300, "the load must span the rollover ({ok} requests)");
    assert!(
        failures.is_empty(),
        "{} proxied requests failed during the rollover; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    for n in &cluster.nodes {
        let (_, domains) = n.api_get("/api/v1/domains?limit=1000").await;
        let total = domains["total"].as_u64();
        assert_eq!(
            total,
            Some(writes as u64 + 1),
            "every write on node {:?}",
            n.options.node_id
        );
    }
    // The old secret is worth nothing now: a node holding only it does not get in.
    cluster.join(9, NodeOptions::new().secret(OLD)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for id in 1..=3u64 {
        let (_, status) = cluster.node(id).api_get("/api/v1/cluster/status").await;
        let members = status["members"].as_array().cloned().unwrap_or_default();
        assert!(
            !members.is_empty() && members.iter().all(|m| m["node_id"] != 9),
            "node {id}: a node with the old secret joined after the rollover: {status:#}"
        );
    }
}
