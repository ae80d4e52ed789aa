//! The HTTPS listener's own session cache: TLS 1.2 session ids, and TLS 1.3 sessions while
//! session tickets are off (`tls_session_tickets = false`) or before the cluster's first
//! ticket key. Constant time per handshake: rustls's `ServerSessionMemoryCache` finds the
//! entry it forgets on a resumption with a linear scan of every cached key (up to 20,000
//! comparisons per resumed handshake: 9 % of the CPU of new TLS connections in a profile).
//! Oldest first out when full, as there.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use rustls::server::StoresServerSessions;

#[derive(Debug)]
pub struct SessionCache {
    limit: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Keyed with SipHash: TLS 1.2 clients name the session id they look up.
    sessions: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys in the order they were stored; a key taken since (a resumed TLS 1.3 session)
    /// stays here until it reaches the front or the list is compacted.
    order: VecDeque<Vec<u8>>,
}

impl SessionCache {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it cannot leave the maps inconsistent in a harmful way: at
        // worst an entry is forgotten early.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut inner = self.lock();
        if inner.sessions.insert(key.clone(), value).is_none() {
            inner.order.push_back(key);
        }
        while inner.sessions.len() > self.limit {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.sessions.remove(&oldest);
        }
        // Keys taken since they were stored: dropped from the order once they are as many
        // as the live ones, so the list stays within twice the limit.
        if inner.order.len() > 2 * self.limit {
            let Inner { sessions, order } = &mut *inner;
            order.retain(|k| sessions.contains_key(k));
        }
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().sessions.get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().sessions.remove(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Vec<u8> {
        i.to_be_bytes().to_vec()
    }

    #[test]
    fn stores_takes_and_forgets_the_oldest_when_full() {
        let cache = SessionCache::new(3);
        for i in 0..3 {
            assert!(cache.put(key(i), vec![i as u8]));
        }
        assert_eq!(cache.get(&key(0)), Some(vec![0]));
        assert_eq!(cache.take(&key(1)), Some(vec![1]));
        assert_eq!(cache.take(&key(1)), None, "a session is taken once");
        cache.put(key(3), vec![3]);
        cache.put(key(4), vec![4]);
        // 0 is the oldest left: it goes; 1 was taken already.
        assert_eq!(cache.get(&key(0)), None);
        for i in [2, 3, 4] {
            assert_eq!(cache.get(&key(i)), Some(vec![i as u8]), "{i}");
        }
        // Storing a key again replaces its value.
        cache.put(key(4), vec![40]);
        assert_eq!(cache.get(&key(4)), Some(vec![40]));
    }

    #[test]
    fn stays_bounded_under_resumptions() {
        let limit = 100;
        let cache = SessionCache::new(limit);
        for i in 0..10_000 {
            cache.put(key(i), vec![0; 8]);
            // Most sessions are resumed (taken) soon after they were stored.
            if i % 4 != 0 {
                assert!(cache.take(&key(i)).is_some());
            }
            let inner = cache.lock();
            assert!(inner.sessions.len() <= limit);
            assert!(inner.order.len() <= 2 * limit + 1, "{}", inner.order.len());
        }
        // The newest sessions not taken are there.
        assert!(cache.get(&key(9_996)).is_some());
        assert!(cache.get(&key(9_995)).is_none());
    }
}
