//! The health check and the database guard: `GET /healthz` says ok or not, from a real query (and, on SQLite,
//! whether the file is still the one opened); every API request first checks the SQLite file, so nothing is
//! written into a deleted file.

use super::log;
use super::rejections::errors_response;
use super::store::Store;
use super::validate::FieldError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the health check and the guard need of the application (the API's `App`).
pub trait HasStore: Send + Sync + 'static {
    fn store(&self) -> &Store;
}

/// The health check's own bound, beyond the pool's acquire and statement timeouts.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(1800);

/// The last state the health check logged, so that a failing database is logged when it fails and when it
/// comes back, not at every probe.
static HEALTHY: AtomicBool = AtomicBool::new(true);

/// `GET /healthz`: 200 `{"status": "ok"}` or 503 `{"status": "unavailable"}`. No token; nothing else said.
pub async fn healthz<A: HasStore>(State(app): State<Arc<A>>) -> Response {
    let failure = match tokio::time::timeout(HEALTH_TIMEOUT, app.store().check()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!(
            "no answer within {} ms",
            HEALTH_TIMEOUT.as_millis()
        )),
    };
    let healthy = failure.is_none();
    if HEALTHY.swap(healthy, Ordering::Relaxed) != healthy {
        match &failure {
            Some(why) => log(&format!("health check failed: database unavailable: {why}")),
            None => log("health check passes again: the database answers"),
        }
    }
    let (status, body) = if healthy {
        (StatusCode::OK, r#"{"status":"ok"}"#)
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"unavailable"}"#,
        )
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Before any request that reads or writes the database: the SQLite file must still be the one opened.
pub async fn database_guard<A: HasStore>(
    State(app): State<Arc<A>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let static_asset = path == "/" || path.starts_with("/dashboard.") || path == "/healthz";
    if !static_asset {
        if let Err(e) = app.store().check_file() {
            log(&format!("database unavailable: {e}"));
            return unavailable();
        }
    }
    next.run(request).await
}

/// 503 in the error shape, with a hint to retry.
pub fn unavailable() -> Response {
    let mut response = errors_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &[FieldError::new(
            "",
            "the database is unavailable; retry later",
        )],
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    response
}
