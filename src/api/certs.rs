//! /api/v1/certs: certificates per domain (manual or ACME), expiry, ACME order status, and
//! manual renewal.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::body::off_runtime;
use super::paging::{self, List, ListQuery};
use super::views::{AcmeView, CertDetailView, CertView, Page, RenewView};
use super::{ApiError, ApiState};
use crate::proxy::tls;
use crate::state::{AcmeStatus, Command, Domain, TlsMode, EXPIRY_WARNING_DAYS};

use crate::clock::unix_secs as now_secs;

fn cert_view(d: &Domain, acme: Option<&AcmeStatus>) -> CertView {
    CertView {
        domain: d.domain.to_string(),
        tls: d.tls,
        certificate: d.cert.as_ref().map(|c| {
            let (issuer, serial) = tls::leaf_details(&c.chain_pem).unwrap_or_default();
            CertDetailView::new(c, issuer, serial, now_secs(), EXPIRY_WARNING_DAYS)
        }),
        acme: (d.tls == TlsMode::Acme).then(|| AcmeView::from(acme.cloned().unwrap_or_default())),
    }
}

pub async fn list(
    State(state): State<ApiState>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Page<CertView>>, ApiError> {
    let q = ListQuery::parse(List::Certs, &query)?;
    let s = state.node.sm.state();
    let page = off_runtime(move || {
        paging::page(
            &s.domains,
            List::Certs,
            &q,
            true,
            |d| d.tls != TlsMode::None || d.cert.is_some(),
            |d| cert_view(d, s.acme.status.get(d.domain.as_str())),
        )
    })
    .await?;
    Ok(Json(page))
}

pub async fn get_one(
    State(state): State<ApiState>,
    Path(domain): Path<String>,
) -> Result<Json<CertView>, ApiError> {
    let domain = domain.to_ascii_lowercase();
    state
        .node
        .sm
        .with_state(|s| {
            s.domains
                .get(&domain)
                .map(|d| cert_view(d, s.acme.status.get(d.domain.as_str())))
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
) -> Result<(StatusCode, Json<RenewView>), ApiError> {
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
                serde_json::to_string(&tls).unwrap_or_default()
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
pub fn renew_requested(domain: &str) -> (StatusCode, Json<RenewView>) {
    (
        StatusCode::ACCEPTED,
        Json(RenewView {
            domain: domain.to_string(),
            renew_requested: true,
        }),
    )
}
