//! Where the journal keeps things in etcd. Every key starts with the configured prefix:
//! - `alive/<owner>`: tied to the owner's lease, kept alive on the root's tick;
//! - `records/<owner>/<event id>`: one record per event ([`super::record`]), tied to nothing;
//!   batches write many of them in one `txn`, each under its own key, so a claim (which moves
//!   one key) is the same whether a record came in a batch or alone;
//! - `unreadable/<old key>`: records no proxy can read, moved aside (logged, counted);
//! - `endpoints/gone/<webhook id>`: webhooks that answered 410 Gone, for every proxy;
//! - `endpoints/circuit/<webhook id>`: webhooks whose circuit is open at some proxy, tied to that
//!   proxy's lease (a dead proxy's open circuit goes with it).

use super::Journal;

impl Journal {
    pub(super) fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.settings.prefix).into_bytes()
    }

    pub(super) fn alive_key(&self, owner: &str) -> Vec<u8> {
        self.key(&format!("alive/{owner}"))
    }

    pub(super) fn alive_root(&self) -> Vec<u8> {
        self.key("alive/")
    }

    pub(super) fn records_root(&self) -> Vec<u8> {
        self.key("records/")
    }

    /// Every record of `owner` starts with it.
    pub(super) fn owner_records(&self, owner: &str) -> Vec<u8> {
        self.key(&format!("records/{owner}/"))
    }

    /// The first key after every record of `owner` (where the walk goes on to the next owner).
    pub(super) fn after_owner_records(&self, owner: &[u8]) -> Vec<u8> {
        let mut cursor = self.records_root();
        cursor.extend_from_slice(owner);
        cursor.push(b'/' + 1);
        cursor
    }

    pub(super) fn record_key(&self, owner: &str, event_id: &str) -> Vec<u8> {
        self.key(&format!("records/{owner}/{event_id}"))
    }

    /// Where an unreadable record is moved.
    pub(super) fn unreadable_key(&self, old_key: &[u8]) -> Vec<u8> {
        let mut aside = self.key("unreadable/");
        aside.extend_from_slice(old_key);
        aside
    }

    pub(super) fn gone_root(&self) -> Vec<u8> {
        self.key("endpoints/gone/")
    }

    pub(super) fn circuit_root(&self) -> Vec<u8> {
        self.key("endpoints/circuit/")
    }
}
