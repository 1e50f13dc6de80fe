//! The outbox and retry scheduler: a pure state machine. The clock (`now_ms`, Unix milliseconds)
//! and the randomness (for jitter) are passed in, so every decision is deterministic under test.
//!
//! Each webhook has its own lane, so a slow or dead endpoint only ever holds its own deliveries:
//! at most `max_in_flight_per_webhook` attempts of a lane are out at once.

use crate::config::Plan;
use crate::event::Event;
use std::collections::VecDeque;

/// `Retry-After` is honoured up to this long.
pub const MAX_RETRY_AFTER_MS: u64 = 3_600_000;

/// The retry schedule as data: the delay before each retry; attempts = retries + 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub schedule_ms: Vec<u64>,
}

impl RetryPolicy {
    pub fn new(schedule_ms: Vec<u64>) -> Self {
        RetryPolicy { schedule_ms }
    }

    pub fn max_attempts(&self) -> u32 {
        self.schedule_ms.len() as u32 + 1
    }

    /// The delay after `failed_attempts` failures, with ±20% jitter drawn from `random`;
    /// None when the schedule is used up.
    pub fn backoff_ms(&self, failed_attempts: u32, random: u32) -> Option<u64> {
        let base = *self
            .schedule_ms
            .get(failed_attempts.checked_sub(1)? as usize)?;
        // factor in [0.8, 1.2], in 1/1000 steps
        let permille = 800 + u64::from(random % 401);
        Some(base * permille / 1000)
    }
}

/// One event on its way to one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event_id: String,
    /// Index of the webhook in the plan's `webhooks`.
    pub webhook: usize,
    /// The envelope, exactly as signed and sent on every attempt.
    pub body: Vec<u8>,
    pub attempts: u32,
    pub created_at_ms: u64,
    pub next_attempt_at_ms: u64,
    /// The last failure, for the final log line (`503`, `reset`, …).
    pub last_failure: Option<String>,
    /// This attempt is the one probe of an open circuit.
    pub is_probe: bool,
}

impl Delivery {
    pub fn new(event_id: &str, webhook: usize, body: Vec<u8>, now_ms: u64) -> Self {
        Delivery {
            event_id: event_id.to_string(),
            webhook,
            body,
            attempts: 0,
            created_at_ms: now_ms,
            next_attempt_at_ms: now_ms,
            last_failure: None,
            is_probe: false,
        }
    }
}

/// What an attempt came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// An HTTP status; Envoy answers 503 or 504 itself for a refused connection or a timeout.
    Status {
        code: u16,
        /// The raw header: a peer may send bytes that are not UTF-8.
        retry_after: Option<Vec<u8>>,
    },
    /// No response at all: a reset, or Envoy refused to dispatch.
    NoResponse { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered {
        latency_ms: u64,
    },
    Retry {
        at_ms: u64,
    },
    /// The schedule is used up; the delivery comes back for the log and the dead letter.
    Exhausted(Delivery),
    /// 410 Gone: the webhook is off for the life of this configuration; its queued deliveries
    /// are handed back so that each is logged and counted.
    Gone {
        dropped: Vec<Delivery>,
    },
}

#[derive(Debug, Default)]
struct Lane {
    ready: VecDeque<Delivery>,
    /// Deliveries waiting for their retry time.
    waiting: Vec<Delivery>,
    in_flight: usize,
    gone: bool,
    consecutive_failures: u32,
    /// Set while the circuit is open: the lane holds its queue and sends one probe at this time.
    probe_at_ms: Option<u64>,
    failed_probes: u32,
}

/// Why a new delivery was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    QueueFull(Delivery),
    WebhookGone(Delivery),
}

/// The outbox's limits, from `delivery` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSettings {
    pub retry: RetryPolicy,
    /// Deliveries held at most, waiting or in flight (`maxQueued`).
    pub max_queued: usize,
    pub max_in_flight_per_webhook: usize,
    /// Consecutive failures that open a lane's circuit (`circuitBreaker.failures`); None is off.
    pub circuit_failures: Option<u32>,
}

/// A circuit opened or closed on this finish; the caller logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitChange {
    Opened,
    Closed,
}

