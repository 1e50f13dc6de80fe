//! The delivery log: what the proxies report about every delivery attempt (`POST /v2/registry/reports`,
//! docs/delivery-reports.md), kept in the registry's database for the organisation admins.
//!
//! Three tables: `delivery_events` (each event once, its envelope split around the webhook id, as sent),
//! `deliveries` (one row per webhook and event: its status, pending, delivered or failed, and a summary of its
//! attempts) and `delivery_attempts` (every attempt). `webhook_health` remembers, per webhook, since when its
//! deliveries have been failing (for auto-disable). No key is ever written here: envelopes hold none.

use super::store::Store;
use clap::Args;
use sqlx::{Any, AnyPool, Row, Transaction};
use std::collections::BTreeMap;

/// The operator's flags for the delivery log, sends and auto-disable.
#[derive(Debug, Args)]
pub struct DeliveryArgs {
    /// How long delivery reports are kept (ms, s, m, h or d), pruned in the background.
    #[arg(long, env = "REGISTRY_DELIVERY_RETENTION", default_value = "7d")]
    pub delivery_retention: String,
    /// Most deliveries kept per organisation; the oldest beyond it are pruned in the background.
    #[arg(
        long,
        env = "REGISTRY_MAX_DELIVERIES_PER_ORGANISATION",
        default_value_t = 100_000
    )]
    pub max_deliveries_per_organisation: u32,
    /// A webhook whose deliveries have all failed for this long, with no success in between, is disabled
    /// (ms, s, m, h or d; "off" never disables).
    #[arg(long, env = "REGISTRY_AUTO_DISABLE_AFTER", default_value = "5d")]
    pub auto_disable_after: String,
    /// How long a proxy holds a claimed send without renewing it before another proxy may claim it.
    #[arg(long, env = "REGISTRY_SEND_LEASE", default_value = "60s")]
    pub send_lease: String,
}

/// The delivery log's settings, read from [`DeliveryArgs`].
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub retention_ms: i64,
    pub max_per_organisation: i64,
    /// None: never disable.
    pub auto_disable_after_ms: Option<i64>,
    pub lease_ms: i64,
    /// Whether sends are pending, as last read (not a setting: shared by the requests).
    pub pending: PendingCache,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            retention_ms: 7 * DAY_MS,
            max_per_organisation: 100_000,
            auto_disable_after_ms: Some(5 * DAY_MS),
            lease_ms: 60_000,
            pending: Default::default(),
        }
    }
}

