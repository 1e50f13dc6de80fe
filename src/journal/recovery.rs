//! Recovery: every scan period each owner lists the live owners (`alive/`), then walks the owners
//! that have records (`range` with `limit 1`, skipping from owner to owner, at most
//! [`STEPS_PER_SCAN`] steps per scan; the next scan resumes where this one stopped). The records
//! of an owner without a lease key are read [`CLAIM_BATCH`] at a time, batch after batch while
//! the outbox has room, and claimed ([`super::claims`]).

use super::{etcd, Answer, Journal, Request, Room};
use crate::journal::Purpose;
use std::collections::HashSet;

/// Records read from one dead owner per scan step.
const CLAIM_BATCH: u64 = 16;
/// Range requests of the walk per scan (an owner skipped, a batch of records read): the cost of
/// a scan stays bounded however many owners there are, and the next scan resumes where this one
/// stopped.
pub const STEPS_PER_SCAN: usize = 64;
/// Live owners listed at most (more is far past any deployment).
const LIST_LIMIT: u64 = 100_000;

#[derive(Debug)]
pub(super) enum Scan {
    Idle {
        at_ms: u64,
    },
    Listing,
    Walking {
        alive: HashSet<String>,
        steps_left: usize,
    },
}

impl Journal {
    /// How often dead owners are looked for: a third of the lease, at least a second.
    pub(super) fn scan_period_ms(&self) -> u64 {
        (self.settings.lease_seconds * 1000 / 3).max(1000)
    }

    /// Starts a scan when one is due: the live owners, and the endpoint state of every proxy.
    pub(super) fn poll_scan(&mut self, now_ms: u64) {
        let Scan::Idle { at_ms } = self.scan else {
            return;
        };
        if now_ms < at_ms {
            return;
        }
        self.scan = Scan::Listing;
        let alive = self.alive_root();
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range_prefix(&alive, LIST_LIMIT, true),
            purpose: Purpose::ListAlive,
        });
        self.poll_endpoint_lists();
    }

    pub(super) fn on_list_alive(&mut self, answer: Answer<'_>, now_ms: u64) {
        match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
            Ok(range) => {
                self.succeeded();
                let prefix = self.alive_root();
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

    pub(super) fn on_next_owner(&mut self, answer: Answer<'_>, now_ms: u64) {
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

    /// A batch of a dead owner's records: claimed while the outbox has room, then the next batch
    /// or the next owner.
    pub(super) fn on_orphans(
        &mut self,
        owner: String,
        answer: Answer<'_>,
        now_ms: u64,
        room: Room,
    ) {
        match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
            Ok(range) => {
                self.succeeded();
                let prefix = self.owner_records(&owner);
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
                    let cursor = self.after_owner_records(owner.as_bytes());
                    self.next_owner(&cursor, now_ms);
                }
            }
            Err(why) => {
                self.failed(format!("reading a dead owner's records: {why}"), now_ms);
                self.scan_done(now_ms);
            }
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
        let end = etcd::prefix_end(&self.owner_records(&owner));
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
        let cursor = self.after_owner_records(owner);
        let Scan::Walking { alive, .. } = &self.scan else {
            return;
        };
        let owner = String::from_utf8_lossy(owner).into_owned();
        if owner == self.owner || alive.contains(&owner) {
            self.next_owner(&cursor, now_ms);
            return;
        }
        let prefix = self.owner_records(&owner);
        self.read_orphans(owner, prefix, now_ms);
    }
}
