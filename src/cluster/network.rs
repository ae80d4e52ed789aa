//! Raft RPC client: openraft messages as JSON over HTTP to a peer's `rpc_addr`. The one place
//! that signs cluster RPC (`rpc.rs` verifies): each request carries a timestamp, a random nonce
//! and an HMAC-SHA256 over method, path, timestamp, nonce and the body's SHA-256, under a key
//! derived from the cluster secret (`keyring`). The secret itself is never sent.

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

use std::sync::Arc;

use super::{NodeId, TypeConfig};
use crate::clock;
use crate::keyring::{hex, rpc_message, Keyring};

/// Header carrying a request's proof: `v1 t=<unix ms> n=<nonce, 32 hex> m=<HMAC, 64 hex>`.
pub const AUTH_HEADER: &str = "x-pingora-vhost-auth";

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
    pub keys: Arc<Keyring>,
}

/// The proof header value for one request.
pub fn auth_header(keys: &Keyring, method: &str, path: &str, body: &[u8]) -> String {
    let t = clock::unix_ms();
    let nonce = hex(&keys.random::<16>());
    let mac = keys.sign_rpc(&rpc_message(method, path, t, &nonce, body));
    format!("v1 t={t} n={nonce} m={}", hex(&mac))
}

impl HttpNetwork {
    pub fn new(keys: Arc<Keyring>) -> Self {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Self { client, keys }
    }

    /// POSTs `body` to `http://<addr><path>` and decodes a JSON answer.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: std::time::Duration,
    ) -> Result<Resp, reqwest::Error> {
        // Serializing a derived Serialize into a Vec does not fail; sign exactly these bytes.
        let body = serde_json::to_vec(body).unwrap_or_default();
        let auth = auth_header(&self.keys, "POST", path, &body);
        self.client
            .post(format!("http://{addr}{path}"))
            .header(AUTH_HEADER, auth)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(timeout)
            .body(body)
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
