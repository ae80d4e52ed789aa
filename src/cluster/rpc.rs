//! Cluster RPC server on `rpc_addr`: Raft messages and writes forwarded by followers.
//! Every call must carry the cluster secret and id; others are refused (403) and logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

use super::network::{CLUSTER_ID_HEADER, SECRET_HEADER};
use super::{ClusterNode, ForwardedWrite, TypeConfig};
use crate::state::Command;

pub fn router(node: Arc<ClusterNode>) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/cluster/write", post(forwarded_write))
        .route("/cluster/pre-vote", post(pre_vote))
        .route("/cluster/hello", post(hello))
        .route("/cluster/applied", post(applied))
        .route("/cluster/remove-member", post(remove_member))
        .layer(middleware::from_fn_with_state(node.clone(), authenticate))
        .with_state(node)
}

async fn authenticate(State(node): State<Arc<ClusterNode>>, req: Request, next: Next) -> Response {
    if !authorized(&node, req.headers()) {
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
/// answer says so and the follower retries).
async fn forwarded_write(
    State(node): State<Arc<ClusterNode>>,
    Json(cmd): Json<Command>,
) -> Json<ForwardedWrite> {
    Json(node.write_local(cmd).await)
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
