//! The batcher (group commit): what the worker decides about its events (tracked, retry
//! scheduled, settled) marks their records' writes as due; due writes leave together, as one
//! etcd `txn` of puts and deletes, once the oldest has waited [`FLUSH_DELAY_MS`] and no txn is
//! out, or at once when a full batch is due. A batch holds at most etcd's `--max-txn-ops` operations and stays under its request
//! limit. Under load a txn carries many events; an event whose deliveries all succeed before its
//! write leaves is never written at all. Either way etcd requests per event tend to zero.
//!
//! A record is in at most one txn at a time (etcd refuses a txn that names a key twice, and a
//! delete must not overtake its put): a write that comes due while its record's txn is out waits
//! for that txn's answer.

use super::etcd::{self, TxnOp};
use super::record::{self, PendingWebhook};
use super::{Journal, Notice, Purpose, Request};
use crate::delivery::Payload;
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};

/// How long the oldest due write waits for others to join its batch. The root's tick (50 ms)
/// polls too, so a write leaves at most a tick after this.
pub const FLUSH_DELAY_MS: u64 = 20;
/// Batches out at once. A flush short of a full batch happens only when its oldest write has
/// waited and no batch is out; one with a full batch due at once.
pub const MAX_TXNS_IN_FLIGHT: usize = 4;
/// The bytes of keys and values (and their framing) a batch may carry: etcd's default request
/// limit, less what the request carries besides.
pub const MAX_BATCH_BYTES: usize = etcd::MAX_REQUEST_BYTES - etcd::REQUEST_OVERHEAD_BYTES;

#[derive(Debug)]
pub(super) struct Tracked {
    /// Weak: the outbox counts a payload's bytes until its last delivery drops it.
    pub(super) payload: Weak<Payload>,
    pub(super) created_at_ms: u64,
    pub(super) pending: Vec<PendingWebhook>,
    /// A put may have reached etcd: a delete is owed once every webhook is settled.
    pub(super) stored: bool,
    /// etcd is behind this record.
    pub(super) dirty: bool,
    /// A txn holding this record's write is out.
    pub(super) in_flight: bool,
    pub(super) too_large: bool,
    /// Webhooks whose delivery waits in etcd only ([`super::spill`]).
    pub(super) spilled: Vec<String>,
    /// What the spilled record counts against `maxSpilledBytes`.
    pub(super) spill_bytes: usize,
    /// The payload of a spilled record, kept until its put lands.
    pub(super) pinned: Option<Rc<Payload>>,
}

/// The batcher's state.
#[derive(Debug)]
pub(super) struct Batcher {
    pub(super) tracked: HashMap<Rc<str>, Tracked>,
    /// Records whose write is due, oldest first (an id whose record is no longer dirty is skipped).
    due: VecDeque<Rc<str>>,
    /// When the poll first saw the oldest write still due.
    due_since_ms: Option<u64>,
    txns_in_flight: usize,
    /// The most operations and bytes of one batch: etcd's defaults, halved after a batch that
    /// failed (an etcd set to lower limits refuses it) and doubled back after one that went
    /// through.
    max_ops: usize,
    max_bytes: usize,
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher {
            tracked: HashMap::new(),
            due: VecDeque::new(),
            due_since_ms: None,
            txns_in_flight: 0,
            max_ops: etcd::MAX_TXN_OPS,
            max_bytes: MAX_BATCH_BYTES,
        }
    }
}

impl Journal {
    /// Starts journaling an event: `pending` is what its webhooks are owed. `stored` says the
    /// record is already in etcd under this owner (a claimed record).
    pub fn track(
        &mut self,
        event_id: &Rc<str>,
        payload: &Rc<Payload>,
        created_at_ms: u64,
        pending: Vec<PendingWebhook>,
        stored: bool,
    ) {
        if payload.envelope().is_none() {
            return;
        }
        // A later fan-out of the same event (to webhooks that arrived since) adds to its record.
        if let Some(t) = self.batch.tracked.get_mut(&**event_id) {
            let known: Vec<String> = t.pending.iter().map(|p| p.webhook_id.clone()).collect();
            let before = t.pending.len();
            t.pending.extend(
                pending
                    .into_iter()
                    .filter(|p| !known.contains(&p.webhook_id)),
            );
            if t.pending.len() > before {
                self.touch(event_id);
            }
            return;
        }
        if stored {
            self.notices.push(Notice::RecordsDelta(1));
        }
        // A new record is written (with the next batch); a claimed one only when something
        // changes (or it is settled with nothing owed).
        let owes = !stored || pending.is_empty();
        self.batch.tracked.insert(
            Rc::clone(event_id),
            Tracked {
                payload: Rc::downgrade(payload),
                created_at_ms,
                pending,
                stored,
                dirty: false,
                in_flight: false,
                too_large: false,
                spilled: Vec::new(),
                spill_bytes: 0,
                pinned: None,
            },
        );
        if owes {
            self.touch(event_id);
        }
    }

