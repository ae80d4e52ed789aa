//! Elections with a Pre-Vote round (Raft thesis §9.6), run by this module instead of
//! openraft's own timer (`enable_elect: false`).
//!
//! openraft 0.9 starts an election, with a new term, whenever a follower has not heard from a
//! leader for a while. A node cut off from the others keeps doing so (term 2 -> 11 in ten
//! seconds); when the network heals, its higher term answers the leader's next heartbeat and
//! the healthy leader steps down. Here a node first asks the voters whether they would vote
//! for it (`/cluster/pre-vote`, authenticated like every cluster RPC). A voter says yes only if
//! it has not heard from a leader within the leader lease and the candidate's log is at least
//! as up to date as its own. Only with a majority of yes does the node ask openraft to elect
//! (`raft.trigger().elect()`), so an isolated node never raises its term, and a node that
//! comes back finds the cluster's term unchanged.
//!
//! Timing (fixed; see docs/cluster.md): the leader sends heartbeats every 1.5 x
//! [`HEARTBEAT_MS`]; openraft's voters refuse a real vote for [`LEADER_LEASE_MS`] after they
//! last heard from a leader; a follower runs a pre-vote after a random
//! [`CAMPAIGN_AFTER_MS`] without a leader, so by then the other voters' leases have run out
//! too and the real vote can win at once.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use openraft::{LogId, ServerState};
use serde::{Deserialize, Serialize};

use super::{ClusterNode, NodeId};

/// openraft's `heartbeat_interval`. openraft 0.9 also uses it as the timeout of every
/// AppendEntries call and of the leader's quorum check (`ensure_linearizable`), and ticks
/// every 1.5 x this, so heartbeats go out every 300 ms. At 100 ms a loaded machine (a follower
/// fsyncing its log) answered late often enough that the leader never counted a quorum and
/// refused every write: keep it well above a follower's worst append time.
pub const HEARTBEAT_MS: u64 = 200;
/// openraft's `election_timeout_min`. With our own elections it only bounds how long a
/// candidate waits for vote answers.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 500;
/// openraft's `election_timeout_max`, which openraft 0.9 also uses as the leader lease: a
/// voter refuses to vote for anyone else for this long after it last heard from a leader, and
/// a leader whose last quorum acknowledgement is older than this reports `quorum: false`.
pub const LEADER_LEASE_MS: u64 = 900;
/// A follower starts a pre-vote after a random time in this range without a leader
/// (re-drawn after each attempt, so two followers rarely campaign at once).
pub const CAMPAIGN_AFTER_MS: (u64, u64) = (LEADER_LEASE_MS + 150, LEADER_LEASE_MS + 450);
/// How long a pre-vote waits for the voters' answers.
const PRE_VOTE_TIMEOUT: Duration = Duration::from_millis(300);
/// How often the election loop looks at the node's state.
const TICK: Duration = Duration::from_millis(50);

/// State shared by the election loop and the pre-vote answers of one node.
#[derive(Default)]
pub struct ElectionState {
    /// In contact with a quorum (`Status::quorum`), refreshed every tick.
    quorum: AtomicBool,
    /// When this node last said yes to someone's pre-vote: it then holds back its own
    /// campaign for a while, so two followers rarely split the vote.
    granted_at: Mutex<Option<Instant>>,
}

impl ElectionState {
    pub fn has_quorum(&self) -> bool {
        self.quorum.load(Ordering::Relaxed)
    }

    fn granted_recently(&self, within: Duration) -> bool {
        self.granted_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < within)
    }
}

/// "Would you vote for me?", asked before an election.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log: Option<LogId<NodeId>>,
}

/// A voter's answer to a [`PreVoteRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    /// Why not (for logs).
    pub reason: Option<String>,
}

/// What a node knows about its leader, from openraft's state.
struct LeaderView {
    state: ServerState,
    /// On a follower: time since a leader last reached it (heartbeat or entries), if the
    /// vote it holds is a leader's (committed). On a candidate: time since it last voted or
    /// campaigned.
    vote_age: Option<Duration>,
    vote_committed: bool,
    /// On a leader: time since a majority last acknowledged it.
    quorum_ack_age: Option<Duration>,
    last_log: Option<LogId<NodeId>>,
}

