//! Reading a job again when the answer to its completion was cut short: a client that hung up
//! after the response headers, an upstream that reset or cut its body, a timeout. Envoy then ends
//! the stream before the body is complete, and the pipeline has nothing to parse; a rule's
//! `refetch` names the request that reads the same object again (`GET /jobs/{jobId}`).
//!
//! Pure: the glue hands in how the stream ended and the answers to the callouts, and sends what
//! [`RefetchQueue::next_due`] gives. The queue is bounded in jobs, bytes and callouts out, and a
//! job is tried at most once more than the delivery schedule has steps.

use crate::body::{BodyBuffer, Encoding};
use crate::config::Plan;
use crate::rules::{EventRule, OrganisationFact, OrganisationSource, RequestFacts};
use crate::stream::{body_outcomes, Cut, NoEvent, StreamOutcome};
use std::collections::VecDeque;
use std::rc::Rc;

/// One completion to read again, with everything its event needs.
#[derive(Debug, Clone)]
pub struct RefetchJob {
    /// The plan the stream was matched against (a new configuration does not change it).
    pub plan: Rc<Plan>,
    pub rule: usize,
    pub facts: RequestFacts,
    /// The request that was cut (`:path`), for log lines.
    pub job_path: String,
    pub method: String,
    pub path: String,
    pub authority: String,
    /// The organisation header, carried when the rule takes the organisation from it.
    pub headers: Vec<(String, String)>,
    pub cluster: String,
    /// Why the stream ended early, as Envoy said it.
    pub reason: String,
    /// Whether the response had started (a status the rule takes): if not, the upstream may
    /// never have completed the job, and an answer that says so is no loss.
    pub response_started: bool,
    /// When the completion was seen, and the random part of its event id: every attempt makes
    /// the same id, so one completion is one event however many attempts it takes.
    pub seen_ms: u64,
    pub id_random: [u8; 8],
    /// Attempts sent so far.
    pub attempts: u32,
    pub next_at_ms: u64,
}

/// Why a cut stream is not read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRefetch {
    /// The rule has no `refetch`.
    NotConfigured,
    /// No `refetch.cluster`, and Envoy did not say which cluster the route chose.
    NoCluster,
}

impl RefetchJob {
    /// The refetch of one rule of a cut stream. `route_cluster` is the cluster Envoy routed the
    /// stream to, if it said.
    pub fn for_cut(
        plan: &Rc<Plan>,
        cut: &Cut,
        route_cluster: Option<&str>,
        reason: &str,
        now_ms: u64,
        id_random: [u8; 8],
    ) -> Result<RefetchJob, NoRefetch> {
        let rule = plan.rules.get(cut.rule).ok_or(NoRefetch::NotConfigured)?;
        let spec = rule.refetch.as_ref().ok_or(NoRefetch::NotConfigured)?;
        let cluster = spec
            .cluster
            .as_deref()
            .or(route_cluster)
            .filter(|c| !c.is_empty())
            .ok_or(NoRefetch::NoCluster)?;
        let path = spec
            .fill(&rule.path, &cut.path)
            .ok_or(NoRefetch::NotConfigured)?;
        Ok(RefetchJob {
            plan: Rc::clone(plan),
            rule: cut.rule,
            facts: cut.facts.clone(),
            job_path: cut.path.clone(),
            method: spec.method.clone(),
            path,
            authority: cut.authority.clone(),
            headers: organisation_header(rule, &cut.facts),
            cluster: cluster.to_string(),
            reason: reason.to_string(),
            response_started: cut.response_started,
            seen_ms: now_ms,
            id_random,
            attempts: 0,
            next_at_ms: now_ms,
        })
    }

    fn rule(&self) -> Option<&EventRule> {
        self.plan.rules.get(self.rule)
    }

    pub fn event_type(&self) -> &str {
        self.rule().map_or("?", |r| r.event_type.as_str())
    }

