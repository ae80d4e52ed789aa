//! `Idempotency-Key` on writes (draft-ietf-httpapi-idempotency-key-header): a retry with the
//! same key returns the first result instead of applying the write again, on any node and
//! across leader changes, because the key is the write's id in the replicated write table
//! (`cluster::writes`). The first request's method, path and body are kept as a digest: the
//! same key with another request is refused (422).
//!
//! The layer validates the key, answers a retry whose result this node has already applied,
//! and otherwise runs the handler with the key in a task-local, where `ApiState::write` picks
//! it up (so the handlers need not carry it).

use axum::body::Body;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{backends, certs, domains, ApiError, ApiState};
use crate::cluster::writes::{Known, WriteId};
use crate::state::ApplyResult;

pub const HEADER: &str = "idempotency-key";
/// Longest key accepted (a UUID is 36 characters).
pub const MAX_KEY_LEN: usize = 255;
/// Largest body read to digest it; the handlers' own limit (axum's default) is the same.
const MAX_BODY: usize = super::errors::MAX_BODY_BYTES;

/// Paths of the routes that write through Raft: the router and the replay use the same text.
pub mod routes {
    pub const DOMAINS: &str = "/api/v1/domains";
    pub const DOMAIN: &str = "/api/v1/domains/{domain}";
    pub const DOMAIN_SWITCH: &str = "/api/v1/domains/{domain}/switch";
    pub const BACKENDS: &str = "/api/v1/backends";
    pub const BACKEND: &str = "/api/v1/backends/{id}";
    pub const BACKEND_DRAIN: &str = "/api/v1/backends/{id}/drain";
    pub const CERT_RENEW: &str = "/api/v1/certs/{domain}/renew";
}

/// The key of the request being handled, and its digest.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub id: WriteId,
    pub fingerprint: String,
}

tokio::task_local! {
    static KEYED: Keyed;
}

/// The idempotency key of the request this task is handling, if it has one.
pub fn current() -> Option<Keyed> {
    KEYED.try_with(Keyed::clone).ok()
}

/// Checks a key: 1 to [`MAX_KEY_LEN`] visible ASCII characters.
pub fn validate_key(raw: &[u8]) -> Result<&str, String> {
    if raw.is_empty() {
        return Err("must not be empty".into());
    }
    if raw.len() > MAX_KEY_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_KEY_LEN} are allowed",
            raw.len()
        ));
    }
    if let Some(b) = raw.iter().find(|b| !(0x21..=0x7e).contains(*b)) {
        return Err(format!(
            "may only contain visible ASCII characters (found byte 0x{b:02x})"
        ));
    }
    // Visible ASCII is UTF-8.
    std::str::from_utf8(raw).map_err(|e| e.to_string())
}

/// Digest of what makes a request the same request: method, path and body bytes.
pub fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(method.as_str().as_bytes());
    ctx.update(b" ");
    ctx.update(path.as_bytes());
    ctx.update(b"\n");
    ctx.update(body);
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn key_error(problem: impl std::fmt::Display) -> Response {
    ApiError::bad_request(format!("header `Idempotency-Key`: {problem}")).into_response()
}

pub async fn layer(
    State(state): State<ApiState>,
    route: MatchedPath,
    params: RawPathParams,
    req: Request,
    next: Next,
) -> Response {
    let Some(raw) = req.headers().get(HEADER) else {
        return next.run(req).await;
    };
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let key = match validate_key(raw.as_bytes()) {
        Ok(k) => k.to_string(),
        Err(problem) => return key_error(problem),
    };
    if req.headers().get_all(HEADER).iter().count() > 1 {
        return key_error("must be given once");
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_BODY} bytes"),
            )
            .into_response()
        }
    };
    // Hashing a large body is CPU work: off the control plane's runtime.
    let (method, path) = (parts.method.clone(), parts.uri.path().to_string());
    let hashed = bytes.clone();
    let print = match super::body::off_runtime(move || fingerprint(&method, &path, &hashed)).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let keyed = Keyed {
        id: WriteId::Key(key),
        fingerprint: print,
    };
    match state.node.known_write(&keyed.id, Some(&keyed.fingerprint)) {
        Known::Same(result) => {
            let params: Vec<(String, String)> = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            replay(&state, &parts.method, route.as_str(), &params, result).await
        }
        Known::OtherRequest => {
            ApiError::from(crate::cluster::WriteError::KeyReused).into_response()
        }
        Known::No => {
            let req = Request::from_parts(parts, Body::from(bytes));
            KEYED.scope(keyed, next.run(req)).await
        }
    }
}

/// The answer the first request got, rebuilt from its recorded result by the same code that
/// answered it (live fields of a backend, such as health and counters, are current).
async fn replay(
    state: &ApiState,
    method: &Method,
    route: &str,
    params: &[(String, String)],
    result: ApplyResult,
) -> Response {
    use routes::*;
    let applied = match result {
        Ok(a) => a,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_ascii_lowercase())
            .unwrap_or_default()
    };
    let answer = match (method.as_str(), route) {
        ("POST", DOMAINS) => domains::created(applied),
        ("PUT", DOMAIN) => domains::updated(applied),
        ("POST", DOMAIN_SWITCH) => domains::switched(applied),
        ("DELETE", DOMAIN) | ("DELETE", BACKEND) => Ok(StatusCode::NO_CONTENT.into_response()),
        ("POST", BACKENDS) => backends::created(state, applied).await,
        ("PUT", BACKEND) => backends::updated(state, applied).await,
        ("POST", BACKEND_DRAIN) | ("DELETE", BACKEND_DRAIN) => backends::drained(state, applied),
        ("POST", CERT_RENEW) => Ok(certs::renew_requested(&param("domain")).into_response()),
        // The digest covers method and path, so a key recorded for a write only matches here
        // on that write's route.
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no recorded answer for {method} {route}"),
        )),
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert_eq!(
            validate_key(b"8e03978e-40d5-43e8-bc93-6894a57f9324"),
            Ok("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        assert_eq!(validate_key(b"\"quoted\""), Ok("\"quoted\""));
        assert!(validate_key(b"").is_err());
        assert!(validate_key(b"has space").is_err());
        assert!(validate_key(b"tab\there").is_err());
        assert!(validate_key("caf\u{e9}".as_bytes()).is_err());
        assert!(validate_key(&[b'k'; MAX_KEY_LEN]).is_ok());
        assert!(validate_key(&[b'k'; MAX_KEY_LEN + 1]).is_err());
    }

    #[test]
    fn the_digest_covers_method_path_and_body() {
        let base = fingerprint(&Method::POST, "/api/v1/domains", b"{\"a\":1}");
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            fingerprint(&Method::POST, "/api/v1/domains", b"{\"a\":1}")
        );
        assert_ne!(
            base,
            fingerprint(&Method::PUT, "/api/v1/domains", b"{\"a\":1}")
        );
        assert_ne!(
            base,
            fingerprint(&Method::POST, "/api/v1/backends", b"{\"a\":1}")
        );
        assert_ne!(
            base,
            fingerprint(&Method::POST, "/api/v1/domains", b"{\"a\":2}")
        );
    }
}
