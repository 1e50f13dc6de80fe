//! The organisation admins' view of their deliveries: the list and one delivery with its payload, and the sends
//! they may queue (resend, recover, test). Same rights, error shape and audit as the rest of the API.

use super::{errors_body, json_response, ApiError, App};
use crate::config::is_webhook_id;
use crate::registry::auth::Caller;
use crate::registry::delivery_log::{self, AttemptRow, Cursor, DeliveryRow};
use crate::registry::sends::{self, Kind, NewSend};
use crate::registry::store::{insert_audit, Audit, StoredWebhook};
use crate::registry::validate::FieldError;
use crate::registry::{log, now_ms, rfc3339};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sqlx::Row;
use std::sync::Arc;

const DELIVERIES_JS: &str = include_str!("../dashboard/deliveries.js");
const DELIVERIES_CSS: &str = include_str!("../dashboard/deliveries.css");
const DEFAULT_PAGE: i64 = 25;
const MAX_PAGE: i64 = 100;
/// Attempts shown per delivery in the list, and in one delivery's detail (the latest ones).
const LIST_ATTEMPTS: usize = 20;
const DETAIL_ATTEMPTS: usize = 200;
/// Most deliveries one recover request queues; the answer says when more are left.
pub const RECOVER_MOST: i64 = 500;

fn invalid(path: &str, message: impl Into<String>) -> ApiError {
    ApiError::Invalid(vec![FieldError::new(path, message)])
}

fn no_such_delivery() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &errors_body(&[FieldError::new("", "no such delivery")]),
    )
}

/// The caller may manage `org`, and the webhook is one of its.
async fn webhook_of(
    app: &App,
    headers: &HeaderMap,
    org: &str,
    id: &str,
) -> Result<(Caller, StoredWebhook), ApiError> {
    let caller = app.authorize(headers, org)?;
    if !is_webhook_id(id) {
        return Err(ApiError::NotFound);
    }
    let webhook = app.store.get(org, id).await?.ok_or(ApiError::NotFound)?;
    Ok((caller, webhook))
}

fn attempt_json(a: &AttemptRow) -> Value {
    let mut out = json!({"attempt": a.attempt, "at": rfc3339(a.at_ms), "outcome": a.outcome});
    if let Some(status) = a.http_status {
        out["status"] = json!(status);
    }
    if let Some(error) = &a.error {
        out["error"] = json!(error);
    }
    if let Some(latency) = a.latency_ms {
        out["latencyMs"] = json!(latency);
    }
    if let Some(reason) = &a.reason {
        out["reason"] = json!(reason);
    }
    if let Some(send) = a.send_id {
        out["sendId"] = json!(send);
    }
    out
}

fn delivery_json(d: &DeliveryRow) -> Value {
    json!({
        "eventId": d.event_id,
        "eventType": d.event_type,
        "status": d.status,
        "createdAt": rfc3339(d.created_ms),
        "updatedAt": rfc3339(d.updated_ms),
        "attemptCount": d.attempt_count,
        "lastStatus": d.last_http_status,
        "lastError": d.last_error,
        "attempts": d.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
    })
}

fn encode_cursor(d: &DeliveryRow) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", d.created_ms, d.event_id))
}

fn decode_cursor(text: &str) -> Option<Cursor> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let (created, event) = text.split_once(':')?;
    if !is_webhook_id(event) {
        return None;
    }
    Some(Cursor {
        created_ms: created.parse().ok()?,
        event_id: event.to_string(),
    })
}

/// `status`, `cursor` and `limit` from the query string.
fn read_query(query: Option<&str>) -> Result<(Option<String>, Option<Cursor>, i64), ApiError> {
    let (mut status, mut cursor, mut limit) = (None, None, DEFAULT_PAGE);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "status" => match value {
                "pending" | "delivered" | "failed" => status = Some(value.to_string()),
                "" => {}
                _ => return Err(invalid("status", "must be pending, delivered or failed")),
            },
            "cursor" => {
                if !value.is_empty() {
                    cursor = Some(decode_cursor(value).ok_or_else(|| {
                        invalid(
                            "cursor",
                            "is not a cursor this list gave (ask again without it)",
                        )
                    })?);
                }
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| invalid("limit", format!("must be from 1 to {MAX_PAGE}")))?;
            }
            _ => {
                let shown: String = key.chars().take(64).collect();
                return Err(invalid(
                    &shown,
                    "is not a parameter of this list (status, cursor, limit)",
                ));
            }
        }
    }
    Ok((status, cursor, limit))
}