async fn leader_view(node: &ClusterNode) -> Option<LeaderView> {
    let (vote_age, vote_committed) = node
        .raft
        .with_raft_state(|st| {
            (
                st.vote_last_modified().map(|t| t.elapsed()),
                st.vote_ref().is_committed(),
            )
        })
        .await
        .ok()?;
    let m = node.raft.metrics().borrow().clone();
    let last_log = node.raft.data_metrics().borrow().last_log;
    Some(LeaderView {
        state: m.state,
        vote_age,
        vote_committed,
        quorum_ack_age: m.millis_since_quorum_ack.map(Duration::from_millis),
        last_log,
    })
}

fn lease() -> Duration {
    Duration::from_millis(LEADER_LEASE_MS)
}

/// A voter's side of the pre-vote.
pub async fn answer(node: &ClusterNode, req: &PreVoteRequest) -> PreVoteResponse {
    let refuse = |reason: String| PreVoteResponse {
        granted: false,
        reason: Some(reason),
    };
    let Some(v) = leader_view(node).await else {
        return refuse("raft has stopped on this node".into());
    };
    if v.state == ServerState::Leader {
        if v.quorum_ack_age.is_some_and(|a| a <= lease()) {
            return refuse(format!(
                "node {} is the leader and has a quorum",
                node.node_id
            ));
        }
    } else if v.vote_committed && v.vote_age.is_some_and(|a| a <= lease()) {
        return refuse(format!(
            "node {} heard from the leader {} ms ago",
            node.node_id,
            v.vote_age.map(|a| a.as_millis()).unwrap_or(0)
        ));
    }
    if req.last_log < v.last_log {
        return refuse(format!(
            "node {}'s log ({:?}) is ahead of the candidate's ({:?})",
            node.node_id, v.last_log, req.last_log
        ));
    }
    *node
        .election
        .granted_at
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    PreVoteResponse {
        granted: true,
        reason: None,
    }
}

/// Runs forever: starts a pre-vote, then an election, when this voter has been without a
/// leader for [`CAMPAIGN_AFTER_MS`].
pub async fn run(node: Arc<ClusterNode>) {
    let mut campaign_after = random_campaign_delay();
    let mut retry_after = random_delay(RETRY_AFTER_MS);
    let mut last_attempt: Option<Instant> = None;
    let mut next_tick = TICK;
    loop {
        tokio::time::sleep(next_tick).await;
        next_tick = TICK;
        let m = node.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: Vec<(NodeId, String)> = membership
            .voter_ids()
            .filter_map(|id| Some((id, membership.get_node(&id)?.addr.clone())))
            .collect();
        let Some(view) = leader_view(&node).await else {
            node.election.quorum.store(false, Ordering::Relaxed);
            continue;
        };
        node.election
            .quorum
            .store(in_contact(&view, voters.len()), Ordering::Relaxed);
        if m.state == ServerState::Leader || !voters.iter().any(|(id, _)| *id == node.node_id) {
            continue;
        }
        if voters.len() == 1 {
            // The only voter needs no one's opinion (openraft does the same).
            if m.state != ServerState::Candidate {
                let _ = node.raft.trigger().elect().await;
            }
            continue;
        }
        let since_leader = view.vote_age.unwrap_or(Duration::MAX);
        let since_attempt = last_attempt.map_or(Duration::MAX, |t| t.elapsed());
        // No leader since our last attempt (a split vote, or a pre-vote we lost): try again
        // after a short jitter rather than a whole lease, so a split vote costs ~0.5 s, not
        // another 1-1.4 s (the pre-vote still keeps a node with a live leader from disrupting).
        let wait = if since_attempt < since_leader {
            retry_after.saturating_sub(since_attempt)
        } else {
            campaign_after.saturating_sub(since_leader)
        };
        if !wait.is_zero() {
            // Wake up right at the deadline: campaigns quantized to a coarse tick would
            // collide (and split the vote) more often.
            next_tick = wait.min(TICK);
            continue;
        }
        if node.election.granted_recently(campaign_after) {
            // Someone else is campaigning: give it its chance first.
            continue;
        }
        last_attempt = Some(Instant::now());
        campaign_after = random_campaign_delay();
        retry_after = random_delay(RETRY_AFTER_MS);
        // During a membership change the configuration is joint: a majority of each.
        let configs = membership.get_joint_config().clone();
        let (granted, refusals) = pre_vote(&node, &voters, view.last_log, &configs).await;
        if quorum_of(&granted, &configs) {
            tracing::info!(
                granted = ?granted,
                voters = voters.len(),
                term = m.current_term,
                "pre-vote won: starting an election"
            );
            if let Err(e) = node.raft.trigger().elect().await {
                tracing::warn!("cannot start an election: {e}");
            }
        } else {
            tracing::debug!(?granted, ?refusals, "pre-vote lost: no election");
        }
    }
}

