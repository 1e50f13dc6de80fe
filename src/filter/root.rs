//! The root context: one per worker thread. It owns the configuration plan and the outbox, and
//! dispatches every callout, because the SDK routes a callout's response to the context that
//! dispatched it and drops it once a stream's context is gone (see the design).

use super::http::EmitterStream;
use super::metrics::Metrics;
use super::{log, now_ms, random_bytes};
use crate::config::Plan;
use crate::delivery::{
    dead_letter_body, AttemptOutcome, CircuitChange, DeadLetterReason, Delivery, Outbox, Refused,
    Verdict,
};
use crate::event::Event;
use crate::signature::SigningKey;
use crate::url::WebhookUrl;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

const USER_AGENT: &str = concat!("webhook-emitter/", env!("CARGO_PKG_VERSION"));
/// Retries and probes are driven by this tick; new events wake the root at once (the doorbell).
const TICK: Duration = Duration::from_millis(50);

thread_local! {
    /// This thread's worker of each plugin (by plugin name). A new configuration arrives as a new
    /// root context in the same VM; it adopts the worker, so queued deliveries survive it.
    static WORKERS: RefCell<HashMap<String, Weak<RefCell<Worker>>>> = RefCell::new(HashMap::new());
}

/// What the root and the HTTP contexts of one worker share.
pub struct Worker {
    pub plan: Rc<Plan>,
    pub outbox: Outbox,
    pub metrics: Metrics,
    /// A shared queue private to this worker: an HTTP context enqueues a byte to wake the root
    /// context (`on_queue_ready`) so that it dispatches from a root callback.
    doorbell: Option<u32>,
    doorbell_rung: bool,
    reported_depth: i64,
    reported_in_flight: i64,
}

/// Where one lane's deliveries go.
struct Target<'p> {
    id: &'p str,
    url: &'p WebhookUrl,
    cluster: &'p str,
    key: Option<&'p SigningKey>,
}

impl Worker {
    /// Fans an event out to its subscribers and wakes the root context to dispatch.
    pub fn emit(&mut self, event: &Event, now: u64) {
        let (accepted, refused) = self.outbox.fan_out(&self.plan, event, now);
        self.metrics.events_emitted.inc();
        if accepted == 0 && refused.is_empty() {
            self.metrics.events_without_subscribers.inc();
        }
        for r in refused {
            self.report_refused(r, now);
        }
        if accepted > 0 {
            self.ring();
        }
        self.report_gauges();
    }

    fn ring(&mut self) {
        if !self.doorbell_rung {
            if let Some(queue) = self.doorbell {
                self.doorbell_rung = hostcalls::enqueue_shared_queue(queue, Some(b"1")).is_ok();
            }
        }
    }

