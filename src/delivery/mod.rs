//! Delivery: what happens to an event after fan-out. The nouns: a [`Delivery`] is one event on
//! its way to one lane (a webhook, or the dead-letter store); an attempt is one POST of it; the
//! [`outbox::Outbox`] holds deliveries and decides when each is attempted; the
//! [`policy::RetryPolicy`] says how long to wait after a failure. All of it is pure: the clock
//! (Unix milliseconds) and the randomness (for jitter) are passed in.

pub mod dead_letter;
pub mod outbox;
pub mod policy;
pub mod report;
pub mod send;
pub mod shared;

pub use dead_letter::{dead_letter_body, DeadLetterReason};
pub use outbox::{Bound, CircuitChange, Others, Outbox, OutboxSettings, Refused, Verdict};
pub use policy::RetryPolicy;

use crate::event::Envelope;
use crate::headers;
use std::borrow::Cow;
use std::cell::Cell;
use std::rc::Rc;

/// Where a delivery goes: a webhook (its index in the plan's `webhooks`) or the dead-letter store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LaneId {
    Webhook(usize),
    DeadLetter,
}

/// The bytes a delivery sends, held once however many deliveries share them.
#[derive(Debug, PartialEq, Eq)]
pub struct Payload {
    body: Body,
    /// Deliveries in the outbox's custody that hold this payload: its bytes count while any does.
    holders: Cell<usize>,
    /// The envelope went into a delivery report (each event's once).
    reported: Cell<bool>,
}

#[derive(Debug, PartialEq, Eq)]
enum Body {
    /// An event's envelope; each webhook's body adds its own `webhookId`.
    Event(Envelope),
    /// A body sent as it is (dead letters).
    Raw(Vec<u8>),
    /// A send the registry queued (resend, recover, test): its exact bytes, and what its reports
    /// name.
    Claimed(send::ClaimedBody),
}

impl Payload {
    pub fn event(envelope: Envelope) -> Self {
        Self::of(Body::Event(envelope))
    }

    pub fn raw(bytes: Vec<u8>) -> Self {
        Self::of(Body::Raw(bytes))
    }

    /// A send claimed from the registry.
    pub fn claimed(body: send::ClaimedBody) -> Self {
        Self::of(Body::Claimed(body))
    }

    fn of(body: Body) -> Self {
        Payload {
            body,
            holders: Cell::new(0),
            reported: Cell::new(false),
        }
    }

    /// The claimed send this payload carries, if it is one.
    pub fn claimed_send(&self) -> Option<&send::ClaimedBody> {
        match &self.body {
            Body::Claimed(body) => Some(body),
            _ => None,
        }
    }

    /// The exact body of an attempt for the webhook `webhook_id`.
    pub fn body_for(&self, webhook_id: &str) -> Cow<'_, [u8]> {
        match &self.body {
            Body::Event(envelope) => Cow::Owned(envelope.for_webhook(webhook_id)),
            Body::Raw(bytes) => Cow::Borrowed(bytes),
            Body::Claimed(claimed) => Cow::Borrowed(&claimed.bytes),
        }
    }

    /// The event's envelope (None for a raw body), as the journal records it.
    pub fn envelope(&self) -> Option<&Envelope> {
        match &self.body {
            Body::Event(envelope) => Some(envelope),
            Body::Raw(_) | Body::Claimed(_) => None,
        }
    }

    /// Bytes held for this payload (what `delivery.maxQueuedBytes` bounds).
    pub fn held_bytes(&self) -> usize {
        match &self.body {
            Body::Event(envelope) => envelope.held_bytes(),
            Body::Raw(bytes) => bytes.len(),
            Body::Claimed(claimed) => claimed.bytes.len(),
        }
    }

    /// One more holder; true when it is the first (its bytes start to count).
    fn hold(&self) -> bool {
        self.holders.set(self.holders.get() + 1);
        self.holders.get() == 1
    }

    /// One holder less; true when it was the last (its bytes stop counting).
    fn let_go(&self) -> bool {
        self.holders.set(self.holders.get().saturating_sub(1));
        self.holders.get() == 0
    }

    fn is_held(&self) -> bool {
        self.holders.get() > 0
    }
}

