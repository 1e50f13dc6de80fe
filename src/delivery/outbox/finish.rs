//! Finishing attempts: an attempt's outcome becomes a verdict (delivered, retried, exhausted,
//! gone) and may open or close its lane's circuit; circuits and gone lanes that other workers
//! found are applied here too, and queued deliveries are handed back when a lane is turned off.

use super::{CircuitChange, Outbox, Verdict};
use crate::delivery::policy::honours_retry_after;
use crate::delivery::{AttemptOutcome, Delivery, LaneId};
use crate::time::parse_retry_after;

impl Outbox {
    /// Records the outcome of an attempt taken with [`Outbox::take_due`].
    pub fn finish(
        &mut self,
        mut delivery: Delivery,
        outcome: &AttemptOutcome,
        now_ms: u64,
        random: u32,
    ) -> Verdict {
        self.attempts_out = self.attempts_out.saturating_sub(1);
        self.clock_ms = self.clock_ms.max(now_ms);
        let retry = self.settings.retry.clone();
        let circuit_failures = self.settings.circuit_failures;
        let lane_id = delivery.lane;
        let Some(lane) = self.lane_mut(lane_id) else {
            self.release(&delivery);
            return Verdict::Exhausted(delivery);
        };
        lane.attempts_out = lane.attempts_out.saturating_sub(1);
        lane.attempts_out_bytes = lane
            .attempts_out_bytes
            .saturating_sub(delivery.payload.held_bytes());
        if outcome.is_success() {
            lane.progress_ms = now_ms;
            lane.consecutive_failures = 0;
            lane.failed_probes = 0;
            if lane.probe_at_ms.take().is_some() {
                self.circuit_change = Some(CircuitChange::Closed);
            }
            self.release(&delivery);
            return Verdict::Delivered {
                latency_ms: now_ms.saturating_sub(delivery.created_at_ms),
            };
        }
        // 410 Gone turns a webhook off. The dead-letter store is ours, not a receiver's: a 410
        // from it is an ordinary failure, retried, so that dead letters keep their trace.
        let gone = matches!(outcome, AttemptOutcome::Status { code: 410, .. });
        if gone && lane_id != LaneId::DeadLetter {
            lane.gone = true;
            lane.probe_at_ms = None;
            let queued: Vec<Delivery> =
                lane.ready.drain(..).chain(lane.waiting.drain(..)).collect();
            delivery.last_failure = Some("status 410".into());
            let mut dropped = Vec::with_capacity(queued.len() + 1);
            dropped.push(delivery);
            dropped.extend(queued);
            for d in &dropped {
                self.release(d);
            }
            return Verdict::Gone { dropped };
        }
        let retry_after_ms = match outcome {
            AttemptOutcome::Status {
                code,
                retry_after: Some(value),
            } if honours_retry_after(*code) => parse_retry_after(value, now_ms),
            _ => None,
        };
        delivery.last_failure = Some(outcome.describe());
        lane.consecutive_failures += 1;
        let mut opened = false;
        if delivery.is_probe && lane.probe_at_ms.is_some() {
            // Each failed probe moves one step along the schedule.
            lane.failed_probes += 1;
            lane.probe_at_ms = Some(now_ms + retry.probe_period_ms(lane.failed_probes, random));
        } else if lane.probe_at_ms.is_none()
            && circuit_failures.is_some_and(|n| lane.consecutive_failures >= n)
        {
            // The first probe waits one period.
            lane.probe_at_ms = Some(now_ms + retry.probe_period_ms(lane.failed_probes, random));
            opened = true;
        }
        let wait = retry.next_wait_ms(delivery.attempts, retry_after_ms, random);
        let verdict = match wait {
            Some(wait) if !lane.gone => {
                delivery.next_attempt_at_ms = now_ms + wait;
                let at_ms = delivery.next_attempt_at_ms;
                lane.waiting.push(delivery);
                Verdict::Retry { at_ms }
            }
            _ => {
                self.release(&delivery);
                Verdict::Exhausted(delivery)
            }
        };
        if opened {
            self.circuit_change = Some(CircuitChange::Opened);
        }
        verdict
    }

    /// The time of an open circuit's next probe.
    pub fn probe_at(&self, lane: LaneId) -> Option<u64> {
        self.lane(lane).and_then(|l| l.probe_at_ms)
    }

    /// Opens (Some) or closes (None) a lane's circuit as another worker found it, without
    /// counting it as this worker's change.
    pub fn set_probe_at(&mut self, lane: LaneId, probe_at_ms: Option<u64>) {
        if let Some(l) = self.lane_mut(lane) {
            l.probe_at_ms = probe_at_ms;
            if probe_at_ms.is_none() {
                l.consecutive_failures = 0;
                l.failed_probes = 0;
            }
        }
    }

    /// Turns a webhook lane off as another worker found it gone; its queued deliveries come back
    /// (each must be logged, counted and dead-lettered). Attempts out finish as failures.
    pub fn mark_gone(&mut self, lane: LaneId) -> Vec<Delivery> {
        match self.lane_mut(lane) {
            Some(l) if lane != LaneId::DeadLetter && !l.gone => {
                l.gone = true;
                l.probe_at_ms = None;
            }
            _ => return Vec::new(),
        }
        self.drain_queued(lane)
    }

    /// Takes every queued delivery of a lane out (attempts out are not touched: their answers
    /// come back through [`Outbox::release_orphan`]).
    pub fn drain_queued(&mut self, lane: LaneId) -> Vec<Delivery> {
        let Some(l) = self.lane_mut(lane) else {
            return Vec::new();
        };
        let drained: Vec<Delivery> = l.ready.drain(..).chain(l.waiting.drain(..)).collect();
        for d in &drained {
            self.release(d);
        }
        drained
    }

    /// Opens a lane's circuit because another proxy found its endpoint failing: its queue waits
    /// and one probe goes out per period, as after failures of its own. Nothing happens when the
    /// breaker is off, the lane is gone, or its circuit is already open. Returns whether it opened.
    pub fn open_circuit(&mut self, lane: LaneId, now_ms: u64, random: u32) -> bool {
        if self.settings.circuit_failures.is_none() || lane == LaneId::DeadLetter {
            return false;
        }
        let retry = self.settings.retry.clone();
        match self.lane_mut(lane) {
            Some(l) if !l.gone && l.probe_at_ms.is_none() => {
                l.probe_at_ms = Some(now_ms + retry.probe_period_ms(l.failed_probes, random));
                true
            }
            _ => false,
        }
    }

    /// Forgets an attempt whose webhook a new configuration removed while it was out.
    pub fn release_orphan(&mut self, delivery: &Delivery) {
        self.attempts_out = self.attempts_out.saturating_sub(1);
        self.let_go(delivery);
    }
}
