//! Cluster security from the outside (docs/cluster.md "Security"): the secret never crosses the
//! wire, gossip is sealed (a host without the secret is neither heard nor told anything), and
//! forged or replayed gossip is dropped and counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig};
use tokio::io::AsyncReadExt;

use crate::cluster::{members_of, try_status};
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
/// while a follower forwards writes and a fourth node is checked, joins and catches up: the
/// secret never appears (certificates in Raft entries still do: no TLS yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_rpc_traffic_never_carries_the_secret() {
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
    f.add_domain("captured.test", "a").await;
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
    for (flow, bytes) in &flows {
        assert!(
            !contains(bytes, SECRET.as_bytes()),
            "the secret crossed the wire in flow {flow:?}"
        );
        assert!(
            !contains(bytes, b"x-pingora-vhost-secret"),
            "the old secret header in flow {flow:?}"
        );
    }
    // The capture saw the calls that matter (so an empty capture cannot pass).
    for seen in [
        &b"POST /raft/append"[..],
        b"POST /cluster/write",
        b"POST /cluster/join-challenge",
        b"captured.test",
        b"x-pingora-vhost-auth: v1 t=",
    ] {
        assert!(
            contains(&all, seen),
            "capture lacks {:?}",
            String::from_utf8_lossy(seen)
        );
    }
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
