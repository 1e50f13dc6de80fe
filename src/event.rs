//! The event envelope of the product's webhook documentation (its "Event Payload": the fields and their
//! order below) and event ids.
//!
//! Envelope, byte for byte what is signed and sent:
//! `{"id","webhookId","organisationId","eventType","dateTime","data":{"object":{…}},"version":1}`.

use serde_json::{Map, Value};
use std::fmt::Write as _;

use crate::json::{spliceable, Object};
use crate::time::rfc3339_utc;

pub const ENVELOPE_VERSION: u32 = 1;

/// 24 lowercase hex digits: 4 bytes of big-endian Unix seconds, then 8 random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId([u8; 12]);

impl EventId {
    pub fn new(unix_seconds: u64, random: [u8; 8]) -> Self {
        let mut bytes = [0u8; 12];
        // The id holds 32 bits of seconds, as the documented sample ids do; it wraps in 2106.
        bytes[..4].copy_from_slice(&(unix_seconds as u32).to_be_bytes());
        bytes[4..].copy_from_slice(&random);
        EventId(bytes)
    }

    pub fn to_hex(&self) -> String {
        // By table, not `write!`: formatting machinery per byte was a tenth of an event's
        // instructions in the core.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(24);
        for byte in self.0 {
            out.push(char::from(DIGITS[usize::from(byte >> 4)]));
            out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        out
    }
}

/// One event, before fan-out.
#[derive(Debug)]
pub struct Event {
    pub id: EventId,
    pub id_hex: String,
    pub event_type: String,
    pub organisation_id: String,
    pub created_at_ms: u64,
    pub envelope: Envelope,
}

/// An event's envelope, held once for all its webhooks: a webhook's body is `head`, its own
/// `webhookId` as a JSON string, then `tail`. Only the id differs between webhooks, so queued
/// deliveries of one event share one copy of the (possibly large) object.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope {
    /// `{"id":"…","webhookId":`
    head: String,
    /// `,"organisationId":…,"eventType":…,"dateTime":…,"data":{"object":…},"version":1}`
    tail: String,
}

impl Envelope {
    /// The exact body sent to (and signed for) one webhook.
    pub fn for_webhook(&self, webhook_id: &str) -> Vec<u8> {
        let id = json_string(webhook_id);
        let mut body = Vec::with_capacity(self.head.len() + id.len() + self.tail.len());
        body.extend_from_slice(self.head.as_bytes());
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(self.tail.as_bytes());
        body
    }

    /// Bytes held for this envelope.
    /// The envelope around the webhook id, as a journal record stores it.
    pub fn parts(&self) -> (&str, &str) {
        (&self.head, &self.tail)
    }

    /// An envelope read back from its parts (a journal record). None unless the parts make a
    /// JSON object around a webhook id: the record may come from anywhere.
    pub fn from_parts(head: String, tail: String) -> Option<Envelope> {
        let envelope = Envelope { head, tail };
        let sample = envelope.for_webhook("");
        match serde_json::from_slice::<Value>(&sample) {
            Ok(Value::Object(_)) => Some(envelope),
            _ => None,
        }
    }

    pub fn held_bytes(&self) -> usize {
        self.head.len() + self.tail.len()
    }
}

impl Event {
    /// Builds an event from the extracted object. `objectType` is written into the object,
    /// replacing any value the upstream gave it. An object read raw is spliced in as the
    /// upstream wrote it, with `objectType` added last, when that is exact (no `objectType` key of
    /// its own, no repeated key); otherwise it goes through a tree: the upstream's key order is
    /// kept either way.
    pub fn new(
        id: EventId,
        event_type: &str,
        object_type: &str,
        organisation_id: &str,
        object: Object<'_>,
        now_ms: u64,
    ) -> Self {
        let id_hex = id.to_hex();
        let object_type_json = json_string(object_type);
        let spliced = match object {
            Object::Raw(raw) if spliceable(raw) => raw.get().trim_end().strip_suffix('}'),
            _ => None,
        };
        let object_json = match spliced {
            Some(open) => {
                let mut out = String::with_capacity(open.len() + 16 + object_type_json.len());
                out.push_str(open);
                // `{` alone, or `{` and members.
                if open.trim_end() != "{" {
                    out.push(',');
                }
                out.push_str("\"objectType\":");
                out.push_str(&object_type_json);
                out.push('}');
                out
            }
            None => {
                let mut map = match object {
                    Object::Tree(map) => map.clone(),
                    // A raw object is valid JSON already: this parse does not fail.
                    Object::Raw(raw) => match serde_json::from_slice(raw.get().as_bytes()) {
                        Ok(Value::Object(map)) => map,
                        _ => Map::new(),
                    },
                };
                map.insert("objectType".into(), Value::String(object_type.into()));
                Value::Object(map).to_string()
            }
        };
        let head = format!("{{\"id\":{},\"webhookId\":", json_string(&id_hex));
        let organisation = json_string(organisation_id);
        let event_type_json = json_string(event_type);
        let date = json_string(&rfc3339_utc(now_ms));
        let mut tail = String::with_capacity(
            90 + organisation.len() + event_type_json.len() + date.len() + object_json.len(),
        );
        for part in [
            ",\"organisationId\":",
            &organisation,
            ",\"eventType\":",
            &event_type_json,
            ",\"dateTime\":",
            &date,
            ",\"data\":{\"object\":",
            &object_json,
            "},\"version\":",
        ] {
            tail.push_str(part);
        }
        let _ = write!(tail, "{ENVELOPE_VERSION}}}");
        Event {
            id,
            id_hex,
            event_type: event_type.into(),
            organisation_id: organisation_id.into(),
            created_at_ms: now_ms,
            envelope: Envelope { head, tail },
        }
    }

