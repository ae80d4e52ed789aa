//! #13: no user input can stall the control plane. Several clients send the largest bodies the
//! API takes (2 MiB: a tag list to de-duplicate, a certificate chain to parse) to every node of
//! a 3-node cluster, while the test checks that `/api/v1/health` keeps answering fast and that
//! the cluster keeps its leader (a stalled leader would miss its heartbeats).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

/// A body just under the 2 MiB limit: `{"id":..., "tags": [150,000 tags]}` (refused after
/// parsing: too many tags), or a domain whose chain is one certificate repeated (parsed).
fn bodies() -> Vec<String> {
    let tags: Vec<String> = (0..150_000).map(|i| format!("t{}", i % 1000)).collect();
    let tag_body = json!({"id": "flood", "address": "127.0.0.1:9", "tags": tags}).to_string();
    let cert = self_signed(&["flood.test"]);
    // The chain's size inside the JSON body (newlines are escaped there).
    let escaped = json!(cert.cert_pem).to_string().len();
    let copies = (2 * 1024 * 1024 - 32 * 1024) / escaped;
    let chain = cert.cert_pem.repeat(copies);
    let cert_body = json!({
        "domain": "flood.test",
        "enabled_backends_tag": "a",
        "cert_pem": chain,
        "key_pem": self_signed(&["other.test"]).key_pem,
    })
    .to_string();
    assert!(tag_body.len() < 2 * 1024 * 1024 && cert_body.len() < 2 * 1024 * 1024);
    vec![tag_body, cert_body]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_largest_bodies_from_several_clients_do_not_stall_the_control_plane() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    let (leader, _) = cluster.leader_and_followers().await;
    let (_, before) = cluster.node(leader).api_get("/api/v1/cluster/status").await;
    let term_before = before["term"].as_u64();

    let bodies = bodies();
    let client = reqwest::Client::new();
    let stop_at = Instant::now() + Duration::from_secs(10);
    let mut flooders = Vec::new();
    for i in 0..6u64 {
        let node = cluster.node(1 + i % 3);
        let url_b = node.api_url("/api/v1/backends");
        let url_d = node.api_url("/api/v1/domains");
        let client = client.clone();
        let bodies = bodies.clone();
        flooders.push(tokio::spawn(async move {
            let mut sent = 0u32;
            while Instant::now() < stop_at {
                let (url, body) = if sent.is_multiple_of(2) {
                    (&url_b, &bodies[0])
                } else {
                    (&url_d, &bodies[1])
                };
                let resp = client
                    .post(url)
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("flood request");
                // Refused as invalid (too many tags, key does not match), never a 5xx.
                assert_eq!(resp.status().as_u16(), 400, "{:?}", resp.text().await);
                sent += 1;
            }
            sent
        }));
    }

    let mut latencies = Vec::new();
    while Instant::now() < stop_at {
        for id in 1..=3 {
            let url = cluster.node(id).api_url("/api/v1/health");
            let t = Instant::now();
            let resp = client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .expect("health answers");
            assert_eq!(resp.status().as_u16(), 200);
            latencies.push(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sent = 0;
    for f in flooders {
        sent += f.await.expect("flooder");
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let p99 = pct(99);
    eprintln!("flood: health p50 {:?} p90 {:?}", pct(50), pct(90));
    let max = *latencies.last().expect("polls");
    eprintln!(
        "flood: {sent} bodies of ~2 MiB; health p99 {p99:?}, max {max:?} over {} polls",
        latencies.len()
    );
    assert!(sent >= 12, "the flood ran ({sent} requests)");
    assert!(
        p99 <= Duration::from_millis(100),
        "health p99 {p99:?} over 100 ms under the flood"
    );
    let (_, after) = cluster.node(leader).api_get("/api/v1/cluster/status").await;
    assert_eq!(
        after["leader_id"].as_u64(),
        Some(leader),
        "the cluster kept its leader: {after}"
    );
    assert_eq!(after["term"].as_u64(), term_before, "no election: {after}");
}
