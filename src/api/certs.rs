//! /api/v1/certs: certificates per domain (manual or ACME), expiry, ACME order status, and
//! manual renewal.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::{rfc3339, ApiError, ApiState};
use crate::proxy::tls;
use crate::state::{AcmeStatus, Command, Domain, TlsMode, EXPIRY_WARNING_DAYS};

use crate::clock::unix_secs as now_secs;

fn ms_rfc3339(ms: Option<u64>) -> Value {
    ms.map(|ms| json!(rfc3339((ms / 1000) as i64)))
        .unwrap_or(Value::Null)
}

fn cert_json(d: &Domain, acme: Option<&AcmeStatus>) -> Value {
    let certificate = d.cert.as_ref().map(|c| {
        let days_left = (c.not_after - now_secs()).div_euclid(86_400);
        let (issuer, serial) = tls::leaf_details(&c.chain_pem).unwrap_or_default();
        json!({
            "names": c.names,
            "issuer": issuer,
            "serial": serial,
            "not_after": rfc3339(c.not_after),
            "days_left": days_left,
            "expiring_soon": days_left < EXPIRY_WARNING_DAYS,
        })
    });
    let acme = (d.tls == TlsMode::Acme).then(|| {
        let s = acme.cloned().unwrap_or_default();
        json!({
            "order_in_flight": s.in_flight.map(|(node, since)| json!({
                "node_id": node,
                "since": ms_rfc3339(Some(since)),
            })),
            "last_attempt": ms_rfc3339(s.last_attempt_unix_ms),
            "last_success": ms_rfc3339(s.last_success_unix_ms),
            "last_error": s.last_error,
            "consecutive_failures": s.consecutive_failures,
            "renew_requested": s.renew_requested,
        })
    });
    json!({
        "domain": d.domain,
        "tls": d.tls,
        "certificate": certificate,
        "acme": acme,
    })
}

pub async fn list(State(state): State<ApiState>) -> Json<Value> {
    Json(state.node.sm.with_state(|s| {
        Value::Array(
            s.domains
                .values()
                .filter(|d| d.tls != TlsMode::None || d.cert.is_some())
                .map(|d| cert_json(d, s.acme.status.get(d.domain.as_str())))
                .collect(),
        )
    }))
}

pub async fn get_one(
    State(state): State<ApiState>,
    Path(domain): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let domain = domain.to_ascii_lowercase();
    state
        .node
        .sm
        .with_state(|s| {
            s.domains
                .get(&domain)
                .map(|d| cert_json(d, s.acme.status.get(d.domain.as_str())))
        })
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("domain {domain:?} not found"),
            )
        })
}

/// Asks the leader for a new ACME certificate now; answers once the request is replicated.
pub async fn renew(
    State(state): State<ApiState>,
    Path(domain): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let domain = domain.to_ascii_lowercase();
    let tls = state
        .node
        .sm
        .with_state(|s| s.domains.get(&domain).map(|d| d.tls))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("domain {domain:?} not found"),
            )
        })?;
    if tls != TlsMode::Acme {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "domain {domain:?} has tls = {}: only tls = \"acme\" certificates are renewed \
                 by the proxy (upload a new cert_pem/key_pem with PUT /api/v1/domains/{domain})",
                json!(tls)
            ),
        ));
    }
    state
        .write(Command::RequestAcmeRenewal {
            domain: domain.clone(),
        })
        .await?;
    Ok(renew_requested(&domain))
}

/// The answer to a renewal request (also to a retry with its idempotency key).
pub fn renew_requested(domain: &str) -> (StatusCode, Json<Value>) {
    (
        StatusCode::ACCEPTED,
        Json(json!({"domain": domain, "renew_requested": true})),
    )
}
