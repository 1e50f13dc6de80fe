//! The write-ahead journal: every event with deliveries still owed is kept in etcd, under a key
//! owned by this worker, so that a proxy that dies (SIGKILL, a VM rebuild, a hot restart, a pod
//! evicted) does not take its queue with it. Any live proxy sharing the journal claims the records
//! of an owner whose lease key is gone, and delivers them again with the same `webhook-id`
//! (at least once: receivers dedupe on it).
//!
//! The parts: the keys ([`layout`]) and the record format ([`record`]); the batcher that writes
//! records as one etcd `txn` per flush ([`batch`]); the scan for dead owners ([`recovery`]) and
//! the claims of their records ([`claims`]); the endpoint state shared by every proxy
//! ([`endpoints`]). This file holds the owner's lease and hands answers to the part that asked.
//!
//! [`Journal`] is a pure state machine: it is told what the worker decides (events tracked,
//! retries scheduled, webhooks settled) and hands out etcd requests; the glue sends them as
//! callouts and hands the answers back. The clock is passed in.

pub mod batch;
mod claims;
mod endpoints;
pub mod etcd;
mod layout;
pub mod record;
pub mod recovery;
pub mod spill;

use batch::Batcher;
use record::Record;
use recovery::Scan;
use spill::Spill;
use std::collections::HashSet;
use std::rc::Rc;

/// `delivery.journal` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSettings {
    /// The Envoy cluster that reaches etcd's JSON gateway.
    pub cluster: String,
    pub authority: String,
    /// Every key starts with it.
    pub prefix: String,
    /// TTL of the owner's lease: how long a dead owner's records wait before they are claimed.
    pub lease_seconds: u64,
    /// The most bytes of records (as [`spill`] counts them) this owner keeps in etcd for
    /// deliveries that wait there only; past it the outbox's bound drops as without a journal.
    pub max_spilled_bytes: usize,
}

/// After a failed request, the journal waits this long before writing again; it doubles with
/// each failure in a row, up to [`MAX_RETRY_AFTER_FAILURE_MS`], and any answer etcd gives
/// starts it over.
const RETRY_AFTER_FAILURE_MS: u64 = 1_000;
const MAX_RETRY_AFTER_FAILURE_MS: u64 = 5_000;
/// A callout to etcd gives up after this long.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// What a request is for; the glue keeps it with the callout and hands it back with the answer.
#[derive(Debug)]
pub enum Purpose {
    Grant,
    Register {
        lease: i64,
    },
    Keepalive,
    /// A batch of record writes: (event id, is a delete) per write, in the txn's order.
    Batch {
        ops: Vec<(Rc<str>, bool)>,
    },
    ListAlive,
    NextOwner,
    Orphans {
        owner: String,
    },
    Claim {
        record: Record,
        bytes: usize,
    },
    Quarantine,
    PublishGone,
    ListGone,
    PublishCircuit,
    ListCircuits,
    /// A read of spilled records, to page their deliveries back in.
    PageIn {
        items: Vec<spill::PageInItem>,
    },
}

/// One etcd request: a POST of `body` to `path` on the journal's cluster.
#[derive(Debug)]
pub struct Request {
    pub path: &'static str,
    pub body: Vec<u8>,
    pub purpose: Purpose,
}

/// What the glue reports about a request: etcd's answer body, or why there is none (no answer,
/// a status other than 200).
pub type Answer<'a> = Result<&'a [u8], String>;

/// Room left in the outbox for claimed records (deliveries and bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub deliveries: usize,
    pub bytes: usize,
}

