//! A journal record: one event and what is still owed to its webhooks. It holds the envelope (the
//! body without the webhook id), the event id (the `webhook-id` every attempt carries), and per
//! pending webhook the attempts made and the next attempt time. Never an API key: a claimed
//! record is signed afresh with the key of the claiming proxy's configuration.

use crate::event::Envelope;
use serde_json::{Map, Value};

/// The record format's version, so that a later one can be told apart.
pub const RECORD_VERSION: u64 = 1;

/// What is owed to one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWebhook {
    pub webhook_id: String,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_at_ms: u64,
}

/// A record as read back from etcd.
#[derive(Debug, PartialEq, Eq)]
pub struct Record {
    pub event_id: String,
    pub created_at_ms: u64,
    pub envelope: Envelope,
    pub pending: Vec<PendingWebhook>,
}

/// An event id or webhook id as the filter makes them: lowercase hex. Anything else in a record
/// is refused, since it goes into a header and into log lines.
fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The record's bytes: JSON, written straight out (a record is written for most events under
/// load, so no JSON tree is built for it).
pub fn encode(
    event_id: &str,
    created_at_ms: u64,
    envelope: &Envelope,
    pending: &[PendingWebhook],
) -> Vec<u8> {
    let (head, tail) = envelope.parts();
    let mut out = Vec::with_capacity(head.len() + tail.len() + 160 + pending.len() * 96);
    out.extend_from_slice(format!("{{\"version\":{RECORD_VERSION},\"eventId\":").as_bytes());
    string(&mut out, event_id);
    out.extend_from_slice(
        format!(",\"createdAtMs\":{created_at_ms},\"envelope\":{{\"head\":").as_bytes(),
    );
    string(&mut out, head);
    out.extend_from_slice(b",\"tail\":");
    string(&mut out, tail);
    out.extend_from_slice(b"},\"pending\":[");
    for (i, p) in pending.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"webhookId\":");
        string(&mut out, &p.webhook_id);
        out.extend_from_slice(
            format!(
                ",\"attempts\":{},\"nextAttemptAtMs\":{}}}",
                p.attempts, p.next_attempt_at_ms
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"]}");
    out
}

