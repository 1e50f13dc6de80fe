//! Sends the registry queued (resend, recover, test) and proxies claim
//! (`POST /v2/registry/sends/claim`, docs/delivery-reports.md): the claim's request body, and its
//! answer read and checked, send by send. A send becomes a delivery whose body is the exact bytes
//! the registry gave; it is signed at dispatch like any other, with its original event id as
//! `webhook-id`.
//!
//! Pure: the glue (`filter/worker/sends.rs`) sends the request and hands the answer in.

use crate::config::webhook_id_bytes;
use serde_json::Value;

/// A claimed send's body and what its reports name. `organisation` and `event_type` are kept as
/// JSON strings, ready to be copied into a report.
#[derive(Debug, PartialEq, Eq)]
pub struct ClaimedBody {
    pub bytes: Vec<u8>,
    pub send_id: u64,
    pub organisation_json: String,
    pub event_type_json: String,
}

/// One send of a claim's answer.
#[derive(Debug, PartialEq, Eq)]
pub struct ClaimedSend {
    pub send_id: u64,
    /// `resend`, `recover` or `test` (for log lines).
    pub kind: String,
    pub webhook_id: String,
    pub organisation_id: String,
    pub event_id: String,
    pub body: ClaimedBody,
}

/// A send of the answer that cannot be delivered as it is, and why: reported as dropped (with
/// what could be read of it) so that it is not claimed again.
#[derive(Debug, PartialEq, Eq)]
pub struct UnusableSend {
    pub send: ClaimedSend,
    pub why: String,
}

/// A claim's answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClaimAnswer {
    pub sends: Vec<ClaimedSend>,
    pub unusable: Vec<UnusableSend>,
    /// Entries without a usable `sendId`: they can't even be reported.
    pub unreadable: usize,
    pub lease_ms: Option<u64>,
}

/// The claim's request body.
pub fn claim_request(proxy: &str, max: usize) -> Vec<u8> {
    serde_json::json!({ "proxy": proxy, "max": max })
        .to_string()
        .into_bytes()
}

/// Reads a claim's answer. Err when it is not a claim answer at all; otherwise every send is
/// either usable or listed as unusable with the reason.
pub fn read_claim_answer(body: &[u8]) -> Result<ClaimAnswer, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON ({e})"))?;
    let listed = value
        .get("sends")
        .and_then(Value::as_array)
        .ok_or("the answer has no \"sends\" array")?;
    let mut answer = ClaimAnswer {
        lease_ms: value.get("leaseMs").and_then(Value::as_u64),
        ..ClaimAnswer::default()
    };
    for item in listed {
        let Some(send_id) = item.get("sendId").and_then(Value::as_u64) else {
            answer.unreadable += 1;
            continue;
        };
        match read_send(send_id, item) {
            Ok(send) => answer.sends.push(send),
            Err(why) => answer.unusable.push(UnusableSend {
                send: lenient_send(send_id, item),
                why,
            }),
        }
    }
    Ok(answer)
}

fn read_send(send_id: u64, item: &Value) -> Result<ClaimedSend, String> {
    let text = |name: &str| {
        item.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{name} is not a string"))
    };
    let webhook_id = text("webhookId")?;
    if webhook_id_bytes(webhook_id).is_none() {
        return Err("webhookId is not 24 lowercase hex digits".into());
    }
    let event_id = text("eventId")?;
    // The id goes into the webhook-id header as it is: our event ids only.
    if webhook_id_bytes(event_id).is_none() {
        return Err("eventId is not an event id (24 lowercase hex digits)".into());
    }
    let organisation = text("organisationId")?;
    let event_type = text("eventType")?;
    let body = text("body")?;
    let kind = item
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("send")
        .chars()
        .take(32)
        .collect();
    Ok(ClaimedSend {
        send_id,
        kind,
        webhook_id: webhook_id.to_string(),
        organisation_id: organisation.to_string(),
        event_id: event_id.to_string(),
        body: ClaimedBody {
            bytes: body.as_bytes().to_vec(),
            send_id,
            organisation_json: Value::from(organisation).to_string(),
            event_type_json: Value::from(event_type).to_string(),
        },
    })
}

/// What can be read of a send that is not usable, for its report (strings cut to 128
/// characters; no body).
fn lenient_send(send_id: u64, item: &Value) -> ClaimedSend {
    let text = |name: &str| -> String {
        item.get(name)
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(128)
            .collect()
    };
    ClaimedSend {
        send_id,
        kind: text("kind"),
        webhook_id: text("webhookId"),
        organisation_id: text("organisationId"),
        event_id: text("eventId"),
        body: ClaimedBody {
            bytes: Vec::new(),
            send_id,
            organisation_json: Value::from(text("organisationId")).to_string(),
            event_type_json: Value::from(text("eventType")).to_string(),
        },
    }
}

#[cfg(test)]
#[path = "send_tests.rs"]
mod tests;
