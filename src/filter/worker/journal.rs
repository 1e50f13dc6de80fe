//! The worker's side of the write-ahead journal ([`crate::journal`]): it tells the journal what
//! the worker decided, sends the journal's etcd requests as callouts on the journal's cluster,
//! hands their answers back, and turns the journal's notices into log lines, metrics and, for a
//! record claimed from a dead owner, deliveries queued again.

use super::{lane_name, Hooks, Worker};
use crate::config::Plan;
use crate::delivery::{Bound, DeadLetterReason, Delivery, LaneId, Payload, Refused};
use crate::filter::host::{log, Callout, Host, LogLevel};
use crate::filter::metrics::Metric;
use crate::headers;
use crate::journal::record::{PendingWebhook, Record};
use crate::journal::spill::SpillOutcome;
use crate::journal::{self, Journal, Notice, Purpose, Room};
use crate::url::WebhookUrl;
use std::fmt;
use std::rc::Rc;

/// A journal bound that kept a delivery out of etcd when the outbox had no room for it: the
/// counter its drop goes to, the delivery report's reason, and (as Display) what the log line
/// says of it.
#[derive(Debug, Clone, Copy)]
pub(super) struct JournalBound {
    pub metric: Metric,
    pub report: &'static str,
    outcome: SpillOutcome,
}

impl fmt::Display for JournalBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.outcome {
            SpillOutcome::JournalFull { max_bytes } => write!(
                f,
                "the journal holds journal.maxSpilledBytes ({max_bytes} bytes) of spilled deliveries"
            ),
            SpillOutcome::JournalBehind { room_bytes } => write!(
                f,
                "the journal is behind: spilled deliveries waiting for their etcd write hold delivery.maxQueuedBytes ({room_bytes} bytes)"
            ),
            _ => write!(f, "the journal cannot take it"),
        }
    }
}

/// A webhook's URL as the journal's endpoint state names it.
fn endpoint(url: &WebhookUrl) -> Vec<u8> {
    let scheme = if url.https { "https" } else { "http" };
    format!("{scheme}://{}{}", url.authority, url.path_and_query).into_bytes()
}

/// A journal for a new owner when the plan has one. The owner id is random, so that a restart
/// (a new VM) is a new owner.
pub(super) fn open(host: &dyn Host, plan: &Plan) -> Option<Journal> {
    let settings = plan.delivery.journal.clone()?;
    let owner: String = (0..2)
        .map(|_| format!("{:08x}", host.random_u32()))
        .collect();
    log(host, LogLevel::Info, || {
        format!(
            "journal: owner {owner} on cluster {:?}, prefix {:?}, lease {}s",
            settings.cluster, settings.prefix, settings.lease_seconds
        )
    });
    Some(Journal::new(settings, owner))
}

impl Worker {
    /// A new event was fanned out to these webhooks (`accepted`): its record is written ahead.
    pub(super) fn journal_track(
        &mut self,
        event_id: &Rc<str>,
        payload: &Rc<Payload>,
        accepted: &[usize],
        now_ms: u64,
    ) {
        let hooks = self.hooks();
        let Some(j) = &mut self.journal else {
            return;
        };
        let pending = accepted
            .iter()
            .filter_map(|&i| hooks.get(i))
            .map(|w| PendingWebhook {
                webhook_id: w.id.clone(),
                attempts: 0,
                next_attempt_at_ms: now_ms,
            })
            .collect();
        j.track(event_id, payload, now_ms, pending, false);
    }

    /// A retry is scheduled: the record is updated.
    pub(super) fn journal_scheduled(
        &mut self,
        event_id: &str,
        lane: LaneId,
        attempts: u32,
        at_ms: u64,
    ) {
        let hooks = self.hooks();
        if let (Some(j), LaneId::Webhook(_)) = (&mut self.journal, lane) {
            j.scheduled(event_id, lane_name(&hooks, lane), attempts, at_ms);
        }
    }

    /// Nothing more is owed to this lane for this event (`hooks` are the webhooks its lane
    /// index refers to).
    pub(super) fn journal_settled(&mut self, hooks: &Hooks, event_id: &str, lane: LaneId) {
        if let (Some(j), LaneId::Webhook(_)) = (&mut self.journal, lane) {
            j.settled(event_id, lane_name(hooks, lane));
        }
    }

    /// The same, for a webhook known by its id.
    pub(super) fn journal_settled_id(&mut self, event_id: &str, webhook_id: &str) {
        if let Some(j) = &mut self.journal {
            j.settled(event_id, webhook_id);
        }
    }

