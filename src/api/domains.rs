//! /api/v1/domains: virtual hosts, their certificates and a/b switching.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::backends::{backend_view_with, down_backends, PeerVerdicts};
use super::body::{off_runtime, Body};
use super::paging::{self, List, ListQuery};
use super::views::{BackendView, DomainView, ErrorExtra, Page, SwitchedView};
use super::{ApiError, ApiState};
use crate::live::now_ms;
use crate::proxy::tls;
use crate::schema::{DomainName, FieldRule, Tag};
use crate::state::{Applied, CertPair, Command, Domain, DomainPatch, TlsMode};

/// Reads `cert_pem` + `key_pem` (both or neither) and validates them as a matching pair.
async fn parse_cert(body: &mut Body) -> Result<Option<CertPair>, ApiError> {
    let cert = body.opt_str("cert_pem")?;
    let key = body.opt_str("key_pem")?;
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(ApiError::field("key_pem", "is required with cert_pem")),
        (None, Some(_)) => Err(ApiError::field("cert_pem", "is required with key_pem")),
        // PEM and X.509 parsing of a long chain is CPU work: off the control plane's runtime.
        (Some(c), Some(k)) => super::body::off_runtime(move || tls::cert_pair(&c, &k))
            .await?
            .map(Some)
            .map_err(|e| match e {
                tls::CertError::NoKey
                | tls::CertError::KeyPem(_)
                | tls::CertError::Key(_)
                | tls::CertError::Mismatch => ApiError::field("key_pem", e),
                tls::CertError::NoCertificate
                | tls::CertError::ChainPem(_)
                | tls::CertError::X509(_) => ApiError::field("cert_pem", e),
            }),
    }
}

/// ACME here is HTTP-01, which cannot issue wildcard certificates.
fn acme_possible(domain: &str, tls: TlsMode) -> Result<(), ApiError> {
    if tls == TlsMode::Acme && domain.starts_with("*.") {
        return Err(ApiError::field(
            "tls",
            format!("\"acme\" cannot issue a certificate for the wildcard {domain:?} (HTTP-01 validation); use tls = \"manual\" with your own certificate"),
        ));
    }
    Ok(())
}

fn lookup(state: &ApiState, name: &str) -> Result<Domain, ApiError> {
    let name = name.to_ascii_lowercase();
    state
        .node
        .sm
        .with_state(|s| s.domains.get(&name).cloned())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("domain {name:?} not found")))
}

pub async fn list(
    State(state): State<ApiState>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Page<DomainView>>, ApiError> {
    let q = ListQuery::parse(List::Domains, &query)?;
    // A copy of the state is O(1): the walk (a pass over every domain when filtering) holds
    // up no write, and runs off the async runtime.
    let s = state.node.sm.state();
    let table = state.data.routes.load_full();
    let page = off_runtime(move || {
        // A domain is healthy when its active tag's pool has a backend to pick.
        let serving = q.healthy.map(|_| table.serving_tags());
        let keep = |d: &Domain| {
            q.tag.as_ref().is_none_or(|t| d.enabled_backends_tag == *t)
                && q.healthy.is_none_or(|want| {
                    serving
                        .as_ref()
                        .is_some_and(|s| s.contains(d.enabled_backends_tag.as_str()))
                        == want
                })
        };
        paging::page(&s.domains, List::Domains, &q, false, keep, |d| {
            DomainView::from(d)
        })
    })
    .await?;
    Ok(Json(page))
}

pub async fn get_one(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<DomainView>, ApiError> {
    Ok(Json(DomainView::from(&lookup(&state, &name)?)))
}

pub async fn create(
    State(state): State<ApiState>,
    bytes: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let mut body = Body::read(bytes).await?;
    let domain: DomainName = body.req("domain")?;
    let tag: Tag = body.req("enabled_backends_tag")?;
    let http_to_https = body.opt_bool("http_to_https")?.unwrap_or(false);
    let access_log = body.opt_bool("access_log")?.unwrap_or(true);
    let access_log_query = body.opt_bool("access_log_query")?.unwrap_or(true);
    let tls_mode = body.opt::<TlsMode>("tls")?;
    let cert = parse_cert(&mut body).await?;
    body.ignore("certificate");
    body.finish()?;
    let tls_mode = tls_mode.unwrap_or(if cert.is_some() {
        TlsMode::Manual
    } else {
        TlsMode::None
    });
    if tls_mode == TlsMode::Manual && cert.is_none() {
        return Err(ApiError::field(
            "cert_pem",
            "is required with tls = \"manual\" (with key_pem)",
        ));
    }
    acme_possible(&domain, tls_mode)?;
    let d = Domain {
        domain,
        enabled_backends_tag: tag,
        http_to_https,
        tls: tls_mode,
        cert,
        access_log,
        access_log_query,
    };
    created(state.write(Command::CreateDomain(d)).await?)
}

/// The answer to a created domain (also to a retry with its idempotency key).
pub fn created(applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::Domain(d) => Ok((StatusCode::CREATED, Json(DomainView::from(&d))).into_response()),
        other => Err(unexpected(other)),
    }
}

pub async fn update(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let current = lookup(&state, &name)?;
    let mut body = Body::read(bytes).await?;
    if let Some(d) = body.opt_str("domain")? {
        if DomainName::parse(&d).ok().as_ref() != Some(&current.domain) {
            return Err(ApiError::field(
                "domain",
                "cannot be changed (delete and create instead)",
            ));
        }
    }
    let tag = body.opt::<Tag>("enabled_backends_tag")?;
    let http_to_https = body.opt_bool("http_to_https")?;
    let access_log = body.opt_bool("access_log")?;
    let access_log_query = body.opt_bool("access_log_query")?;
    let tls_mode = body.opt::<TlsMode>("tls")?;
    let cert = parse_cert(&mut body).await?;
    body.ignore("certificate");
    body.finish()?;
    let final_tls = tls_mode.unwrap_or(current.tls);
    acme_possible(&current.domain, final_tls)?;
    if final_tls == TlsMode::Manual && cert.is_none() && current.cert.is_none() {
        return Err(ApiError::field(
            "cert_pem",
            "is required with tls = \"manual\" (with key_pem)",
        ));
    }
    let patch = DomainPatch {
        enabled_backends_tag: tag,
        http_to_https,
        tls: tls_mode,
        cert: cert.map(Some),
        access_log,
        access_log_query,
    };
    updated(
        state
            .write(Command::UpdateDomain {
                domain: current.domain,
                patch,
            })
            .await?,
    )
}

/// The answer to an updated domain (also to a retry with its idempotency key).
pub fn updated(applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::Domain(d) => Ok(Json(DomainView::from(&d)).into_response()),
        other => Err(unexpected(other)),
    }
}

