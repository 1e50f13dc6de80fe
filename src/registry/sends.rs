//! Queued sends: resends, recoveries and test events that organisation admins ask for, waiting for a proxy to
//! claim, sign and deliver them (docs/delivery-reports.md). The registry never calls an endpoint itself.
//!
//! A send is `open` until a final attempt carrying its `sendId` is reported (`done`), or it cannot be carried
//! (`failed`). An open send whose `lease_until_ms` has passed is claimable: 0 when it was never claimed, a claim's
//! lease otherwise, renewed by the `holding` list of the claiming proxy's reports.

use super::delivery_log::{self, Report};
use super::store::Store;
use crate::event::{Event, EventId};
use crate::json::Object;
use serde_json::{json, Map, Value};
use sqlx::{Any, Row, Transaction};

/// A claim's answer stays under this many bytes (the proxies' callout answer limit is 64 KiB).
pub const CLAIM_ANSWER_BYTES: usize = 48 * 1024;
/// Room for a send's fields other than its body, in a claim's answer.
const SEND_OVERHEAD_BYTES: usize = 1024;
/// Most sends one claim may ask for.
pub const MAX_CLAIM: i64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Resend,
    Recover,
    Test,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Resend => "resend",
            Kind::Recover => "recover",
            Kind::Test => "test",
        }
    }
}

/// One send to queue: the exact body to deliver to the webhook.
#[derive(Debug, Clone)]
pub struct NewSend {
    pub event_id: String,
    pub event_type: String,
    pub body: String,
}

/// Queues sends for one webhook in the caller's transaction; a delivery with an open send already gets no
/// second one. Returns how many were queued.
pub async fn queue(
    tx: &mut Transaction<'_, Any>,
    organisation: &str,
    webhook: &str,
    kind: Kind,
    sends: &[NewSend],
    now_ms: i64,
) -> Result<u64, sqlx::Error> {
    let mut queued = 0;
    for chunk in sends.chunks(50) {
        let sql = format!(
            "INSERT INTO delivery_sends (organisation_id, webhook_id, event_id, event_type, kind, body, \
             body_json_bytes, state, lease_until_ms, claims, created_ms) VALUES {} ON CONFLICT DO NOTHING",
            delivery_log::placeholders(chunk.len(), 11)
        );
        let mut query = sqlx::query(&sql);
        for s in chunk {
            let json_bytes = Value::String(s.body.clone()).to_string().len();
            query = query
                .bind(organisation)
                .bind(webhook)
                .bind(&s.event_id)
                .bind(&s.event_type)
                .bind(kind.as_str())
                .bind(&s.body)
                .bind(i64::try_from(json_bytes).unwrap_or(i64::MAX))
                .bind("open")
                .bind(0_i64)
                .bind(0_i64)
                .bind(now_ms);
        }
        queued += query.execute(&mut **tx).await?.rows_affected();
    }
    let events: Vec<String> = sends.iter().map(|s| s.event_id.clone()).collect();
    delivery_log::mark_pending(tx, webhook, &events, now_ms).await?;
    Ok(queued)
}

/// Whether a claim would find something: an open send whose lease is free.
pub async fn pending(store: &Store, now_ms: i64) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "SELECT id FROM delivery_sends WHERE state = 'open' AND lease_until_ms < $1 ORDER BY state, \
         lease_until_ms LIMIT 1",
    )
    .bind(now_ms)
    .fetch_optional(store.pool())
    .await?
    .is_some())
}

/// Claims up to `max` sends for `proxy` for `lease_ms`, oldest first, their answer bounded by
/// [`CLAIM_ANSWER_BYTES`]: a send that does not fit in the room left waits for the next claim; one that could
/// never fit is failed with a reason. Two claimers never get the same send: the update checks again that each
/// send is still claimable.
pub async fn claim(
    store: &Store,
    proxy: &str,
    max: i64,
    lease_ms: i64,
    now_ms: i64,
) -> Result<Vec<Value>, sqlx::Error> {
    let pool = store.pool();
    let candidates = sqlx::query(
        "SELECT id, webhook_id, event_id, body_json_bytes FROM delivery_sends WHERE state = 'open' \
         AND lease_until_ms < $1 \
         ORDER BY id LIMIT $2",
    )
    .bind(now_ms)
    .bind(max.clamp(1, MAX_CLAIM))
    .fetch_all(pool)
    .await?;
    let mut room = CLAIM_ANSWER_BYTES.saturating_sub(64);
    let mut chosen = Vec::new();
    for row in candidates {
        let id: i64 = row.try_get("id")?;
        let bytes = usize::try_from(row.try_get::<i64, _>("body_json_bytes")?)
            .unwrap_or(usize::MAX)
            .saturating_add(SEND_OVERHEAD_BYTES);
        if bytes > CLAIM_ANSWER_BYTES.saturating_sub(64) {
            sqlx::query(
                "UPDATE delivery_sends SET state = 'failed', finished_ms = $1, outcome = $2 \
                 WHERE id = $3 AND state = 'open'",
            )
            .bind(now_ms)
            .bind("too_large: the body does not fit in a claim's answer")
            .bind(id)
            .execute(pool)
            .await?;
            // The delivery it was for is not pending any more: it cannot be sent this way.
            sqlx::query(
                "UPDATE deliveries SET status = 'failed', last_http_status = NULL, last_error = 'too_large', \
                 updated_ms = $1 WHERE webhook_id = $2 AND event_id = $3 AND status = 'pending'",
            )
            .bind(now_ms)
            .bind(row.try_get::<String, _>("webhook_id")?)
            .bind(row.try_get::<String, _>("event_id")?)
            .execute(pool)
            .await?;
            super::log(&format!(
                "send {id} failed: its body does not fit in a claim's answer ({} bytes at most)",
                CLAIM_ANSWER_BYTES
            ));
            continue;
        }
        if bytes <= room {
            room -= bytes;
            chosen.push(id);
        }
    }
    if chosen.is_empty() {
        return Ok(Vec::new());
    }
    let list = (0..chosen.len())
        .map(|i| format!("${}", i + 4))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "UPDATE delivery_sends SET proxy = $1, lease_until_ms = $2, claims = claims + 1 \
         WHERE state = 'open' AND lease_until_ms < $3 AND id IN ({list}) \
         RETURNING id, kind, webhook_id, organisation_id, event_id, event_type, body"
    );
    let lease_until = now_ms.saturating_add(lease_ms);
    let mut query = sqlx::query(&sql).bind(proxy).bind(lease_until).bind(now_ms);
    for id in &chosen {
        query = query.bind(id);
    }
    let mut sends = Vec::with_capacity(chosen.len());
    for row in query.fetch_all(pool).await? {
        sends.push(json!({
            "sendId": row.try_get::<i64, _>("id")?,
            "kind": row.try_get::<String, _>("kind")?,
            "webhookId": row.try_get::<String, _>("webhook_id")?,
            "organisationId": row.try_get::<String, _>("organisation_id")?,
            "eventId": row.try_get::<String, _>("event_id")?,
            "eventType": row.try_get::<String, _>("event_type")?,
            "body": row.try_get::<String, _>("body")?,
        }));
    }
    sends.sort_by_key(|s| s["sendId"].as_i64());
    Ok(sends)
}

