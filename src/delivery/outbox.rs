//! The outbox: every delivery this worker holds, waiting or in flight, and when each is
//! attempted. A pure state machine: the clock and the randomness are passed in.
//!
//! Each lane (a webhook, or the dead-letter store) has its own queue, so a slow or dead endpoint
//! only ever holds its own deliveries: at most `max_in_flight_per_webhook` attempts of a lane are
//! out at once, and an open circuit holds its lane's queue behind one probe per period.
//!
//! What the outbox holds is bounded twice: in deliveries (`maxQueued`) and in bytes
//! (`maxQueuedBytes`, one event's payload counted once however many lanes share it). When it is
//! full, a lane below its fair share (the bound divided by the lanes that hold something) still
//! gets in: the newest queued deliveries of the lane furthest over its share make room. So a
//! hanging endpoint can fill the outbox while nobody else needs it, but never keeps a healthy
//! endpoint's deliveries out.

use super::policy::{honours_retry_after, RetryPolicy};
use super::{AttemptOutcome, Delivery, LaneId};
use crate::time::parse_retry_after;
use std::collections::VecDeque;

/// The outbox's limits, from `delivery` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSettings {
    pub retry: RetryPolicy,
    /// Deliveries held at most, waiting or in flight (`maxQueued`).
    pub max_queued: usize,
    /// Payload bytes held at most (`maxQueuedBytes`).
    pub max_queued_bytes: usize,
    pub max_in_flight_per_webhook: usize,
    /// Consecutive failures that open a lane's circuit (`circuitBreaker.failures`); None is off.
    pub circuit_failures: Option<u32>,
}

/// What the outbox decided about an attempt's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered {
        latency_ms: u64,
    },
    Retry {
        at_ms: u64,
    },
    /// The schedule is used up (or the lane is gone); the delivery comes back for the log and
    /// the dead letter.
    Exhausted(Delivery),
    /// 410 Gone: the lane is off; its queued deliveries are handed back so that each is logged,
    /// counted and dead-lettered.
    Gone {
        dropped: Vec<Delivery>,
    },
}

/// A webhook's attempts out may hold at most this fraction of `maxQueuedBytes` (its first attempt
/// always goes): Envoy keeps a copy of every callout body until the attempt ends, so a hanging
/// endpoint with large events would otherwise cost `maxInFlightPerWebhook` copies of each.
pub const ATTEMPT_BYTES_SHARE: usize = 16;

/// What the proxy's other live workers hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Others {
    pub queued: usize,
    pub queued_bytes: usize,
    pub workers: usize,
}

/// A lane that has delivered nothing for this long while holding deliveries counts as stalled
/// (a hanging or failing endpoint): the tick's trim takes only such lanes' queued deliveries (one
/// that delivers drains its own queue).
pub const STALLED_MS: u64 = 250;
/// When the outbox is full, a lane takes the place of the queued deliveries of a lane that has
/// delivered nothing since at least this long before its own last progress, whatever the shares:
/// the endpoint that delivers goes before the one that hangs or fails.
pub const STUCK_MARGIN_MS: u64 = 50;

/// Which bound of the outbox was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `maxQueued` deliveries.
    Count,
    /// `maxQueuedBytes` bytes.
    Bytes,
}

/// Why a new delivery was not accepted. The delivery comes back so that it is logged.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The outbox is full and this lane already holds its fair share.
    QueueFull(Delivery, Bound),
    /// The lane's webhook answered 410 Gone, or the lane does not exist.
    WebhookGone(Delivery),
}

/// A circuit opened or closed on this finish; the caller logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitChange {
    Opened,
    Closed,
}

#[derive(Debug, Default)]
struct Lane {
    ready: VecDeque<Delivery>,
    /// Deliveries waiting for their retry time.
    waiting: Vec<Delivery>,
    attempts_out: usize,
    /// Payload bytes of the attempts out: Envoy holds a copy of each callout's body until it ends.
    attempts_out_bytes: usize,
    /// Deliveries of this lane held, waiting or in flight, and the bytes of their payloads (a
    /// payload shared with other lanes counts fully in each: it is what the lane would cost alone).
    queued: usize,
    queued_bytes: usize,
    gone: bool,
    consecutive_failures: u32,
    /// Set while the circuit is open: the lane holds its queue and sends one probe at this time.
    probe_at_ms: Option<u64>,
    failed_probes: u32,
    /// When the lane last made progress: its last delivery, or when its backlog began (it went
    /// from holding nothing to holding something). A failing or hanging endpoint makes none.
    progress_ms: u64,
}

