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

/// How long until the next look: every second while the cluster has no key (it issues no
/// tickets until its first one, made as soon as there is a leader), then often enough that a
/// rotation is at most ~10 s late, whatever the period.
pub fn next_check(has_key: bool, rotation: Duration) -> Duration {
    if has_key {
        Duration::from_secs(10).min(rotation / 4)
    } else {
        Duration::from_secs(1)
    }
}

pub async fn run(node: Arc<ClusterNode>, rotation: Duration) {
    let rng = SystemRandom::new();
    loop {
        if node.is_leader() && node.sm.with_state(|s| due(s, unix_ms(), rotation)) {
            rotate(&node, &rng).await;
        }
        let has_key = node.sm.with_state(|s| !s.ticket_keys.is_empty());
        tokio::time::sleep(next_check(has_key, rotation)).await;
    }
}

async fn rotate(node: &ClusterNode, rng: &SystemRandom) {
    let Some(key) = new_key(rng, unix_ms()) else {
        tracing::warn!("no randomness for a TLS ticket key; trying again later");
        return;
    };
    let id = key.id;
    match node.write(Command::RotateTicketKey(key)).await {
        Ok(_) => tracing::info!(key_id = id, "new TLS session ticket key"),
        // Not leader any more, or no quorum: the next leader or look tries again.
        Err(e) => tracing::warn!("TLS session ticket key not rotated: {e}"),
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

    /// A new cluster gets its first key within a second of having a leader (it issued no
    /// tickets for up to 10 s before); then rotations are looked for every 10 s or a
    /// quarter period.
    #[test]
    fn the_first_key_is_looked_for_every_second() {
        let cases = [
            (false, 3_600, 1),
            (true, 3_600, 10),
            (true, 8, 2),
            (false, 8, 1),
        ];
        for (has_key, rotation, want) in cases {
            let rotation = Duration::from_secs(rotation);
            assert_eq!(
                next_check(has_key, rotation),
                Duration::from_secs(want),
                "{has_key} {rotation:?}"
            );
        }
    }
}
