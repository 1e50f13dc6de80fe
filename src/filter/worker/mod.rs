//! The worker: what one Envoy worker thread's root and HTTP contexts share. It turns what the
//! pipeline and the host report (events, answers, configuration updates) into outbox moves, log
//! lines, metrics and callouts. Every host call goes through [`Host`], so each decision here is
//! unit-tested against a test double.
//!
//! This file holds the worker itself: events fanned out to deliveries, deliveries sent as
//! callouts, a new plan adopted. The rest of its `impl` is split by concern: settle.rs (answers,
//! drops, dead letters, circuits), shared_state.rs (what the proxy's workers share through
//! Envoy's shared data), registry_pull.rs (the registry feed, and `adopt`, which combines a new
//! configuration with the registry's last document) and journal.rs (the write-ahead journal's
//! hooks, `journal_*`).

use super::host::{log, Callout, Host, LogLevel};
use super::metrics::Metrics;
use super::unusable_path::{self, LogSampler};
use crate::config::{Plan, Webhook};
use crate::delivery::{AttemptOutcome, Delivery, LaneId, Outbox, Payload, Refused};
use crate::event::Event;
use crate::headers;
use crate::registry_sync::RegistryTable;
use crate::signature::SigningKey;
use crate::stream::{NoEvent, StreamOutcome, UnusablePath};
use crate::url::WebhookUrl;
use std::cell::RefCell;
use std::rc::Rc;

mod journal;
mod refetch;
mod registry_pull;
mod reports;
mod sends;
mod settle;
mod shared_state;

pub use refetch::StreamEnd;
pub use registry_pull::RegistryAnswer;
use registry_pull::RegistryPull;
pub use reports::LogRequest;
pub use shared_state::FOLLOWER_GRACE_MS;

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

/// The webhooks the lanes are: the configuration's first (lanes `0..n`), then the registry's
/// table, slot by slot. A cheap copy for one callback (never kept: a page changes the table in
/// place when nothing else holds it).
#[derive(Clone)]
pub(super) struct Hooks {
    plan: Rc<Plan>,
    registry: Option<Rc<RegistryTable>>,
}

impl Hooks {
    /// The webhook of lane `i`.
    pub(super) fn get(&self, i: usize) -> Option<&Webhook> {
        let configured = self.plan.webhooks.len();
        match self.plan.webhooks.get(i) {
            Some(w) => Some(w),
            None => self.registry.as_ref()?.get(i - configured).map(|w| &**w),
        }
    }

    /// The lane of the enabled webhook with this id.
    pub(super) fn lane_of(&self, id: &str) -> Option<usize> {
        match self.plan.webhook_index(id) {
            Some(i) => self.plan.webhooks.get(i).filter(|w| w.enabled).map(|_| i),
            None => self
                .registry
                .as_ref()?
                .slot_of(id)
                .map(|s| s + self.plan.webhooks.len()),
        }
    }

    /// Lanes that exist: the configuration's webhooks and the registry's slots.
    pub(super) fn lanes(&self) -> usize {
        self.plan.webhooks.len() + self.registry.as_ref().map_or(0, |r| r.slots())
    }

    /// Whether lane `i` is a registry webhook's.
    fn is_from_registry(&self, i: usize) -> bool {
        i >= self.plan.webhooks.len()
    }

    /// The lanes of the enabled webhooks of `organisation` subscribed to `event_type`.
    fn subscribers(&self, event_type: &str, organisation: &str) -> Vec<usize> {
        let configured = self.plan.webhooks.len();
        let mut lanes = self.plan.subscribers(event_type, organisation).to_vec();
        if let Some(registry) = &self.registry {
            lanes.extend(
                registry
                    .subscribers(event_type, organisation)
                    .map(|s| s + configured),
            );
        }
        lanes
    }
}

/// Where one lane's deliveries go.
struct Target<'p> {
    key: LaneKey,
    url: &'p WebhookUrl,
    cluster: &'p str,
    /// Every key that signs now: a rotated key signs beside the new one during its grace period.
    signing_keys: Vec<&'p SigningKey>,
}