#[derive(Debug)]
pub struct Outbox {
    /// One lane per webhook of the plan, then one for the dead-letter endpoint.
    lanes: Vec<Lane>,
    settings: OutboxSettings,
    /// Deliveries held: waiting or in flight.
    held: usize,
    /// Attempts out, over all lanes (orphans of a reconfiguration included until they are answered).
    in_flight: usize,
    circuit_change: Option<CircuitChange>,
}

impl Outbox {
    /// An outbox for `webhooks` webhooks; lane `webhooks` is the dead-letter lane.
    pub fn new(webhooks: usize, settings: OutboxSettings) -> Self {
        Outbox {
            lanes: (0..=webhooks).map(|_| Lane::default()).collect(),
            settings,
            held: 0,
            in_flight: 0,
            circuit_change: None,
        }
    }

    /// The lane index of dead letters.
    pub fn dead_letter_lane(&self) -> usize {
        self.lanes.len() - 1
    }

    /// Deliveries held, waiting or in flight.
    pub fn held(&self) -> usize {
        self.held
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the lane's circuit is open.
    pub fn circuit_open(&self, lane: usize) -> bool {
        self.lanes
            .get(lane)
            .is_some_and(|l| l.probe_at_ms.is_some())
    }

    /// The circuit change caused by the last [`Outbox::finish`], if any.
    pub fn take_circuit_change(&mut self) -> Option<CircuitChange> {
        self.circuit_change.take()
    }

    /// Accepts a new delivery, unless the outbox is full or the webhook answered 410.
    pub fn enqueue(&mut self, delivery: Delivery) -> Result<(), Refused> {
        let Some(lane) = self.lanes.get_mut(delivery.webhook) else {
            return Err(Refused::WebhookGone(delivery));
        };
        if lane.gone {
            return Err(Refused::WebhookGone(delivery));
        }
        if self.held >= self.settings.max_queued {
            return Err(Refused::QueueFull(delivery));
        }
        lane.ready.push_back(delivery);
        self.held += 1;
        Ok(())
    }

    /// Hands one event to every enabled webhook of its organisation subscribed to its type.
    /// Returns how many deliveries were accepted, and those refused (each must be logged).
    pub fn fan_out(&mut self, plan: &Plan, event: &Event, now_ms: u64) -> (usize, Vec<Refused>) {
        let mut accepted = 0;
        let mut refused = Vec::new();
        for &w in plan.subscribers(&event.event_type, &event.organisation_id) {
            let Some(webhook) = plan.webhooks.get(w) else {
                continue;
            };
            let delivery = Delivery::new(&event.id_hex, w, event.envelope_for(&webhook.id), now_ms);
            match self.enqueue(delivery) {
                Ok(()) => accepted += 1,
                Err(r) => refused.push(r),
            }
        }
        (accepted, refused)
    }

    /// Takes the deliveries to attempt now, and counts them as in flight.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Delivery> {
        let mut due = Vec::new();
        for lane in &mut self.lanes {
            if !lane.waiting.is_empty() {
                let (ready, waiting): (Vec<_>, Vec<_>) = lane
                    .waiting
                    .drain(..)
                    .partition(|d| d.next_attempt_at_ms <= now_ms);
                lane.waiting = waiting;
                // Retries go first: they are older than anything behind them.
                for d in ready.into_iter().rev() {
                    lane.ready.push_front(d);
                }
            }
            let cap = match lane.probe_at_ms {
                None => self.settings.max_in_flight_per_webhook.max(1),
                // An open circuit sends one probe per period, and nothing else.
                Some(at) if at <= now_ms && lane.in_flight == 0 => 1,
                Some(_) => 0,
            };
            while lane.in_flight < cap {
                let Some(mut d) = lane.ready.pop_front() else {
                    break;
                };
                d.attempts += 1;
                d.is_probe = lane.probe_at_ms.is_some();
                lane.in_flight += 1;
                self.in_flight += 1;
                due.push(d);
            }
        }
        due
    }