/// The last answer of `sends::pending`, shared by the feed's requests for [`PendingCache::FRESH_MS`], so that many
/// proxies polling at once cost one query. Queueing or claiming on this replica forgets it at once.
#[derive(Debug, Clone, Default)]
pub struct PendingCache(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl PendingCache {
    const FRESH_MS: i64 = 250;

    /// The answer known as of `now_ms`, if fresh.
    pub fn get(&self, now_ms: i64) -> Option<bool> {
        let stored = self.0.load(std::sync::atomic::Ordering::Relaxed);
        let (at, pending) = (stored >> 1, stored & 1 == 1);
        (stored != 0 && now_ms >= at && now_ms - at < Self::FRESH_MS).then_some(pending)
    }

    pub fn set(&self, now_ms: i64, pending: bool) {
        let stored = (now_ms.max(1) << 1) | i64::from(pending);
        self.0.store(stored, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn forget(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

const DAY_MS: i64 = 86_400_000;
/// Longest retention or auto-disable period accepted.
const MAX_PERIOD_MS: i64 = 3650 * DAY_MS;

impl DeliveryArgs {
    pub fn settings(&self) -> Result<DeliverySettings, String> {
        let lease_ms = parse_period(&self.send_lease).map_err(|e| format!("--send-lease: {e}"))?;
        if self.max_deliveries_per_organisation == 0 {
            return Err("--max-deliveries-per-organisation must be at least 1".into());
        }
        if !(1_000..=3_600_000).contains(&lease_ms) {
            return Err("--send-lease must be between 1s and 1h".into());
        }
        Ok(DeliverySettings {
            retention_ms: parse_period(&self.delivery_retention)
                .map_err(|e| format!("--delivery-retention: {e}"))?,
            max_per_organisation: i64::from(self.max_deliveries_per_organisation),
            auto_disable_after_ms: if self.auto_disable_after == "off" {
                None
            } else {
                Some(
                    parse_period(&self.auto_disable_after)
                        .map_err(|e| format!("--auto-disable-after: {e}"))?,
                )
            },
            lease_ms,
            pending: Default::default(),
        })
    }
}

/// A whole number followed by ms, s, m, h or d; more than 0 and at most 3650 days.
pub fn parse_period(text: &str) -> Result<i64, String> {
    let max_ms = MAX_PERIOD_MS.unsigned_abs();
    crate::time::parse_period_ms(text, true, max_ms, "3650d")
        .map(|ms| i64::try_from(ms).unwrap_or(MAX_PERIOD_MS))
}

/// The queued sends' table: the same columns on both databases, but for how the id is generated.
macro_rules! delivery_sends_table {
    ($id:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS delivery_sends (
                id ",
            $id,
            ",
                organisation_id TEXT NOT NULL,
                webhook_id TEXT NOT NULL,
                event_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                kind TEXT NOT NULL,
                body TEXT NOT NULL,
                body_json_bytes BIGINT NOT NULL,
                state TEXT NOT NULL,
                lease_until_ms BIGINT NOT NULL,
                proxy TEXT,
                claims BIGINT NOT NULL,
                created_ms BIGINT NOT NULL,
                finished_ms BIGINT,
                outcome TEXT)"
        )
    };
}

fn schema(postgres: bool) -> Vec<&'static str> {
    vec![
        "CREATE TABLE IF NOT EXISTS delivery_events (
            organisation_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            created_ms BIGINT NOT NULL,
            envelope_head TEXT,
            envelope_tail TEXT,
            stored_ms BIGINT NOT NULL,
            PRIMARY KEY (organisation_id, event_id))",
        "CREATE INDEX IF NOT EXISTS delivery_events_by_age ON delivery_events (stored_ms)",
        "CREATE TABLE IF NOT EXISTS deliveries (
            webhook_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            organisation_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            status TEXT NOT NULL,
            created_ms BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL,
            attempt_count BIGINT NOT NULL,
            last_http_status BIGINT,
            last_error TEXT,
            PRIMARY KEY (webhook_id, event_id))",
        // A webhook's recent deliveries, newest first, and those of one status (failures).
        // (The organisation is in them too: the list asks for both, and so one index answers it in order.)
        "CREATE INDEX IF NOT EXISTS deliveries_recent ON deliveries \
         (webhook_id, organisation_id, created_ms, event_id)",
        "CREATE INDEX IF NOT EXISTS deliveries_by_status ON deliveries \
         (webhook_id, organisation_id, status, created_ms, event_id)",
        // Retention and the per-organisation bound.
        "CREATE INDEX IF NOT EXISTS deliveries_by_organisation ON deliveries (organisation_id, updated_ms)",
        "CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries (organisation_id, event_id)",
        "CREATE TABLE IF NOT EXISTS delivery_attempts (
            webhook_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            organisation_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            at_ms BIGINT NOT NULL,
            http_status BIGINT,
            error TEXT,
            latency_ms BIGINT,
            outcome TEXT NOT NULL,
            reason TEXT,
            send_id BIGINT,
            proxy TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS delivery_attempts_by_delivery ON delivery_attempts (webhook_id, event_id, at_ms)",
        "CREATE INDEX IF NOT EXISTS delivery_attempts_by_age ON delivery_attempts (at_ms)",
        if postgres {
            delivery_sends_table!("BIGSERIAL PRIMARY KEY")
        } else {
            delivery_sends_table!("INTEGER PRIMARY KEY AUTOINCREMENT")
        },
        // One open send per delivery: a second resend while one is queued or leased queues nothing.
        "CREATE UNIQUE INDEX IF NOT EXISTS delivery_sends_open ON delivery_sends (webhook_id, event_id) \
         WHERE state = 'open'",
        "CREATE INDEX IF NOT EXISTS delivery_sends_claimable ON delivery_sends (state, lease_until_ms, id)",
        "CREATE TABLE IF NOT EXISTS webhook_health (
            webhook_id TEXT PRIMARY KEY,
            organisation_id TEXT NOT NULL,
            last_success_ms BIGINT,
            failing_since_ms BIGINT,
            last_failure_ms BIGINT,
            disabled_reason TEXT,
            disabled_ms BIGINT)",
    ]
}

