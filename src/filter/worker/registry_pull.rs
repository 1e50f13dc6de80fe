//! The registry pull: the feed (`GET /v2/registry/changes?since=N`, docs/registry-feed.md)
//! polled one request at a time, its pages followed back to back while more are left, each
//! applied to the registry's table (src/registry_sync.rs) as it arrives: a removed webhook's
//! queued deliveries go with it. Events emitted before the first complete listing wait for it.
//! A new configuration (`adopt`) lists the registry again.

use super::{Waiting, Worker, USER_AGENT};
use crate::config::Plan;
use crate::delivery::Outbox;
use crate::filter::host::{log, Callout, Host, LogLevel};
use crate::filter::metrics::Metrics;
use crate::filter::unusable_path::LogSampler;
use crate::headers;
use crate::registry_sync::{Applied, RegistrySync, RegistryTable};
use std::collections::VecDeque;
use std::rc::Rc;

/// The registry feed as this worker pulls it.
pub(super) struct RegistryPull {
    sync: RegistrySync,
    next_poll_ms: u64,
    polling: bool,
    /// The last poll failed: the failure was logged, and the recovery will be.
    failing: bool,
    /// When this pull started (the age of a sync that never completed counts from here).
    started_ms: Option<u64>,
    /// Gauges as last reported by this worker: registry webhooks in force, revision lag, and
    /// the age of the last complete sync.
    reported: (i64, i64, i64),
    /// Events emitted before the first complete listing: the configured webhooks have them; the
    /// registry's get them when the listing ends (charged to the outbox's bounds meanwhile).
    waiting: VecDeque<Waiting>,
    waiting_bytes: usize,
    /// Webhooks refused over `registry.maxWebhooks` are logged at most once a second, saying
    /// how many were refused since the last line.
    refused_lines: LogSampler,
    refused_unlogged: usize,
}

/// A registry poll's answer, as the host reported it.
#[derive(Debug)]
pub enum RegistryAnswer {
    Status { code: u16, body: Vec<u8> },
    Failed(String),
}

/// A registry poll is cut off after this long.
const REGISTRY_TIMEOUT_MS: u64 = 5_000;
/// The sync-age gauge moves in steps of this much (one host call per step, not per tick).
const AGE_STEP_MS: i64 = 1_000;

impl RegistryPull {
    pub(super) fn new() -> Self {
        RegistryPull {
            sync: RegistrySync::new(),
            next_poll_ms: 0,
            polling: false,
            failing: false,
            started_ms: None,
            reported: (0, 0, 0),
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            refused_lines: LogSampler::default(),
            refused_unlogged: 0,
        }
    }

    /// Keeps an event until the first document arrives, within what the outbox's bounds leave
    /// (the proxy's, shared with the deliveries): the waiting events are charged to them.
    pub(super) fn wait(
        &mut self,
        host: &dyn Host,
        metrics: Metrics,
        event: Waiting,
        outbox: &mut Outbox,
    ) {
        let size = event.payload.held_bytes();
        let (room, room_bytes) = outbox.room();
        if room == 0 || size > room_bytes {
            metrics.events_dropped_registry_not_loaded.inc(host);
            log(host, LogLevel::Error, || {
                format!(
                    "event dropped for the registry's webhooks: event={} reason=the registry has not answered yet and the events waiting for it fill the outbox's bounds",
                    event.event_id
                )
            });
            return;
        }
        self.waiting_bytes += size;
        self.waiting.push_back(event);
        outbox.reserve(self.waiting.len(), self.waiting_bytes);
    }

    /// The pull ends (a new configuration has no `registry`): the events still waiting for the
    /// first complete listing are dropped, each logged and counted, and this worker's gauges go
    /// back to what they were before it reported anything.
    fn end(mut self, host: &dyn Host, metrics: Metrics) {
        for event in self.waiting.drain(..) {
            metrics.events_dropped_registry_not_loaded.inc(host);
            log(host, LogLevel::Error, || {
                format!(
                    "event dropped for the registry's webhooks: event={} reason=a new configuration removed registry before its first complete listing",
                    event.event_id
                )
            });
        }
        self.waiting_bytes = 0;
        let (count, lag, age) = self.reported;
        for (reported, metric) in [
            (count, metrics.registry_webhooks),
            (lag, metrics.registry_revision_lag),
            (age, metrics.registry_sync_age_ms),
        ] {
            if reported != 0 {
                metric.add(host, -reported);
            }
        }
        self.reported = (0, 0, 0);
    }
}

impl RegistryPull {
    pub(super) fn table(&self) -> &Rc<RegistryTable> {
        self.sync.table()
    }

