//! Raft cluster: openraft types, the node wrapper that runs writes (forwarding them to the
//! leader when needed), bootstrap and status.

pub mod election;
pub mod membership;
pub mod network;
pub mod pki;
pub mod rpc;
pub mod snapshot_wire;
pub mod store;
pub mod tls;
pub mod writes;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::clock;
use crate::config::ClusterConfig;
use crate::gossip::Gossip;
use crate::keyring::{hex, unhex, Keyring};
use crate::state::{ApplyResult, Command};
use network::HttpNetwork;
use store::{LogStore, StateMachineStore};
use writes::{IdGen, Known, Outcome, Proposal, Write, WriteId};

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Proposal,
        R = Outcome,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// How long a write may wait for a leader / quorum before answering.
const WRITE_DEADLINE: Duration = Duration::from_secs(8);
/// How long one attempt may wait for commit on the leader.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the leader may take to confirm a quorum before a write.
const QUORUM_CHECK_TIMEOUT: Duration = Duration::from_millis(1500);
/// A forwarded write must reach the leader and be proposed within this time after it was sent
/// (the leader's quorum check, up to [`QUORUM_CHECK_TIMEOUT`], is included). A copy delivered
/// later (a TCP retransmission after a partition heals) is refused. See docs/cluster.md
/// "Forwarded writes and clocks".
pub const FORWARD_WINDOW: Duration = Duration::from_secs(3);
/// The wall clocks of the nodes are assumed to agree within this (NTP keeps them within
/// milliseconds): a leader honours a forwarded deadline up to this much later or earlier
/// than the forwarding node meant.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(1);

/// A write forwarded by a follower to the leader (body of `POST /cluster/write`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub id: WriteId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The forwarding node's wall clock (Unix ms): the leader does not propose the write after
    /// this moment, by its own clock.
    pub deadline_unix_ms: u64,
    pub cmd: Command,
}

/// The outcome of one write attempt on a node (also the answer to a forwarded write).
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardedWrite {
    /// Committed as entry `index` (applied now, or earlier under the same id).
    Done { index: u64, outcome: Outcome },
    /// Not proposed: this node is not the leader.
    NotLeader { leader: Option<(NodeId, String)> },
    /// Not proposed: no quorum (or another reason given).
    Unavailable(String),
    /// Not proposed: the forwarded write's deadline had passed.
    Expired,
    /// Maybe proposed, not known to be committed: it may still take effect. Retrying with the
    /// same id is safe (it applies at most once).
    Indeterminate(String),
}

/// A leader's challenge to a node it saw in gossip (body of `POST /cluster/join-challenge`).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinChallenge {
    /// 32 random bytes in hex, fresh for each check.
    pub nonce: String,
    /// The node id and RPC address gossip advertised: the proof must be for exactly these.
    pub node_id: NodeId,
    pub rpc_addr: String,
}

/// `HMAC(join key, "join" | nonce | node_id | rpc_addr)` in hex (`keyring::Keyring::join_proof`).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinProof {
    pub proof: String,
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

