//! The root context: one per worker thread. It owns the configuration plan and the outbox, and
//! dispatches every callout, because the SDK routes a callout's response to the context that
//! dispatched it and drops it once a stream's context is gone (see the design).

use super::http::EmitterStream;
use super::metrics::Metrics;
use super::{log, now_ms, random_bytes};
use crate::config::Plan;
use crate::delivery::{AttemptOutcome, Delivery, Outbox, Refused, Verdict};
use crate::event::Event;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

const USER_AGENT: &str = concat!("webhook-emitter/", env!("CARGO_PKG_VERSION"));
/// Retries are driven by this tick; new events wake the root at once through the doorbell.
const TICK: Duration = Duration::from_millis(50);

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

impl Worker {
    /// Fans an event out to its subscribers and wakes the root context to dispatch.
    pub fn emit(&mut self, event: &Event, now: u64) {
        let (accepted, refused) = self.outbox.fan_out(&self.plan, event, now);
        self.metrics.events_emitted.inc();
        if accepted == 0 && refused.is_empty() {
            self.metrics.events_without_subscribers.inc();
            log(
                LogLevel::Debug,
                &format!(
                    "event {} ({}) of organisation {:?} has no subscribed webhook",
                    event.id_hex, event.event_type, event.organisation_id
                ),
            );
        }
        for r in refused {
            self.report_refused(r);
        }
        if accepted > 0 && !self.doorbell_rung {
            if let Some(queue) = self.doorbell {
                self.doorbell_rung = hostcalls::enqueue_shared_queue(queue, Some(b"1")).is_ok();
            }
        }
        self.report_gauges();
    }

    fn webhook_id(&self, d: &Delivery) -> &str {
        self.plan
            .webhooks
            .get(d.webhook)
            .map_or("?", |w| w.id.as_str())
    }

    fn report_refused(&self, refused: Refused) {
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
                self.webhook_id(d)
            ),
        );
    }

    fn report_gauges(&mut self) {
        let depth = self.outbox.held() as i64;
        let in_flight = self.outbox.in_flight() as i64;
        self.metrics.outbox_depth.add(depth - self.reported_depth);
        self.metrics
            .callouts_in_flight
            .add(in_flight - self.reported_in_flight);
        self.reported_depth = depth;
        self.reported_in_flight = in_flight;
    }
}

pub type SharedWorker = Rc<RefCell<Worker>>;

#[derive(Default)]
pub struct EmitterRoot {
    worker: Option<SharedWorker>,
    metrics: Option<Metrics>,
    /// Callouts in flight: token → the delivery and the id of its webhook.
    in_flight: HashMap<u32, (Delivery, String)>,
}

impl EmitterRoot {
    fn configure(&mut self, plan: Plan) {
        let metrics = *self.metrics.get_or_insert_with(Metrics::define);
        let settings = &plan.delivery;
        match &self.worker {
            Some(worker) => {
                let mut w = worker.borrow_mut();
                let old = Rc::clone(&w.plan);
                let new_index = |i: usize| {
                    let id = &old.webhooks.get(i)?.id;
                    plan.webhook_index(id).filter(|&j| plan.webhooks[j].enabled)
                };
                let dropped = w.outbox.reconfigure(
                    plan.webhooks.len(),
                    new_index,
                    settings.retry.clone(),
                    settings.max_queued,
                    settings.max_in_flight_per_webhook,
                );
                for d in dropped {
                    metrics.deliveries_dropped_webhook_removed.inc();
                    log(
                        LogLevel::Warn,
                        &format!("delivery dropped: event={} webhook={} reason=webhook removed or disabled by a new configuration", d.event_id, old.webhooks.get(d.webhook).map_or("?", |w| w.id.as_str())),
                    );
                }
                w.plan = Rc::new(plan);
            }
            None => {
                let outbox = Outbox::new(
                    plan.webhooks.len(),
                    settings.retry.clone(),
                    settings.max_queued,
                    settings.max_in_flight_per_webhook,
                );
                let name = format!("webhook_emitter.doorbell.{}", hex(&random_bytes::<8>()));
                let doorbell = hostcalls::register_shared_queue(&name).ok();
                if doorbell.is_none() {
                    log(
                        LogLevel::Warn,
                        "could not register the doorbell queue; deliveries start on the next tick",
                    );
                }
                self.worker = Some(Rc::new(RefCell::new(Worker {
                    plan: Rc::new(plan),
                    outbox,
                    metrics,
                    doorbell,
                    doorbell_rung: false,
                    reported_depth: 0,
                    reported_in_flight: 0,
                })));
            }
        }
        self.set_tick_period(TICK);
    }

