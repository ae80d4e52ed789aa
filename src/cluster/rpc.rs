//! Cluster RPC server on `rpc_addr`: Raft messages and writes forwarded by followers.
//! Every call must carry a valid proof (`network::auth_header`: a MAC under a key derived from
//! the cluster secret and id, a timestamp within the clock window, a nonce not seen before);
//! others are refused (403), logged and counted. This is the one place that verifies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRef, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

use super::network::AUTH_HEADER;
use super::{ClusterNode, ForwardRequest, ForwardedWrite, JoinChallenge, JoinProof, TypeConfig};
use super::{FORWARD_WINDOW, MAX_CLOCK_SKEW};
use crate::clock;
use crate::keyring::{rpc_message, unhex, ReplayGuard, Stale, CLOCK_WINDOW};
use crate::observability::Metrics;

/// Nonces remembered for the replay check: within the ±30 s window, about 1,600 requests a
/// second before the oldest are forgotten (and older timestamps refused); ~5 MB at most.
const MAX_NONCES: usize = 100_000;

/// What the RPC handlers share: the node, and the metrics that count refused calls.
#[derive(Clone)]
pub struct Rpc {
    node: Arc<ClusterNode>,
    metrics: Arc<Metrics>,
    /// Nonces of the requests accepted within the clock window (one sender key: requests are
    /// not attributed to nodes, any key holder may send).
    seen: Arc<std::sync::Mutex<ReplayGuard<()>>>,
}

impl FromRef<Rpc> for Arc<ClusterNode> {
    fn from_ref(rpc: &Rpc) -> Self {
        rpc.node.clone()
    }
}

pub fn router(node: Arc<ClusterNode>, metrics: Arc<Metrics>) -> Router {
    let rpc = Rpc {
        node,
        metrics,
        seen: Arc::new(std::sync::Mutex::new(ReplayGuard::new(1, MAX_NONCES))),
    };
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/snapshot-chunk", post(snapshot_chunk))
        .route("/cluster/write", post(forwarded_write))
        .route("/cluster/pre-vote", post(pre_vote))
        .route("/cluster/join-challenge", post(join_challenge))
        .route("/cluster/applied", post(applied))
        .route("/cluster/remove-member", post(remove_member))
        .layer(middleware::from_fn_with_state(rpc.clone(), authenticate))
        .layer(axum::extract::DefaultBodyLimit::max(
            super::network::MAX_RPC_BODY,
        ))
        .with_state(rpc)
}

/// Largest RPC body read (and hashed) before the MAC is checked: the RPC's body limit
/// (appends and snapshot chunks are bounded under it, see `network.rs`).
pub use super::network::MAX_RPC_BODY;
/// Bodies larger than this are hashed on the blocking pool, so a flood of large unsigned
/// bodies costs the runtime (Raft heartbeats, gossip) nothing.
const INLINE_HASH_MAX: usize = 64 * 1024;

/// Why a cluster RPC call was refused before its handler (the `reason` label of
/// `pingora_vhost_cluster_rpc_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    /// Missing or malformed proof, or a MAC that no accepted key made.
    #[error("missing or wrong request MAC (different secret or cluster_id?)")]
    Auth,
    /// Authentic, but its timestamp is outside the window: clocks apart, or an old capture.
    #[error("request timestamp outside the {}s clock window", CLOCK_WINDOW.as_secs())]
    Clock,
    /// Authentic, and this exact request was received before.
    #[error("request already received (replay)")]
    Replay,
    #[error("request body over {MAX_RPC_BODY} bytes")]
    Body,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Auth => "auth",
            Refusal::Clock => "clock",
            Refusal::Replay => "replay",
            Refusal::Body => "body",
        }
    }
}

