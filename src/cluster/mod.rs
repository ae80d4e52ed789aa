//! Raft cluster: openraft types, the node wrapper that runs writes (forwarding them to the
//! leader when needed), bootstrap and status.

pub mod election;
pub mod membership;
pub mod network;
pub mod rpc;
pub mod store;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::gossip::Gossip;
use crate::state::{ApplyResult, Command};
use network::HttpNetwork;
use store::{LogStore, StateMachineStore};

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// How long a write may wait for a leader / quorum before answering 503.
const WRITE_DEADLINE: Duration = Duration::from_secs(8);
/// How long one attempt may wait for commit on the leader.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the leader may take to confirm a quorum before a write.
const QUORUM_CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// The outcome of one write attempt on a node (also the body of a forwarded write).
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardedWrite {
    Done {
        index: u64,
        result: ApplyResult,
    },
    NotLeader {
        leader: Option<(NodeId, String)>,
    },
    Unavailable(String),
    /// Proposed but not known to be committed: must not be retried.
    Indeterminate(String),
}

/// Answer of the leader to a forwarded member removal.
#[derive(Debug, Serialize, Deserialize)]
pub enum RemoveOutcome {
    Done,
    Refused(membership::RemoveRefused),
    NotLeader,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// The leader refused (not a member, last voter...): HTTP 404/409.
    #[error("{0}")]
    Refused(membership::RemoveRefused),
    /// No leader reachable: HTTP 503.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// No leader or no quorum: the cluster cannot accept writes right now (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<membership::RemoveRefused> for RemoveError {
    /// A refusal that a moment may cure is retried as "unavailable".
    fn from(e: membership::RemoveRefused) -> Self {
        use membership::RemoveRefused::*;
        match e {
            ChangeInProgress(_) | NotLeader => RemoveError::Unavailable(e.to_string()),
            e => RemoveError::Refused(e),
        }
    }
}

pub struct ClusterNode {
    pub node_id: NodeId,
    pub rpc_addr: String,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub secret: Option<String>,
    pub cluster_id: String,
    pub gossip: Arc<Gossip>,
    net: HttpNetwork,
    started: Instant,
    /// Voters this node removed recently (as leader): a removal passes through "learner", and
    /// reconciliation must not promote them back meanwhile.
    recently_removed: std::sync::Mutex<std::collections::HashMap<NodeId, Instant>>,
    /// What the election loop and the pre-vote answers share.
    election: election::ElectionState,
}

/// How long a removed member is kept out of automatic re-adding.
const REMOVED_QUARANTINE: Duration = Duration::from_secs(300);

/// Role and progress of this node, for the status endpoint.
#[derive(Debug, Serialize)]
pub struct Status {
    pub node_id: NodeId,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub state: NodeState,
    pub last_applied: u64,
    /// On the leader: a majority of voters acknowledged it within the leader lease (900 ms).
    /// On any other node: it heard from a leader within the leader lease. `false` on a leader
    /// means it is cut off and refuses writes; a new leader is being (or has been) elected on
    /// the other side.
    pub quorum: bool,
    pub members: Vec<Member>,
}

/// This node's Raft role, as `GET /api/v1/cluster/status` shows it (docs/api.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NodeState {
    Leader,
    Follower,
    /// Running an election.
    Candidate,
    /// Receives the log but does not vote (a node being added).
    Learner,
    /// Raft has stopped on this node.
    Shutdown,
}