    fn target(&self, lane: usize) -> Option<Target<'_>> {
        if let Some(w) = self.plan.webhooks.get(lane) {
            return Some(Target {
                id: &w.id,
                url: &w.url,
                cluster: &w.cluster,
                key: Some(&w.key),
            });
        }
        let dl = self
            .plan
            .delivery
            .dead_letter
            .as_ref()
            .filter(|_| lane == self.outbox.dead_letter_lane())?;
        Some(Target {
            id: "dead-letter",
            url: &dl.url,
            cluster: &dl.cluster,
            key: dl.key.as_ref(),
        })
    }

    fn lane_name(&self, lane: usize) -> &str {
        self.target(lane).map_or("?", |t| t.id)
    }

    /// Logs and counts a delivery the outbox refused. One refused because its webhook answered 410
    /// is also dead-lettered, like the deliveries that were queued at the 410.
    fn report_refused(&mut self, refused: Refused, now: u64) {
        let (d, metric, why) = match &refused {
            Refused::QueueFull(d) => (
                d,
                self.metrics.deliveries_dropped_queue_full,
                "the outbox is full (delivery.maxQueued)",
            ),
            Refused::WebhookGone(d) => (
                d,
                self.metrics.deliveries_dropped_webhook_gone,
                "the webhook answered 410 Gone",
            ),
        };
        metric.inc();
        log(
            LogLevel::Error,
            &format!(
                "delivery dropped: event={} webhook={} reason={why}",
                d.event_id,
                self.lane_name(d.webhook)
            ),
        );
        // A dead letter itself is never dead-lettered again.
        if let Refused::WebhookGone(d) = &refused {
            if d.webhook != self.outbox.dead_letter_lane() {
                self.dead_letter(d, DeadLetterReason::WebhookGone, now);
            }
        }
    }

    /// Hands a delivery that finally failed to the dead-letter endpoint, when one is configured.
    fn dead_letter(&mut self, delivery: &Delivery, reason: DeadLetterReason, now: u64) {
        if self.plan.delivery.dead_letter.is_none() {
            return;
        }
        let body = dead_letter_body(delivery, self.lane_name(delivery.webhook), reason, now);
        let letter = Delivery::new(
            &delivery.event_id,
            self.outbox.dead_letter_lane(),
            body,
            now,
        );
        match self.outbox.enqueue(letter) {
            Ok(()) => {}
            Err(refused) => self.report_refused(refused, now),
        }
    }

    fn report_gauges(&mut self) {
        // Host calls only when a gauge moved.
        let depth = self.outbox.held() as i64;
        let in_flight = self.outbox.in_flight() as i64;
        if depth != self.reported_depth {
            self.metrics.outbox_depth.add(depth - self.reported_depth);
        }
        if in_flight != self.reported_in_flight {
            self.metrics
                .callouts_in_flight
                .add(in_flight - self.reported_in_flight);
        }
        self.reported_depth = depth;
        self.reported_in_flight = in_flight;
    }

    /// Applies an attempt's outcome: metrics, the log line of a final outcome, the retry.
    fn settle(&mut self, delivery: Delivery, outcome: &AttemptOutcome, now: u64) {
        let metrics = self.metrics;
        let lane = delivery.webhook;
        let is_dead_letter = lane == self.outbox.dead_letter_lane();
        let name = self.lane_name(lane).to_string();
        let (event_id, attempts) = (delivery.event_id.clone(), delivery.attempts);
        // Jitter is only drawn for a failure (a host call saved on every success).
        let succeeded =
            matches!(outcome, AttemptOutcome::Status { code, .. } if (200..300).contains(code));
        let random = if succeeded {
            0
        } else {
            u32::from_le_bytes(random_bytes::<4>())
        };
        let verdict = self.outbox.finish(delivery, outcome, now, random);
        let last = if succeeded {
            String::new()
        } else {
            describe(outcome)
        };
        match verdict {
            Verdict::Delivered { .. } if is_dead_letter => {
                metrics.dead_letters_delivered.inc();
                log(
                    LogLevel::Info,
                    &format!("dead letter stored: event={event_id} attempts={attempts}"),
                );
            }
            Verdict::Delivered { latency_ms } => {
                metrics.deliveries_succeeded.inc();
                metrics.delivery_latency_ms.record(latency_ms);
                // The common case, a first-attempt success, is a debug line: at info level, one line
                // per delivery cost about a fifth of the filter's CPU per event (bench/results/profile.md).
                // A delivery that needed retries is worth an info line.
                let level = if attempts > 1 {
                    LogLevel::Info
                } else {
                    LogLevel::Debug
                };
                if level == LogLevel::Info || super::debug_enabled() {
                    log(
                        level,
                        &format!("delivered: event={event_id} webhook={name} attempts={attempts} latency_ms={latency_ms}"),
                    );
                }
            }
            Verdict::Retry { at_ms } => {
                metrics.deliveries_failed.inc();
                metrics.deliveries_retried.inc();
                log(
                    LogLevel::Info,
                    &format!(
                        "attempt failed, will retry: event={event_id} webhook={name} attempts={attempts} last={last} retry_in_ms={}",
                        at_ms.saturating_sub(now)
                    ),
                );
            }
            Verdict::Exhausted(_) if is_dead_letter => {
                metrics.deliveries_failed.inc();
                metrics.dead_letters_failed.inc();
                log(
                    LogLevel::Critical,
                    &format!("dead letter could not be stored: event={event_id} attempts={attempts} last={last}"),
                );
            }
            Verdict::Exhausted(failed) => {
                metrics.deliveries_failed.inc();
                metrics.deliveries_exhausted.inc();
                log(
                    LogLevel::Error,
                    &format!("delivery failed for good: event={event_id} webhook={name} attempts={attempts} last={last}"),
                );
                self.dead_letter(&failed, DeadLetterReason::Exhausted, now);
            }
            Verdict::Gone { dropped } => {
                metrics.deliveries_failed.inc();
                metrics.webhooks_disabled_gone.inc();
                log(LogLevel::Warn, &format!("webhook {name} answered 410 Gone: disabled until the configuration changes"));
                for d in &dropped {
                    metrics.deliveries_dropped_webhook_gone.inc();
                    log(
                        LogLevel::Error,
                        &format!("delivery dropped: event={} webhook={name} reason=the webhook answered 410 Gone", d.event_id),
                    );
                    self.dead_letter(d, DeadLetterReason::WebhookGone, now);
                }
            }
        }
        match self.outbox.take_circuit_change() {
            Some(CircuitChange::Opened) => {
                metrics.circuits_opened.inc();
                log(
                    LogLevel::Warn,
                    &format!("circuit opened for webhook {name}: its queue waits, one probe per backoff period"),
                );
            }
            Some(CircuitChange::Closed) => log(
                LogLevel::Info,
                &format!("circuit closed for webhook {name}"),
            ),
            None => {}
        }
        self.report_gauges();
    }
}