/// The verifying side of `network::auth_header`: MAC (constant time, any accepted key), then
/// the clock window, then the nonce memory. The body is read (bounded) to hash it, and handed
/// on to the handler.
async fn authenticate(State(rpc): State<Rpc>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let checked = match axum::body::to_bytes(body, MAX_RPC_BODY).await {
        Err(_) => Err(Refusal::Body),
        Ok(bytes) if bytes.len() <= INLINE_HASH_MAX => verify(&rpc, &parts, &bytes).map(|()| bytes),
        Ok(bytes) => {
            let rpc2 = rpc.clone();
            let method = parts.method.clone();
            let path2 = parts.uri.path().to_string();
            let header = parts.headers.get(AUTH_HEADER).cloned();
            tokio::task::spawn_blocking(move || {
                verify_fields(&rpc2, method.as_str(), &path2, header.as_ref(), &bytes)
                    .map(|()| bytes)
            })
            .await
            .unwrap_or(Err(Refusal::Auth))
        }
    };
    match checked {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(refusal) => {
            rpc.metrics.cluster_rpc_refused(refusal.reason());
            tracing::warn!(path = %path, "refused cluster RPC: {refusal}");
            let status = match refusal {
                Refusal::Body => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::FORBIDDEN,
            };
            (status, refusal.to_string()).into_response()
        }
    }
}

fn verify(rpc: &Rpc, parts: &axum::http::request::Parts, body: &[u8]) -> Result<(), Refusal> {
    verify_fields(
        rpc,
        parts.method.as_str(),
        parts.uri.path(),
        parts.headers.get(AUTH_HEADER),
        body,
    )
}

fn verify_fields(
    rpc: &Rpc,
    method: &str,
    path: &str,
    header: Option<&axum::http::HeaderValue>,
    body: &[u8],
) -> Result<(), Refusal> {
    let header = header.and_then(|v| v.to_str().ok()).ok_or(Refusal::Auth)?;
    let proof = Proof::parse(header).ok_or(Refusal::Auth)?;
    let message = rpc_message(method, path, proof.unix_ms, proof.nonce, body);
    rpc.node
        .keys()
        .verify_rpc(&message, &proof.mac)
        .ok_or(Refusal::Auth)?;
    let nonce = unhex(proof.nonce)
        .and_then(|n| <[u8; 16]>::try_from(n).ok())
        .map(u128::from_be_bytes)
        .ok_or(Refusal::Auth)?;
    let mut seen = rpc.seen.lock().unwrap_or_else(|p| p.into_inner());
    seen.check(&(), proof.unix_ms, nonce, clock::unix_ms())
        .map_err(|e| match e {
            Stale::Clock => Refusal::Clock,
            Stale::Replay => Refusal::Replay,
        })
}

/// The parts of an `x-pingora-vhost-auth` header: `v1 t=<ms> n=<32 hex> m=<64 hex>`.
struct Proof<'a> {
    unix_ms: u64,
    nonce: &'a str,
    mac: Vec<u8>,
}

impl<'a> Proof<'a> {
    fn parse(header: &'a str) -> Option<Self> {
        let mut fields = header.split(' ');
        if fields.next()? != "v1" {
            return None;
        }
        let unix_ms = fields.next()?.strip_prefix("t=")?.parse().ok()?;
        let nonce = fields.next()?.strip_prefix("n=")?;
        let mac = unhex(fields.next()?.strip_prefix("m=")?)?;
        (fields.next().is_none() && nonce.len() == 32 && mac.len() == 32).then_some(Self {
            unix_ms,
            nonce,
            mac,
        })
    }
}

