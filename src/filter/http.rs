//! The HTTP context: one per stream. Non-candidate streams stop at the request headers; a
//! candidate's body is copied, never held: every callback returns `Continue`.

use super::root::SharedWorker;
use super::{log, now_ms, random_bytes};
use crate::body::{BodyBuffer, BodyError, Encoding};
use crate::config::Plan;
use crate::event::{Event, EventId};
use crate::rules::{Evaluation, RequestFacts};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};
use std::rc::Rc;

enum Stream {
    /// No rule can match this stream: nothing more is done.
    Ignored,
    /// Rules (by index) that matched the request, with the facts each needs.
    Candidate { rules: Vec<(usize, RequestFacts)> },
    /// The status matched too: the body is being copied.
    Collecting {
        rules: Vec<(usize, RequestFacts)>,
        body: BodyBuffer,
        encoding: Encoding,
    },
}

pub struct EmitterStream {
    worker: Option<SharedWorker>,
    /// The plan this stream was matched against, even if a new configuration arrives mid-stream.
    plan: Option<Rc<Plan>>,
    state: Stream,
}

impl EmitterStream {
    pub fn new(worker: Option<SharedWorker>) -> Self {
        let plan = worker.as_ref().map(|w| Rc::clone(&w.borrow().plan));
        EmitterStream {
            worker,
            plan,
            state: Stream::Ignored,
        }
    }

    fn finish(&mut self) {
        let Stream::Collecting {
            rules,
            body,
            encoding,
        } = std::mem::replace(&mut self.state, Stream::Ignored)
        else {
            return;
        };
        let (Some(worker), Some(plan)) = (&self.worker, &self.plan) else {
            return;
        };
        let metrics = worker.borrow().metrics;
        let json = match body.parse(&encoding) {
            Ok(json) => json,
            Err(BodyError::TooLarge) => {
                metrics.bodies_too_large.inc();
                log(LogLevel::Warn, &format!("response body over delivery.maxBodyBytes ({} bytes) once decoded: no event", plan.delivery.max_body_bytes));
                return;
            }
            Err(BodyError::Undecodable(why)) => {
                metrics.bodies_undecodable.inc();
                log(
                    LogLevel::Warn,
                    &format!("response body not decodable ({why}): no event"),
                );
                return;
            }
            Err(BodyError::NotJson(why)) => {
                metrics.bodies_not_json.inc();
                log(
                    LogLevel::Info,
                    &format!("response body is not JSON ({why}): no event"),
                );
                return;
            }
        };
        let now = now_ms();
        for (index, facts) in &rules {
            let Some(rule) = plan.rules.get(*index) else {
                continue;
            };
            match rule.evaluate(facts, &json) {
                Evaluation::Matched {
                    organisation_id,
                    object,
                } => {
                    let id = EventId::new(now / 1000, random_bytes::<8>());
                    let event = Event::new(
                        id,
                        &rule.event_type,
                        &rule.object_type,
                        &organisation_id,
                        object,
                        now,
                    );
                    worker.borrow_mut().emit(&event, now);
                }
                Evaluation::ConditionsNotMet => {}
                Evaluation::NoOrganisation => {
                    metrics.events_without_organisation.inc();
                    log(
                        LogLevel::Warn,
                        &format!(
                            "{} matched but has no organisation id: no event",
                            rule.event_type
                        ),
                    );
                }
                Evaluation::ObjectNotFound | Evaluation::ObjectNotAnObject => {
                    metrics.events_bad_object.inc();
                    log(
                        LogLevel::Warn,
                        &format!("{} matched but its object pointer {:?} is not a JSON object in the body: no event", rule.event_type, rule.object_pointer),
                    );
                }
            }
        }
    }
}

impl Context for EmitterStream {}

impl HttpContext for EmitterStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(plan) = &self.plan else {
            return Action::Continue;
        };
        let (Some(method), Some(path)) = (
            self.get_http_request_header(":method"),
            self.get_http_request_header(":path"),
        ) else {
            return Action::Continue;
        };
        let rules: Vec<(usize, RequestFacts)> = plan
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.matches_request(&method, &path))
            .map(|(i, rule)| {
                (
                    i,
                    rule.request_facts(&path, |name| self.get_http_request_header(name)),
                )
            })
            .collect();
        if !rules.is_empty() {
            self.state = Stream::Candidate { rules };
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let Stream::Candidate { rules } = std::mem::replace(&mut self.state, Stream::Ignored)
        else {
            return Action::Continue;
        };
        let (Some(plan), Some(status)) = (
            &self.plan,
            self.get_http_response_header(":status")
                .and_then(|s| s.parse::<u16>().ok()),
        ) else {
            return Action::Continue;
        };
        let rules: Vec<_> = rules
            .into_iter()
            .filter(|(i, _)| plan.rules.get(*i).is_some_and(|r| r.matches_status(status)))
            .collect();
        if rules.is_empty() {
            return Action::Continue;
        }
        let encoding =
            Encoding::from_header(self.get_http_response_header("content-encoding").as_deref());
        self.state = Stream::Collecting {
            rules,
            body: BodyBuffer::new(plan.delivery.max_body_bytes),
            encoding,
        };
        if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !matches!(self.state, Stream::Collecting { .. }) {
            return Action::Continue;
        }
        // Each call sees only the new chunk, because every call returns Continue.
        let chunk = if body_size > 0 {
            self.get_http_response_body(0, body_size)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let over_limit = match &mut self.state {
            Stream::Collecting { body, .. } => !body.push(&chunk),
            _ => false,
        };
        if over_limit {
            self.state = Stream::Ignored;
            if let (Some(worker), Some(plan)) = (&self.worker, &self.plan) {
                worker.borrow().metrics.bodies_too_large.inc();
                log(
                    LogLevel::Warn,
                    &format!(
                        "response body over delivery.maxBodyBytes ({} bytes): no event",
                        plan.delivery.max_body_bytes
                    ),
                );
            }
        } else if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.finish();
        Action::Continue
    }
}
