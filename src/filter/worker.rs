//! The worker: what one Envoy worker thread's root and HTTP contexts share. It turns what the
//! pipeline and the host report (events, answers, configuration updates) into outbox moves, log
//! lines, metrics and callouts. Every host call goes through [`Host`], so each decision here is
//! unit-tested against a test double.

use super::host::{log, Callout, Host, LogLevel};
use super::metrics::Metrics;
use crate::config::{Plan, RegistryUpdate};
use crate::delivery::shared::{EndpointKey, EndpointState, EndpointTable, HeldByWorker, HeldTable};
use crate::delivery::{
    dead_letter_body, AttemptOutcome, Bound, CircuitChange, DeadLetterReason, Delivery, LaneId,
    Outbox, Payload, Refused, Verdict,
};
use crate::event::Event;
use crate::headers;
use crate::signature::SigningKey;
use crate::stream::{NoEvent, StreamOutcome};
use crate::url::WebhookUrl;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

// The write-ahead journal's hooks (`journal_*`) live in worker/journal.rs.
mod journal;
// Reading cut completions again (`refetch`) lives in worker/refetch.rs.
mod refetch;
pub use refetch::StreamEnd;

pub const USER_AGENT: &str = concat!("webhook-emitter/", env!("CARGO_PKG_VERSION"));
/// How the dead-letter lane is named in log lines.
pub const DEAD_LETTER_NAME: &str = "dead-letter";

/// A lane by what survives a configuration update: a webhook's id, or the dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneKey {
    Webhook(String),
    DeadLetter,
}

impl LaneKey {
    pub fn name(&self) -> &str {
        match self {
            LaneKey::Webhook(id) => id,
            LaneKey::DeadLetter => DEAD_LETTER_NAME,
        }
    }
}

/// An attempt out: the delivery, and the lane it was sent for.
#[derive(Debug)]
pub struct Attempt {
    pub delivery: Delivery,
    pub lane: LaneKey,
}

/// Where one lane's deliveries go.
struct Target<'p> {
    key: LaneKey,
    url: &'p WebhookUrl,
    cluster: &'p str,
    /// Every key that signs now: a rotated key signs beside the new one during its grace period.
    signing_keys: Vec<&'p SigningKey>,
}

fn target(plan: &Plan, lane: LaneId, now_ms: u64) -> Option<Target<'_>> {
    match lane {
        LaneId::Webhook(i) => plan.webhooks.get(i).map(|w| Target {
            key: LaneKey::Webhook(w.id.clone()),
            url: &w.url,
            cluster: &w.cluster,
            signing_keys: w.signing_keys(now_ms).collect(),
        }),
        LaneId::DeadLetter => plan.delivery.dead_letter.as_ref().map(|dl| Target {
            key: LaneKey::DeadLetter,
            url: &dl.url,
            cluster: &dl.cluster,
            signing_keys: dl.key.iter().collect(),
        }),
    }
}

fn lane_name(plan: &Plan, lane: LaneId) -> &str {
    match lane {
        LaneId::Webhook(i) => plan.webhooks.get(i).map_or("?", |w| w.id.as_str()),
        LaneId::DeadLetter => DEAD_LETTER_NAME,
    }
}

/// The gauges as last reported, so that the host is only called when one moves.
#[derive(Debug, Default)]
struct Reported {
    depth: i64,
    bytes: i64,
    in_flight: i64,
}

/// The worker as its root context and HTTP contexts share it (one thread, so `Rc<RefCell<…>>`).
pub type SharedWorker = Rc<RefCell<Worker>>;

pub struct Worker {
    plan: Rc<Plan>,
    outbox: Outbox,
    metrics: Metrics,
    /// This worker's id among the proxy's workers (random per VM), for the shared held table.
    id: String,
    /// Shared-data keys of this plugin: endpoint states and every worker's holdings.
    endpoints_key: String,
    held_key: String,
    /// The CAS token of the endpoint table last applied, so that an unchanged table is not parsed.
    endpoints_seen: u32,
    /// What this worker last told the others it holds, and when.
    held_said: (usize, usize, u64),
    /// A shared queue private to this worker: an HTTP context enqueues to wake the root context
    /// (`on_queue_ready`) so that it dispatches from a root callback.
    doorbell: Option<u32>,
    doorbell_rung: bool,
    reported: Reported,
    /// Set when the configuration names a registry to pull webhooks from.
    registry: Option<RegistryPull>,
    /// The write-ahead journal in etcd (`delivery.journal`).
    journal: Option<crate::journal::Journal>,
    /// Completions whose answer was cut short, to be read again.
    refetches: crate::refetch::RefetchQueue,
}

