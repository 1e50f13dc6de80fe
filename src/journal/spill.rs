//! Overload spills to the journal: when the outbox is at its bounds, a new delivery (or one
//! evicted to make room for another webhook's) waits in etcd only, as an ordinary record of this
//! owner that no memory holds, and is paged back in as the outbox frees room: oldest first per
//! webhook, the webhooks served in turn. Recovery and claims see these records like any other.
//!
//! What memory keeps of a spilled delivery is its place in its webhook's queue and its record's
//! tracking entry; its payload stays pinned only until the record's put lands. The bytes of
//! spilled records are bounded by `maxSpilledBytes` (each counted with [`RECORD_OVERHEAD_BYTES`]
//! and [`WEBHOOK_OVERHEAD_BYTES`] per webhook, so that the memory tracking them is bounded too); past it, and while etcd does not answer, the
//! outbox's bounds drop as without a journal.

use super::record::PendingWebhook;
use super::{etcd, Answer, Journal, Notice, Purpose, Request};
use crate::delivery::Payload;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

/// What a spilled record counts against `maxSpilledBytes` besides its envelope: its key and the
/// memory that tracks it, plus [`WEBHOOK_OVERHEAD_BYTES`] per webhook it lists.
pub const RECORD_OVERHEAD_BYTES: usize = 512;
pub const WEBHOOK_OVERHEAD_BYTES: usize = 128;
/// At most one spill log line per this long (the counter counts every spill).
pub const NOTICE_EVERY_MS: u64 = 10_000;

/// The spilled deliveries.
#[derive(Debug, Default)]
pub(super) struct Spill {
    /// Per webhook id, the events whose delivery to it waits in etcd only, oldest first. An
    /// entry its record no longer lists as spilled is skipped.
    lanes: HashMap<String, VecDeque<Rc<str>>>,
    /// The webhooks with spilled deliveries, in the order the page-in serves them.
    turn: VecDeque<String>,
    /// Deliveries waiting in etcd only.
    deliveries: usize,
    /// What they count against `maxSpilledBytes`.
    bytes: usize,
    /// Payloads kept until their record's put lands: how many, and their bytes.
    pinned: usize,
    pinned_bytes: usize,
    /// A page-in read is out.
    reading: bool,
    /// Spills not yet told in a log line, and when the last line was.
    untold: u64,
    told_at_ms: Option<u64>,
}

/// One event of a page-in read: the webhooks whose deliveries come back.
pub type PageInItem = (Rc<str>, Vec<String>);

/// What [`Journal::spill`] did with a delivery: spilled it, or why it could not. The caller drops
/// what did not spill; the two journal bounds are named in that drop, since the knob that helps
/// is the journal's, not the outbox's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpillOutcome {
    /// It waits in etcd only (or did already).
    Spilled,
    /// `maxSpilledBytes` is 0: spilling is off, the outbox drops as without a journal.
    Off,
    /// No record lists it: the event is not tracked, its record is too large for etcd, or the
    /// record does not owe this webhook.
    NotJournaled,
    /// etcd does not answer, or this owner's lease is not live.
    JournalUnavailable,
    /// The spilled records count `maxSpilledBytes` (`max_bytes`) already.
    JournalFull { max_bytes: usize },
    /// Payloads waiting in memory for their record's put fill the room they may take
    /// (`room_bytes`): deliveries spill faster than etcd takes the writes.
    JournalBehind { room_bytes: usize },
}

impl SpillOutcome {
    pub fn spilled(self) -> bool {
        self == SpillOutcome::Spilled
    }
}

impl Journal {
    /// Deliveries waiting in etcd only.
    pub fn spilled(&self) -> usize {
        self.spill.deliveries
    }

    /// Whether `webhook_id` has deliveries waiting in etcd: a new one waits behind them.
    pub fn has_spilled(&self, webhook_id: &str) -> bool {
        self.spill.deliveries > 0
            && self
                .spill
                .lanes
                .get(webhook_id)
                .is_some_and(|q| !q.is_empty())
    }