impl Worker {
    /// The answer to an attempt whose webhook a new configuration removed or disabled while it was
    /// out: a success still counts; a failure is not retried, and is dropped with a trace.
    fn settle_orphan(
        &mut self,
        delivery: Delivery,
        webhook_id: &str,
        outcome: &AttemptOutcome,
        now: u64,
    ) {
        self.outbox.release_orphan();
        let (event_id, attempts) = (&delivery.event_id, delivery.attempts);
        match outcome {
            AttemptOutcome::Status { code, .. } if (200..300).contains(code) => {
                let latency_ms = now.saturating_sub(delivery.created_at_ms);
                self.metrics.deliveries_succeeded.inc();
                self.metrics.delivery_latency_ms.record(latency_ms);
                log(
                    LogLevel::Info,
                    &format!("delivered: event={event_id} webhook={webhook_id} attempts={attempts} latency_ms={latency_ms}"),
                );
            }
            _ => {
                self.metrics.deliveries_failed.inc();
                self.metrics.deliveries_dropped_webhook_removed.inc();
                log(
                    LogLevel::Warn,
                    &format!(
                        "delivery dropped: event={event_id} webhook={webhook_id} reason=the webhook was removed or disabled by a new configuration last={}",
                        describe(outcome)
                    ),
                );
            }
        }
        self.report_gauges();
    }
}

pub type SharedWorker = Rc<RefCell<Worker>>;

#[derive(Default)]
pub struct EmitterRoot {
    worker: Option<SharedWorker>,
    /// Callouts in flight: token → the delivery and the name of its lane (webhook id).
    in_flight: HashMap<u32, (Delivery, String)>,
    /// Envoy asked this root to finish (`on_done`) while callouts were still out.
    draining: bool,
}

impl EmitterRoot {
    fn plugin_name(&self) -> String {
        self.get_property(vec!["plugin_name"])
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default()
    }

    fn register_doorbell() -> Option<u32> {
        let name = format!("webhook_emitter.doorbell.{}", hex(&random_bytes::<8>()));
        let doorbell = hostcalls::register_shared_queue(&name).ok();
        if doorbell.is_none() {
            log(
                LogLevel::Warn,
                "could not register the doorbell queue; deliveries start on the next tick",
            );
        }
        doorbell
    }

    fn configure(&mut self, plan: Plan) {
        let key = self.plugin_name();
        let existing = self
            .worker
            .clone()
            .or_else(|| WORKERS.with(|w| w.borrow().get(&key).and_then(Weak::upgrade)));
        let worker = match existing {
            Some(worker) => {
                adopt(&worker, plan);
                // The doorbell wakes the root context that registered it: take it over.
                worker.borrow_mut().doorbell = Self::register_doorbell();
                worker
            }
            None => {
                let outbox = Outbox::new(plan.webhooks.len(), plan.delivery.outbox.clone());
                Rc::new(RefCell::new(Worker {
                    plan: Rc::new(plan),
                    outbox,
                    metrics: Metrics::define(),
                    doorbell: Self::register_doorbell(),
                    doorbell_rung: false,
                    reported_depth: 0,
                    reported_in_flight: 0,
                }))
            }
        };
        WORKERS.with(|w| w.borrow_mut().insert(key, Rc::downgrade(&worker)));
        self.worker = Some(worker);
        self.set_tick_period(TICK);
    }

    /// Dispatches every delivery that is due. A draining root only collects its answers: the
    /// root that adopted the worker (if any) sends what is still queued.
    fn pump(&mut self) {
        let Some(worker) = self.worker.clone().filter(|_| !self.draining) else {
            return;
        };
        let now = now_ms();
        let due = worker.borrow_mut().outbox.take_due(now);
        for delivery in due {
            self.dispatch(&worker, delivery, now);
        }
        worker.borrow_mut().report_gauges();
    }

