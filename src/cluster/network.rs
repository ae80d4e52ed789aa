//! Raft RPC client: openraft messages as JSON over HTTP to a peer's `rpc_addr`, over mutual
//! TLS (`tls.rs`: the peer must present the cluster CA's certificate for the node id dialed).
//! The one place that signs cluster RPC (`rpc.rs` verifies): each request carries a timestamp,
//! a random nonce and an HMAC-SHA256 over method, path, timestamp, nonce and the body's
//! SHA-256, under a key derived from the cluster secret (`keyring`). The secret itself is
//! never sent.
//!
//! `rpc_tls = "mixed"` (migration): TLS first; a peer whose port does not speak TLS is
//! called in plaintext and remembered as such for [`PLAINTEXT_MEMORY`]; a remembered peer
//! that answers 426 (it now requires TLS) or fails is called over TLS at once.

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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::snapshot_wire;
use super::tls::{dial_name, parse_dial_name, ClusterTls};
use super::{NodeId, TypeConfig};
use crate::clock;
use crate::config::RpcTls;
use crate::keyring::{hex, rpc_message, Keyring};

/// Header carrying a request's proof: `v1 t=<unix ms> n=<nonce, 32 hex> m=<HMAC, 64 hex>`.
pub const AUTH_HEADER: &str = "x-pingora-vhost-auth";

/// Largest request body the cluster RPC accepts (`rpc.rs`). Everything sent is kept under it:
/// log entries are bounded at proposal ([`MAX_ENTRY_BYTES`]), an append carries at most
/// [`APPEND_BUDGET_BYTES`] of entries (the rest goes in the next one), and a snapshot goes in
/// chunks of [`SNAPSHOT_CHUNK_BYTES`] (its bytes as they are, `snapshot_wire`).
pub const MAX_RPC_BODY: usize = 32 * 1024 * 1024;
/// Largest single log entry (JSON). API bodies are at most 2 MiB, and large seeds are split.
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;
/// Entries per append are cut after this many bytes of JSON. openraft times every append out
/// after the heartbeat interval (200 ms): a loaded debug-build follower took longer than that to
/// decode, store and answer 8 MiB, so a large seed was sent again and again and never
/// committed. The rest of a batch follows at once in the next append.
pub const APPEND_BUDGET_BYTES: usize = 512 * 1024;
/// Snapshot chunk size (bytes of snapshot data per install-snapshot RPC): 32 MB at 100,000
/// domains goes in two.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 16 * 1024 * 1024;
/// A peer without the binary chunk route (an older version, during a rolling upgrade) gets
/// each chunk as JSON pieces of this many bytes (up to 4 bytes of JSON per byte).
const LEGACY_SNAPSHOT_PIECE: usize = 4 * 1024 * 1024;

/// In mixed mode, how long a peer found to speak only plaintext is called in plaintext before
/// TLS is tried again.
pub const PLAINTEXT_MEMORY: Duration = Duration::from_secs(10);
/// How long idle connections to peers are kept.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct HttpNetwork {
    pub keys: Arc<Keyring>,
    pub tls: Arc<ClusterTls>,
    plain: reqwest::Client,
    /// The TLS client of the current identity, with that identity's generation.
    tls_client: Arc<ArcSwap<(u64, reqwest::Client)>>,
    /// Mixed mode: peers that answered in plaintext, and since when.
    plaintext_peers: Arc<Mutex<HashMap<String, Instant>>>,
}

/// The proof header value for one request.
pub fn auth_header(keys: &Keyring, method: &str, path: &str, body: &[u8]) -> String {
    let t = clock::unix_ms();
    let nonce = hex(&keys.random::<16>());
    let mac = keys.sign_rpc(&rpc_message(method, path, t, &nonce, body));
    format!("v1 t={t} n={nonce} m={}", hex(&mac))
}

/// Resolves the names [`dial_name`] makes (and nothing else): the peer's address is in the name.
struct DialNames;

impl reqwest::dns::Resolve for DialNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        // Port 0: the URL's port is used.
        let addr = parse_dial_name(name.as_str()).map(|(_, ip)| SocketAddr::new(ip, 0));
        Box::pin(async move {
            match addr {
                Some(a) => Ok(Box::new(std::iter::once(a)) as reqwest::dns::Addrs),
                None => Err("not a cluster peer name".into()),
            }
        })
    }
}

fn tls_client(config: &rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(config.clone())
        .dns_resolver(Arc::new(DialNames))
        .no_proxy()
        .pool_idle_timeout(IDLE)
        .tcp_nodelay(true)
        .build()
        .unwrap_or_default()
}

const JSON: &str = "application/json";

/// A request body and its content type.
#[derive(Clone, Copy)]
struct Body<'a>(&'a [u8], &'static str);

/// How one attempt went out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Tls,
    Plain,
}

impl HttpNetwork {
    pub fn new(keys: Arc<Keyring>, tls: Arc<ClusterTls>) -> Self {
        let plain = reqwest::Client::builder()
            .pool_idle_timeout(IDLE)
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        let current = tls.current();
        let client = tls_client(&current.client);
        Self {
            keys,
            tls,
            plain,
            tls_client: Arc::new(ArcSwap::from_pointee((current.generation, client))),
            plaintext_peers: Arc::default(),
        }
    }

