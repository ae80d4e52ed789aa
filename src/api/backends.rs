//! /api/v1/backends: the backend registry, drain and on-demand health probes.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::body::{off_runtime, Body};
use super::domains::unexpected;
use super::paging::{self, List, ListQuery};
use super::views::{BackendLive, BackendView, Page, ProbeView, Verdict};
use super::{ApiError, ApiState};
use crate::health::active;
use crate::live::health::ActiveState;
use crate::live::{health, now_ms, BackendRuntime};
use crate::schema::{self, BackendId, BackendTls, HealthPath, HostPort, SendProxyProtocol, Tag};
use crate::state::{Applied, Backend, BackendPatch, Command};

/// Each live peer's verdicts in gossip (backend key -> value), read once per API answer.
pub struct PeerVerdicts(Vec<(u64, std::collections::HashMap<String, String>)>);

impl PeerVerdicts {
    pub fn read(state: &ApiState) -> Self {
        Self(
            state
                .node
                .gossip
                .peer_entries(crate::gossip::KEY_HEALTH_PREFIX)
                .into_iter()
                .map(|(peer, entries)| (peer, entries.into_iter().collect()))
                .collect(),
        )
    }
}

pub fn backend_view(b: &Backend, state: &ApiState) -> BackendView {
    backend_view_with(b, state, &PeerVerdicts::read(state))
}

/// A backend as the API shows it. `peers` comes from [`PeerVerdicts::read`], so a list reads
/// gossip once, not once per backend.
pub fn backend_view_with(b: &Backend, state: &ApiState, peers: &PeerVerdicts) -> BackendView {
    // Read paths never create registry entries: a backend no table has compiled yet shows
    // nothing counted, health unknown.
    let rt = runtime(state, &b.id);
    // Per node: this node's own verdict plus what every live peer publishes in gossip. Peers
    // publish only failures, so for a peer "up" means "reported neither down nor ejected".
    let now_unix = crate::clock::coarse_unix_ms();
    let verdict = |v: Option<health::Verdict>| match v {
        None => Verdict::Up,
        Some(health::Verdict::Down) => Verdict::Down,
        Some(health::Verdict::EjectedUntil(_)) => Verdict::Ejected,
    };
    let mut nodes = BTreeMap::new();
    nodes.insert(
        state.node.node_id,
        verdict(rt.health.local_verdict(now_unix)),
    );
    let key = crate::gossip::backend_key(&b.id);
    for (peer, entries) in &peers.0 {
        let v = entries
            .get(&key)
            .map(|value| crate::health::shared::decode(value, now_unix))
            // An ejection already over, not yet withdrawn by its node.
            .filter(|v| !matches!(v, health::Verdict::EjectedUntil(t) if *t <= now_unix));
        nodes.insert(*peer, verdict(v));
    }
    BackendView::new(
        b,
        BackendLive {
            resolution: state.data.live.addrs.resolution(&b.address),
            healthy: rt.health.merged_usable(now_ms()),
            in_flight: rt.in_flight.load(Ordering::Relaxed),
            requests: rt.requests.load(Ordering::Relaxed),
            connect_failures: rt.failures.load(Ordering::Relaxed),
            health: rt.health.report(),
            nodes,
        },
    )
}

/// The backend's live runtime, or a fresh one (nothing counted, health unknown) for a backend
/// no table has compiled yet.
fn runtime(state: &ApiState, id: &str) -> Arc<BackendRuntime> {
    state
        .data
        .live
        .backends
        .get(id)
        .unwrap_or_else(|| Arc::new(BackendRuntime::detached(id)))
}

/// The backends whose view says `healthy: false` (not usable by the cluster's view), for the
/// lists' `healthy` filter. A backend no table has compiled yet has no runtime: it shows
/// `healthy: true`, and is not in this set.
pub fn down_backends(state: &ApiState) -> HashSet<String> {
    let now = now_ms();
    state
        .data
        .live
        .backends
        .ids_where(|rt| !rt.health.merged_usable(now))
}

