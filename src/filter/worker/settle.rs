//! How deliveries end: an attempt's answer settled (delivered, retried, failed for good, 410
//! Gone), the circuit changes it causes, and deliveries dropped or handed to the dead-letter
//! endpoint, each logged and counted.

use super::{lane_name, Attempt, LaneKey, Worker};
use crate::delivery::shared::EndpointState;
use crate::delivery::{
    dead_letter_body, AttemptOutcome, Bound, CircuitChange, DeadLetterReason, Delivery, LaneId,
    Payload, Refused, Verdict,
};
use crate::filter::host::{log, Host, LogLevel};
use crate::filter::metrics::Metric;
use crate::journal::spill::SpillOutcome;
use std::rc::Rc;

impl Worker {
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
            LaneKey::Webhook(id) => self.hooks().lane_of(id).map(LaneId::Webhook),
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
    pub(super) fn settle(
        &mut self,
        host: &dyn Host,
        delivery: Delivery,
        outcome: &AttemptOutcome,
        now_ms: u64,
    ) {
        let m = self.metrics;
        let lane = delivery.lane;
        let is_dead_letter = lane == LaneId::DeadLetter;
        let hooks = self.hooks();
        let name = lane_name(&hooks, lane);
        let (event_id, attempts) = (Rc::clone(&delivery.event_id), delivery.attempts);
        let was_probe = delivery.is_probe;
        // Jitter is only drawn for a failure (a host call saved on every success).
        let random = if outcome.is_success() {
            0
        } else {
            host.random_u32()
        };
        let last = outcome.describe();
        let trace = self.trace(&delivery);
        let verdict = self.outbox.finish(delivery, outcome, now_ms, random);
        self.report_verdict(host, &hooks, trace, outcome, &verdict, now_ms);
        match verdict {
            Verdict::Delivered { .. } if is_dead_letter => {
                m.dead_letters_delivered.inc(host);
                log(host, LogLevel::Info, || {
                    format!("dead letter stored: event={event_id} attempts={attempts}")
                });
            }
            Verdict::Delivered { latency_ms } => {
                self.journal_settled(&hooks, &event_id, lane);
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
                self.journal_settled(&hooks, &event_id, lane);
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
        let hooks = self.hooks();
        let name = lane_name(&hooks, lane);
        log(host, LogLevel::Warn, || {
            format!("webhook {name} answered 410 Gone: disabled for this proxy until its URL changes or Envoy restarts")
        });
        for d in dropped {
            self.journal_settled(&hooks, &d.event_id, d.lane);
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
        let hooks = self.hooks();
        let name = lane_name(&hooks, lane);
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
        if let LaneKey::Webhook(id) = lane {
            self.report_orphan(host, id, &delivery, outcome, now_ms);
        }
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

    pub(super) fn drop_evicted(&mut self, host: &dyn Host, d: Delivery, now_ms: u64) {
        // With a journal it waits in etcd instead, first of its webhook's spilled deliveries:
        // not a final outcome, so not reported until it is delivered, fails or is dropped.
        let outcome = self.spill(host, &d, true, now_ms);
        if outcome.spilled() {
            return;
        }
        let over_share = "the outbox is full and this webhook holds more than its fair share";
        match self.journal_bound(outcome) {
            Some(j) => {
                let why = format!(
                    "the outbox is full, this webhook holds more than its fair share and {j}"
                );
                self.drop_counted(host, &d, j.metric, j.report, &why, now_ms);
            }
            None => {
                let metric = self.metrics.deliveries_dropped_over_share;
                self.drop_counted(host, &d, metric, "over_share", over_share, now_ms);
            }
        }
        // The dead letter's reason stays over_share: it was evicted for its webhook's share.
        self.dead_letter(host, &d, DeadLetterReason::OverShare, now_ms);
    }

    /// A delivery the outbox refused for want of room (`bound`) that the journal could not take
    /// either (`outcome`): dropped, naming the journal's bound when that is what was reached.
    pub(super) fn drop_unspilled(
        &mut self,
        host: &dyn Host,
        d: Delivery,
        bound: Bound,
        outcome: SpillOutcome,
        now_ms: u64,
    ) {
        let Some(journal) = self.journal_bound(outcome) else {
            return self.report_refused(host, Refused::QueueFull(d, bound), now_ms);
        };
        let why = format!("{} and {journal}", outbox_full(bound));
        self.drop_counted(host, &d, journal.metric, journal.report, &why, now_ms);
    }

    /// Logs and counts a delivery the outbox refused. One refused because its webhook answered
    /// 410 is also dead-lettered, like the deliveries that were queued at the 410.
    pub(super) fn report_refused(&mut self, host: &dyn Host, refused: Refused, now_ms: u64) {
        let (d, metric, why, reason) = match refused {
            Refused::QueueFull(d, bound) => (
                d,
                self.metrics.deliveries_dropped_queue_full,
                outbox_full(bound),
                None,
            ),
            Refused::WebhookGone(d) => (
                d,
                self.metrics.deliveries_dropped_webhook_gone,
                "the webhook answered 410 Gone",
                Some(DeadLetterReason::WebhookGone),
            ),
        };
        let report_reason = reason.map_or("queue_full", DeadLetterReason::as_str);
        if d.lane == LaneId::DeadLetter {
            self.report_dropped(host, &self.hooks(), &d, report_reason, now_ms);
            self.dead_letter_lost(host, &d, &format!("reason={why}"));
            return;
        }
        self.drop_counted(host, &d, metric, report_reason, why, now_ms);
        if let Some(reason) = reason {
            self.dead_letter(host, &d, reason, now_ms);
        }
    }

    /// The one way a webhook's delivery is dropped for good: reported to the registry, settled in
    /// the journal, counted in `metric` and logged at error with its event id and `why`.
    fn drop_counted(
        &mut self,
        host: &dyn Host,
        d: &Delivery,
        metric: Metric,
        report_reason: &str,
        why: &str,
        now_ms: u64,
    ) {
        self.report_dropped(host, &self.hooks(), d, report_reason, now_ms);
        self.journal_settled(&self.hooks(), &d.event_id, d.lane);
        metric.inc(host);
        let name = lane_name(&self.hooks(), d.lane).to_string();
        log(host, LogLevel::Error, || {
            format!(
                "delivery dropped: event={} webhook={name} reason={why}",
                d.event_id
            )
        });
    }

    /// A dead letter that can't be stored: the last trace of its delivery. `detail` is
    /// `last=<failure>` or `reason=<why>`.
    pub(super) fn dead_letter_lost(&self, host: &dyn Host, d: &Delivery, detail: &str) {
        self.metrics.dead_letters_failed.inc(host);
        log(host, LogLevel::Critical, || {
            format!(
                "dead letter could not be stored: event={} attempts={} {detail}",
                d.event_id, d.attempts
            )
        });
    }

    /// Hands a delivery that finally failed to the dead-letter endpoint, when one is configured.
    pub(super) fn dead_letter(
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
            lane_name(&self.hooks(), delivery.lane),
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
}

/// Why the outbox refused a delivery, naming the bound that was reached.
fn outbox_full(bound: Bound) -> &'static str {
    match bound {
        Bound::Count => "the outbox is full (delivery.maxQueued)",
        Bound::Bytes => "the outbox is full (delivery.maxQueuedBytes)",
    }
}