/// The registry feed as this worker pulls it.
struct RegistryPull {
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

/// An event after fan-out: what a later fan-out needs of it.
struct Waiting {
    event_id: Rc<str>,
    event_type: String,
    organisation_id: String,
    payload: Rc<Payload>,
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

/// How often a worker tells the others what it holds even when nothing changed (it is forgotten
/// after [`HeldTable::STALE_MS`] of silence).
const HELD_HEARTBEAT_MS: u64 = 1_000;
/// Attempts at a compare-and-swap update of shared data before giving up until the next tick.
const CAS_TRIES: usize = 8;
/// A worker that did not open a circuit probes only if the worker that did (the leader) has not
/// moved its probe time for this long past it: so one probe per period for the whole proxy, and
/// still probes if the leader's VM is gone.
pub const FOLLOWER_GRACE_MS: u64 = 5_000;

impl Worker {
    /// A worker of the plugin `plugin` (the shared-data namespace), with the random id `id`.
    pub fn new(
        host: &dyn Host,
        plan: Plan,
        doorbell: Option<u32>,
        plugin: &str,
        id: String,
    ) -> Self {
        let mut worker = Self::without_registry(host, plan, doorbell, plugin, id);
        if worker.plan.registry.is_some() {
            worker.registry = Some(RegistryPull::new(Rc::clone(&worker.plan)));
        }
        worker
    }

    fn without_registry(
        host: &dyn Host,
        plan: Plan,
        doorbell: Option<u32>,
        plugin: &str,
        id: String,
    ) -> Self {
        let outbox = Outbox::new(plan.webhooks.len(), plan.delivery.outbox.clone());
        let journal = journal::open(host, &plan);
        Worker {
            plan: Rc::new(plan),
            outbox,
            metrics: Metrics::define(host),
            id,
            endpoints_key: format!("webhook_emitter.{plugin}.endpoints"),
            held_key: format!("webhook_emitter.{plugin}.held"),
            endpoints_seen: 0,
            held_said: (0, 0, 0),
            doorbell,
            doorbell_rung: false,
            reported: Reported::default(),
            registry: None,
            journal,
            refetches: crate::refetch::RefetchQueue::new(),
        }
    }

    pub fn plan(&self) -> &Rc<Plan> {
        &self.plan
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics
    }

    /// The doorbell now wakes another root context (the one that adopted this worker).
    pub fn set_doorbell(&mut self, doorbell: Option<u32>) {
        self.doorbell = doorbell;
        self.doorbell_rung = false;
    }

    /// The root context answered the doorbell.
    pub fn doorbell_answered(&mut self) {
        self.doorbell_rung = false;
    }

    fn ring(&mut self, host: &dyn Host) {
        if !self.doorbell_rung {
            if let Some(queue) = self.doorbell {
                self.doorbell_rung = host.wake(queue);
            }
        }
    }

    /// What the end of a stream produced: events are fanned out, the rest logged and counted.
    pub fn on_stream_outcome(&mut self, host: &dyn Host, outcome: StreamOutcome, now_ms: u64) {
        match outcome {
            StreamOutcome::Event(event) => self.emit(host, event, now_ms),
            StreamOutcome::NoEvent(why) => self.report_no_event(host, &why),
        }
    }

    pub fn report_no_event(&self, host: &dyn Host, why: &NoEvent) {
        let m = self.metrics;
        let (metric, level, line) = match why {
            NoEvent::BodyTooLarge { limit } => (
                m.bodies_too_large,
                LogLevel::Warn,
                format!("response body over delivery.maxBodyBytes ({limit} bytes): no event"),
            ),
            NoEvent::BodyUndecodable(why) => (
                m.bodies_undecodable,
                LogLevel::Warn,
                format!("response body not decodable ({why}): no event"),
            ),
            NoEvent::BodyNotJson(why) => (
                m.bodies_not_json,
                LogLevel::Info,
                format!("response body is not JSON ({why}): no event"),
            ),
            NoEvent::NoOrganisation { event_type } => (
                m.events_without_organisation,
                LogLevel::Warn,
                format!("{event_type} matched but has no organisation id: no event"),
            ),
            NoEvent::OrganisationNotUtf8 {
                event_type,
                preview,
            } => (
                m.events_bad_organisation,
                LogLevel::Warn,
                format!("{event_type} matched but its organisation header is not UTF-8 (bytes {preview}): no event"),
            ),
            NoEvent::OrganisationRepeated { event_type } => (
                m.events_bad_organisation,
                LogLevel::Warn,
                format!("{event_type} matched but its organisation header appears more than once: no event"),
            ),
            NoEvent::BadObject {
                event_type,
                pointer,
            } => (
                m.events_bad_object,
                LogLevel::Warn,
                format!("{event_type} matched but its object pointer {pointer:?} is not a JSON object in the body: no event"),
            ),
            NoEvent::StatusNotMatched { status, path } => (
                m.events_skipped_status,
                LogLevel::Debug,
                match status {
                    Some(status) => format!("{path:?} answered {status}, a status no matching rule takes: not a completion, no event"),
                    None => format!("{path:?} answered without a valid :status: not a completion, no event"),
                },
            ),
            NoEvent::ConditionsNotMet { event_type } => (
                m.events_skipped_when,
                LogLevel::Debug,
                format!("{event_type}: the response does not meet the rule's when conditions: not a completion, no event"),
            ),
        };
        metric.inc(host);
        log(host, level, || line);
    }