impl From<ServerState> for NodeState {
    fn from(s: ServerState) -> Self {
        match s {
            ServerState::Leader => NodeState::Leader,
            ServerState::Follower => NodeState::Follower,
            ServerState::Candidate => NodeState::Candidate,
            ServerState::Learner => NodeState::Learner,
            ServerState::Shutdown => NodeState::Shutdown,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Member {
    pub node_id: NodeId,
    pub rpc_addr: String,
    pub voter: bool,
    pub alive: bool,
}

impl ClusterNode {
    /// Starts Raft on the already-opened stores. Must run inside the control-plane runtime
    /// (openraft spawns tasks).
    pub async fn start(
        cfg: &ClusterConfig,
        log: LogStore,
        sm: StateMachineStore,
        gossip: Arc<Gossip>,
    ) -> anyhow::Result<Arc<Self>> {
        let raft_config = openraft::Config {
            cluster_name: cfg.cluster_id.clone(),
            heartbeat_interval: election::HEARTBEAT_MS,
            election_timeout_min: election::ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: election::LEADER_LEASE_MS,
            // Elections are started by `election::run` after a pre-vote, never by openraft's
            // timer: an isolated node must not raise its term and depose the leader on return.
            enable_elect: false,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            // Keep some entries behind a snapshot so a briefly lagging follower needs no snapshot.
            max_in_snapshot_log_to_keep: (cfg.snapshot_logs / 5).max(1),
            ..Default::default()
        }
        .validate()?;
        let net = HttpNetwork::new(
            cfg.secret.clone().unwrap_or_default(),
            cfg.cluster_id.clone(),
        );
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(raft_config),
            net.clone(),
            log,
            sm.clone(),
        )
        .await?;
        let rpc_addr = cfg.rpc_addr.to_string();
        // A lone node with no seeds is its own cluster. With seeds, bootstrapping waits for
        // gossip (membership::run), so a node never starts a second cluster beside an existing one.
        if cfg.bootstrap_expect == 1 && cfg.seeds.is_empty() && !raft.is_initialized().await? {
            tracing::info!(
                node_id = cfg.node_id,
                "initializing a new one-member cluster"
            );
            let members = BTreeMap::from([(
                cfg.node_id,
                BasicNode {
                    addr: rpc_addr.clone(),
                },
            )]);
            raft.initialize(members).await?;
        }
        Ok(Arc::new(Self {
            node_id: cfg.node_id,
            rpc_addr,
            raft,
            sm,
            secret: cfg.secret.clone().filter(|s| !s.is_empty()),
            cluster_id: cfg.cluster_id.clone(),
            gossip,
            net,
            started: Instant::now(),
            recently_removed: Default::default(),
            election: Default::default(),
        }))
    }

    /// Proposes `cmd` and returns its apply result once it is committed and applied on THIS
    /// node (read-your-writes). Forwards to the leader when this node is a follower, retrying
    /// with backoff while a leader is being elected.
    pub async fn write(&self, cmd: Command) -> Result<ApplyResult, WriteError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut backoff = Duration::from_millis(50);
        let mut last_reason;
        loop {
            let outcome = match self.write_local(cmd.clone()).await {
                ForwardedWrite::NotLeader {
                    leader: Some((id, addr)),
                } if id != self.node_id => self
                    .net
                    .post::<_, ForwardedWrite>(
                        &addr,
                        "/cluster/write",
                        &cmd,
                        COMMIT_TIMEOUT + Duration::from_secs(1),
                    )
                    .await
                    .unwrap_or_else(|e| {
                        ForwardedWrite::Unavailable(format!(
                            "leader {id} at {addr} unreachable: {e}"
                        ))
                    }),
                other => other,
            };
            match outcome {
                ForwardedWrite::Done { index, result } => {
                    self.wait_applied(index).await?;
                    return Ok(result);
                }
                ForwardedWrite::NotLeader { leader } => {
                    last_reason = match leader {
                        Some((id, _)) => format!("leader {id} changed during the write"),
                        None => "no leader elected (election in progress or no quorum)".into(),
                    }
                }
                ForwardedWrite::Unavailable(reason) => last_reason = reason,
                // Retrying would propose the command twice.
                ForwardedWrite::Indeterminate(reason) => {
                    return Err(WriteError::Unavailable(reason))
                }
            }
            if Instant::now() + backoff > deadline {
                return Err(WriteError::Unavailable(format!(
                    "write not accepted within {}s: {last_reason}",
                    WRITE_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One attempt to commit `cmd` through this node's Raft (succeeds only on the leader).
    pub async fn write_local(&self, cmd: Command) -> ForwardedWrite {
        // Confirm leadership with a quorum before proposing: without a quorum the write is
        // refused cleanly instead of sitting in the log and committing later.
        match tokio::time::timeout(QUORUM_CHECK_TIMEOUT, self.raft.ensure_linearizable()).await {
            Err(_) => {
                return ForwardedWrite::Unavailable(format!(
                    "the cluster has no quorum (no majority answered within {}ms)",
                    QUORUM_CHECK_TIMEOUT.as_millis()
                ))
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                return ForwardedWrite::NotLeader {
                    leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                }
            }
            Ok(Err(e)) => {
                return ForwardedWrite::Unavailable(format!("the cluster has no quorum: {e}"))
            }
            Ok(Ok(_)) => {}
        }
        match tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(cmd)).await {
            // Proposed but not committed: it may still commit if the quorum comes back.
            Err(_) => ForwardedWrite::Indeterminate(format!(
                "the write was proposed but not committed within {}s (quorum lost during the \
                 write); it takes effect if the cluster regains quorum: check before retrying",
                COMMIT_TIMEOUT.as_secs()
            )),
            Ok(Ok(resp)) => ForwardedWrite::Done {
                index: resp.log_id.index,
                result: resp.data,
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                ForwardedWrite::NotLeader {
                    leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                }
            }
            Ok(Err(e)) => ForwardedWrite::Unavailable(e.to_string()),
        }
    }

    async fn wait_applied(&self, index: u64) -> Result<(), WriteError> {
        let mut rx = self.sm.applied_index();
        let reached = tokio::time::timeout(COMMIT_TIMEOUT, async {
            rx.wait_for(|applied| *applied >= index).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => Err(WriteError::Unavailable(format!(
                "committed as entry {index} but not yet applied on node {}",
                self.node_id
            ))),
        }
    }

    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                node_id: *id,
                rpc_addr: node.addr.clone(),
                voter: voters.contains(id),
                alive: self.gossip.is_alive(*id),
            })
            .collect();
        Status {
            node_id: self.node_id,
            leader_id: m.current_leader,
            term: m.current_term,
            state: m.state.into(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            quorum: self.has_quorum(),
            members,
        }
    }

    pub fn last_applied(&self) -> u64 {
        self.raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0)
    }

    /// Waits until every other member that gossip sees alive has applied `index` (a dead
    /// member cannot be validated against, so it is not waited for).
    pub async fn wait_applied_by_members(
        &self,
        index: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let addrs: Vec<(NodeId, String)> = {
            let m = self.raft.metrics().borrow().membership_config.clone();
            m.membership()
                .nodes()
                .filter(|(id, _)| **id != self.node_id)
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect()
        };
        for (id, addr) in addrs {
            loop {
                if !self.gossip.is_alive(id) {
                    break;
                }
                let applied = self
                    .net
                    .post::<_, u64>(
                        &addr,
                        "/cluster/applied",
                        &self.node_id,
                        Duration::from_secs(1),
                    )
                    .await;
                if matches!(applied, Ok(a) if a >= index) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "node {id} did not apply entry {index} within {timeout:?}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    pub fn mark_removed(&self, id: NodeId) {
        let mut removed = self
            .recently_removed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        removed.retain(|_, at| at.elapsed() < REMOVED_QUARANTINE);
        removed.insert(id, Instant::now());
    }

    /// True while `id` was removed by this node less than [`REMOVED_QUARANTINE`] ago.
    pub fn was_removed_recently(&self, id: NodeId) -> bool {
        self.recently_removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|at| at.elapsed() < REMOVED_QUARANTINE)
    }

    /// Raft members (voters and learners) other than this node.
    pub fn other_member_ids(&self) -> std::collections::HashSet<NodeId> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.node_id)
            .collect()
    }

    /// True once gossip had time to hear from seeds (bootstrap must not race it).
    pub fn gossip_settled(&self) -> bool {
        self.started.elapsed() >= Duration::from_secs(2)
    }

    /// Checks that a node accepts our cluster secret before we add it.
    pub async fn verify_peer(&self, rpc_addr: &str) -> bool {
        self.net
            .post::<_, String>(
                rpc_addr,
                "/cluster/hello",
                &self.node_id,
                Duration::from_secs(2),
            )
            .await
            .is_ok()
    }

    /// The leader's id and RPC address, if one is known.
    fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Removes a member (voter or learner), on the leader or forwarded to it.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), RemoveError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        loop {
            let res = match self.leader() {
                Some((leader, _)) if leader == self.node_id => membership::remove(self, id)
                    .await
                    .map_err(RemoveError::from),
                Some((leader, addr)) => match self
                    .net
                    .post::<_, RemoveOutcome>(&addr, "/cluster/remove-member", &id, COMMIT_TIMEOUT)
                    .await
                {
                    Ok(RemoveOutcome::Done) => Ok(()),
                    Ok(RemoveOutcome::Refused(e)) => Err(RemoveError::from(e)),
                    Ok(RemoveOutcome::NotLeader) => Err(RemoveError::Unavailable(format!(
                        "node {leader} is no longer leader"
                    ))),
                    Err(e) => Err(RemoveError::Unavailable(format!(
                        "leader {leader} unreachable: {e}"
                    ))),
                },
                None => Err(RemoveError::Unavailable("no leader elected".into())),
            };
            match res {
                Err(RemoveError::Unavailable(reason)) if Instant::now() < deadline => {
                    tracing::debug!("remove member {id}: {reason}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// See [`Status::quorum`].
    pub fn has_quorum(&self) -> bool {
        self.election.has_quorum()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Waits until some node is known as leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut rx = self.raft.metrics();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(l) = rx.borrow().current_leader {
                    return l;
                }
                if rx.changed().await.is_err() {
                    // Raft stopped; wait out the timeout.
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .ok()
    }
}