/// Creates the delivery log's tables (on start, after the store's own).
pub async fn migrate(store: &Store) -> Result<(), String> {
    let run = async {
        let mut tx = store.pool().begin().await?;
        if store.is_postgres() {
            sqlx::query("SELECT pg_advisory_xact_lock(7215860414)")
                .execute(&mut *tx)
                .await?;
        }
        for statement in schema(store.is_postgres()) {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        tx.commit().await
    };
    run.await
        .map_err(|e| format!("--database: creating the delivery log's tables failed: {e}"))
}

/// One event of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedEvent {
    pub event_id: String,
    pub organisation_id: String,
    pub event_type: String,
    pub created_ms: i64,
    /// The envelope around the webhook id; None when it was larger than the proxy keeps.
    pub envelope: Option<(String, String)>,
}

/// One attempt (or final outcome) of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedAttempt {
    pub event_id: String,
    pub webhook_id: String,
    pub organisation_id: String,
    pub event_type: String,
    pub attempt: i64,
    pub at_ms: i64,
    pub http_status: Option<i64>,
    pub error: Option<String>,
    pub latency_ms: Option<i64>,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub send_id: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Retrying,
    Delivered,
    Failed,
    Dropped,
}

impl Outcome {
    pub fn parse(text: &str) -> Option<Outcome> {
        Some(match text {
            "retrying" => Outcome::Retrying,
            "delivered" => Outcome::Delivered,
            "failed" => Outcome::Failed,
            "dropped" => Outcome::Dropped,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Retrying => "retrying",
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }

    /// The delivery's status after this outcome.
    pub fn status(self) -> &'static str {
        match self {
            Outcome::Retrying => "pending",
            Outcome::Delivered => "delivered",
            Outcome::Failed | Outcome::Dropped => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        self != Outcome::Retrying
    }
}

/// A report, read and checked (api/reports.rs reads it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub proxy: String,
    pub events: Vec<ReportedEvent>,
    pub attempts: Vec<ReportedAttempt>,
    pub holding: Vec<i64>,
}

/// Rows per multi-row INSERT (well under SQLite's and Postgres' limits on bound values).
pub const ROWS_PER_INSERT: usize = 100;

/// One `deliveries` row's change from one report: the attempts of one (webhook, event) folded together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryChange {
    pub webhook_id: String,
    pub event_id: String,
    pub organisation_id: String,
    pub event_type: String,
    pub status: &'static str,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub attempt_count: i64,
    pub last_http_status: Option<i64>,
    pub last_error: Option<String>,
}

