//! Which nodes probe which backend: rendezvous (highest-random-weight) hashing of the backend
//! over the nodes that share the probes (`Gossip::probing_members`). Each node weighs every
//! (backend, node) pair the same way, so every node agrees on a backend's probers without
//! talking; when a node leaves, only the backends it probed get a new prober (the next-ranked
//! node), and when one joins it takes about 1/N of the backends from the others.

/// The nodes sharing the probes, and how many of them probe each backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probers {
    /// Sorted, without duplicates.
    nodes: Vec<u64>,
    k: usize,
}

impl Probers {
    pub fn new(mut nodes: Vec<u64>, k: usize) -> Self {
        nodes.sort_unstable();
        nodes.dedup();
        Self { nodes, k }
    }

    pub fn nodes(&self) -> &[u64] {
        &self.nodes
    }

    /// Every node probes every backend (k >= N): nothing to compute.
    pub fn everyone(&self) -> bool {
        self.k >= self.nodes.len()
    }

    /// Whether `node` is one of the k probers of the backend whose hash is `backend`
    /// (`gossip::backend_hash`).
    pub fn includes(&self, backend: u64, node: u64) -> bool {
        if self.everyone() {
            return self.nodes.contains(&node);
        }
        if !self.nodes.contains(&node) {
            return false;
        }
        let mine = weight(backend, node);
        let above = self
            .nodes
            .iter()
            .filter(|&&n| n != node && outranks(weight(backend, n), n, mine, node))
            .count();
        above < self.k
    }

    /// The probers of the backend, highest weight first (`min(k, N)` nodes).
    pub fn of(&self, backend: u64) -> Vec<u64> {
        let mut ranked: Vec<(u64, u64)> = self
            .nodes
            .iter()
            .map(|&n| (weight(backend, n), n))
            .collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        ranked.into_iter().take(self.k).map(|(_, n)| n).collect()
    }
}

/// Ties (astronomically rare) go to the higher node id, the same on every node.
fn outranks(w: u64, node: u64, other_w: u64, other: u64) -> bool {
    (w, node) > (other_w, other)
}