    /// The earliest time a waiting retry or a probe becomes due.
    pub fn next_due_at(&self) -> Option<u64> {
        let retries = self
            .lanes
            .iter()
            .flat_map(|l| &l.waiting)
            .map(|d| d.next_attempt_at_ms);
        let probes = self
            .lanes
            .iter()
            .filter(|l| !l.ready.is_empty() || !l.waiting.is_empty())
            .filter_map(|l| l.probe_at_ms);
        retries.chain(probes).min()
    }

    fn probe_period_ms(&self, failed_probes: u32, random: u32) -> u64 {
        let schedule = &self.settings.retry.schedule_ms;
        let step = (failed_probes as usize).min(schedule.len().saturating_sub(1));
        let base = schedule.get(step).copied().unwrap_or(1_000);
        base * (800 + u64::from(random % 401)) / 1000
    }

    /// Records the outcome of an attempt taken with [`Outbox::take_due`].
    pub fn finish(
        &mut self,
        mut delivery: Delivery,
        outcome: &AttemptOutcome,
        now_ms: u64,
        random: u32,
    ) -> Verdict {
        let probe_period =
            |lane: &Lane, step: u32| self.probe_period_ms(lane.failed_probes + step, random);
        let Some(lane) = self.lanes.get(delivery.webhook) else {
            self.held = self.held.saturating_sub(1);
            self.in_flight = self.in_flight.saturating_sub(1);
            return Verdict::Exhausted(delivery);
        };
        // The first probe waits one period; each failed probe moves one step along the schedule.
        let (open_period, next_period) = (probe_period(lane, 0), probe_period(lane, 1));
        let threshold = self.settings.circuit_failures;
        let backoff = self.settings.retry.backoff_ms(delivery.attempts, random);
        let Some(lane) = self.lanes.get_mut(delivery.webhook) else {
            return Verdict::Exhausted(delivery);
        };
        lane.in_flight = lane.in_flight.saturating_sub(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        let (failure, retry_after_ms) = match outcome {
            AttemptOutcome::Status { code, .. } if (200..300).contains(code) => {
                self.held = self.held.saturating_sub(1);
                lane.consecutive_failures = 0;
                lane.failed_probes = 0;
                if lane.probe_at_ms.take().is_some() {
                    self.circuit_change = Some(CircuitChange::Closed);
                }
                return Verdict::Delivered {
                    latency_ms: now_ms.saturating_sub(delivery.created_at_ms),
                };
            }
            AttemptOutcome::Status { code: 410, .. } => {
                lane.gone = true;
                lane.probe_at_ms = None;
                let mut dropped: Vec<Delivery> =
                    lane.ready.drain(..).chain(lane.waiting.drain(..)).collect();
                self.held = self.held.saturating_sub(1 + dropped.len());
                delivery.last_failure = Some("status 410".into());
                dropped.insert(0, delivery);
                return Verdict::Gone { dropped };
            }
            AttemptOutcome::Status { code, retry_after } => {
                let honoured = matches!(code, 429 | 503)
                    .then(|| {
                        retry_after
                            .as_deref()
                            .and_then(|v| crate::time::parse_retry_after(v, now_ms))
                    })
                    .flatten();
                (format!("status {code}"), honoured)
            }
            AttemptOutcome::NoResponse { reason } => (reason.clone(), None),
        };
        delivery.last_failure = Some(failure);
        lane.consecutive_failures += 1;
        if delivery.is_probe && lane.probe_at_ms.is_some() {
            lane.failed_probes += 1;
            lane.probe_at_ms = Some(now_ms + next_period);
        } else if lane.probe_at_ms.is_none()
            && threshold.is_some_and(|n| lane.consecutive_failures >= n)
        {
            lane.probe_at_ms = Some(now_ms + open_period);
            self.circuit_change = Some(CircuitChange::Opened);
        }
        match backoff {
            Some(backoff) if !lane.gone => {
                let wait = backoff.max(retry_after_ms.unwrap_or(0).min(MAX_RETRY_AFTER_MS));
                delivery.next_attempt_at_ms = now_ms + wait;
                let at_ms = delivery.next_attempt_at_ms;
                lane.waiting.push(delivery);
                Verdict::Retry { at_ms }
            }
            _ => {
                self.held = self.held.saturating_sub(1);
                Verdict::Exhausted(delivery)
            }
        }
    }

    /// Forgets an in-flight delivery whose webhook a new configuration removed.
    pub fn release_orphan(&mut self) {
        self.held = self.held.saturating_sub(1);
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Moves the outbox onto a new configuration of `webhooks` webhooks. `new_index` maps an old
    /// webhook index to the new one, or None when the webhook was removed or disabled. The
    /// dead-letter lane carries over. Returns the dropped deliveries.
    pub fn reconfigure(
        &mut self,
        webhooks: usize,
        new_index: impl Fn(usize) -> Option<usize>,
        settings: OutboxSettings,
    ) -> Vec<Delivery> {
        let old = std::mem::take(&mut self.lanes);
        let old_dead_letter = old.len().saturating_sub(1);
        self.lanes = (0..=webhooks).map(|_| Lane::default()).collect();
        self.settings = settings;
        let mut dropped = Vec::new();
        for (i, lane) in old.into_iter().enumerate() {
            let target = if i == old_dead_letter {
                Some(webhooks)
            } else {
                new_index(i).filter(|_| !lane.gone)
            };
            if let Some(new_lane) = target.and_then(|t| self.lanes.get_mut(t)) {
                new_lane.in_flight += lane.in_flight;
            }
            for mut d in lane.ready.into_iter().chain(lane.waiting) {
                match target.and_then(|t| self.lanes.get_mut(t).map(|l| (t, l))) {
                    Some((t, new_lane)) => {
                        d.webhook = t;
                        new_lane.waiting.push(d);
                    }
                    None => dropped.push(d),
                }
            }
        }
        self.held = self.held.saturating_sub(dropped.len());
        dropped
    }
}

/// Why a delivery ended up in the dead-letter store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    Exhausted,
    WebhookGone,
}

/// The body POSTed to `delivery.deadLetter`: the failure facts and the envelope as it was sent.
pub fn dead_letter_body(
    delivery: &Delivery,
    webhook_id: &str,
    reason: DeadLetterReason,
    now_ms: u64,
) -> Vec<u8> {
    let reason = match reason {
        DeadLetterReason::Exhausted => "exhausted",
        DeadLetterReason::WebhookGone => "webhook_gone",
    };
    let facts = serde_json::json!({
        "reason": reason,
        "eventId": delivery.event_id,
        "webhookId": webhook_id,
        "attempts": delivery.attempts,
        "lastFailure": delivery.last_failure,
        "createdAt": crate::event::rfc3339_utc(delivery.created_at_ms),
        "failedAt": crate::event::rfc3339_utc(now_ms),
    });
    // The envelope is embedded byte for byte (it is always our own JSON), so the store keeps
    // exactly what was signed.
    let mut body = facts.to_string().into_bytes();
    body.pop();
    body.extend_from_slice(b",\"envelope\":");
    body.extend_from_slice(&delivery.body);
    body.push(b'}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(vec![200, 500, 1000])
    }

    fn status(code: u16) -> AttemptOutcome {
        AttemptOutcome::Status {
            code,
            retry_after: None,
        }
    }

    fn settings(max_queued: usize, max_in_flight: usize, circuit: Option<u32>) -> OutboxSettings {
        OutboxSettings {
            retry: policy(),
            max_queued,
            max_in_flight_per_webhook: max_in_flight,
            circuit_failures: circuit,
        }
    }

    fn outbox(webhooks: usize) -> Outbox {
        Outbox::new(webhooks, settings(100, 2, None))
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = policy();
        assert_eq!(p.backoff_ms(1, 0), Some(160));
        assert_eq!(p.backoff_ms(1, 400), Some(240));
        assert_eq!(p.backoff_ms(1, 200), Some(200));
        assert_eq!(p.backoff_ms(3, 200), Some(1000));
        assert_eq!(p.backoff_ms(4, 200), None);
        assert_eq!(p.backoff_ms(0, 200), None);
        for r in [0, 1, 7, u32::MAX] {
            let d = p.backoff_ms(2, r).unwrap();
            assert!((400..=600).contains(&d), "{d}");
        }
    }

    #[test]
    fn success_after_two_retries() {
        let mut o = outbox(1);
        o.enqueue(Delivery::new("e1", 0, b"{}".to_vec(), 1_000))
            .unwrap();
        let d = o.take_due(1_000).pop().unwrap();
        assert_eq!(d.attempts, 1);
        assert_eq!(
            o.finish(d, &status(503), 1_010, 200),
            Verdict::Retry { at_ms: 1_210 }
        );
        assert!(o.take_due(1_209).is_empty());
        assert_eq!(o.next_due_at(), Some(1_210));
        let d = o.take_due(1_210).pop().unwrap();
        assert_eq!(d.attempts, 2);
        assert_eq!(
            o.finish(
                d,
                &AttemptOutcome::NoResponse {
                    reason: "reset".into()
                },
                1_300,
                200
            ),
            Verdict::Retry { at_ms: 1_800 }
        );
        let d = o.take_due(2_000).pop().unwrap();
        assert_eq!(
            o.finish(d, &status(204), 2_050, 0),
            Verdict::Delivered { latency_ms: 1_050 }
        );
        assert_eq!((o.held(), o.in_flight()), (0, 0));
    }

    #[test]
    fn exhausted_after_the_schedule() {
        let mut o = outbox(1);
        o.enqueue(Delivery::new("e1", 0, vec![], 0)).unwrap();
        let mut now = 0;
        let mut verdicts = Vec::new();
        for _ in 0..4 {
            let d = o.take_due(now).pop().expect("an attempt is due");
            let v = o.finish(d, &status(500), now, 200);
            if let Verdict::Retry { at_ms } = v {
                now = at_ms;
            }
            verdicts.push(v);
        }
        assert!(
            matches!(verdicts.last(), Some(Verdict::Exhausted(d)) if d.last_failure.as_deref() == Some("status 500"))
        );
        assert_eq!(verdicts.len() as u32, policy().max_attempts());
        assert_eq!(o.held(), 0);
    }

    #[test]
    fn redirects_and_client_errors_are_failures() {
        for code in [301, 302, 400, 401, 404, 499] {
            let mut o = outbox(1);
            o.enqueue(Delivery::new("e", 0, vec![], 0)).unwrap();
            let d = o.take_due(0).pop().unwrap();
            assert!(
                matches!(o.finish(d, &status(code), 0, 0), Verdict::Retry { .. }),
                "{code}"
            );
        }
    }

    #[test]
    fn gone_drops_the_lane_and_refuses_new_deliveries() {
        let mut o = outbox(2);
        for i in 0..3 {
            o.enqueue(Delivery::new(&format!("e{i}"), 0, vec![], 0))
                .unwrap();
        }
        o.enqueue(Delivery::new("other", 1, vec![], 0)).unwrap();
        let mut due = o.take_due(0);
        assert_eq!(
            due.len(),
            3,
            "two for lane 0 (max in flight), one for lane 1"
        );
        let first = due.remove(0);
        let Verdict::Gone { dropped } = o.finish(first, &status(410), 0, 0) else {
            panic!()
        };
        assert_eq!(
            dropped
                .iter()
                .map(|d| d.event_id.as_str())
                .collect::<Vec<_>>(),
            ["e0", "e2"]
        );
        assert!(matches!(
            o.enqueue(Delivery::new("e3", 0, vec![], 0)),
            Err(Refused::WebhookGone(_))
        ));
        // The attempt still in flight is not retried once the webhook is gone.
        let second = due.remove(0);
        assert!(matches!(
            o.finish(second, &status(500), 0, 0),
            Verdict::Exhausted(_)
        ));
        let other = due.remove(0);
        assert!(matches!(
            o.finish(other, &status(200), 5, 0),
            Verdict::Delivered { .. }
        ));
        assert_eq!(o.held(), 0);
    }

    #[test]
    fn retry_after_on_429_and_503_only_and_capped() {
        let mut o = outbox(1);
        let ra = |code, v: &str| AttemptOutcome::Status {
            code,
            retry_after: Some(v.into()),
        };
        o.enqueue(Delivery::new("e", 0, vec![], 0)).unwrap();
        let d = o.take_due(0).pop().unwrap();
        assert_eq!(
            o.finish(d, &ra(429, "2"), 100, 200),
            Verdict::Retry { at_ms: 2_100 }
        );
        let d = o.take_due(2_100).pop().unwrap();
        assert_eq!(
            o.finish(d, &ra(500, "20"), 2_100, 200),
            Verdict::Retry { at_ms: 2_600 }
        );
        let d = o.take_due(2_600).pop().unwrap();
        assert_eq!(
            o.finish(d, &ra(503, "999999"), 2_600, 200),
            Verdict::Retry {
                at_ms: 2_600 + MAX_RETRY_AFTER_MS
            }
        );
    }

    #[test]
    fn backoff_wins_over_a_shorter_retry_after() {
        let mut o = outbox(1);
        o.enqueue(Delivery::new("e", 0, vec![], 0)).unwrap();
        let d = o.take_due(0).pop().unwrap();
        let outcome = AttemptOutcome::Status {
            code: 503,
            retry_after: Some("0".into()),
        };
        assert_eq!(o.finish(d, &outcome, 0, 200), Verdict::Retry { at_ms: 200 });
    }

    #[test]
    fn bounded_and_fair() {
        let mut o = Outbox::new(2, settings(5, 2, None));
        for i in 0..5 {
            o.enqueue(Delivery::new(&format!("a{i}"), 0, vec![], 0))
                .unwrap();
        }
        assert!(matches!(
            o.enqueue(Delivery::new("b0", 1, vec![], 0)),
            Err(Refused::QueueFull(_))
        ));
        let due = o.take_due(0);
        assert_eq!(due.len(), 2, "lane 0 is capped at 2 in flight");
        assert_eq!(o.held(), 5);
        for d in due {
            o.finish(d, &status(200), 1, 0);
        }
        o.enqueue(Delivery::new("b1", 1, vec![], 0)).unwrap();
        let due = o.take_due(1);
        assert!(
            due.iter().any(|d| d.event_id == "b1"),
            "lane 1 is not stuck behind lane 0"
        );
    }

    #[test]
    fn reconfigure_keeps_surviving_webhooks() {
        let mut o = outbox(3);
        o.enqueue(Delivery::new("keep", 0, vec![], 0)).unwrap();
        o.enqueue(Delivery::new("drop", 1, vec![], 0)).unwrap();
        o.enqueue(Delivery::new("moved", 2, vec![], 0)).unwrap();
        // New plan: old 0 stays 0, old 1 is removed, old 2 becomes 1.
        let dropped = o.reconfigure(2, |i| [Some(0), None, Some(1)][i], settings(100, 2, None));
        assert_eq!(
            dropped
                .iter()
                .map(|d| d.event_id.as_str())
                .collect::<Vec<_>>(),
            ["drop"]
        );
        assert_eq!(o.held(), 2);
        let due = o.take_due(0);
        let mut got: Vec<_> = due
            .iter()
            .map(|d| (d.event_id.as_str(), d.webhook))
            .collect();
        got.sort();
        assert_eq!(got, [("keep", 0), ("moved", 1)]);
    }

    #[test]
    fn an_open_circuit_holds_the_queue_and_probes_once_per_period() {
        let mut o = Outbox::new(2, settings(100, 4, Some(2)));
        for i in 0..6 {
            o.enqueue(Delivery::new(&format!("e{i}"), 0, vec![], 0))
                .unwrap();
        }
        let due = o.take_due(0);
        assert_eq!(due.len(), 4);
        let mut due = due.into_iter();
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        assert!(!o.circuit_open(0));
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        assert!(o.circuit_open(0));
        assert_eq!(o.take_circuit_change(), Some(CircuitChange::Opened));
        // Attempts already out finish normally; nothing new goes out while the circuit is open.
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        assert!(o.take_due(100).is_empty());
        // Other lanes are unaffected.
        o.enqueue(Delivery::new("other", 1, vec![], 0)).unwrap();
        assert_eq!(o.take_due(100).len(), 1);
        // The probe: exactly one attempt per period (first period 200 ms after the opening failure).
        let probe = o.take_due(210);
        assert_eq!(probe.len(), 1);
        assert!(o.take_due(10_000).is_empty(), "one probe at a time");
        let probe = probe.into_iter().next().unwrap();
        o.finish(probe, &status(503), 300, 200);
        assert!(o.circuit_open(0));
        assert!(o.take_due(700).is_empty(), "the second period is 500 ms");
        let probe = o.take_due(800).pop().unwrap();
        o.finish(probe, &status(200), 810, 200);
        assert_eq!(o.take_circuit_change(), Some(CircuitChange::Closed));
        assert_eq!(
            o.take_due(810).len(),
            4,
            "closed again: up to max in flight"
        );
    }

    #[test]
    fn a_circuit_does_not_consume_attempts_of_queued_deliveries() {
        let mut o = Outbox::new(1, settings(100, 1, Some(1)));
        for id in ["a", "b", "c"] {
            o.enqueue(Delivery::new(id, 0, vec![], 0)).unwrap();
        }
        let a = o.take_due(0).pop().unwrap();
        o.finish(a, &status(500), 0, 200);
        let mut now = 0;
        let mut probes = Vec::new();
        for _ in 0..3 {
            now += 10_000;
            let due = o.take_due(now);
            assert_eq!(due.len(), 1, "one probe per period");
            for d in due {
                probes.push(d.event_id.clone());
                o.finish(d, &status(500), now, 200);
            }
        }
        assert_eq!(
            probes,
            ["a", "a", "a"],
            "the oldest delivery probes; b and c keep their attempts"
        );
        assert_eq!(o.held(), 2, "a is exhausted after 4 attempts");
        now += 10_000;
        let b = o.take_due(now).pop().unwrap();
        assert_eq!((b.event_id.as_str(), b.attempts), ("b", 1));
    }

    #[test]
    fn dead_letter_lane_and_body() {
        let o = Outbox::new(2, settings(10, 1, None));
        assert_eq!(o.dead_letter_lane(), 2);
        let mut d = Delivery::new(
            "e1",
            0,
            br#"{"id":"e1","version":1}"#.to_vec(),
            1_728_086_400_000,
        );
        d.attempts = 4;
        d.last_failure = Some("status 500".into());
        let body = dead_letter_body(&d, "w1", DeadLetterReason::Exhausted, 1_728_086_460_000);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["reason"], "exhausted");
        assert_eq!(v["eventId"], "e1");
        assert_eq!(v["webhookId"], "w1");
        assert_eq!(v["attempts"], 4);
        assert_eq!(v["lastFailure"], "status 500");
        assert_eq!(v["createdAt"], "2024-10-05T00:00:00Z");
        assert_eq!(v["failedAt"], "2024-10-05T00:01:00Z");
        assert_eq!(v["envelope"], serde_json::json!({"id": "e1", "version": 1}));
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.ends_with(r#""envelope":{"id":"e1","version":1}}"#),
            "{text}"
        );
    }

