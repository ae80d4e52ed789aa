//! Keys derived from the cluster secret, and the replay guard both authenticated channels use.
//!
//! The secret itself never leaves the node: cluster RPC carries an HMAC made with a key derived
//! from it (`cluster/network.rs` signs, `cluster/rpc.rs` verifies), a joining node proves it
//! knows the secret by answering a challenge with another derived key, and every gossip packet
//! is sealed with a third (`gossip/sealed.rs`). Each key is HKDF-SHA256 of the secret, with
//! the cluster id and the key's purpose as HKDF info, so two clusters sharing a secret by
//! mistake still cannot talk, and no key can stand in for another.
//!
//! Rotation, like Consul's keyring: `[cluster] secret` is the primary key (used to sign and
//! seal); `[cluster] secondary_secret`, when set, is also accepted on receipt and never used to
//! send. docs/cluster.md "Security" has the rollover steps.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Duration;

use ring::{aead, digest, hkdf, hmac, rand};

/// Authenticated messages older or newer than this (by the receiver's wall clock) are refused:
/// the nodes' clocks must agree within it (NTP keeps them within milliseconds).
pub const CLOCK_WINDOW: Duration = Duration::from_secs(30);

const SALT: &[u8] = b"pingora-vhost cluster keys v1";

/// What a derived key is for (the HKDF info, with the cluster id).
#[derive(Clone, Copy)]
enum Purpose {
    Rpc,
    Join,
    Gossip,
    /// The seed of the automatic cluster CA's Ed25519 key (`cluster/pki.rs`).
    Ca,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Rpc => b"rpc request mac",
            Purpose::Join => b"join proof",
            Purpose::Gossip => b"gossip aead",
            Purpose::Ca => b"cluster ca ed25519 seed",
        }
    }
}

/// The keys of one secret.
struct KeySet {
    rpc: hmac::Key,
    join: hmac::Key,
    gossip: aead::LessSafeKey,
    ca_seed: [u8; 32],
}

/// HKDF output length for a 32-byte seed.
struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl KeySet {
    fn derive(secret: &[u8], cluster_id: &str) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
        let info = |p: Purpose| [cluster_id.as_bytes(), b"\0", p.label()];
        let mac = |p: Purpose| {
            let info = info(p);
            let okm = prk
                .expand(&info, hmac::HMAC_SHA256)
                .expect("HKDF output of one SHA-256 block is always valid");
            hmac::Key::from(okm)
        };
        let gossip_info = info(Purpose::Gossip);
        let gossip = prk
            .expand(&gossip_info, &aead::CHACHA20_POLY1305)
            .expect("HKDF output of 32 bytes is always valid");
        let mut ca_seed = [0u8; 32];
        prk.expand(&info(Purpose::Ca), Len32)
            .and_then(|okm| okm.fill(&mut ca_seed))
            .expect("HKDF output of 32 bytes is always valid");
        Self {
            rpc: mac(Purpose::Rpc),
            join: mac(Purpose::Join),
            gossip: aead::LessSafeKey::new(aead::UnboundKey::from(gossip)),
            ca_seed,
        }
    }
}

/// The primary key set (signs, seals) and the accepted ones (primary first).
pub struct Keyring {
    accepted: Vec<KeySet>,
    rng: rand::SystemRandom,
}

/// Which of the accepted keys verified a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUsed {
    Primary,
    Secondary,
}

impl Keyring {
    /// `secret` signs and seals; `secondary` is also accepted. Without a secret the node gets a
    /// random key no other node has: it can neither send nor accept anything authenticated.
    pub fn new(secret: Option<&str>, secondary: Option<&str>, cluster_id: &str) -> Self {
        let rng = rand::SystemRandom::new();
        let primary = match secret {
            Some(s) => KeySet::derive(s.as_bytes(), cluster_id),
            None => KeySet::derive(&random_bytes::<32>(&rng), cluster_id),
        };
        let mut accepted = vec![primary];
        if let (Some(_), Some(s)) = (secret, secondary) {
            accepted.push(KeySet::derive(s.as_bytes(), cluster_id));
        }
        Self { accepted, rng }
    }

