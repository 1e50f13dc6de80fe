//! Delivery reports (`POST /v2/registry/reports`, docs/delivery-reports.md): what happened to
//! each attempt, batched for the registry. A batch is serialised as records arrive, so its size
//! in bytes is known exactly and bounded; flushing it is one concatenation.
//!
//! Pure: the glue (`filter/worker/reports.rs`) decides when to flush, sends the batch and counts
//! what is dropped.

use super::{AttemptOutcome, Body, Payload};
use crate::config::webhook_id_bytes;

/// Bytes of a report body kept free of records: `{"proxy":…,"events":[],"attempts":[],
/// "holding":[…]}` with a proxy name and up to [`MAX_HOLDING`] send ids.
pub const RESERVED_BYTES: usize = 8 << 10;
/// Send ids a report lists in `holding` at most (the glue holds no more claimed sends).
pub const MAX_HOLDING: usize = 256;
/// A proxy name longer than this is cut (it goes into every report).
const MAX_PROXY_NAME: usize = 200;
/// Attempts in one report at most (the registry takes up to 4,000).
pub const MAX_ATTEMPTS: usize = 2_000;
/// The registry takes latencies up to a day.
const MAX_LATENCY_MS: u64 = 86_400_000;

/// How an attempt ended, as the report says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Failed, and scheduled again.
    Retrying,
    /// Delivered (final).
    Delivered,
    /// Failed for good: the schedule ended, an answer that is not retried, 410 (final).
    Failed,
    /// Dropped (final), with the reason (`queue_full`, `webhook_gone`, …).
    Dropped(&'a str),
}

impl Outcome<'_> {
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::Retrying)
    }

    fn name(&self) -> &'static str {
        match self {
            Outcome::Retrying => "retrying",
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Dropped(_) => "dropped",
        }
    }
}

/// One attempt (or final outcome) of one delivery.
#[derive(Debug)]
pub struct AttemptReport<'a> {
    pub event_id: &'a str,
    pub webhook_id: &'a str,
    pub payload: &'a Payload,
    /// The attempt's number (1 for the first); 0 for a delivery dropped before it ever left.
    pub attempt: u32,
    pub at_ms: u64,
    /// When the event was made (the event record's `createdAt`).
    pub created_at_ms: u64,
    /// The attempt's answer; None for a drop that did not come from an answer.
    pub answer: Option<&'a AttemptOutcome>,
    pub latency_ms: Option<u64>,
    pub outcome: Outcome<'a>,
}

/// The error class of an attempt without an HTTP status.
pub fn error_class(outcome: &AttemptOutcome) -> Option<&'static str> {
    match outcome {
        AttemptOutcome::Status { .. } => None,
        AttemptOutcome::NoResponse { reason } if reason.starts_with("dispatch refused") => {
            Some("refused")
        }
        AttemptOutcome::NoResponse { reason } if reason.contains("reset") => Some("reset"),
        AttemptOutcome::NoResponse { reason } if reason.contains("timeout") => Some("timeout"),
        AttemptOutcome::NoResponse { reason } if reason.contains("connect") => Some("connect"),
        AttemptOutcome::NoResponse { .. } => Some("reset"),
    }
}

/// Why a record was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Added,
    /// The batch has no room left for it: flush, then add it to a new batch.
    Full,
    /// Not reported: a dead letter, or a body this report does not know.
    NotReported,
}

/// One batch of records, serialised as they arrive.
#[derive(Debug)]
pub struct ReportBatch {
    /// Event objects, comma-separated.
    events: Vec<u8>,
    /// Attempt objects, comma-separated.
    attempts: Vec<u8>,
    records: usize,
    attempts_count: usize,
    /// Records (events and attempts) take at most this many bytes.
    room: usize,
    /// Envelopes longer than this are left out (`delivery.maxBodyBytes`).
    max_envelope_bytes: usize,
    /// When the first record arrived.
    opened_ms: Option<u64>,
    /// Sends whose final attempt this batch carries.
    finished_sends: Vec<u64>,
}