/// One event on its way to one lane. Not `Clone`: a delivery is in the outbox's custody or not,
/// and its payload's bytes count while any delivery in custody holds it.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    pub event_id: Rc<str>,
    pub lane: LaneId,
    pub payload: Rc<Payload>,
    pub attempts: u32,
    pub created_at_ms: u64,
    pub next_attempt_at_ms: u64,
    /// The last failure, for the final log line (`status 503`, `connection reset`, …).
    pub last_failure: Option<String>,
    /// This attempt is the one probe of an open circuit.
    pub is_probe: bool,
    /// When the last attempt was dispatched (Unix ms; 0 before the first).
    pub sent_at_ms: u64,
}

impl Delivery {
    pub fn new(event_id: Rc<str>, lane: LaneId, payload: Rc<Payload>, now_ms: u64) -> Self {
        Delivery {
            event_id,
            lane,
            payload,
            attempts: 0,
            created_at_ms: now_ms,
            next_attempt_at_ms: now_ms,
            last_failure: None,
            is_probe: false,
            sent_at_ms: 0,
        }
    }
}

/// What an attempt came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// An HTTP status; Envoy answers 503 or 504 itself for a refused connection or a timeout.
    Status {
        code: u16,
        /// The raw `Retry-After` value, as bytes: a receiver may send anything.
        retry_after: Option<Vec<u8>>,
    },
    /// No usable answer: a reset, a callout that failed before or instead of its headers, an
    /// answer without a valid `:status`, or a dispatch Envoy refused.
    NoResponse { reason: String },
}

impl AttemptOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, AttemptOutcome::Status { code, .. } if (200..300).contains(code))
    }

    /// The outcome of a callout answer as the host reported it: `header_count` is what Envoy
    /// passed to `on_http_call_response` (0 when the call failed with no headers), `headers` the
    /// answer's header map when it was readable.
    pub fn from_answer(header_count: usize, headers: Option<&[(&[u8], &[u8])]>) -> Self {
        let Some(headers) = headers.filter(|_| header_count > 0) else {
            return AttemptOutcome::NoResponse {
                reason: "connection reset (no answer headers)".into(),
            };
        };
        match headers::first(headers, headers::STATUS).map(headers::parse_status) {
            Some(Some(code)) => AttemptOutcome::Status {
                code,
                retry_after: headers::first(headers, headers::RETRY_AFTER).map(<[u8]>::to_vec),
            },
            Some(None) => AttemptOutcome::NoResponse {
                reason: "answer with an invalid :status".into(),
            },
            None => AttemptOutcome::NoResponse {
                reason: "answer without :status".into(),
            },
        }
    }

    /// A short description for log lines (`status 503`, the reason of a missing answer).
    pub fn describe(&self) -> String {
        match self {
            AttemptOutcome::Status { code, .. } => format!("status {code}"),
            AttemptOutcome::NoResponse { reason } => reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_outcomes_without_trusting_the_host() {
        let ok: Vec<(&[u8], &[u8])> = vec![(b":status", b"503"), (b"retry-after", b"\xff\xfe")];
        assert_eq!(
            AttemptOutcome::from_answer(2, Some(&ok)),
            AttemptOutcome::Status {
                code: 503,
                retry_after: Some(b"\xff\xfe".to_vec())
            }
        );
        // headers == 0: a failed call; whatever the map holds is not read.
        assert!(matches!(
            AttemptOutcome::from_answer(0, Some(&ok)),
            AttemptOutcome::NoResponse { .. }
        ));
        assert!(matches!(
            AttemptOutcome::from_answer(3, None),
            AttemptOutcome::NoResponse { .. }
        ));
        let no_status: Vec<(&[u8], &[u8])> = vec![(b"x", b"y")];
        assert!(matches!(
            AttemptOutcome::from_answer(1, Some(&no_status)),
            AttemptOutcome::NoResponse { reason } if reason.contains("without :status")
        ));
        let bad_status: Vec<(&[u8], &[u8])> = vec![(b":status", b"2\xe90")];
        assert!(matches!(
            AttemptOutcome::from_answer(1, Some(&bad_status)),
            AttemptOutcome::NoResponse { reason } if reason.contains("invalid")
        ));
    }
}
