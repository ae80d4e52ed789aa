//! The peer-view gate: a node that just started holds proxied requests until its peers'
//! health verdicts have arrived through gossip, or [`PEER_VIEW_WAIT`] has passed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest a starting node waits for its peers' verdicts before it routes on its own view
/// (a member that is down never shows up in gossip).
pub const PEER_VIEW_WAIT: Duration = Duration::from_secs(2);

/// Opens once this node has its peers' health verdicts (or gave up waiting for them).
/// The proxy checks one atomic per request; only requests in the first moments after a
/// start ever wait.
#[derive(Debug)]
pub struct PeerViewGate {
    open: AtomicBool,
    opened: Notify,
    /// The gate opens by itself this long after the data plane was created, even if the
    /// control plane is slow to start (ports still held, Raft loading).
    deadline: Instant,
}

impl Default for PeerViewGate {
    fn default() -> Self {
        Self {
            open: AtomicBool::new(false),
            opened: Notify::new(),
            deadline: Instant::now() + PEER_VIEW_WAIT,
        }
    }
}

impl PeerViewGate {
    pub fn is_open(&self) -> bool {
        if self.open.load(Ordering::Acquire) {
            return true;
        }
        if Instant::now() >= self.deadline {
            self.open();
            return true;
        }
        false
    }

    pub fn open(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            self.opened.notify_waiters();
        }
    }

    /// Waits until the gate opens: when the peer view arrives, at the latest at the deadline.
    pub async fn wait(&self) {
        let opened = self.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if self.is_open() {
            return;
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, opened).await;
        self.open();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn gate_with_deadline(after: Duration) -> PeerViewGate {
        PeerViewGate {
            deadline: Instant::now() + after,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn gate_releases_waiters_when_opened_and_opens_itself_at_the_deadline() {
        let gate = gate_with_deadline(Duration::from_millis(50));
        assert!(!gate.is_open());
        gate.wait().await;
        assert!(gate.is_open(), "the deadline opens the gate");

        let gate = Arc::new(gate_with_deadline(Duration::from_secs(30)));
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move {
                let t = Instant::now();
                gate.wait().await;
                t.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.open();
        let waited = waiter.await.expect("waiter");
        assert!(
            waited < Duration::from_secs(30),
            "opening releases the waiter"
        );
        gate.wait().await; // open: returns at once
    }
}