    /// What the job holds in memory, for the queue's byte bound.
    pub fn held_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.job_path.len()
            + self.path.len()
            + self.authority.len()
            + self.method.len()
            + self.cluster.len()
            + self.reason.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Judges an answer: a status the rule matches gives the body's outcomes (through the
    /// stream pipeline's own code, with this completion's event id); a failure the upstream may
    /// get over is retried; anything else is final.
    pub fn judge(&self, answer: RefetchAnswer) -> Verdict {
        let Some(rule) = self.rule() else {
            return Verdict::GiveUp("the rule is gone".into());
        };
        match answer {
            RefetchAnswer::Failed(why) => Verdict::Retry(why),
            RefetchAnswer::Status { code, .. } if code == 408 || code == 429 || code >= 500 => {
                Verdict::Retry(format!("the upstream answered {code}"))
            }
            RefetchAnswer::Status {
                code,
                content_encoding,
                body,
            } if rule.matches_status(code) => {
                let mut buffer = BodyBuffer::new(self.plan.delivery.max_body_bytes);
                buffer.push(&body);
                let encoding = Encoding::from_header(content_encoding.as_deref());
                let rules = [(self.rule, self.facts.clone())];
                let random = self.id_random;
                Verdict::Outcomes(body_outcomes(
                    &self.plan,
                    &rules,
                    &buffer,
                    &encoding,
                    self.seen_ms,
                    || random,
                ))
            }
            // Cut before any response: the job may not exist or not be complete, which is no
            // completion.
            RefetchAnswer::Status { code, .. } if !self.response_started => {
                Verdict::Outcomes(vec![StreamOutcome::NoEvent(NoEvent::StatusNotMatched {
                    status: Some(code),
                    path: self.job_path.clone(),
                })])
            }
            RefetchAnswer::Status { code, .. } => Verdict::GiveUp(format!(
                "the upstream answered {code}, not a status of the rule's match.status"
            )),
        }
    }
}

fn organisation_header(rule: &EventRule, facts: &RequestFacts) -> Vec<(String, String)> {
    match (&rule.organisation, &facts.organisation) {
        (OrganisationSource::Header(name), OrganisationFact::Value(v)) => {
            vec![(name.clone(), v.clone())]
        }
        _ => Vec::new(),
    }
}

/// A refetch's answer as the host reported it.
#[derive(Debug)]
pub enum RefetchAnswer {
    Status {
        code: u16,
        content_encoding: Option<String>,
        body: Vec<u8>,
    },
    /// No answer (reset, timeout) or a refused dispatch.
    Failed(String),
}

#[derive(Debug)]
pub enum Verdict {
    Outcomes(Vec<StreamOutcome>),
    Retry(String),
    GiveUp(String),
}

/// At most this many refetches wait per worker, holding at most [`MAX_QUEUED_BYTES`].
pub const MAX_QUEUED: usize = 1_000;
pub const MAX_QUEUED_BYTES: usize = 4 << 20;
/// At most this many refetches are out at once per worker.
pub const MAX_IN_FLIGHT: usize = 16;

/// The refetches of one worker: waiting (in order of when they are due) and out.
#[derive(Debug, Default)]
pub struct RefetchQueue {
    waiting: VecDeque<RefetchJob>,
    bytes: usize,
    in_flight: usize,
}

/// Why a refetch was refused.
#[derive(Debug)]
pub enum Refused {
    /// The queue is at [`MAX_QUEUED`] or [`MAX_QUEUED_BYTES`].
    QueueFull(Box<RefetchJob>),
    /// Every attempt the schedule allows was made.
    Exhausted(Box<RefetchJob>),
}

impl RefetchQueue {
    pub fn new() -> Self {
        RefetchQueue::default()
    }

    /// Refetches waiting (not out).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a new refetch, due at once.
    pub fn push(&mut self, job: RefetchJob) -> Result<(), Refused> {
        let size = job.held_bytes();
        if self.waiting.len() + self.in_flight >= MAX_QUEUED || self.bytes + size > MAX_QUEUED_BYTES
        {
            return Err(Refused::QueueFull(Box::new(job)));
        }
        self.bytes += size;
        let at = self
            .waiting
            .iter()
            .position(|j| j.next_at_ms > job.next_at_ms)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, job);
        Ok(())
    }

    /// The next refetch due at `now_ms`, if fewer than [`MAX_IN_FLIGHT`] are out: it counts as
    /// out until [`RefetchQueue::answered`].
    pub fn next_due(&mut self, now_ms: u64) -> Option<RefetchJob> {
        if self.in_flight >= MAX_IN_FLIGHT || self.waiting.front()?.next_at_ms > now_ms {
            return None;
        }
        let mut job = self.waiting.pop_front()?;
        self.bytes = self.bytes.saturating_sub(job.held_bytes());
        job.attempts += 1;
        self.in_flight += 1;
        Some(job)
    }

    /// A refetch that was out is back (answered, or its dispatch refused).
    pub fn answered(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Puts a failed refetch back for its next attempt, `schedule[attempts - 1]` after now; a job
    /// that used up the schedule comes back as exhausted.
    pub fn retry(
        &mut self,
        mut job: RefetchJob,
        schedule: &[u64],
        now_ms: u64,
    ) -> Result<(), Refused> {
        let step = (job.attempts as usize)
            .checked_sub(1)
            .and_then(|i| schedule.get(i));
        let Some(delay) = step else {
            return Err(Refused::Exhausted(Box::new(job)));
        };
        job.next_at_ms = now_ms + delay;
        self.push(job)
    }
}

#[cfg(test)]
mod tests;
