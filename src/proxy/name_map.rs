//! The routing table's maps from a name (a host, a wildcard's parent, a tag) to what it routes
//! to. The request path reads them once or twice per request; at 100,000 domains a
//! persistent map's tree walk (`imbl`, four or five levels, a cache miss each when the Host
//! is a different domain every request) was most of what the request cost beyond 10
//! domains. So lookups go to a flat open-addressing table (one probe group, one slot), and
//! the writes since it was built sit in a small persistent overlay: a write costs O(log of
//! the overlay), and the flat table is rebuilt only after `len / 32` writes (at least
//! [`MIN_WRITES_BEFORE_REBUILD`]), which spreads its O(n) over those writes.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};

/// Below this many writes since the last rebuild the overlay is kept: it stays small enough
/// to sit in cache, and a burst of single writes does not rebuild each time.
pub const MIN_WRITES_BEFORE_REBUILD: usize = 64;

type Overlay<V> = imbl::GenericHashMap<
    Box<str>,
    Option<V>,
    DefaultHashBuilder,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// An immutable-after-publish map: cloning it is O(1) (the flat part is shared, the overlay
/// is persistent), so a routing table can be cloned and swapped in whole.
#[derive(Clone)]
pub struct NameMap<V: Clone> {
    /// Seeded per process; the keys are the operator's, the lookups the client's.
    hasher: DefaultHashBuilder,
    base: Arc<HashTable<(Box<str>, V)>>,
    /// What changed since `base` was built: the new value, or `None` for a removed name.
    recent: Overlay<V>,
    len: usize,
    writes: usize,
}

impl<V: Clone> Default for NameMap<V> {
    fn default() -> Self {
        Self {
            hasher: DefaultHashBuilder::default(),
            base: Arc::new(HashTable::new()),
            recent: Overlay::default(),
            len: 0,
            writes: 0,
        }
    }
}

impl<V: Clone + std::fmt::Debug> std::fmt::Debug for NameMap<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V: Clone> NameMap<V> {
    pub fn get(&self, name: &str) -> Option<&V> {
        // Checked only while writes are pending: a settled map is one flat lookup.
        if !self.recent.is_empty() {
            if let Some(v) = self.recent.get(name) {
                return v.as_ref();
            }
        }
        self.in_base(name)
    }

    fn in_base(&self, name: &str) -> Option<&V> {
        self.base
            .find(self.hasher.hash_one(name), |(k, _)| &**k == name)
            .map(|(_, v)| v)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn insert(&mut self, name: &str, value: V) {
        let hasher = &self.hasher;
        if let Some(base) = unshared(&mut self.base, &self.recent) {
            // Nobody reads this table yet (a table compiled from scratch): straight in.
            let hash = hasher.hash_one(name);
            match base.find_mut(hash, |(k, _)| &**k == name) {
                Some((_, v)) => *v = value,
                None => {
                    base.insert_unique(hash, (Box::from(name), value), |(k, _)| {
                        hasher.hash_one(&**k)
                    });
                    self.len += 1;
                }
            }
            return;
        }
        if !self.contains_key(name) {
            self.len += 1;
        }
        self.recent.insert(name.into(), Some(value));
        self.writes += 1;
    }

    pub fn remove(&mut self, name: &str) {
        if let Some(base) = unshared(&mut self.base, &self.recent) {
            let hash = self.hasher.hash_one(name);
            if let Ok(entry) = base.find_entry(hash, |(k, _)| &**k == name) {
                entry.remove();
                self.len -= 1;
            }
            return;
        }
        if !self.contains_key(name) {
            return;
        }
        self.len -= 1;
        if self.in_base(name).is_some() {
            self.recent.insert(name.into(), None);
        } else {
            self.recent.remove(name);
        }
        self.writes += 1;
    }

    /// Folds the overlay into a new flat table once enough writes have gathered (call after a
    /// batch of writes; a table compiled from scratch folds at once).
    pub fn settle(&mut self) {
        if self.writes > MIN_WRITES_BEFORE_REBUILD.max(self.len / 32) {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        let mut table = HashTable::with_capacity(self.len);
        let hasher = &self.hasher;
        for (k, v) in self.iter() {
            table.insert_unique(hasher.hash_one(k), (Box::from(k), v.clone()), |(k, _)| {
                hasher.hash_one(&**k)
            });
        }
        self.base = Arc::new(table);
        self.recent = Overlay::default();
        self.writes = 0;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        let recent = &self.recent;
        self.base
            .iter()
            .filter(move |(k, _)| !recent.contains_key(&**k))
            .map(|(k, v)| (&**k, v))
            .chain(
                recent
                    .iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| (&**k, v))),
            )
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Writes waiting in the overlay (tests).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.recent.len()
    }
}