fn lookup(state: &ApiState, id: &str) -> Result<Backend, ApiError> {
    state
        .node
        .sm
        .with_state(|s| s.backends.get(id).cloned())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("backend {id:?} not found")))
}

fn parse_tags(body: &mut Body) -> Result<Option<Vec<Tag>>, ApiError> {
    body.opt_list::<Tag>("tags", schema::MAX_TAGS_PER_BACKEND)?
        .map(|tags| schema::tag_list(tags).map_err(|e| ApiError::field("tags", e)))
        .transpose()
}

/// Read-only status fields clients may echo back from a GET.
fn ignore_status_fields(body: &mut Body) {
    for f in [
        "healthy",
        "draining",
        "in_flight",
        "requests",
        "connect_failures",
        "resolved_addrs",
        "resolved_unix_ms",
        "resolve_error",
    ] {
        body.ignore(f);
    }
}

pub async fn list(
    State(state): State<ApiState>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Page<BackendView>>, ApiError> {
    let q = ListQuery::parse(List::Backends, &query)?;
    let peers = PeerVerdicts::read(&state);
    // A copy of the state is O(1): the walk holds up no write, and runs off the async runtime.
    let s = state.node.sm.state();
    let page = off_runtime(move || {
        let down = q.healthy.map(|_| down_backends(&state));
        let keep = |b: &Backend| {
            q.tag.as_ref().is_none_or(|t| b.has_tag(t))
                && q.healthy.is_none_or(|want| {
                    down.as_ref().is_some_and(|d| d.contains(b.id.as_str())) != want
                })
        };
        paging::page(&s.backends, List::Backends, &q, false, keep, |b| {
            backend_view_with(b, &state, &peers)
        })
    })
    .await?;
    Ok(Json(page))
}

/// `address`: `host:port`, or with `https://` / `http://` (TLS to the backend on / off).
fn parse_address(raw: String) -> Result<(HostPort, Option<bool>), ApiError> {
    schema::backend_address(&raw).map_err(|e| ApiError::field("address", e))
}

fn tls_with_http() -> ApiError {
    ApiError::field(
        "tls",
        "given with an http:// address (use https:// or no scheme)",
    )
}

pub async fn get_one(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<BackendView>, ApiError> {
    Ok(Json(backend_view(&lookup(&state, &id)?, &state)))
}

pub async fn create(
    State(state): State<ApiState>,
    bytes: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let mut body = Body::read(bytes).await?;
    let id: BackendId = body.req("id")?;
    let (address, scheme) = parse_address(body.req_str("address")?)?;
    let tags = parse_tags(&mut body)?.unwrap_or_default();
    let health_check_path = body.nullable::<HealthPath>("health_check_path")?.flatten();
    let send_proxy_protocol = body
        .nullable::<SendProxyProtocol>("send_proxy_protocol")?
        .flatten();
    let tls = match (body.nullable_json::<BackendTls>("tls")?.flatten(), scheme) {
        (Some(_), Some(false)) => return Err(tls_with_http()),
        (Some(tls), _) => Some(Box::new(tls)),
        (None, Some(true)) => Some(Box::default()),
        (None, _) => None,
    };
    ignore_status_fields(&mut body);
    body.finish()?;
    let b = Backend {
        id,
        address,
        tags,
        health_check_path,
        draining: false,
        send_proxy_protocol,
        tls,
    };
    created(&state, state.write(Command::CreateBackend(b)).await?).await
}

/// The answer to a created backend (also to a retry with its idempotency key).
pub async fn created(state: &ApiState, applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::Backend(b) => {
            await_first_resolution(state, &b.address).await;
            Ok((StatusCode::CREATED, Json(backend_view(&b, state))).into_response())
        }
        other => Err(unexpected(other)),
    }
}

pub async fn update(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let current = lookup(&state, &id)?;
    let mut body = Body::read(bytes).await?;
    if let Some(given) = body.opt_str("id")? {
        if current.id != given {
            return Err(ApiError::field(
                "id",
                "cannot be changed (delete and create instead)",
            ));
        }
    }
    let (address, scheme) = match body.opt_str("address")? {
        Some(raw) => {
            let (a, scheme) = parse_address(raw)?;
            (Some(a), scheme)
        }
        None => (None, None),
    };
    let tags = parse_tags(&mut body)?;
    let health_check_path = body.nullable::<HealthPath>("health_check_path")?;
    let send_proxy_protocol = body.nullable::<SendProxyProtocol>("send_proxy_protocol")?;
    // `https://` turns TLS on (with defaults, unless it is on already or `tls` says how);
    // `http://` turns it off.
    let tls = match (body.nullable_json::<BackendTls>("tls")?, scheme) {
        (Some(Some(_)), Some(false)) => return Err(tls_with_http()),
        (Some(tls), _) => Some(tls.map(Box::new)),
        (None, Some(true)) if current.tls.is_none() => Some(Some(Box::default())),
        (None, Some(false)) => Some(None),
        (None, _) => None,
    };
    ignore_status_fields(&mut body);
    body.finish()?;
    let patch = BackendPatch {
        address,
        tags,
        health_check_path,
        send_proxy_protocol,
        tls,
    };
    let applied = state
        .write(Command::UpdateBackend {
            id: current.id,
            patch,
        })
        .await?;
    updated(&state, applied).await
}

/// The answer to an updated backend (also to a retry with its idempotency key).
pub async fn updated(state: &ApiState, applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::Backend(b) => {
            await_first_resolution(state, &b.address).await;
            Ok(Json(backend_view(&b, state)).into_response())
        }
        other => Err(unexpected(other)),
    }
}