/// What the glue must log, count or do.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// The journal stopped working: deliveries go on from memory; writes are retried.
    Unavailable(String),
    /// It works again.
    Recovered,
    /// One request failed.
    RequestFailed,
    /// This owner's lease is live (the first time, or again after it was lost).
    OwnerLive { owner: String },
    /// etcd forgot this owner's lease (etcd was out of reach longer than its TTL): other proxies
    /// may have claimed its records, which are written again.
    LeaseLost,
    /// A record too large for etcd: its event is delivered from memory only.
    TooLarge { event_id: String, bytes: usize },
    /// A record claimed from a dead owner: the glue queues its deliveries and calls
    /// [`Journal::track`] with `stored = true`.
    Claimed(Record),
    /// A record no proxy can read, moved to `unreadable/`.
    Unreadable { key: String, why: String },
    /// The number of records this owner holds in etcd moved by this much.
    RecordsDelta(i64),
    /// A webhook answered 410 Gone to some proxy of the journal, at this URL.
    EndpointGone { webhook_id: String, url: Vec<u8> },
    /// Some proxy of the journal opened the circuit of this webhook (at this URL).
    EndpointCircuitOpen { webhook_id: String, url: Vec<u8> },
    /// Deliveries spill to etcd (the outbox is full): `count` since the last such notice (at
    /// most one per [`spill::NOTICE_EVERY_MS`]), `waiting` in etcd only now, their `bytes`.
    Spilling {
        count: u64,
        waiting: usize,
        bytes: usize,
    },
    /// Spilled deliveries come back: the glue queues them (and spills again what does not fit).
    PagedIn {
        event_id: Rc<str>,
        payload: Rc<crate::delivery::Payload>,
        created_at_ms: u64,
        pending: Vec<record::PendingWebhook>,
    },
    /// Spilled deliveries this owner cannot page in (their record is gone or unreadable).
    SpillLost {
        event_id: String,
        webhooks: Vec<String>,
        why: String,
    },
}
#[derive(Debug, Default)]
struct Lease {
    id: Option<i64>,
    live: bool,
    busy: bool,
    next_at_ms: u64,
    ttl_ms: u64,
}

#[derive(Debug)]
pub struct Journal {
    settings: JournalSettings,
    owner: String,
    lease: Lease,
    batch: Batcher,
    spill: Spill,
    healthy: bool,
    /// Failed requests in a row (the pause before writing again grows with it).
    failures: u32,
    writes_paused_until_ms: u64,
    scan: Scan,
    /// Where the walk over the owners with records resumes (None: from the start).
    walk_from: Option<Vec<u8>>,
    reserved: Room,
    gone_seen: HashSet<(String, Vec<u8>)>,
    /// Open circuits listed on the last scan (and those this journal published).
    circuits_seen: HashSet<(String, Vec<u8>)>,
    outgoing: Vec<Request>,
    notices: Vec<Notice>,
}

impl Journal {
    /// A journal for a new owner: `owner` is random, so that a restart is a new owner.
    pub fn new(settings: JournalSettings, owner: String) -> Self {
        Journal {
            settings,
            owner,
            lease: Lease::default(),
            batch: Batcher::default(),
            spill: Spill::default(),
            healthy: true,
            failures: 0,
            writes_paused_until_ms: 0,
            scan: Scan::Idle { at_ms: 0 },
            walk_from: None,
            reserved: Room {
                deliveries: 0,
                bytes: 0,
            },
            gone_seen: HashSet::new(),
            circuits_seen: HashSet::new(),
            outgoing: Vec::new(),
            notices: Vec::new(),
        }
    }

