//! Health, cluster status, metrics and stats endpoints.

use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use axum::extract::Path;
use axum::http::StatusCode;

use super::views::{ClusterStatusView, HealthView, SeriesTrack, SeriesView, StatsView};
use super::{ApiError, ApiState};
use crate::cluster::membership::RemoveRefused;
use crate::cluster::RemoveError;
use crate::observability::traffic;

pub async fn health(State(state): State<ApiState>) -> Json<HealthView> {
    Json(HealthView::from(&state.node.status()))
}

pub async fn cluster_status(State(state): State<ApiState>) -> Json<ClusterStatusView> {
    Json(state.node.status().into())
}

pub async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    refresh_gauges(&state);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

pub async fn stats(State(state): State<ApiState>) -> Json<StatsView> {
    refresh_gauges(&state);
    let by_code = state.metrics.requests_by_code();
    let total: u64 = by_code.iter().map(|(_, n)| n).sum();
    let errors: u64 = by_code
        .iter()
        .filter(|(c, _)| c.starts_with('5'))
        .map(|(_, n)| n)
        .sum();
    Json(StatsView {
        uptime_secs: state.started.elapsed().as_secs(),
        rates: state.metrics.rates(std::time::Duration::from_secs(10)),
        requests_total: total,
        responses_5xx: errors,
        requests_by_code: by_code.into_iter().collect(),
        requests_in_flight: state.data.requests_in_flight.load(Ordering::Relaxed).max(0),
        routes: state.data.routes.load().len(),
    })
}

/// `GET /api/v1/stats/series`: the last 15 minutes of the per-domain and per-backend series
/// this node keeps (one point per 5 s), for the dashboard's charts: the busiest `limit`
/// (default 6, at most 50) of each, or one named by `domain=` / `backend=`.
pub async fn series(
    State(state): State<ApiState>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<SeriesView>, ApiError> {
    let (mut limit, mut domain, mut backend) = (6usize, None, None);
    for (key, value) in query {
        match key.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=50).contains(n))
                    .ok_or_else(|| ApiError::field("limit", "must be an integer in 1..=50"))?
            }
            "domain" => domain = Some(value),
            "backend" => backend = Some(value),
            other => {
                return Err(ApiError::bad_request(format!(
                    "query parameter `{other}` is not known here (allowed: limit, domain, backend)"
                )))
            }
        }
    }
    let history = &state.metrics.history;
    let pick = |kind, only: &Option<String>, other_given: bool| {
        if other_given && only.is_none() {
            return Vec::new();
        }
        history
            .busiest(kind, limit, only.as_deref())
            .into_iter()
            .map(|(name, points)| SeriesTrack { name, points })
            .collect()
    };
    Ok(Json(SeriesView {
        step_secs: traffic::STEP_SECS,
        domains: pick(traffic::Kind::Domain, &domain, backend.is_some()),
        backends: pick(traffic::Kind::Backend, &backend, domain.is_some()),
    }))
}

fn refresh_gauges(state: &ApiState) {
    let s = state.node.status();
    let m = &state.metrics;
    m.raft_term.set(s.term as i64);
    m.raft_last_applied.set(s.last_applied as i64);
    m.raft_is_leader
        .set(i64::from(s.leader_id == Some(s.node_id)));
    m.raft_quorum.set(i64::from(s.quorum));
    m.routes.set(state.data.routes.load().len() as i64);
    m.requests_in_flight
        .set(state.data.requests_in_flight.load(Ordering::Relaxed).max(0));
}

pub async fn remove_member(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "member id {id:?} is not a node id (a positive integer)"
        ))
    })?;
    match state.node.remove_member(id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(RemoveError::Refused(r @ RemoveRefused::NotAMember(_))) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, r.to_string()))
        }
        Err(RemoveError::Refused(r)) => Err(ApiError::new(StatusCode::CONFLICT, r.to_string())),
        Err(RemoveError::Unavailable(reason)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot change membership: {reason}"),
        )),
    }
}