    /// A retry of `webhook_id` is scheduled: the record is updated.
    pub fn scheduled(&mut self, event_id: &str, webhook_id: &str, attempts: u32, at_ms: u64) {
        let Some(t) = self.batch.tracked.get_mut(event_id) else {
            return;
        };
        let Some(p) = t.pending.iter_mut().find(|p| p.webhook_id == webhook_id) else {
            return;
        };
        p.attempts = attempts;
        p.next_attempt_at_ms = at_ms;
        self.touch(event_id);
    }

    /// Nothing more is owed to `webhook_id` for this event (delivered, exhausted, or dropped
    /// with a log line). Once every webhook is settled, the record is deleted. Until then the
    /// record is not rewritten for this alone: a webhook it still lists would at worst get the
    /// event twice after a crash (at least once), and a write per settled webhook is saved.
    pub fn settled(&mut self, event_id: &str, webhook_id: &str) {
        self.unspill(event_id, webhook_id);
        let Some(t) = self.batch.tracked.get_mut(event_id) else {
            return;
        };
        let before = t.pending.len();
        t.pending.retain(|p| p.webhook_id != webhook_id);
        if t.pending.len() == before || !t.pending.is_empty() {
            return;
        }
        self.touch(event_id);
    }

    /// Marks a record's write as due.
    pub(super) fn touch(&mut self, event_id: &str) {
        let Some((key, t)) = self.batch.tracked.get_key_value(event_id) else {
            return;
        };
        let key = Rc::clone(key);
        // Settled before any write of it left: nothing to write, now or later (even while writes
        // are paused, so that an outage does not keep every delivered event in memory).
        let never_written = t.pending.is_empty() && !t.stored && !t.in_flight;
        if t.too_large || never_written {
            if t.pending.is_empty() && !t.stored && !t.in_flight {
                self.batch.tracked.remove(event_id);
            }
            return;
        }
        let Some(t) = self.batch.tracked.get_mut(event_id) else {
            return;
        };
        let was_dirty = t.dirty;
        t.dirty = true;
        if !was_dirty && !t.in_flight {
            self.batch.due.push_back(key);
            self.compact_due();
        }
    }

    /// Drops the due entries that owe nothing any more (settled, removed) once they outnumber
    /// the records: the queue stays bounded by the records tracked, even while writes are paused.
    fn compact_due(&mut self) {
        if self.batch.due.len() <= 2 * self.batch.tracked.len() + 64 {
            return;
        }
        let tracked = &self.batch.tracked;
        self.batch
            .due
            .retain(|id| tracked.get(id).is_some_and(|t| t.dirty && !t.in_flight));
    }

    /// Every record is written again (etcd may have lost them to a claimant).
    pub(super) fn touch_all(&mut self) {
        let ids: Vec<Rc<str>> = self.batch.tracked.keys().cloned().collect();
        for id in ids {
            self.touch(&id);
        }
    }

    /// Flushes the due writes, as batches within etcd's bounds, while fewer than
    /// [`MAX_TXNS_IN_FLIGHT`] are out: at once when a full batch is due, else when the oldest
    /// write has waited long enough and no batch is out.
    pub(super) fn poll_writes(&mut self, now_ms: u64) {
        self.skip_stale_due();
        if self.batch.due.is_empty() {
            self.batch.due_since_ms = None;
            return;
        }
        let since = *self.batch.due_since_ms.get_or_insert(now_ms);
        let aged = now_ms >= since.saturating_add(FLUSH_DELAY_MS);
        let full = self.batch.due.len() >= self.batch.max_ops;
        // Short of a full batch, a flush also waits for the txn out to be answered (group
        // commit: the slower etcd answers, the more each txn carries).
        if !(full || (aged && self.batch.txns_in_flight == 0)) {
            return;
        }
        // A flush sends everything due, in as many txns as etcd's bounds need.
        while self.batch.txns_in_flight < MAX_TXNS_IN_FLIGHT {
            self.skip_stale_due();
            if self.batch.due.is_empty() {
                break;
            }
            let (ops, txn) = self.next_batch();
            if ops.is_empty() {
                continue;
            }
            self.batch.txns_in_flight += 1;
            self.outgoing.push(Request {
                path: etcd::TXN,
                body: etcd::txn(&txn),
                purpose: Purpose::Batch { ops },
            });
        }
        if self.batch.due.is_empty() {
            self.batch.due_since_ms = None;
        }
    }

    /// Drops the due entries at the front that owe nothing any more.
    fn skip_stale_due(&mut self) {
        while let Some(id) = self.batch.due.front() {
            let live = self
                .batch
                .tracked
                .get(id)
                .is_some_and(|t| t.dirty && !t.in_flight);
            if live {
                return;
            }
            self.batch.due.pop_front();
        }
    }

