//! Every answer that refuses a request is in the API's error shape, `{"errors": [{"path", "message"}]}`, including
//! the ones the framework makes itself (405, 413, a path that does not decode) and a body that is not JSON by its
//! content type (415).

use super::validate::FieldError;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Largest request body read (the same limit as `DefaultBodyLimit` in the router).
pub const MAX_BODY: usize = 64 * 1024;

/// The error shape, for any status.
pub fn errors_response(status: StatusCode, errors: &[FieldError]) -> Response {
    let body = json!({"errors": errors.iter().map(|e| json!({"path": e.path, "message": e.message})).collect::<Vec<_>>()});
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A request with a body must say it is JSON (`application/json`, parameters allowed); the framework's own
/// rejections are rewritten into the error shape, keeping their status and headers (`Allow` on a 405).
pub async fn in_error_shape(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    if has_body(request.headers()) && !is_json(request.headers()) {
        return errors_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &[FieldError::new(
                "content-type",
                "the body must be JSON, sent with Content-Type: application/json",
            )],
        );
    }
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let message = match status {
        StatusCode::BAD_REQUEST => {
            "the request is malformed (a path that does not decode as UTF-8, or the like)"
                .to_string()
        }
        StatusCode::NOT_FOUND => "no such resource".to_string(),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = response
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            format!("{method} is not allowed on this resource (allowed: {allowed})")
        }
        StatusCode::PAYLOAD_TOO_LARGE => format!("the body is larger than {MAX_BODY} bytes"),
        other => other
            .canonical_reason()
            .unwrap_or("the request was refused")
            .to_string(),
    };
    let (mut parts, _) = response.into_parts();
    let shaped = errors_response(status, &[FieldError::new("", message)]);
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in shaped.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, shaped.into_body())
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// `application/json`, or `application/json; charset=utf-8` and the like.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}
