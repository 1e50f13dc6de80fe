//! The registry pull: the registry's webhooks polled (one GET at a time, with the last ETag),
//! each new document combined with the configured plan, and the events emitted before the first
//! document held for the registry's webhooks. A new configuration (`adopt`) is combined here
//! with the last document too.

use super::{Waiting, Worker, USER_AGENT};
use crate::config::{Plan, RegistryUpdate};
use crate::filter::host::{log, Callout, Host, LogLevel};
use crate::filter::metrics::Metrics;
use crate::headers;
use std::collections::VecDeque;
use std::rc::Rc;

/// The registry feed as this worker pulls it.
pub(super) struct RegistryPull {
    /// The plan as configured, without registry webhooks: every document applies to it.
    base: Rc<Plan>,
    /// The last document applied, re-applied when a new configuration arrives.
    document: Option<Vec<u8>>,
    etag: Option<String>,
    next_poll_ms: u64,
    polling: bool,
    /// The last poll failed: the failure was logged, and the recovery will be.
    failing: bool,
    /// Events emitted before the first document arrived: the configured webhooks have them; the
    /// registry's get them with the first document (bounded like the outbox).
    waiting: VecDeque<Waiting>,
    waiting_bytes: usize,
}

/// A registry poll's answer, as the host reported it.
#[derive(Debug)]
pub enum RegistryAnswer {
    Status {
        code: u16,
        etag: Option<Vec<u8>>,
        body: Vec<u8>,
    },
    Failed(String),
}

/// A registry document without webhooks: the configuration's own webhooks only.
const NO_REGISTRY_WEBHOOKS: &[u8] = br#"{"webhooks":[]}"#;

/// A registry poll is cut off after this long.
const REGISTRY_TIMEOUT_MS: u64 = 5_000;

impl RegistryPull {
    pub(super) fn new(base: Rc<Plan>) -> Self {
        RegistryPull {
            base,
            document: None,
            etag: None,
            next_poll_ms: 0,
            polling: false,
            failing: false,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
        }
    }

    /// Keeps an event until the first document arrives, within the outbox's bounds.
    pub(super) fn wait(
        &mut self,
        host: &dyn Host,
        metrics: Metrics,
        event: Waiting,
        max: usize,
        max_bytes: usize,
    ) {
        let size = event.payload.held_bytes();
        if self.waiting.len() >= max || self.waiting_bytes + size > max_bytes {
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
    }
}

impl Worker {
    /// The registry's webhooks are not known yet (its first document has not arrived).
    pub(super) fn waiting_for_registry(&self) -> bool {
        self.registry.as_ref().is_some_and(|p| p.document.is_none())
    }

    /// Moves this worker onto a new plan. Queued deliveries to webhooks that are gone are
    /// dropped, and queued dead letters with no dead-letter endpoint left are lost: each is
    /// logged and counted.
    pub fn adopt(&mut self, host: &dyn Host, plan: Plan) {
        // A new configuration: the registry's webhooks (the last document) apply to it too.
        let plan = if plan.registry.is_some() {
            let base = Rc::new(plan);
            let mut pull = self
                .registry
                .take()
                .unwrap_or_else(|| RegistryPull::new(Rc::clone(&base)));
            pull.base = Rc::clone(&base);
            let document = pull.document.as_deref().unwrap_or(NO_REGISTRY_WEBHOOKS);
            let combined = base
                .with_registry(document)
                .or_else(|_| base.with_registry(NO_REGISTRY_WEBHOOKS));
            self.registry = Some(pull);
            match combined {
                Ok(update) => update.plan,
                Err(why) => {
                    log(host, LogLevel::Critical, || {
                        format!("new configuration not applied: {why}")
                    });
                    return;
                }
            }
        } else {
            self.registry = None;
            plan
        };
        self.adopt_plan(host, plan);
    }

    /// Polls the registry when it is time: one GET at a time, with the last ETag. Returns the
    /// callout's token.
    pub fn registry_poll(&mut self, host: &dyn Host, now_ms: u64) -> Option<u32> {
        let pull = self.registry.as_mut()?;
        let settings = self.plan.registry.as_ref()?;
        if pull.polling || now_ms < pull.next_poll_ms {
            return None;
        }
        pull.next_poll_ms = now_ms + settings.poll_ms;
        let authorization = format!("Bearer {}", settings.token);
        let mut callout_headers = vec![
            (headers::METHOD, "GET"),
            (headers::PATH, settings.path.as_str()),
            (headers::AUTHORITY, settings.authority.as_str()),
            (headers::SCHEME, "http"),
            (headers::USER_AGENT, USER_AGENT),
            (headers::AUTHORIZATION, authorization.as_str()),
        ];
        if let Some(etag) = &pull.etag {
            callout_headers.push((headers::IF_NONE_MATCH, etag.as_str()));
        }
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

    /// A registry poll's answer: a new document applies at once (queued deliveries of webhooks
    /// that stay are kept, those of removed or disabled ones are dropped with a trace); anything
    /// else leaves the last good copy in force.
    pub fn on_registry_answer(&mut self, host: &dyn Host, answer: RegistryAnswer, now_ms: u64) {
        let Some(pull) = self.registry.as_mut() else {
            return;
        };
        pull.polling = false;
        let failure = match answer {
            RegistryAnswer::Status { code: 304, .. } if pull.document.is_some() => None,
            RegistryAnswer::Status {
                code: 200,
                etag,
                body,
            } => match pull.base.with_registry(&body) {
                Ok(update) => {
                    let first = pull.document.is_none();
                    pull.document = Some(body);
                    pull.etag = etag
                        .and_then(|e| String::from_utf8(e).ok())
                        .filter(|e| e.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
                    let waiting: Vec<Waiting> = pull.waiting.drain(..).collect();
                    pull.waiting_bytes = 0;
                    self.apply_registry(host, update, first);
                    for event in &waiting {
                        if self.fan_out(host, event, now_ms, true) == 0
                            && self
                                .plan
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
                    None
                }
                Err(why) => Some(format!("unreadable registry document: {why}")),
            },
            RegistryAnswer::Status { code, .. } => Some(format!("the registry answered {code}")),
            RegistryAnswer::Failed(why) => Some(why),
        };
        let Some(pull) = self.registry.as_mut() else {
            return;
        };
        match failure {
            Some(why) => {
                self.metrics.registry_fetch_failed.inc(host);
                let first = !pull.failing;
                pull.failing = true;
                let level = if first {
                    LogLevel::Warn
                } else {
                    LogLevel::Debug
                };
                let loaded = pull.document.is_some();
                log(host, level, || {
                    if loaded {
                        format!("registry poll failed ({why}): the last good copy stays in force")
                    } else {
                        format!("registry poll failed ({why}): events wait for its first answer")
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

    fn apply_registry(&mut self, host: &dyn Host, update: RegistryUpdate, first: bool) {
        for e in &update.skipped {
            self.metrics.registry_webhooks_skipped.inc(host);
            log(host, LogLevel::Warn, || {
                format!("registry webhook skipped: {e}")
            });
        }
        self.metrics.registry_updates.inc(host);
        let count = update.plan.webhooks.len();
        let revision = update.revision.map_or("?".to_string(), |r| r.to_string());
        log(host, LogLevel::Info, || {
            format!(
                "registry revision {revision} applied{}: {count} webhooks in force, {} skipped",
                if first { " (first)" } else { "" },
                update.skipped.len()
            )
        });
        self.adopt_plan(host, update.plan);
    }
}
