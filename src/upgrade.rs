//! Graceful upgrade (SIGQUIT) handoff of the routing state.
//!
//! Pingora hands the listening sockets to a process started with `--upgrade` when the old one
//! gets SIGQUIT; the old one then drains and exits. The Raft store is a single-owner file the
//! old process holds until it exits, so the new process first asks the old one, over a Unix
//! socket in the private `data_dir`, for its current state and the backends it avoids. It
//! proxies with that while it waits for the store; then the control plane opens the store,
//! which replaces the handed-over state with the committed one.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::cluster::store::StateMachineStore;
use crate::live::addrs::Resolution;
use crate::proxy::DataPlane;
use crate::state::State;

/// What the old process hands over.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub state: State,
    /// Backends this node's own probes or breakers had down.
    #[serde(default)]
    pub locally_down: Vec<String>,
    /// Backends live peers reported down, and which peers.
    #[serde(default)]
    pub peers_down: BTreeMap<String, Vec<u64>>,
    /// What backend names resolved to (the new process's resolver starts only once it owns
    /// the store).
    #[serde(default)]
    pub resolved: BTreeMap<String, Resolution>,
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("handoff.sock")
}

/// Listens on the handoff socket (mode 0600); `None`, logged, when it cannot.
pub fn bind(path: &Path) -> Option<UnixListener> {
    let _ = std::fs::remove_file(path); // left over from a killed process
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), "graceful upgrade handoff unavailable: {e}");
            return None;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        // Only this user may read the state (it holds the domains' private keys).
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Some(listener)
}

/// Answers every connection with the current [`Handoff`] (JSON, so that a newer binary with
/// added fields still reads it), then closes it.
pub async fn serve(listener: UnixListener, sm: StateMachineStore, data: Arc<DataPlane>) {
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // e.g. out of file descriptors: do not spin.
                tracing::warn!("graceful upgrade handoff: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let runtimes = data.live.backends.all();
        let handoff = Handoff {
            state: sm.with_state(State::clone),
            locally_down: runtimes
                .iter()
                .filter(|rt| rt.health.local_verdict_down())
                .map(|rt| rt.id.clone())
                .collect(),
            peers_down: runtimes
                .iter()
                .map(|rt| (rt.id.clone(), rt.health.report().peers_reporting_down))
                .filter(|(_, peers)| !peers.is_empty())
                .collect(),
            resolved: data.live.addrs.entries().into_iter().collect(),
        };
        // Each answer in its own task, bounded: a client that never reads blocks nothing.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let write = async {
                let bytes = serde_json::to_vec(&handoff)?;
                stream.write_all(&bytes).await
            };
            match tokio::time::timeout(std::time::Duration::from_secs(10), write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("graceful upgrade handoff: {e}"),
                Err(_) => {
                    tracing::warn!("graceful upgrade handoff: the reader did not read within 10 s")
                }
            }
        });
    }
}

/// Fetches the running process's [`Handoff`] (blocking; called before the runtimes exist).
pub fn fetch(path: &Path, timeout: Duration) -> anyhow::Result<Handoff> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!(
            "--upgrade: no running pingora-vhost answered on {} (is the old process running with this data_dir?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .with_context(|| format!("--upgrade: reading the state from {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("--upgrade: decoding the state from {}", path.display()))
}

/// Makes the data plane serve the handed-over state with the old process's health view: its
/// own "down" verdicts stay until this process's probes clear them, its peers' until gossip
/// brings theirs.
pub fn adopt(data: &DataPlane, handoff: &Handoff) {
    for (address, resolution) in &handoff.resolved {
        data.live.addrs.store(address, resolution.clone());
    }
    data.publish(&handoff.state, &crate::state::Changes::everything());
    for id in &handoff.locally_down {
        if let Some(rt) = data.live.backends.get(id) {
            rt.health.assume_down();
        }
    }
    for (id, peers) in &handoff.peers_down {
        if let Some(rt) = data.live.backends.get(id) {
            rt.health.set_peers_down(peers.clone());
        }
    }
    // The old process's view stands in for the peers' until gossip runs here.
    data.live.peer_view.open();
}