/// The delivery log's routes: the admins' (here) and the proxies' (reports.rs).
pub fn routes() -> axum::Router<Arc<App>> {
    use axum::extract::DefaultBodyLimit;
    use axum::routing::{get, post};
    const WEBHOOK: &str = "/v1/organisations/{org}/webhooks/{id}";
    axum::Router::new()
        .route(
            "/deliveries.js",
            get(|| async { super::asset("text/javascript; charset=utf-8", DELIVERIES_JS) }),
        )
        .route(
            "/deliveries.css",
            get(|| async { super::asset("text/css; charset=utf-8", DELIVERIES_CSS) }),
        )
        .route(
            "/v2/registry/reports",
            post(super::reports::store_report)
                .layer(DefaultBodyLimit::max(super::reports::MAX_REPORT_BODY)),
        )
        .route(
            "/v2/registry/sends/claim",
            post(super::reports::claim_sends),
        )
        .route(&format!("{WEBHOOK}/deliveries"), get(list_deliveries))
        .route(
            &format!("{WEBHOOK}/deliveries/{{event}}"),
            get(get_delivery),
        )
        .route(
            &format!("{WEBHOOK}/deliveries/{{event}}/resend"),
            post(resend),
        )
        .route(&format!("{WEBHOOK}/recover"), post(recover))
        .route(&format!("{WEBHOOK}/test"), post(send_test))
}

/// `GET …/webhooks/{id}/deliveries?status=&cursor=&limit=`: newest first; `next` is the cursor of the next
/// page, null on the last.
pub async fn list_deliveries(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    webhook_of(&app, &headers, &org, &id).await?;
    let (status, cursor, limit) = read_query(query.as_deref())?;
    let mut rows = delivery_log::list(
        app.store.pool(),
        &org,
        &id,
        status.as_deref(),
        cursor.as_ref(),
        limit,
        LIST_ATTEMPTS,
    )
    .await?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let next = if more {
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"deliveries": rows.iter().map(delivery_json).collect::<Vec<_>>(), "next": next}),
    ))
}

