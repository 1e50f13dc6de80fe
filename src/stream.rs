//! The per-stream pipeline: what the filter does with one HTTP stream, from the request headers
//! to the events its response makes. Pure: the glue hands it what Envoy shows (header maps as
//! bytes, body chunks) and turns what comes back into log lines, metrics and fan-out.
//!
//! A stream no rule can match stops at the request headers; a candidate's body is copied, never
//! held, so the client's answer is never paused or changed.

use crate::body::{BodyBuffer, BodyError, Encoding};
use crate::config::Plan;
use crate::event::{Event, EventId};
use crate::headers::{self, Pairs};
use crate::json;
use crate::path::{self, BadPath};
use crate::rules::{Evaluation, RequestFacts};

#[derive(Debug, Default)]
enum State {
    /// No rule can match this stream: nothing more is done.
    #[default]
    Ignored,
    /// Rules (by index) that matched the request, with the facts each needs.
    Candidate {
        rules: Vec<(usize, RequestFacts)>,
        request: RequestLine,
    },
    /// The status matched too: the body is being copied.
    Collecting {
        rules: Vec<(usize, RequestFacts)>,
        request: RequestLine,
        body: BodyBuffer,
        encoding: Encoding,
    },
    /// The request matched, the status did not: no event, reported once when the stream ends.
    StatusNotMatched(NoEvent),
}

/// What a candidate's request said, kept for a stream that ends early (its log line, its
/// refetch).
#[derive(Debug, Clone, Default)]
struct RequestLine {
    path: String,
    authority: String,
}

/// One matched rule of a candidate stream that ended before its response was complete.
#[derive(Debug, Clone)]
pub struct Cut {
    pub rule: usize,
    pub facts: RequestFacts,
    /// The request's `:path` and `:authority` (the authority only when a matched rule has
    /// `refetch`: empty otherwise).
    pub path: String,
    pub authority: String,
    /// Whether the response headers (with a status the rule matches) had come.
    pub response_started: bool,
}

/// Why a candidate response made no event (each is logged and counted by the glue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoEvent {
    /// Over `delivery.maxBodyBytes`, as received or once decoded.
    BodyTooLarge {
        limit: usize,
    },
    BodyUndecodable(String),
    BodyNotJson(String),
    NoOrganisation {
        event_type: String,
    },
    OrganisationNotUtf8 {
        event_type: String,
        preview: String,
    },
    OrganisationRepeated {
        event_type: String,
    },
    BadObject {
        event_type: String,
        pointer: String,
    },
    /// The request matched a rule, the response's status did not (or it had no valid status):
    /// not a completion, so no loss.
    StatusNotMatched {
        status: Option<u16>,
        path: String,
    },
    /// The status matched, the body did not meet the rule's `when`: not a completion either.
    ConditionsNotMet {
        event_type: String,
    },
}

/// A request that some rule's method takes, whose `:path` has no canonical form: no rule can
/// match it, and the glue counts it under its reason and logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusablePath {
    pub why: BadPath,
    pub method: String,
    /// The path before its query: as text, or as hex when it is not UTF-8; shortened.
    pub preview: String,
}

impl UnusablePath {
    fn new(why: BadPath, method: &str, raw: &[u8]) -> Self {
        let path = path::without_query(raw);
        let preview = match std::str::from_utf8(path) {
            Ok(text) if text.chars().count() > 80 => {
                format!("{:?}…", text.chars().take(80).collect::<String>())
            }
            Ok(text) => format!("{text:?}"),
            Err(_) => format!("hex {}", headers::hex_preview(path)),
        };
        UnusablePath {
            why,
            method: method.to_string(),
            preview,
        }
    }
}

/// What the end of a candidate stream produced.
#[derive(Debug)]
pub enum StreamOutcome {
    Event(Event),
    NoEvent(NoEvent),
}

/// One stream's progress through the pipeline.
#[derive(Debug, Default)]
pub struct Stream {
    state: State,
}

impl Stream {
    pub fn new() -> Self {
        Stream::default()
    }