/// `s` as a JSON string, escaped.
fn string(out: &mut Vec<u8>, s: &str) {
    // Writing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A record from its bytes, or why not. The bytes may come from anywhere.
pub fn decode(bytes: &[u8]) -> Result<Record, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|_| "not JSON".to_string())?;
    let Value::Object(map) = value else {
        return Err("not a JSON object".into());
    };
    if map.get("version").and_then(Value::as_u64) != Some(RECORD_VERSION) {
        return Err("unknown version".into());
    }
    let text = |m: &Map<String, Value>, name: &str| -> Result<String, String> {
        m.get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("{name} missing"))
    };
    let event_id = text(&map, "eventId")?;
    if !is_id(&event_id) {
        return Err("eventId is not an id".into());
    }
    let created_at_ms = map
        .get("createdAtMs")
        .and_then(Value::as_u64)
        .ok_or("createdAtMs missing")?;
    let Some(Value::Object(envelope)) = map.get("envelope") else {
        return Err("envelope missing".into());
    };
    let envelope = Envelope::from_parts(text(envelope, "head")?, text(envelope, "tail")?)
        .ok_or("envelope is not a JSON object")?;
    let Some(Value::Array(items)) = map.get("pending") else {
        return Err("pending missing".into());
    };
    let mut pending = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(p) = item else {
            return Err("pending holds something that is not an object".into());
        };
        let webhook_id = text(p, "webhookId")?;
        if !is_id(&webhook_id) {
            return Err("webhookId is not an id".into());
        }
        let attempts = p
            .get("attempts")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("attempts missing")?;
        let next_attempt_at_ms = p
            .get("nextAttemptAtMs")
            .and_then(Value::as_u64)
            .ok_or("nextAttemptAtMs missing")?;
        pending.push(PendingWebhook {
            webhook_id,
            attempts,
            next_attempt_at_ms,
        });
    }
    Ok(Record {
        event_id,
        created_at_ms,
        envelope,
        pending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventId};
    use serde_json::json;

    fn event() -> Event {
        let mut object = Map::new();
        object.insert("id".into(), "job-1".into());
        Event::new(
            EventId::new(1_700_000_000, [1; 8]),
            "job.completed",
            "job",
            "657bf08c202997ba9d127922",
            crate::json::Object::Tree(&object),
            1_700_000_000_123,
        )
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let e = event();
        let pending = vec![
            PendingWebhook {
                webhook_id: "66b2e3ddb97f60b5270d5ce9".into(),
                attempts: 0,
                next_attempt_at_ms: 5,
            },
            PendingWebhook {
                webhook_id: "66b2e3ddb97f60b5270d5cea".into(),
                attempts: 3,
                next_attempt_at_ms: 1_700_000_030_000,
            },
        ];
        let bytes = encode(&e.id_hex, e.created_at_ms, &e.envelope, &pending);
        // Written straight out, it is the JSON document a tree would make, byte for byte.
        let (head, tail) = e.envelope.parts();
        let tree = json!({
            "version": RECORD_VERSION,
            "eventId": e.id_hex,
            "createdAtMs": e.created_at_ms,
            "envelope": { "head": head, "tail": tail },
            "pending": pending.iter().map(|p| json!({
                "webhookId": p.webhook_id,
                "attempts": p.attempts,
                "nextAttemptAtMs": p.next_attempt_at_ms,
            })).collect::<Vec<Value>>(),
        });
        assert_eq!(String::from_utf8_lossy(&bytes), tree.to_string());
        let record = decode(&bytes).expect("decodes");
        assert_eq!(record.event_id, e.id_hex);
        assert_eq!(record.created_at_ms, e.created_at_ms);
        assert_eq!(record.pending, pending);
        // The body each webhook gets is the same as before the round trip.
        assert_eq!(
            record.envelope.for_webhook("66b2e3ddb97f60b5270d5ce9"),
            e.envelope_for("66b2e3ddb97f60b5270d5ce9")
        );
    }

    #[test]
    fn a_record_never_holds_a_key() {
        let e = event();
        let bytes = encode(&e.id_hex, 0, &e.envelope, &[]);
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(!text.contains("whsec_"));
        assert!(!text.to_lowercase().contains("apikey"));
    }

    #[test]
    fn hostile_records_are_refused() {
        let e = event();
        let good: Value =
            serde_json::from_slice(&encode(&e.id_hex, 0, &e.envelope, &[])).expect("json");
        let with = |path: &[&str], v: Value| {
            let mut doc = good.clone();
            let mut at = &mut doc;
            for p in &path[..path.len() - 1] {
                at = at.get_mut(*p).expect("path");
            }
            at[path[path.len() - 1]] = v;
            doc.to_string().into_bytes()
        };
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\xff\x00".to_vec(),
            b"[]".to_vec(),
            with(&["version"], json!(2)),
            with(&["eventId"], json!("not-hex\r\nx: y")),
            with(&["eventId"], json!("")),
            with(&["createdAtMs"], json!(-1)),
            with(&["envelope", "head"], json!("[")),
            with(&["envelope", "tail"], json!("]")),
            with(&["pending"], json!({})),
            with(&["pending"], json!([1])),
            with(
                &["pending"],
                json!([{"webhookId": "zz", "attempts": 1, "nextAttemptAtMs": 1}]),
            ),
            with(
                &["pending"],
                json!([{"webhookId": "ab", "attempts": 5_000_000_000u64, "nextAttemptAtMs": 1}]),
            ),
            with(&["pending"], json!([{"webhookId": "ab", "attempts": 1}])),
        ];
        for case in cases {
            assert!(decode(&case).is_err(), "{}", String::from_utf8_lossy(&case));
        }
    }
}