impl Lane {
    /// When the lane last made progress; a lane that holds nothing is not behind: now.
    fn last_progress(&self, now_ms: u64) -> u64 {
        if self.queued == 0 {
            now_ms
        } else {
            self.progress_ms
        }
    }

    fn evictable(&self) -> bool {
        !self.ready.is_empty() || !self.waiting.is_empty()
    }

    fn add(&mut self, bytes: usize) {
        self.queued += 1;
        self.queued_bytes += bytes;
    }
    fn remove(&mut self, bytes: usize) {
        self.queued = self.queued.saturating_sub(1);
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
    }
    /// The newest delivery that is not out, for eviction: the back of the queue first.
    fn pop_newest(&mut self) -> Option<Delivery> {
        if let Some(d) = self.ready.pop_back() {
            return Some(d);
        }
        let newest = (0..self.waiting.len()).max_by_key(|&i| self.waiting[i].created_at_ms)?;
        Some(self.waiting.swap_remove(newest))
    }
}

#[derive(Debug)]
pub struct Outbox {
    /// One lane per webhook of the plan, by index.
    webhooks: Vec<Lane>,
    dead_letter: Lane,
    settings: OutboxSettings,
    /// Deliveries held, waiting or in flight.
    queued: usize,
    /// Bytes of the distinct payloads held.
    queued_bytes: usize,
    /// Attempts out, over all lanes (orphans of a reconfiguration included until answered).
    attempts_out: usize,
    circuit_change: Option<CircuitChange>,
    /// What the proxy's other live workers hold (deliveries, bytes), as they last said, and how
    /// many they are: the bounds are the proxy's, not one worker's.
    others: Others,
    /// The latest time the outbox was told (by `take_due` and `finish`), for stall checks.
    clock_ms: u64,
}

/// Admission of a new delivery: accepted, with the deliveries evicted to make room for it.
pub type Admitted = Vec<Delivery>;

impl Outbox {
    pub fn new(webhooks: usize, settings: OutboxSettings) -> Self {
        Outbox {
            webhooks: (0..webhooks).map(|_| Lane::default()).collect(),
            dead_letter: Lane::default(),
            settings,
            queued: 0,
            queued_bytes: 0,
            attempts_out: 0,
            circuit_change: None,
            others: Others::default(),
            clock_ms: 0,
        }
    }

    /// What the proxy's other live workers hold now.
    pub fn set_others(&mut self, others: Others) {
        self.others = others;
    }

    /// What this worker may hold: what the others leave of the proxy's bounds, and at least an
    /// equal split of them (so that a worker never waits for another to make room; the tick's
    /// [`Outbox::trim`] brings an overshoot back within the bounds).
    fn capacity(&self) -> (usize, usize) {
        let workers = self.others.workers + 1;
        let s = &self.settings;
        (
            s.max_queued
                .saturating_sub(self.others.queued)
                .max(s.max_queued / workers),
            s.max_queued_bytes
                .saturating_sub(self.others.queued_bytes)
                .max(s.max_queued_bytes / workers),
        )
    }

    /// What this worker can still take before a bound is reached: deliveries and bytes (what
    /// the journal may claim from dead proxies).
    pub fn room(&self) -> (usize, usize) {
        let (max_queued, max_bytes) = self.capacity();
        (
            max_queued.saturating_sub(self.queued),
            max_bytes.saturating_sub(self.queued_bytes),
        )
    }

    /// Deliveries held, waiting or in flight.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Bytes of the payloads held, each payload once.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Attempts out now.
    pub fn attempts_out(&self) -> usize {
        self.attempts_out
    }

    pub fn settings(&self) -> &OutboxSettings {
        &self.settings
    }

    fn lane(&self, id: LaneId) -> Option<&Lane> {
        match id {
            LaneId::Webhook(i) => self.webhooks.get(i),
            LaneId::DeadLetter => Some(&self.dead_letter),
        }
    }

    fn lane_mut(&mut self, id: LaneId) -> Option<&mut Lane> {
        match id {
            LaneId::Webhook(i) => self.webhooks.get_mut(i),
            LaneId::DeadLetter => Some(&mut self.dead_letter),
        }
    }

    /// Whether the lane's circuit is open.
    pub fn circuit_open(&self, lane: LaneId) -> bool {
        self.lane(lane).is_some_and(|l| l.probe_at_ms.is_some())
    }

    /// Whether the lane's webhook answered 410 Gone.
    pub fn is_gone(&self, lane: LaneId) -> bool {
        self.lane(lane).is_some_and(|l| l.gone)
    }