async fn append(
    State(node): State<Arc<ClusterNode>>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> impl IntoResponse {
    Json(node.raft.append_entries(req).await)
}

async fn vote(
    State(node): State<Arc<ClusterNode>>,
    Json(req): Json<VoteRequest<u64>>,
) -> impl IntoResponse {
    Json(node.raft.vote(req).await)
}

/// A snapshot chunk in openraft's JSON form: what versions before `/raft/snapshot-chunk`
/// send (a rolling upgrade), or this version to a peer that answered 404 there.
async fn snapshot(
    State(node): State<Arc<ClusterNode>>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> impl IntoResponse {
    if req.offset == 0 {
        tracing::info!("snapshot received as JSON (the leader runs an older version)");
    }
    Json(node.raft.install_snapshot(req).await)
}

/// A snapshot chunk with its data as bytes (`snapshot_wire`); `/raft/snapshot` is the JSON
/// form older versions send.
async fn snapshot_chunk(State(node): State<Arc<ClusterNode>>, body: Bytes) -> Response {
    match super::snapshot_wire::decode(&body) {
        Ok(req) => Json(node.raft.install_snapshot(req).await).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// A follower forwarded a client write: run it here (we believe we are leader; if not the
/// answer says so and the follower retries). Past its deadline it is refused unproposed: it
/// may be a copy delivered late, after the follower gave up on it.
async fn forwarded_write(
    State(rpc): State<Rpc>,
    Json(req): Json<ForwardRequest>,
) -> Json<ForwardedWrite> {
    // The rest of the deadline, measured from receipt on the monotonic clock (a wall clock
    // step while the write runs changes nothing). Capped, so a sender whose clock runs far
    // ahead cannot make a request live longer than any follower waits for it.
    let left = Duration::from_millis(req.deadline_unix_ms.saturating_sub(clock::unix_ms()))
        .min(FORWARD_WINDOW + MAX_CLOCK_SKEW);
    let outcome = if left.is_zero() {
        ForwardedWrite::Expired
    } else {
        rpc.node
            .write_local(
                req.id.clone(),
                req.fingerprint,
                req.cmd,
                Instant::now() + left,
            )
            .await
    };
    if matches!(outcome, ForwardedWrite::Expired) {
        rpc.metrics.cluster_rpc_refused("expired");
        tracing::warn!(
            id = ?req.id,
            deadline_unix_ms = req.deadline_unix_ms,
            "refused a forwarded write past its deadline (delivered late, or clocks apart)"
        );
    }
    Json(outcome)
}

/// A would-be candidate asks whether we would vote for it (see `election.rs`).
async fn pre_vote(
    State(node): State<Arc<ClusterNode>>,
    Json(req): Json<super::election::PreVoteRequest>,
) -> Json<super::election::PreVoteResponse> {
    Json(super::election::answer(&node, &req).await)
}

/// A leader checks, before adding us, that we know the secret: we answer its fresh nonce with
/// a proof bound to our node id and RPC address. We answer only for ourselves, so a proof can
/// never vouch for another address (an impostor relaying the challenge to us gets nothing it
/// can use).
async fn join_challenge(
    State(node): State<Arc<ClusterNode>>,
    Json(c): Json<JoinChallenge>,
) -> Result<Json<JoinProof>, StatusCode> {
    let nonce = unhex(&c.nonce).ok_or(StatusCode::BAD_REQUEST)?;
    if c.node_id != node.node_id || c.rpc_addr != node.rpc_addr {
        tracing::warn!(
            asked_for = c.node_id,
            asked_addr = %c.rpc_addr,
            "join challenge for another node or address: not answered"
        );
        return Err(StatusCode::CONFLICT);
    }
    let proof = node.keys().join_proof(&nonce, node.node_id, &node.rpc_addr);
    Ok(Json(JoinProof {
        proof: crate::keyring::hex(&proof),
    }))
}

/// This node's last applied log index (a leader waits on it before ACME `set_ready`).
async fn applied(State(node): State<Arc<ClusterNode>>, Json(_from): Json<u64>) -> Json<u64> {
    Json(node.last_applied())
}

async fn remove_member(
    State(node): State<Arc<ClusterNode>>,
    Json(id): Json<u64>,
) -> Json<super::RemoveOutcome> {
    use super::RemoveOutcome;
    if !node.is_leader() {
        return Json(RemoveOutcome::NotLeader);
    }
    Json(match super::membership::remove(&node, id).await {
        Ok(()) => RemoveOutcome::Done,
        Err(e) => RemoveOutcome::Refused(e),
    })
}
