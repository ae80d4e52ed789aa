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
