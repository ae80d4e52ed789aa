//! Management API (axum): routes per resource, bearer-token auth, JSON errors; every body it
//! answers is a typed view (`views`).

mod backends;
mod body;
mod certs;
mod domains;
pub mod errors;
mod idempotency;
mod logs;
mod paging;
pub mod server;
mod system;
#[cfg(test)]
mod tests;
pub mod views;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::cluster::{ClusterNode, WriteError};
use crate::config::HealthCheckConfig;
use crate::observability::Metrics;
use crate::proxy::DataPlane;
use crate::state::{Applied, ApplyError, Command};
use views::{ErrorBody, ErrorExtra, WriteOutcome};

#[derive(Clone)]
pub struct ApiState {
    pub node: Arc<ClusterNode>,
    pub data: Arc<DataPlane>,
    pub metrics: Arc<Metrics>,
    pub token: Option<String>,
    pub health_check: HealthCheckConfig,
    pub started: Instant,
    pub http: reqwest::Client,
    pub logs: Arc<crate::observability::log_stream::LogStream>,
}

impl ApiState {
    /// The API's state for a running node; `token` `None` or empty means no auth (loopback).
    pub fn new(
        node: Arc<ClusterNode>,
        data: Arc<DataPlane>,
        metrics: Arc<Metrics>,
        logs: Arc<crate::observability::log_stream::LogStream>,
        token: Option<String>,
        health_check: HealthCheckConfig,
    ) -> Self {
        Self {
            node,
            data,
            metrics,
            token: token.filter(|t| !t.is_empty()),
            health_check,
            started: Instant::now(),
            http: crate::health::active::client(),
            logs,
        }
    }

    /// Runs a command through Raft and maps its outcome to an API result. A request with an
    /// `Idempotency-Key` writes under that key (one write per request: a second write in the
    /// same request would get the first one's result).
    async fn write(&self, cmd: Command) -> Result<Applied, ApiError> {
        let result = match idempotency::current() {
            Some(k) => self.node.write_as(k.id, Some(k.fingerprint), cmd).await,
            None => self.node.write(cmd).await,
        };
        Ok(result??)
    }
}

pub fn router(state: ApiState) -> Router {
    use idempotency::routes;
    let authed = Router::new()
        .route(routes::DOMAINS, get(domains::list).post(domains::create))
        .route(
            routes::DOMAIN,
            get(domains::get_one)
                .put(domains::update)
                .delete(domains::delete),
        )
        .route(routes::DOMAIN_SWITCH, post(domains::switch))
        .route("/api/v1/domains/{domain}/backends", get(domains::backends))
        .route(routes::BACKENDS, get(backends::list).post(backends::create))
        .route(
            routes::BACKEND,
            get(backends::get_one)
                .put(backends::update)
                .delete(backends::delete),
        )
        .route(
            routes::BACKEND_DRAIN,
            post(backends::drain).delete(backends::undrain),
        )
        .route("/api/v1/backends/{id}/health", post(backends::probe))
        .route("/api/v1/cluster/status", get(system::cluster_status))
        .route(
            "/api/v1/cluster/members/{id}",
            axum::routing::delete(system::remove_member),
        )
        .route("/api/v1/certs", get(certs::list))
        .route("/api/v1/certs/{domain}", get(certs::get_one))
        .route(routes::CERT_RENEW, post(certs::renew))
        .route("/api/v1/logs/stream", get(logs::stream))
        .route("/api/v1/metrics", get(system::metrics))
        .route("/api/v1/stats", get(system::stats))
        .route("/api/v1/stats/series", get(system::series))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/api/v1/health", get(system::health))
        // The page itself holds no data; its API calls carry the token the user gives it.
        .route("/dashboard", get(dashboard))
        .route(
            "/",
            get(|| async { axum::response::Redirect::temporary("/dashboard") }),
        )
        .merge(authed)
        .layer(axum::extract::DefaultBodyLimit::max(errors::MAX_BODY_BYTES))
        .layer(middleware::from_fn(errors::limits_and_json_errors))
        .with_state(state)
}

async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("dashboard.html"),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such API endpoint")
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 7235 §2.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        let ok = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !ok {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid bearer token")
                .into_response();
        }
    }
    next.run(req).await
}

/// An error answer: `{"error": message}` (plus `extra`'s fields) with `status`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub extra: Option<ErrorExtra>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            extra: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn field(name: &str, problem: impl std::fmt::Display) -> Self {
        Self::bad_request(format!("field `{name}`: {problem}"))
    }
    pub fn with(mut self, extra: ErrorExtra) -> Self {
        self.extra = Some(extra);
        self
    }
    /// The JSON body this error answers with.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: &self.message,
            extra: self.extra.as_ref(),
        }
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        let status = match e {
            ApplyError::DomainExists(_)
            | ApplyError::BackendExists(_)
            | ApplyError::TooManyDomains(_)
            | ApplyError::TooManyBackends(_) => StatusCode::CONFLICT,
            ApplyError::DomainNotFound(_) | ApplyError::BackendNotFound(_) => StatusCode::NOT_FOUND,
        };
        Self::new(status, e.to_string())
    }
}

/// What a write's failure tells the client, in one place: the status, and `"outcome"` saying
/// whether the write was applied (docs/api.md, "Write answers").
impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let (status, outcome, message) = match &e {
            WriteError::NotApplied(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                WriteOutcome::NotApplied,
                format!("cannot write: {reason}"),
            ),
            WriteError::OutcomeUnknown(reason) => (
                StatusCode::GATEWAY_TIMEOUT,
                WriteOutcome::Unknown,
                format!(
                    "write outcome unknown: {reason}. It is applied at most once; retry with \
                     the same Idempotency-Key to learn the outcome"
                ),
            ),
            WriteError::NotYetVisible { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                WriteOutcome::Applied,
                format!("{e}; read it again shortly"),
            ),
            WriteError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                WriteOutcome::NotApplied,
                format!("{e}: split it into smaller changes"),
            ),
            WriteError::KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                WriteOutcome::NotApplied,
                "header `Idempotency-Key`: this key was first used for a different request \
                 (method, path or body); use a new key for a new request"
                    .to_string(),
            ),
        };
        ApiError::new(status, message).with(ErrorExtra::Outcome { outcome })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Seconds since the epoch as RFC 3339 UTC ("2031-01-01T00:00:00Z").
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
