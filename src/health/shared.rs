//! Health shared through gossip. Each node publishes only its own "down" verdicts, one key
//! per backend it sees failing (`hc/<backend>`), and deletes the key when the backend
//! recovers: gossip carries only failures, so 10,000 healthy backends cost nothing. Live
//! peers' keys are folded into each backend's `peer_down`; keys of dead peers drop out with
//! the peer (chitchat's live set), so they expire.
//!
//! A node that just started knows nothing of its peers' verdicts: [`PeerViewGate`] holds
//! proxied requests until every other Raft member is live in gossip (their keys arrive with
//! them) or [`PEER_VIEW_WAIT`] has passed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::gossip::Gossip;
use crate::proxy::DataPlane;

pub const KEY_PREFIX: &str = "hc/";
const DOWN: &str = "down";
const TICK: Duration = Duration::from_millis(100);

/// Longest a starting node waits for its peers' verdicts before it routes on its own view
/// (a member that is down never shows up in gossip).
pub const PEER_VIEW_WAIT: Duration = Duration::from_secs(2);

/// Opens once this node has its peers' health verdicts (or gave up waiting for them).
/// The proxy checks one atomic per request; only requests in the first moments after a
/// start ever wait.
#[derive(Debug)]
pub struct PeerViewGate {
    open: AtomicBool,
    opened: Notify,
    /// The gate opens by itself this long after the data plane was created, even if the
    /// control plane is slow to start (ports still held, Raft loading).
    deadline: Instant,
}

impl Default for PeerViewGate {
    fn default() -> Self {
        Self {
            open: AtomicBool::new(false),
            opened: Notify::new(),
            deadline: Instant::now() + PEER_VIEW_WAIT,
        }
    }
}

impl PeerViewGate {
    pub fn is_open(&self) -> bool {
        if self.open.load(Ordering::Acquire) {
            return true;
        }
        if Instant::now() >= self.deadline {
            self.open();
            return true;
        }
        false
    }

    pub fn open(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            self.opened.notify_waiters();
        }
    }

    /// Waits until the gate opens: when the peer view arrives, at the latest at the deadline.
    pub async fn wait(&self) {
        let opened = self.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if self.is_open() {
            return;
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, opened).await;
        self.open();
    }
}

/// Backend id -> live peers that report it down.
type PeerVerdicts = HashMap<String, Vec<u64>>;

/// Folds per-peer key sets into backend id -> peers reporting it down (sorted ids).
fn merge(peer_keys: Vec<(u64, HashSet<String>)>) -> PeerVerdicts {
    let mut out: PeerVerdicts = HashMap::new();
    for (peer, keys) in peer_keys {
        for backend in keys {
            out.entry(backend).or_default().push(peer);
        }
    }
    for peers in out.values_mut() {
        peers.sort_unstable();
    }
    out
}

/// Publishes this node's verdicts and applies its peers' every [`TICK`]. `other_members`
/// returns the Raft members other than this node (whose verdicts a start waits for).
pub async fn run(
    data: Arc<DataPlane>,
    gossip: Arc<Gossip>,
    other_members: impl Fn() -> HashSet<u64>,
) {
    let started = Instant::now();
    let mut published: HashSet<String> = HashSet::new();
    let mut applied: PeerVerdicts = HashMap::new();
    let mut applied_generation = None;
    let mut synced = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let generation = data.backends.generation();
        let runtimes = data.backends.all();

        // Publish: only changes of our own verdicts touch gossip.
        let down_now: HashSet<&str> = runtimes
            .iter()
            .filter(|rt| rt.health.local_verdict_down())
            .map(|rt| rt.id.as_str())
            .collect();
        let raised: Vec<(String, String)> = down_now
            .iter()
            .filter(|id| !published.contains(**id))
            .map(|id| (format!("{KEY_PREFIX}{id}"), DOWN.to_string()))
            .collect();
        let cleared: Vec<String> = published
            .iter()
            .filter(|id| !down_now.contains(id.as_str()))
            .map(|id| format!("{KEY_PREFIX}{id}"))
            .collect();
        if !raised.is_empty() || !cleared.is_empty() {
            gossip.update_own(raised, cleared).await;
            published = down_now.iter().map(|id| id.to_string()).collect();
        }

        // Until the peers are heard from, keep what the runtimes hold (nothing, or what a
        // graceful upgrade handed over) rather than an empty view.
        if !synced {
            let live = gossip.live_peer_ids();
            let missing = other_members()
                .iter()
                .filter(|id| !live.contains(id))
                .count();
            if missing == 0 || started.elapsed() >= PEER_VIEW_WAIT {
                if missing > 0 {
                    tracing::info!(
                        missing,
                        "routing on this node's own health view: {missing} member(s) not seen in gossip after {PEER_VIEW_WAIT:?}"
                    );
                }
                synced = true;
            }
        }
        if !synced {
            continue;
        }

        // Apply peers' verdicts: a full pass only when they or the set of backends changed.
        let verdicts = merge(gossip.peer_keys(KEY_PREFIX));
        if verdicts != applied || applied_generation != Some(generation) {
            for rt in &runtimes {
                rt.health
                    .set_peers_down(verdicts.get(&rt.id).cloned().unwrap_or_default());
            }
            applied = verdicts;
            applied_generation = Some(generation);
        }
        data.peer_view.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merge_lists_every_peer_reporting_a_backend_down() {
        let v = merge(vec![
            (3, keys(&["a", "b"])),
            (2, keys(&["a"])),
            (4, keys(&[])),
        ]);
        assert_eq!(v.get("a"), Some(&vec![2, 3]));
        assert_eq!(v.get("b"), Some(&vec![3]));
        assert_eq!(v.len(), 2);
    }

    fn gate_with_deadline(after: Duration) -> PeerViewGate {
        PeerViewGate {
            deadline: Instant::now() + after,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn gate_releases_waiters_when_opened_and_opens_itself_at_the_deadline() {
        let gate = gate_with_deadline(Duration::from_millis(50));
        assert!(!gate.is_open());
        gate.wait().await;
        assert!(gate.is_open(), "the deadline opens the gate");

        let gate = Arc::new(gate_with_deadline(Duration::from_secs(30)));
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move {
                let t = Instant::now();
                gate.wait().await;
                t.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.open();
        let waited = waiter.await.expect("waiter");
        assert!(
            waited < Duration::from_secs(30),
            "opening releases the waiter"
        );
        gate.wait().await; // open: returns at once
    }
}
