//! The delivery log's background work and the webhooks' health: retention (`--delivery-retention`), the bound
//! per organisation (`--max-deliveries-per-organisation`), and auto-disable (`--auto-disable-after`) of a
//! webhook whose deliveries have all failed for that long with no success in between.

use super::delivery_log::{DeliverySettings, Outcome, Report};
use super::store::{Audit, Store};
use super::{log, now_ms, rfc3339};
use sqlx::{Any, Row, Transaction};
use std::collections::BTreeMap;
use std::time::Duration;

/// Since when a webhook's deliveries have been failing, and when they last succeeded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    pub last_success_ms: Option<i64>,
    /// The first failure after the last success; None while the last attempt succeeded.
    pub failing_since_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
}

impl Health {
    /// Takes one attempt into account; attempts may come in any order (several proxies, late reports).
    pub fn record(&mut self, at_ms: i64, succeeded: bool) {
        if succeeded {
            self.last_success_ms = Some(self.last_success_ms.map_or(at_ms, |s| s.max(at_ms)));
            if self.failing_since_ms.is_some_and(|f| f <= at_ms) {
                // Failures after this success (a late report of an earlier success) stay failing.
                if self.last_failure_ms.is_some_and(|l| l > at_ms) {
                    self.failing_since_ms = self.last_failure_ms;
                } else {
                    self.failing_since_ms = None;
                    self.last_failure_ms = None;
                }
            }
        } else if self.last_success_ms.is_none_or(|s| at_ms > s) {
            self.failing_since_ms = Some(self.failing_since_ms.map_or(at_ms, |f| f.min(at_ms)));
            self.last_failure_ms = Some(self.last_failure_ms.map_or(at_ms, |l| l.max(at_ms)));
        }
    }
}

/// Updates `webhook_health` with a report's attempts. An attempt that reached the endpoint and was answered
/// with a 2xx is a success; one answered otherwise or not answered is a failure; drops (the proxy never sent)
/// say nothing about the endpoint.
pub async fn record_health(
    tx: &mut Transaction<'_, Any>,
    postgres: bool,
    report: &Report,
) -> Result<(), sqlx::Error> {
    // Per webhook: its organisation and its attempts as (time, succeeded).
    type Attempts<'a> = (&'a str, Vec<(i64, bool)>);
    let mut by_webhook: BTreeMap<&str, Attempts> = BTreeMap::new();
    for a in &report.attempts {
        let succeeded = match a.outcome {
            Outcome::Delivered => true,
            Outcome::Retrying | Outcome::Failed if a.attempt > 0 => false,
            _ => continue,
        };
        by_webhook
            .entry(&a.webhook_id)
            .or_insert_with(|| (&a.organisation_id, Vec::new()))
            .1
            .push((a.at_ms, succeeded));
    }
    let lock = if postgres { " FOR UPDATE" } else { "" };
    for (webhook, (organisation, attempts)) in by_webhook {
        let row = sqlx::query(&format!(
            "SELECT last_success_ms, failing_since_ms, last_failure_ms FROM webhook_health \
             WHERE webhook_id = $1{lock}"
        ))
        .bind(webhook)
        .fetch_optional(&mut **tx)
        .await?;
        let mut health = match &row {
            Some(row) => Health {
                last_success_ms: row.try_get("last_success_ms")?,
                failing_since_ms: row.try_get("failing_since_ms")?,
                last_failure_ms: row.try_get("last_failure_ms")?,
            },
            None => Health::default(),
        };
        for (at, succeeded) in attempts {
            health.record(at, succeeded);
        }
        sqlx::query(
            "INSERT INTO webhook_health (webhook_id, organisation_id, last_success_ms, failing_since_ms, \
             last_failure_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (webhook_id) DO UPDATE SET \
             last_success_ms = excluded.last_success_ms, failing_since_ms = excluded.failing_since_ms, \
             last_failure_ms = excluded.last_failure_ms",
        )
        .bind(webhook)
        .bind(organisation)
        .bind(health.last_success_ms)
        .bind(health.failing_since_ms)
        .bind(health.last_failure_ms)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Re-enabling a webhook clears its auto-disable reason and starts its failure clock again.
pub async fn clear_health(store: &Store, webhook: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_health SET disabled_reason = NULL, disabled_ms = NULL, failing_since_ms = NULL, \
         last_failure_ms = NULL WHERE webhook_id = $1",
    )
    .bind(webhook)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Adds `disabledReason` to the disabled webhooks (API objects) of `organisation` that the registry disabled.
pub async fn add_disabled_reasons(
    store: &Store,
    organisation: &str,
    webhooks: &mut [serde_json::Value],
) -> Result<(), sqlx::Error> {
    if !webhooks.iter().any(|w| w["status"] == "disabled") {
        return Ok(());
    }
    let rows = sqlx::query(
        "SELECT webhook_id, disabled_reason FROM webhook_health WHERE organisation_id = $1 \
         AND disabled_reason IS NOT NULL",
    )
    .bind(organisation)
    .fetch_all(store.pool())
    .await?;
    let mut reasons = BTreeMap::new();
    for row in rows {
        reasons.insert(
            row.try_get::<String, _>("webhook_id")?,
            row.try_get::<String, _>("disabled_reason")?,
        );
    }
    for w in webhooks.iter_mut() {
        if w["status"] == "disabled" {
            if let Some(reason) = w["id"].as_str().and_then(|id| reasons.get(id)) {
                w["disabledReason"] = serde_json::Value::String(reason.clone());
            }
        }
    }
    Ok(())
}

/// How often the background work runs: a tenth of the shortest period, between 250 ms and a minute.
pub fn upkeep_interval(settings: &DeliverySettings) -> Duration {
    let shortest = settings
        .auto_disable_after_ms
        .map_or(settings.retention_ms, |a| a.min(settings.retention_ms));
    Duration::from_millis(u64::try_from((shortest / 10).clamp(250, 60_000)).unwrap_or(60_000))
}

/// Prunes and auto-disables, forever. A failing round is logged once until one succeeds again.
pub async fn upkeep_forever(store: &Store, settings: DeliverySettings) {
    let mut failing = false;
    loop {
        tokio::time::sleep(upkeep_interval(&settings)).await;
        let round = async {
            prune(store, &settings, now_ms()).await?;
            if let Some(after) = settings.auto_disable_after_ms {
                auto_disable(store, after).await?;
            }
            Ok::<(), sqlx::Error>(())
        };
        match round.await {
            Ok(()) if failing => {
                failing = false;
                log("delivery log upkeep works again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                log(&format!(
                    "delivery log upkeep failed (retried every {:?}): {e}",
                    upkeep_interval(&settings)
                ));
            }
            Err(_) => {}
        }
    }
}