    fn dispatch(&mut self, worker: &SharedWorker, delivery: Delivery, now: u64) {
        let w = worker.borrow();
        let Some(target) = w.target(delivery.webhook) else {
            drop(w);
            worker.borrow_mut().outbox.release_orphan();
            return;
        };
        let timestamp = (now / 1000).to_string();
        let signature = target
            .key
            .map(|k| k.sign(&delivery.event_id, now / 1000, &delivery.body));
        let length = delivery.body.len().to_string();
        let mut headers = vec![
            (":method", "POST"),
            (":path", target.url.path_and_query.as_str()),
            (":authority", target.url.authority.as_str()),
            (":scheme", if target.url.https { "https" } else { "http" }),
            ("content-type", "application/json"),
            ("content-length", length.as_str()),
            ("user-agent", USER_AGENT),
            ("webhook-id", delivery.event_id.as_str()),
            ("webhook-timestamp", timestamp.as_str()),
        ];
        if let Some(signature) = &signature {
            headers.push(("webhook-signature", signature.as_str()));
        }
        let timeout = Duration::from_millis(w.plan.delivery.timeout_ms);
        let result = self.dispatch_http_call(
            target.cluster,
            headers,
            Some(&delivery.body),
            vec![],
            timeout,
        );
        let (name, cluster) = (target.id.to_string(), target.cluster.to_string());
        w.metrics.deliveries_attempted.inc();
        drop(w);
        match result {
            Ok(token) => {
                self.in_flight.insert(token, (delivery, name));
            }
            Err(status) => {
                let reason = format!(
                    "dispatch refused ({status:?}); is cluster {cluster:?} defined in Envoy?"
                );
                worker
                    .borrow_mut()
                    .settle(delivery, &AttemptOutcome::NoResponse { reason }, now);
            }
        }
    }
}

/// Moves a worker onto a new plan; queued deliveries to webhooks that are gone are dropped.
fn adopt(worker: &SharedWorker, plan: Plan) {
    let mut w = worker.borrow_mut();
    let old = Rc::clone(&w.plan);
    let new_index = |i: usize| {
        let id = &old.webhooks.get(i)?.id;
        plan.webhook_index(id)
            .filter(|&j| plan.webhooks.get(j).is_some_and(|h| h.enabled))
    };
    let dropped =
        w.outbox
            .reconfigure(plan.webhooks.len(), new_index, plan.delivery.outbox.clone());
    for d in dropped {
        w.metrics.deliveries_dropped_webhook_removed.inc();
        log(
            LogLevel::Warn,
            &format!(
                "delivery dropped: event={} webhook={} reason=the webhook was removed or disabled by a new configuration",
                d.event_id,
                old.webhooks.get(d.webhook).map_or("?", |h| h.id.as_str())
            ),
        );
    }
    w.plan = Rc::new(plan);
    w.ring();
}

fn describe(outcome: &AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::Status { code, .. } => format!("status {code}"),
        AttemptOutcome::NoResponse { reason } => reason.clone(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Context for EmitterRoot {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body_size: usize,
        _trailers: usize,
    ) {
        let Some((mut delivery, lane_name)) = self.in_flight.remove(&token) else {
            return;
        };
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let now = now_ms();
        let status = self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok());
        let outcome = match status {
            Some(code) => AttemptOutcome::Status {
                code,
                retry_after: self.get_http_call_response_header_bytes("retry-after"),
            },
            None => AttemptOutcome::NoResponse {
                reason: "connection reset".into(),
            },
        };
        // A new configuration may have moved or removed the lane since dispatch.
        let current = {
            let w = worker.borrow();
            if lane_name == "dead-letter" {
                w.plan
                    .delivery
                    .dead_letter
                    .as_ref()
                    .map(|_| w.outbox.dead_letter_lane())
            } else {
                // Only an enabled webhook takes the attempt back; a disabled one gets nothing more.
                w.plan
                    .webhook_index(&lane_name)
                    .filter(|&i| w.plan.webhooks.get(i).is_some_and(|h| h.enabled))
            }
        };
        match current {
            Some(index) => {
                delivery.webhook = index;
                worker.borrow_mut().settle(delivery, &outcome, now);
            }
            None => worker
                .borrow_mut()
                .settle_orphan(delivery, &lane_name, &outcome, now),
        }
        if self.draining && self.in_flight.is_empty() {
            self.done();
        } else {
            self.pump();
        }
    }

    fn on_done(&mut self) -> bool {
        // Answers to callouts come back to this context only: stay until they are in.
        self.draining = true;
        self.in_flight.is_empty()
    }
}

impl RootContext for EmitterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(json) = self.get_plugin_configuration() else {
            log(LogLevel::Error, "configuration rejected: configuration: missing (the plugin needs its JSON configuration)");
            return false;
        };
        match Plan::from_json(&json, &|name| std::env::var(name).ok()) {
            Ok(plan) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "configured: {} event rules, {} webhooks",
                        plan.rules.len(),
                        plan.webhooks.len()
                    ),
                );
                self.configure(plan);
                true
            }
            Err(errors) => {
                for e in &errors {
                    log(LogLevel::Error, &format!("configuration rejected: {e}"));
                }
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.pump();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        if let Some(worker) = &self.worker {
            worker.borrow_mut().doorbell_rung = false;
        }
        self.pump();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: the SDK treats a missing HTTP context as a bug.
        Some(Box::new(EmitterStream::new(self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
