//! Report batches: their JSON as the registry reads it, each envelope once, the byte bound.

use super::*;
use crate::delivery::send::ClaimedBody;
use crate::event::{Envelope, Event, EventId};
use crate::json::Object;
use serde_json::{json, Value};

const WEBHOOK: &str = "65b2f0c1a4e5d6f7a8b9c0d1";
const SEND_EVENT: &str = "6571a0b2c3d4e5f6a7b8c9d0";

fn event(org: &str, object: &str) -> Event {
    let map: serde_json::Map<String, Value> = serde_json::from_str(object).expect("a JSON object");
    Event::new(
        EventId::new(1_767_312_000, [7; 8]),
        "job.completed",
        "job",
        org,
        Object::Tree(&map),
        1_767_312_000_123,
    )
}

fn payload_of(e: &Event) -> Payload {
    let (head, tail) = e.envelope.parts();
    Payload::event(Envelope::from_parts(head.into(), tail.into()).expect("our envelope"))
}

fn attempt<'a>(
    payload: &'a Payload,
    event_id: &'a str,
    answer: Option<&'a AttemptOutcome>,
    outcome: Outcome<'a>,
) -> AttemptReport<'a> {
    AttemptReport {
        event_id,
        webhook_id: WEBHOOK,
        payload,
        attempt: 1,
        at_ms: 1_767_312_000_130,
        created_at_ms: 1_767_312_000_123,
        answer,
        latency_ms: answer.map(|_| 12),
        outcome,
    }
}

fn body(batch: ReportBatch, holding: &[u64]) -> Value {
    serde_json::from_slice(&batch.into_body("node-1/ab12", holding)).expect("a report is JSON")
}

#[test]
fn a_report_carries_the_attempt_and_the_envelope_once() {
    let e = event("org\"\\é", r#"{"id":"j1","note":"é \" \\"}"#);
    let payload = payload_of(&e);
    let mut batch = ReportBatch::new(1 << 20, 1 << 20);
    let failed = AttemptOutcome::Status {
        code: 503,
        retry_after: None,
    };
    let ok = AttemptOutcome::Status {
        code: 204,
        retry_after: None,
    };
    assert_eq!(
        batch.push(&attempt(
            &payload,
            &e.id_hex,
            Some(&failed),
            Outcome::Retrying
        )),
        Push::Added
    );
    assert_eq!(
        batch.push(&attempt(&payload, &e.id_hex, Some(&ok), Outcome::Delivered)),
        Push::Added
    );
    assert_eq!(batch.records(), 3);
    assert!(batch.finished_sends().is_empty());
    let v = body(batch, &[43, 44]);
    assert_eq!(v["proxy"], "node-1/ab12");
    assert_eq!(v["holding"], json!([43, 44]));
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "the envelope goes once");
    assert_eq!(events[0]["eventId"], e.id_hex.as_str());
    assert_eq!(events[0]["organisationId"], "org\"\\é");
    assert_eq!(events[0]["eventType"], "job.completed");
    assert_eq!(events[0]["createdAt"], 1_767_312_000_123u64);
    // The body sent to W is envelope[0] + JSON-string(W) + envelope[1].
    let parts = events[0]["envelope"].as_array().unwrap();
    let rebuilt = format!(
        "{}{}{}",
        parts[0].as_str().unwrap(),
        Value::from(WEBHOOK),
        parts[1].as_str().unwrap()
    );
    assert_eq!(
        rebuilt.as_bytes(),
        e.envelope.for_webhook(WEBHOOK).as_slice()
    );
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(
        attempts[0],
        json!({"eventId": e.id_hex, "webhookId": WEBHOOK, "organisationId": "org\"\\é",
               "eventType": "job.completed", "attempt": 1, "at": 1_767_312_000_130u64,
               "status": 503, "latencyMs": 12, "outcome": "retrying"})
    );
    assert_eq!(attempts[1]["outcome"], "delivered");
    assert_eq!(attempts[1]["status"], 204);

    // The next batch does not carry the envelope again.
    let mut next = ReportBatch::new(1 << 20, 1 << 20);
    next.push(&attempt(&payload, &e.id_hex, Some(&ok), Outcome::Delivered));
    assert_eq!(body(next, &[])["events"], json!([]));
}

