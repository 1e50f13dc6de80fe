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
//!
//! This file holds the outbox's types, its lanes and their counts, and reconfiguration. The rest
//! of its `impl` is split by concern: admission.rs (enqueueing within the bounds: fair shares and
//! eviction), due.rs (taking the deliveries due for an attempt) and finish.rs (an attempt's
//! outcome, and the circuits and gone lanes it changes).

use super::policy::RetryPolicy;
use super::{Delivery, LaneId};
use std::collections::{BTreeMap, VecDeque};

mod admission;
mod due;
mod finish;

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

    /// Nothing held, nothing out, nothing learnt about its endpoint: the same as a new lane.
    fn idle(&self) -> bool {
        self.queued == 0
            && self.attempts_out == 0
            && self.ready.is_empty()
            && self.waiting.is_empty()
            && !self.gone
            && self.consecutive_failures == 0
            && self.probe_at_ms.is_none()
            && self.failed_probes == 0
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
    /// The lanes of the webhooks (by index) that are not idle: a webhook with nothing held and
    /// nothing known about it has no entry, so that the outbox costs what it holds, not the
    /// number of webhooks.
    webhooks: BTreeMap<usize, Lane>,
    /// Webhook lanes that exist: indexes below this.
    lanes: usize,
    /// What a webhook lane without an entry is.
    idle_lane: Lane,
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
    /// Held outside the outbox but charged to its bounds (events, bytes): events waiting for the
    /// registry's first complete listing.
    reserved: (usize, usize),
    /// The latest time the outbox was told (by `take_due` and `finish`), for stall checks.
    clock_ms: u64,
}

/// Admission of a new delivery: accepted, with the deliveries evicted to make room for it.
pub type Admitted = Vec<Delivery>;

impl Outbox {
    pub fn new(webhooks: usize, settings: OutboxSettings) -> Self {
        Outbox {
            webhooks: BTreeMap::new(),
            lanes: webhooks,
            idle_lane: Lane::default(),
            dead_letter: Lane::default(),
            settings,
            queued: 0,
            queued_bytes: 0,
            attempts_out: 0,
            circuit_change: None,
            others: Others::default(),
            reserved: (0, 0),
            clock_ms: 0,
        }
    }

    /// What the proxy's other live workers hold now.
    pub fn set_others(&mut self, others: Others) {
        self.others = others;
    }

    /// Charges what this worker holds outside the outbox (events, bytes) to its bounds.
    pub fn reserve(&mut self, count: usize, bytes: usize) {
        self.reserved = (count, bytes);
    }

    /// What this worker holds against the proxy's bounds: its deliveries and what it reserved.
    pub fn held(&self) -> (usize, usize) {
        (
            self.queued + self.reserved.0,
            self.queued_bytes + self.reserved.1,
        )
    }

    /// What this worker's deliveries may hold: what the others leave of the proxy's bounds, and
    /// at least an equal split of them (so that a worker never waits for another to make room;
    /// the tick's [`Outbox::trim`] brings an overshoot back within the bounds), less what it
    /// reserved.
    fn capacity(&self) -> (usize, usize) {
        let workers = self.others.workers + 1;
        let s = &self.settings;
        let (reserved, reserved_bytes) = self.reserved;
        (
            s.max_queued
                .saturating_sub(self.others.queued)
                .max(s.max_queued / workers)
                .saturating_sub(reserved),
            s.max_queued_bytes
                .saturating_sub(self.others.queued_bytes)
                .max(s.max_queued_bytes / workers)
                .saturating_sub(reserved_bytes),
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
            LaneId::Webhook(i) if i < self.lanes => {
                Some(self.webhooks.get(&i).unwrap_or(&self.idle_lane))
            }
            LaneId::Webhook(_) => None,
            LaneId::DeadLetter => Some(&self.dead_letter),
        }
    }

    fn lane_mut(&mut self, id: LaneId) -> Option<&mut Lane> {
        match id {
            LaneId::Webhook(i) if i < self.lanes => Some(self.webhooks.entry(i).or_default()),
            LaneId::Webhook(_) => None,
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

    /// Forgets a delivery that leaves the outbox's custody: its lane's and the outbox's counts,
    /// and its payload's bytes when no other held delivery shares it.
    fn release(&mut self, d: &Delivery) {
        let size = d.payload.held_bytes();
        if let Some(lane) = self.lane_mut(d.lane) {
            lane.remove(size);
        }
        self.let_go(d);
    }

    /// A delivery leaves the outbox's custody: its payload's bytes go with the last holder.
    fn let_go(&mut self, d: &Delivery) {
        self.queued = self.queued.saturating_sub(1);
        if d.payload.let_go() {
            self.queued_bytes = self.queued_bytes.saturating_sub(d.payload.held_bytes());
        }
    }

    /// Webhook lanes now exist up to `webhooks` (more webhooks were added after the others).
    pub fn grow(&mut self, webhooks: usize) {
        self.lanes = self.lanes.max(webhooks);
    }

    /// A webhook's lane starts over (its webhook was removed, and the index may be reused):
    /// returns its queued deliveries (each must be logged). Its attempts out stay counted in the
    /// outbox until they are answered, as orphans ([`Outbox::release_orphan`]).
    pub fn clear_lane(&mut self, index: usize) -> Vec<Delivery> {
        let Some(lane) = self.webhooks.remove(&index) else {
            return Vec::new();
        };
        let dropped: Vec<Delivery> = lane.ready.into_iter().chain(lane.waiting).collect();
        for d in &dropped {
            self.let_go(d);
        }
        dropped
    }

    /// Webhook lanes whose circuit is open here.
    pub fn lanes_with_open_circuits(&self) -> Vec<LaneId> {
        self.webhooks
            .iter()
            .filter(|(_, l)| l.probe_at_ms.is_some())
            .map(|(&i, _)| LaneId::Webhook(i))
            .collect()
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
        self.lanes = webhooks;
        self.settings = settings;
        let mut dropped = Vec::new();
        for (i, lane) in old {
            let target = new_index(i).filter(|&t| !lane.gone && t < webhooks);
            let Some((t, new_lane)) = target.map(|t| (t, self.webhooks.entry(t).or_default()))
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
mod tests;