/// Deletes what is older than the retention, then each organisation's oldest deliveries beyond its bound.
/// Returns how many deliveries were deleted.
pub async fn prune(
    store: &Store,
    settings: &DeliverySettings,
    now_ms: i64,
) -> Result<u64, sqlx::Error> {
    let pool = store.pool();
    let cutoff = now_ms.saturating_sub(settings.retention_ms);
    let mut deleted = sqlx::query("DELETE FROM deliveries WHERE updated_ms < $1")
        .bind(cutoff)
        .execute(pool)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM delivery_sends WHERE state <> 'open' AND created_ms < $1")
        .bind(cutoff)
        .execute(pool)
        .await?;
    let over = sqlx::query(
        "SELECT organisation_id FROM deliveries GROUP BY organisation_id HAVING COUNT(*) > $1",
    )
    .bind(settings.max_per_organisation)
    .fetch_all(pool)
    .await?;
    for row in over {
        let organisation: String = row.try_get("organisation_id")?;
        // The newest row beyond the bound: it and every older one go (ties go too, so the bound holds).
        let Some(edge) = sqlx::query(
            "SELECT updated_ms FROM deliveries WHERE organisation_id = $1 ORDER BY updated_ms DESC \
             LIMIT 1 OFFSET $2",
        )
        .bind(&organisation)
        .bind(settings.max_per_organisation)
        .fetch_optional(pool)
        .await?
        else {
            continue;
        };
        let edge: i64 = edge.try_get("updated_ms")?;
        deleted +=
            sqlx::query("DELETE FROM deliveries WHERE organisation_id = $1 AND updated_ms <= $2")
                .bind(&organisation)
                .bind(edge)
                .execute(pool)
                .await?
                .rows_affected();
        log(&format!(
            "organisation {organisation:?} has more than {} deliveries: the oldest were pruned \
             (--max-deliveries-per-organisation)",
            settings.max_per_organisation
        ));
    }
    if deleted > 0 {
        // Attempts and envelopes of the deliveries deleted.
        sqlx::query(
            "DELETE FROM delivery_attempts WHERE NOT EXISTS (SELECT 1 FROM deliveries d \
             WHERE d.webhook_id = delivery_attempts.webhook_id AND d.event_id = delivery_attempts.event_id)",
        )
        .execute(pool)
        .await?;
        sqlx::query(
            "DELETE FROM delivery_events WHERE NOT EXISTS (SELECT 1 FROM deliveries d \
             WHERE d.organisation_id = delivery_events.organisation_id AND d.event_id = delivery_events.event_id)",
        )
        .execute(pool)
        .await?;
    }
    // Health rows of deleted webhooks.
    sqlx::query(
        "DELETE FROM webhook_health WHERE NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.id = webhook_health.webhook_id)",
    )
    .execute(pool)
    .await?;
    Ok(deleted)
}

