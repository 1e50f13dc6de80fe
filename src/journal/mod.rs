//! The write-ahead journal: every event with deliveries still owed is kept in etcd, under a key
//! owned by this worker, so that a proxy that dies (SIGKILL, a VM rebuild, a hot restart, a pod
//! evicted) does not take its queue with it. Any live proxy sharing the journal claims the records
//! of an owner whose lease key is gone, and delivers them again with the same `webhook-id`
//! (at least once: receivers dedupe on it).
//!
//! Keys under the configured prefix:
//! - `alive/<owner>`: tied to the owner's lease, kept alive on the root's tick;
//! - `records/<owner>/<event id>`: one record per event ([`record`]), tied to nothing;
//! - `unreadable/<old key>`: records no proxy can read, moved aside (logged, counted);
//! - `endpoints/gone/<webhook id>`: webhooks that answered 410 Gone, for every proxy;
//! - `endpoints/circuit/<webhook id>`: webhooks whose circuit is open at some proxy, tied to that
//!   proxy's lease (a dead proxy's open circuit goes with it).
//!
//! [`Journal`] is a pure state machine: it is told what the worker decides (events tracked,
//! retries scheduled, webhooks settled) and hands out etcd requests; the glue sends them as
//! callouts and hands the answers back. The clock is passed in.

pub mod etcd;
pub mod record;

use crate::delivery::Payload;
use record::{PendingWebhook, Record};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::{Rc, Weak};

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
}

/// Record writes (puts and deletes) out at once; the rest wait for the next poll. An event whose
/// deliveries all succeed while its put waits here is never written at all, so keep it well above
/// the writes a worker has out at its event rate (the journal cluster's circuit breakers too).
const MAX_WRITES_IN_FLIGHT: usize = 512;
/// After a failed request, the journal waits this long before writing again.
const RETRY_AFTER_FAILURE_MS: u64 = 1_000;
/// Records read from one dead owner per scan step.
const CLAIM_BATCH: u64 = 16;
/// Range requests of the walk per scan (an owner skipped, a batch of records read): the cost of
/// a scan stays bounded however many owners there are, and the next scan resumes where this one
/// stopped.
const STEPS_PER_SCAN: usize = 64;
/// Live owners and gone webhooks listed at most (more is far past any deployment).
const LIST_LIMIT: u64 = 100_000;
/// Gone webhooks listed at most per scan.
const GONE_LIMIT: u64 = 10_000;
/// A callout to etcd gives up after this long.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// What a request is for; the glue keeps it with the callout and hands it back with the answer.
#[derive(Debug)]
pub enum Purpose {
    Grant,
    Register { lease: i64 },
    Keepalive,
    Write { event_id: Rc<str>, delete: bool },
    ListAlive,
    NextOwner,
    Orphans { owner: String },
    Claim { record: Record, bytes: usize },
    Quarantine,
    PublishGone,
    ListGone,
    PublishCircuit,
    ListCircuits,
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
}

#[derive(Debug)]
struct Tracked {
    /// Weak: the outbox counts a payload's bytes until its last delivery drops it.
    payload: Weak<Payload>,
    created_at_ms: u64,
    pending: Vec<PendingWebhook>,
    /// A put may have reached etcd: a delete is owed once every webhook is settled.
    stored: bool,
    /// etcd is behind this record.
    dirty: bool,
    in_flight: bool,
    too_large: bool,
}

#[derive(Debug)]
enum Scan {
    Idle {
        at_ms: u64,
    },
    Listing,
    Walking {
        alive: HashSet<String>,
        steps_left: usize,
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
    tracked: HashMap<Rc<str>, Tracked>,
    /// Records whose write is due, oldest first (an id whose record is no longer dirty is skipped).
    due: VecDeque<Rc<str>>,
    writes_in_flight: usize,
    healthy: bool,
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
            tracked: HashMap::new(),
            due: VecDeque::new(),
            writes_in_flight: 0,
            healthy: true,
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
        self.tracked.len()
    }

    /// How often dead owners are looked for: a third of the lease, at least a second.
    fn scan_period_ms(&self) -> u64 {
        (self.settings.lease_seconds * 1000 / 3).max(1000)
    }

