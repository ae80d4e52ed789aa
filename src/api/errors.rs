//! One error format for every answer of the management API: `{"error": "..."}` with
//! `Content-Type: application/json`, also for what the framework answers itself (a body over
//! the limit, a method the route does not take, a path or query that does not decode) and for
//! the request limits checked here.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// Longest request target (path and query) the API takes: 414 beyond.
pub const MAX_URI_LEN: usize = 8 * 1024;
/// Most request headers: 431 beyond.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of request header names and values: 431 beyond.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body (`cert_pem` + `key_pem` of a long chain fit easily): 413 beyond.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Refuses requests over the limits, and turns any error answer that is not already JSON into
/// the API's format.
pub async fn limits_and_json_errors(req: Request, next: Next) -> Response {
    let target_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > MAX_URI_LEN {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target_len} bytes; at most {MAX_URI_LEN} are allowed"),
        )
        .into_response();
    }
    let headers = req.headers();
    if headers.len() > MAX_HEADERS {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "{} request headers; at most {MAX_HEADERS} are allowed",
                headers.len()
            ),
        )
        .into_response();
    }
    let head_bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    if head_bytes > MAX_HEAD_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers of {head_bytes} bytes; at most {MAX_HEAD_BYTES} are allowed"),
        )
        .into_response();
    }
    let resp = next.run(req).await;
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return Response::from_parts(parts, body);
    }
    // The framework's own answers are short text ("Failed to deserialize query string: ...").
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("the request body is larger than {MAX_BODY_BYTES} bytes")
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        "this endpoint does not take that method".to_string()
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, message).into_response();
    // Keep `Allow` on a 405 and the like: only the body and its type change.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
