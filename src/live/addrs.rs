//! What backend addresses resolve to. A backend address is `host:port`; an IP literal is its
//! own answer, a name is looked up by the control plane's resolver (`resolve`), which stores
//! each answer here. Table compiles read this book and never do DNS themselves, so Raft's
//! apply never waits on a name server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// A backend address split for resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// An IP literal with its port: no lookup.
    Literal(SocketAddr),
    /// A name to look up, and the port to use with each of its addresses.
    Name { host: &'a str, port: u16 },
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals). `None` when it has no valid port.
pub fn target(address: &str) -> Option<Target<'_>> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Some(Target::Literal(a));
    }
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || host.starts_with('[') || port == 0 {
        return None;
    }
    Some(Target::Name { host, port })
}

/// The latest resolution of one name, as the API shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resolution {
    /// The last good answer; kept while later lookups fail.
    pub addrs: Vec<SocketAddr>,
    /// When `addrs` were obtained (unix ms).
    pub resolved_unix_ms: Option<u64>,
    /// Why the latest lookup failed; `None` when it succeeded.
    pub error: Option<String>,
    /// When it was stored, on the book's counter (see [`AddressBook::in_table`]).
    #[serde(skip)]
    stored: u64,
}

impl Resolution {
    pub fn new(
        addrs: Vec<SocketAddr>,
        resolved_unix_ms: Option<u64>,
        error: Option<String>,
    ) -> Self {
        Self {
            addrs,
            resolved_unix_ms,
            error,
            stored: 0,
        }
    }
}

#[derive(Default)]
pub struct AddressBook {
    names: Mutex<HashMap<String, Resolution>>,
    /// Woken when a compile meets a name with no answer yet.
    unresolved: Notify,
    /// Counts stores; `published` is its value when the routing table last took them in.
    stored: AtomicU64,
    published: AtomicU64,
}

impl AddressBook {
    /// The addresses to use for `address` now: the literal itself, or the name's last good
    /// answer. A name never seen before has none yet; the resolver is woken for it.
    pub fn addrs_for(&self, address: &str) -> Vec<SocketAddr> {
        match target(address) {
            Some(Target::Literal(a)) => vec![a],
            Some(Target::Name { .. }) => {
                let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
                match names.get(address) {
                    Some(r) => r.addrs.clone(),
                    None => {
                        self.unresolved.notify_one();
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        }
    }

    /// What the API shows for `address`: a literal resolves to itself.
    pub fn resolution(&self, address: &str) -> Option<Resolution> {
        match target(address)? {
            Target::Literal(a) => Some(Resolution::new(vec![a], None, None)),
            Target::Name { .. } => self
                .names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(address)
                .cloned(),
        }
    }

    /// True once the routing table has taken in a lookup of `address` (or it needs none).
    pub fn in_table(&self, address: &str) -> bool {
        match target(address) {
            Some(Target::Literal(_)) => true,
            Some(Target::Name { .. }) => {
                let published = self.published.load(Ordering::Acquire);
                self.names
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(address)
                    .is_some_and(|r| r.stored <= published)
            }
            None => false,
        }
    }

    /// Stores a resolution; true when the addresses to use changed (tables need a recompile).
    pub fn store(&self, address: &str, mut r: Resolution) -> bool {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let changed = names.get(address).map(|old| &old.addrs) != Some(&r.addrs);
        r.stored = self.stored.fetch_add(1, Ordering::AcqRel) + 1;
        names.insert(address.to_string(), r);
        changed
    }

    /// Counter value to pass to [`AddressBook::published`] after the next recompile.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Acquire)
    }

    /// A routing table compiled after the stores up to `stored` is live.
    pub fn published(&self, stored: u64) {
        self.published.fetch_max(stored, Ordering::AcqRel);
    }

    /// Every name's resolution (handed over in a graceful upgrade).
    pub fn entries(&self) -> Vec<(String, Resolution)> {
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.iter().map(|(a, r)| (a.clone(), r.clone())).collect()
    }

    /// Forgets names for which `keep` is false (no backend uses them any more).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a, _| keep(a));
    }

    /// Returns when a compile met a name with no answer yet (at once if one did since the
    /// last call).
    pub async fn unresolved_name(&self) {
        self.unresolved.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let cases: &[(&str, Option<Target>)] = &[
            (
                "127.0.0.1:80",
                Some(Target::Literal("127.0.0.1:80".parse().unwrap())),
            ),
            (
                "[::1]:8080",
                Some(Target::Literal("[::1]:8080".parse().unwrap())),
            ),
            (
                "api.internal:8443",
                Some(Target::Name {
                    host: "api.internal",
                    port: 8443,
                }),
            ),
            (
                "localhost:1",
                Some(Target::Name {
                    host: "localhost",
                    port: 1,
                }),
            ),
            ("api.internal", None),
            ("api.internal:0", None),
            ("api.internal:65536", None),
            (":80", None),
            ("[::1:80", None),
        ];
        for (input, want) in cases {
            assert_eq!(&target(input), want, "{input}");
        }
    }

    #[test]
    fn names_wait_for_the_resolver_and_keep_their_last_answer() {
        let book = AddressBook::default();
        assert_eq!(book.addrs_for("10.0.0.1:80").len(), 1);
        assert!(book.addrs_for("svc.test:80").is_empty());
        assert!(!book.in_table("svc.test:80"));
        assert!(book.in_table("10.0.0.1:80"));
        let a: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let good = Resolution::new(vec![a], Some(1), None);
        assert!(book.store("svc.test:80", good.clone()), "first answer");
        assert!(!book.in_table("svc.test:80"), "stored, not yet compiled in");
        book.published(book.stored());
        assert!(book.in_table("svc.test:80"));
        assert!(!book.store("svc.test:80", good), "same answer");
        let failed = Resolution::new(vec![a], Some(1), Some("SERVFAIL".into()));
        assert!(
            !book.store("svc.test:80", failed),
            "an error keeps the addresses"
        );
        assert_eq!(book.addrs_for("svc.test:80"), vec![a]);
        book.retain(|_| false);
        assert!(book.resolution("svc.test:80").is_none());
    }
}
