//! Forming and maintaining the cluster from gossip.
//!
//! - Bootstrap (like Consul's `bootstrap_expect`): when N uninitialized nodes see each other
//!   and none of them belongs to a cluster yet, the lowest id initializes the N-member cluster.
//! - The leader adds fresh nodes it sees in gossip as learners (after they prove, by answering
//!   a challenge, that they know the cluster secret) and promotes them to voters once they have
//!   caught up.
//! - Removing a member is an explicit API call; a removed node is not re-added while it keeps
//!   its data dir (it reports itself as initialized).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};

use super::{ClusterNode, NodeId};
use crate::gossip::{Peer, KEY_RAFT_INITIALIZED};

/// How far behind (in entries) a learner may be to be promoted to voter.
const PROMOTE_LAG: u64 = 16;

/// Runs forever: publishes our Raft status in gossip, bootstraps, and (on the leader) adds and
/// promotes nodes.
pub async fn run(node: Arc<ClusterNode>, bootstrap_expect: usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let initialized = node.raft.is_initialized().await.unwrap_or(false);
        node.gossip
            .set(
                KEY_RAFT_INITIALIZED,
                if initialized { "true" } else { "false" },
            )
            .await;
        if !initialized {
            try_bootstrap(&node, bootstrap_expect).await;
            continue;
        }
        if node.is_leader() {
            if let Err(e) = reconcile(&node).await {
                tracing::warn!("membership: {e}");
            }
        }
    }
}

async fn try_bootstrap(node: &ClusterNode, expect: usize) {
    let peers = node.gossip.live_peers();
    if peers
        .iter()
        .any(|p| p.initialized && p.node_id != node.node_id)
    {
        // A cluster exists: its leader will add us.
        return;
    }
    if peers.len() < expect || !node.gossip_settled() {
        return;
    }
    let mut chosen: Vec<&Peer> = peers.iter().collect();
    chosen.sort_by_key(|p| p.node_id);
    chosen.truncate(expect);
    if chosen.first().map(|p| p.node_id) != Some(node.node_id) {
        return;
    }
    let members: BTreeMap<NodeId, BasicNode> = chosen
        .iter()
        .map(|p| {
            (
                p.node_id,
                BasicNode {
                    addr: p.rpc_addr.clone(),
                },
            )
        })
        .collect();
    tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "bootstrapping a new cluster");
    if let Err(e) = node.raft.initialize(members).await {
        tracing::warn!("bootstrap failed: {e}");
    }
}

async fn reconcile(node: &ClusterNode) -> anyhow::Result<()> {
    let metrics = node.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();

    for peer in node.gossip.live_peers() {
        if known.contains(&peer.node_id) || peer.initialized {
            continue;
        }
        if !node.verify_peer(peer.node_id, &peer.rpc_addr).await {
            tracing::warn!(
                node_id = peer.node_id,
                rpc_addr = %peer.rpc_addr,
                "not adding node seen in gossip: it does not accept our cluster secret \
                 (no valid join proof)"
            );
            continue;
        }
        tracing::info!(node_id = peer.node_id, rpc_addr = %peer.rpc_addr, "adding node as learner");
        node.raft
            .add_learner(
                peer.node_id,
                BasicNode {
                    addr: peer.rpc_addr.clone(),
                },
                false,
            )
            .await?;
    }

    let last_index = metrics.last_log_index.unwrap_or(0);
    let replication = metrics.replication.unwrap_or_default();
    for id in known.difference(&voters) {
        let matched = replication
            .get(id)
            .and_then(|m| m.map(|l| l.index))
            .unwrap_or(0);
        let alive = node.gossip.is_alive(*id);
        // A member being removed passes through "learner": never promote it back.
        if alive && matched + PROMOTE_LAG >= last_index && !node.was_removed_recently(*id) {
            tracing::info!(
                node_id = id,
                matched,
                last_index,
                "promoting caught-up learner to voter"
            );
            node.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*id])), false)
                .await?;
        }
    }
    Ok(())
}

/// Removes `id` from the cluster (voter or learner). Must run on the leader.
/// Why the leader refused to remove a member.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum RemoveRefused {
    #[error("node {0} is not a member")]
    NotAMember(NodeId),
    #[error("node {0} is the last voter; a cluster cannot remove its last voter")]
    LastVoter(NodeId),
    /// Another membership change is still being committed: worth retrying.
    #[error("another membership change is in progress: {0}")]
    ChangeInProgress(String),
    /// This node stopped being leader during the change: worth retrying on the new one.
    #[error("leadership moved during the change")]
    NotLeader,
    #[error("{0}")]
    Raft(String),
}

fn refusal(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> RemoveRefused {
    match e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            c @ ChangeMembershipError::InProgress(_),
        )) => RemoveRefused::ChangeInProgress(c.to_string()),
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => RemoveRefused::NotLeader,
        e => RemoveRefused::Raft(e.to_string()),
    }
}

pub async fn remove(node: &ClusterNode, id: NodeId) -> Result<(), RemoveRefused> {
    let membership = node
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if !membership.nodes().any(|(n, _)| *n == id) {
        return Err(RemoveRefused::NotAMember(id));
    }
    if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(RemoveRefused::LastVoter(id));
        }
        node.mark_removed(id);
        node.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(refusal)?;
    }
    node.raft
        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
        .await
        .map_err(refusal)?;
    tracing::info!(node_id = id, "member removed");
    Ok(())
}