    fn primary(&self) -> &KeySet {
        &self.accepted[0]
    }

    fn which(i: usize) -> KeyUsed {
        if i == 0 {
            KeyUsed::Primary
        } else {
            KeyUsed::Secondary
        }
    }

    /// The seeds of the automatic cluster CA keys: the primary secret's first (it issues this
    /// node's certificate), then the secondary's (also trusted during a rollover).
    pub fn ca_seeds(&self) -> Vec<[u8; 32]> {
        self.accepted.iter().map(|k| k.ca_seed).collect()
    }

    /// `N` random bytes from the system's CSPRNG.
    pub fn random<const N: usize>(&self) -> [u8; N] {
        random_bytes(&self.rng)
    }

    /// The MAC of an RPC request (see [`rpc_message`]).
    pub fn sign_rpc(&self, message: &[u8]) -> [u8; 32] {
        tag32(hmac::sign(&self.primary().rpc, message))
    }

    /// Checks an RPC request's MAC in constant time against every accepted key.
    pub fn verify_rpc(&self, message: &[u8], mac: &[u8]) -> Option<KeyUsed> {
        (self.accepted.iter())
            .position(|k| hmac::verify(&k.rpc, message, mac).is_ok())
            .map(Self::which)
    }

    /// A joining node's answer to a leader's challenge: proves it knows the secret, for this
    /// node id and RPC address, without revealing it.
    pub fn join_proof(&self, nonce: &[u8], node_id: u64, rpc_addr: &str) -> [u8; 32] {
        tag32(hmac::sign(
            &self.primary().join,
            &join_message(nonce, node_id, rpc_addr),
        ))
    }

    pub fn verify_join_proof(
        &self,
        nonce: &[u8],
        node_id: u64,
        rpc_addr: &str,
        proof: &[u8],
    ) -> bool {
        let message = join_message(nonce, node_id, rpc_addr);
        (self.accepted.iter()).any(|k| hmac::verify(&k.join, &message, proof).is_ok())
    }

    /// Seals `in_out` in place (appends the tag) under the primary gossip key.
    pub fn seal_gossip(&self, nonce: [u8; 12], aad: &[u8], in_out: &mut Vec<u8>) {
        self.primary()
            .gossip
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                in_out,
            )
            .expect("ChaCha20-Poly1305 seals any datagram-sized input");
    }

    /// Opens a sealed gossip payload (ciphertext + tag) with any accepted key; returns the
    /// plaintext's length (at the start of `in_out`).
    pub fn open_gossip(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Option<(usize, KeyUsed)> {
        // A failed open leaves the buffer unspecified: try every key but the last on a copy.
        let last = self.accepted.len() - 1;
        for (i, k) in self.accepted.iter().enumerate() {
            let nonce = aead::Nonce::assume_unique_for_key(nonce);
            if i < last {
                let mut copy = in_out.to_vec();
                if let Ok(plain) = k
                    .gossip
                    .open_in_place(nonce, aead::Aad::from(aad), &mut copy)
                {
                    let len = plain.len();
                    in_out[..len].copy_from_slice(&copy[..len]);
                    return Some((len, Self::which(i)));
                }
            } else if let Ok(plain) = k.gossip.open_in_place(nonce, aead::Aad::from(aad), in_out) {
                return Some((plain.len(), Self::which(i)));
            }
        }
        None
    }
}

/// Bytes an AEAD tag adds to a sealed gossip payload.
pub const GOSSIP_TAG_LEN: usize = 16;

fn random_bytes<const N: usize>(rng: &rand::SystemRandom) -> [u8; N] {
    use rand::SecureRandom;
    let mut b = [0u8; N];
    // The system CSPRNG does not fail on Linux after boot; zeros would only make nonces
    // repeat, never leak a key.
    let _ = rng.fill(&mut b);
    b
}

