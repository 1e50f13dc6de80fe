//! Claims: each record of a dead owner is moved under this owner with one `txn`: *if* the old
//! owner's lease key does not exist (`create_revision == 0`) *and* the record's `mod_revision`
//! is unchanged, *then* put it under this owner and delete the old key. Two claimants cannot both
//! win; an owner that comes back (or rewrote the record meanwhile) keeps it. Records are written
//! in batches but each under its own key, so a claim moves exactly one event, whichever batch
//! wrote it. A record no proxy can read is moved to `unreadable/` the same way.

use super::record::{self, Record};
use super::{etcd, Answer, Journal, Notice, Purpose, Request, Room};

impl Journal {
    /// Claims what fits of a dead owner's records. False when the outbox is full.
    pub(super) fn claim_batch(&mut self, owner: &str, kvs: Vec<etcd::Kv>, room: Room) -> bool {
        let alive_key = self.alive_key(owner);
        for kv in kvs {
            let record = match record::decode(&kv.value) {
                Ok(record) => record,
                Err(why) => {
                    let shown = etcd::preview(&String::from_utf8_lossy(&kv.key));
                    let aside = self.unreadable_key(&kv.key);
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

    /// The answer to a claim: the record is this owner's now (the glue queues its deliveries),
    /// or another proxy won it.
    pub(super) fn on_claim(
        &mut self,
        record: Record,
        bytes: usize,
        answer: Answer<'_>,
        now_ms: u64,
    ) {
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
}