    /// Leaves the delivery of a tracked event to `webhook_id` in etcd only: its record lists it,
    /// no memory holds it. `front`: it is older than the spilled ones (it was in memory). `pin_room`
    /// is what may wait in memory for its put (payloads, bytes). Otherwise it says why not.
    pub fn spill(
        &mut self,
        event_id: &str,
        payload: &Rc<Payload>,
        webhook_id: &str,
        front: bool,
        pin_room: (usize, usize),
        now_ms: u64,
    ) -> SpillOutcome {
        if !self.healthy || !self.lease.live {
            return SpillOutcome::JournalUnavailable;
        }
        let max_bytes = self.settings.max_spilled_bytes;
        if max_bytes == 0 {
            return SpillOutcome::Off;
        }
        let Some(key) = self.batch.tracked.get_key_value(event_id).map(|(k, _)| k) else {
            return SpillOutcome::NotJournaled;
        };
        let key = Rc::clone(key);
        let Some(t) = self.batch.tracked.get_mut(event_id) else {
            return SpillOutcome::NotJournaled;
        };
        if t.too_large || !t.pending.iter().any(|p| p.webhook_id == webhook_id) {
            return SpillOutcome::NotJournaled;
        }
        if t.spilled.iter().any(|w| w == webhook_id) {
            return SpillOutcome::Spilled;
        }
        let record_bytes =
            payload.held_bytes() + RECORD_OVERHEAD_BYTES + WEBHOOK_OVERHEAD_BYTES * t.pending.len();
        if t.spilled.is_empty() && self.spill.bytes + record_bytes > max_bytes {
            return SpillOutcome::JournalFull { max_bytes };
        }
        let durable = t.stored && !t.dirty && !t.in_flight;
        if !durable && t.pinned.is_none() {
            let size = payload.held_bytes();
            if self.spill.pinned >= pin_room.0 || self.spill.pinned_bytes + size > pin_room.1 {
                return SpillOutcome::JournalBehind {
                    room_bytes: pin_room.1,
                };
            }
            t.pinned = Some(Rc::clone(payload));
            self.spill.pinned += 1;
            self.spill.pinned_bytes += size;
        }
        if t.spilled.is_empty() {
            t.spill_bytes = record_bytes;
            self.spill.bytes += record_bytes;
        }
        t.spilled.push(webhook_id.to_string());
        self.spill.deliveries += 1;
        let queue = self.spill.lanes.entry(webhook_id.to_string()).or_default();
        if queue.is_empty() && !self.spill.turn.iter().any(|w| w == webhook_id) {
            self.spill.turn.push_back(webhook_id.to_string());
        }
        if front {
            queue.push_front(key);
        } else {
            queue.push_back(key);
        }
        self.spill.untold += 1;
        let due = self
            .spill
            .told_at_ms
            .is_none_or(|at| now_ms >= at.saturating_add(NOTICE_EVERY_MS));
        if due {
            self.spill.told_at_ms = Some(now_ms);
            self.notices.push(Notice::Spilling {
                count: std::mem::take(&mut self.spill.untold),
                waiting: self.spill.deliveries,
                bytes: self.spill.bytes,
            });
        }
        SpillOutcome::Spilled
    }

    /// Forgets that `webhook_id`'s delivery of this tracked event is spilled (it came back to
    /// memory, or it is owed no more).
    pub(super) fn unspill(&mut self, event_id: &str, webhook_id: &str) {
        let Some(t) = self.batch.tracked.get_mut(event_id) else {
            return;
        };
        let before = t.spilled.len();
        t.spilled.retain(|w| w != webhook_id);
        if t.spilled.len() == before {
            return;
        }
        self.spill.deliveries = self.spill.deliveries.saturating_sub(1);
        if t.spilled.is_empty() {
            self.spill.bytes = self.spill.bytes.saturating_sub(t.spill_bytes);
            t.spill_bytes = 0;
            if let Some(p) = t.pinned.take() {
                self.spill.pinned = self.spill.pinned.saturating_sub(1);
                self.spill.pinned_bytes = self.spill.pinned_bytes.saturating_sub(p.held_bytes());
            }
        }
    }

