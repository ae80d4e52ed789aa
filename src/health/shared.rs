//! Health shared through gossip. Each node publishes only its own verdicts against backends,
//! one key per backend it sees failing (`hc/<backend key>`, a fixed-size hash of the id, see
//! `gossip::backend_key`): `down` (probes, or the breaker after failed connects) or
//! `ejected <unix ms>` (a passive ejection and its deadline, `live::ejection`). It deletes the
//! key when the verdict ends: gossip carries only failures, so 10,000 healthy backends cost
//! nothing. Live peers' keys are folded into each backend's `peer_down` and peer ejections;
//! keys of dead peers drop out with the peer (chitchat's live set), so they expire.
//!
//! The pool cap on passive ejections (`[health_check] passive_max_ejected_percent`) is
//! applied here too, from the same deadlines on every node.
//!
//! A node that just started knows nothing of its peers' verdicts: the peer-view gate
//! (`live::gate`) holds proxied requests until every other Raft member is live in gossip
//! (their keys arrive with them) or [`PEER_VIEW_WAIT`] has passed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::owners::Probers;
use crate::clock::coarse_unix_ms;
use crate::gossip::{backend_hash, backend_key, Gossip, KEY_HEALTH_PREFIX};
use crate::live::ejection::{self, PeerEjection};
use crate::live::gate::PEER_VIEW_WAIT;
use crate::live::health::Verdict;
use crate::live::Live;

const DOWN: &str = "down";
const EJECTED: &str = "ejected ";
const TICK: Duration = Duration::from_millis(100);
/// Without a change signalled (`live::verdict_epoch`), the pass over every backend still runs
/// this often: a safety net (every input of a verdict signals its changes, and ejection
/// deadlines are passes of their own). At 100,000 backends a pass takes ~45 ms of a core:
/// once a second that was most of an idle node's CPU (bench/README.md, #15).
const FULL_PASS_EVERY: Duration = Duration::from_secs(15);
/// No peer's ejection deadline is believed further out than this (the longest a config
/// allows): a bad value cannot hold a backend out for ever.
const MAX_EJECTION_AHEAD_MS: u64 = 86_400_000;

/// Backend key -> live peers' verdicts on it (sorted by peer id).
type PeerVerdicts = HashMap<String, Vec<(u64, Verdict)>>;

/// The gossip value of a verdict.
pub fn encode(v: Verdict) -> String {
    match v {
        Verdict::Down => DOWN.to_string(),
        Verdict::EjectedUntil(until) => format!("{EJECTED}{until}"),
    }
}

/// A peer's gossip value: an ejection deadline (bounded to `now` + a day) or "down"; a
/// value this version does not know reads as "down", as every key did before ejections.
pub fn decode(value: &str, now_unix_ms: u64) -> Verdict {
    match value
        .strip_prefix(EJECTED)
        .and_then(|t| t.parse::<u64>().ok())
    {
        Some(until) => {
            Verdict::EjectedUntil(until.min(now_unix_ms.saturating_add(MAX_EJECTION_AHEAD_MS)))
        }
        None => Verdict::Down,
    }
}

