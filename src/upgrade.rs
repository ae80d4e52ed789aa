//! Graceful upgrade (SIGQUIT) handoff of the routing state.
//!
//! Pingora hands the listening sockets to a process started with `--upgrade` when the old one
//! gets SIGQUIT; the old one then drains and exits. The Raft store is a single-owner file the
//! old process holds until it exits, so the new process first asks the old one, over a Unix
//! socket in the private `data_dir`, for its current state and the backends it avoids. It
//! proxies with that while it waits for the store; then the control plane opens the store,
//! which replaces the handed-over state with the committed one.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::cluster::store::StateMachineStore;
use crate::health::now_ms;
use crate::proxy::DataPlane;
use crate::state::State;

/// What the old process hands over.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub state: State,
    /// Backends the old process's merged health view avoided.
    pub avoided_backends: Vec<String>,
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("handoff.sock")
}

/// Answers every connection with the current [`Handoff`] (JSON, so that a newer binary with
/// added fields still reads it), then closes it.
pub async fn serve(path: PathBuf, sm: StateMachineStore, data: Arc<DataPlane>) {
    let _ = std::fs::remove_file(&path); // left over from a killed process
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), "graceful upgrade handoff unavailable: {e}");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        // Only this user may read the state (it holds the domains' private keys).
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
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
        let handoff = Handoff {
            state: sm.with_state(State::clone),
            avoided_backends: data
                .backends
                .all()
                .iter()
                .filter(|rt| !rt.health.merged_usable(now_ms()))
                .map(|rt| rt.id.clone())
                .collect(),
        };
        match serde_json::to_vec(&handoff) {
            Ok(bytes) => {
                use tokio::io::AsyncWriteExt;
                if let Err(e) = stream.write_all(&bytes).await {
                    tracing::warn!("graceful upgrade handoff: {e}");
                }
            }
            Err(e) => tracing::warn!("graceful upgrade handoff: encoding the state: {e}"),
        }
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

/// Makes the data plane serve the handed-over state, avoiding what the old process avoided
/// until this node's own health plane runs.
pub fn adopt(data: &DataPlane, handoff: &Handoff, node_id: u64) {
    data.publish(&handoff.state);
    for id in &handoff.avoided_backends {
        if let Some(rt) = data.backends.get(id) {
            rt.health.set_peers_down(vec![node_id]);
        }
    }
    // The old process's view stands in for the peers' until gossip runs here.
    data.peer_view.open();
}