/// The flat table, when no clone shares it and no write is pending in the overlay.
fn unshared<'a, V: Clone>(
    base: &'a mut Arc<HashTable<(Box<str>, V)>>,
    recent: &Overlay<V>,
) -> Option<&'a mut HashTable<(Box<str>, V)>> {
    if recent.is_empty() {
        Arc::get_mut(base)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sorted(m: &NameMap<u32>) -> BTreeMap<String, u32> {
        assert_eq!(m.iter().count(), m.len());
        m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// Random inserts and removes against a BTreeMap, with settles in between: every read
    /// (get, len, iter) agrees at every step, in and out of the overlay, before and after
    /// rebuilds.
    #[test]
    fn agrees_with_a_plain_map_through_writes_and_rebuilds() {
        let mut m = NameMap::default();
        let mut model = BTreeMap::new();
        let mut rebuilds = 0;
        // A published clone, as the data plane holds one: writes then go to the overlay.
        let mut published = (m.clone(), model.clone());
        let mut x: u64 = 1;
        for step in 0..20_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = format!("h{}.test", (x >> 33) % 700);
            if (x >> 20).is_multiple_of(3) {
                m.remove(&key);
                model.remove(&key);
            } else {
                m.insert(&key, step);
                model.insert(key.clone(), step);
            }
            if step.is_multiple_of(7) {
                let before = m.pending();
                m.settle();
                if before > 0 && m.pending() == 0 {
                    rebuilds += 1;
                }
                assert_eq!(
                    sorted(&published.0),
                    published.1,
                    "a clone keeps what it saw"
                );
                published = (m.clone(), model.clone());
            }
            assert_eq!(m.get(&key), model.get(&key), "step {step}");
            assert_eq!(m.len(), model.len(), "step {step}");
            if step.is_multiple_of(500) {
                assert_eq!(sorted(&m).len(), m.len());
                assert_eq!(
                    sorted(&m),
                    model.iter().map(|(k, v)| (k.clone(), *v)).collect()
                );
            }
        }
        assert!(rebuilds > 10, "the overlay was folded {rebuilds} times");
        assert!(m.get("nope").is_none());
    }

    #[test]
    fn a_clone_keeps_what_it_saw() {
        let mut m = NameMap::default();
        m.insert("a", 1);
        m.rebuild();
        let before = m.clone();
        m.insert("a", 2);
        m.remove("a");
        m.insert("b", 3);
        m.rebuild();
        assert_eq!(before.get("a"), Some(&1));
        assert_eq!(before.get("b"), None);
        assert_eq!(m.get("a"), None);
        assert_eq!(m.get("b"), Some(&3));
        assert_eq!((before.len(), m.len()), (1, 1));
    }

    #[test]
    fn single_writes_rebuild_only_after_a_share_of_the_map() {
        let mut m = NameMap::default();
        for i in 0..10_000 {
            m.insert(&format!("d{i}"), i);
        }
        assert_eq!(
            m.pending(),
            0,
            "a table nobody reads yet is written in place"
        );
        let published = m.clone();
        for i in 0..300 {
            m.insert(&format!("new{i}"), i);
            m.settle();
        }
        // 10,300 / 32 = 321 writes before the next fold.
        assert_eq!(m.pending(), 300);
        for i in 300..330 {
            m.insert(&format!("new{i}"), i);
            m.settle();
        }
        assert!(m.pending() < 30);
        assert_eq!(m.len(), 10_330);
        assert_eq!(
            published.len(),
            10_000,
            "the published clone saw none of it"
        );
        assert!(published.get("new0").is_none());
    }
}