    /// Fans an event out to the enabled webhooks of its organisation subscribed to its type,
    /// with one shared copy of its envelope, and wakes the root context to dispatch.
    pub fn emit(&mut self, host: &dyn Host, event: Event, now_ms: u64) {
        // Another worker may have found an endpoint gone or failing since the last tick.
        self.sync_endpoints(host, now_ms);
        self.metrics.events_emitted.inc(host);
        let waiting_for_registry = self.waiting_for_registry();
        let event = Waiting {
            event_id: Rc::from(event.id_hex.as_str()),
            event_type: event.event_type,
            organisation_id: event.organisation_id,
            payload: Rc::new(Payload::event(event.envelope)),
        };
        let sent = self.fan_out(host, &event, now_ms, false);
        if waiting_for_registry {
            // The configured webhooks have it; the registry's, not known yet, get it with the first
            // document.
            let (max, max_bytes) = (
                self.plan.delivery.outbox.max_queued,
                self.plan.delivery.outbox.max_queued_bytes,
            );
            if let Some(pull) = self.registry.as_mut() {
                pull.wait(host, self.metrics, event, max, max_bytes);
            }
        } else if sent == 0 {
            self.metrics.events_without_subscribers.inc(host);
            log(host, LogLevel::Debug, || {
                format!(
                    "event {} ({}) of organisation {:?}: no enabled webhook subscribes to it",
                    event.event_id, event.event_type, event.organisation_id
                )
            });
        }
    }

    /// The registry's webhooks are not known yet (its first document has not arrived).
    fn waiting_for_registry(&self) -> bool {
        self.registry.as_ref().is_some_and(|p| p.document.is_none())
    }

    /// Hands an event to every enabled webhook of its organisation subscribed to its type (only the
    /// registry's with `registry_only`), one delivery each sharing one payload; returns how many
    /// webhooks it went to.
    fn fan_out(
        &mut self,
        host: &dyn Host,
        event: &Waiting,
        now_ms: u64,
        registry_only: bool,
    ) -> usize {
        let plan = Rc::clone(&self.plan);
        let subscribers = plan
            .subscribers(&event.event_type, &event.organisation_id)
            .iter()
            .filter(|&&w| !registry_only || plan.is_from_registry(w));
        let (mut subscribed, mut accepted) = (0, 0);
        let mut journaled = Vec::new();
        for &w in subscribers {
            subscribed += 1;
            let delivery = Delivery::new(
                Rc::clone(&event.event_id),
                LaneId::Webhook(w),
                Rc::clone(&event.payload),
                now_ms,
            );
            match self.outbox.enqueue(delivery) {
                Ok(evicted) => {
                    accepted += 1;
                    journaled.push(w);
                    for d in evicted {
                        self.drop_evicted(host, d, now_ms);
                    }
                }
                Err(refused) => self.report_refused(host, refused, now_ms),
            }
        }
        if accepted > 0 {
            self.journal_track(&event.event_id, &event.payload, &journaled, now_ms);
            self.ring(host);
        }
        self.report_gauges(host);
        subscribed
    }

    fn drop_evicted(&mut self, host: &dyn Host, d: Delivery, now_ms: u64) {
        self.metrics.deliveries_dropped_over_share.inc(host);
        self.journal_settled(&Rc::clone(&self.plan), &d.event_id, d.lane);
        let name = lane_name(&self.plan, d.lane).to_string();
        log(host, LogLevel::Error, || {
            format!(
                "delivery dropped: event={} webhook={name} reason=the outbox is full and this webhook holds more than its fair share",
                d.event_id
            )
        });
        self.dead_letter(host, &d, DeadLetterReason::OverShare, now_ms);
    }

