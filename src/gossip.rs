//! Gossip (chitchat over UDP): who is alive, where their Raft RPC listens, whether they already
//! belong to a Raft cluster. Each node writes only its own keys.
//!
//! Every datagram is sealed with a key derived from the cluster secret (`sealed`): a host
//! without the secret can neither read nor forge nor replay gossip. Nothing learnt from gossip
//! is trusted for writes all the same; joining a node still needs its proof on RPC.

mod sealed;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
};
use tokio::sync::watch;

use crate::config::ClusterConfig;
use crate::keyring::Keyring;
use crate::observability::Metrics;
pub use sealed::SEAL_OVERHEAD;

pub const KEY_RPC_ADDR: &str = "rpc_addr";
pub const KEY_RAFT_INITIALIZED: &str = "raft_initialized";
/// Prefix of this node's health verdicts: `hc/<backend key>` = "down".
pub const KEY_HEALTH_PREFIX: &str = "hc/";

/// A backend's name in gossip: a 64-bit FNV-1a hash of its id, in hex. Keys have a fixed size
/// whatever the id: one key larger than a gossip packet stops the node's whole state from
/// reaching its peers (a 200,000-character id once ended health sharing for a cluster).
pub fn backend_key(id: &str) -> String {
    format!("{:016x}", backend_hash(id))
}

/// The 64-bit FNV-1a hash of a backend id behind [`backend_key`] (also what decides which
/// nodes probe it, `health::owners`): the same on every node and version.
pub fn backend_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A live node as seen through gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_id: u64,
    pub rpc_addr: String,
    pub initialized: bool,
}

pub struct Gossip {
    handle: ChitchatHandle,
    live: watch::Receiver<BTreeMap<ChitchatId, NodeState>>,
    pub node_id: u64,
}

impl Gossip {
    pub async fn start(
        cfg: &ClusterConfig,
        keys: std::sync::Arc<Keyring>,
        metrics: std::sync::Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        // A new generation per process start, so peers drop our previous incarnation's state.
        let generation = crate::clock::unix_ms();
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(cfg.node_id.to_string(), generation, cfg.gossip_addr),
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: Duration::from_millis(200),
            listen_addr: cfg.gossip_addr,
            seed_nodes: cfg.seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(2),
                initial_interval: Duration::from_millis(200),
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let initial = vec![
            (KEY_RPC_ADDR.to_string(), cfg.rpc_addr.to_string()),
            (KEY_RAFT_INITIALIZED.to_string(), "false".to_string()),
        ];
        let transport = sealed::SealedTransport {
            keys,
            node_id: cfg.node_id,
            metrics,
        };
        let handle = spawn_chitchat(config, initial, &transport)
            .await
            .with_context(|| format!("starting gossip on udp {}", cfg.gossip_addr))?;
        let live = handle.chitchat().lock().await.live_nodes_watcher();
        Ok(Self {
            handle,
            live,
            node_id: cfg.node_id,
        })
    }

    /// Live nodes (this one included) that published a valid id and RPC address.
    pub fn live_peers(&self) -> Vec<Peer> {
        self.live
            .borrow()
            .iter()
            .filter_map(|(id, state)| {
                Some(Peer {
                    node_id: id.node_id.parse().ok()?,
                    rpc_addr: state.get(KEY_RPC_ADDR)?.to_string(),
                    initialized: state.get(KEY_RAFT_INITIALIZED) == Some("true"),
                })
            })
            .collect()
    }

    /// The nodes that share the active health probes: this node and every live peer that
    /// belongs to a Raft cluster (a node still joining has no backends to probe yet). Sorted.
    pub fn probing_members(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .live_peers()
            .into_iter()
            .filter(|p| p.initialized && p.node_id != self.node_id)
            .map(|p| p.node_id)
            .collect();
        ids.push(self.node_id);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn is_alive(&self, node_id: u64) -> bool {
        node_id == self.node_id || self.live_peers().iter().any(|p| p.node_id == node_id)
    }

    /// For every live peer (not this node): its keys starting with `prefix` (without the
    /// prefix) and their values.
    pub fn peer_entries(&self, prefix: &str) -> Vec<(u64, Vec<(String, String)>)> {
        self.live
            .borrow()
            .iter()
            .filter_map(|(id, state)| {
                let node_id: u64 = id.node_id.parse().ok()?;
                (node_id != self.node_id).then(|| {
                    let entries = state
                        .iter_prefix(prefix)
                        .map(|(k, v)| (k[prefix.len()..].to_string(), v.value.clone()))
                        .collect();
                    (node_id, entries)
                })
            })
            .collect()
    }

    /// Ids of the live nodes other than this one.
    pub fn live_peer_ids(&self) -> HashSet<u64> {
        self.live
            .borrow()
            .keys()
            .filter_map(|id| id.node_id.parse().ok())
            .filter(|id| *id != self.node_id)
            .collect()
    }

    /// Sets and deletes several of our own keys at once (deleted keys leave a tombstone that
    /// gossip spreads, so peers forget them too).
    pub async fn update_own(&self, set: Vec<(String, String)>, delete: Vec<String>) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        let state = guard.self_node_state();
        for (k, v) in set {
            state.set(k, v);
        }
        for k in delete {
            if state.contains_key(&k) {
                state.delete(&k);
            }
        }
    }

    /// Publishes one of our own keys.
    pub async fn set(&self, key: &str, value: &str) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        let state = guard.self_node_state();
        if state.get(key) != Some(value) {
            state.set(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::backend_key;

    #[test]
    fn backend_keys_have_a_fixed_size_whatever_the_id() {
        // FNV-1a 64 reference values: stable across versions and nodes.
        assert_eq!(backend_key(""), "cbf29ce484222325");
        assert_eq!(backend_key("a"), "af63dc4c8601ec8c");
        let huge = "x".repeat(1_500_000);
        for id in ["web-1", "web-2", huge.as_str()] {
            assert_eq!(backend_key(id).len(), 16, "{}", &id[..id.len().min(10)]);
        }
        assert_ne!(backend_key("web-1"), backend_key("web-2"));
    }
}
