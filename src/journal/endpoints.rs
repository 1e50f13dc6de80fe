//! Endpoint state shared by every proxy of the journal: webhooks that answered 410 Gone
//! (`endpoints/gone/`) and open circuits (`endpoints/circuit/`, on the owner's lease), published
//! when they happen here and listed on every scan.

use super::{etcd, Answer, Journal, Notice, Purpose, Request};
use std::collections::HashSet;

/// Gone webhooks (and open circuits) listed at most per scan.
const GONE_LIMIT: u64 = 10_000;

impl Journal {
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

    /// The scan's lists of gone webhooks and open circuits.
    pub(super) fn poll_endpoint_lists(&mut self) {
        let gone = self.gone_root();
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range_prefix(&gone, GONE_LIMIT, false),
            purpose: Purpose::ListGone,
        });
        let circuits = self.circuit_root();
        self.outgoing.push(Request {
            path: etcd::RANGE,
            body: etcd::range_prefix(&circuits, GONE_LIMIT, false),
            purpose: Purpose::ListCircuits,
        });
    }

    pub(super) fn on_list_gone(&mut self, answer: Answer<'_>, now_ms: u64) {
        match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
            Ok(range) => {
                self.succeeded();
                let prefix = self.gone_root();
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
        }
    }

    pub(super) fn on_list_circuits(&mut self, answer: Answer<'_>, now_ms: u64) {
        match answer.and_then(|a| etcd::parse_range(a).map_err(|e| e.0)) {
            Ok(range) => {
                self.succeeded();
                let prefix = self.circuit_root();
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