fn target(hooks: &Hooks, lane: LaneId, now_ms: u64) -> Option<Target<'_>> {
    match lane {
        LaneId::Webhook(i) => hooks.get(i).map(|w| Target {
            key: LaneKey::Webhook(w.id.clone()),
            url: &w.url,
            cluster: &w.cluster,
            signing_keys: w.signing_keys(now_ms).collect(),
        }),
        LaneId::DeadLetter => hooks.plan.delivery.dead_letter.as_ref().map(|dl| Target {
            key: LaneKey::DeadLetter,
            url: &dl.url,
            cluster: &dl.cluster,
            signing_keys: dl.key.iter().collect(),
        }),
    }
}

fn lane_name(hooks: &Hooks, lane: LaneId) -> &str {
    match lane {
        LaneId::Webhook(i) => hooks.get(i).map_or("?", |w| w.id.as_str()),
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
    /// Shared-data keys of this plugin: endpoint states, a one-byte key rewritten after every
    /// change of them (its CAS token says whether the table changed without copying the table),
    /// and every worker's holdings.
    endpoints_key: String,
    endpoints_changed_key: String,
    held_key: String,
    /// The CAS token of the endpoint table last applied, so that an unchanged table is not parsed.
    endpoints_seen: u32,
    /// The CAS token of the change key last seen before an event.
    endpoints_changed_seen: u32,
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
    /// Delivery reports to the registry, and the sends claimed from it (`registry.reports`).
    delivery_log: Option<reports::DeliveryLog>,
    /// Completions whose answer was cut short, to be read again (worker/refetch.rs).
    refetches: crate::refetch::RefetchQueue,
    /// Lines a client or an upstream could flood, at most one a second each: requests with an
    /// unusable path, and events lost (a stream cut short, a refetch failed).
    bad_path_lines: LogSampler,
    reset_lines: LogSampler,
    refetch_lost_lines: LogSampler,
}

/// An event after fan-out: what a later fan-out needs of it.
struct Waiting {
    event_id: Rc<str>,
    event_type: String,
    organisation_id: String,
    payload: Rc<Payload>,
}

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
            worker.registry = Some(RegistryPull::new());
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
        let delivery_log = reports::DeliveryLog::open(&plan, format!("envoy/{id}"));
        Worker {
            plan: Rc::new(plan),
            outbox,
            metrics: Metrics::define(host),
            id,
            endpoints_key: format!("webhook_emitter.{plugin}.endpoints"),
            endpoints_changed_key: format!("webhook_emitter.{plugin}.endpoints.changed"),
            held_key: format!("webhook_emitter.{plugin}.held"),
            endpoints_seen: 0,
            endpoints_changed_seen: 0,
            held_said: (0, 0, 0),
            doorbell,
            doorbell_rung: false,
            reported: Reported::default(),
            registry: None,
            journal,
            delivery_log,
            refetches: crate::refetch::RefetchQueue::new(),
            bad_path_lines: LogSampler::default(),
            reset_lines: LogSampler::default(),
            refetch_lost_lines: LogSampler::default(),
        }
    }

    pub fn plan(&self) -> &Rc<Plan> {
        &self.plan
    }

    /// The webhooks of the lanes, for one callback.
    pub(super) fn hooks(&self) -> Hooks {
        Hooks {
            plan: Rc::clone(&self.plan),
            registry: self.registry.as_ref().map(|p| Rc::clone(p.table())),
        }
    }

    /// How many webhooks this worker delivers to: the configuration's and the registry's.
    pub fn webhook_count(&self) -> usize {
        self.plan.webhooks.len() + self.registry.as_ref().map_or(0, |p| p.table().len())
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics
    }

    /// A request whose path has no canonical form: counted, and logged at most once a second.
    pub fn on_unusable_path(&self, host: &dyn Host, path: &UnusablePath, now_ms: u64) {
        unusable_path::report(host, self.metrics, &self.bad_path_lines, path, now_ms);
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
        // Another worker may have found an endpoint gone or failing since the last tick. Only the
        // change key is read here: the table is copied into the VM only when it changed.
        self.sync_endpoints_if_changed(host, now_ms);
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
            // document (charged to the outbox's bounds meanwhile).
            self.metrics.events_registry_not_loaded.inc(host);
            if let Some(pull) = self.registry.as_mut() {
                pull.wait(host, self.metrics, event, &mut self.outbox);
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
        let hooks = self.hooks();
        let subscribers = hooks
            .subscribers(&event.event_type, &event.organisation_id)
            .into_iter()
            .filter(|&w| !registry_only || hooks.is_from_registry(w));
        let mut subscribed = 0;
        let mut journaled = Vec::new();
        // With a journal: deliveries the outbox has no room for, and those of webhooks with
        // deliveries spilled already (they wait behind them), go to etcd once tracked.
        let mut to_spill = Vec::new();
        let mut made_room = Vec::new();
        for w in subscribers {
            subscribed += 1;
            let delivery = Delivery::new(
                Rc::clone(&event.event_id),
                LaneId::Webhook(w),
                Rc::clone(&event.payload),
                now_ms,
            );
            if self.spills_behind(&hooks, w) {
                journaled.push(w);
                to_spill.push((delivery, None));
                continue;
            }
            match self.outbox.enqueue(delivery) {
                Ok(evicted) => {
                    journaled.push(w);
                    // Handled once the event is tracked: one may be this event's (it spills then).
                    made_room.extend(evicted);
                }
                Err(Refused::QueueFull(d, bound)) if self.journal.is_some() => {
                    journaled.push(w);
                    to_spill.push((d, Some(bound)));
                }
                Err(refused) => self.report_refused(host, refused, now_ms),
            }
        }
        if !journaled.is_empty() {
            self.journal_track(&event.event_id, &event.payload, &journaled, now_ms);
            for (d, bound) in to_spill {
                self.spill_or_admit(host, d, bound, now_ms);
            }
            self.ring(host);
        }
        for d in made_room {
            self.drop_evicted(host, d, now_ms);
        }
        self.report_gauges(host);
        subscribed
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
        mut delivery: Delivery,
        now_ms: u64,
    ) -> Option<(u32, Attempt)> {
        delivery.sent_at_ms = now_ms;
        let hooks = self.hooks();
        let Some(target) = target(&hooks, delivery.lane, now_ms) else {
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
            timeout_ms: hooks.plan.delivery.timeout_ms,
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

    /// Moves this worker onto a new configuration. The registry's webhooks keep their slots:
    /// their lanes move by the change in the number of configured webhooks.
    fn adopt_plan(&mut self, host: &dyn Host, plan: Plan) {
        let old = self.hooks();
        let (old_configured, new_configured) = (old.plan.webhooks.len(), plan.webhooks.len());
        let new_index = |i: usize| {
            if i >= old_configured {
                return Some(i - old_configured + new_configured);
            }
            let id = &old.get(i)?.id;
            plan.webhook_index(id)
                .filter(|&j| plan.webhooks.get(j).is_some_and(|h| h.enabled))
        };
        let lanes = old.lanes() - old_configured + new_configured;
        let dropped = self
            .outbox
            .reconfigure(lanes, new_index, plan.delivery.outbox.clone());
        for d in dropped {
            self.webhook_removed(host, lane_name(&old, d.lane), &d, "by a new configuration");
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
        self.delivery_log = reports::DeliveryLog::reopen(self.delivery_log.take(), &plan, &self.id);
        self.plan = Rc::new(plan);
        self.ring(host);
        self.report_gauges(host);
    }

    /// A queued delivery dropped because its webhook (by id: its slot may be empty already) was
    /// removed or disabled `by` (how): logged, counted, and settled in the journal.
    fn webhook_removed(&mut self, host: &dyn Host, webhook_id: &str, d: &Delivery, by: &str) {
        self.report_dropped_id(host, webhook_id, d, "webhook_removed", 0);
        self.metrics.deliveries_dropped_webhook_removed.inc(host);
        self.journal_settled_id(&d.event_id, webhook_id);
        log(host, LogLevel::Warn, || {
            format!(
                "delivery dropped: event={} webhook={webhook_id} reason=the webhook was removed or disabled {by}",
                d.event_id
            )
        });
    }
}