    /// The TLS client of the current identity (rebuilt after a rotation: connections opened
    /// before keep the old certificate until they close).
    fn tls_client(&self) -> reqwest::Client {
        let current = self.tls.current();
        let cached = self.tls_client.load();
        if cached.0 == current.generation {
            return cached.1.clone();
        }
        let client = tls_client(&current.client);
        self.tls_client
            .store(Arc::new((current.generation, client.clone())));
        client
    }

    /// POSTs `body` to peer `peer` at `addr` (`path` on its RPC port) and decodes a JSON answer.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: NodeId,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, reqwest::Error> {
        // Serializing a derived Serialize into a Vec does not fail; sign exactly these bytes.
        let body = serde_json::to_vec(body).unwrap_or_default();
        self.post_body(peer, addr, path, Body(&body, JSON), timeout)
            .await
    }

    /// POSTs bytes already encoded (`body.1` is their content type); decodes a JSON answer.
    async fn post_body<Resp: DeserializeOwned>(
        &self,
        peer: NodeId,
        addr: &str,
        path: &str,
        body: Body<'_>,
        timeout: Duration,
    ) -> Result<Resp, reqwest::Error> {
        let end = Instant::now() + timeout;
        match self.tls.mode {
            RpcTls::Required => self.send(Wire::Tls, peer, addr, path, body, end).await,
            RpcTls::Off => self.send(Wire::Plain, peer, addr, path, body, end).await,
            RpcTls::Mixed => self.send_mixed(peer, addr, path, body, end).await,
        }
    }

    async fn send_mixed<Resp: DeserializeOwned>(
        &self,
        peer: NodeId,
        addr: &str,
        path: &str,
        body: Body<'_>,
        end: Instant,
    ) -> Result<Resp, reqwest::Error> {
        if self.plaintext_remembered(addr) {
            match self.send(Wire::Plain, peer, addr, path, body, end).await {
                // An answer from the handler, or its refusal: the peer still serves plaintext.
                Err(e)
                    if e.status()
                        .is_some_and(|s| s != reqwest::StatusCode::UPGRADE_REQUIRED) =>
                {
                    return Err(e)
                }
                Ok(r) => return Ok(r),
                // It now requires TLS (426), or it went away or restarted: TLS at once. Sending
                // again is safe: Raft messages tolerate duplicates, writes carry ids.
                Err(_) => self.forget_plaintext(addr),
            }
            return self.send(Wire::Tls, peer, addr, path, body, end).await;
        }
        match self.send(Wire::Tls, peer, addr, path, body, end).await {
            // No TLS connection: the peer may speak only plaintext (its port answered our
            // handshake with HTTP), or be down. Nothing was sent over it.
            Err(tls_error) if tls_error.is_connect() => {
                let plain = self.send(Wire::Plain, peer, addr, path, body, end).await;
                match &plain {
                    Err(e)
                        if e.is_connect()
                            || e.status() == Some(reqwest::StatusCode::UPGRADE_REQUIRED) =>
                    {
                        // Down, or it requires TLS and refused ours: the TLS error says why.
                        return Err(tls_error);
                    }
                    _ => self.remember_plaintext(peer, addr),
                }
                plain
            }
            other => other,
        }
    }

    fn plaintext_remembered(&self, addr: &str) -> bool {
        let peers = self
            .plaintext_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        peers
            .get(addr)
            .is_some_and(|at| at.elapsed() < PLAINTEXT_MEMORY)
    }

    fn remember_plaintext(&self, peer: NodeId, addr: &str) {
        let mut peers = self
            .plaintext_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        peers.retain(|_, at| at.elapsed() < PLAINTEXT_MEMORY);
        if peers.insert(addr.to_string(), Instant::now()).is_none() {
            tracing::info!(
                peer,
                addr,
                "cluster RPC: peer does not speak TLS (rpc_tls = \"off\"?); calling it in plaintext"
            );
        }
    }

    fn forget_plaintext(&self, addr: &str) {
        let mut peers = self
            .plaintext_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        peers.remove(addr);
    }

    async fn send<Resp: DeserializeOwned>(
        &self,
        wire: Wire,
        peer: NodeId,
        addr: &str,
        path: &str,
        body: Body<'_>,
        end: Instant,
    ) -> Result<Resp, reqwest::Error> {
        let (client, url) = match wire {
            Wire::Plain => (self.plain.clone(), format!("http://{addr}{path}")),
            // An address that is not IP:port gets a URL the verifier refuses (no node id).
            Wire::Tls => (
                self.tls_client(),
                match addr.parse::<SocketAddr>() {
                    Ok(a) => format!("https://{}:{}{path}", dial_name(peer, a.ip()), a.port()),
                    Err(_) => format!("https://{addr}{path}"),
                },
            ),
        };
        let Body(body, content_type) = body;
        let auth = auth_header(&self.keys, "POST", path, body);
        client
            .post(url)
            .header(AUTH_HEADER, auth)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .timeout(
                end.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            )
            .body(body.to_vec())
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
    /// The peer answered 404 to a binary snapshot chunk: it predates them.
    legacy_snapshots: bool,
}