/// A report's effect on the sends: `holding` renews the leases this proxy still holds; a final attempt with a
/// `sendId` completes its send.
pub async fn settle(
    tx: &mut Transaction<'_, Any>,
    report: &Report,
    now_ms: i64,
    lease_ms: i64,
) -> Result<(), sqlx::Error> {
    for chunk in report.holding.chunks(100) {
        let list = (0..chunk.len())
            .map(|i| format!("${}", i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE delivery_sends SET lease_until_ms = $1 WHERE proxy = $2 AND state = 'open' AND id IN ({list})"
        );
        let mut query = sqlx::query(&sql)
            .bind(now_ms.saturating_add(lease_ms))
            .bind(&report.proxy);
        for id in chunk {
            query = query.bind(id);
        }
        query.execute(&mut **tx).await?;
    }
    for a in &report.attempts {
        let Some(send) = a.send_id else { continue };
        if !a.outcome.is_final() {
            continue;
        }
        let outcome = match &a.reason {
            Some(reason) => format!("{}: {reason}", a.outcome.as_str()),
            None => a.outcome.as_str().to_string(),
        };
        sqlx::query(
            "UPDATE delivery_sends SET state = 'done', finished_ms = $1, outcome = $2 \
             WHERE id = $3 AND webhook_id = $4 AND state = 'open'",
        )
        .bind(now_ms)
        .bind(&outcome)
        .bind(send)
        .bind(&a.webhook_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A test event of `event_type` for one webhook, built like a real one (the filter's envelope and id format);
/// its `data.object` says it is a test. `objectType` is the event type's resource (`job` for `job.completed`).
pub fn test_event(organisation: &str, event_type: &str, now_ms: i64, random: [u8; 8]) -> Event {
    let seconds = u64::try_from(now_ms / 1000).unwrap_or(0);
    let id = EventId::new(seconds, random);
    let object_type = event_type.split('.').next().unwrap_or(event_type);
    let mut object = Map::new();
    object.insert("id".into(), json!(format!("test_{}", id.to_hex())));
    object.insert("test".into(), json!(true));
    object.insert(
        "description".into(),
        json!("A test event sent from the webhook registry's dashboard or API; it describes no real object."),
    );
    Event::new(
        id,
        event_type,
        object_type,
        organisation,
        Object::Tree(&object),
        u64::try_from(now_ms).unwrap_or(0),
    )
}

/// Stores a test event's envelope and its delivery row (pending), so the admin sees it before a proxy sends it.
pub async fn store_test_event(
    tx: &mut Transaction<'_, Any>,
    webhook: &str,
    event: &Event,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    let (head, tail) = event.envelope.parts();
    let created = i64::try_from(event.created_at_ms).unwrap_or(now_ms);
    sqlx::query(
        "INSERT INTO delivery_events (organisation_id, event_id, event_type, created_ms, envelope_head, \
         envelope_tail, stored_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (organisation_id, event_id) \
         DO NOTHING",
    )
    .bind(&event.organisation_id)
    .bind(&event.id_hex)
    .bind(&event.event_type)
    .bind(created)
    .bind(head)
    .bind(tail)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO deliveries (webhook_id, event_id, organisation_id, event_type, status, created_ms, \
         updated_ms, attempt_count) VALUES ($1, $2, $3, $4, 'pending', $5, $6, 0) \
         ON CONFLICT (webhook_id, event_id) DO NOTHING",
    )
    .bind(webhook)
    .bind(&event.id_hex)
    .bind(&event.organisation_id)
    .bind(&event.event_type)
    .bind(created)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