impl ReportBatch {
    /// A batch for a body of at most `max_bytes`.
    pub fn new(max_bytes: usize, max_envelope_bytes: usize) -> Self {
        ReportBatch {
            events: Vec::new(),
            attempts: Vec::new(),
            records: 0,
            attempts_count: 0,
            room: max_bytes.saturating_sub(RESERVED_BYTES).max(1024),
            max_envelope_bytes,
            opened_ms: None,
            finished_sends: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Attempts and events in the batch.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Bytes of the records.
    pub fn bytes(&self) -> usize {
        self.events.len() + self.attempts.len()
    }

    /// When the first record arrived.
    pub fn opened_ms(&self) -> Option<u64> {
        self.opened_ms
    }

    /// Sends whose final attempt this batch carries.
    pub fn finished_sends(&self) -> &[u64] {
        &self.finished_sends
    }

    /// Adds one attempt, and its event's envelope when no earlier report had it.
    pub fn push(&mut self, report: &AttemptReport<'_>) -> Push {
        // The registry refuses a whole report for one bad record: ids it can't take stay out.
        let ids_ok = webhook_id_bytes(report.event_id).is_some()
            && webhook_id_bytes(report.webhook_id).is_some();
        let Some(fields) = report_fields(report.payload)
            .filter(|f| ids_ok && is_registry_organisation(f.organisation))
        else {
            return Push::NotReported;
        };
        if self.attempts_count >= MAX_ATTEMPTS {
            return Push::Full;
        }
        let (events_len, attempts_len) = (self.events.len(), self.attempts.len());
        let send_id = report.payload.claimed_send().map(|c| c.send_id);
        let with_event = send_id.is_none() && !report.payload.reported.get();
        if with_event {
            self.write_event(report, &fields);
        }
        self.write_attempt(report, &fields, send_id);
        if self.bytes() > self.room {
            self.events.truncate(events_len);
            self.attempts.truncate(attempts_len);
            if self.records > 0 {
                return Push::Full;
            }
            // Alone in an empty batch and still too large: only the envelope can be, so it
            // goes without.
            if with_event {
                self.write_event_without_envelope(report, &fields);
            }
            self.write_attempt(report, &fields, send_id);
        }
        if with_event {
            report.payload.reported.set(true);
            self.records += 1;
        }
        self.records += 1;
        self.attempts_count += 1;
        self.opened_ms.get_or_insert(report.at_ms);
        if let (Some(id), true) = (send_id, report.outcome.is_final()) {
            self.finished_sends.push(id);
        }
        Push::Added
    }

    fn event_head(&mut self, report: &AttemptReport<'_>, fields: &Fields<'_>) {
        if !self.events.is_empty() {
            self.events.push(b',');
        }
        let out = &mut self.events;
        out.extend_from_slice(b"{\"eventId\":");
        json_string(out, report.event_id);
        out.extend_from_slice(b",\"organisationId\":");
        out.extend_from_slice(fields.organisation.as_bytes());
        out.extend_from_slice(b",\"eventType\":");
        out.extend_from_slice(fields.event_type.as_bytes());
        out.extend_from_slice(b",\"createdAt\":");
        number(out, report.created_at_ms);
        out.extend_from_slice(b",\"envelope\":");
    }

    fn write_event(&mut self, report: &AttemptReport<'_>, fields: &Fields<'_>) {
        let Body::Event(envelope) = &report.payload.body else {
            return;
        };
        if envelope.held_bytes() > self.max_envelope_bytes {
            return self.write_event_without_envelope(report, fields);
        }
        self.event_head(report, fields);
        let (head, tail) = envelope.parts();
        self.events.push(b'[');
        json_string(&mut self.events, head);
        self.events.push(b',');
        json_string(&mut self.events, tail);
        self.events.extend_from_slice(b"]}");
    }

    fn write_event_without_envelope(&mut self, report: &AttemptReport<'_>, fields: &Fields<'_>) {
        self.event_head(report, fields);
        self.events.extend_from_slice(b"null}");
    }

    fn write_attempt(
        &mut self,
        report: &AttemptReport<'_>,
        fields: &Fields<'_>,
        send_id: Option<u64>,
    ) {
        let out = &mut self.attempts;
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"eventId\":");
        json_string(out, report.event_id);
        out.extend_from_slice(b",\"webhookId\":");
        json_string(out, report.webhook_id);
        out.extend_from_slice(b",\"organisationId\":");
        out.extend_from_slice(fields.organisation.as_bytes());
        out.extend_from_slice(b",\"eventType\":");
        out.extend_from_slice(fields.event_type.as_bytes());
        out.extend_from_slice(b",\"attempt\":");
        number(out, u64::from(report.attempt));
        out.extend_from_slice(b",\"at\":");
        number(out, report.at_ms);
        match report.answer {
            Some(AttemptOutcome::Status { code, .. }) => {
                out.extend_from_slice(b",\"status\":");
                number(out, u64::from(*code));
            }
            Some(other) => {
                if let Some(class) = error_class(other) {
                    out.extend_from_slice(b",\"error\":\"");
                    out.extend_from_slice(class.as_bytes());
                    out.push(b'"');
                }
            }
            None => {}
        }
        if let Some(latency) = report.latency_ms {
            out.extend_from_slice(b",\"latencyMs\":");
            number(out, latency.min(MAX_LATENCY_MS));
        }
        out.extend_from_slice(b",\"outcome\":\"");
        out.extend_from_slice(report.outcome.name().as_bytes());
        out.push(b'"');
        if let Outcome::Dropped(reason) = report.outcome {
            out.extend_from_slice(b",\"reason\":");
            json_string(out, reason);
        }
        if let Some(id) = send_id {
            out.extend_from_slice(b",\"sendId\":");
            number(out, id);
        }
        out.push(b'}');
    }

    /// The report's body: this batch, from `proxy`, renewing the leases of `holding` (at most
    /// [`MAX_HOLDING`] of them are listed).
    pub fn into_body(self, proxy: &str, holding: &[u64]) -> Vec<u8> {
        let proxy: String = proxy.chars().take(MAX_PROXY_NAME).collect();
        let mut body = Vec::with_capacity(self.bytes() + 64 + proxy.len() + holding.len() * 12);
        body.extend_from_slice(b"{\"proxy\":");
        json_string(&mut body, &proxy);
        body.extend_from_slice(b",\"events\":[");
        body.extend_from_slice(&self.events);
        body.extend_from_slice(b"],\"attempts\":[");
        body.extend_from_slice(&self.attempts);
        body.extend_from_slice(b"],\"holding\":[");
        for (i, id) in holding.iter().take(MAX_HOLDING).enumerate() {
            if i > 0 {
                body.push(b',');
            }
            number(&mut body, *id);
        }
        body.extend_from_slice(b"]}");
        body
    }
}

/// An event's organisation and type as JSON strings, copied from the envelope (or the claimed
/// send) without parsing the rest of it.
struct Fields<'a> {
    organisation: &'a str,
    event_type: &'a str,
}