    // ---- keys ----

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.settings.prefix).into_bytes()
    }
    fn alive_key(&self, owner: &str) -> Vec<u8> {
        self.key(&format!("alive/{owner}"))
    }
    fn records_root(&self) -> Vec<u8> {
        self.key("records/")
    }
    fn record_key(&self, owner: &str, event_id: &str) -> Vec<u8> {
        self.key(&format!("records/{owner}/{event_id}"))
    }

    // ---- what the worker decides ----

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
        if let Some(t) = self.tracked.get_mut(&**event_id) {
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
        self.tracked.insert(
            Rc::clone(event_id),
            Tracked {
                payload: Rc::downgrade(payload),
                created_at_ms,
                pending,
                stored,
                dirty: false,
                in_flight: false,
                too_large: false,
            },
        );
        // A new record is written at once; a claimed one only when something changes (or it is
        // settled with nothing owed).
        let owes = self
            .tracked
            .get(event_id)
            .is_some_and(|t| !stored || t.pending.is_empty());
        if owes {
            self.touch(event_id);
        }
    }

    /// A retry of `webhook_id` is scheduled: the record is updated.
    pub fn scheduled(&mut self, event_id: &str, webhook_id: &str, attempts: u32, at_ms: u64) {
        let Some(t) = self.tracked.get_mut(event_id) else {
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
        let Some(t) = self.tracked.get_mut(event_id) else {
            return;
        };
        let before = t.pending.len();
        t.pending.retain(|p| p.webhook_id != webhook_id);
        if t.pending.len() == before || !t.pending.is_empty() {
            return;
        }
        self.touch(event_id);
    }

    /// Tells every proxy of the journal that `webhook_id` answered 410 Gone at `url` (a new URL
    /// is a new endpoint, which the 410 does not concern).
    pub fn publish_gone(&mut self, webhook_id: &str, url: &[u8]) {
        self.gone_seen
            .insert((webhook_id.to_string(), url.to_vec()));
        let key = self.key(&format!("endpoints/gone/{webhook_id}"));
        self.outgoing.push(Request {
            path: etcd::PUT,
            body: etcd::put(&key, url, None),
            purpose: Purpose::PublishGone,
        });
    }

    /// Tells every proxy of the journal that the circuit of `webhook_id` (at `url`) opened here, or
    /// that it closed. The key lives on this owner's lease: when this proxy dies, it goes too.
    pub fn publish_circuit(&mut self, webhook_id: &str, url: &[u8], open: bool) {
        let key = self.key(&format!("endpoints/circuit/{webhook_id}"));
        let body = match (open, self.lease.id.filter(|_| self.lease.live)) {
            (true, Some(lease)) => {
                self.circuits_seen
                    .insert((webhook_id.to_string(), url.to_vec()));
                etcd::put(&key, url, Some(lease))
            }
            // Without a live lease the key could outlive this proxy: it is not written.
            (true, None) => return,
            (false, _) => etcd::delete(&key),
        };
        self.outgoing.push(Request {
            path: if open { etcd::PUT } else { etcd::DELETE_RANGE },
            body,
            purpose: Purpose::PublishCircuit,
        });
    }

    /// Marks a record's write as due.
    fn touch(&mut self, event_id: &str) {
        let Some(key) = self
            .tracked
            .get_key_value(event_id)
            .map(|(k, _)| Rc::clone(k))
        else {
            return;
        };
        let Some(t) = self.tracked.get_mut(event_id) else {
            return;
        };
        if t.too_large {
            if t.pending.is_empty() && !t.stored {
                self.tracked.remove(event_id);
            }
            return;
        }
        let was_dirty = t.dirty;
        t.dirty = true;
        if !was_dirty && !t.in_flight {
            self.due.push_back(key);
        }
    }

    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    // ---- requests out ----

    /// The requests to send now: the lease, due writes, the scan for dead owners, claims.
    /// `may_claim` is false while this proxy does not know all its webhooks yet (the registry's
    /// first document has not arrived): records of dead owners then wait, rather than being
    /// claimed and dropped for naming webhooks not known here.
    pub fn poll(&mut self, now_ms: u64, may_claim: bool) -> Vec<Request> {
        self.poll_lease(now_ms);
        if self.lease.live && now_ms >= self.writes_paused_until_ms {
            self.poll_writes();
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

    fn poll_writes(&mut self) {
        while self.writes_in_flight < MAX_WRITES_IN_FLIGHT {
            let Some(event_id) = self.due.pop_front() else {
                break;
            };
            let owner_key = self.record_key(&self.owner, &event_id);
            let Some(t) = self.tracked.get_mut(&event_id) else {
                continue;
            };
            if !t.dirty || t.in_flight {
                continue;
            }
            let payload = t.payload.upgrade();
            // Nothing owed (or no delivery holds the event any more): delete.
            let envelope = payload
                .as_deref()
                .and_then(Payload::envelope)
                .filter(|_| !t.pending.is_empty());
            let request = match envelope {
                None if !t.stored => {
                    self.tracked.remove(&event_id);
                    continue;
                }
                None => Request {
                    path: etcd::DELETE_RANGE,
                    body: etcd::delete(&owner_key),
                    purpose: Purpose::Write {
                        event_id: Rc::clone(&event_id),
                        delete: true,
                    },
                },
                Some(envelope) => {
                    let value = record::encode(&event_id, t.created_at_ms, envelope, &t.pending);
                    let size = value.len() + owner_key.len();
                    if size + etcd::REQUEST_OVERHEAD_BYTES > etcd::MAX_REQUEST_BYTES {
                        t.too_large = true;
                        t.dirty = false;
                        self.notices.push(Notice::TooLarge {
                            event_id: event_id.to_string(),
                            bytes: size,
                        });
                        continue;
                    }
                    Request {
                        path: etcd::PUT,
                        body: etcd::put(&owner_key, &value, None),
                        purpose: Purpose::Write {
                            event_id: Rc::clone(&event_id),
                            delete: false,
                        },
                    }
                }
            };
            t.dirty = false;
            t.in_flight = true;
            self.writes_in_flight += 1;
            self.outgoing.push(request);
        }
    }

    fn poll_scan(&mut self, now_ms: u64) {
        let Scan::Idle { at_ms } = self.scan else {
            return;
        };
        if now_ms < at_ms {
            return;
        }
        self.scan = Scan::Listing;
        let alive = self.key("alive/");
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range_prefix(&alive, LIST_LIMIT, true),
            purpose: Purpose::ListAlive,
        });
        let gone = self.key("endpoints/gone/");
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range_prefix(&gone, GONE_LIMIT, false),
            purpose: Purpose::ListGone,
        });
        let circuits = self.key("endpoints/circuit/");
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range_prefix(&circuits, GONE_LIMIT, false),
            purpose: Purpose::ListCircuits,
        });
    }

    // ---- answers ----

    fn failed(&mut self, why: String, now_ms: u64) {
        self.notices.push(Notice::RequestFailed);
        self.writes_paused_until_ms = now_ms + RETRY_AFTER_FAILURE_MS;
        if self.healthy {
            self.healthy = false;
            self.notices.push(Notice::Unavailable(why));
        }
    }

    fn succeeded(&mut self) {
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
            Purpose::Write { event_id, delete } => {
                self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
                let result = answer.and_then(|a| etcd::parse_ok(a).map_err(|e| e.0));
                let ok = result.is_ok();
                match result {
                    Ok(()) => self.succeeded(),
                    Err(why) => self.failed(format!("record write: {why}"), now_ms),
                }
                self.written(&event_id, delete, ok);
            }
            Purpose::ListAlive => {
                match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
                    Ok(range) => {
                        self.succeeded();
                        let prefix = self.key("alive/");
                        let alive = range
                            .kvs
                            .iter()
                            .filter_map(|kv| kv.key.strip_prefix(prefix.as_slice()))
                            .map(|owner| String::from_utf8_lossy(owner).into_owned())
                            .collect();
                        self.scan = Scan::Walking {
                            alive,
                            steps_left: STEPS_PER_SCAN,
                        };
                        let from = self.walk_from.take().unwrap_or_else(|| self.records_root());
                        self.next_owner(&from, now_ms);
                    }
                    Err(why) => {
                        self.failed(format!("listing live owners: {why}"), now_ms);
                        self.scan_done(now_ms);
                    }
                }
            }
            Purpose::NextOwner => {
                match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
                    Ok(range) => {
                        self.succeeded();
                        self.visit_owner(range.kvs.first().map(|kv| kv.key.as_slice()), now_ms);
                    }
                    Err(why) => {
                        self.failed(format!("listing records: {why}"), now_ms);
                        self.scan_done(now_ms);
                    }
                }
            }
            Purpose::Orphans { owner } => {
                match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
                    Ok(range) => {
                        self.succeeded();
                        let prefix = self.key(&format!("records/{owner}/"));
                        let next_batch = range.kvs.last().map(|kv| {
                            let mut after = kv.key.clone();
                            after.push(0);
                            after
                        });
                        if !self.claim_batch(&owner, range.kvs, room) {
                            // The outbox is full: the rest waits in etcd for a later scan.
                            self.walk_from = Some(prefix);
                            self.scan_done(now_ms);
                        } else if let Some(from) = next_batch.filter(|_| range.more) {
                            self.read_orphans(owner, from, now_ms);
                        } else {
                            let mut cursor = self.key(&format!("records/{owner}"));
                            cursor.push(b'/' + 1);
                            self.next_owner(&cursor, now_ms);
                        }
                    }
                    Err(why) => {
                        self.failed(format!("reading a dead owner's records: {why}"), now_ms);
                        self.scan_done(now_ms);
                    }
                }
            }
            Purpose::Claim { record, bytes } => {
                self.reserved.deliveries = self
                    .reserved
                    .deliveries
                    .saturating_sub(record.pending.len());
                self.reserved.bytes = self.reserved.bytes.saturating_sub(bytes);
                match answer.and_then(|a| etcd::parse_txn(a).map_err(|e| e.0)) {
                    Ok(true) => {
                        self.succeeded();
                        self.notices.push(Notice::Claimed(record));
                    }
                    // Another proxy claimed it first, or its owner is back.
                    Ok(false) => self.succeeded(),
                    Err(why) => self.failed(format!("claiming a record: {why}"), now_ms),
                }
            }
            Purpose::Quarantine | Purpose::PublishGone | Purpose::PublishCircuit => {
                match answer.and_then(|a| etcd::parse_ok(a).map_err(|e| e.0)) {
                    Ok(()) => self.succeeded(),
                    Err(why) => self.failed(format!("journal write: {why}"), now_ms),
                }
            }
            Purpose::ListGone => match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
                Ok(range) => {
                    self.succeeded();
                    let prefix = self.key("endpoints/gone/");
                    for kv in &range.kvs {
                        let Some(id) = kv.key.strip_prefix(prefix.as_slice()) else {
                            continue;
                        };
                        let Ok(id) = std::str::from_utf8(id) else {
                            continue;
                        };
                        if self.gone_seen.insert((id.to_string(), kv.value.clone())) {
                            self.notices.push(Notice::EndpointGone {
                                webhook_id: id.to_string(),
                                url: kv.value.clone(),
                            });
                        }
                    }
                }
                Err(why) => self.failed(format!("listing gone endpoints: {why}"), now_ms),
            },
            Purpose::ListCircuits => {
                match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
                    Ok(range) => {
                        self.succeeded();
                        let prefix = self.key("endpoints/circuit/");
                        let mut listed = HashSet::new();
                        for kv in &range.kvs {
                            let id = kv.key.strip_prefix(prefix.as_slice());
                            let Some(Ok(id)) = id.map(std::str::from_utf8) else {
                                continue;
                            };
                            let entry = (id.to_string(), kv.value.clone());
                            if !self.circuits_seen.contains(&entry) {
                                self.notices.push(Notice::EndpointCircuitOpen {
                                    webhook_id: entry.0.clone(),
                                    url: entry.1.clone(),
                                });
                            }
                            listed.insert(entry);
                        }
                        // One that closes and opens again is news again.
                        self.circuits_seen = listed;
                    }
                    Err(why) => self.failed(format!("listing open circuits: {why}"), now_ms),
                }
            }
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
        let ids: Vec<Rc<str>> = self.tracked.keys().cloned().collect();
        for id in ids {
            self.touch(&id);
        }
    }

    fn written(&mut self, event_id: &Rc<str>, delete: bool, ok: bool) {
        let Some(t) = self.tracked.get_mut(event_id) else {
            return;
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
        match (was_stored, stored) {
            (false, true) => self.notices.push(Notice::RecordsDelta(1)),
            (true, false) => self.notices.push(Notice::RecordsDelta(-1)),
            _ => {}
        }
        if dirty {
            self.due.push_back(Rc::clone(event_id));
        } else if settled && !stored {
            self.tracked.remove(event_id);
        }
    }

    fn scan_done(&mut self, now_ms: u64) {
        self.scan = Scan::Idle {
            at_ms: now_ms + self.scan_period_ms(),
        };
    }

    /// Takes one step of the walk; false (and the scan ends, to resume at `from`) when this
    /// scan has taken all its steps.
    fn step(&mut self, from: &[u8], now_ms: u64) -> bool {
        let Scan::Walking { steps_left, .. } = &mut self.scan else {
            return false;
        };
        if *steps_left == 0 {
            self.walk_from = Some(from.to_vec());
            self.scan_done(now_ms);
            return false;
        }
        *steps_left -= 1;
        true
    }

    /// The first record key from `from` on, to find the next owner with records.
    fn next_owner(&mut self, from: &[u8], now_ms: u64) {
        if !self.step(from, now_ms) {
            return;
        }
        let end = etcd::prefix_end(&self.records_root());
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range(from, &end, 1, true),
            purpose: Purpose::NextOwner,
        });
    }

    /// A batch of a dead owner's records, from the key `from` on.
    fn read_orphans(&mut self, owner: String, from: Vec<u8>, now_ms: u64) {
        if !self.step(&from, now_ms) {
            return;
        }
        let end = etcd::prefix_end(&self.key(&format!("records/{owner}/")));
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range(&from, &end, CLAIM_BATCH, false),
            purpose: Purpose::Orphans { owner },
        });
    }

    /// A record key found by the walk: its owner is skipped when alive, else its records are
    /// read. `None`: the walk is over.
    fn visit_owner(&mut self, key: Option<&[u8]>, now_ms: u64) {
        let root = self.records_root();
        let owner = key
            .and_then(|k| k.strip_prefix(root.as_slice()))
            .map(|rest| rest.split(|&b| b == b'/').next().unwrap_or(rest));
        let Some(owner) = owner.filter(|o| !o.is_empty()) else {
            // The end of the walk: the next scan starts from the first owner again.
            self.walk_from = None;
            self.scan_done(now_ms);
            return;
        };
        let mut cursor = root.clone();
        cursor.extend_from_slice(owner);
        cursor.push(b'/' + 1);
        let Scan::Walking { alive, .. } = &self.scan else {
            return;
        };
        let owner = String::from_utf8_lossy(owner).into_owned();
        if owner == self.owner || alive.contains(&owner) {
            self.next_owner(&cursor, now_ms);
            return;
        }
        let prefix = self.key(&format!("records/{owner}/"));
        self.read_orphans(owner, prefix, now_ms);
    }

    /// Claims what fits of a dead owner's records. False when the outbox is full.
    fn claim_batch(&mut self, owner: &str, kvs: Vec<etcd::Kv>, room: Room) -> bool {
        let alive_key = self.alive_key(owner);
        for kv in kvs {
            let record = match record::decode(&kv.value) {
                Ok(record) => record,
                Err(why) => {
                    let shown = etcd::preview(&String::from_utf8_lossy(&kv.key));
                    let mut aside = self.key("unreadable/");
                    aside.extend_from_slice(&kv.key);
                    self.outgoing.push(Request {
                        path: etcd::TXN,
                        body: etcd::claim(&alive_key, &kv.key, kv.mod_revision, &aside, &kv.value),
                        purpose: Purpose::Quarantine,
                    });
                    self.notices.push(Notice::Unreadable { key: shown, why });
                    continue;
                }
            };
            let deliveries = record.pending.len();
            let bytes = record.envelope.held_bytes();
            let fits = self.reserved.deliveries + deliveries <= room.deliveries
                && self.reserved.bytes + bytes <= room.bytes;
            if !fits {
                return false;
            }
            self.reserved.deliveries += deliveries;
            self.reserved.bytes += bytes;
            let new_key = self.record_key(&self.owner, &record.event_id);
            self.outgoing.push(Request {
                path: etcd::TXN,
                body: etcd::claim(&alive_key, &kv.key, kv.mod_revision, &new_key, &kv.value),
                purpose: Purpose::Claim { record, bytes },
            });
        }
        true
    }
}

#[cfg(test)]
mod tests;