    pub fn settings(&self) -> &JournalSettings {
        &self.settings
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Events with something owed, as this journal tracks them.
    pub fn tracked(&self) -> usize {
        self.batch.tracked.len()
    }

    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// The requests to send now: the lease, due batches of writes, the scan for dead owners,
    /// claims. `may_claim` is false while this proxy does not know all its webhooks yet (the
    /// registry's first document has not arrived): records of dead owners then wait, rather than
    /// being claimed and dropped for naming webhooks not known here.
    pub fn poll(&mut self, now_ms: u64, may_claim: bool) -> Vec<Request> {
        self.poll_lease(now_ms);
        if self.lease.live && now_ms >= self.writes_paused_until_ms {
            self.poll_writes(now_ms);
        }
        if self.lease.live && may_claim {
            self.poll_scan(now_ms);
        }
        std::mem::take(&mut self.outgoing)
    }

    fn poll_lease(&mut self, now_ms: u64) {
        if self.lease.busy || now_ms < self.lease.next_at_ms {
            return;
        }
        self.lease.busy = true;
        let request = match (self.lease.id, self.lease.live) {
            (None, _) => Request {
                path: etcd::LEASE_GRANT,
                body: etcd::lease_grant(self.settings.lease_seconds),
                purpose: Purpose::Grant,
            },
            (Some(lease), false) => Request {
                path: etcd::PUT,
                body: etcd::put(
                    &self.alive_key(&self.owner),
                    self.owner.as_bytes(),
                    Some(lease),
                ),
                purpose: Purpose::Register { lease },
            },
            (Some(lease), true) => Request {
                path: etcd::LEASE_KEEPALIVE,
                body: etcd::lease_keepalive(lease),
                purpose: Purpose::Keepalive,
            },
        };
        self.outgoing.push(request);
    }

    fn failed(&mut self, why: String, now_ms: u64) {
        self.notices.push(Notice::RequestFailed);
        let pause = RETRY_AFTER_FAILURE_MS
            .saturating_mul(1 << self.failures.min(8))
            .min(MAX_RETRY_AFTER_FAILURE_MS);
        self.failures = self.failures.saturating_add(1);
        self.writes_paused_until_ms = now_ms + pause;
        if self.healthy {
            self.healthy = false;
            self.notices.push(Notice::Unavailable(why));
        }
    }

    fn succeeded(&mut self) {
        // etcd answers again (a keepalive, a scan): writes need not wait out their pause.
        if self.failures > 0 {
            self.failures = 0;
            self.writes_paused_until_ms = 0;
        }
        if !self.healthy {
            self.healthy = true;
            self.notices.push(Notice::Recovered);
        }
    }

    /// The answer to a request this journal made. `room` is what the outbox can still take.
    pub fn on_answer(&mut self, purpose: Purpose, answer: Answer<'_>, now_ms: u64, room: Room) {
        match purpose {
            Purpose::Grant => {
                self.lease.busy = false;
                match answer.and_then(|a| etcd::parse_lease_grant(a).map_err(|e| e.0)) {
                    Ok((id, ttl)) => {
                        self.succeeded();
                        self.lease.id = Some(id);
                        self.lease.ttl_ms = u64::try_from(ttl).unwrap_or(1) * 1000;
                        self.lease.next_at_ms = now_ms;
                    }
                    Err(why) => {
                        self.failed(format!("lease grant: {why}"), now_ms);
                        self.lease.next_at_ms = now_ms + RETRY_AFTER_FAILURE_MS;
                    }
                }
            }
            Purpose::Register { lease } => {
                self.lease.busy = false;
                match answer.and_then(|a| etcd::parse_ok(a).map_err(|e| e.0)) {
                    Ok(()) => {
                        self.succeeded();
                        self.lease.live = true;
                        self.lease.next_at_ms = now_ms + self.keepalive_period_ms();
                        self.notices.push(Notice::OwnerLive {
                            owner: self.owner.clone(),
                        });
                    }
                    Err(why) => {
                        self.failed(format!("owner key: {why}"), now_ms);
                        // The lease may be gone: start again from a new one.
                        if self.lease.id == Some(lease) {
                            self.lease.id = None;
                        }
                        self.lease.next_at_ms = now_ms + RETRY_AFTER_FAILURE_MS;
                    }
                }
            }
            Purpose::Keepalive => {
                self.lease.busy = false;
                match answer.and_then(|a| etcd::parse_keepalive(a).map_err(|e| e.0)) {
                    Ok(ttl) if ttl > 0 => {
                        self.succeeded();
                        self.lease.next_at_ms = now_ms + self.keepalive_period_ms();
                    }
                    Ok(_) => {
                        self.succeeded();
                        self.lease_lost(now_ms);
                    }
                    Err(why) => {
                        self.failed(format!("lease keepalive: {why}"), now_ms);
                        self.lease.next_at_ms = now_ms + RETRY_AFTER_FAILURE_MS;
                    }
                }
            }
            Purpose::Batch { ops } => self.on_batch_answer(ops, answer, now_ms),
            Purpose::ListAlive => self.on_list_alive(answer, now_ms),
            Purpose::NextOwner => self.on_next_owner(answer, now_ms),
            Purpose::Orphans { owner } => self.on_orphans(owner, answer, now_ms, room),
            Purpose::Claim { record, bytes } => self.on_claim(record, bytes, answer, now_ms),
            Purpose::Quarantine | Purpose::PublishGone | Purpose::PublishCircuit => {
                match answer.and_then(|a| etcd::parse_ok(a).map_err(|e| e.0)) {
                    Ok(()) => self.succeeded(),
                    Err(why) => self.failed(format!("journal write: {why}"), now_ms),
                }
            }
            Purpose::ListGone => self.on_list_gone(answer, now_ms),
            Purpose::ListCircuits => self.on_list_circuits(answer, now_ms),
            Purpose::PageIn { items } => self.on_page_in(items, answer, now_ms),
        }
    }

    fn keepalive_period_ms(&self) -> u64 {
        (self.lease.ttl_ms / 3).max(500)
    }

    fn lease_lost(&mut self, now_ms: u64) {
        self.notices.push(Notice::LeaseLost);
        self.lease = Lease {
            next_at_ms: now_ms,
            ..Lease::default()
        };
        // Whatever etcd held for this owner may have been claimed: write it all again.
        self.touch_all();
    }
}

#[cfg(test)]
mod tests;