/// Folds a report's attempts per (webhook, event): the latest attempt gives the status; attempts that left
/// (attempt 1 and up) are counted. A new row's creation time is its event's, when the report has the event.
pub fn fold_deliveries(report: &Report) -> Vec<DeliveryChange> {
    let created: BTreeMap<(&str, &str), i64> = report
        .events
        .iter()
        .map(|e| {
            (
                (e.organisation_id.as_str(), e.event_id.as_str()),
                e.created_ms,
            )
        })
        .collect();
    let mut changes: BTreeMap<(&str, &str), DeliveryChange> = BTreeMap::new();
    for a in &report.attempts {
        let left = i64::from(a.attempt > 0);
        let change = changes
            .entry((a.webhook_id.as_str(), a.event_id.as_str()))
            .or_insert_with(|| DeliveryChange {
                webhook_id: a.webhook_id.clone(),
                event_id: a.event_id.clone(),
                organisation_id: a.organisation_id.clone(),
                event_type: a.event_type.clone(),
                status: a.outcome.status(),
                created_ms: created
                    .get(&(a.organisation_id.as_str(), a.event_id.as_str()))
                    .copied()
                    .unwrap_or(a.at_ms)
                    .min(a.at_ms),
                updated_ms: i64::MIN,
                attempt_count: 0,
                last_http_status: None,
                last_error: None,
            });
        change.attempt_count += left;
        change.created_ms = change.created_ms.min(a.at_ms);
        // Same time: a final outcome wins over a retry.
        if a.at_ms > change.updated_ms || (a.at_ms == change.updated_ms && a.outcome.is_final()) {
            change.updated_ms = a.at_ms;
            change.status = a.outcome.status();
            if a.http_status.is_some() || a.error.is_some() {
                change.last_http_status = a.http_status;
                change.last_error = a.error.clone();
            }
        }
    }
    changes.into_values().collect()
}

/// Placeholders `($1, …, $n), (…)` for `rows` rows of `columns` values each.
pub fn placeholders(rows: usize, columns: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..columns {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(r * columns + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

/// One delivery as the API shows it, with its attempts (oldest first).
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub event_id: String,
    pub event_type: String,
    pub status: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub attempt_count: i64,
    pub last_http_status: Option<i64>,
    pub last_error: Option<String>,
    pub attempts: Vec<AttemptRow>,
}

#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub attempt: i64,
    pub at_ms: i64,
    pub http_status: Option<i64>,
    pub error: Option<String>,
    pub latency_ms: Option<i64>,
    pub outcome: String,
    pub reason: Option<String>,
    pub send_id: Option<i64>,
}

/// Where a page of the list starts: after this (created, event id), newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_ms: i64,
    pub event_id: String,
}

const DELIVERY_COLUMNS: &str =
    "event_id, event_type, status, created_ms, updated_ms, attempt_count, \
    last_http_status, last_error";

fn row_to_delivery(row: &sqlx::any::AnyRow) -> Result<DeliveryRow, sqlx::Error> {
    Ok(DeliveryRow {
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        status: row.try_get("status")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        attempt_count: row.try_get("attempt_count")?,
        last_http_status: row.try_get("last_http_status")?,
        last_error: row.try_get("last_error")?,
        attempts: Vec::new(),
    })
}

/// A page of a webhook's deliveries, newest first, `limit + 1` rows read so the caller knows if more follow.
/// Each delivery carries at most its last `attempts_each` attempts.
pub async fn list(
    pool: &AnyPool,
    organisation: &str,
    webhook: &str,
    status: Option<&str>,
    after: Option<&Cursor>,
    limit: i64,
    attempts_each: usize,
) -> Result<Vec<DeliveryRow>, sqlx::Error> {
    let mut sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE webhook_id = $1 AND organisation_id = $2"
    );
    let mut next = 3;
    if status.is_some() {
        sql.push_str(&format!(" AND status = ${next}"));
        next += 1;
    }
    if after.is_some() {
        sql.push_str(&format!(
            " AND (created_ms < ${next} OR (created_ms = ${next} AND event_id < ${}))",
            next + 1
        ));
        next += 2;
    }
    sql.push_str(&format!(
        " ORDER BY created_ms DESC, event_id DESC LIMIT ${next}"
    ));
    let mut query = sqlx::query(&sql).bind(webhook).bind(organisation);
    if let Some(status) = status {
        query = query.bind(status);
    }
    if let Some(cursor) = after {
        query = query.bind(cursor.created_ms).bind(&cursor.event_id);
    }
    let rows = query.bind(limit + 1).fetch_all(pool).await?;
    let mut deliveries = rows
        .iter()
        .map(row_to_delivery)
        .collect::<Result<Vec<_>, _>>()?;
    attach_attempts(pool, webhook, &mut deliveries, attempts_each).await?;
    Ok(deliveries)
}