    /// Dispatches every delivery that is due.
    fn pump(&mut self) {
        let Some(worker) = self.worker.clone() else {
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
        let Some(webhook) = w.plan.webhooks.get(delivery.webhook) else {
            drop(w);
            worker.borrow_mut().outbox.release_orphan();
            return;
        };
        let timestamp = (now / 1000).to_string();
        let signature = webhook
            .key
            .sign(&delivery.event_id, now / 1000, &delivery.body);
        let length = delivery.body.len().to_string();
        let headers = vec![
            (":method", "POST"),
            (":path", webhook.url.path_and_query.as_str()),
            (":authority", webhook.url.authority.as_str()),
            (":scheme", if webhook.url.https { "https" } else { "http" }),
            ("content-type", "application/json"),
            ("content-length", length.as_str()),
            ("user-agent", USER_AGENT),
            ("webhook-id", delivery.event_id.as_str()),
            ("webhook-timestamp", timestamp.as_str()),
            ("webhook-signature", signature.as_str()),
        ];
        let timeout = Duration::from_millis(w.plan.delivery.timeout_ms);
        let result = self.dispatch_http_call(
            &webhook.cluster,
            headers,
            Some(&delivery.body),
            vec![],
            timeout,
        );
        let webhook_id = webhook.id.clone();
        let cluster = webhook.cluster.clone();
        w.metrics.deliveries_attempted.inc();
        drop(w);
        match result {
            Ok(token) => {
                self.in_flight.insert(token, (delivery, webhook_id));
            }
            Err(status) => {
                let reason = format!(
                    "dispatch refused ({status:?}); is cluster {cluster:?} defined in Envoy?"
                );
                self.settle(
                    worker,
                    delivery,
                    &AttemptOutcome::NoResponse { reason },
                    now,
                );
            }
        }
    }

    /// Applies an attempt's outcome: metrics, the log line of a final outcome, the retry.
    fn settle(
        &mut self,
        worker: &SharedWorker,
        delivery: Delivery,
        outcome: &AttemptOutcome,
        now: u64,
    ) {
        let mut w = worker.borrow_mut();
        let metrics = w.metrics;
        let webhook_id = w.webhook_id(&delivery).to_string();
        let (event_id, attempts) = (delivery.event_id.clone(), delivery.attempts);
        let random = u32::from_le_bytes(random_bytes::<4>());
        match w.outbox.finish(delivery, outcome, now, random) {
            Verdict::Delivered { latency_ms } => {
                metrics.deliveries_succeeded.inc();
                metrics.delivery_latency_ms.record(latency_ms);
                log(
                    LogLevel::Info,
                    &format!("delivered: event={event_id} webhook={webhook_id} attempts={attempts} latency_ms={latency_ms}"),
                );
            }
            Verdict::Retry { at_ms } => {
                metrics.deliveries_failed.inc();
                metrics.deliveries_retried.inc();
                log(
                    LogLevel::Info,
                    &format!("attempt failed, will retry: event={event_id} webhook={webhook_id} attempts={attempts} last={} retry_in_ms={}", describe(outcome), at_ms.saturating_sub(now)),
                );
            }
            Verdict::Exhausted => {
                metrics.deliveries_failed.inc();
                metrics.deliveries_exhausted.inc();
                log(
                    LogLevel::Error,
                    &format!("delivery failed for good: event={event_id} webhook={webhook_id} attempts={attempts} last={}", describe(outcome)),
                );
            }
            Verdict::Gone { dropped } => {
                metrics.deliveries_failed.inc();
                metrics.webhooks_disabled_gone.inc();
                log(
                    LogLevel::Warn,
                    &format!("webhook {webhook_id} answered 410 Gone: disabled until the configuration changes"),
                );
                for d in dropped.into_iter().skip(1) {
                    metrics.deliveries_dropped_webhook_gone.inc();
                    log(
                        LogLevel::Error,
                        &format!("delivery dropped: event={} webhook={webhook_id} reason=the webhook answered 410 Gone", d.event_id),
                    );
                }
                metrics.deliveries_dropped_webhook_gone.inc();
                log(
                    LogLevel::Error,
                    &format!("delivery dropped: event={event_id} webhook={webhook_id} reason=the webhook answered 410 Gone"),
                );
            }
        }
        w.report_gauges();
    }
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
        let Some((mut delivery, webhook_id)) = self.in_flight.remove(&token) else {
            return;
        };
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let now = now_ms();
        let outcome = match self
            .get_http_call_response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
        {
            Some(code) => AttemptOutcome::Status {
                code,
                retry_after: self.get_http_call_response_header("retry-after"),
            },
            None => AttemptOutcome::NoResponse {
                reason: "connection reset".into(),
            },
        };
        // A new configuration may have moved or removed the webhook since dispatch.
        let current = worker.borrow().plan.webhook_index(&webhook_id);
        match current {
            Some(index) => {
                delivery.webhook = index;
                self.settle(&worker, delivery, &outcome, now);
            }
            None => worker.borrow_mut().outbox.release_orphan(),
        }
        self.pump();
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
