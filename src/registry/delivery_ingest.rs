//! Storing a proxy's report (`POST /v2/registry/reports`) in one transaction: the delivery log's rows
//! (delivery_log.rs), the webhooks' health (delivery_upkeep.rs) and the sends it completes or renews (sends.rs).

use super::delivery_log::{fold_deliveries, placeholders, Report, ROWS_PER_INSERT};
use super::store::Store;
use super::{delivery_upkeep, sends};

/// Stores a report in one transaction: events (each once), attempts, the deliveries' status, the webhooks'
/// health, the sends it completes and the leases it renews.
pub async fn store_report(
    store: &Store,
    report: &Report,
    now_ms: i64,
    lease_ms: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = store.pool().begin().await?;
    // A write first, so SQLite takes its write lock before any read of this transaction.
    // Rows in key order, so concurrent reports on Postgres take their row locks in one order (no deadlock).
    let mut events: Vec<_> = report.events.iter().collect();
    events
        .sort_by(|a, b| (&a.organisation_id, &a.event_id).cmp(&(&b.organisation_id, &b.event_id)));
    events.dedup_by(|a, b| (&a.organisation_id, &a.event_id) == (&b.organisation_id, &b.event_id));
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO delivery_events (organisation_id, event_id, event_type, created_ms, envelope_head, \
             envelope_tail, stored_ms) VALUES {} ON CONFLICT (organisation_id, event_id) DO NOTHING",
            placeholders(chunk.len(), 7)
        );
        let mut query = sqlx::query(&sql);
        for e in chunk {
            query = query
                .bind(&e.organisation_id)
                .bind(&e.event_id)
                .bind(&e.event_type)
                .bind(e.created_ms)
                .bind(e.envelope.as_ref().map(|(head, _)| head.as_str()))
                .bind(e.envelope.as_ref().map(|(_, tail)| tail.as_str()))
                .bind(now_ms);
        }
        query.execute(&mut *tx).await?;
    }
    for chunk in report.attempts.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO delivery_attempts (webhook_id, event_id, organisation_id, attempt, at_ms, http_status, \
             error, latency_ms, outcome, reason, send_id, proxy) VALUES {}",
            placeholders(chunk.len(), 12)
        );
        let mut query = sqlx::query(&sql);
        for a in chunk {
            query = query
                .bind(&a.webhook_id)
                .bind(&a.event_id)
                .bind(&a.organisation_id)
                .bind(a.attempt)
                .bind(a.at_ms)
                .bind(a.http_status)
                .bind(a.error.as_deref())
                .bind(a.latency_ms)
                .bind(a.outcome.as_str())
                .bind(a.reason.as_deref())
                .bind(a.send_id)
                .bind(&report.proxy);
        }
        query.execute(&mut *tx).await?;
    }
    let changes = fold_deliveries(report);
    for chunk in changes.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO deliveries (webhook_id, event_id, organisation_id, event_type, status, created_ms, \
             updated_ms, attempt_count, last_http_status, last_error) VALUES {} \
             ON CONFLICT (webhook_id, event_id) DO UPDATE SET \
             attempt_count = deliveries.attempt_count + excluded.attempt_count, \
             status = CASE WHEN excluded.updated_ms >= deliveries.updated_ms THEN excluded.status \
                 ELSE deliveries.status END, \
             last_http_status = CASE WHEN excluded.updated_ms >= deliveries.updated_ms \
                 AND (excluded.last_http_status IS NOT NULL OR excluded.last_error IS NOT NULL) \
                 THEN excluded.last_http_status ELSE deliveries.last_http_status END, \
             last_error = CASE WHEN excluded.updated_ms >= deliveries.updated_ms \
                 AND (excluded.last_http_status IS NOT NULL OR excluded.last_error IS NOT NULL) \
                 THEN excluded.last_error ELSE deliveries.last_error END, \
             updated_ms = CASE WHEN excluded.updated_ms > deliveries.updated_ms THEN excluded.updated_ms \
                 ELSE deliveries.updated_ms END",
            placeholders(chunk.len(), 10)
        );
        let mut query = sqlx::query(&sql);
        for c in chunk {
            query = query
                .bind(&c.webhook_id)
                .bind(&c.event_id)
                .bind(&c.organisation_id)
                .bind(&c.event_type)
                .bind(c.status)
                .bind(c.created_ms)
                .bind(c.updated_ms)
                .bind(c.attempt_count)
                .bind(c.last_http_status)
                .bind(c.last_error.as_deref());
        }
        query.execute(&mut *tx).await?;
    }
    delivery_upkeep::record_health(&mut tx, store.is_postgres(), report).await?;
    sends::settle(&mut tx, report, now_ms, lease_ms).await?;
    tx.commit().await
}