/// Folds per-peer entries into backend key -> peers' verdicts.
fn merge(peer_entries: Vec<(u64, Vec<(String, String)>)>, now_unix_ms: u64) -> PeerVerdicts {
    let mut out: PeerVerdicts = HashMap::new();
    for (peer, entries) in peer_entries {
        for (backend, value) in entries {
            out.entry(backend)
                .or_default()
                .push((peer, decode(&value, now_unix_ms)));
        }
    }
    for peers in out.values_mut() {
        peers.sort_unstable_by_key(|(peer, _)| *peer);
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
    pools: impl Fn() -> Vec<Vec<String>>,
) {
    let started = Instant::now();
    let mut published: HashMap<String, String> = HashMap::new();
    let mut capped: Option<(u64, Vec<(String, u64)>)> = None;
    let mut applied: PeerVerdicts = HashMap::new();
    let mut applied_generation = None;
    let mut applied_probers: Option<Probers> = None;
    let mut synced = false;
    // When the last pass over the backends ran, on what, and the next ejection deadline then.
    let mut passed: Option<(u64, u64, Instant)> = None;
    let mut next_deadline: Option<u64> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let generation = live.backends.generation();
        let now = coarse_unix_ms();
        // Read before the pass: a change during it is seen by the next tick.
        let epoch = crate::live::verdict_epoch();
        let due = match passed {
            None => true,
            Some((e, g, at)) => {
                e != epoch
                    || g != generation
                    || at.elapsed() >= FULL_PASS_EVERY
                    || next_deadline.is_some_and(|t| now >= t)
            }
        };
        let ejected = if due {
            passed = Some((epoch, generation, Instant::now()));
            Some(publish_own(&live, &gossip, &mut published, now).await)
        } else {
            None
        };
        if let Some(ejected) = &ejected {
            next_deadline = ejected.iter().map(|(_, t)| *t).min();
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
        let verdicts = merge(gossip.peer_entries(KEY_HEALTH_PREFIX), now);
        let probers = Probers::new(gossip.probing_members(), probers_per_backend);
        if verdicts != applied
            || applied_generation != Some(generation)
            || applied_probers.as_ref() != Some(&probers)
        {
            for rt in &live.backends.all() {
                let hash = backend_hash(&rt.id);
                let entries = verdicts.get(&format!("{hash:016x}"));
                let mut down = Vec::new();
                let mut ejections = Vec::new();
                for (peer, v) in entries.into_iter().flatten() {
                    match v {
                        Verdict::Down => down.push(*peer),
                        Verdict::EjectedUntil(until) => ejections.push(PeerEjection {
                            node_id: *peer,
                            until_unix_ms: *until,
                        }),
                    }
                }
                rt.health.set_probers_down(
                    !down.is_empty() && probers_agree_down(&probers, hash, gossip.node_id, &down),
                );
                rt.health.set_peers_down(down);
                rt.health.ejection.set_peers(ejections);
            }
            applied = verdicts;
            applied_generation = Some(generation);
            applied_probers = Some(probers);
        }
        if let Some(ejected) = ejected {
            apply_pool_cap(&live, generation, ejected, &pools, &mut capped);
        }
        live.peer_view.open();
    }
}

/// One pass over the backends: publishes changes of this node's own verdicts (only changes
/// touch gossip) and returns the ejections in force, for the pool cap. Both are few; the pass
/// itself is the cost, so it copies nothing else.
async fn publish_own(
    live: &Live,
    gossip: &Gossip,
    published: &mut HashMap<String, String>,
    now: u64,
) -> Vec<(String, u64)> {
    let mut verdicts_now: HashMap<String, String> = HashMap::new();
    let mut ejected: Vec<(String, u64)> = Vec::new();
    live.backends.for_each(|rt| {
        if let Some(v) = rt.health.local_verdict(now) {
            verdicts_now.insert(rt.id.clone(), encode(v));
        }
        if let Some(until) = rt.health.ejection.any_until(now) {
            ejected.push((rt.id.clone(), until));
        }
    });
    let raised: Vec<(String, String)> = verdicts_now
        .iter()
        .filter(|(id, v)| published.get(*id) != Some(*v))
        .map(|(id, v)| (format!("{KEY_HEALTH_PREFIX}{}", backend_key(id)), v.clone()))
        .collect();
    let cleared: Vec<String> = published
        .keys()
        .filter(|id| !verdicts_now.contains_key(*id))
        .map(|id| format!("{KEY_HEALTH_PREFIX}{}", backend_key(id)))
        .collect();
    if !raised.is_empty() || !cleared.is_empty() {
        gossip.update_own(raised, cleared).await;
        *published = verdicts_now;
    }
    ejected
}

/// Waives the passive ejections over each pool's cap. Recomputed only when the ejections in
/// force or the backends change; with none in force it costs one pass over the runtimes.
fn apply_pool_cap(
    live: &Live,
    generation: u64,
    mut ejected: Vec<(String, u64)>,
    pools: &impl Fn() -> Vec<Vec<String>>,
    capped: &mut Option<(u64, Vec<(String, u64)>)>,
) {
    ejected.sort_unstable();
    if capped
        .as_ref()
        .is_some_and(|(g, e)| *g == generation && *e == ejected)
    {
        return;
    }
    if ejected.is_empty() {
        live.backends
            .for_each(|rt| rt.health.ejection.set_waived(false));
    } else {
        let runtimes = live.backends.all();
        let index: HashMap<&str, usize> = runtimes
            .iter()
            .enumerate()
            .map(|(i, rt)| (rt.id.as_str(), i))
            .collect();
        let mut until = vec![0u64; runtimes.len()];
        for (id, t) in &ejected {
            if let Some(i) = index.get(id.as_str()) {
                until[*i] = *t;
            }
        }
        let pools: Vec<Vec<usize>> = pools()
            .iter()
            .map(|pool| {
                pool.iter()
                    .filter_map(|id| index.get(id.as_str()).copied())
                    .collect()
            })
            .collect();
        let waived = ejection::waivers(&until, &pools, ejection::policy());
        for (rt, w) in runtimes.iter().zip(waived) {
            if rt.health.ejection.waived() != w {
                if w {
                    tracing::warn!(
                        backend = %rt.id,
                        "ejection waived: its pool is at passive_max_ejected_percent"
                    );
                }
                rt.health.ejection.set_waived(w);
            }
        }
    }
    *capped = Some((generation, ejected));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(ids: &[&str]) -> Vec<(String, String)> {
        ids.iter()
            .map(|s| (s.to_string(), DOWN.to_string()))
            .collect()
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
        let v = merge(
            vec![
                (3, down(&["a", "b"])),
                (2, vec![("a".into(), "ejected 5000".into())]),
                (4, down(&[])),
            ],
            0,
        );
        assert_eq!(
            v.get("a"),
            Some(&vec![(2, Verdict::EjectedUntil(5000)), (3, Verdict::Down)])
        );
        assert_eq!(v.get("b"), Some(&vec![(3, Verdict::Down)]));
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn verdict_values_round_trip_and_hostile_ones_are_bounded() {
        for v in [Verdict::Down, Verdict::EjectedUntil(1_700_000_000_000)] {
            assert_eq!(decode(&encode(v), 1_700_000_000_000), v);
        }
        // (value, now, expected)
        for (value, now, want) in [
            (
                "ejected 18446744073709551615",
                1_000,
                Verdict::EjectedUntil(1_000 + MAX_EJECTION_AHEAD_MS),
            ),
            ("ejected -1", 0, Verdict::Down),
            ("ejected ", 0, Verdict::Down),
            ("something newer", 0, Verdict::Down),
            ("", 0, Verdict::Down),
        ] {
            assert_eq!(decode(value, now), want, "{value:?}");
        }
    }
}