/// One delivery with up to `attempts_most` of its last attempts, and its payload as sent (None when the envelope
/// was not kept).
pub async fn get(
    pool: &AnyPool,
    organisation: &str,
    webhook: &str,
    event: &str,
    attempts_most: usize,
) -> Result<Option<(DeliveryRow, Option<String>)>, sqlx::Error> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE webhook_id = $1 AND organisation_id = $2 \
         AND event_id = $3"
    );
    let Some(row) = sqlx::query(&sql)
        .bind(webhook)
        .bind(organisation)
        .bind(event)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let mut deliveries = vec![row_to_delivery(&row)?];
    attach_attempts(pool, webhook, &mut deliveries, attempts_most).await?;
    let payload = payload(pool, organisation, webhook, event).await?;
    Ok(deliveries.pop().map(|d| (d, payload)))
}

/// The body sent to `webhook` for `event`, rebuilt from the stored envelope.
pub async fn payload(
    pool: &AnyPool,
    organisation: &str,
    webhook: &str,
    event: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT envelope_head, envelope_tail FROM delivery_events WHERE organisation_id = $1 AND event_id = $2",
    )
    .bind(organisation)
    .bind(event)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let head: Option<String> = row.try_get("envelope_head")?;
    let tail: Option<String> = row.try_get("envelope_tail")?;
    Ok(head.zip(tail).map(|(h, t)| body_for(&h, &t, webhook)))
}

/// `head`, the webhook id as a JSON string, `tail`: the body as the proxy sent it.
pub fn body_for(head: &str, tail: &str, webhook: &str) -> String {
    let id = serde_json::Value::String(webhook.to_string()).to_string();
    let mut body = String::with_capacity(head.len() + id.len() + tail.len());
    body.push_str(head);
    body.push_str(&id);
    body.push_str(tail);
    body
}

async fn attach_attempts(
    pool: &AnyPool,
    webhook: &str,
    deliveries: &mut [DeliveryRow],
    each: usize,
) -> Result<(), sqlx::Error> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let list = (0..deliveries.len())
        .map(|i| format!("${}", i + 2))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT event_id, attempt, at_ms, http_status, error, latency_ms, outcome, reason, send_id \
         FROM delivery_attempts WHERE webhook_id = $1 AND event_id IN ({list}) ORDER BY at_ms, attempt"
    );
    let mut query = sqlx::query(&sql).bind(webhook);
    for d in deliveries.iter() {
        query = query.bind(&d.event_id);
    }
    let mut by_event: BTreeMap<String, Vec<AttemptRow>> = BTreeMap::new();
    for row in query.fetch_all(pool).await? {
        let event: String = row.try_get("event_id")?;
        by_event.entry(event).or_default().push(AttemptRow {
            attempt: row.try_get("attempt")?,
            at_ms: row.try_get("at_ms")?,
            http_status: row.try_get("http_status")?,
            error: row.try_get("error")?,
            latency_ms: row.try_get("latency_ms")?,
            outcome: row.try_get("outcome")?,
            reason: row.try_get("reason")?,
            send_id: row.try_get("send_id")?,
        });
    }
    for d in deliveries.iter_mut() {
        let mut attempts = by_event.remove(&d.event_id).unwrap_or_default();
        let skip = attempts.len().saturating_sub(each);
        attempts.drain(..skip);
        d.attempts = attempts;
    }
    Ok(())
}

/// Marks deliveries pending again (a send was queued for them), as of `now_ms`.
pub async fn mark_pending(
    tx: &mut Transaction<'_, Any>,
    webhook: &str,
    events: &[String],
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let list = (0..chunk.len())
            .map(|i| format!("${}", i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE deliveries SET status = 'pending', updated_ms = $1 WHERE webhook_id = $2 \
             AND event_id IN ({list})"
        );
        let mut query = sqlx::query(&sql).bind(now_ms).bind(webhook);
        for e in chunk {
            query = query.bind(e);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