    /// The put of a record landed: its payload need not wait in memory any more.
    pub(super) fn unpin(&mut self, event_id: &str) {
        let Some(t) = self.batch.tracked.get_mut(event_id) else {
            return;
        };
        if let Some(p) = t.pinned.take() {
            self.spill.pinned = self.spill.pinned.saturating_sub(1);
            self.spill.pinned_bytes = self.spill.pinned_bytes.saturating_sub(p.held_bytes());
        }
    }

    /// Pages spilled deliveries back in: up to `room` of them (deliveries, bytes: each event's
    /// envelope once), each webhook served in turn, oldest first, none past `lane_room` (what
    /// its lane may still take: its fair share, with the given number of lanes sharing). A delivery
    /// whose payload is still in memory comes back at once ([`Notice::PagedIn`]); the others are
    /// read from etcd with one `txn` (one read out at a time).
    pub fn page_in(
        &mut self,
        now_ms: u64,
        room: (usize, usize),
        lane_room: &dyn Fn(&str, usize) -> usize,
    ) {
        if self.spill.deliveries == 0 || room.0 == 0 || self.spill.reading {
            return;
        }
        let mut bytes_left = room.1;
        let readable = self.lease.live && now_ms >= self.writes_paused_until_ms;
        let sharing = self.spill.turn.len();
        let mut budget = room.0.min(etcd::MAX_TXN_OPS);
        // Per webhook: taken so far, and what its lane may take (asked once per page-in).
        let mut taken: HashMap<String, (usize, usize)> = HashMap::new();
        let mut picks: Vec<(Rc<str>, String)> = Vec::new();
        let mut idle_in_a_row = 0;
        while budget > 0 && idle_in_a_row < self.spill.turn.len() {
            let Some(webhook) = self.spill.turn.pop_front() else {
                break;
            };
            let next = self.next_spilled(&webhook, &picks);
            let (had, limit) = match taken.get(&webhook) {
                Some(&t) => t,
                None => (0, lane_room(&webhook, sharing)),
            };
            // An event's envelope counts once, however many of its webhooks come back.
            let size = |event_id: &Rc<str>| {
                if picks.iter().any(|(e, _)| e == event_id) {
                    return 0;
                }
                // The envelope's bytes, about: what the record counts, less its overheads.
                self.batch.tracked.get(event_id).map_or(0, |t| {
                    let overheads =
                        RECORD_OVERHEAD_BYTES + WEBHOOK_OVERHEAD_BYTES * t.pending.len();
                    t.spill_bytes.saturating_sub(overheads)
                })
            };
            let picked = match next {
                Some(event_id) if had < limit && size(&event_id) <= bytes_left => {
                    bytes_left = bytes_left.saturating_sub(size(&event_id));
                    if let Some(q) = self.spill.lanes.get_mut(&webhook) {
                        q.pop_front();
                    }
                    picks.push((event_id, webhook.clone()));
                    taken.insert(webhook.clone(), (had + 1, limit));
                    budget -= 1;
                    true
                }
                _ => false,
            };
            if !picked {
                taken.insert(webhook.clone(), (had, limit));
            }
            idle_in_a_row = if picked { 0 } else { idle_in_a_row + 1 };
            if self
                .spill
                .lanes
                .get(&webhook)
                .is_some_and(|q| !q.is_empty())
            {
                self.spill.turn.push_back(webhook);
            } else {
                self.spill.lanes.remove(&webhook);
            }
        }
        // Grouped by event: one read (or none) per record.
        let mut reads: Vec<PageInItem> = Vec::new();
        for (event_id, webhook) in picks {
            let payload = self
                .batch
                .tracked
                .get(&event_id)
                .and_then(|t| t.pinned.clone().or_else(|| t.payload.upgrade()));
            match payload {
                Some(payload) => self.paged_in(&event_id, payload, &[webhook]),
                None if readable => match reads.iter_mut().find(|(e, _)| *e == event_id) {
                    Some((_, webhooks)) => webhooks.push(webhook),
                    None => reads.push((event_id, vec![webhook])),
                },
                // etcd is out of reach: it waits, first in its queue.
                None => self.requeue(&event_id, &webhook),
            }
        }
        if reads.is_empty() {
            return;
        }
        let keys: Vec<Vec<u8>> = reads
            .iter()
            .map(|(event_id, _)| self.record_key(&self.owner, event_id))
            .collect();
        self.spill.reading = true;
        self.outgoing.push(Request {
            path: etcd::TXN,
            body: etcd::txn_reads(&keys),
            purpose: Purpose::PageIn { items: reads },
        });
    }

