//! The proxies' side of the delivery log (docs/delivery-reports.md): `POST /v2/registry/reports` stores what
//! happened to each delivery attempt; `POST /v2/registry/sends/claim` hands queued sends to a proxy. Both need
//! the proxy token.

use super::{json_response, ApiError, App};
use crate::config::{is_event_type, is_webhook_id};
use crate::event::Envelope;
use crate::registry::delivery_log::{Outcome, Report, ReportedAttempt, ReportedEvent};
use crate::registry::validate::FieldError;
use crate::registry::{delivery_ingest, sends};
use crate::registry::{log, now_ms};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Largest report body (the contract's bound; the API's other requests keep theirs).
pub const MAX_REPORT_BODY: usize = 1024 * 1024;
const MAX_EVENTS: usize = 5_000;
const MAX_ATTEMPTS: usize = 4_000;
const MAX_HOLDING: usize = 1_000;
const MAX_PROXY_NAME: usize = 200;
/// Times on the wire are Unix milliseconds, within what a JSON number holds exactly.
const MAX_TIME_MS: i64 = 1 << 53;
const MAX_LATENCY_MS: i64 = 86_400_000;
const DEFAULT_CLAIM: i64 = 16;

/// `POST /v2/registry/reports`: 204 once stored.
pub async fn store_report(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    super::proxy_feeds::require_proxy_token(&app, &headers, "delivery reports and claims")?;
    let report = read_report(&body).map_err(|e| ApiError::Invalid(vec![e]))?;
    delivery_ingest::store_report(&app.store, &report, now_ms(), app.deliveries.lease_ms).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v2/registry/sends/claim`: 200 `{"sends": [...], "leaseMs"}`.
pub async fn claim_sends(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    super::proxy_feeds::require_proxy_token(&app, &headers, "delivery reports and claims")?;
    let map = object(&body).map_err(|e| ApiError::Invalid(vec![e]))?;
    let mut fields = Fields::new(&map, "");
    let proxy = fields.proxy_name("proxy");
    let max = fields
        .optional_integer("max", 1, sends::MAX_CLAIM)
        .map(|m| m.unwrap_or(DEFAULT_CLAIM));
    fields.no_others(&["proxy", "max"]);
    let (proxy, max) = match (proxy, max, fields.error) {
        (Ok(proxy), Ok(max), None) => (proxy, max),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Some(e)) => {
            return Err(ApiError::Invalid(vec![e]))
        }
    };
    let lease_ms = app.deliveries.lease_ms;
    let claimed = sends::claim(&app.store, &proxy, max, lease_ms, now_ms()).await?;
    app.deliveries.pending.forget();
    if !claimed.is_empty() {
        log(&format!("{} send(s) claimed by {proxy:?}", claimed.len()));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"sends": claimed, "leaseMs": lease_ms}),
    ))
}

/// The feeds' paths: their 200 answers carry `"pendingSends": true` while a claim would find a send.
const FEED_PATHS: &[&str] = &["/v1/registry", "/v2/registry/changes"];
/// How long a feed request waits to learn whether sends are pending: well under the feed's own 2 s bound, so a
/// database that does not answer still gets its 503 in time.
const PENDING_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// Adds `"pendingSends": true` to the feeds' 200 answers while a claim would find a send. The feed's cached page
/// is the same for every proxy; the flag is added on the way out. While sends are pending, `If-None-Match` is
/// not honoured (a 304 has no body to carry the flag).
pub async fn pending_sends_flag(
    State(app): State<Arc<App>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !FEED_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let now = now_ms();
    let cache = &app.deliveries.pending;
    let pending = match cache.get(now) {
        Some(pending) => pending,
        // A database that does not answer must not hold the feed's own answer (its 503) back.
        None => match tokio::time::timeout(PENDING_CHECK_TIMEOUT, sends::pending(&app.store, now))
            .await
        {
            Ok(Ok(pending)) => {
                cache.set(now, pending);
                pending
            }
            Ok(Err(e)) => {
                // The feed still answers; the flag comes back with a later poll. Meanwhile the other polls do
                // not ask again.
                cache.set(now, false);
                log(&format!("pending sends unknown: {e}"));
                false
            }
            Err(_) => {
                cache.set(now, false);
                false
            }
        },
    };
    if !pending {
        return next.run(request).await;
    }
    request.headers_mut().remove(header::IF_NONE_MATCH);
    let answer = next.run(request).await;
    if answer.status() != StatusCode::OK {
        return answer;
    }
    let (mut parts, body) = answer.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(with_pending_flag(&bytes)))
}

/// `{"pendingSends":true,` then the rest of a JSON object (once: an object that starts with the flag already is
/// left as it is).
pub fn with_pending_flag(object: &[u8]) -> Vec<u8> {
    let Some(rest) = object.strip_prefix(b"{") else {
        return object.to_vec();
    };
    if rest.trim_ascii_start().starts_with(b"\"pendingSends\"") {
        return object.to_vec();
    }
    let mut flagged = Vec::with_capacity(object.len() + 22);
    flagged.extend_from_slice(b"{\"pendingSends\":true");
    if rest.trim_ascii_start().first() != Some(&b'}') {
        flagged.push(b',');
    }
    flagged.extend_from_slice(rest);
    flagged
}

fn object(body: &[u8]) -> Result<Map<String, Value>, FieldError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(FieldError::new("", "the body must be a JSON object")),
        Err(e) => Err(FieldError::new(
            "",
            format!("the body must be a JSON object ({e})"),
        )),
    }
}

/// Reads and checks a report; the first bad field is named by its path.
pub fn read_report(body: &[u8]) -> Result<Report, FieldError> {
    let map = object(body)?;
    let mut fields = Fields::new(&map, "");
    let proxy = fields.proxy_name("proxy")?;
    fields.no_others(&["proxy", "events", "attempts", "holding"]);
    if let Some(e) = fields.error {
        return Err(e);
    }
    let mut report = Report {
        proxy,
        ..Report::default()
    };
    for (i, item) in array(&map, "events", MAX_EVENTS)?.iter().enumerate() {
        report
            .events
            .push(read_event(item, &format!("events[{i}]"))?);
    }
    for (i, item) in array(&map, "attempts", MAX_ATTEMPTS)?.iter().enumerate() {
        report
            .attempts
            .push(read_attempt(item, &format!("attempts[{i}]"))?);
    }
    for (i, item) in array(&map, "holding", MAX_HOLDING)?.iter().enumerate() {
        match item.as_i64() {
            Some(id) if id > 0 => report.holding.push(id),
            _ => {
                return Err(FieldError::new(
                    format!("holding[{i}]"),
                    "must be a send id (a positive integer)",
                ))
            }
        }
    }
    Ok(report)
}

fn array<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    most: usize,
) -> Result<&'a [Value], FieldError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) if items.len() <= most => Ok(items),
        Some(Value::Array(_)) => Err(FieldError::new(
            key,
            format!("at most {most} items in one report"),
        )),
        Some(_) => Err(FieldError::new(key, "must be an array")),
    }
}

fn read_event(item: &Value, path: &str) -> Result<ReportedEvent, FieldError> {
    let Value::Object(map) = item else {
        return Err(FieldError::new(path, "must be an object"));
    };
    let mut f = Fields::new(map, path);
    let event = ReportedEvent {
        event_id: f.id("eventId")?,
        organisation_id: f.organisation("organisationId")?,
        event_type: f.event_type("eventType")?,
        created_ms: f.time("createdAt")?,
        envelope: f.envelope("envelope")?,
    };
    f.no_others(&[
        "eventId",
        "organisationId",
        "eventType",
        "createdAt",
        "envelope",
    ]);
    f.error.map_or(Ok(event), Err)
}

fn read_attempt(item: &Value, path: &str) -> Result<ReportedAttempt, FieldError> {
    let Value::Object(map) = item else {
        return Err(FieldError::new(path, "must be an object"));
    };
    let mut f = Fields::new(map, path);
    let attempt = ReportedAttempt {
        event_id: f.id("eventId")?,
        webhook_id: f.id("webhookId")?,
        organisation_id: f.organisation("organisationId")?,
        event_type: f.event_type("eventType")?,
        attempt: f.integer("attempt", 0, 10_000)?,
        at_ms: f.time("at")?,
        http_status: f.optional_integer("status", 100, 599)?,
        error: f.optional_word("error", 32)?,
        latency_ms: f.optional_integer("latencyMs", 0, MAX_LATENCY_MS)?,
        outcome: {
            let text = f.word("outcome", 16)?;
            Outcome::parse(&text)
                .ok_or_else(|| f.at("outcome", "must be retrying, delivered, failed or dropped"))?
        },
        reason: f.optional_word("reason", 64)?,
        send_id: f.optional_integer("sendId", 1, i64::MAX)?,
    };
    if attempt.http_status.is_some() && attempt.error.is_some() {
        return Err(f.at("error", "give status or error, not both"));
    }
    f.no_others(&[
        "eventId",
        "webhookId",
        "organisationId",
        "eventType",
        "attempt",
        "at",
        "status",
        "error",
        "latencyMs",
        "outcome",
        "reason",
        "sendId",
    ]);
    f.error.map_or(Ok(attempt), Err)
}

/// The fields of one JSON object, read with their paths.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
    /// A deferred error (an unknown field), reported when nothing else is wrong.
    error: Option<FieldError>,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>, path: &'a str) -> Self {
        Fields {
            map,
            path,
            error: None,
        }
    }

    fn at(&self, key: &str, message: &str) -> FieldError {
        let path = if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        };
        FieldError::new(path, message)
    }

    fn no_others(&mut self, known: &[&str]) {
        if self.error.is_some() {
            return;
        }
        if let Some(key) = self.map.keys().find(|k| !known.contains(&k.as_str())) {
            let shown: String = key.chars().take(64).collect();
            self.error = Some(self.at(&shown, "is not a field of this object"));
        }
    }

    fn string(&self, key: &str) -> Result<&'a str, FieldError> {
        match self.map.get(key) {
            Some(Value::String(s)) => Ok(s),
            None => Err(self.at(key, "is required")),
            Some(_) => Err(self.at(key, "must be a string")),
        }
    }

    fn id(&self, key: &str) -> Result<String, FieldError> {
        let s = self.string(key)?;
        if is_webhook_id(s) {
            Ok(s.to_string())
        } else {
            Err(self.at(key, "must be 24 lowercase hex digits"))
        }
    }

    fn organisation(&self, key: &str) -> Result<String, FieldError> {
        let s = self.string(key)?;
        if super::is_organisation_id(s) {
            Ok(s.to_string())
        } else {
            Err(self.at(key, "must be 1 to 128 characters, none a control character"))
        }
    }

    fn event_type(&self, key: &str) -> Result<String, FieldError> {
        let s = self.string(key)?;
        if is_event_type(s) {
            Ok(s.to_string())
        } else {
            Err(self.at(key, "must look like resource.event"))
        }
    }

    fn proxy_name(&self, key: &str) -> Result<String, FieldError> {
        let s = self.string(key)?;
        if (1..=MAX_PROXY_NAME).contains(&s.chars().count()) && !s.chars().any(char::is_control) {
            Ok(s.to_string())
        } else {
            Err(self.at(key, "must be 1 to 200 characters, none a control character"))
        }
    }

    fn word(&self, key: &str, most: usize) -> Result<String, FieldError> {
        let s = self.string(key)?;
        if (1..=most).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            Ok(s.to_string())
        } else {
            Err(self.at(
                key,
                &format!("must be 1 to {most} lowercase letters, digits or _"),
            ))
        }
    }

    fn optional_word(&self, key: &str, most: usize) -> Result<Option<String>, FieldError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.word(key, most).map(Some),
        }
    }

    fn integer(&self, key: &str, least: i64, most: i64) -> Result<i64, FieldError> {
        match self.map.get(key) {
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) if (least..=most).contains(&v) => Ok(v),
                _ => Err(self.at(
                    key,
                    &format!("must be a whole number from {least} to {most}"),
                )),
            },
            None => Err(self.at(key, "is required")),
            Some(_) => Err(self.at(key, "must be a number")),
        }
    }

    fn optional_integer(
        &self,
        key: &str,
        least: i64,
        most: i64,
    ) -> Result<Option<i64>, FieldError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.integer(key, least, most).map(Some),
        }
    }

    fn time(&self, key: &str) -> Result<i64, FieldError> {
        self.integer(key, 0, MAX_TIME_MS)
    }

    fn envelope(&self, key: &str) -> Result<Option<(String, String)>, FieldError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(parts)) => match parts.as_slice() {
                [Value::String(head), Value::String(tail)] => {
                    // Kept only when it makes a JSON object around a webhook id: it is shown and sent again.
                    Envelope::from_parts(head.clone(), tail.clone())
                        .map(|_| Some((head.clone(), tail.clone())))
                        .ok_or_else(|| {
                            self.at(
                                key,
                                "the two parts around a webhook id must make a JSON object",
                            )
                        })
                }
                _ => Err(self.at(key, "must be null or [head, tail], two strings")),
            },
            Some(_) => Err(self.at(key, "must be null or [head, tail], two strings")),
        }
    }
}
