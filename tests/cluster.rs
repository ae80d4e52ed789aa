//! Multi-node cluster behaviour with real processes on loopback.

mod common;

use common::*;
use serde_json::json;

/// A write on a follower is committed through the leader and served by every node's proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_on_follower_is_served_by_every_node() {
    let mut cluster = Cluster::start(3, |_| NodeOptions::new()).await;
    let backend = Backend::start("web-a").await;
    let leader = cluster.leader().await.expect("a leader");
    let follower = (1..=3).find(|id| *id != leader).unwrap();
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