/// `GET …/webhooks/{id}/deliveries/{eventId}`: the delivery, every attempt (the latest 200) and the payload as
/// sent (null when the proxy did not keep it: larger than its `delivery.maxBodyBytes`).
pub async fn get_delivery(
    State(app): State<Arc<App>>,
    Path((org, id, event)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    webhook_of(&app, &headers, &org, &id).await?;
    if !is_webhook_id(&event) {
        return Ok(no_such_delivery());
    }
    let Some((delivery, payload)) =
        delivery_log::get(app.store.pool(), &org, &id, &event, DETAIL_ATTEMPTS).await?
    else {
        return Ok(no_such_delivery());
    };
    let mut answer = delivery_json(&delivery);
    answer["payload"] = json!(payload);
    Ok(json_response(StatusCode::OK, &answer))
}

fn refuse_disabled(webhook: &StoredWebhook) -> Result<(), ApiError> {
    if webhook.status == "enabled" {
        Ok(())
    } else {
        Err(invalid(
            "",
            "the webhook is disabled: the proxies deliver nothing to it; enable it first",
        ))
    }
}

fn audit_line(caller: &Caller, what: &str, organisation: &str, id: &str) {
    log(&format!(
        "{what} for webhook {id} of organisation {organisation:?} by {:?} ({})",
        caller.sub,
        caller.role.as_str()
    ));
}

/// Queues sends and audits them in one transaction.
async fn queue_audited(
    app: &App,
    caller: &Caller,
    webhook: &StoredWebhook,
    kind: Kind,
    sends_to_queue: &[NewSend],
    test_event: Option<&crate::event::Event>,
    detail: Value,
) -> Result<u64, ApiError> {
    let now = now_ms();
    let mut tx = app.store.pool().begin().await?;
    if let Some(event) = test_event {
        sends::store_test_event(&mut tx, &webhook.id, event, now).await?;
    }
    let queued = sends::queue(
        &mut tx,
        &webhook.organisation_id,
        &webhook.id,
        kind,
        sends_to_queue,
        now,
    )
    .await?;
    insert_audit(
        &mut tx,
        &webhook.organisation_id,
        &webhook.id,
        &Audit {
            at_ms: now,
            actor: &caller.sub,
            role: caller.role.as_str(),
            action: kind.as_str(),
            detail: detail.to_string(),
        },
    )
    .await?;
    tx.commit().await?;
    app.deliveries.pending.forget();
    Ok(queued)
}

/// `POST …/deliveries/{eventId}/resend`: 202; the same body, with the same `webhook-id`, signed afresh by a proxy.
pub async fn resend(
    State(app): State<Arc<App>>,
    Path((org, id, event)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (caller, webhook) = webhook_of(&app, &headers, &org, &id).await?;
    if !is_webhook_id(&event) {
        return Ok(no_such_delivery());
    }
    let Some((delivery, payload)) =
        delivery_log::get(app.store.pool(), &org, &id, &event, 0).await?
    else {
        return Ok(no_such_delivery());
    };
    let Some(body) = payload else {
        return Err(invalid(
            "",
            "the payload of this delivery was not kept (larger than the proxy's delivery.maxBodyBytes): \
             it cannot be sent again",
        ));
    };
    refuse_disabled(&webhook)?;
    let send = NewSend {
        event_id: delivery.event_id.clone(),
        event_type: delivery.event_type.clone(),
        body,
    };
    let queued = queue_audited(
        &app,
        &caller,
        &webhook,
        Kind::Resend,
        &[send],
        None,
        json!({"eventId": event}),
    )
    .await?;
    audit_line(
        &caller,
        &format!("resend of event {event} queued"),
        &org,
        &id,
    );
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"queued": queued, "eventId": event}),
    ))
}

/// `POST …/webhooks/{id}/recover` with `{"since": RFC 3339}`: 202 `{"queued", "more", "notKept"}`, every delivery
/// that failed for good and was created since then, at most [`RECOVER_MOST`] per request.
pub async fn recover(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (caller, webhook) = webhook_of(&app, &headers, &org, &id).await?;
    let since = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => {
            if let Some(key) = map.keys().find(|k| k.as_str() != "since") {
                let shown: String = key.chars().take(64).collect();
                return Err(invalid(&shown, "is not a field of this request (since)"));
            }
            match map.get("since") {
                Some(Value::String(s)) => parse_rfc3339(s).ok_or_else(|| {
                    invalid(
                        "since",
                        "must be a time in RFC 3339, e.g. 2026-01-31T09:30:00Z",
                    )
                })?,
                Some(_) => return Err(invalid("since", "must be a string")),
                None => return Err(invalid("since", "is required")),
            }
        }
        _ => return Err(invalid("", "the body must be a JSON object {\"since\": …}")),
    };
    refuse_disabled(&webhook)?;
    let pool = app.store.pool();
    let rows = sqlx::query(
        "SELECT d.event_id, d.event_type, e.envelope_head, e.envelope_tail FROM deliveries d \
         JOIN delivery_events e ON e.organisation_id = d.organisation_id AND e.event_id = d.event_id \
         WHERE d.webhook_id = $1 AND d.organisation_id = $2 AND d.status = 'failed' AND d.created_ms >= $3 \
         AND e.envelope_head IS NOT NULL AND e.envelope_tail IS NOT NULL \
         ORDER BY d.created_ms, d.event_id LIMIT $4",
    )
    .bind(&id)
    .bind(&org)
    .bind(since)
    .bind(RECOVER_MOST + 1)
    .fetch_all(pool)
    .await?;
    let not_kept: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM deliveries d WHERE d.webhook_id = $1 AND d.organisation_id = $2 \
         AND d.status = 'failed' AND d.created_ms >= $3 AND NOT EXISTS (SELECT 1 FROM delivery_events e \
         WHERE e.organisation_id = d.organisation_id AND e.event_id = d.event_id \
         AND e.envelope_head IS NOT NULL AND e.envelope_tail IS NOT NULL)",
    )
    .bind(&id)
    .bind(&org)
    .bind(since)
    .fetch_one(pool)
    .await?
    .try_get("n")?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > RECOVER_MOST;
    let mut to_send = Vec::with_capacity(rows.len());
    for row in rows.iter().take(usize::try_from(RECOVER_MOST).unwrap_or(0)) {
        let head: String = row.try_get("envelope_head")?;
        let tail: String = row.try_get("envelope_tail")?;
        to_send.push(NewSend {
            event_id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            body: delivery_log::body_for(&head, &tail, &id),
        });
    }
    let queued = queue_audited(
        &app,
        &caller,
        &webhook,
        Kind::Recover,
        &to_send,
        None,
        json!({"since": rfc3339(since), "queued": to_send.len()}),
    )
    .await?;
    audit_line(
        &caller,
        &format!(
            "recovery of {queued} failed deliveries since {} queued",
            rfc3339(since)
        ),
        &org,
        &id,
    );
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"queued": queued, "more": more, "notKept": not_kept}),
    ))
}

