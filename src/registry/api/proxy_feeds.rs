//! The proxies' feeds: `GET /v1/registry` (the whole document, for proxies built before version 2) and
//! `GET /v2/registry/changes` (pages of changes since a cursor, docs/registry-feed.md). Both need the proxy token.

use super::{ApiError, App};
use crate::registry::{log, now_ms};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The proxies' requests (feeds, reports, claims) carry the proxy token; `what` names them in the 401.
pub(super) fn require_proxy_token(
    app: &App,
    headers: &HeaderMap,
    what: &str,
) -> Result<(), ApiError> {
    if app.proxy_token.admits(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    ) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(format!(
            "{what} need the proxies' bearer token"
        )))
    }
}

/// The last registry document built, reused while the revision is the same and no previous key has expired.
pub(super) struct Feed {
    revision: i64,
    valid_until_ms: i64,
    etag: String,
    body: Bytes,
}

/// `GET /v1/registry`: every webhook with its key(s), for the proxies. The ETag is the revision and a digest of
/// the document, so it also changes when a previous key expires without any write.
pub(super) async fn registry_feed(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_proxy_token(&app, &headers, "the registry feeds")?;
    let now = now_ms();
    let revision = app.store.revision().await?;
    let cached = app.feed.lock().ok().and_then(|feed| {
        feed.as_ref()
            .filter(|f| f.revision == revision && now < f.valid_until_ms)
            .map(|f| (f.etag.clone(), f.body.clone()))
    });
    let (etag, body) = match cached {
        Some(hit) => hit,
        None => {
            let feed = build_feed(&app, now).await?;
            let hit = (feed.etag.clone(), feed.body.clone());
            if let Ok(mut slot) = app.feed.lock() {
                *slot = Some(feed);
            }
            hit
        }
    };
    let etag_value = HeaderValue::from_str(&etag).map_err(|_| ApiError::Internal)?;
    if if_none_match(&headers, &etag) {
        crate::registry::refusals::note_feed_pull(revision, StatusCode::NOT_MODIFIED, 0);
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    crate::registry::refusals::note_feed_pull(revision, StatusCode::OK, body.len());
    Ok((
        StatusCode::OK,
        [
            (header::ETAG, etag_value),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response())
}

/// `GET /v2/registry/changes?since=N`: the changes after a cursor, a page at a time (docs/registry-feed.md).
pub(super) async fn registry_changes(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_proxy_token(&app, &headers, "the registry feeds")?;
    Ok(app
        .changes
        .answer(&app.store, &app.sealer, query.as_deref())
        .await)
}

async fn build_feed(app: &App, now: i64) -> Result<Feed, ApiError> {
    let (revision, webhooks) = app.store.snapshot().await?;
    let mut valid_until_ms = i64::MAX;
    let mut entries = Vec::with_capacity(webhooks.len());
    for w in &webhooks {
        let current = match app.sealer.open(&w.id, &w.key_sealed) {
            Ok(key) => key,
            Err(e) => {
                // One unreadable key must not take every other webhook off the proxies.
                log(&format!("registry feed: skipped: {e}"));
                continue;
            }
        };
        let mut entry = json!({
            "id": w.id,
            "organisationId": w.organisation_id,
            "name": w.name,
            "url": w.url,
            "description": w.description,
            "status": w.status,
            "events": w.events,
            "apiKeys": [current],
        });
        if let (Some(previous), Some(expires)) = (&w.previous_key_sealed, w.previous_key_expires_ms)
        {
            if now < expires {
                match app.sealer.open(&w.id, previous) {
                    Ok(key) => {
                        if let Some(Value::Array(keys)) = entry.get_mut("apiKeys") {
                            keys.push(Value::String(key));
                        }
                        entry["previousKeyExpiresAt"] = json!(expires / 1000);
                        valid_until_ms = valid_until_ms.min(expires);
                    }
                    Err(e) => log(&format!("registry feed: previous key left out: {e}")),
                }
            }
        }
        entries.push(entry);
    }
    let body = json!({"revision": revision, "webhooks": entries}).to_string();
    let digest = Sha256::digest(body.as_bytes());
    let etag = format!(
        "\"{revision}-{}\"",
        digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    Ok(Feed {
        revision,
        valid_until_ms,
        etag,
        body: Bytes::from(body),
    })
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().any(|value| {
        value.as_bytes().split(|b| *b == b',').any(|candidate| {
            let candidate = candidate.trim_ascii();
            let candidate = candidate.strip_prefix(b"W/").unwrap_or(candidate);
            candidate == b"*" || candidate == etag.as_bytes()
        })
    })
}