fn tag32(tag: hmac::Tag) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn join_message(nonce: &[u8], node_id: u64, rpc_addr: &str) -> Vec<u8> {
    let mut m = b"join\n".to_vec();
    m.extend_from_slice(nonce);
    m.push(b'\n');
    m.extend_from_slice(node_id.to_string().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(rpc_addr.as_bytes());
    m
}

/// What an RPC request's MAC covers: method, path, timestamp, nonce and the body's SHA-256,
/// each on its own line (none of them can contain a newline).
pub fn rpc_message(method: &str, path: &str, unix_ms: u64, nonce: &str, body: &[u8]) -> Vec<u8> {
    let body_hash = digest::digest(&digest::SHA256, body);
    format!(
        "pingora-vhost rpc v1\n{method}\n{path}\n{unix_ms}\n{nonce}\n{}",
        hex(body_hash.as_ref())
    )
    .into_bytes()
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Lowercase or uppercase hex to bytes; None on anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why an authenticated message was refused by the [`ReplayGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error("timestamp outside the clock window")]
    Clock,
    #[error("seen before")]
    Replay,
}

/// Remembers the (timestamp, nonce) pairs of authenticated messages within the clock window,
/// per sender, and refuses a pair seen before. Memory is bounded: at most `per_sender` pairs
/// for each of at most `senders` senders; when a sender's set is full the oldest pair is
/// forgotten and anything not newer than it is refused from then on (as a replay: it can no
/// longer be told apart from one).
pub struct ReplayGuard<K> {
    senders: HashMap<K, Seen>,
    max_senders: usize,
    per_sender: usize,
}

#[derive(Default)]
struct Seen {
    /// Anything at or before this timestamp is refused.
    floor_ms: u64,
    pairs: BTreeSet<(u64, u128)>,
    last_ms: u64,
}

impl<K: Hash + Eq + Clone> ReplayGuard<K> {
    pub fn new(max_senders: usize, per_sender: usize) -> Self {
        Self {
            senders: HashMap::new(),
            max_senders: max_senders.max(1),
            per_sender: per_sender.max(1),
        }
    }

    /// Accepts (and remembers) a message sent at `sent_ms` with `nonce`, judged at `now_ms`.
    /// Call only after the message's authenticity was checked: forged messages must not use
    /// up the memory.
    pub fn check(
        &mut self,
        sender: &K,
        sent_ms: u64,
        nonce: u128,
        now_ms: u64,
    ) -> Result<(), Stale> {
        let window = CLOCK_WINDOW.as_millis() as u64;
        if sent_ms.abs_diff(now_ms) > window {
            return Err(Stale::Clock);
        }
        if !self.senders.contains_key(sender) && self.senders.len() >= self.max_senders {
            // Forget the sender heard from longest ago (at most a few real nodes and their
            // restarts are expected; all of them hold the key).
            if let Some(oldest) = (self.senders.iter())
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| k.clone())
            {
                self.senders.remove(&oldest);
            }
        }
        let seen = self.senders.entry(sender.clone()).or_default();
        // Pairs that fell out of the window need no memory: the clock check refuses them.
        let cutoff = now_ms.saturating_sub(window);
        while seen.pairs.first().is_some_and(|(t, _)| *t < cutoff) {
            seen.pairs.pop_first();
        }
        if sent_ms <= seen.floor_ms || !seen.pairs.insert((sent_ms, nonce)) {
            return Err(Stale::Replay);
        }
        if seen.pairs.len() > self.per_sender {
            if let Some((t, _)) = seen.pairs.pop_first() {
                seen.floor_ms = seen.floor_ms.max(t);
            }
        }
        seen.last_ms = now_ms;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_secret_cluster_and_purpose() {
        let a = Keyring::new(Some("s"), None, "c");
        let m = rpc_message("POST", "/raft/vote", 1, "n", b"{}");
        let mac = a.sign_rpc(&m);
        assert_eq!(a.verify_rpc(&m, &mac), Some(KeyUsed::Primary));
        assert_eq!(
            Keyring::new(Some("s"), None, "other").verify_rpc(&m, &mac),
            None
        );
        assert_eq!(
            Keyring::new(Some("t"), None, "c").verify_rpc(&m, &mac),
            None
        );
        // Any change of the signed parts breaks the MAC.
        let other = rpc_message("POST", "/raft/vote", 1, "n", b"{ }");
        assert_eq!(a.verify_rpc(&other, &mac), None);
        // A join proof is not an RPC MAC and the other way round.
        let proof = a.join_proof(b"nonce", 4, "10.0.0.4:7101");
        assert!(a.verify_join_proof(b"nonce", 4, "10.0.0.4:7101", &proof));
        assert!(!a.verify_join_proof(b"nonce", 5, "10.0.0.4:7101", &proof));
        assert!(!a.verify_join_proof(b"nonce", 4, "10.0.0.9:7101", &proof));
        assert_eq!(
            a.verify_rpc(&join_message(b"nonce", 4, "10.0.0.4:7101"), &proof),
            None
        );
        // No secret: a random key, that nobody else shares.
        let none = Keyring::new(None, None, "c");
        assert_eq!(none.verify_rpc(&m, &mac), None);
        // CA seeds: the same for the same secret and cluster, different otherwise.
        let seed = a.ca_seeds()[0];
        assert_eq!(Keyring::new(Some("s"), None, "c").ca_seeds(), vec![seed]);
        assert_ne!(Keyring::new(Some("s"), None, "other").ca_seeds()[0], seed);
        assert_ne!(none.ca_seeds()[0], seed);
        let both = Keyring::new(Some("t"), Some("s"), "c").ca_seeds();
        assert_eq!((both.len(), both[1]), (2, seed));
    }

    #[test]
    fn rollover_accepts_the_secondary_key_and_sends_with_the_primary() {
        let old = Keyring::new(Some("old"), None, "c");
        let both = Keyring::new(Some("new"), Some("old"), "c");
        let new = Keyring::new(Some("new"), None, "c");
        let m = rpc_message("POST", "/x", 1, "n", b"");
        assert_eq!(
            both.verify_rpc(&m, &old.sign_rpc(&m)),
            Some(KeyUsed::Secondary)
        );
        assert_eq!(
            new.verify_rpc(&m, &both.sign_rpc(&m)),
            Some(KeyUsed::Primary)
        );

        let mut sealed = b"hello".to_vec();
        old.seal_gossip([7; 12], b"aad", &mut sealed);
        assert_eq!(sealed.len(), 5 + GOSSIP_TAG_LEN);
        let mut copy = sealed.clone();
        assert_eq!(
            both.open_gossip([7; 12], b"aad", &mut copy),
            Some((5, KeyUsed::Secondary))
        );
        assert_eq!(&copy[..5], b"hello");
        assert_eq!(new.open_gossip([7; 12], b"aad", &mut sealed.clone()), None);
        assert_eq!(both.open_gossip([8; 12], b"aad", &mut sealed.clone()), None);
        assert_eq!(both.open_gossip([7; 12], b"other", &mut sealed), None);
    }

    #[test]
    fn replay_guard_refuses_repeats_and_stale_clocks_with_bounded_memory() {
        let mut g = ReplayGuard::new(2, 3);
        let now = 1_000_000;
        assert_eq!(g.check(&"a", now, 1, now), Ok(()));
        assert_eq!(g.check(&"a", now, 1, now), Err(Stale::Replay));
        assert_eq!(g.check(&"b", now, 1, now), Ok(()));
        assert_eq!(g.check(&"a", now - 31_000, 2, now), Err(Stale::Clock));
        assert_eq!(g.check(&"a", now + 31_000, 2, now), Err(Stale::Clock));
        for n in 2..=4 {
            assert_eq!(g.check(&"a", now + n, n as u128, now), Ok(()));
        }
        // Full: the oldest pair (now, 1) was forgotten and became the floor.
        assert_eq!(g.check(&"a", now, 9, now), Err(Stale::Replay));
        assert_eq!(g.senders["a"].pairs.len(), 3);
        // A third sender evicts the one heard from longest ago.
        assert_eq!(g.check(&"c", now, 1, now + 1), Ok(()));
        assert_eq!(g.senders.len(), 2);
        // Pairs out of the window are forgotten (the clock check covers them).
        assert_eq!(g.check(&"c", now + 40_000, 1, now + 40_000), Ok(()));
        assert_eq!(g.senders["c"].pairs.len(), 1);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(unhex("000fff"), Some(vec![0, 15, 255]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("é1"), None);
    }
}