    /// Moves this worker's gauges to what the pull holds now.
    fn report(&mut self, host: &dyn Host, metrics: Metrics, now_ms: u64) {
        let since = self
            .sync
            .complete_ms()
            .or(self.started_ms)
            .unwrap_or(now_ms);
        let age = i64::try_from(now_ms.saturating_sub(since)).unwrap_or(i64::MAX);
        let count = i64::try_from(self.sync.table().len()).unwrap_or(i64::MAX);
        let lag = i64::try_from(self.sync.lag()).unwrap_or(i64::MAX);
        let (reported_count, reported_lag, reported_age) = &mut self.reported;
        for (now, before, metric) in [
            (count, reported_count, metrics.registry_webhooks),
            (lag, reported_lag, metrics.registry_revision_lag),
        ] {
            if now != *before {
                metric.add(host, now - *before);
                *before = now;
            }
        }
        if (age - *reported_age).abs() >= AGE_STEP_MS || (age < *reported_age) {
            metrics.registry_sync_age_ms.add(host, age - *reported_age);
            *reported_age = age;
        }
    }
}

impl Worker {
    /// The registry's webhooks are not known yet (its first complete listing has not ended).
    pub(super) fn waiting_for_registry(&self) -> bool {
        self.registry.as_ref().is_some_and(|p| !p.sync.loaded())
    }

    /// Moves this worker onto a new plan. Queued deliveries to webhooks that are gone are
    /// dropped, and queued dead letters with no dead-letter endpoint left are lost: each is
    /// logged and counted.
    pub fn adopt(&mut self, host: &dyn Host, plan: Plan) {
        if plan.registry.is_some() {
            let pull = match self.registry.take() {
                Some(mut pull) => {
                    // Registry webhooks were checked against the old configuration: list again,
                    // keeping the copy in force until that listing ends.
                    pull.sync.relist();
                    pull
                }
                None => RegistryPull::new(),
            };
            self.registry = Some(pull);
        } else {
            if let Some(pull) = self.registry.take() {
                // No registry any more: its webhooks' queued deliveries go.
                let table = Rc::clone(pull.table());
                let configured = self.plan.webhooks.len();
                for slot in 0..table.slots() {
                    let id = table.get(slot).map_or("?", |w| w.id.as_str());
                    for d in self.outbox.clear_lane(configured + slot) {
                        self.webhook_removed(host, id, &d, "by a new configuration");
                    }
                }
                pull.end(host, self.metrics);
                self.outbox.reserve(0, 0);
            }
        }
        self.adopt_plan(host, plan);
    }

    /// Polls the registry when it is time: one request at a time; at once while the feed has
    /// more pages, else every `pollMs`. Returns the callout's token.
    pub fn registry_poll(&mut self, host: &dyn Host, now_ms: u64) -> Option<u32> {
        let pull = self.registry.as_mut()?;
        let settings = self.plan.registry.as_ref()?;
        pull.started_ms.get_or_insert(now_ms);
        pull.report(host, self.metrics, now_ms);
        // More pages are asked for at once, but not after a failure: that waits for pollMs.
        let at_once = pull.sync.more() && !pull.failing;
        if pull.polling || (now_ms < pull.next_poll_ms && !at_once) {
            return None;
        }
        pull.next_poll_ms = now_ms + settings.poll_ms;
        let authorization = format!("Bearer {}", settings.token);
        let path = pull.sync.request_path(&settings.path);
        let callout_headers = vec![
            (headers::METHOD, "GET"),
            (headers::PATH, path.as_str()),
            (headers::AUTHORITY, settings.authority.as_str()),
            (headers::SCHEME, "http"),
            (headers::USER_AGENT, USER_AGENT),
            (headers::AUTHORIZATION, authorization.as_str()),
        ];
        let result = host.dispatch(Callout {
            cluster: &settings.cluster,
            headers: callout_headers,
            body: &[],
            timeout_ms: REGISTRY_TIMEOUT_MS,
        });
        match result {
            Ok(token) => {
                pull.polling = true;
                Some(token)
            }
            Err(refused) => {
                let reason = refused.reason(&settings.cluster);
                self.on_registry_answer(host, RegistryAnswer::Failed(reason), now_ms);
                None
            }
        }
    }

    /// A registry poll's answer: a page applies at once, and the plan is rebuilt when a
    /// catch-up with changes ends (queued deliveries of webhooks that stay are kept, those of
    /// removed or disabled ones are dropped with a trace); anything else leaves the copy in
    /// force as it is.
    pub fn on_registry_answer(&mut self, host: &dyn Host, answer: RegistryAnswer, now_ms: u64) {
        let Some(pull) = self.registry.as_mut() else {
            return;
        };
        pull.polling = false;
        let failure = match answer {
            RegistryAnswer::Status { code: 200, body } => {
                let base = Rc::clone(&self.plan);
                match pull.sync.apply_page(&base, &body, now_ms) {
                    Ok(applied) => {
                        self.sends_pending(applied.pending_sends);
                        self.page_applied(host, applied, now_ms);
                        None
                    }
                    Err(why) => Some(format!("{why}; {} bytes", body.len())),
                }
            }
            RegistryAnswer::Status { code: 410, .. } => {
                let (since, _) = pull.sync.revisions();
                pull.sync.relist();
                self.metrics.registry_relists.inc(host);
                log(host, LogLevel::Warn, || {
                    format!("registry cursor {since} is gone (410): listing again from 0; the copy in force stays until that listing ends")
                });
                None
            }
            RegistryAnswer::Status { code, body } => Some(format!(
                "the registry answered {code}{}",
                error_message(&body)
            )),
            RegistryAnswer::Failed(why) => Some(why),
        };
        let metrics = self.metrics;
        let Some(pull) = self.registry.as_mut() else {
            return;
        };
        pull.report(host, metrics, now_ms);
        match failure {
            Some(why) => {
                metrics.registry_fetch_failed.inc(host);
                let first = !pull.failing;
                pull.failing = true;
                let level = if first {
                    LogLevel::Warn
                } else {
                    LogLevel::Debug
                };
                let loaded = pull.sync.loaded();
                let (head, complete) = pull.sync.revisions();
                log(host, level, || {
                    if loaded {
                        format!("registry poll failed ({why}): the copy complete at revision {} stays in force (head {head})", complete.unwrap_or(0))
                    } else {
                        format!("registry poll failed ({why}): events for the registry's webhooks wait for its first complete listing")
                    }
                });
            }
            None if pull.failing => {
                pull.failing = false;
                log(host, LogLevel::Info, || {
                    "registry reachable again".to_string()
                });
            }
            None => {}
        }
    }

