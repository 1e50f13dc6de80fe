//! What the workers of one proxy share, as plain text in proxy-wide shared data, parsed as hostile
//! bytes (another build of the filter, or a bug, may have written them): which endpoints answered
//! 410 Gone or have an open circuit, and how much each worker's outbox holds.
//!
//! One line per entry, fields separated by spaces. A line that does not parse is skipped.

use super::outbox::Others;
use std::collections::BTreeMap;

/// Where a webhook's state applies: its id and a fingerprint of its URL, so that a 410 stops
/// applying once the webhook is pointed somewhere else.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointKey {
    pub webhook_id: String,
    pub url_fingerprint: u64,
}

impl EndpointKey {
    pub fn new(webhook_id: &str, url: &str) -> Self {
        EndpointKey {
            webhook_id: webhook_id.to_string(),
            url_fingerprint: fnv1a(url.as_bytes()),
        }
    }
}

/// FNV-1a, 64 bits: a fingerprint, not a secret.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointState {
    /// The endpoint answered 410 Gone: nothing more is sent to it.
    Gone,
    /// The circuit is open: the worker `leader` sends one probe at this time (Unix ms); the
    /// others hold their queues until it closes, and take over if it falls silent.
    Open { probe_at_ms: u64, leader: String },
}

/// The endpoints some worker found gone or failing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointTable {
    pub entries: BTreeMap<EndpointKey, EndpointState>,
}

impl EndpointTable {
    pub fn parse(bytes: &[u8]) -> Self {
        let mut entries = BTreeMap::new();
        let text = String::from_utf8_lossy(bytes);
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (id, fp, state) = match fields.as_slice() {
                [id, fp, "gone"] => (id, fp, Some(EndpointState::Gone)),
                [id, fp, "open", at, leader] => (
                    id,
                    fp,
                    at.parse().ok().map(|probe_at_ms| EndpointState::Open {
                        probe_at_ms,
                        leader: (*leader).to_string(),
                    }),
                ),
                _ => continue,
            };
            let (Ok(fp), Some(state)) = (u64::from_str_radix(fp, 16), state) else {
                continue;
            };
            let key = EndpointKey {
                webhook_id: (*id).to_string(),
                url_fingerprint: fp,
            };
            entries.insert(key, state);
        }
        EndpointTable { entries }
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut out = String::new();
        for (key, state) in &self.entries {
            let state = match state {
                EndpointState::Gone => "gone".to_string(),
                EndpointState::Open {
                    probe_at_ms,
                    leader,
                } => format!("open {probe_at_ms} {leader}"),
            };
            out.push_str(&format!(
                "{} {:016x} {state}\n",
                key.webhook_id, key.url_fingerprint
            ));
        }
        out.into_bytes()
    }

    /// Records a state (None clears it). A gone endpoint stays gone.
    pub fn set(&mut self, key: EndpointKey, state: Option<EndpointState>) {
        if self.entries.get(&key) == Some(&EndpointState::Gone) {
            return;
        }
        match state {
            Some(state) => {
                self.entries.insert(key, state);
            }
            None => {
                self.entries.remove(&key);
            }
        }
    }
}

/// How much one worker's outbox holds, as it last said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldByWorker {
    pub queued: usize,
    pub queued_bytes: usize,
    pub updated_ms: u64,
}

/// Every worker's holdings, by worker id. Workers that have not said anything for
/// [`HeldTable::STALE_MS`] are gone (a VM that was reloaded or stopped) and count for nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldTable {
    pub workers: BTreeMap<String, HeldByWorker>,
}

impl HeldTable {
    pub const STALE_MS: u64 = 5_000;

    pub fn parse(bytes: &[u8]) -> Self {
        let mut workers = BTreeMap::new();
        for line in String::from_utf8_lossy(bytes).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let [id, queued, bytes, at] = fields.as_slice() else {
                continue;
            };
            let (Ok(queued), Ok(queued_bytes), Ok(updated_ms)) =
                (queued.parse(), bytes.parse(), at.parse())
            else {
                continue;
            };
            workers.insert(
                (*id).to_string(),
                HeldByWorker {
                    queued,
                    queued_bytes,
                    updated_ms,
                },
            );
        }
        HeldTable { workers }
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut out = String::new();
        for (id, h) in &self.workers {
            out.push_str(&format!(
                "{id} {} {} {}\n",
                h.queued, h.queued_bytes, h.updated_ms
            ));
        }
        out.into_bytes()
    }

    /// Records this worker's holdings and forgets workers silent for too long.
    pub fn update(&mut self, me: &str, held: HeldByWorker) {
        let now = held.updated_ms;
        self.workers
            .retain(|_, h| now.saturating_sub(h.updated_ms) <= Self::STALE_MS);
        self.workers.insert(me.to_string(), held);
    }

    /// What the other live workers hold.
    pub fn others(&self, me: &str, now_ms: u64) -> Others {
        self.workers
            .iter()
            .filter(|(id, h)| {
                id.as_str() != me && now_ms.saturating_sub(h.updated_ms) <= Self::STALE_MS
            })
            .fold(Others::default(), |o, (_, h)| Others {
                queued: o.queued.saturating_add(h.queued),
                queued_bytes: o.queued_bytes.saturating_add(h.queued_bytes),
                workers: o.workers + 1,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_tables_round_trip_and_skip_garbage() {
        let mut t = EndpointTable::default();
        t.set(
            EndpointKey::new("a", "https://a/"),
            Some(EndpointState::Gone),
        );
        t.set(
            EndpointKey::new("b", "https://b/"),
            Some(EndpointState::Open {
                probe_at_ms: 42,
                leader: "w1".into(),
            }),
        );
        let mut bytes = t.serialize();
        bytes.extend_from_slice(b"\xff\xfe junk\nc zz gone\nd 01 open x w\ne 01 open 5\n\n");
        assert_eq!(EndpointTable::parse(&bytes), t);
    }

    #[test]
    fn gone_sticks_and_a_new_url_is_a_new_endpoint() {
        let mut t = EndpointTable::default();
        let a = EndpointKey::new("a", "https://a/");
        t.set(a.clone(), Some(EndpointState::Gone));
        t.set(a.clone(), None);
        t.set(
            a.clone(),
            Some(EndpointState::Open {
                probe_at_ms: 1,
                leader: "w".into(),
            }),
        );
        assert_eq!(t.entries.get(&a), Some(&EndpointState::Gone));
        assert!(!t
            .entries
            .contains_key(&EndpointKey::new("a", "https://a2/")));
    }

    #[test]
    fn held_tables_count_live_others_only() {
        let mut t = HeldTable::default();
        let at = |queued, updated_ms| HeldByWorker {
            queued,
            queued_bytes: queued * 10,
            updated_ms,
        };
        t.update("w1", at(3, 1_000));
        t.update("w2", at(5, 1_000));
        t.update("me", at(7, 1_000));
        let o = t.others("me", 1_000);
        assert_eq!((o.queued, o.queued_bytes, o.workers), (8, 80, 2));
        assert_eq!(
            t.others("me", 1_000 + HeldTable::STALE_MS + 1),
            Others::default()
        );
        let parsed = HeldTable::parse(&t.serialize());
        assert_eq!(parsed, t);
        assert_eq!(HeldTable::parse(b"x 1 2\n\xff 1 2 3 4\n").workers.len(), 0);
        // A stale worker is forgotten at the next update.
        t.update("me", at(1, 1_000 + HeldTable::STALE_MS + 1));
        assert_eq!(t.workers.len(), 1);
    }
}