    /// Logs and counts a delivery the outbox refused. One refused because its webhook answered
    /// 410 is also dead-lettered, like the deliveries that were queued at the 410.
    fn report_refused(&mut self, host: &dyn Host, refused: Refused, now_ms: u64) {
        let (d, metric, why, reason) = match refused {
            Refused::QueueFull(d, Bound::Count) => (
                d,
                self.metrics.deliveries_dropped_queue_full,
                "the outbox is full (delivery.maxQueued)",
                None,
            ),
            Refused::QueueFull(d, Bound::Bytes) => (
                d,
                self.metrics.deliveries_dropped_queue_full,
                "the outbox is full (delivery.maxQueuedBytes)",
                None,
            ),
            Refused::WebhookGone(d) => (
                d,
                self.metrics.deliveries_dropped_webhook_gone,
                "the webhook answered 410 Gone",
                Some(DeadLetterReason::WebhookGone),
            ),
        };
        if d.lane == LaneId::DeadLetter {
            self.dead_letter_lost(host, &d, &format!("reason={why}"));
            return;
        }
        self.journal_settled(&Rc::clone(&self.plan), &d.event_id, d.lane);
        metric.inc(host);
        let name = lane_name(&self.plan, d.lane).to_string();
        log(host, LogLevel::Error, || {
            format!(
                "delivery dropped: event={} webhook={name} reason={why}",
                d.event_id
            )
        });
        if let Some(reason) = reason {
            self.dead_letter(host, &d, reason, now_ms);
        }
    }

    /// A dead letter that can't be stored: the last trace of its delivery. `detail` is
    /// `last=<failure>` or `reason=<why>`.
    fn dead_letter_lost(&self, host: &dyn Host, d: &Delivery, detail: &str) {
        self.metrics.dead_letters_failed.inc(host);
        log(host, LogLevel::Critical, || {
            format!(
                "dead letter could not be stored: event={} attempts={} {detail}",
                d.event_id, d.attempts
            )
        });
    }

    /// Hands a delivery that finally failed to the dead-letter endpoint, when one is configured.
    fn dead_letter(
        &mut self,
        host: &dyn Host,
        delivery: &Delivery,
        reason: DeadLetterReason,
        now_ms: u64,
    ) {
        if self.plan.delivery.dead_letter.is_none() {
            return;
        }
        let body = dead_letter_body(
            delivery,
            lane_name(&self.plan, delivery.lane),
            reason,
            now_ms,
        );
        let letter = Delivery::new(
            Rc::clone(&delivery.event_id),
            LaneId::DeadLetter,
            Rc::new(Payload::raw(body)),
            now_ms,
        );
        match self.outbox.enqueue(letter) {
            Ok(evicted) => {
                for d in evicted {
                    self.drop_evicted(host, d, now_ms);
                }
            }
            Err(refused) => self.report_refused(host, refused, now_ms),
        }
    }

    fn report_gauges(&mut self, host: &dyn Host) {
        let depth = self.outbox.queued() as i64;
        let bytes = self.outbox.queued_bytes() as i64;
        let in_flight = self.outbox.attempts_out() as i64;
        let m = self.metrics;
        for (now, before, metric) in [
            (depth, &mut self.reported.depth, m.outbox_depth),
            (bytes, &mut self.reported.bytes, m.outbox_bytes),
            (
                in_flight,
                &mut self.reported.in_flight,
                m.callouts_in_flight,
            ),
        ] {
            if now != *before {
                metric.add(host, now - *before);
                *before = now;
            }
        }
    }

    /// Sends every delivery that is due; returns the attempts now out, by callout token.
    pub fn pump(&mut self, host: &dyn Host, now_ms: u64) -> Vec<(u32, Attempt)> {
        let due = self.outbox.take_due(now_ms);
        let mut out = Vec::with_capacity(due.len());
        for delivery in due {
            if let Some(sent) = self.dispatch(host, delivery, now_ms) {
                out.push(sent);
            }
        }
        self.report_gauges(host);
        out
    }