/// Why a write has no result, saying what is known about it (mapped to HTTP in `api`).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Not applied, and never will be from this call: no attempt was proposed (no leader, no
    /// quorum, or the leader refused it before proposing).
    #[error("{0}")]
    NotApplied(String),
    /// An attempt went unanswered (or was proposed and not committed): the write may have been
    /// applied, or may be applied later, at most once. A retry with the same id tells.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// Committed, but not applied on this node in time (it will be).
    #[error("committed as entry {index} but not yet applied on node {node}")]
    NotYetVisible { index: u64, node: NodeId },
    /// The idempotency key was first used for a different request: nothing was applied.
    #[error("the idempotency key was first used for a different request")]
    KeyReused,
    /// The change does not fit in one log entry: nothing was applied.
    #[error("the change is {size} bytes as a log entry; at most {max} fit in one")]
    TooLarge { size: usize, max: usize },
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
    pub cluster_id: String,
    pub gossip: Arc<Gossip>,
    net: HttpNetwork,
    ids: IdGen,
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
        keys: Arc<Keyring>,
        tls: Arc<tls::ClusterTls>,
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
            // A snapshot goes in chunks of this many bytes, each one RPC (see network.rs).
            snapshot_max_chunk_size: network::SNAPSHOT_CHUNK_BYTES,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
            // Keep some entries behind a snapshot so a briefly lagging follower needs no snapshot.
            max_in_snapshot_log_to_keep: (cfg.snapshot_logs / 5).max(1),
            ..Default::default()
        }
        .validate()?;
        let net = HttpNetwork::new(keys, tls);
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
            cluster_id: cfg.cluster_id.clone(),
            gossip,
            net,
            ids: IdGen::new(cfg.node_id),
            started: Instant::now(),
            recently_removed: Default::default(),
            election: Default::default(),
        }))
    }

    /// Proposes `cmd` and returns its apply result once it is committed and applied on THIS
    /// node (read-your-writes). Forwards to the leader when this node is a follower, retrying
    /// with backoff while a leader is being elected. The write gets a new id here.
    pub async fn write(&self, cmd: Command) -> Result<ApplyResult, WriteError> {
        self.write_as(self.ids.next(), None, cmd).await
    }

    /// Like [`write`](Self::write) under a given id (a client's idempotency key with its
    /// request digest): every attempt carries the id, so the command applies at most once and
    /// a retry returns the first result.
    pub async fn write_as(
        &self,
        id: WriteId,
        fingerprint: Option<String>,
        cmd: Command,
    ) -> Result<ApplyResult, WriteError> {
        // An entry the peers' RPC would refuse would be retried for ever: refuse it here.
        let size = serde_json::to_vec(&cmd).map_or(usize::MAX, |v| v.len());
        if size > network::MAX_ENTRY_BYTES {
            return Err(WriteError::TooLarge {
                size,
                max: network::MAX_ENTRY_BYTES,
            });
        }
        let end = Instant::now() + WRITE_DEADLINE;
        let mut backoff = Duration::from_millis(50);
        let mut leaders = self.raft.metrics();
        let mut last_reason: String;
        // Why an earlier attempt's outcome is unknown: then "not applied" cannot be said.
        let mut unknown: Option<String> = None;
        loop {
            let target = self.leader();
            let attempt = match &target {
                Some((leader, _)) if *leader == self.node_id => {
                    self.write_local(id.clone(), fingerprint.clone(), cmd.clone(), end)
                        .await
                }
                Some((leader, addr)) => {
                    let req = ForwardRequest {
                        id: id.clone(),
                        fingerprint: fingerprint.clone(),
                        deadline_unix_ms: clock::unix_ms()
                            + FORWARD_WINDOW
                                .min(end.saturating_duration_since(Instant::now()))
                                .as_millis() as u64,
                        cmd: cmd.clone(),
                    };
                    self.forward(*leader, addr, &req, end).await
                }
                None => ForwardedWrite::NotLeader { leader: None },
            };
            match attempt {
                ForwardedWrite::Done { index, outcome } => {
                    self.wait_applied(index).await?;
                    return outcome.result().ok_or(WriteError::KeyReused);
                }
                ForwardedWrite::NotLeader { leader } => {
                    last_reason = match leader {
                        Some((id, _)) => format!("leader {id} changed during the write"),
                        None => "no leader elected (election in progress or no quorum)".into(),
                    }
                }
                ForwardedWrite::Unavailable(reason) => last_reason = reason,
                ForwardedWrite::Expired => {
                    last_reason = format!(
                        "the leader received the forwarded write after its deadline (slow \
                         network, or clocks further apart than {}s)",
                        MAX_CLOCK_SKEW.as_secs()
                    )
                }
                ForwardedWrite::Indeterminate(reason) => {
                    last_reason = reason.clone();
                    unknown = Some(reason);
                }
            }
            if Instant::now() + backoff > end {
                return Err(match unknown {
                    None => WriteError::NotApplied(format!(
                        "write not accepted within {}s: {last_reason}",
                        WRITE_DEADLINE.as_secs()
                    )),
                    Some(why) if why == last_reason => WriteError::OutcomeUnknown(format!(
                        "no final answer on the write within {}s: {why}",
                        WRITE_DEADLINE.as_secs()
                    )),
                    Some(why) => WriteError::OutcomeUnknown(format!(
                        "no final answer on the write within {}s: {why}; last attempt: \
                         {last_reason}",
                        WRITE_DEADLINE.as_secs()
                    )),
                });
            }
            // Back off, but go at once to a leader other than the one just tried.
            let tried = target.map(|(id, _)| id);
            let _ = tokio::time::timeout(
                backoff,
                leaders.wait_for(|m| m.current_leader.is_some() && m.current_leader != tried),
            )
            .await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Sends a write to the leader and waits for its answer, or until another leader is known
    /// (then the leader we wait on may be gone or frozen: the caller re-forwards the same id).
    async fn forward(
        &self,
        leader: NodeId,
        addr: &str,
        req: &ForwardRequest,
        end: Instant,
    ) -> ForwardedWrite {
        let timeout = end
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let mut leaders = self.raft.metrics();
        let moved = async {
            let changed = leaders
                .wait_for(|m| m.current_leader.is_some() && m.current_leader != Some(leader))
                .await
                .map(|m| m.current_leader);
            match changed {
                Ok(new) => new,
                // Raft stopped: only the answer (or its timeout) can end the wait.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            answer = self.net.post::<_, ForwardedWrite>(leader, addr, "/cluster/write", req, timeout) => {
                match answer {
                    Ok(a) => a,
                    // Never sent: nothing reached the leader.
                    Err(e) if e.is_connect() => ForwardedWrite::Unavailable(format!(
                        "leader {leader} at {addr} unreachable: {e}"
                    )),
                    // Refused before the handler (MAC, clock, replay, body): not proposed.
                    Err(e) if e.status().is_some_and(|s| s.is_client_error()) => {
                        ForwardedWrite::Unavailable(format!(
                            "leader {leader} at {addr} refused the forwarded write: {e}"
                        ))
                    }
                    Err(e) => ForwardedWrite::Indeterminate(format!(
                        "no answer from leader {leader} at {addr}: {e}"
                    )),
                }
            }
            new = moved => ForwardedWrite::Indeterminate(format!(
                "node {leader} was replaced as leader by node {} while the write was in flight",
                new.map(|n| n.to_string()).unwrap_or_default()
            )),
        }
    }

    /// One attempt to commit a write through this node's Raft (succeeds only on the leader),
    /// proposed only before `deadline`.
    pub async fn write_local(
        &self,
        id: WriteId,
        fingerprint: Option<String>,
        cmd: Command,
        deadline: Instant,
    ) -> ForwardedWrite {
        // Applied before (a retry, or a re-forward after a lost answer): its first result.
        match self.sm.known(&id, fingerprint.as_deref()) {
            (Known::Same(result), index) => {
                return ForwardedWrite::Done {
                    index,
                    outcome: Outcome::Replayed(result),
                }
            }
            (Known::OtherRequest, index) => {
                return ForwardedWrite::Done {
                    index,
                    outcome: Outcome::KeyReused,
                }
            }
            (Known::No, _) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ForwardedWrite::Expired;
        }
        // Confirm leadership with a quorum before proposing: without a quorum the write is
        // refused cleanly instead of sitting in the log and committing later.
        let check = QUORUM_CHECK_TIMEOUT.min(left);
        match tokio::time::timeout(check, self.raft.ensure_linearizable()).await {
            Err(_) if Instant::now() >= deadline => return ForwardedWrite::Expired,
            Err(_) => {
                return ForwardedWrite::Unavailable(format!(
                    "the cluster has no quorum (no majority answered within {}ms)",
                    check.as_millis()
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
        // The quorum check may have used up the time: never propose past the deadline.
        if Instant::now() >= deadline {
            return ForwardedWrite::Expired;
        }
        let entry = Proposal::Write(Write {
            id,
            fingerprint,
            at_unix_ms: clock::unix_ms(),
            cmd,
        });
        match tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(entry)).await {
            // Proposed but not committed: it may still commit if the quorum comes back.
            Err(_) => ForwardedWrite::Indeterminate(format!(
                "the write was proposed but not committed within {}s (quorum lost during the \
                 write); it takes effect if the cluster regains quorum",
                COMMIT_TIMEOUT.as_secs()
            )),
            Ok(Ok(resp)) => ForwardedWrite::Done {
                index: resp.log_id.index,
                outcome: resp.data,
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                ForwardedWrite::NotLeader {
                    leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
                }
            }
            // Raft refused or stopped while taking the entry: whether it reached the log is
            // not known.
            Ok(Err(e)) => ForwardedWrite::Indeterminate(e.to_string()),
        }
    }

    /// What the replicated write table knows about `id` on this node (for answering a
    /// client's retry without proposing anything).
    pub fn known_write(&self, id: &WriteId, fingerprint: Option<&str>) -> Known {
        self.sm.known(id, fingerprint).0
    }

    async fn wait_applied(&self, index: u64) -> Result<(), WriteError> {
        let mut rx = self.sm.applied_index();
        let reached = tokio::time::timeout(COMMIT_TIMEOUT, async {
            rx.wait_for(|applied| *applied >= index).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => Err(WriteError::NotYetVisible {
                index,
                node: self.node_id,
            }),
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
                        id,
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

    /// The keys derived from the cluster secret (RPC MACs, join proofs).
    pub fn keys(&self) -> &Keyring {
        &self.net.keys
    }

    /// Checks, before adding a node seen in gossip, that it knows the cluster secret: it must
    /// answer a fresh nonce with a proof for the node id and RPC address gossip advertised.
    /// Nothing secret is sent (the challenge is signed like every RPC; a MAC reveals no key).
    /// With mutual TLS the challenge is sent only once the address has presented a
    /// certificate of the cluster CA naming `node_id`.
    pub async fn verify_peer(&self, node_id: NodeId, rpc_addr: &str) -> bool {
        let nonce = self.net.keys.random::<32>();
        let challenge = JoinChallenge {
            nonce: hex(&nonce),
            node_id,
            rpc_addr: rpc_addr.to_string(),
        };
        let answer = self
            .net
            .post::<_, JoinProof>(
                node_id,
                rpc_addr,
                "/cluster/join-challenge",
                &challenge,
                Duration::from_secs(2),
            )
            .await;
        answer
            .ok()
            .and_then(|a| unhex(&a.proof))
            .is_some_and(|proof| {
                self.net
                    .keys
                    .verify_join_proof(&nonce, node_id, rpc_addr, &proof)
            })
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
                    .post::<_, RemoveOutcome>(
                        leader,
                        &addr,
                        "/cluster/remove-member",
                        &id,
                        COMMIT_TIMEOUT,
                    )
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