    /// Deliveries and bytes the lane holds.
    pub fn lane_queued(&self, lane: LaneId) -> (usize, usize) {
        self.lane(lane)
            .map_or((0, 0), |l| (l.queued, l.queued_bytes))
    }

    /// The circuit change caused by the last [`Outbox::finish`], if any.
    pub fn take_circuit_change(&mut self) -> Option<CircuitChange> {
        self.circuit_change.take()
    }

    /// The bound a new delivery adding `extra_bytes` would pass, if any.
    fn bound_reached(&self, extra_bytes: usize) -> Option<Bound> {
        let (max_queued, max_bytes) = self.capacity();
        if self.queued >= max_queued {
            Some(Bound::Count)
        } else if self.queued_bytes.saturating_add(extra_bytes) > max_bytes {
            Some(Bound::Bytes)
        } else {
            None
        }
    }

    /// Accepts a new delivery, unless its webhook answered 410, or the outbox is full and the
    /// lane already holds its fair share. Returns the deliveries evicted to make room (each must
    /// be logged, counted and dead-lettered by the caller). A payload already held by another
    /// delivery (one event fanned out to several lanes) adds no bytes.
    pub fn enqueue(&mut self, delivery: Delivery) -> Result<Admitted, Refused> {
        let lane_id = delivery.lane;
        match self.lane(lane_id) {
            None => return Err(Refused::WebhookGone(delivery)),
            Some(lane) if lane.gone => return Err(Refused::WebhookGone(delivery)),
            Some(_) => {}
        }
        let size = delivery.payload.held_bytes();
        let extra = if delivery.payload.is_held() { 0 } else { size };
        let mut evicted = Vec::new();
        if let Some(bound) = self.bound_reached(extra) {
            let now = self.clock_ms;
            let progress = self.lane(lane_id).map_or(0, |l| l.last_progress(now));
            let below_share = self.below_fair_share(lane_id, size);
            if !below_share && self.stuck_victim(lane_id, progress).is_none() {
                return Err(Refused::QueueFull(delivery, bound));
            }
            while let Some(bound) = self.bound_reached(extra) {
                let victim = self.stuck_victim(lane_id, progress);
                // A stalled lane only ever takes the place of another stalled lane.
                let victim = victim.or_else(|| {
                    below_share
                        .then(|| self.over_share_victim(lane_id, progress))
                        .flatten()
                });
                match victim.and_then(|v| self.evict_from(v)) {
                    Some(d) => evicted.push(d),
                    None => return Err(Refused::QueueFull(delivery, bound)),
                }
            }
        }
        self.queued += 1;
        if delivery.payload.hold() {
            self.queued_bytes += size;
        }
        let now = self.clock_ms;
        if let Some(lane) = self.lane_mut(lane_id) {
            if lane.queued == 0 {
                lane.progress_ms = now;
            }
            lane.add(size);
            // A delivery with attempts behind it (read back from the journal) waits for its
            // next attempt time.
            if delivery.attempts > 0 {
                lane.waiting.push(delivery);
            } else {
                lane.ready.push_back(delivery);
            }
        }
        Ok(evicted)
    }

    /// Brings the proxy back within its bounds after workers overshot them together: while the
    /// proxy holds more than its bounds and this worker more than its equal split, the newest
    /// queued deliveries of lanes over their share go (each must be logged, counted and
    /// dead-lettered).
    pub fn trim(&mut self) -> Vec<Delivery> {
        let workers = self.others.workers + 1;
        let s = &self.settings;
        let (split_queued, split_bytes) = (s.max_queued / workers, s.max_queued_bytes / workers);
        let mut evicted = Vec::new();
        loop {
            let over_count = self.queued + self.others.queued > self.settings.max_queued
                && self.queued > split_queued;
            let over_bytes = self.queued_bytes + self.others.queued_bytes
                > self.settings.max_queued_bytes
                && self.queued_bytes > split_bytes;
            if !(over_count || over_bytes) {
                return evicted;
            }
            let victim = self
                .stuck_victim(LaneId::DeadLetter, self.clock_ms)
                // Only lanes stalled for STALLED_MS: one that answers drains its own queue.
                .or_else(|| {
                    self.over_share_victim(
                        LaneId::DeadLetter,
                        self.clock_ms.saturating_sub(STALLED_MS),
                    )
                });
            match victim.and_then(|v| self.evict_from(v)) {
                Some(d) => evicted.push(d),
                None => return evicted,
            }
        }
    }

    /// Lanes that hold something, plus `lane` itself.
    fn active_lanes(&self, lane: LaneId) -> usize {
        let holding = self
            .webhooks
            .iter()
            .chain(std::iter::once(&self.dead_letter))
            .filter(|l| l.queued > 0)
            .count();
        let counted = self.lane(lane).is_some_and(|l| l.queued > 0);
        holding + usize::from(!counted)
    }