/// A call that got no answer from the peer's Raft: not reachable, or the transport failed.
fn transport_error<E: std::error::Error>(e: reqwest::Error) -> RPCError<NodeId, BasicNode, E> {
    if e.is_connect() {
        RPCError::Unreachable(Unreachable::new(&e))
    } else {
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            net: self.clone(),
            target,
            addr: node.addr.clone(),
            legacy_snapshots: false,
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
        let body = serde_json::to_vec(req).unwrap_or_default();
        self.call_body(path, Body(&body, JSON), option).await
    }

    async fn call_body<Resp, E>(
        &self,
        path: &str,
        body: Body<'_>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let res: Result<Resp, E> = self
            .net
            .post_body(self.target, &self.addr, path, body, option.hard_ttl())
            .await
            .map_err(transport_error::<E>)?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// A snapshot chunk as JSON pieces on the old route, for a peer without the binary one.
    async fn install_snapshot_legacy(
        &self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let mut answer = None;
        for part in legacy_pieces(&rpc, LEGACY_SNAPSHOT_PIECE) {
            let resp: InstallSnapshotResponse<NodeId> =
                self.call("/raft/snapshot", &part, option).await?;
            // A higher vote ends the transfer: the caller sees it.
            if resp.vote > rpc.vote {
                return Ok(resp);
            }
            answer = Some(resp);
        }
        answer.ok_or_else(|| {
            RPCError::Network(NetworkError::new(&std::io::Error::other(
                "empty snapshot chunk",
            )))
        })
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
        if self.legacy_snapshots {
            return self.install_snapshot_legacy(rpc, &option).await;
        }
        let body = snapshot_wire::encode(rpc.clone());
        let sent = self
            .net
            .post_body(
                self.target,
                &self.addr,
                "/raft/snapshot-chunk",
                Body(&body, snapshot_wire::CONTENT_TYPE),
                option.hard_ttl(),
            )
            .await;
        let res: Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> =
            match sent {
                Ok(res) => res,
                // An older peer: no such route. Remembered for this client (openraft makes a new
                // one when the peer's address changes or it is rebuilt).
                Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {
                    self.legacy_snapshots = true;
                    return self.install_snapshot_legacy(rpc, &option).await;
                }
                Err(e) => return Err(transport_error(e)),
            };
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("/raft/vote", &rpc, &option).await
    }
}

/// A snapshot chunk as requests of at most `piece` bytes of data each, at their offsets; only
/// the last is `done` (if the chunk was). A chunk without data is one request.
fn legacy_pieces(
    rpc: &InstallSnapshotRequest<TypeConfig>,
    piece: usize,
) -> Vec<InstallSnapshotRequest<TypeConfig>> {
    let pieces: Vec<&[u8]> = if rpc.data.is_empty() {
        vec![&rpc.data[..]]
    } else {
        rpc.data.chunks(piece).collect()
    };
    let last = pieces.len() - 1;
    let mut offset = rpc.offset;
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, data)| {
            let part = InstallSnapshotRequest {
                vote: rpc.vote,
                meta: rpc.meta.clone(),
                offset,
                data: data.to_vec(),
                done: rpc.done && i == last,
            };
            offset += data.len() as u64;
            part
        })
        .collect()
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
    use super::{legacy_pieces, prefix_within};
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{SnapshotMeta, Vote};

    #[test]
    fn a_chunk_for_an_older_peer_goes_in_pieces_at_their_offsets() {
        let chunk = |offset: u64, len: usize, done: bool| InstallSnapshotRequest {
            vote: Vote::new_committed(2, 1),
            meta: SnapshotMeta::default(),
            offset,
            data: (0..len).map(|i| i as u8).collect(),
            done,
        };
        // (chunk offset, length, done, piece size) -> (offset, length, done) of each piece
        type Piece = (u64, usize, bool);
        type Case = ((u64, usize, bool, usize), &'static [Piece]);
        let cases: &[Case] = &[
            (
                (0, 10, true, 4),
                &[(0, 4, false), (4, 4, false), (8, 2, true)],
            ),
            ((100, 8, false, 4), &[(100, 4, false), (104, 4, false)]),
            ((0, 4, true, 4), &[(0, 4, true)]),
            ((7, 0, true, 4), &[(7, 0, true)]),
        ];
        for &((offset, len, done, piece), want) in cases {
            let whole = chunk(offset, len, done);
            let pieces = legacy_pieces(&whole, piece);
            let got: Vec<Piece> = pieces
                .iter()
                .map(|p| (p.offset, p.data.len(), p.done))
                .collect();
            assert_eq!(got, want, "chunk at {offset}, {len} bytes, done {done}");
            let joined: Vec<u8> = pieces.iter().flat_map(|p| p.data.clone()).collect();
            assert_eq!(
                joined, whole.data,
                "the pieces are the chunk's bytes in order"
            );
        }
    }

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