fn report_fields(payload: &Payload) -> Option<Fields<'_>> {
    match &payload.body {
        Body::Event(envelope) => {
            let (_, tail) = envelope.parts();
            let (organisation, rest) = json_string_after(tail, ",\"organisationId\":")?;
            let (event_type, _) = json_string_after(rest, ",\"eventType\":")?;
            Some(Fields {
                organisation,
                event_type,
            })
        }
        Body::Claimed(claimed) => Some(Fields {
            organisation: &claimed.organisation_json,
            event_type: &claimed.event_type_json,
        }),
        Body::Raw(_) => None,
    }
}

/// An organisation id the registry takes (1 to 128 characters, no control character), given as a JSON
/// string. Ids of 128 bytes or fewer without an escape are read as they are; others are decoded.
fn is_registry_organisation(json: &str) -> bool {
    if json.len() <= 130 && !json.contains('\\') {
        return json.len() > 2;
    }
    let decoded = serde_json::from_str::<serde_json::Value>(json);
    decoded
        .ok()
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .is_some_and(|id| {
            (1..=128).contains(&id.chars().count()) && !id.chars().any(char::is_control)
        })
}

/// `text` starts with `key` followed by a JSON string: that string (quotes and escapes as they
/// are) and what follows it.
fn json_string_after<'t>(text: &'t str, key: &str) -> Option<(&'t str, &'t str)> {
    let rest = text.strip_prefix(key)?;
    let bytes = rest.as_bytes();
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some((rest.get(..=i)?, rest.get(i + 1..)?)),
            _ => i += 1,
        }
    }
    None
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(out, s);
}

/// Writes a number in decimal (cheaper than the formatting machinery, on every record).
fn number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