/// `POST …/webhooks/{id}/test` with an optional `{"eventType"}` (default: the webhook's first): 202
/// `{"eventId"}`; a proxy signs and delivers the test event.
pub async fn send_test(
    State(app): State<Arc<App>>,
    Path((org, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (caller, webhook) = webhook_of(&app, &headers, &org, &id).await?;
    let mut event_type = webhook.events.first().cloned().unwrap_or_default();
    if !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(map)) => {
                if let Some(key) = map.keys().find(|k| k.as_str() != "eventType") {
                    let shown: String = key.chars().take(64).collect();
                    return Err(invalid(
                        &shown,
                        "is not a field of this request (eventType)",
                    ));
                }
                match map.get("eventType") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(t)) if app.policy.event_types.contains(t) => {
                        event_type.clone_from(t)
                    }
                    Some(_) => {
                        return Err(invalid(
                            "eventType",
                            "must be an event type of the catalogue (GET /v1/event-types)",
                        ))
                    }
                }
            }
            _ => return Err(invalid("", "the body must be empty or a JSON object")),
        }
    }
    refuse_disabled(&webhook)?;
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|e| {
        log(&format!("no randomness from the OS: {e}"));
        ApiError::Internal
    })?;
    let event = sends::test_event(&org, &event_type, now_ms(), random);
    let body = String::from_utf8(event.envelope_for(&id)).map_err(|_| ApiError::Internal)?;
    let send = NewSend {
        event_id: event.id_hex.clone(),
        event_type: event_type.clone(),
        body,
    };
    queue_audited(
        &app,
        &caller,
        &webhook,
        Kind::Test,
        &[send],
        Some(&event),
        json!({"eventId": event.id_hex, "eventType": event_type}),
    )
    .await?;
    audit_line(
        &caller,
        &format!("test event {} queued", event.id_hex),
        &org,
        &id,
    );
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"eventId": event.id_hex, "eventType": event_type}),
    ))
}

/// RFC 3339 (`2026-01-31T09:30:00Z`, `…T09:30:00.5+01:00`) to Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let month_days = [
        31,
        28 + i64::from(year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)),
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > *month_days.get(usize::try_from(month - 1).ok()?)?
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let end = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        if end == 0 {
            return None;
        }
        let first3: String = fraction[..end]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = first3.parse::<i64>().ok()?;
        rest = &fraction[end..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return None;
            }
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6)?.parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let sign = if rb[0] == b'-' { -1 } else { 1 };
            sign * (hours * 60 + minutes)
        }
    };
    let days =
        crate::time::days_from_civil(year, u32::try_from(month).ok()?, u32::try_from(day).ok()?);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

#[cfg(test)]
mod tests;