    /// The exact body sent to (and signed for) one webhook.
    pub fn envelope_for(&self, webhook_id: &str) -> Vec<u8> {
        self.envelope.for_webhook(webhook_id)
    }
}

fn json_string(s: &str) -> String {
    // Serialising a str can't fail.
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_is_seconds_then_random() {
        let id = EventId::new(
            0x6307_0be0,
            [0x37, 0x2f, 0x1e, 0x7b, 0xc7, 0x79, 0x62, 0xa6],
        );
        assert_eq!(id.to_hex(), "63070be0372f1e7bc77962a6");
    }

    #[test]
    fn envelope_has_exactly_the_documented_fields() {
        let object: Map<String, Value> =
            serde_json::from_str(r#"{"id":"j1","status":"completed","objectType":"spoofed"}"#)
                .unwrap();
        let event = Event::new(
            EventId::new(1_728_086_400, [1; 8]),
            "job.completed",
            "job",
            "657bf08c202997ba9d127922",
            Object::Tree(&object),
            1_728_086_400_000,
        );
        let body = event.envelope_for("66b2e3ddb97f60b5270d5ce9");
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        let expected = serde_json::json!({
            "id": "670081800101010101010101",
            "webhookId": "66b2e3ddb97f60b5270d5ce9",
            "organisationId": "657bf08c202997ba9d127922",
            "eventType": "job.completed",
            "dateTime": "2024-10-05T00:00:00Z",
            "data": {"object": {"id": "j1", "status": "completed", "objectType": "job"}},
            "version": 1
        });
        assert_eq!(parsed, expected);
        // Field order is the documentation's.
        let text = String::from_utf8(body).unwrap();
        let order: Vec<usize> = [
            "\"id\"",
            "\"webhookId\"",
            "\"organisationId\"",
            "\"eventType\"",
            "\"dateTime\"",
            "\"data\"",
            "\"version\"",
        ]
        .iter()
        .map(|k| text.find(k).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn the_object_keeps_the_upstream_key_order() {
        let object: Map<String, Value> =
            serde_json::from_str(r#"{"zeta":1,"alpha":{"y":2,"b":3},"mid":[]}"#).unwrap();
        let event = Event::new(
            EventId::new(1, [0; 8]),
            "job.completed",
            "job",
            "o",
            Object::Tree(&object),
            0,
        );
        let body = String::from_utf8(event.envelope_for("w")).unwrap();
        assert!(
            body.contains(
                r#""object":{"zeta":1,"alpha":{"y":2,"b":3},"mid":[],"objectType":"job"}"#
            ),
            "{body}"
        );
    }

    #[test]
    fn strings_are_escaped() {
        let event = Event::new(
            EventId::new(1, [0; 8]),
            "job.completed",
            "job",
            "org\"\\\n",
            Object::Tree(&Map::new()),
            0,
        );
        let parsed: Value = serde_json::from_slice(&event.envelope_for("w")).unwrap();
        assert_eq!(parsed["organisationId"], "org\"\\\n");
    }

    fn raw_envelope(object: &str, webhook: &str) -> String {
        let mut slot = None;
        let Ok(crate::json::Document::Raw(raw)) = crate::json::parse(object.as_bytes(), &mut slot)
        else {
            panic!("{object} is not read raw");
        };
        let event = Event::new(
            EventId::new(1_728_086_400, [1; 8]),
            "job.completed",
            "job",
            "o1",
            Object::Raw(raw),
            1_728_086_400_000,
        );
        String::from_utf8(event.envelope_for(webhook)).unwrap()
    }

    fn tree_envelope(object: &str, webhook: &str) -> String {
        let map: Map<String, Value> = serde_json::from_str(object).unwrap();
        let event = Event::new(
            EventId::new(1_728_086_400, [1; 8]),
            "job.completed",
            "job",
            "o1",
            Object::Tree(&map),
            1_728_086_400_000,
        );
        String::from_utf8(event.envelope_for(webhook)).unwrap()
    }

    #[test]
    fn a_raw_object_is_spliced_as_the_upstream_wrote_it() {
        let object = r#"{"zeta":1,"alpha":{"y":2,"b":3},"n":1.50,"mid":[]}"#;
        let body = raw_envelope(object, "w");
        assert!(
            body.contains(
                r#""object":{"zeta":1,"alpha":{"y":2,"b":3},"n":1.50,"mid":[],"objectType":"job"}"#
            ),
            "{body}"
        );
        // The same envelope as through a tree, but for the number as written.
        let tree = tree_envelope(object, "w");
        assert_eq!(body.replace("1.50", "1.5"), tree);
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["data"]["object"]["objectType"], "job");
        assert_eq!(parsed["webhookId"], "w");
    }

    #[test]
    fn splicing_keeps_valid_json_for_empty_and_spaced_objects() {
        for object in ["{}", "{ }", "{\n \"a\" : 1 \n}"] {
            let body = raw_envelope(object, "w");
            let parsed: Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(parsed["data"]["object"]["objectType"], "job", "{body}");
        }
    }

    #[test]
    fn an_object_with_its_own_object_type_or_repeated_keys_goes_through_a_tree() {
        for object in [
            r#"{"objectType":"spoofed","id":"j1"}"#,
            r#"{"id":"j1","id":"j2"}"#,
        ] {
            assert_eq!(
                raw_envelope(object, "w"),
                tree_envelope(object, "w"),
                "{object}"
            );
        }
        let body = raw_envelope(r#"{"objectType":"spoofed","id":"j1"}"#, "w");
        assert!(
            body.contains(r#""object":{"objectType":"job","id":"j1"}"#),
            "{body}"
        );
    }
}