    #[test]
    fn reconfigure_keeps_the_dead_letter_lane() {
        let mut o = outbox(2);
        o.enqueue(Delivery::new("dl", 2, vec![], 0)).unwrap();
        let dropped = o.reconfigure(1, |_| None, settings(100, 2, None));
        assert!(dropped.is_empty());
        let due = o.take_due(0);
        assert_eq!((due[0].event_id.as_str(), due[0].webhook), ("dl", 1));
    }

    #[test]
    fn in_flight_is_counted_across_lanes_reconfiguration_and_orphans() {
        let mut o = outbox(2);
        o.enqueue(Delivery::new("a", 0, vec![], 0)).unwrap();
        o.enqueue(Delivery::new("b", 1, vec![], 0)).unwrap();
        let mut due = o.take_due(0);
        assert_eq!(o.in_flight(), 2);
        // Webhook 1 is removed while its attempt is out: the attempt stays counted until answered.
        o.reconfigure(1, |i| (i == 0).then_some(0), settings(100, 2, None));
        assert_eq!(o.in_flight(), 2);
        let b = due.pop().unwrap();
        assert_eq!(b.event_id, "b");
        o.release_orphan();
        assert_eq!(o.in_flight(), 1);
        o.finish(due.pop().unwrap(), &status(200), 1, 0);
        assert_eq!((o.in_flight(), o.held()), (0, 0));
    }
}
