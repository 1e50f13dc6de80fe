//! Claim answers read send by send, whatever the registry (or anyone in its place) answers.

use super::*;
use serde_json::json;

const WEBHOOK: &str = "65b2f0c1a4e5d6f7a8b9c0d1";

fn send(id: u64) -> Value {
    json!({"sendId": id, "kind": "resend", "webhookId": WEBHOOK, "organisationId": "o1",
           "eventId": "6571a0b2c3d4e5f6a7b8c9d0", "eventType": "job.completed",
           "body": "{\"id\":\"6571a0b2c3d4e5f6a7b8c9d0\",\"x\":\"é\"}"})
}

#[test]
fn a_claim_answer_becomes_sends_with_their_exact_bytes() {
    let body = json!({"sends": [send(42)], "leaseMs": 60000}).to_string();
    let answer = read_claim_answer(body.as_bytes()).unwrap();
    assert_eq!(answer.lease_ms, Some(60_000));
    assert_eq!(answer.sends.len(), 1);
    let s = &answer.sends[0];
    assert_eq!(s.send_id, 42);
    assert_eq!(s.kind, "resend");
    assert_eq!(s.webhook_id, WEBHOOK);
    assert_eq!(s.organisation_id, "o1");
    assert_eq!(
        s.body.bytes,
        "{\"id\":\"6571a0b2c3d4e5f6a7b8c9d0\",\"x\":\"é\"}".as_bytes()
    );
    assert_eq!(s.body.organisation_json, "\"o1\"");
    assert_eq!(s.body.event_type_json, "\"job.completed\"");
    let request: Value = serde_json::from_slice(&claim_request("n/w", 16)).unwrap();
    assert_eq!(request, json!({"proxy": "n/w", "max": 16}));
}

#[test]
fn a_send_that_cannot_be_delivered_is_named_with_its_reason() {
    let mut header_breaking = send(2);
    header_breaking["eventId"] = json!("abc\r\nx-evil: 1");
    let mut bad_webhook = send(3);
    bad_webhook["webhookId"] = json!("../../etc");
    let mut no_body = send(4);
    no_body.as_object_mut().unwrap().remove("body");
    let body =
        json!({"sends": [send(1), header_breaking, bad_webhook, no_body, {"sendId": "x"}, 7]})
            .to_string();
    let answer = read_claim_answer(body.as_bytes()).unwrap();
    assert_eq!(answer.sends.len(), 1);
    assert_eq!(answer.unreadable, 2);
    let why: Vec<(u64, &str)> = answer
        .unusable
        .iter()
        .map(|u| (u.send.send_id, u.why.as_str()))
        .collect();
    assert_eq!(
        why,
        vec![
            (2, "eventId is not an event id (24 lowercase hex digits)"),
            (3, "webhookId is not 24 lowercase hex digits"),
            (4, "body is not a string"),
        ]
    );
    assert!(answer.unusable[0].send.body.bytes.is_empty());
}

#[test]
fn an_answer_that_is_not_a_claim_answer_is_an_error() {
    assert!(read_claim_answer(b"\xff\xfe").is_err());
    assert!(read_claim_answer(b"{\"sends\": {}}").is_err());
    assert!(read_claim_answer(b"[]").is_err());
    let empty = read_claim_answer(b"{\"sends\": []}").unwrap();
    assert!(empty.sends.is_empty() && empty.lease_ms.is_none());
}