#[test]
fn errors_drops_and_sends_are_reported_as_the_contract_says() {
    let e = event("o1", r#"{"id":"j1"}"#);
    let payload = payload_of(&e);
    let mut batch = ReportBatch::new(1 << 20, 1 << 20);
    let reset = AttemptOutcome::NoResponse {
        reason: "connection reset (no answer headers)".into(),
    };
    let refused = AttemptOutcome::NoResponse {
        reason: "dispatch refused: cluster \"x\" is not defined".into(),
    };
    batch.push(&attempt(&payload, &e.id_hex, Some(&reset), Outcome::Failed));
    batch.push(&attempt(
        &payload,
        &e.id_hex,
        Some(&refused),
        Outcome::Retrying,
    ));
    let mut dropped = attempt(&payload, &e.id_hex, None, Outcome::Dropped("queue_full"));
    dropped.attempt = 0;
    batch.push(&dropped);
    let send = Payload::claimed(ClaimedBody {
        bytes: b"{\"id\":\"x\"}".to_vec(),
        send_id: 42,
        organisation_json: "\"o1\"".into(),
        event_type_json: "\"job.completed\"".into(),
    });
    let ok = AttemptOutcome::Status {
        code: 200,
        retry_after: None,
    };
    batch.push(&attempt(&send, SEND_EVENT, Some(&ok), Outcome::Delivered));
    assert_eq!(batch.finished_sends(), &[42]);
    let v = body(batch, &[]);
    let a = v["attempts"].as_array().unwrap();
    assert_eq!(a[0]["error"], "reset");
    assert_eq!(a[0]["outcome"], "failed");
    assert!(a[0].get("status").is_none());
    assert_eq!(a[1]["error"], "refused");
    assert_eq!(a[2]["outcome"], "dropped");
    assert_eq!(a[2]["reason"], "queue_full");
    assert_eq!(a[2]["attempt"], 0);
    assert!(a[2].get("latencyMs").is_none());
    assert_eq!(a[3]["sendId"], 42);
    assert_eq!(a[3]["eventId"], SEND_EVENT);
    assert_eq!(a[3]["organisationId"], "o1");
    // A send's envelope is the registry's already: no event record for it.
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
}

#[test]
fn a_batch_stays_within_its_bytes_and_says_when_it_is_full() {
    let max = 32 << 10;
    let mut batch = ReportBatch::new(max, 1 << 20);
    let events: Vec<(Event, Payload)> = (0..400)
        .map(|i| {
            let e = event(
                "o1",
                &format!(r#"{{"id":"j{i}","pad":"{}"}}"#, "x".repeat(200)),
            );
            let p = payload_of(&e);
            (e, p)
        })
        .collect();
    let ok = AttemptOutcome::Status {
        code: 204,
        retry_after: None,
    };
    let mut full_at = None;
    for (i, (e, p)) in events.iter().enumerate() {
        if batch.push(&attempt(p, &e.id_hex, Some(&ok), Outcome::Delivered)) == Push::Full {
            full_at = Some(i);
            break;
        }
    }
    let i = full_at.expect("the batch fills up");
    assert!(i > 10);
    // The refused record's envelope is still to be reported.
    assert!(!events[i].1.reported.get());
    let bytes = batch.into_body("p", &(0..MAX_HOLDING as u64).collect::<Vec<_>>());
    assert!(bytes.len() <= max, "{} > {max}", bytes.len());
}

#[test]
fn an_envelope_too_large_goes_as_null() {
    let e = event("o1", &format!(r#"{{"pad":"{}"}}"#, "\\u0001".repeat(4000)));
    let payload = payload_of(&e);
    let ok = AttemptOutcome::Status {
        code: 204,
        retry_after: None,
    };
    // Over maxBodyBytes.
    let mut batch = ReportBatch::new(1 << 20, 1000);
    batch.push(&attempt(&payload, &e.id_hex, Some(&ok), Outcome::Delivered));
    assert_eq!(body(batch, &[])["events"][0]["envelope"], Value::Null);
    // Within maxBodyBytes, but escaped (\u0001 is 6 bytes) larger than an empty batch.
    let payload = payload_of(&e);
    let mut batch = ReportBatch::new(16 << 10, 1 << 20);
    assert_eq!(
        batch.push(&attempt(&payload, &e.id_hex, Some(&ok), Outcome::Delivered)),
        Push::Added
    );
    let v = body(batch, &[]);
    assert_eq!(v["events"][0]["envelope"], Value::Null);
    assert_eq!(v["attempts"][0]["outcome"], "delivered");
}

#[test]
fn dead_letters_are_not_reported() {
    let payload = Payload::raw(b"{}".to_vec());
    let mut batch = ReportBatch::new(1 << 20, 1 << 20);
    assert_eq!(
        batch.push(&attempt(&payload, SEND_EVENT, None, Outcome::Failed)),
        Push::NotReported
    );
    assert!(batch.is_empty());
}

#[test]
fn a_record_the_registry_would_refuse_stays_out_and_the_batch_keeps_the_rest() {
    let send = Payload::claimed(ClaimedBody {
        bytes: Vec::new(),
        send_id: 7,
        organisation_json: "\"o1\"".into(),
        event_type_json: "\"job.completed\"".into(),
    });
    let mut batch = ReportBatch::new(1 << 20, 1 << 20);
    for bad in ["a\r\nb", "", "6571A0B2C3D4E5F6A7B8C9D0"] {
        let r = attempt(&send, bad, None, Outcome::Dropped("invalid_send"));
        assert_eq!(batch.push(&r), Push::NotReported);
    }
    let mut bad_webhook = attempt(&send, SEND_EVENT, None, Outcome::Dropped("invalid_send"));
    bad_webhook.webhook_id = "../x";
    assert_eq!(batch.push(&bad_webhook), Push::NotReported);
    assert_eq!(
        batch.push(&attempt(
            &send,
            SEND_EVENT,
            None,
            Outcome::Dropped("invalid_send")
        )),
        Push::Added
    );
    assert_eq!(batch.records(), 1);
}

#[test]
fn a_batch_holds_at_most_max_attempts() {
    let send = Payload::claimed(ClaimedBody {
        bytes: Vec::new(),
        send_id: 7,
        organisation_json: "\"o\"".into(),
        event_type_json: "\"job.completed\"".into(),
    });
    let mut batch = ReportBatch::new(1 << 20, 1 << 20);
    let r = attempt(&send, SEND_EVENT, None, Outcome::Retrying);
    for _ in 0..MAX_ATTEMPTS {
        assert_eq!(batch.push(&r), Push::Added);
    }
    assert_eq!(batch.push(&r), Push::Full);
}

#[test]
fn the_fields_are_read_from_any_envelope_of_ours() {
    assert_eq!(
        json_string_after(r#","k":"a\"b\\",rest"#, r#","k":"#),
        Some((r#""a\"b\\""#, ",rest"))
    );
    assert_eq!(json_string_after(r#","k":"open"#, r#","k":"#), None);
    assert_eq!(json_string_after(r#","k":null"#, r#","k":"#), None);
    assert_eq!(json_string_after(r#","k":"\"#, r#","k":"#), None);
}

#[test]
fn an_organisation_the_registry_would_refuse_keeps_its_records_out() {
    assert!(is_registry_organisation("\"o\""));
    assert!(is_registry_organisation(
        &Value::from("é\"".repeat(64)).to_string()
    ));
    assert!(!is_registry_organisation("\"\""));
    assert!(!is_registry_organisation(
        &Value::from("x".repeat(129)).to_string()
    ));
    assert!(!is_registry_organisation(&Value::from("a\nb").to_string()));
    let e = event(&"o".repeat(200), r#"{"id":"j1"}"#);
    let payload = payload_of(&e);
    let mut batch = ReportBatch::new(1 << 20, 1 << 20);
    assert_eq!(
        batch.push(&attempt(
            &payload,
            &e.id_hex,
            None,
            Outcome::Dropped("queue_full")
        )),
        Push::NotReported
    );
}
