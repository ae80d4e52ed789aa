//! #15: replication has no size cliff. A seed of tens of MB is one Raft entry too large for the
//! RPC (before: every append to the followers answered 413 and the leader retried for ever,
//! so a 3-node cluster never served a seeded domain). Now it goes in bounded parts that apply
//! together, and a node that joins later gets the state as a snapshot in bounded chunks.

use std::time::{Duration, Instant};

use crate::common::*;

/// `n` domains (d<i>.scale.test, tag "a") and `n` backends; all backends point at `origin`.
fn big_seed(n: usize, origin: &str) -> String {
    let mut text = String::with_capacity(n * 200);
    for i in 0..n {
        text.push_str(&format!(
            "[[backends]]\nid = \"backend-{i:06}\"\naddress = \"{origin}\"\ntags = [\"a\", \"t{}\"]\n",
            i % 50
        ));
    }
    for i in 0..n {
        text.push_str(&format!(
            "[[virtual_hosts]]\ndomain = \"d{i}.scale.test\"\nenabled_backends_tag = \"a\"\n"
        ));
    }
    text
}

async fn serves_everywhere(nodes: &[&Node], hosts: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    for node in nodes {
        let client = node.proxy_client();
        for host in hosts {
            loop {
                match client.get(host, "/").await {
                    Ok(r) if r.status == 200 && r.body == "origin" => break,
                    other => {
                        assert!(
                            Instant::now() < deadline,
                            "node {:?} does not serve {host} within {within:?}: {:?}",
                            node.options.node_id,
                            other.map(|r| r.status)
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_larger_than_an_rpc_is_replicated_in_parts_and_a_joiner_catches_up() {
    // ~215 bytes of JSON per domain and backend: a 5 MB seed, over one entry's 4 MiB.
    const N: usize = 24_000;
    let origin = Backend::start("origin").await;
    let seed = big_seed(N, &origin.address());
    let started = Instant::now();
    let mut cluster = Cluster::start(3, |_| {
        // Reading a 5 MB config takes seconds in a debug build.
        NodeOptions::new()
            .start_timeout(Duration::from_secs(90))
            .health_interval(30)
            .cluster("snapshot_logs = 10")
            .extra(&seed)
    })
    .await;
    let hosts: Vec<String> = [0, N / 2, N - 1]
        .iter()
        .map(|i| format!("d{i}.scale.test"))
        .collect();
    let nodes: Vec<&Node> = cluster.nodes.iter().collect();
    serves_everywhere(&nodes, &hosts, Duration::from_secs(60)).await;
    eprintln!(
        "3 nodes serve the {N}-domain seed {:?} after start",
        started.elapsed()
    );
    for node in &nodes {
        let (_, domains) = node.api_get("/api/v1/domains?limit=1").await;
        assert_eq!(
            domains["total"].as_u64(),
            Some(N as u64),
            "every domain on node {:?}",
            node.options.node_id
        );
    }
    // Enough writes for a snapshot and a purged log: the joiner must get the snapshot.
    let leader = cluster.leader().await.expect("a leader");
    for i in 0..20 {
        cluster
            .node(leader)
            .add_backend(&format!("extra-{i}"), &origin.address(), &["x"])
            .await;
    }
    let joined_at = Instant::now();
    cluster
        .join(
            4,
            NodeOptions::new()
                .health_interval(30)
                .cluster("snapshot_logs = 10"),
        )
        .await;
    serves_everywhere(&[cluster.node(4)], &hosts, Duration::from_secs(60)).await;
    eprintln!(
        "a 4th node serves everything {:?} after it started",
        joined_at.elapsed()
    );
    // The snapshot, then the entries after it: everything, the 20 later writes included.
    let node4 = cluster.node(4);
    wait_for(
        Duration::from_secs(30),
        "the 4th node holds every backend",
        || async {
            let (_, backends) = node4.api_get("/api/v1/backends?limit=1").await;
            (backends["total"].as_u64() == Some(N as u64 + 20)).then_some(())
        },
    )
    .await;
}
