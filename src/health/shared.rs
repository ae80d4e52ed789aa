//! Health shared through gossip. Each node publishes only its own "down" verdicts, one key
//! per backend it sees failing (`hc/<backend key>`, a fixed-size hash of the id, see
//! `gossip::backend_key`), and deletes the key when the backend
//! recovers: gossip carries only failures, so 10,000 healthy backends cost nothing. Live
//! peers' keys are folded into each backend's `peer_down`; keys of dead peers drop out with
//! the peer (chitchat's live set), so they expire.
//!
//! A node that just started knows nothing of its peers' verdicts: the peer-view gate
//! (`live::gate`) holds proxied requests until every other Raft member is live in gossip
//! (their keys arrive with them) or [`PEER_VIEW_WAIT`] has passed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::owners::Probers;
use crate::gossip::{backend_hash, backend_key, Gossip, KEY_HEALTH_PREFIX};
use crate::live::gate::PEER_VIEW_WAIT;
use crate::live::Live;

const DOWN: &str = "down";
const TICK: Duration = Duration::from_millis(100);

/// Backend key -> live peers that report it down.
type PeerVerdicts = HashMap<String, Vec<u64>>;

/// Folds per-peer key sets into backend key -> peers reporting it down (sorted ids).
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

/// Whether every prober of a backend other than `me` is among the peers reporting it down
/// (`peers`, sorted): then a node that does not probe the backend holds it down too.
fn probers_agree_down(probers: &Probers, hash: u64, me: u64, peers: &[u64]) -> bool {
    let mut others = probers.of(hash).into_iter().filter(|n| *n != me).peekable();
    others.peek().is_some() && others.all(|n| peers.binary_search(&n).is_ok())
}

/// Publishes this node's verdicts and applies its peers' every [`TICK`]. `other_members`
/// returns the Raft members other than this node (whose verdicts a start waits for);
/// `probers_per_backend` is `[health_check] probers_per_backend` (see `owners`).
pub async fn run(
    live: Arc<Live>,
    gossip: Arc<Gossip>,
    probers_per_backend: usize,
    other_members: impl Fn() -> HashSet<u64>,
) {
    let started = Instant::now();
    let mut published: HashSet<String> = HashSet::new();
    let mut applied: PeerVerdicts = HashMap::new();
    let mut applied_generation = None;
    let mut applied_probers: Option<Probers> = None;
    let mut synced = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let generation = live.backends.generation();
        let runtimes = live.backends.all();

        // Publish: only changes of our own verdicts touch gossip.
        let down_now: HashSet<&str> = runtimes
            .iter()
            .filter(|rt| rt.health.local_verdict_down())
            .map(|rt| rt.id.as_str())
            .collect();
        let raised: Vec<(String, String)> = down_now
            .iter()
            .filter(|id| !published.contains(**id))
            .map(|id| {
                (
                    format!("{KEY_HEALTH_PREFIX}{}", backend_key(id)),
                    DOWN.to_string(),
                )
            })
            .collect();
        let cleared: Vec<String> = published
            .iter()
            .filter(|id| !down_now.contains(id.as_str()))
            .map(|id| format!("{KEY_HEALTH_PREFIX}{}", backend_key(id)))
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

        // Apply peers' verdicts: a full pass only when they, the set of backends or the
        // probing nodes changed.
        let verdicts = merge(gossip.peer_keys(KEY_HEALTH_PREFIX));
        let probers = Probers::new(gossip.probing_members(), probers_per_backend);
        if verdicts != applied
            || applied_generation != Some(generation)
            || applied_probers.as_ref() != Some(&probers)
        {
            for rt in &runtimes {
                let hash = backend_hash(&rt.id);
                let peers = verdicts
                    .get(&format!("{hash:016x}"))
                    .cloned()
                    .unwrap_or_default();
                rt.health.set_probers_down(
                    !peers.is_empty() && probers_agree_down(&probers, hash, gossip.node_id, &peers),
                );
                rt.health.set_peers_down(peers);
            }
            applied = verdicts;
            applied_generation = Some(generation);
            applied_probers = Some(probers);
        }
        live.peer_view.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_non_prober_holds_a_backend_down_only_when_all_its_other_probers_say_so() {
        let hash = backend_hash("web-1");
        let k2 = Probers::new(vec![1, 2, 3], 2);
        let owners = k2.of(hash);
        let outsider = [1, 2, 3].into_iter().find(|n| !owners.contains(n)).unwrap();
        let sorted = |mut v: Vec<u64>| {
            v.sort_unstable();
            v
        };
        // (probers, this node, peers reporting down, expected)
        for (probers, me, peers, want) in [
            (&k2, outsider, sorted(owners.clone()), true),
            (&k2, outsider, vec![owners[0]], false),
            (&k2, outsider, vec![owners[1]], false),
            (&k2, outsider, vec![], false),
            // A prober itself: the other prober's word (it routes on its own probes anyway).
            (&k2, owners[0], vec![owners[1]], true),
            // Alone: nobody else probes.
            (&Probers::new(vec![outsider], 2), outsider, vec![], false),
        ] {
            assert_eq!(
                probers_agree_down(probers, hash, me, &peers),
                want,
                "me {me}, probers {owners:?}, down {peers:?}"
            );
        }
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
}