    /// Takes due writes, oldest first, up to the batch's bounds: (event id, is a delete) for the
    /// answer, and the txn's operations. The first write always fits (one record alone is
    /// within etcd's limit, or it was found too large).
    fn next_batch(&mut self) -> (Vec<(Rc<str>, bool)>, Vec<TxnOp>) {
        let (mut ops, mut txn, mut bytes) = (Vec::new(), Vec::new(), 0);
        while ops.len() < self.batch.max_ops {
            let Some(event_id) = self.batch.due.front().cloned() else {
                break;
            };
            let key = self.record_key(&self.owner, &event_id);
            let Some(t) = self.batch.tracked.get_mut(&event_id) else {
                self.batch.due.pop_front();
                continue;
            };
            if !t.dirty || t.in_flight {
                self.batch.due.pop_front();
                continue;
            }
            let payload = t.payload.upgrade().or_else(|| t.pinned.clone());
            if payload.is_none() && !t.spilled.is_empty() {
                // Spilled, its put landed: etcd holds what memory no longer does (a rewrite
                // after a lost lease cannot be made; a claimant may deliver it instead).
                t.dirty = false;
                self.batch.due.pop_front();
                continue;
            }
            // Nothing owed (or no delivery holds the event any more): delete.
            let envelope = payload
                .as_deref()
                .and_then(Payload::envelope)
                .filter(|_| !t.pending.is_empty());
            let op = match envelope {
                None if !t.stored => {
                    self.batch.tracked.remove(&event_id);
                    self.batch.due.pop_front();
                    continue;
                }
                None => TxnOp::Delete { key },
                Some(envelope) => {
                    let value = record::encode(&event_id, t.created_at_ms, envelope, &t.pending);
                    let size = value.len() + key.len();
                    if size + etcd::REQUEST_OVERHEAD_BYTES > etcd::MAX_REQUEST_BYTES {
                        t.too_large = true;
                        t.dirty = false;
                        self.notices.push(Notice::TooLarge {
                            event_id: event_id.to_string(),
                            bytes: size,
                        });
                        self.batch.due.pop_front();
                        continue;
                    }
                    TxnOp::Put { key, value }
                }
            };
            let weight = op.weight();
            if !ops.is_empty() && bytes + weight > self.batch.max_bytes {
                // It stays due, first of the next batch.
                break;
            }
            self.batch.due.pop_front();
            bytes += weight;
            t.dirty = false;
            t.in_flight = true;
            ops.push((event_id, matches!(op, TxnOp::Delete { .. })));
            txn.push(op);
        }
        (ops, txn)
    }

    /// The answer to a batch: every write in it went through, or none did.
    pub(super) fn on_batch_answer(
        &mut self,
        ops: Vec<(Rc<str>, bool)>,
        answer: super::Answer<'_>,
        now_ms: u64,
    ) {
        self.batch.txns_in_flight = self.batch.txns_in_flight.saturating_sub(1);
        // A txn without compares applies its writes whatever `succeeded` says.
        let result = answer.and_then(|a| etcd::parse_txn(a).map(|_| ()).map_err(|e| e.0));
        let ok = result.is_ok();
        match result {
            Ok(()) => {
                self.succeeded();
                self.batch.max_ops = (self.batch.max_ops * 2).min(etcd::MAX_TXN_OPS);
                self.batch.max_bytes = (self.batch.max_bytes * 2).min(MAX_BATCH_BYTES);
            }
            Err(why) => {
                self.failed(
                    format!("record batch of {} writes: {why}", ops.len()),
                    now_ms,
                );
                if ops.len() > 1 {
                    self.batch.max_ops = (ops.len() / 2).max(1);
                    self.batch.max_bytes = (self.batch.max_bytes / 2).max(1);
                }
            }
        }
        // One notice for the batch: the glue updates a gauge per notice.
        let delta: i64 = ops
            .iter()
            .map(|(event_id, delete)| self.written(event_id, *delete, ok))
            .sum();
        if delta != 0 {
            self.notices.push(Notice::RecordsDelta(delta));
        }
    }

    /// One write of a batch was answered; returns how the records stored moved (-1, 0, 1).
    fn written(&mut self, event_id: &Rc<str>, delete: bool, ok: bool) -> i64 {
        let Some(t) = self.batch.tracked.get_mut(event_id) else {
            return 0;
        };
        t.in_flight = false;
        let was_stored = t.stored;
        if delete {
            if ok {
                t.stored = false;
            } else {
                t.dirty = true;
            }
        } else {
            // A put that failed may still have reached etcd.
            t.stored = true;
            if !ok {
                t.dirty = true;
            }
        }
        let (stored, dirty, settled) = (t.stored, t.dirty, t.pending.is_empty());
        if ok && !delete && !dirty {
            self.unpin(event_id);
        }
        if dirty {
            self.batch.due.push_back(Rc::clone(event_id));
        } else if settled && !stored {
            self.batch.tracked.remove(event_id);
        }
        i64::from(stored) - i64::from(was_stored)
    }
}