    /// A webhook answered 410 Gone: every proxy of the journal learns it.
    pub(super) fn journal_publish_gone(&mut self, lane: LaneId) {
        let hooks = self.hooks();
        if let (Some(j), LaneId::Webhook(i)) = (&mut self.journal, lane) {
            if let Some(w) = hooks.get(i) {
                j.publish_gone(&w.id, &endpoint(&w.url));
            }
        }
    }

    /// A circuit opened or closed here: every proxy of the journal learns it.
    pub(super) fn journal_publish_circuit(&mut self, lane: LaneId, open: bool) {
        let hooks = self.hooks();
        if let (Some(j), LaneId::Webhook(i)) = (&mut self.journal, lane) {
            if let Some(w) = hooks.get(i) {
                j.publish_circuit(&w.id, &endpoint(&w.url), open);
            }
        }
    }

    /// A new plan: the journal stays when its settings did not change; otherwise this worker
    /// starts over as a new owner (its old records are claimed once its old lease expires, so
    /// deliveries in memory may arrive twice).
    pub(super) fn journal_adopt(&mut self, host: &dyn Host, plan: &Plan) {
        let same = match (&self.journal, &plan.delivery.journal) {
            (Some(j), Some(settings)) => j.settings() == settings,
            (None, None) => true,
            _ => false,
        };
        if !same {
            log(host, LogLevel::Warn, || {
                "journal settings changed: this worker continues as a new journal owner; deliveries queued before may be delivered twice".to_string()
            });
            self.journal = open(host, plan);
        }
    }

    /// Whether a new delivery to webhook `index` waits in etcd behind those spilled already.
    pub(super) fn spills_behind(&self, hooks: &Hooks, index: usize) -> bool {
        match (&self.journal, hooks.get(index)) {
            (Some(j), Some(w)) => j.spilled() > 0 && j.has_spilled(&w.id),
            _ => false,
        }
    }

    /// The outbox has no room for this delivery: with a journal it waits in etcd only, counted.
    /// Otherwise the outcome says why not (no journal is `NotJournaled`): the caller drops it,
    /// naming the journal's bound when that is what kept it out ([`Self::journal_bound`]).
    pub(super) fn spill(
        &mut self,
        host: &dyn Host,
        d: &Delivery,
        front: bool,
        now_ms: u64,
    ) -> SpillOutcome {
        let LaneId::Webhook(i) = d.lane else {
            return SpillOutcome::NotJournaled;
        };
        if self.journal.is_none() {
            return SpillOutcome::NotJournaled;
        }
        let hooks = self.hooks();
        let (Some(j), Some(w)) = (&mut self.journal, hooks.get(i)) else {
            return SpillOutcome::NotJournaled;
        };
        // Payloads waiting in memory for their put: at most one more outbox's worth of bytes (a
        // burst spills faster than a loaded etcd takes it; what tracks them is in maxSpilledBytes).
        let pin_room = (usize::MAX, self.plan.delivery.outbox.max_queued_bytes);
        let outcome = j.spill(&d.event_id, &d.payload, &w.id, front, pin_room, now_ms);
        if outcome.spilled() {
            self.metrics.deliveries_spilled.inc(host);
        }
        outcome
    }

    /// The journal bound that kept a delivery the outbox had no room for out of etcd, if one
    /// did. None when the journal was not the bound (no journal, spilling off, etcd out of reach,
    /// an event not journaled): that drop is the outbox's, as without a journal.
    pub(super) fn journal_bound(&self, outcome: SpillOutcome) -> Option<JournalBound> {
        // Two counters, not one: the knobs differ. Full wants a larger journal.maxSpilledBytes (and
        // etcd quota); behind means etcd takes the writes slower than the overload spills them,
        // where a larger maxSpilledBytes does not help.
        let (metric, report) = match outcome {
            SpillOutcome::JournalFull { .. } => {
                (self.metrics.deliveries_dropped_journal_full, "journal_full")
            }
            SpillOutcome::JournalBehind { .. } => (
                self.metrics.deliveries_dropped_journal_behind,
                "journal_behind",
            ),
            SpillOutcome::Spilled
            | SpillOutcome::Off
            | SpillOutcome::NotJournaled
            | SpillOutcome::JournalUnavailable => return None,
        };
        Some(JournalBound {
            metric,
            report,
            outcome,
        })
    }