pub async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let current = lookup(&state, &name)?;
    state.write(Command::DeleteDomain(current.domain)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn switch(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let current = lookup(&state, &name)?;
    let mut body = Body::read(bytes).await?;
    let tag = body.opt::<Tag>("tag")?;
    let force = body.opt_bool("force")?.unwrap_or(false);
    body.finish()?;
    let target = match tag {
        Some(t) => t,
        None => match current.enabled_backends_tag.as_str() {
            "a" | "b" => Tag::parse(if current.enabled_backends_tag == "a" {
                "b"
            } else {
                "a"
            })
            .map_err(|e| ApiError::field("tag", e))?,
            other => {
                return Err(ApiError::field(
                    "tag",
                    format!(
                    "is required: the current tag {other:?} has no a/b counterpart to toggle to"
                ),
                ))
            }
        },
    };
    if !force {
        // Refuse to send the whole domain to a pool that cannot serve it.
        let (usable, unusable) = state.node.sm.with_state(|s| {
            let mut usable = 0;
            let mut unusable = Vec::new();
            for b in s.backends_with_tag(&target) {
                // Not compiled into a table yet: nothing is known against it.
                let healthy = state
                    .data
                    .live
                    .backends
                    .get(&b.id)
                    .is_none_or(|rt| rt.health.merged_usable(now_ms()));
                if healthy && !b.draining {
                    usable += 1;
                } else {
                    unusable.push(format!(
                        "{}{}",
                        b.id,
                        if b.draining {
                            " (draining)"
                        } else {
                            " (unhealthy)"
                        }
                    ));
                }
            }
            (usable, unusable)
        });
        if usable == 0 {
            let detail = if unusable.is_empty() {
                "no backend carries this tag".to_string()
            } else {
                format!("unhealthy or draining: {}", unusable.join(", "))
            };
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "refusing to switch {} to tag {target:?}: no healthy backend ({detail}); pass \"force\": true to switch anyway",
                    current.domain
                ),
            )
            .with(ErrorExtra::UnhealthyBackends {
                unhealthy_backends: unusable,
            }));
        }
    }
    switched(
        state
            .write(Command::SwitchTag {
                domain: current.domain,
                tag: target,
            })
            .await?,
    )
}

/// The answer to a switch (also to a retry with its idempotency key).
pub fn switched(applied: Applied) -> Result<Response, ApiError> {
    match applied {
        Applied::DomainSwitched {
            domain,
            previous_tag,
        } => Ok(Json(SwitchedView {
            domain: DomainView::from(&domain),
            previous_tag: previous_tag.to_string(),
        })
        .into_response()),
        other => Err(unexpected(other)),
    }
}

pub async fn backends(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Page<BackendView>>, ApiError> {
    let current = lookup(&state, &name)?;
    let q = ListQuery::parse(List::DomainBackends, &query)?;
    let peers = PeerVerdicts::read(&state);
    let s = state.node.sm.state();
    let page = off_runtime(move || {
        let tag = current.enabled_backends_tag;
        let down = q.healthy.map(|_| down_backends(&state));
        let keep = |b: &crate::state::Backend| {
            b.has_tag(&tag)
                && q.healthy.is_none_or(|want| {
                    down.as_ref().is_some_and(|d| d.contains(b.id.as_str())) != want
                })
        };
        paging::page(&s.backends, List::DomainBackends, &q, true, keep, |b| {
            backend_view_with(b, &state, &peers)
        })
    })
    .await?;
    Ok(Json(page))
}

pub fn unexpected(a: Applied) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("unexpected apply result {a:?}"),
    )
}
