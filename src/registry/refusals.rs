//! A trace of what the registry refused: every refused request gets a log line (method, path, status, why, and
//! who when the token is valid), and every refused write by a known caller an audit row, so an admin probing
//! another organisation, or a script sending bad registrations, shows up. Never a token or a key: the line holds
//! the path without its query, and the reason the answer gave. Unauthenticated refusals are logged, not stored,
//! so that no anonymous client can fill the database. Feed pulls are logged when the revision served changes.

use super::auth::{Caller, Verifier};
use super::store::{Audit, Store};
use super::{log, now_ms};
use axum::body::Body;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Error answers are small (bounded by the API); a larger one is logged without its reason.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// Longest path written to a log line or an audit row, in characters.
const MAX_LOGGED_PATH: usize = 200;

/// What this layer needs of the application (the API's `App`).
pub trait Refusals: Send + Sync + 'static {
    fn store(&self) -> &Store;
    fn verifier(&self) -> &Verifier;
}

/// Logs each refused or failed request, and audits refused writes by callers whose token is valid.
pub async fn log_and_audit<A: Refusals>(
    State(app): State<Arc<A>>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path: String = request.uri().path().chars().take(MAX_LOGGED_PATH).collect();
    let authorization = request.headers().get(header::AUTHORIZATION).cloned();
    let response = next.run(request).await;
    let status = response.status();
    // Writes over the organisation's rate are logged by the limit itself (write_limit.rs), a line per 10 s, and
    // never audited: each would cost the database the write the limit spared it.
    if !(status.is_client_error() || status.is_server_error())
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        return response;
    }
    // Verified again only for refusals: the handler's own verification is not shared with this layer.
    let caller = authorization.and_then(|value| app.verifier().caller(Some(value.as_bytes())).ok());
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let reason = reason_of(status, &bytes);
    let by = caller.as_ref().map_or(String::new(), |c| {
        format!(" by {:?} ({})", c.sub, c.role.as_str())
    });
    let verb = if status.is_server_error() {
        "failed"
    } else {
        "refused"
    };
    log(&format!(
        "{verb} {method} {path:?}: {} {reason:?}{by}",
        status.as_u16()
    ));
    if let (Some(caller), Some(action)) = (&caller, write_action(&method, matched.as_ref())) {
        if status.is_client_error() {
            let (organisation, id) = match &params {
                Ok(params) => (
                    params.iter().find(|(k, _)| *k == "org").map(|(_, v)| v),
                    params.iter().find(|(k, _)| *k == "id").map(|(_, v)| v),
                ),
                Err(_) => (None, None),
            };
            audit_refusal(
                app.as_ref(),
                caller,
                action,
                organisation,
                id,
                status,
                &reason,
            )
            .await;
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// The answer's own words: the first error's message, or for a 422 the fields it names.
fn reason_of(status: StatusCode, body: &[u8]) -> String {
    let errors = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("errors").and_then(Value::as_array).cloned())
        .unwrap_or_default();
    let text = |e: &Value, key: &str| e.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    if status == StatusCode::UNPROCESSABLE_ENTITY && !errors.is_empty() {
        let fields: Vec<String> = errors.iter().take(5).map(|e| text(e, "path")).collect();
        let more = errors.len().saturating_sub(5);
        format!(
            "invalid: {}{}",
            fields.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    } else if let Some(first) = errors.first() {
        text(first, "message").chars().take(300).collect()
    } else {
        status.canonical_reason().unwrap_or("").to_string()
    }
}

/// The write a request attempted, by its route and method; None for reads and unknown routes.
fn write_action(method: &Method, matched: Option<&MatchedPath>) -> Option<&'static str> {
    let route = matched?.as_str();
    match (method, route) {
        (&Method::POST, "/v1/organisations/{org}/webhooks") => Some("refused-create"),
        (&Method::PATCH | &Method::PUT, "/v1/organisations/{org}/webhooks/{id}") => {
            Some("refused-update")
        }
        (&Method::DELETE, "/v1/organisations/{org}/webhooks/{id}") => Some("refused-delete"),
        (&Method::POST, "/v1/organisations/{org}/webhooks/{id}/rotate-key") => {
            Some("refused-rotate-key")
        }
        (&Method::POST, "/v1/organisations/{org}/webhooks/{id}/revoke-previous-key") => {
            Some("refused-revoke-previous-key")
        }
        _ => None,
    }
}

async fn audit_refusal<A: Refusals>(
    app: &A,
    caller: &Caller,
    action: &str,
    organisation: Option<&str>,
    id: Option<&str>,
    status: StatusCode,
    reason: &str,
) {
    // Only what a database can store: an organisation or id that the API itself would refuse is not written.
    let organisation = organisation
        .filter(|o| (1..=128).contains(&o.chars().count()) && !o.chars().any(char::is_control))
        .unwrap_or("");
    let id = id
        .filter(|id| crate::config::is_webhook_id(id))
        .unwrap_or("");
    let audit = Audit {
        at_ms: now_ms(),
        actor: &caller.sub,
        role: caller.role.as_str(),
        action,
        detail: json!({"status": status.as_u16(), "reason": reason}).to_string(),
    };
    if let Err(e) = app.store().audit_only(organisation, id, audit).await {
        log(&format!("auditing a refused {action} failed: {e}"));
    }
}

/// The revision of the last feed pull logged.
static LAST_PULL_LOGGED: AtomicI64 = AtomicI64::new(i64::MIN);

/// A feed pull is logged when it serves another revision than the last one logged (the first pull, then once
/// per change), never the token.
pub fn note_feed_pull(revision: i64, status: StatusCode, bytes: usize) {
    if LAST_PULL_LOGGED.swap(revision, Ordering::Relaxed) != revision {
        log(&format!(
            "feed pulled at revision {revision}: {} ({bytes} bytes)",
            status.as_u16()
        ));
    }
}