    /// A delivery of a tracked event that the outbox refused (`bound`), or that waits behind
    /// spilled ones (None): to etcd, else into the outbox as without a journal.
    pub(super) fn spill_or_admit(
        &mut self,
        host: &dyn Host,
        d: Delivery,
        bound: Option<Bound>,
        now_ms: u64,
    ) {
        let outcome = self.spill(host, &d, false, now_ms);
        if outcome.spilled() {
            return;
        }
        match bound {
            Some(bound) => self.drop_unspilled(host, d, bound, outcome, now_ms),
            None => self.admit(host, d, false, now_ms),
        }
    }

    /// Queues a delivery of a journaled event (claimed, or paged back in); what does not fit is
    /// spilled (`front`: before the others of its webhook) or, failing that, dropped.
    fn admit(&mut self, host: &dyn Host, d: Delivery, front: bool, now_ms: u64) {
        match self.outbox.enqueue(d) {
            Ok(evicted) => {
                for d in evicted {
                    self.drop_evicted(host, d, now_ms);
                }
            }
            Err(Refused::QueueFull(d, bound)) => {
                let outcome = self.spill(host, &d, front, now_ms);
                if !outcome.spilled() {
                    self.drop_unspilled(host, d, bound, outcome, now_ms);
                }
            }
            Err(refused) => self.report_refused(host, refused, now_ms),
        }
    }

    /// What the outbox can still take (within the proxy's bounds, as this worker sees them).
    fn journal_room(&self) -> Room {
        let (deliveries, bytes) = self.outbox.room();
        Room { deliveries, bytes }
    }

    /// Sends the journal's requests that are due; returns them by callout token.
    pub fn journal_poll(&mut self, host: &dyn Host, now_ms: u64) -> Vec<(u32, Purpose)> {
        let room = self.journal_room();
        let may_claim = !self.waiting_for_registry();
        let hooks = self.hooks();
        let Some(j) = &mut self.journal else {
            return Vec::new();
        };
        if j.spilled() > 0 {
            let outbox = &self.outbox;
            let holding = outbox.lanes_holding();
            // A webhook no longer known (or disabled) is paged in to be dropped with its log line.
            let lane_room = |webhook_id: &str, spilling: usize| {
                hooks.lane_of(webhook_id).map_or(usize::MAX, |i| {
                    outbox.headroom(LaneId::Webhook(i), spilling.max(holding))
                })
            };
            j.page_in(now_ms, (room.deliveries, room.bytes), &lane_room);
        }
        let mut out = Vec::new();
        for request in j.poll(now_ms, may_claim) {
            let settings = j.settings();
            let length = request.body.len().to_string();
            let result = host.dispatch(Callout {
                cluster: &settings.cluster,
                headers: vec![
                    (headers::METHOD, "POST"),
                    (headers::PATH, request.path),
                    (headers::AUTHORITY, &settings.authority),
                    (headers::SCHEME, "http"),
                    (headers::CONTENT_TYPE, "application/json"),
                    (headers::CONTENT_LENGTH, &length),
                ],
                body: &request.body,
                timeout_ms: journal::REQUEST_TIMEOUT_MS,
            });
            match result {
                Ok(token) => out.push((token, request.purpose)),
                Err(refused) => {
                    let why = refused.reason(&settings.cluster);
                    j.on_answer(request.purpose, Err(why), now_ms, room);
                }
            }
        }
        self.journal_notices(host, now_ms);
        out
    }

    /// The answer to a journal request: its status (None when the call failed) and body.
    pub fn journal_answer(
        &mut self,
        host: &dyn Host,
        purpose: Purpose,
        status: Option<u16>,
        body: Option<&[u8]>,
        now_ms: u64,
    ) {
        let room = self.journal_room();
        let Some(j) = &mut self.journal else {
            return;
        };
        let answer = match (status, body) {
            (Some(200), Some(body)) => Ok(body),
            (Some(200), None) => Err("answer without a body (or one too large)".to_string()),
            (Some(code), _) => Err(format!("status {code}")),
            (None, _) => Err("no answer".to_string()),
        };
        j.on_answer(purpose, answer, now_ms, room);
        self.journal_notices(host, now_ms);
    }

    fn journal_notices(&mut self, host: &dyn Host, now_ms: u64) {
        let m = self.metrics;
        // Handling a notice may raise more (a restore tracks its record): until none is left.
        loop {
            let notices = match &mut self.journal {
                Some(j) => j.take_notices(),
                None => return,
            };
            if notices.is_empty() {
                return;
            }
            self.handle_notices(host, notices, m, now_ms);
        }
    }

