//! TLS session tickets that every node can open: the keys are replicated state
//! (`State::ticket_keys`, rotated by the leader), so a client that resumes on another node
//! behind DNS round-robin or anycast skips the full handshake there too (nginx needs a
//! hand-distributed `ssl_session_ticket_key` file for that).
//!
//! A ticket is `key id (4) | nonce (12) | ChaCha20-Poly1305(session state)`, the first 16
//! bytes authenticated as associated data. The newest key seals; the newest and the one
//! before it open, so a ticket lives one to two rotation periods (rustls asks that lifetime
//! be enforced by key rotation and erasure, not by a date inside the ticket).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
// aws-lc's generator: a nonce per ticket without a system call (ring asks the kernel each time).
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use crate::state::State;

const HEADER: usize = 4 + NONCE_LEN;

/// The keys in use, newest first.
struct Keys {
    ids: Vec<u32>,
    keys: Vec<LessSafeKey>,
}

pub struct Tickets {
    keys: ArcSwap<Keys>,
    lifetime_secs: u32,
    rng: SystemRandom,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets")
            .field("key_ids", &self.keys.load().ids)
            .finish_non_exhaustive()
    }
}

impl Tickets {
    /// `rotation`: how often the leader makes a new key (the lifetime clients are told).
    pub fn new(rotation: Duration) -> Self {
        Self {
            keys: ArcSwap::from_pointee(Keys {
                ids: Vec::new(),
                keys: Vec::new(),
            }),
            lifetime_secs: u32::try_from(rotation.as_secs()).unwrap_or(u32::MAX),
            rng: SystemRandom::new(),
        }
    }

    /// Takes the keys of an applied state (cheap when they did not change).
    pub fn publish(&self, state: &State) {
        let ids: Vec<u32> = state.ticket_keys.iter().map(|k| k.id).collect();
        if ids == self.keys.load().ids {
            return;
        }
        let mut keys = Keys {
            ids: Vec::new(),
            keys: Vec::new(),
        };
        for key in &state.ticket_keys {
            let Some(secret) = key.secret() else { continue };
            let Ok(unbound) = UnboundKey::new(&CHACHA20_POLY1305, &secret) else {
                continue;
            };
            keys.ids.push(key.id);
            keys.keys.push(LessSafeKey::new(unbound));
        }
        self.keys.store(Arc::new(keys));
    }
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        !self.keys.load().keys.is_empty()
    }

    fn lifetime(&self) -> u32 {
        self.lifetime_secs
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.load();
        let (id, key) = (keys.ids.first()?, keys.keys.first()?);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(HEADER + plain.len() + key.algorithm().tag_len());
        ticket.extend_from_slice(&id.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let (header, body) = ticket.split_at_mut(HEADER);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&*header),
                body,
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < HEADER {
            return None;
        }
        let (header, sealed) = cipher.split_at(HEADER);
        let id = u32::from_be_bytes(header[..4].try_into().ok()?);
        let nonce = Nonce::try_assume_unique_for_key(&header[4..]).ok()?;
        let keys = self.keys.load();
        let at = keys.ids.iter().position(|k| *k == id)?;
        let mut body = sealed.to_vec();
        let plain = keys.keys[at]
            .open_in_place(nonce, Aad::from(header), &mut body)
            .ok()?;
        let len = plain.len();
        body.truncate(len);
        Some(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{apply, Command, TicketKey};

    fn rotate(state: &mut State, id: u32, fill: char) {
        let key = TicketKey {
            id,
            secret_hex: fill.to_string().repeat(64),
            created_unix_ms: 0,
        };
        apply(state, &Command::RotateTicketKey(key)).expect("applies");
    }

    #[test]
    fn tickets_open_on_every_node_and_for_one_rotation_after() {
        let mut state = State::default();
        let (node1, node2) = (
            Tickets::new(Duration::from_secs(3600)),
            Tickets::new(Duration::from_secs(3600)),
        );
        node1.publish(&state);
        assert!(!node1.enabled(), "no key yet: no tickets");
        assert_eq!(node1.encrypt(b"session"), None);

        rotate(&mut state, 1, 'a');
        node1.publish(&state);
        node2.publish(&state);
        assert!(node1.enabled());
        assert_eq!(node1.lifetime(), 3600);
        let ticket = node1.encrypt(b"session state").expect("sealed");
        assert!(!ticket
            .windows(b"session state".len())
            .any(|w| w == b"session state"));
        assert_eq!(
            node2.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        // Two tickets of the same state differ (fresh nonces).
        assert_ne!(node1.encrypt(b"session state"), Some(ticket.clone()));

        // One rotation later the old ticket still opens, and new ones use the new key.
        rotate(&mut state, 2, 'b');
        node2.publish(&state);
        assert_eq!(
            node2.decrypt(&ticket).as_deref(),
            Some(&b"session state"[..])
        );
        assert_eq!(
            node2.encrypt(b"x").expect("sealed")[..4],
            2u32.to_be_bytes()
        );
        // Two rotations later it does not.
        rotate(&mut state, 3, 'c');
        node2.publish(&state);
        assert_eq!(node2.decrypt(&ticket), None);
    }

    #[test]
    fn forged_or_damaged_tickets_do_not_open() {
        let mut state = State::default();
        rotate(&mut state, 7, 'd');
        let node = Tickets::new(Duration::from_secs(60));
        node.publish(&state);
        let ticket = node.encrypt(b"state").expect("sealed");
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(node.decrypt(&bad), None, "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert_eq!(node.decrypt(&ticket[..len]), None, "cut at {len}");
        }
        // Sealed under a key another cluster holds.
        let mut other = State::default();
        rotate(&mut other, 7, 'e');
        let stranger = Tickets::new(Duration::from_secs(60));
        stranger.publish(&other);
        assert_eq!(
            node.decrypt(&stranger.encrypt(b"state").expect("sealed")),
            None
        );
        assert!(!format!("{node:?}").contains("dddd"));
    }
}