/// See `Status::quorum`: a leader acknowledged by a majority within the lease, or a node that
/// heard from a leader within the lease.
fn in_contact(v: &LeaderView, voters: usize) -> bool {
    match v.state {
        ServerState::Leader => voters <= 1 || v.quorum_ack_age.is_some_and(|a| a <= lease()),
        _ => v.vote_committed && v.vote_age.is_some_and(|a| a <= lease()),
    }
}

/// True when `granted` holds a majority of every configuration in `configs`.
fn quorum_of(granted: &BTreeSet<NodeId>, configs: &[BTreeSet<NodeId>]) -> bool {
    !configs.is_empty()
        && configs
            .iter()
            .all(|c| c.intersection(granted).count() * 2 > c.len())
}

/// Asks the other voters until the yes votes (our own included) make a quorum of `configs`, or
/// all answered; returns (who said yes, refusal reasons). A cut-off voter does not hold up the
/// decision.
async fn pre_vote(
    node: &ClusterNode,
    voters: &[(NodeId, String)],
    last_log: Option<LogId<NodeId>>,
    configs: &[BTreeSet<NodeId>],
) -> (BTreeSet<NodeId>, Vec<String>) {
    let req = PreVoteRequest {
        candidate: node.node_id,
        last_log,
    };
    let mut asks: FuturesUnordered<_> = voters
        .iter()
        .filter(|(id, _)| *id != node.node_id)
        .map(|(id, addr)| {
            let req = req.clone();
            async move {
                let answer = node
                    .net
                    .post::<_, PreVoteResponse>(
                        *id,
                        addr,
                        "/cluster/pre-vote",
                        &req,
                        PRE_VOTE_TIMEOUT,
                    )
                    .await;
                (*id, answer)
            }
        })
        .collect();
    let mut granted = BTreeSet::from([node.node_id]);
    let mut refusals = Vec::new();
    while !quorum_of(&granted, configs) {
        let Some((id, answer)) = asks.next().await else {
            break;
        };
        match answer {
            Ok(a) if a.granted => {
                granted.insert(id);
            }
            Ok(a) => refusals.push(a.reason.unwrap_or_default()),
            Err(e) => refusals.push(format!("node {id} unreachable: {e}")),
        }
    }
    (granted, refusals)
}

fn random_campaign_delay() -> Duration {
    random_delay(CAMPAIGN_AFTER_MS)
}

/// After an attempt that brought no leader, the next one comes this long (jittered) after it.
const RETRY_AFTER_MS: (u64, u64) = (250, 650);

fn random_delay((lo, hi): (u64, u64)) -> Duration {
    // A randomly seeded hasher is random enough for a jitter and needs no extra dependency.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(lo + r % (hi - lo + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quorum_needs_a_majority_of_every_configuration() {
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        let three = set(&[1, 2, 3]);
        assert!(!quorum_of(&set(&[1]), std::slice::from_ref(&three)));
        assert!(quorum_of(&set(&[1, 3]), std::slice::from_ref(&three)));
        // Joint {1,2,3} + {1,2,3,4}: 3 of 4 are needed in the second.
        let joint = [three.clone(), set(&[1, 2, 3, 4])];
        assert!(!quorum_of(&set(&[2, 3]), &joint));
        assert!(quorum_of(&set(&[2, 3, 4]), &joint));
        assert!(!quorum_of(&set(&[1, 2, 3]), &[]));
    }

    #[test]
    fn campaign_delay_is_past_the_lease_and_jittered() {
        let delays: std::collections::BTreeSet<Duration> =
            (0..200).map(|_| random_campaign_delay()).collect();
        assert!(delays.len() > 20, "no jitter: {delays:?}");
        for d in &delays {
            assert!(*d > lease() + Duration::from_millis(100));
            assert!(*d <= Duration::from_millis(CAMPAIGN_AFTER_MS.1));
        }
    }
}
