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
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("/raft/append", &rpc, &option).await
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