    fn handle_notices(
        &mut self,
        host: &dyn Host,
        notices: Vec<Notice>,
        m: crate::filter::metrics::Metrics,
        now_ms: u64,
    ) {
        for notice in notices {
            match notice {
                Notice::Unavailable(why) => {
                    m.journal_unavailable.inc(host);
                    log(host, LogLevel::Warn, || {
                        format!("journal unavailable ({why}): deliveries go on from memory, journal writes are retried")
                    });
                }
                Notice::Recovered => log(host, LogLevel::Info, || {
                    "journal available again: catching up".to_string()
                }),
                Notice::RequestFailed => m.journal_writes_failed.inc(host),
                Notice::OwnerLive { owner } => log(host, LogLevel::Info, || {
                    format!("journal: owner {owner} is live")
                }),
                Notice::LeaseLost => log(host, LogLevel::Warn, || {
                    "journal: etcd forgot this owner's lease (out of reach past its TTL); its records are written again, other proxies may deliver some of them too".to_string()
                }),
                Notice::TooLarge { event_id, bytes } => {
                    m.journal_records_too_large.inc(host);
                    log(host, LogLevel::Warn, || {
                        format!("journal: record of event={event_id} is {bytes} bytes, too large for etcd: not journaled, delivered from memory")
                    });
                }
                Notice::Unreadable { key, why } => {
                    m.journal_records_unreadable.inc(host);
                    log(host, LogLevel::Error, || {
                        format!("journal: record {key} cannot be read ({why}): moved under unreadable/ for a human to look at")
                    });
                }
                Notice::RecordsDelta(n) => m.journal_records.add(host, n),
                Notice::EndpointGone { webhook_id, url } => {
                    self.apply_remote_gone(host, &webhook_id, &url, now_ms)
                }
                Notice::EndpointCircuitOpen { webhook_id, url } => {
                    self.apply_remote_circuit(host, &webhook_id, &url, now_ms)
                }
                Notice::Claimed(record) => {
                    m.journal_records_claimed.inc(host);
                    self.restore(host, record, now_ms);
                }
                Notice::Spilling {
                    count,
                    waiting,
                    bytes,
                } => log(host, LogLevel::Warn, || {
                    format!("outbox full: {count} deliveries spilled to the journal since the last such line; {waiting} wait in etcd only ({bytes} bytes counted against journal.maxSpilledBytes), paged back in as the outbox frees room")
                }),
                Notice::PagedIn {
                    event_id,
                    payload,
                    created_at_ms,
                    pending,
                } => self.page_in(host, event_id, payload, created_at_ms, pending, now_ms),
                Notice::SpillLost {
                    event_id,
                    webhooks,
                    why,
                } => log(host, LogLevel::Error, || {
                    format!("journal: spilled deliveries of event={event_id} to webhooks {} cannot be paged in: {why}", webhooks.join(","))
                }),
            }
        }
    }

    /// Queues a claimed record's deliveries again, each at its next attempt time, and keeps
    /// journaling it under this owner.
    fn restore(&mut self, host: &dyn Host, record: Record, now_ms: u64) {
        let Record {
            event_id,
            created_at_ms,
            envelope,
            pending,
        } = record;
        let event_id: Rc<str> = Rc::from(event_id.as_str());
        let payload = Rc::new(Payload::event(envelope));
        let hooks = self.hooks();
        let mut kept = Vec::with_capacity(pending.len());
        let mut deliveries = Vec::with_capacity(pending.len());
        for p in pending {
            let resumed = self.resume(
                host,
                &hooks,
                (&event_id, &payload, created_at_ms),
                &p,
                "claimed from the journal, but this configuration has no such enabled webhook",
            );
            if let Some(delivery) = resumed {
                kept.push(p);
                deliveries.push(delivery);
            }
        }
        log(host, LogLevel::Info, || {
            format!(
                "journal: claimed event={event_id} from a dead owner; {} deliveries resume",
                kept.len()
            )
        });
        // Tracked first: what the outbox has no room for is spilled (it is in etcd already).
        if let Some(j) = &mut self.journal {
            j.track(&event_id, &payload, created_at_ms, kept, true);
        }
        for delivery in deliveries {
            self.admit(host, delivery, false, now_ms);
        }
        self.ring(host);
        self.report_gauges(host);
    }

