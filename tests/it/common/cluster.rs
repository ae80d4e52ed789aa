//! Several real nodes on loopback that form one cluster.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Node, NodeOptions, TOKEN};

/// `n` nodes (ids 1..=n) that find each other by gossip with `bootstrap_expect = n`.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes; `options(i)` gives node i's extra options (cluster keys are set here).
    pub async fn start(n: usize, options: impl Fn(u64) -> NodeOptions) -> Cluster {
        let mut nodes: Vec<Node> = (1..=n as u64)
            .map(|id| Node::new_unstarted(options(id).node_id(id).bootstrap_expect(n)))
            .collect();
        let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.gossip_addr).collect();
        for node in nodes.iter_mut() {
            node.options.seeds = seeds.clone();
            node.write_config();
            node.spawn();
        }
        for node in nodes.iter_mut() {
            node.wait_ready().await;
        }
        let cluster = Cluster { nodes };
        cluster.wait_converged(Duration::from_secs(20)).await;
        cluster
    }

    /// Gossip seeds of the running cluster (for a node that joins later).
    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.gossip_addr).collect()
    }

    /// Starts one more node with `id` that joins through gossip.
    pub async fn join(&mut self, id: u64, options: NodeOptions) -> &mut Node {
        let expect = self.nodes.len();
        let node = Node::start(
            options
                .node_id(id)
                .bootstrap_expect(expect)
                .seeds(&self.seeds()),
        )
        .await;
        self.nodes.push(node);
        self.nodes.last_mut().unwrap()
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.options.node_id == Some(id))
            .expect("no such node")
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.options.node_id == Some(id))
            .expect("no such node")
    }

    /// Running nodes.
    pub fn running(&mut self) -> Vec<&mut Node> {
        self.nodes
            .iter_mut()
            .filter_map(|n| if n.is_running() { Some(n) } else { None })
            .collect()
    }

    /// The leader id as seen by a running node.
    /// (leader id, ids of the other nodes).
    pub async fn leader_and_followers(&mut self) -> (u64, Vec<u64>) {
        let leader = self.leader().await.expect("a leader");
        let ids = self
            .nodes
            .iter()
            .filter_map(|n| n.options.node_id)
            .filter(|id| *id != leader)
            .collect();
        (leader, ids)
    }

    /// (leader id, id of one follower): for tests that act through a follower.
    pub async fn leader_and_follower(&mut self) -> (u64, u64) {
        let (leader, followers) = self.leader_and_followers().await;
        (leader, *followers.first().expect("a follower"))
    }

    pub async fn leader(&mut self) -> Option<u64> {
        for n in self.running() {
            let (status, v) = n.api_get("/api/v1/cluster/status").await;
            if status == 200 {
                if let Some(l) = v["leader_id"].as_u64() {
                    return Some(l);
                }
            }
        }
        None
    }

    /// Waits until every running node reports the same leader, the same voters, and the same
    /// last applied index.
    pub async fn wait_converged(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            last.clear();
            for n in &self.nodes {
                if let Ok(r) = n
                    .api_client
                    .get(n.api_url("/api/v1/cluster/status"))
                    .bearer_auth(TOKEN)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                {
                    if let Ok(v) = r.json::<Value>().await {
                        last.push(v);
                        continue;
                    }
                }
                last.push(Value::Null);
            }
            let ok = last.iter().all(|v| !v.is_null())
                && last.windows(2).all(|w| {
                    w[0]["leader_id"] == w[1]["leader_id"]
                        && w[0]["last_applied"] == w[1]["last_applied"]
                        && w[0]["members"] == w[1]["members"]
                })
                && !last[0]["leader_id"].is_null()
                && last[0]["members"].as_array().is_some_and(|m| {
                    m.len() == self.nodes.len() && m.iter().all(|x| x["voter"] == true)
                });
            if ok {
                return;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self.nodes.iter().map(|n| n.logs()).collect();
                panic!(
                    "cluster did not converge within {timeout:?}; statuses: {last:#?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