    /// Whether the response body is wanted.
    /// A rule matched the request: its response headers are worth reading.
    pub fn is_candidate(&self) -> bool {
        matches!(self.state, State::Candidate { .. })
    }

    pub fn is_collecting(&self) -> bool {
        matches!(self.state, State::Collecting { .. })
    }

    /// The request headers: which rules can still match their canonical path
    /// ([`crate::path::canonical`]), and the facts they need. A `:method` that is not UTF-8
    /// matches no rule. A request whose method some rule takes but whose `:path` has no canonical
    /// form is returned, to be counted (other requests are none of the filter's business).
    pub fn on_request_headers(
        &mut self,
        plan: &Plan,
        request: &[(&[u8], &[u8])],
    ) -> Option<UnusablePath> {
        let method =
            headers::first(request, headers::METHOD).and_then(|m| std::str::from_utf8(m).ok())?;
        if !plan.rules.iter().any(|rule| rule.methods.contains(method)) {
            return None;
        }
        let raw = headers::first(request, headers::PATH)?;
        let path = match path::canonical(raw) {
            Ok(path) => path,
            Err(why) => return Some(UnusablePath::new(why, method, raw)),
        };
        let rules: Vec<(usize, RequestFacts)> = plan
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.matches_request(method, &path))
            .map(|(i, rule)| {
                (
                    i,
                    rule.request_facts(&path, |name| headers::lookup(request, name)),
                )
            })
            .collect();
        if !rules.is_empty() {
            // Only a refetch sends the authority again; a rule without one never reads it.
            let refetch = rules
                .iter()
                .any(|(i, _)| plan.rules.get(*i).is_some_and(|r| r.refetch.is_some()));
            let authority = headers::first(request, headers::AUTHORITY)
                .filter(|_| refetch)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default();
            // The path names the job in the lines of a stream that ends without its event (and
            // a refetch fills it in); a path canonicalised already is moved, not copied.
            let request = RequestLine {
                path: path.into_owned(),
                authority,
            };
            self.state = State::Candidate { rules, request };
        }
        None
    }

    /// The response headers: a candidate whose status matches starts copying the body.
    /// Returns whether it did.
    pub fn on_response_headers(&mut self, plan: &Plan, response: &[(&[u8], &[u8])]) -> bool {
        let State::Candidate { rules, request } = std::mem::take(&mut self.state) else {
            return false;
        };
        let status = headers::first(response, headers::STATUS).and_then(headers::parse_status);
        let rules: Vec<_> = rules
            .into_iter()
            .filter(|(i, _)| {
                status.is_some_and(|s| plan.rules.get(*i).is_some_and(|r| r.matches_status(s)))
            })
            .collect();
        if rules.is_empty() {
            self.state = State::StatusNotMatched(NoEvent::StatusNotMatched {
                status,
                path: request.path,
            });
            return false;
        }
        let encoding = headers::first(response, headers::CONTENT_ENCODING)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        self.state = State::Collecting {
            rules,
            request,
            body: BodyBuffer::new(plan.delivery.max_body_bytes),
            encoding: Encoding::from_header(encoding.as_deref()),
        };
        true
    }

    /// One chunk of the response body. Past the limit the copy is dropped and the stream gives
    /// up: that is reported once.
    pub fn on_response_body(&mut self, plan: &Plan, chunk: &[u8]) -> Option<NoEvent> {
        let State::Collecting { body, .. } = &mut self.state else {
            return None;
        };
        if body.push(chunk) {
            return None;
        }
        self.state = State::Ignored;
        Some(NoEvent::BodyTooLarge {
            limit: plan.delivery.max_body_bytes,
        })
    }

    /// The end of the response: the body is parsed and each candidate rule makes its event, or
    /// says why not. `random` gives the 8 random bytes of each event id.
    pub fn finish(
        &mut self,
        plan: &Plan,
        now_ms: u64,
        random: impl FnMut() -> [u8; 8],
    ) -> Vec<StreamOutcome> {
        let State::Collecting {
            rules,
            body,
            encoding,
            ..
        } = std::mem::take(&mut self.state)
        else {
            return Vec::new();
        };
        body_outcomes(plan, &rules, &body, &encoding, now_ms, random)
    }

    /// The stream ended: a candidate whose status no rule matched says so (once).
    pub fn skipped(&mut self) -> Option<NoEvent> {
        match std::mem::take(&mut self.state) {
            State::StatusNotMatched(why) => Some(why),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// The stream ended (Envoy's `on_log`): a candidate that did not finish (no response
    /// headers, or a body cut short by a reset or a timeout) comes back once per matched rule.
    pub fn ended_early(&mut self) -> Vec<Cut> {
        let (rules, request, response_started) = match std::mem::take(&mut self.state) {
            State::Ignored | State::StatusNotMatched(_) => return Vec::new(),
            State::Candidate { rules, request } => (rules, request, false),
            State::Collecting { rules, request, .. } => (rules, request, true),
        };
        rules
            .into_iter()
            .map(|(rule, facts)| Cut {
                rule,
                facts,
                path: request.path.clone(),
                authority: request.authority.clone(),
                response_started,
            })
            .collect()
    }
}

/// A complete response body's outcomes: it is decoded and parsed, and each rule makes its event
/// or says why not. The end of a stream and a refetch's answer both come here. `random` gives the
/// 8 random bytes of each event id.
pub fn body_outcomes(
    plan: &Plan,
    rules: &[(usize, RequestFacts)],
    body: &BodyBuffer,
    encoding: &Encoding,
    now_ms: u64,
    mut random: impl FnMut() -> [u8; 8],
) -> Vec<StreamOutcome> {
    let decoded = match body.decode(encoding) {
        Ok(decoded) => decoded,
        Err(BodyError::TooLarge) => {
            return vec![StreamOutcome::NoEvent(NoEvent::BodyTooLarge {
                limit: plan.delivery.max_body_bytes,
            })]
        }
        Err(BodyError::Undecodable(why)) => {
            return vec![StreamOutcome::NoEvent(NoEvent::BodyUndecodable(why))]
        }
        Err(BodyError::NotJson(why)) => {
            return vec![StreamOutcome::NoEvent(NoEvent::BodyNotJson(why))]
        }
    };
    let mut tree = None;
    let json = match json::parse(&decoded, &mut tree) {
        Ok(json) => json,
        Err(why) => return vec![StreamOutcome::NoEvent(NoEvent::BodyNotJson(why))],
    };
    let mut outcomes = Vec::new();
    for (index, facts) in rules {
        let Some(rule) = plan.rules.get(*index) else {
            continue;
        };
        let event_type = || rule.event_type.clone();
        let outcome = match rule.evaluate(facts, json) {
            Evaluation::Matched {
                organisation_id,
                object,
            } => StreamOutcome::Event(Event::new(
                EventId::new(now_ms / 1000, random()),
                &rule.event_type,
                &rule.object_type,
                &organisation_id,
                object,
                now_ms,
            )),
            Evaluation::ConditionsNotMet => StreamOutcome::NoEvent(NoEvent::ConditionsNotMet {
                event_type: event_type(),
            }),
            Evaluation::NoOrganisation => StreamOutcome::NoEvent(NoEvent::NoOrganisation {
                event_type: event_type(),
            }),
            Evaluation::OrganisationNotUtf8(preview) => {
                StreamOutcome::NoEvent(NoEvent::OrganisationNotUtf8 {
                    event_type: event_type(),
                    preview,
                })
            }
            Evaluation::OrganisationRepeated => {
                StreamOutcome::NoEvent(NoEvent::OrganisationRepeated {
                    event_type: event_type(),
                })
            }
            Evaluation::ObjectNotFound | Evaluation::ObjectNotAnObject => {
                StreamOutcome::NoEvent(NoEvent::BadObject {
                    event_type: event_type(),
                    pointer: rule.object_pointer.clone(),
                })
            }
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// Parses a host header map, treating a malformed one as empty (it then matches nothing).
pub fn header_pairs(serialized: &[u8]) -> Pairs<'_> {
    headers::parse_map(serialized).unwrap_or_default()
}

#[cfg(test)]
mod tests;