    /// A journaled delivery back in memory, at its attempt count and next attempt time; `None`
    /// (dropped, counted and logged with `why`) when its webhook is no longer enabled here.
    fn resume(
        &self,
        host: &dyn Host,
        hooks: &Hooks,
        (event_id, payload, created_at_ms): (&Rc<str>, &Rc<Payload>, u64),
        p: &PendingWebhook,
        why: &str,
    ) -> Option<Delivery> {
        let Some(i) = hooks.lane_of(&p.webhook_id) else {
            self.metrics.deliveries_dropped_webhook_removed.inc(host);
            log(host, LogLevel::Warn, || {
                format!(
                    "delivery dropped: event={event_id} webhook={} reason={why}",
                    p.webhook_id
                )
            });
            return None;
        };
        let mut delivery = Delivery::new(
            Rc::clone(event_id),
            LaneId::Webhook(i),
            Rc::clone(payload),
            created_at_ms,
        );
        delivery.attempts = p.attempts;
        delivery.next_attempt_at_ms = p.next_attempt_at_ms;
        Some(delivery)
    }

    /// Spilled deliveries of an event come back from the journal: queued at their next attempt
    /// time (what does not fit goes back to etcd, first in line).
    fn page_in(
        &mut self,
        host: &dyn Host,
        event_id: Rc<str>,
        payload: Rc<Payload>,
        created_at_ms: u64,
        pending: Vec<PendingWebhook>,
        now_ms: u64,
    ) {
        let hooks = self.hooks();
        for p in pending {
            let resumed = self.resume(
                host,
                &hooks,
                (&event_id, &payload, created_at_ms),
                &p,
                "paged in from the journal, but the webhook was removed or disabled by a new configuration",
            );
            let Some(delivery) = resumed else {
                self.journal_settled_id(&event_id, &p.webhook_id);
                continue;
            };
            self.metrics.deliveries_paged_in.inc(host);
            self.admit(host, delivery, true, now_ms);
        }
        self.ring(host);
        self.report_gauges(host);
    }

    /// Another proxy of the journal opened the circuit of this webhook (at this URL): it opens
    /// here too, so that this proxy probes the failing endpoint instead of sending its queue.
    fn apply_remote_circuit(&mut self, host: &dyn Host, webhook_id: &str, url: &[u8], now_ms: u64) {
        let hooks = self.hooks();
        let Some(i) = hooks.lane_of(webhook_id) else {
            return;
        };
        if hooks.get(i).map(|w| endpoint(&w.url)).as_deref() != Some(url) {
            return;
        }
        if self
            .outbox
            .open_circuit(LaneId::Webhook(i), now_ms, host.random_u32())
        {
            self.metrics.circuits_opened.inc(host);
            log(host, LogLevel::Warn, || {
                format!("circuit opened for webhook {webhook_id}: another proxy of the journal found it failing; its queue waits, one probe per backoff period")
            });
        }
    }

    /// Another proxy of the journal got 410 Gone from this webhook (at this URL): it is turned off
    /// here too, and its queued deliveries are dropped like those queued at a 410 of its own.
    fn apply_remote_gone(&mut self, host: &dyn Host, webhook_id: &str, url: &[u8], now_ms: u64) {
        let hooks = self.hooks();
        let Some(i) = hooks.lane_of(webhook_id) else {
            return;
        };
        // A new URL is a new endpoint: the 410 of the old one does not hold for it.
        if hooks.get(i).map(|w| endpoint(&w.url)).as_deref() != Some(url) {
            return;
        }
        let lane = LaneId::Webhook(i);
        if self.outbox.is_gone(lane) {
            return;
        }
        let dropped = self.outbox.mark_gone(lane);
        self.metrics.webhooks_disabled_gone.inc(host);
        log(host, LogLevel::Warn, || {
            format!("webhook {webhook_id} answered 410 Gone to another proxy of the journal: disabled until the configuration changes")
        });
        for d in &dropped {
            self.metrics.deliveries_dropped_webhook_gone.inc(host);
            log(host, LogLevel::Error, || {
                format!(
                    "delivery dropped: event={} webhook={webhook_id} reason=the webhook answered 410 Gone",
                    d.event_id
                )
            });
            self.dead_letter(host, d, DeadLetterReason::WebhookGone, now_ms);
            self.journal_settled_id(&d.event_id, webhook_id);
        }
        self.report_gauges(host);
    }
}