    /// A page applied: the lanes of removed webhooks are cleared (their queued deliveries
    /// dropped with a trace), and the events that waited for the first listing go out.
    fn page_applied(&mut self, host: &dyn Host, applied: Applied, now_ms: u64) {
        for e in &applied.skipped {
            self.metrics.registry_webhooks_skipped.inc(host);
            log(host, LogLevel::Warn, || {
                format!("registry webhook skipped: {e}")
            });
        }
        if applied.refused > 0 {
            self.webhooks_refused(host, &applied, now_ms);
        }
        let configured = self.plan.webhooks.len();
        for (slot, webhook) in &applied.removed {
            for d in self.outbox.clear_lane(configured + slot) {
                self.webhook_removed(host, &webhook.id, &d, "in the registry");
            }
        }
        let lanes = self.hooks().lanes();
        self.outbox.grow(lanes);
        let Some(pull) = self.registry.as_mut() else {
            return;
        };
        let changed = applied.upserted > 0 || !applied.removed.is_empty();
        let waiting: Vec<Waiting> = if applied.first {
            pull.waiting_bytes = 0;
            self.outbox.reserve(0, 0);
            pull.waiting.drain(..).collect()
        } else {
            Vec::new()
        };
        if applied.complete && (changed || applied.first || applied.forgotten > 0) {
            let (_, complete) = pull.sync.revisions();
            let count = pull.sync.table().len();
            self.metrics.registry_updates.inc(host);
            log(host, LogLevel::Info, || {
                format!(
                    "registry revision {} applied{}: {count} registry webhooks in force{}",
                    complete.unwrap_or(0),
                    if applied.first { " (first)" } else { "" },
                    if applied.forgotten > 0 {
                        format!(", {} forgotten by a new listing", applied.forgotten)
                    } else {
                        String::new()
                    }
                )
            });
        }
        for event in &waiting {
            if self.fan_out(host, event, now_ms, true) == 0
                && self
                    .hooks()
                    .subscribers(&event.event_type, &event.organisation_id)
                    .is_empty()
            {
                self.metrics.events_without_subscribers.inc(host);
                log(host, LogLevel::Debug, || {
                    format!(
                        "event {} ({}) of organisation {:?}: no enabled webhook subscribes to it",
                        event.event_id, event.event_type, event.organisation_id
                    )
                });
            }
        }
        self.ring(host);
    }
}

impl Worker {
    /// New registry webhooks refused over `registry.maxWebhooks`: counted, and logged at most
    /// once a second (a registry far over the bound would otherwise write a line per webhook).
    fn webhooks_refused(&mut self, host: &dyn Host, applied: &Applied, now_ms: u64) {
        let max = self.plan.registry.as_ref().map_or(0, |r| r.max_webhooks);
        self.metrics
            .registry_webhooks_skipped
            .add(host, i64::try_from(applied.refused).unwrap_or(i64::MAX));
        let Some(pull) = self.registry.as_mut() else {
            return;
        };
        pull.refused_unlogged += applied.refused;
        if pull.refused_lines.take(now_ms).is_none() {
            return;
        }
        let refused = std::mem::take(&mut pull.refused_unlogged);
        let first = applied.first_refused.as_deref().unwrap_or("?");
        log(host, LogLevel::Warn, || {
            let more = match refused.saturating_sub(1) {
                0 => String::new(),
                n => format!(" ({n} more since the last such line)"),
            };
            format!("registry webhook skipped: {first}{more}: registry.maxWebhooks ({max}) registry webhooks are in force already")
        });
    }
}

/// The first error message of an answer in the registry's error shape, for the log line (at
/// most 200 characters; keys redacted like configuration errors are).
fn error_message(body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errors")?
                .get(0)?
                .get("message")?
                .as_str()
                .map(|m| m.chars().take(200).collect::<String>())
        });
    match message {
        Some(m) if !m.contains(crate::signature::KEY_PREFIX) => format!(": {m}"),
        _ => String::new(),
    }
}