    fn dispatch(
        &mut self,
        host: &dyn Host,
        delivery: Delivery,
        now_ms: u64,
    ) -> Option<(u32, Attempt)> {
        let plan = Rc::clone(&self.plan);
        let Some(target) = target(&plan, delivery.lane, now_ms) else {
            // Only the dead-letter lane can lose its target (a new configuration without
            // deadLetter); adopt() hands those back before this can happen.
            self.outbox.release_orphan(&delivery);
            self.dead_letter_lost(
                host,
                &delivery,
                "reason=delivery.deadLetter was removed by a new configuration",
            );
            return None;
        };
        let timestamp = (now_ms / 1000).to_string();
        let body = delivery.payload.body_for(target.key.name());
        // Several signatures are separated by spaces (Standard Webhooks); a receiver accepts the
        // delivery if any one verifies under its key.
        let signature = (!target.signing_keys.is_empty()).then(|| {
            target
                .signing_keys
                .iter()
                .map(|k| k.sign(&delivery.event_id, now_ms / 1000, &body))
                .collect::<Vec<_>>()
                .join(" ")
        });
        // No content-length: Envoy sets it from the body it is handed.
        let mut callout_headers = vec![
            (headers::METHOD, "POST"),
            (headers::PATH, target.url.path_and_query.as_str()),
            (headers::AUTHORITY, target.url.authority.as_str()),
            (
                headers::SCHEME,
                if target.url.https { "https" } else { "http" },
            ),
            (headers::CONTENT_TYPE, "application/json"),
            (headers::USER_AGENT, USER_AGENT),
            (headers::WEBHOOK_ID, &delivery.event_id),
            (headers::WEBHOOK_TIMESTAMP, timestamp.as_str()),
        ];
        if let Some(signature) = &signature {
            callout_headers.push((headers::WEBHOOK_SIGNATURE, signature.as_str()));
        }
        let result = host.dispatch(Callout {
            cluster: target.cluster,
            headers: callout_headers,
            body: &body,
            timeout_ms: plan.delivery.timeout_ms,
        });
        self.metrics.deliveries_attempted.inc(host);
        match result {
            Ok(token) => Some((
                token,
                Attempt {
                    delivery,
                    lane: target.key,
                },
            )),
            Err(refused) => {
                let reason = refused.reason(target.cluster);
                self.settle(
                    host,
                    delivery,
                    &AttemptOutcome::NoResponse { reason },
                    now_ms,
                );
                None
            }
        }
    }

    /// The answer to an attempt. A new configuration may have moved or removed its lane since
    /// it was sent: it is found again by its webhook id.
    pub fn on_answer(
        &mut self,
        host: &dyn Host,
        attempt: Attempt,
        outcome: &AttemptOutcome,
        now_ms: u64,
    ) {
        let Attempt { mut delivery, lane } = attempt;
        let current = match &lane {
            // Only an enabled webhook takes the attempt back; a disabled one gets nothing more.
            LaneKey::Webhook(id) => self
                .plan
                .webhook_index(id)
                .filter(|&i| self.plan.webhooks.get(i).is_some_and(|h| h.enabled))
                .map(LaneId::Webhook),
            LaneKey::DeadLetter => self
                .plan
                .delivery
                .dead_letter
                .as_ref()
                .map(|_| LaneId::DeadLetter),
        };
        match current {
            Some(lane_id) => {
                delivery.lane = lane_id;
                self.settle(host, delivery, outcome, now_ms);
            }
            None => self.settle_orphan(host, delivery, &lane, outcome, now_ms),
        }
    }

