//! Dead letters: what is POSTed to `delivery.deadLetter` when a delivery finally fails.

use super::Delivery;

/// Why a delivery ended up in the dead-letter store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    Exhausted,
    WebhookGone,
    /// Evicted from the outbox because its webhook held more than its fair share.
    OverShare,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Exhausted => "exhausted",
            DeadLetterReason::WebhookGone => "webhook_gone",
            DeadLetterReason::OverShare => "over_share",
        }
    }
}

/// The dead letter's body: the failure facts and the envelope exactly as it was sent to the
/// webhook `webhook_id`.
pub fn dead_letter_body(
    delivery: &Delivery,
    webhook_id: &str,
    reason: DeadLetterReason,
    now_ms: u64,
) -> Vec<u8> {
    let facts = serde_json::json!({
        "reason": reason.as_str(),
        "eventId": &*delivery.event_id,
        "webhookId": webhook_id,
        "attempts": delivery.attempts,
        "lastFailure": delivery.last_failure,
        "createdAt": crate::time::rfc3339_utc(delivery.created_at_ms),
        "failedAt": crate::time::rfc3339_utc(now_ms),
    });
    // The envelope is embedded byte for byte (it is always our own JSON), so the store keeps
    // exactly what was signed.
    let mut body = facts.to_string().into_bytes();
    body.pop();
    body.extend_from_slice(b",\"envelope\":");
    body.extend_from_slice(&delivery.payload.body_for(webhook_id));
    body.push(b'}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{LaneId, Payload};
    use std::rc::Rc;

    #[test]
    fn the_body_holds_the_facts_and_the_envelope_as_sent() {
        let payload = Rc::new(Payload::raw(br#"{"id":"e1","version":1}"#.to_vec()));
        let mut d = Delivery::new("e1".into(), LaneId::Webhook(0), payload, 1_728_086_400_000);
        d.attempts = 4;
        d.last_failure = Some("status 500".into());
        let body = dead_letter_body(&d, "w1", DeadLetterReason::Exhausted, 1_728_086_460_000);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["reason"], "exhausted");
        assert_eq!(v["eventId"], "e1");
        assert_eq!(v["webhookId"], "w1");
        assert_eq!(v["attempts"], 4);
        assert_eq!(v["lastFailure"], "status 500");
        assert_eq!(v["createdAt"], "2024-10-05T00:00:00Z");
        assert_eq!(v["failedAt"], "2024-10-05T00:01:00Z");
        assert_eq!(v["envelope"], serde_json::json!({"id": "e1", "version": 1}));
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.ends_with(r#""envelope":{"id":"e1","version":1}}"#),
            "{text}"
        );
    }
}