/// The weight of `node` for `backend`: a well-mixed function of both, so that the order of the
/// nodes is an independent random permutation per backend.
fn weight(backend: u64, node: u64) -> u64 {
    mix(backend ^ mix(node.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The splitmix64 finalizer: a bijection in which every input bit flips about half the
/// output bits. Fixed forever: nodes of different versions must agree on the probers.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::backend_hash;

    fn backends(n: usize) -> Vec<u64> {
        (0..n).map(|i| backend_hash(&format!("web-{i}"))).collect()
    }

    /// How many backends each node probes.
    fn load(p: &Probers, bs: &[u64]) -> Vec<usize> {
        p.nodes()
            .iter()
            .map(|&n| bs.iter().filter(|&&b| p.includes(b, n)).count())
            .collect()
    }

    #[test]
    fn each_backend_has_min_k_n_probers_and_includes_agrees_with_of() {
        let bs = backends(2000);
        for (nodes, k) in [
            (vec![1], 1),
            (vec![1], 2),
            (vec![1, 2, 3], 1),
            (vec![1, 2, 3], 2),
            (vec![1, 2, 3], 3),
            (vec![1, 2, 3], 7),
            (vec![3, 1, 2, 2], 2),
            (vec![10, 20, 30, 40, 50], 2),
            (vec![1, 2, 3, 4, 5, 6, 7], 3),
        ] {
            let p = Probers::new(nodes.clone(), k);
            for &b in &bs {
                let of = p.of(b);
                assert_eq!(of.len(), k.min(p.nodes().len()), "{nodes:?} k={k}");
                for &n in p.nodes() {
                    assert_eq!(p.includes(b, n), of.contains(&n), "{nodes:?} k={k} {n}");
                }
                assert!(!p.includes(b, 99), "a node outside the set never probes");
            }
        }
    }

    #[test]
    fn stable_fixed_values() {
        // The same on every node and every version: a change here splits a rolling upgrade's
        // cluster into nodes that disagree on who probes what.
        let p = Probers::new(vec![1, 2, 3], 1);
        let got: Vec<u64> = ["web-1", "web-2", "api", "x"]
            .iter()
            .map(|id| p.of(backend_hash(id))[0])
            .collect();
        assert_eq!(got, vec![2, 1, 3, 1]);
        // Independent of the order the members were listed in.
        let q = Probers::new(vec![3, 2, 1], 1);
        for id in ["web-1", "web-2", "api", "x"] {
            assert_eq!(p.of(backend_hash(id)), q.of(backend_hash(id)));
        }
    }

    #[test]
    fn balanced_within_tolerance() {
        let bs = backends(30_000);
        // (nodes, k, tolerance around the fair share k·B/N)
        for (nodes, k, tol) in [
            (vec![1, 2, 3], 1, 0.03),
            (vec![1, 2, 3], 2, 0.02),
            (vec![1, 2, 3, 4, 5], 2, 0.04),
            (vec![7, 11, 1000, 123_456_789], 1, 0.04),
            ((1..=9).collect::<Vec<u64>>(), 3, 0.05),
        ] {
            let p = Probers::new(nodes.clone(), k);
            let fair = (bs.len() * k) as f64 / nodes.len() as f64;
            for (n, got) in nodes.iter().zip(load(&p, &bs)) {
                let off = (got as f64 - fair).abs() / fair;
                assert!(
                    off <= tol,
                    "{nodes:?} k={k}: node {n} probes {got}, fair share {fair:.0} (off by {:.1} %)",
                    off * 100.0
                );
            }
        }
    }

    #[test]
    fn a_leaving_node_moves_only_its_own_backends() {
        let bs = backends(10_000);
        // (members before, the node that leaves, k)
        for (before, gone, k) in [
            (vec![1, 2, 3], 3, 1),
            (vec![1, 2, 3], 1, 2),
            (vec![1, 2, 3, 4], 2, 2),
            (vec![1, 2, 3, 4, 5], 5, 3),
        ] {
            let p = Probers::new(before.clone(), k);
            let after: Vec<u64> = before.iter().copied().filter(|&n| n != gone).collect();
            let q = Probers::new(after.clone(), k);
            let mut moved = 0;
            for &b in &bs {
                let (old, new) = (p.of(b), q.of(b));
                // Every remaining prober keeps probing; a backend gains a prober only if the
                // leaving node was one of its probers.
                for n in &old {
                    if *n != gone {
                        assert!(
                            new.contains(n),
                            "{before:?}-{gone} k={k}: {n} lost a backend"
                        );
                    }
                }
                let gained = new.iter().filter(|n| !old.contains(n)).count();
                assert_eq!(gained, usize::from(old.contains(&gone)));
                moved += gained;
            }
            // The leaving node probed about k/N of the backends: only those move.
            let share = bs.len() as f64 * k as f64 / before.len() as f64;
            assert!(
                (moved as f64 - share).abs() / share < 0.05,
                "{before:?}-{gone} k={k}: {moved} backends moved, expected about {share:.0}"
            );
            // And a node coming back takes the same backends again.
            let back = Probers::new(after.iter().copied().chain([gone]).collect(), k);
            assert!(bs.iter().all(|&b| back.of(b) == p.of(b)));
        }
    }

    #[test]
    fn k_at_or_above_the_cluster_size_is_everyone() {
        let p = Probers::new(vec![1, 2, 3], 3);
        assert!(p.everyone());
        assert!(!Probers::new(vec![1, 2, 3], 2).everyone());
        assert!(backends(100)
            .iter()
            .all(|&b| [1, 2, 3].iter().all(|&n| p.includes(b, n))));
    }
}