/// A backend named by a host name gets traffic once the name has resolved, moments after the
/// write is applied. Waiting for that (briefly) lets a client that routes right after its
/// write succeed on this node; the answer shows the result, or the resolve error.
async fn await_first_resolution(state: &ApiState, address: &str) {
    let deadline = tokio::time::Instant::now() + FIRST_RESOLUTION_WAIT;
    let addrs = &state.data.live.addrs;
    while !addrs.in_table(address) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Longest a write waits for its backend's name to resolve the first time.
const FIRST_RESOLUTION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn delete(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let current = lookup(&state, &id)?;
    state.write(Command::DeleteBackend(current.id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_draining(state: ApiState, id: String, draining: bool) -> Result<Response, ApiError> {
    let current = lookup(&state, &id)?;
    let applied = state
        .write(Command::SetDraining {
            id: current.id,
            draining,
        })
        .await?;
    drained(&state, applied)
}

/// The answer to a drain or undrain (also to a retry with its idempotency key).
pub fn drained(state: &ApiState, applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::Backend(b) => Ok(Json(backend_view(&b, state)).into_response()),
        other => Err(unexpected(other)),
    }
}

pub async fn drain(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    set_draining(state, id, true).await
}

pub async fn undrain(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    set_draining(state, id, false).await
}

/// Probes the backend now from this node (HTTP GET on its health path, or a TCP connect when
/// the path is ""), records the result in its health state and returns it.
pub async fn probe(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ProbeView>, ApiError> {
    let b = lookup(&state, &id)?;
    let target = active::ProbeTarget::of(&b);
    let result =
        active::check_backend(&state.data.live, &state.http, &state.health_check, &target).await;
    let active = state
        .data
        .live
        .backends
        .get(&b.id)
        .map(|rt| rt.health.active())
        .unwrap_or(ActiveState::Unknown);
    Ok(Json(ProbeView {
        id: b.id.to_string(),
        healthy: result.healthy,
        detail: result.detail,
        latency_ms: result.latency_ms,
        state: active,
    }))
}
