//! When in each interval a backend is probed: at a fixed offset derived from its id's hash, so
//! a node's probes are spread over the interval (about B/interval per second, never all at
//! once).

use super::owners::mix;

/// Where in every interval of `interval_ms` the backend whose hash is `backend` is probed.
pub fn offset_ms(backend: u64, interval_ms: u64) -> u64 {
    // Another mix than the ownership weights: which node probes and when are independent.
    mix(backend.rotate_left(32) ^ 0x5bd1_e995_5bd1_e995) % interval_ms.max(1)
}

/// Items sorted by their offset in the interval.
#[derive(Debug)]
pub struct Schedule<T> {
    interval_ms: u64,
    /// (offset, item), sorted by offset.
    slots: Vec<(u64, T)>,
}

impl<T> Schedule<T> {
    pub fn new(interval_ms: u64, items: impl IntoIterator<Item = (u64, T)>) -> Self {
        let interval_ms = interval_ms.max(1);
        let mut slots: Vec<(u64, T)> = items.into_iter().collect();
        slots.sort_by_key(|(hash, _)| offset_ms(*hash, interval_ms));
        let slots = slots
            .into_iter()
            .map(|(hash, item)| (offset_ms(hash, interval_ms), item))
            .collect();
        Self { interval_ms, slots }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The items due in the time `[from_ms, to_ms)` (milliseconds on a monotonic clock): those
    /// whose offset the clock crossed. A gap of a whole interval or more makes everything due
    /// once.
    pub fn due(&self, from_ms: u64, to_ms: u64) -> Vec<&T> {
        if to_ms <= from_ms {
            return Vec::new();
        }
        if to_ms - from_ms >= self.interval_ms {
            return self.slots.iter().map(|(_, t)| t).collect();
        }
        let (a, b) = (from_ms % self.interval_ms, to_ms % self.interval_ms);
        let range = |lo: u64, hi: u64| {
            let start = self.slots.partition_point(|(o, _)| *o < lo);
            let end = self.slots.partition_point(|(o, _)| *o < hi);
            self.slots[start..end].iter().map(|(_, t)| t)
        };
        if a < b {
            range(a, b).collect()
        } else {
            // Wrapped around the end of the interval.
            range(a, self.interval_ms).chain(range(0, b)).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::backend_hash;

    fn schedule(n: usize, interval_ms: u64) -> Schedule<usize> {
        Schedule::new(
            interval_ms,
            (0..n).map(|i| (backend_hash(&format!("b-{i}")), i)),
        )
    }

    #[test]
    fn every_item_is_due_exactly_once_per_interval_however_the_time_is_cut() {
        let s = schedule(5000, 10_000);
        // (start, tick length): ticks of various lengths, starting anywhere, over exactly
        // one interval.
        for (start, step) in [
            (0, 100),
            (1_765_000_123_456, 100),
            (1_765_000_123_456, 37),
            (9_999, 250),
            (5, 10_000),
            (42, 3_333),
        ] {
            let mut seen = vec![0u32; 5000];
            let mut t = start;
            while t < start + 10_000 {
                let next = (t + step).min(start + 10_000);
                for &i in s.due(t, next) {
                    seen[i] += 1;
                }
                t = next;
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "start {start} step {step}: counts {:?}",
                seen.iter().filter(|&&c| c != 1).take(5).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn probes_are_spread_evenly_over_the_interval() {
        // 10,000 backends over 10 s in ticks of 100 ms: 100 per tick on average; a burst would
        // put thousands in one tick.
        let s = schedule(10_000, 10_000);
        let per_tick: Vec<usize> = (0..100)
            .map(|i| s.due(i * 100, (i + 1) * 100).len())
            .collect();
        let (min, max) = (
            *per_tick.iter().min().unwrap(),
            *per_tick.iter().max().unwrap(),
        );
        assert!(
            (60..=140).contains(&min) && (60..=140).contains(&max),
            "per 100 ms: min {min}, max {max}"
        );
        assert_eq!(per_tick.iter().sum::<usize>(), 10_000);
    }

    #[test]
    fn a_gap_longer_than_the_interval_makes_everything_due_once() {
        let s = schedule(50, 1000);
        assert_eq!(s.due(0, 5000).len(), 50);
        assert!(s.due(700, 700).is_empty());
        assert!(
            s.due(700, 600).is_empty(),
            "a clock stepping back probes nothing"
        );
    }

    #[test]
    fn offsets_are_fixed_and_within_the_interval() {
        assert_eq!(offset_ms(backend_hash("web-1"), 10_000), OFFSET_WEB1);
        for i in 0..1000 {
            assert!(offset_ms(backend_hash(&format!("b-{i}")), 3000) < 3000);
        }
        assert_eq!(offset_ms(1, 0), 0, "no division by zero");
    }

    const OFFSET_WEB1: u64 = 5710;
}
