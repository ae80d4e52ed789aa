//! Raft RPC client: openraft messages as JSON over HTTP to a peer's `rpc_addr`, authenticated
//! with the cluster secret (see `rpc.rs` for the server side).

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{NodeId, TypeConfig};

/// Header carrying the shared cluster secret on every cluster RPC.
pub const SECRET_HEADER: &str = "x-pingora-vhost-secret";
/// Header carrying the cluster id, so two clusters on one network never talk.
pub const CLUSTER_ID_HEADER: &str = "x-pingora-vhost-cluster";

/// Largest request body the cluster RPC accepts (`rpc.rs`). Everything sent is kept under it:
/// log entries are bounded at proposal ([`MAX_ENTRY_BYTES`]), an append carries at most
/// [`APPEND_BUDGET_BYTES`] of entries (the rest goes in the next one), and a snapshot goes in
/// chunks of [`SNAPSHOT_CHUNK_BYTES`] (a JSON byte array takes up to 4 bytes per byte).
pub const MAX_RPC_BODY: usize = 32 * 1024 * 1024;
/// Largest single log entry (JSON). API bodies are at most 2 MiB, and large seeds are split.
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;
/// Entries per append are cut after this many bytes of JSON.
pub const APPEND_BUDGET_BYTES: usize = 8 * 1024 * 1024;
/// Snapshot chunk size (bytes of snapshot data per install-snapshot RPC).
pub const SNAPSHOT_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct HttpNetwork {
    pub client: reqwest::Client,
    pub secret: String,
    pub cluster_id: String,
}

impl HttpNetwork {
    pub fn new(secret: String, cluster_id: String) -> Self {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Self {
            client,
            secret,
            cluster_id,
        }
    }

    /// POSTs `body` to `http://<addr><path>` and decodes a JSON answer.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: std::time::Duration,
    ) -> Result<Resp, reqwest::Error> {
        self.client
            .post(format!("http://{addr}{path}"))
            .header(SECRET_HEADER, &self.secret)
            .header(CLUSTER_ID_HEADER, &self.cluster_id)
            .timeout(timeout)
            .json(body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }
}

pub struct PeerClient {
    net: HttpNetwork,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            net: self.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let res: Result<Resp, E> = self
            .net
            .post(&self.addr, path, req, option.hard_ttl())
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Send the longest prefix that fits the budget and report a partial success: openraft
        // sends the rest in the next call (its documented contract for `PartialSuccess`).
        let fits = prefix_within(&rpc.entries, APPEND_BUDGET_BYTES);
        if fits == rpc.entries.len() {
            return self.call("/raft/append", &rpc, &option).await;
        }
        rpc.entries.truncate(fits);
        let last = rpc.entries.last().map(|e| e.log_id);
        match self.call("/raft/append", &rpc, &option).await? {
            AppendEntriesResponse::Success => Ok(AppendEntriesResponse::PartialSuccess(last)),
            other => Ok(other),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("/raft/vote", &rpc, &option).await
    }
}

/// How many leading entries fit in `budget` bytes of JSON (at least one: a single entry is
/// bounded by [`MAX_ENTRY_BYTES`] at proposal).
fn prefix_within<T: Serialize>(entries: &[T], budget: usize) -> usize {
    let mut used = 0;
    for (i, e) in entries.iter().enumerate() {
        used += serde_json::to_vec(e).map_or(usize::MAX / 2, |v| v.len());
        if used > budget && i > 0 {
            return i;
        }
    }
    entries.len()
}

#[cfg(test)]
mod tests {
    use super::prefix_within;

    #[test]
    fn appends_are_cut_at_the_budget() {
        let entries = vec!["x".repeat(100); 10];
        assert_eq!(prefix_within(&entries, 10_000), 10);
        assert_eq!(prefix_within(&entries, 350), 3);
        // One entry over the budget still goes alone.
        assert_eq!(prefix_within(&entries, 10), 1);
        assert_eq!(prefix_within::<String>(&[], 10), 0);
    }
}