    /// Whether `lane`, with one more delivery of `size` bytes, stays within its fair share of
    /// both bounds.
    fn below_fair_share(&self, lane: LaneId, size: usize) -> bool {
        let active = self.active_lanes(lane).max(1);
        let (max_queued, max_bytes) = self.capacity();
        let (count, bytes) = self.lane_queued(lane);
        count < max_queued / active && bytes + size <= max_bytes / active
    }

    /// The webhook lane stuck for longest, by more than [`STUCK_MARGIN_MS`] before `progress`
    /// (the incoming lane's last progress), that has queued deliveries (never `except`).
    fn stuck_victim(&self, except: LaneId, progress: u64) -> Option<usize> {
        self.webhooks
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                LaneId::Webhook(*i) != except
                    && l.progress_ms.saturating_add(STUCK_MARGIN_MS) <= progress
                    && l.evictable()
            })
            .min_by_key(|(_, l)| l.progress_ms)
            .map(|(i, _)| i)
    }

    /// The webhook lane furthest over its fair share (never `except`, never the dead-letter lane),
    /// among those that made progress no later than `progress`: a lane never takes the place of
    /// one that answers more recently than it does.
    fn over_share_victim(&self, except: LaneId, progress: u64) -> Option<usize> {
        let now = self.clock_ms;
        let active = self.active_lanes(except).max(1);
        let (max_queued, max_bytes) = self.capacity();
        let share_count = (max_queued / active).max(1);
        let share_bytes = (max_bytes / active).max(1);
        // Over-share in thousandths of a share, by whichever bound the lane exceeds more.
        // In u64: bytes times 1000 overflow the wasm32 usize.
        let excess = |l: &Lane| {
            let by_count = l.queued as u64 * 1000 / share_count as u64;
            let by_bytes = l.queued_bytes as u64 * 1000 / share_bytes as u64;
            by_count.max(by_bytes)
        };
        self.webhooks
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                LaneId::Webhook(*i) != except
                    && excess(l) > 1000
                    && l.evictable()
                    && l.last_progress(now) <= progress
            })
            .max_by_key(|(_, l)| excess(l))
            .map(|(i, _)| i)
    }

    /// Evicts the newest queued (not in flight) delivery of webhook lane `index`.
    fn evict_from(&mut self, index: usize) -> Option<Delivery> {
        let d = self.webhooks.get_mut(index)?.pop_newest()?;
        self.release(&d);
        Some(d)
    }

    /// Forgets a delivery that leaves the outbox's custody: its lane's and the outbox's counts,
    /// and its payload's bytes when no other held delivery shares it.
    fn release(&mut self, d: &Delivery) {
        let size = d.payload.held_bytes();
        if let Some(lane) = self.lane_mut(d.lane) {
            lane.remove(size);
        }
        self.let_go(d);
    }

    /// Takes the deliveries to attempt now, and counts them as out.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Delivery> {
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut due = Vec::new();
        let max_out = self.settings.max_in_flight_per_webhook.max(1);
        let max_out_bytes = (self.settings.max_queued_bytes / ATTEMPT_BYTES_SHARE).max(1);
        let lanes = self
            .webhooks
            .iter_mut()
            .chain(std::iter::once(&mut self.dead_letter));
        for lane in lanes {
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
                None => max_out,
                // An open circuit sends one probe per period, and nothing else.
                Some(at) if at <= now_ms && lane.attempts_out == 0 => 1,
                Some(_) => 0,
            };
            while lane.attempts_out < cap {
                let Some(size) = lane.ready.front().map(|d| d.payload.held_bytes()) else {
                    break;
                };
                // The first attempt always goes, however large; more only within the lane's share.
                if lane.attempts_out > 0 && lane.attempts_out_bytes + size > max_out_bytes {
                    break;
                }
                let Some(mut d) = lane.ready.pop_front() else {
                    break;
                };
                d.attempts += 1;
                d.is_probe = lane.probe_at_ms.is_some();
                lane.attempts_out += 1;
                lane.attempts_out_bytes += size;
                self.attempts_out += 1;
                due.push(d);
            }
        }
        due
    }

    /// The earliest time a waiting retry or a probe becomes due.
    pub fn next_due_at(&self) -> Option<u64> {
        let lanes = || {
            self.webhooks
                .iter()
                .chain(std::iter::once(&self.dead_letter))
        };
        let retries = lanes()
            .flat_map(|l| &l.waiting)
            .map(|d| d.next_attempt_at_ms);
        let probes = lanes()
            .filter(|l| !l.ready.is_empty() || !l.waiting.is_empty())
            .filter_map(|l| l.probe_at_ms);
        retries.chain(probes).min()
    }

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

    /// A delivery leaves the outbox's custody: its payload's bytes go with the last holder.
    fn let_go(&mut self, d: &Delivery) {
        self.queued = self.queued.saturating_sub(1);
        if d.payload.let_go() {
            self.queued_bytes = self.queued_bytes.saturating_sub(d.payload.held_bytes());
        }
    }

    /// Moves the outbox onto a new configuration of `webhooks` webhooks. `new_index` maps an old
    /// webhook index to the new one, or None when the webhook was removed or disabled. The
    /// dead-letter lane carries over. Returns the dropped deliveries (each must be logged).
    pub fn reconfigure(
        &mut self,
        webhooks: usize,
        new_index: impl Fn(usize) -> Option<usize>,
        settings: OutboxSettings,
    ) -> Vec<Delivery> {
        let old = std::mem::take(&mut self.webhooks);
        self.webhooks = (0..webhooks).map(|_| Lane::default()).collect();
        self.settings = settings;
        let mut dropped = Vec::new();
        for (i, lane) in old.into_iter().enumerate() {
            let target = new_index(i).filter(|_| !lane.gone);
            let Some((t, new_lane)) = target.and_then(|t| Some((t, self.webhooks.get_mut(t)?)))
            else {
                dropped.extend(lane.ready.into_iter().chain(lane.waiting));
                continue;
            };
            // Attempts out stay counted in their new lane until they are answered.
            new_lane.attempts_out += lane.attempts_out;
            new_lane.attempts_out_bytes += lane.attempts_out_bytes;
            new_lane.queued += lane.queued;
            new_lane.queued_bytes += lane.queued_bytes;
            for mut d in lane.ready.into_iter().chain(lane.waiting) {
                d.lane = LaneId::Webhook(t);
                new_lane.waiting.push(d);
            }
        }
        for d in &dropped {
            self.let_go(d);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::policy::MAX_RETRY_AFTER_MS;
    use crate::delivery::Payload;
    use std::rc::Rc;

    const A: LaneId = LaneId::Webhook(0);
    const B: LaneId = LaneId::Webhook(1);

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
            max_queued_bytes: usize::MAX,
            max_in_flight_per_webhook: max_in_flight,
            circuit_failures: circuit,
        }
    }

    fn outbox(webhooks: usize) -> Outbox {
        Outbox::new(webhooks, settings(100, 2, None))
    }

    fn delivery(id: &str, lane: LaneId, body: &[u8], now: u64) -> Delivery {
        Delivery::new(id.into(), lane, Rc::new(Payload::raw(body.to_vec())), now)
    }

    fn put(o: &mut Outbox, id: &str, lane: LaneId) {
        o.enqueue(delivery(id, lane, b"", 0)).unwrap();
    }

    fn ids(ds: &[Delivery]) -> Vec<&str> {
        ds.iter().map(|d| &*d.event_id).collect()
    }

    #[test]
    fn a_restored_delivery_waits_for_its_next_attempt_time() {
        let mut o = outbox(1);
        let mut d = delivery("e1", A, b"{}", 1_000);
        d.attempts = 2;
        d.next_attempt_at_ms = 5_000;
        o.enqueue(d).unwrap();
        assert!(o.take_due(4_999).is_empty());
        let d = o.take_due(5_000).pop().unwrap();
        assert_eq!(d.attempts, 3);
    }

    #[test]
    fn a_circuit_opened_from_outside_holds_the_queue_behind_one_probe() {
        let mut o = Outbox::new(1, settings(100, 4, Some(3)));
        put(&mut o, "e1", A);
        put(&mut o, "e2", A);
        assert!(o.open_circuit(A, 1_000, 200));
        assert!(!o.open_circuit(A, 1_000, 200), "already open");
        assert!(o.circuit_open(A));
        assert!(o.take_due(1_000).is_empty());
        let due = o.take_due(1_000 + 200);
        assert_eq!(ids(&due), vec!["e1"], "one probe");
        let mut off = Outbox::new(1, settings(100, 4, None));
        assert!(!off.open_circuit(A, 0, 0), "the breaker is off");
    }

    #[test]
    fn a_lane_marked_gone_hands_its_queue_back_and_takes_nothing_more() {
        let mut o = outbox(2);
        put(&mut o, "e1", A);
        put(&mut o, "e2", A);
        put(&mut o, "e3", B);
        assert_eq!(ids(&o.mark_gone(A)), vec!["e1", "e2"]);
        assert!(o.is_gone(A));
        assert!(o.mark_gone(A).is_empty());
        assert!(o.mark_gone(LaneId::DeadLetter).is_empty());
        assert!(matches!(
            o.enqueue(delivery("e4", A, b"", 0)),
            Err(Refused::WebhookGone(_))
        ));
        assert_eq!(o.queued(), 1);
    }

    #[test]
    fn success_after_two_retries() {
        let mut o = outbox(1);
        o.enqueue(delivery("e1", A, b"{}", 1_000)).unwrap();
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
        let reset = AttemptOutcome::NoResponse {
            reason: "reset".into(),
        };
        assert_eq!(
            o.finish(d, &reset, 1_300, 200),
            Verdict::Retry { at_ms: 1_800 }
        );
        let d = o.take_due(2_000).pop().unwrap();
        assert_eq!(
            o.finish(d, &status(204), 2_050, 0),
            Verdict::Delivered { latency_ms: 1_050 }
        );
        assert_eq!((o.queued(), o.queued_bytes(), o.attempts_out()), (0, 0, 0));
    }

    #[test]
    fn exhausted_after_the_schedule() {
        let mut o = outbox(1);
        put(&mut o, "e1", A);
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
        assert_eq!(o.queued(), 0);
    }

    #[test]
    fn redirects_and_client_errors_are_failures() {
        for code in [301, 302, 400, 401, 404, 499] {
            let mut o = outbox(1);
            put(&mut o, "e", A);
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
            put(&mut o, &format!("e{i}"), A);
        }
        put(&mut o, "other", B);
        let mut due = o.take_due(0);
        assert_eq!(due.len(), 3, "two for A (max in flight), one for B");
        let first = due.remove(0);
        let Verdict::Gone { dropped } = o.finish(first, &status(410), 0, 0) else {
            panic!()
        };
        assert_eq!(ids(&dropped), ["e0", "e2"]);
        assert!(o.is_gone(A));
        assert!(matches!(
            o.enqueue(delivery("e3", A, b"", 0)),
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
        assert_eq!(o.queued(), 0);
    }

    #[test]
    fn retry_after_on_429_and_503_only_and_capped() {
        let mut o = outbox(1);
        let ra = |code, v: &str| AttemptOutcome::Status {
            code,
            retry_after: Some(v.as_bytes().to_vec()),
        };
        put(&mut o, "e", A);
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
    fn a_retry_after_that_is_not_utf8_falls_back_to_the_schedule() {
        let mut o = outbox(1);
        put(&mut o, "e", A);
        let d = o.take_due(0).pop().unwrap();
        let outcome = AttemptOutcome::Status {
            code: 503,
            retry_after: Some(b"\xff\xfe9".to_vec()),
        };
        assert_eq!(o.finish(d, &outcome, 0, 200), Verdict::Retry { at_ms: 200 });
    }

    #[test]
    fn backoff_wins_over_a_shorter_retry_after() {
        let mut o = outbox(1);
        put(&mut o, "e", A);
        let d = o.take_due(0).pop().unwrap();
        let outcome = AttemptOutcome::Status {
            code: 503,
            retry_after: Some(b"0".to_vec()),
        };
        assert_eq!(o.finish(d, &outcome, 0, 200), Verdict::Retry { at_ms: 200 });
    }

    #[test]
    fn a_full_outbox_makes_room_for_a_lane_below_its_fair_share() {
        let mut o = Outbox::new(2, settings(6, 2, None));
        for i in 0..6 {
            put(&mut o, &format!("a{i}"), A);
        }
        // Full, all of it A's. B holds nothing: its share is 3 of 6, so A's newest queued
        // delivery makes room.
        let evicted = o.enqueue(delivery("b0", B, b"", 0)).unwrap();
        assert_eq!(ids(&evicted), ["a5"]);
        for i in 1..3 {
            let evicted = o.enqueue(delivery(&format!("b{i}"), B, b"", 0)).unwrap();
            assert_eq!(evicted.len(), 1);
        }
        assert_eq!((o.lane_queued(A).0, o.lane_queued(B).0), (3, 3));
        // B now holds its share: a fourth is refused, and A keeps its three.
        assert!(matches!(
            o.enqueue(delivery("b3", B, b"", 0)),
            Err(Refused::QueueFull(..))
        ));
        assert!(matches!(
            o.enqueue(delivery("a6", A, b"", 0)),
            Err(Refused::QueueFull(..))
        ));
        assert_eq!(o.queued(), 6);
    }

    #[test]
    fn a_lane_that_makes_progress_takes_the_place_of_a_stalled_one_whatever_the_shares() {
        let mut o = Outbox::new(2, settings(8, 2, None));
        for i in 0..4 {
            put(&mut o, &format!("a{i}"), A);
            put(&mut o, &format!("b{i}"), B);
        }
        // Both lanes send two attempts; only B's are answered, 10 ms after A's backlog began.
        let due = o.take_due(0);
        for d in due.into_iter().filter(|d| d.lane == B) {
            o.finish(d, &status(200), 10, 0);
        }
        put(&mut o, "b4", B);
        put(&mut o, "b5", B);
        assert_eq!(o.lane_queued(B).0, 4, "B at its share of 8 / 2");
        // Within STUCK_MARGIN_MS of A, B at its share is refused.
        assert!(matches!(
            o.enqueue(delivery("b6", B, b"", 0)),
            Err(Refused::QueueFull(..))
        ));
        // B delivers again at 100 ms, A still nothing: B takes A's queued deliveries' place.
        for d in o.take_due(100) {
            o.finish(d, &status(200), 100, 0);
        }
        put(&mut o, "b6", B);
        put(&mut o, "b7", B);
        for (id, evicted) in [("b8", "a3"), ("b9", "a2")] {
            let got = o.enqueue(delivery(id, B, b"", 0)).unwrap();
            assert_eq!(ids(&got), [evicted]);
        }
        assert!(
            matches!(
                o.enqueue(delivery("b10", B, b"", 0)),
                Err(Refused::QueueFull(..))
            ),
            "A's attempts out stay"
        );
        // A lane that delivers nothing never takes the place of one that does, share or not.
        assert!(matches!(
            o.enqueue(delivery("a9", A, b"", 0)),
            Err(Refused::QueueFull(..))
        ));
    }

    #[test]
    fn attempts_in_flight_are_never_evicted() {
        let mut o = Outbox::new(2, settings(2, 2, None));
        put(&mut o, "a0", A);
        put(&mut o, "a1", A);
        let out = o.take_due(0);
        assert_eq!(out.len(), 2);
        assert!(matches!(
            o.enqueue(delivery("b0", B, b"", 0)),
            Err(Refused::QueueFull(..))
        ));
    }

    #[test]
    fn bytes_are_bounded_and_a_shared_payload_counts_once() {
        let mut s = settings(100, 1, None);
        s.max_queued_bytes = 1_000;
        let mut o = Outbox::new(3, s);
        let lanes = [A, B, LaneId::Webhook(2)];
        let fan_out = |o: &mut Outbox, id: &str, byte: u8| {
            let payload = Rc::new(Payload::raw(vec![byte; 400]));
            lanes
                .iter()
                .map(|&lane| o.enqueue(Delivery::new(id.into(), lane, Rc::clone(&payload), 0)))
                .filter(Result::is_ok)
                .count()
        };
        assert_eq!(fan_out(&mut o, "e1", b'x'), 3);
        assert_eq!(o.queued_bytes(), 400, "one event, three lanes, one copy");
        assert_eq!(fan_out(&mut o, "e2", b'y'), 3);
        assert_eq!(o.queued_bytes(), 800);
        // A third does not fit, whoever it is for: every lane holds 800 bytes of a 333-byte share.
        assert_eq!(fan_out(&mut o, "e3", b'z'), 0);
        // Evicting one lane's copy frees nothing while other lanes hold the payload; the bytes go
        // with the last holder, even if the evicted deliveries are still alive elsewhere.
        let mut kept = Vec::new();
        for _ in 0..3 {
            for d in o.take_due(0) {
                kept.push(Delivery::new(
                    d.event_id.clone(),
                    d.lane,
                    Rc::clone(&d.payload),
                    0,
                ));
                o.finish(d, &status(200), 1, 0);
            }
        }
        assert_eq!((o.queued(), o.queued_bytes()), (0, 0));
        assert_eq!(kept.len(), 6);
    }

    #[test]
    fn attempts_out_of_one_lane_hold_at_most_a_sixteenth_of_the_byte_bound() {
        let mut s = settings(100, 16, None);
        s.max_queued_bytes = 16_000;
        let mut o = Outbox::new(2, s);
        for i in 0..5 {
            o.enqueue(delivery(&format!("a{i}"), A, &[b'x'; 400], 0))
                .unwrap();
        }
        o.enqueue(delivery("big", B, &[b'y'; 5_000], 0)).unwrap();
        let due = o.take_due(0);
        // A: 2 × 400 bytes fit in 1,000; B's 5,000-byte delivery goes alone.
        assert_eq!(ids(&due), ["a0", "a1", "big"]);
        for d in due {
            o.finish(d, &status(200), 1, 0);
        }
        assert_eq!(o.take_due(1).len(), 2);
    }

    #[test]
    fn lanes_are_not_stuck_behind_each_other() {
        let mut o = Outbox::new(2, settings(5, 2, None));
        for i in 0..5 {
            put(&mut o, &format!("a{i}"), A);
        }
        let due = o.take_due(0);
        assert_eq!(due.len(), 2, "A is capped at 2 in flight");
        assert_eq!(o.queued(), 5);
        for d in due {
            o.finish(d, &status(200), 1, 0);
        }
        put(&mut o, "b1", B);
        let due = o.take_due(1);
        assert!(due.iter().any(|d| &*d.event_id == "b1"));
    }

    #[test]
    fn reconfigure_keeps_surviving_webhooks() {
        let mut o = outbox(3);
        put(&mut o, "keep", A);
        put(&mut o, "drop", B);
        put(&mut o, "moved", LaneId::Webhook(2));
        // New plan: old 0 stays 0, old 1 is removed, old 2 becomes 1.
        let dropped = o.reconfigure(2, |i| [Some(0), None, Some(1)][i], settings(100, 2, None));
        assert_eq!(ids(&dropped), ["drop"]);
        assert_eq!(o.queued(), 2);
        let due = o.take_due(0);
        let mut got: Vec<_> = due.iter().map(|d| (&*d.event_id, d.lane)).collect();
        got.sort();
        assert_eq!(got, [("keep", A), ("moved", B)]);
        assert_eq!(o.lane_queued(B).0, 1);
    }

    #[test]
    fn an_open_circuit_holds_the_queue_and_probes_once_per_period() {
        let mut o = Outbox::new(2, settings(100, 4, Some(2)));
        for i in 0..6 {
            put(&mut o, &format!("e{i}"), A);
        }
        let due = o.take_due(0);
        assert_eq!(due.len(), 4);
        let mut due = due.into_iter();
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        assert!(!o.circuit_open(A));
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        assert!(o.circuit_open(A));
        assert_eq!(o.take_circuit_change(), Some(CircuitChange::Opened));
        // Attempts already out finish normally; nothing new goes out while the circuit is open.
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        o.finish(due.next().unwrap(), &status(503), 10, 200);
        assert!(o.take_due(100).is_empty());
        // Other lanes are unaffected.
        put(&mut o, "other", B);
        assert_eq!(o.take_due(100).len(), 1);
        // The probe: exactly one attempt per period (first period 200 ms after the opening failure).
        let probe = o.take_due(210);
        assert_eq!(probe.len(), 1);
        assert!(o.take_due(10_000).is_empty(), "one probe at a time");
        let probe = probe.into_iter().next().unwrap();
        o.finish(probe, &status(503), 300, 200);
        assert!(o.circuit_open(A));
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
            put(&mut o, id, A);
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
                probes.push(d.event_id.to_string());
                o.finish(d, &status(500), now, 200);
            }
        }
        assert_eq!(probes, ["a", "a", "a"], "the oldest delivery probes");
        assert_eq!(o.queued(), 2, "a is exhausted after 4 attempts");
        now += 10_000;
        let b = o.take_due(now).pop().unwrap();
        assert_eq!((&*b.event_id, b.attempts), ("b", 1));
    }

    #[test]
    fn reconfigure_keeps_the_dead_letter_lane() {
        let mut o = outbox(2);
        put(&mut o, "dl", LaneId::DeadLetter);
        let dropped = o.reconfigure(1, |_| None, settings(100, 2, None));
        assert!(dropped.is_empty());
        let due = o.take_due(0);
        assert_eq!((&*due[0].event_id, due[0].lane), ("dl", LaneId::DeadLetter));
    }

    #[test]
    fn attempts_out_are_counted_across_lanes_reconfiguration_and_orphans() {
        let mut o = outbox(2);
        put(&mut o, "a", A);
        put(&mut o, "b", B);
        let mut due = o.take_due(0);
        assert_eq!(o.attempts_out(), 2);
        // Webhook 1 is removed while its attempt is out: the attempt stays counted until answered.
        o.reconfigure(1, |i| (i == 0).then_some(0), settings(100, 2, None));
        assert_eq!(o.attempts_out(), 2);
        let b = due.pop().unwrap();
        assert_eq!(&*b.event_id, "b");
        o.release_orphan(&b);
        assert_eq!(o.attempts_out(), 1);
        o.finish(due.pop().unwrap(), &status(200), 1, 0);
        assert_eq!((o.attempts_out(), o.queued()), (0, 0));
    }
}
