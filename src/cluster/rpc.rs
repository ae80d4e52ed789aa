//! Cluster RPC server on `rpc_addr`: Raft messages and writes forwarded by followers.
//! Every call must carry the cluster secret and id; others are refused (403) and logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRef, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

use super::network::{CLUSTER_ID_HEADER, SECRET_HEADER};
use super::{ClusterNode, ForwardRequest, ForwardedWrite, TypeConfig};
use super::{FORWARD_WINDOW, MAX_CLOCK_SKEW};
use crate::clock;
use crate::observability::Metrics;

/// What the RPC handlers share: the node, and the metrics that count refused calls.
#[derive(Clone)]
pub struct Rpc {
    node: Arc<ClusterNode>,
    metrics: Arc<Metrics>,
}

impl FromRef<Rpc> for Arc<ClusterNode> {
    fn from_ref(rpc: &Rpc) -> Self {
        rpc.node.clone()
    }
}

pub fn router(node: Arc<ClusterNode>, metrics: Arc<Metrics>) -> Router {
    let rpc = Rpc { node, metrics };
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/cluster/write", post(forwarded_write))
        .route("/cluster/pre-vote", post(pre_vote))
        .route("/cluster/hello", post(hello))
        .route("/cluster/applied", post(applied))
        .route("/cluster/remove-member", post(remove_member))
        .layer(middleware::from_fn_with_state(rpc.clone(), authenticate))
        .layer(axum::extract::DefaultBodyLimit::max(
            super::network::MAX_RPC_BODY,
        ))
        .with_state(rpc)
}

async fn authenticate(State(rpc): State<Rpc>, req: Request, next: Next) -> Response {
    if !authorized(&rpc.node, req.headers()) {
        rpc.metrics.cluster_rpc_refused("secret");
        tracing::warn!(
            path = %req.uri().path(),
            "refused cluster RPC: wrong or missing cluster secret / cluster id"
        );
        return (
            StatusCode::FORBIDDEN,
            "cluster secret or cluster id mismatch",
        )
            .into_response();
    }
    next.run(req).await
}

fn authorized(node: &ClusterNode, headers: &axum::http::HeaderMap) -> bool {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    match &node.secret {
        Some(secret) => {
            constant_time_eq(header(SECRET_HEADER).as_bytes(), secret.as_bytes())
                && header(CLUSTER_ID_HEADER) == node.cluster_id
        }
        // Without a secret this node never accepts cluster RPC.
        None => false,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

async fn snapshot(
    State(node): State<Arc<ClusterNode>>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> impl IntoResponse {
    Json(node.raft.install_snapshot(req).await)
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

/// Lets a leader check, before adding us, that we share the cluster secret (the auth layer
/// already did the check; reaching here means yes).
async fn hello(State(node): State<Arc<ClusterNode>>, Json(_from): Json<u64>) -> Json<String> {
    Json(format!("node {}", node.node_id))
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