    /// Applies an attempt's outcome: metrics, the log line of a final outcome, the retry.
    fn settle(
        &mut self,
        host: &dyn Host,
        delivery: Delivery,
        outcome: &AttemptOutcome,
        now_ms: u64,
    ) {
        let m = self.metrics;
        let lane = delivery.lane;
        let is_dead_letter = lane == LaneId::DeadLetter;
        let plan = Rc::clone(&self.plan);
        let name = lane_name(&plan, lane);
        let (event_id, attempts) = (Rc::clone(&delivery.event_id), delivery.attempts);
        let was_probe = delivery.is_probe;
        // Jitter is only drawn for a failure (a host call saved on every success).
        let random = if outcome.is_success() {
            0
        } else {
            host.random_u32()
        };
        let last = outcome.describe();
        match self.outbox.finish(delivery, outcome, now_ms, random) {
            Verdict::Delivered { .. } if is_dead_letter => {
                m.dead_letters_delivered.inc(host);
                log(host, LogLevel::Info, || {
                    format!("dead letter stored: event={event_id} attempts={attempts}")
                });
            }
            Verdict::Delivered { latency_ms } => {
                self.journal_settled(&plan, &event_id, lane);
                m.deliveries_succeeded.inc(host);
                m.delivery_latency_ms.record(host, latency_ms);
                // A first-attempt success is a debug line: at info, one line per delivery costs
                // a fifth of the filter's CPU per event. A delivery that needed retries is info.
                let level = if attempts > 1 {
                    LogLevel::Info
                } else {
                    LogLevel::Debug
                };
                log(host, level, || {
                    format!("delivered: event={event_id} webhook={name} attempts={attempts} latency_ms={latency_ms}")
                });
            }
            Verdict::Retry { at_ms } => {
                self.journal_scheduled(&event_id, lane, attempts, at_ms);
                m.deliveries_failed.inc(host);
                m.deliveries_retried.inc(host);
                log(host, LogLevel::Info, || {
                    format!(
                        "attempt failed, will retry: event={event_id} webhook={name} attempts={attempts} last={last} retry_in_ms={}",
                        at_ms.saturating_sub(now_ms)
                    )
                });
            }
            Verdict::Exhausted(failed) if is_dead_letter => {
                m.deliveries_failed.inc(host);
                self.dead_letter_lost(host, &failed, &format!("last={last}"));
            }
            Verdict::Exhausted(failed) => {
                self.journal_settled(&plan, &event_id, lane);
                m.deliveries_failed.inc(host);
                m.deliveries_exhausted.inc(host);
                log(host, LogLevel::Error, || {
                    format!("delivery failed for good: event={event_id} webhook={name} attempts={attempts} last={last}")
                });
                self.dead_letter(host, &failed, DeadLetterReason::Exhausted, now_ms);
            }
            Verdict::Gone { dropped } => {
                self.journal_publish_gone(lane);
                m.deliveries_failed.inc(host);
                self.webhook_gone(host, lane, &dropped, now_ms);
            }
        }
        self.after_circuit_change(host, lane, was_probe, now_ms);
        self.report_gauges(host);
    }

    /// A webhook answered 410: it is off for the whole proxy, and what it had queued is dropped,
    /// each with a trace, and dead-lettered.
    fn webhook_gone(&mut self, host: &dyn Host, lane: LaneId, dropped: &[Delivery], now_ms: u64) {
        let m = self.metrics;
        self.publish_endpoint(host, lane, Some(EndpointState::Gone));
        m.webhooks_disabled_gone.inc(host);
        let plan = Rc::clone(&self.plan);
        let name = lane_name(&plan, lane);
        log(host, LogLevel::Warn, || {
            format!("webhook {name} answered 410 Gone: disabled for this proxy until its URL changes or Envoy restarts")
        });
        for d in dropped {
            self.journal_settled(&plan, &d.event_id, d.lane);
            m.deliveries_dropped_webhook_gone.inc(host);
            log(host, LogLevel::Error, || {
                format!("delivery dropped: event={} webhook={name} reason=the webhook answered 410 Gone", d.event_id)
            });
            self.dead_letter(host, d, DeadLetterReason::WebhookGone, now_ms);
        }
    }

    /// What the last outcome did to the lane's circuit: logged, counted, and told to the other
    /// workers.
    fn after_circuit_change(
        &mut self,
        host: &dyn Host,
        lane: LaneId,
        was_probe: bool,
        now_ms: u64,
    ) {
        let plan = Rc::clone(&self.plan);
        let name = lane_name(&plan, lane);
        match self.outbox.take_circuit_change() {
            Some(CircuitChange::Opened) => {
                self.journal_publish_circuit(lane, true);
                self.lead_circuit(host, lane, now_ms);
                self.metrics.circuits_opened.inc(host);
                log(host, LogLevel::Warn, || {
                    format!("circuit opened for webhook {name}: its queue waits, one probe per backoff period")
                });
            }
            Some(CircuitChange::Closed) => {
                self.journal_publish_circuit(lane, false);
                self.publish_endpoint(host, lane, None);
                log(host, LogLevel::Info, || {
                    format!("circuit closed for webhook {name}")
                });
            }
            // A failed probe moved the probe time: the followers wait for the new one.
            None if was_probe && self.outbox.probe_at(lane).is_some() => {
                self.lead_circuit(host, lane, now_ms)
            }
            None => {}
        }
    }

