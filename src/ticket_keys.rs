//! The leader's rotation of the TLS session ticket keys (`proxy::tickets` seals and opens
//! tickets with them on every node). A key is made when there is none or the newest is a
//! rotation period old; it reaches every node as a replicated command, so all nodes switch
//! together and a ticket from any node opens on any other.

use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

use crate::clock::unix_ms;
use crate::cluster::ClusterNode;
use crate::state::{Command, State, TicketKey};

/// Whether a new key is due at `now` (Unix ms).
pub fn due(state: &State, now: u64, rotation: Duration) -> bool {
    let rotation_ms = u64::try_from(rotation.as_millis()).unwrap_or(u64::MAX);
    state
        .ticket_keys
        .first()
        .is_none_or(|newest| now.saturating_sub(newest.created_unix_ms) >= rotation_ms)
}

/// A fresh random key made at `now`.
pub fn new_key(rng: &SystemRandom, now: u64) -> Option<TicketKey> {
    let mut bytes = [0u8; 36];
    rng.fill(&mut bytes).ok()?;
    let (id, secret) = bytes.split_at(4);
    Some(TicketKey {
        id: u32::from_be_bytes(id.try_into().ok()?),
        secret_hex: secret.iter().map(|b| format!("{b:02x}")).collect(),
        created_unix_ms: now,
    })
}

pub async fn run(node: Arc<ClusterNode>, rotation: Duration) {
    let rng = SystemRandom::new();
    // Checked often enough that a key is at most ~10 s late, whatever the period.
    let mut tick = tokio::time::interval(Duration::from_secs(10).min(rotation / 4));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !node.is_leader() || !node.sm.with_state(|s| due(s, unix_ms(), rotation)) {
            continue;
        }
        let Some(key) = new_key(&rng, unix_ms()) else {
            tracing::warn!("no randomness for a TLS ticket key; trying again later");
            continue;
        };
        let id = key.id;
        match node.write(Command::RotateTicketKey(key)).await {
            Ok(_) => tracing::info!(key_id = id, "new TLS session ticket key"),
            // Not leader any more, or no quorum: the next leader or tick tries again.
            Err(e) => tracing::warn!("TLS session ticket key not rotated: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::apply;

    #[test]
    fn a_key_is_due_with_none_and_after_each_period() {
        let period = Duration::from_secs(60);
        let mut state = State::default();
        assert!(due(&state, 1_000, period));
        let rng = SystemRandom::new();
        let key = new_key(&rng, 1_000).expect("random key");
        assert!(key.secret().is_some(), "a valid key");
        assert_ne!(key.secret(), new_key(&rng, 1_000).and_then(|k| k.secret()));
        apply(&mut state, &Command::RotateTicketKey(key)).expect("applies");
        assert!(!due(&state, 1_000, period));
        assert!(!due(&state, 60_999, period));
        assert!(due(&state, 61_000, period));
        // A clock behind the key's maker does not rotate early.
        assert!(!due(&state, 0, period));
    }
}