    /// The oldest event still spilled for `webhook` (stale entries dropped), not already picked.
    fn next_spilled(&mut self, webhook: &str, picks: &[(Rc<str>, String)]) -> Option<Rc<str>> {
        let tracked = &self.batch.tracked;
        let queue = self.spill.lanes.get_mut(webhook)?;
        while let Some(event_id) = queue.front() {
            let live = tracked
                .get(event_id)
                .is_some_and(|t| t.spilled.iter().any(|w| w == webhook));
            let picked = picks.iter().any(|(e, w)| e == event_id && w == webhook);
            if live && !picked {
                return Some(Rc::clone(event_id));
            }
            queue.pop_front();
        }
        None
    }

    /// Puts a spilled delivery back first in its webhook's queue.
    fn requeue(&mut self, event_id: &Rc<str>, webhook: &str) {
        let queue = self.spill.lanes.entry(webhook.to_string()).or_default();
        if queue.is_empty() && !self.spill.turn.iter().any(|w| w == webhook) {
            self.spill.turn.push_front(webhook.to_string());
        }
        queue.push_front(Rc::clone(event_id));
    }

    /// These webhooks' deliveries of the event come back to memory: the glue queues them.
    fn paged_in(&mut self, event_id: &Rc<str>, payload: Rc<Payload>, webhooks: &[String]) {
        let Some(t) = self.batch.tracked.get_mut(&**event_id) else {
            return;
        };
        if t.payload.upgrade().is_none() {
            t.payload = Rc::downgrade(&payload);
        }
        let created_at_ms = t.created_at_ms;
        let pending: Vec<PendingWebhook> = t
            .pending
            .iter()
            .filter(|p| webhooks.contains(&p.webhook_id) && t.spilled.contains(&p.webhook_id))
            .cloned()
            .collect();
        for w in webhooks {
            self.unspill(event_id, w);
        }
        if !pending.is_empty() {
            self.notices.push(Notice::PagedIn {
                event_id: Rc::clone(event_id),
                payload,
                created_at_ms,
                pending,
            });
        }
    }

    /// The answer to a page-in read: each record found comes back to memory; one that is gone
    /// was claimed by another proxy while this one was out of reach (it delivers it now).
    pub(super) fn on_page_in(&mut self, items: Vec<PageInItem>, answer: Answer<'_>, now_ms: u64) {
        self.spill.reading = false;
        let result = answer.and_then(|a| etcd::parse_txn_reads(a, items.len()).map_err(|e| e.0));
        let kvs = match result {
            Ok(kvs) => {
                self.succeeded();
                kvs
            }
            Err(why) => {
                self.failed(format!("paging spilled records in: {why}"), now_ms);
                for (event_id, webhooks) in items.iter().rev() {
                    for w in webhooks.iter().rev() {
                        self.requeue(event_id, w);
                    }
                }
                return;
            }
        };
        for ((event_id, webhooks), kv) in items.into_iter().zip(kvs) {
            let record = kv.map(|kv| super::record::decode(&kv.value));
            match record {
                Some(Ok(record)) => {
                    let payload = Rc::new(Payload::event(record.envelope));
                    self.paged_in(&event_id, payload, &webhooks);
                }
                Some(Err(why)) => self.spill_lost(&event_id, &webhooks, &format!("its record cannot be read ({why})")),
                None => self.spill_lost(
                    &event_id,
                    &webhooks,
                    "its record is gone from etcd (another proxy claimed it while this one was out of reach)",
                ),
            }
        }
    }

    /// Spilled deliveries this owner cannot page in: owed by this owner no more.
    fn spill_lost(&mut self, event_id: &Rc<str>, webhooks: &[String], why: &str) {
        for w in webhooks {
            self.unspill(event_id, w);
            self.settled(event_id, w);
        }
        self.notices.push(Notice::SpillLost {
            event_id: event_id.to_string(),
            webhooks: webhooks.to_vec(),
            why: why.to_string(),
        });
    }
}