    /// This worker's circuit of `lane` is open: it leads the probing for the proxy, unless another
    /// live worker already does; then this one follows (holds its queue, probes only if the leader
    /// falls silent).
    fn lead_circuit(&mut self, host: &dyn Host, lane: LaneId, now_ms: u64) {
        let (Some(key), Some(mine)) = (self.endpoint_key(lane), self.outbox.probe_at(lane)) else {
            return;
        };
        for _ in 0..CAS_TRIES {
            let (bytes, cas) = host.shared_get(&self.endpoints_key).unwrap_or_default();
            let mut table = EndpointTable::parse(&bytes);
            match table.entries.get(&key) {
                Some(EndpointState::Gone) => return,
                Some(EndpointState::Open {
                    probe_at_ms,
                    leader,
                }) if *leader != self.id && probe_at_ms + FOLLOWER_GRACE_MS > now_ms => {
                    self.outbox
                        .set_probe_at(lane, Some(probe_at_ms + FOLLOWER_GRACE_MS));
                    return;
                }
                _ => {}
            }
            let state = EndpointState::Open {
                probe_at_ms: mine,
                leader: self.id.clone(),
            };
            table.set(key.clone(), Some(state));
            if host.shared_set(&self.endpoints_key, &table.serialize(), cas) {
                return;
            }
        }
    }

    /// The answer to an attempt whose lane a new configuration removed or disabled while it was
    /// out: a success still counts; a failure is not retried, and is dropped with a trace.
    fn settle_orphan(
        &mut self,
        host: &dyn Host,
        delivery: Delivery,
        lane: &LaneKey,
        outcome: &AttemptOutcome,
        now_ms: u64,
    ) {
        self.outbox.release_orphan(&delivery);
        let m = self.metrics;
        let (event_id, attempts) = (&delivery.event_id, delivery.attempts);
        match (outcome.is_success(), lane) {
            (true, LaneKey::DeadLetter) => {
                m.dead_letters_delivered.inc(host);
                log(host, LogLevel::Info, || {
                    format!("dead letter stored: event={event_id} attempts={attempts}")
                });
            }
            (true, LaneKey::Webhook(id)) => {
                self.journal_settled_id(event_id, id);
                let latency_ms = now_ms.saturating_sub(delivery.created_at_ms);
                m.deliveries_succeeded.inc(host);
                m.delivery_latency_ms.record(host, latency_ms);
                log(host, LogLevel::Info, || {
                    format!("delivered: event={event_id} webhook={id} attempts={attempts} latency_ms={latency_ms}")
                });
            }
            (false, LaneKey::DeadLetter) => {
                m.deliveries_failed.inc(host);
                self.dead_letter_lost(
                    host,
                    &delivery,
                    &format!(
                        "reason=delivery.deadLetter was removed by a new configuration last={}",
                        outcome.describe()
                    ),
                );
            }
            (false, LaneKey::Webhook(id)) => {
                self.journal_settled_id(event_id, id);
                m.deliveries_failed.inc(host);
                m.deliveries_dropped_webhook_removed.inc(host);
                log(host, LogLevel::Warn, || {
                    format!(
                        "delivery dropped: event={event_id} webhook={id} reason=the webhook was removed or disabled by a new configuration last={}",
                        outcome.describe()
                    )
                });
            }
        }
        self.report_gauges(host);
    }

    /// The tick: what other workers found (endpoints gone or failing, what they hold).
    pub fn tick(&mut self, host: &dyn Host, now_ms: u64) {
        self.sync_endpoints(host, now_ms);
        self.sync_held(host, now_ms);
    }

    fn endpoint_key(&self, lane: LaneId) -> Option<EndpointKey> {
        let LaneId::Webhook(i) = lane else {
            return None;
        };
        let w = self.plan.webhooks.get(i)?;
        let url = format!(
            "{}://{}{}",
            if w.url.https { "https" } else { "http" },
            w.url.authority,
            w.url.path_and_query
        );
        Some(EndpointKey::new(&w.id, &url))
    }

    /// Tells the proxy's other workers what this one found about an endpoint.
    fn publish_endpoint(&mut self, host: &dyn Host, lane: LaneId, state: Option<EndpointState>) {
        let Some(key) = self.endpoint_key(lane) else {
            return;
        };
        for _ in 0..CAS_TRIES {
            let (bytes, cas) = host.shared_get(&self.endpoints_key).unwrap_or_default();
            let mut table = EndpointTable::parse(&bytes);
            table.set(key.clone(), state.clone());
            if host.shared_set(&self.endpoints_key, &table.serialize(), cas) {
                return;
            }
        }
        log(host, LogLevel::Warn, || {
            format!(
                "could not share the state of webhook {} with the other workers (shared data busy)",
                key.webhook_id
            )
        });
    }

