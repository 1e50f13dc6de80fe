//! Admission: a new delivery is enqueued within the outbox's bounds (`maxQueued`,
//! `maxQueuedBytes`), and when the outbox is full a lane below its fair share takes the place of
//! queued deliveries of a stalled lane or of the lane furthest over its share. The tick's trim
//! brings the proxy back within its bounds the same way.

use super::{Admitted, Bound, Lane, Outbox, Refused, STALLED_MS, STUCK_MARGIN_MS};
use crate::delivery::{Delivery, LaneId};

impl Outbox {
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

    /// Lanes that hold something.
    pub fn lanes_holding(&self) -> usize {
        self.active_lanes(LaneId::DeadLetter)
            .saturating_sub(usize::from(self.dead_letter.queued == 0))
    }

    /// How many more deliveries `lane` can take now within the bounds and its fair share among
    /// `sharing` lanes: what the journal pages back in for it.
    pub fn headroom(&self, lane: LaneId, sharing: usize) -> usize {
        let active = sharing.max(1);
        let (room, _) = self.room();
        let (max_queued, _) = self.capacity();
        let (count, _) = self.lane_queued(lane);
        room.min((max_queued / active).max(1).saturating_sub(count))
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
            .values()
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
            .filter(|(&i, l)| {
                LaneId::Webhook(i) != except
                    && l.progress_ms.saturating_add(STUCK_MARGIN_MS) <= progress
                    && l.evictable()
            })
            .min_by_key(|(_, l)| l.progress_ms)
            .map(|(&i, _)| i)
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
            .filter(|(&i, l)| {
                LaneId::Webhook(i) != except
                    && excess(l) > 1000
                    && l.evictable()
                    && l.last_progress(now) <= progress
            })
            .max_by_key(|(_, l)| excess(l))
            .map(|(&i, _)| i)
    }

    /// Evicts the newest queued (not in flight) delivery of webhook lane `index`.
    fn evict_from(&mut self, index: usize) -> Option<Delivery> {
        let d = self.webhooks.get_mut(&index)?.pop_newest()?;
        self.release(&d);
        Some(d)
    }
}