/// Disables every enabled webhook whose deliveries have all failed for `after_ms`: a write like an admin's
/// (the revision moves, so the proxies stop delivering to it), audited as `auto-disable` by `registry`, with a
/// reason the API and the dashboard show until the webhook is enabled again.
pub async fn auto_disable(store: &Store, after_ms: i64) -> Result<(), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT webhook_id, organisation_id, failing_since_ms, last_failure_ms FROM webhook_health \
         WHERE failing_since_ms IS NOT NULL AND last_failure_ms IS NOT NULL \
         AND last_failure_ms - failing_since_ms >= $1 ORDER BY webhook_id LIMIT 100",
    )
    .bind(after_ms)
    .fetch_all(store.pool())
    .await?;
    for row in rows {
        let id: String = row.try_get("webhook_id")?;
        let organisation: String = row.try_get("organisation_id")?;
        let since: i64 = row.try_get("failing_since_ms")?;
        let last: i64 = row.try_get("last_failure_ms")?;
        let now = now_ms();
        let reason = format!(
            "disabled automatically at {}: every delivery failed from {} to {}, with no success in between \
             (--auto-disable-after {}); enable it again once the endpoint works",
            rfc3339(now),
            rfc3339(since),
            rfc3339(last),
            describe_period(after_ms)
        );
        let Some(webhook) = store.get(&organisation, &id).await? else {
            continue;
        };
        if webhook.status == "enabled" {
            // The reason first: it shows only while the webhook is disabled, so it is there the moment the
            // write below is seen. The failure clock stops only once the write is done.
            set_reason(store, &id, Some(&reason), now).await?;
            let mut disabled = webhook.clone();
            disabled.status = "disabled".into();
            disabled.updated_ms = now;
            let written = store
                .put(
                    &disabled,
                    Some(&webhook.key_sealed),
                    Audit {
                        at_ms: now,
                        actor: "registry",
                        role: "registry",
                        action: "auto-disable",
                        detail: serde_json::json!({"status": "disabled", "reason": reason})
                            .to_string(),
                    },
                )
                .await?;
            if !written {
                // Changed meanwhile: the next round looks again.
                set_reason(store, &id, None, now).await?;
                continue;
            }
            log(&format!(
                "auto-disabled webhook {id} of organisation {organisation:?}: every delivery failed from {} to {}",
                rfc3339(since),
                rfc3339(last)
            ));
            sqlx::query(
                "UPDATE webhook_health SET failing_since_ms = NULL, last_failure_ms = NULL WHERE webhook_id = $1",
            )
            .bind(&id)
            .execute(store.pool())
            .await?;
        } else {
            // Disabled by an admin meanwhile: nothing to do, and the clock starts again when enabled.
            sqlx::query(
                "UPDATE webhook_health SET failing_since_ms = NULL, last_failure_ms = NULL WHERE webhook_id = $1",
            )
            .bind(&id)
            .execute(store.pool())
            .await?;
        }
    }
    Ok(())
}

async fn set_reason(
    store: &Store,
    webhook: &str,
    reason: Option<&str>,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_health SET disabled_reason = $1, disabled_ms = $2 WHERE webhook_id = $3",
    )
    .bind(reason)
    .bind(reason.map(|_| now_ms))
    .bind(webhook)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// `5d`, `36h`, `90s`, `250ms`: the largest unit that divides the period.
pub fn describe_period(ms: i64) -> String {
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms % scale == 0 {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}