    /// Applies what other workers found: a webhook gone for them is gone here too (its queued
    /// deliveries dropped with a trace and dead-lettered); an open circuit holds this worker's
    /// queue too, and a circuit closed elsewhere opens here again.
    fn sync_endpoints(&mut self, host: &dyn Host, now_ms: u64) {
        let Some((bytes, cas)) = host.shared_get(&self.endpoints_key) else {
            return;
        };
        if cas == self.endpoints_seen {
            return;
        }
        self.endpoints_seen = cas;
        let table = EndpointTable::parse(&bytes);
        let plan = Rc::clone(&self.plan);
        for i in 0..plan.webhooks.len() {
            let lane = LaneId::Webhook(i);
            let Some(key) = self.endpoint_key(lane) else {
                continue;
            };
            let name = &key.webhook_id;
            match table.entries.get(&key) {
                Some(EndpointState::Gone) if !self.outbox.is_gone(lane) => {
                    let dropped = self.outbox.mark_gone(lane);
                    log(host, LogLevel::Warn, || {
                        format!(
                            "webhook {name} answered 410 Gone to another worker: disabled here too"
                        )
                    });
                    for d in &dropped {
                        self.metrics.deliveries_dropped_webhook_gone.inc(host);
                        log(host, LogLevel::Error, || {
                            format!("delivery dropped: event={} webhook={name} reason=the webhook answered 410 Gone", d.event_id)
                        });
                        self.dead_letter(host, d, DeadLetterReason::WebhookGone, now_ms);
                    }
                }
                Some(EndpointState::Open {
                    probe_at_ms,
                    leader,
                }) if *leader != self.id => {
                    let follow = probe_at_ms + FOLLOWER_GRACE_MS;
                    if self.outbox.probe_at(lane) != Some(follow) {
                        self.outbox.set_probe_at(lane, Some(follow));
                        log(host, LogLevel::Debug, || {
                            format!("circuit of webhook {name} is open on worker {leader}: holding")
                        });
                    }
                }
                None if self.outbox.probe_at(lane).is_some() => {
                    self.outbox.set_probe_at(lane, None);
                    log(host, LogLevel::Debug, || {
                        format!("circuit of webhook {name} closed by another worker")
                    });
                }
                _ => {}
            }
        }
        self.report_gauges(host);
    }

    /// Tells the other workers what this one holds, and learns what they hold, so that
    /// `maxQueued` and `maxQueuedBytes` bound the whole proxy (to within a tick).
    fn sync_held(&mut self, host: &dyn Host, now_ms: u64) {
        let mine = (self.outbox.queued(), self.outbox.queued_bytes());
        let (said_queued, said_bytes, said_at) = self.held_said;
        let due = (said_queued, said_bytes) != mine
            || now_ms.saturating_sub(said_at) >= HELD_HEARTBEAT_MS;
        let (bytes, cas) = host.shared_get(&self.held_key).unwrap_or_default();
        let mut table = HeldTable::parse(&bytes);
        if due {
            table.update(
                &self.id,
                HeldByWorker {
                    queued: mine.0,
                    queued_bytes: mine.1,
                    updated_ms: now_ms,
                },
            );
            // One try: on a CAS mismatch the next tick says it again.
            if host.shared_set(&self.held_key, &table.serialize(), cas) {
                self.held_said = (mine.0, mine.1, now_ms);
            }
        }
        self.outbox.set_others(table.others(&self.id, now_ms));
        for d in self.outbox.trim() {
            self.drop_evicted(host, d, now_ms);
        }
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

    fn adopt_plan(&mut self, host: &dyn Host, plan: Plan) {
        let old = Rc::clone(&self.plan);
        let new_index = |i: usize| {
            let id = &old.webhooks.get(i)?.id;
            plan.webhook_index(id)
                .filter(|&j| plan.webhooks.get(j).is_some_and(|h| h.enabled))
        };
        let dropped =
            self.outbox
                .reconfigure(plan.webhooks.len(), new_index, plan.delivery.outbox.clone());
        for d in dropped {
            self.metrics.deliveries_dropped_webhook_removed.inc(host);
            self.journal_settled(&old, &d.event_id, d.lane);
            let name = lane_name(&old, d.lane).to_string();
            log(host, LogLevel::Warn, || {
                format!(
                    "delivery dropped: event={} webhook={name} reason=the webhook was removed or disabled by a new configuration",
                    d.event_id
                )
            });
        }
        if plan.delivery.dead_letter.is_none() {
            for d in self.outbox.drain_queued(LaneId::DeadLetter) {
                self.dead_letter_lost(
                    host,
                    &d,
                    "reason=delivery.deadLetter was removed by a new configuration",
                );
            }
        }
        self.journal_adopt(host, &plan);
        self.plan = Rc::new(plan);
        self.ring(host);
        self.report_gauges(host);
    }
}

impl RegistryPull {
    fn new(base: Rc<Plan>) -> Self {
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
    fn wait(
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
