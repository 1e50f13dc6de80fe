//! The worker's side of refetch ([`crate::refetch`]): a candidate stream that ended before its
//! response was complete is read again from the upstream when its rule says how, and the
//! answer's outcomes go through the same path as a stream's; otherwise, or when the refetch
//! fails for good, the event is lost: logged with the job's path and counted under its reason.

use super::{Worker, USER_AGENT};
use crate::config::Plan;
use crate::filter::host::{log, Callout, Host, LogLevel};
use crate::headers;
use crate::refetch::{NoRefetch, RefetchAnswer, RefetchJob, Refused, Verdict};
use crate::stream::{Cut, StreamOutcome};
use std::rc::Rc;

/// What Envoy says of a stream that ended.
#[derive(Debug, Clone, Copy)]
pub struct StreamEnd<'a> {
    /// `response.code_details`: why it ended (`downstream_remote_disconnect`, ...).
    pub details: &'a str,
    /// `xds.cluster_name`: the cluster the route chose, if it got that far.
    pub route_cluster: Option<&'a str>,
}

impl Worker {
    /// Candidate rules of a stream that ended before its response was complete: each is read
    /// again if its rule has `refetch`, else its event is lost.
    pub fn on_stream_cut(
        &mut self,
        host: &dyn Host,
        plan: &Rc<Plan>,
        cuts: Vec<Cut>,
        end: &StreamEnd<'_>,
        now_ms: u64,
        mut random: impl FnMut() -> [u8; 8],
    ) {
        for cut in cuts {
            let event_type = plan
                .rules
                .get(cut.rule)
                .map_or("?", |r| r.event_type.as_str());
            let when = if cut.response_started {
                "its body was complete"
            } else {
                "the response headers came"
            };
            match RefetchJob::for_cut(plan, &cut, end.route_cluster, end.details, now_ms, random())
            {
                Ok(job) => {
                    log(host, LogLevel::Debug, || {
                        format!(
                            "{event_type} for {path:?}: the stream ended before {when} ({details}): reading it again with {method} {refetch} on cluster {cluster}",
                            path = cut.path,
                            details = end.details,
                            method = job.method,
                            refetch = job.path,
                            cluster = job.cluster,
                        )
                    });
                    match self.refetches.push(job) {
                        Ok(()) => self.ring(host),
                        Err(Refused::QueueFull(job) | Refused::Exhausted(job)) => {
                            self.refetch_lost(host, &job, "the refetch queue is full", now_ms)
                        }
                    }
                }
                Err(why) => {
                    self.metrics.events_lost_stream_reset.inc(host);
                    let what = match why {
                        NoRefetch::NotConfigured => "the rule has no refetch",
                        NoRefetch::NoCluster => {
                            "Envoy did not say which cluster the route chose, and the rule's refetch names none"
                        }
                    };
                    // Clients that hang up can come by the thousand: one line a second.
                    let Some(unlogged) = self.reset_lines.take(now_ms) else {
                        continue;
                    };
                    log(host, LogLevel::Warn, || {
                        format!(
                            "event lost: {event_type} for {path:?}: the stream ended before {when} ({details}) and {what} (reason=stream_reset){more}",
                            path = cut.path,
                            details = end.details,
                            more = more_since(unlogged),
                        )
                    });
                }
            }
        }
    }

    /// Sends the refetches that are due; returns each callout's token with its job.
    pub fn refetch_pump(&mut self, host: &dyn Host, now_ms: u64) -> Vec<(u32, RefetchJob)> {
        let mut sent = Vec::new();
        while let Some(job) = self.refetches.next_due(now_ms) {
            let mut callout_headers = vec![
                (headers::METHOD, job.method.as_str()),
                (headers::PATH, job.path.as_str()),
                (headers::AUTHORITY, job.authority.as_str()),
                (headers::SCHEME, "http"),
                (headers::USER_AGENT, USER_AGENT),
                ("accept", "application/json"),
            ];
            callout_headers.extend(job.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let result = host.dispatch(Callout {
                cluster: &job.cluster,
                headers: callout_headers,
                body: &[],
                timeout_ms: job.plan.delivery.timeout_ms,
            });
            match result {
                Ok(token) => {
                    self.metrics.refetches_sent.inc(host);
                    sent.push((token, job));
                }
                Err(refused) => {
                    self.refetches.answered();
                    let why = refused.reason(&job.cluster);
                    self.refetch_retry(host, job, why, now_ms);
                }
            }
        }
        sent
    }

    /// A refetch's answer: its outcomes are the stream's, a failure is retried along the
    /// delivery schedule, and a final answer loses the event.
    pub fn on_refetch_answer(
        &mut self,
        host: &dyn Host,
        job: RefetchJob,
        answer: RefetchAnswer,
        now_ms: u64,
    ) {
        self.refetches.answered();
        match job.judge(answer) {
            Verdict::Outcomes(outcomes) => {
                for outcome in outcomes {
                    if let StreamOutcome::Event(event) = &outcome {
                        self.metrics.events_refetched.inc(host);
                        log(host, LogLevel::Info, || {
                            format!(
                                "{} for {:?} read again after its stream ended early ({}): event={}",
                                job.event_type(),
                                job.job_path,
                                job.reason,
                                event.id_hex
                            )
                        });
                    }
                    self.on_stream_outcome(host, outcome, now_ms);
                }
            }
            Verdict::Retry(why) => self.refetch_retry(host, job, why, now_ms),
            Verdict::GiveUp(why) => self.refetch_lost(host, &job, &why, now_ms),
        }
    }

    fn refetch_retry(&mut self, host: &dyn Host, job: RefetchJob, why: String, now_ms: u64) {
        let schedule = job.plan.delivery.outbox.retry.schedule_ms.clone();
        let attempts = job.attempts;
        let path = job.job_path.clone();
        match self.refetches.retry(job, &schedule, now_ms) {
            Ok(()) => {
                self.metrics.refetches_retried.inc(host);
                log(host, LogLevel::Debug, || {
                    format!(
                        "refetch for {path:?} failed ({why}) after {attempts} attempts: retrying"
                    )
                });
            }
            Err(Refused::Exhausted(job)) => self.refetch_lost(
                host,
                &job,
                &format!("{why}, after {attempts} attempts"),
                now_ms,
            ),
            Err(Refused::QueueFull(job)) => self.refetch_lost(
                host,
                &job,
                &format!("{why}, and the refetch queue is full"),
                now_ms,
            ),
        }
    }

    fn refetch_lost(&self, host: &dyn Host, job: &RefetchJob, why: &str, now_ms: u64) {
        self.metrics.events_lost_refetch_failed.inc(host);
        let Some(unlogged) = self.refetch_lost_lines.take(now_ms) else {
            return;
        };
        log(host, LogLevel::Warn, || {
            format!(
                "event lost: {} for {:?}: the stream ended early ({}) and the refetch {} {} failed: {why} (reason=refetch_failed){}",
                job.event_type(),
                job.job_path,
                job.reason,
                job.method,
                job.path,
                more_since(unlogged),
            )
        });
    }
}

/// What a sampled line says of the lines held back before it.
fn more_since(unlogged: u64) -> String {
    if unlogged > 0 {
        format!(" ({unlogged} more since the last such line)")
    } else {
        String::new()
    }
}
