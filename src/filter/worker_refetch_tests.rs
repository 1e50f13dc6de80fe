//! The worker's side of refetch: a cut stream is read again through a callout, its answer makes
//! the event once; a rule without refetch, or a refetch that keeps failing, is a counted loss.

use super::host::{DispatchRefused, LogLevel};
use super::testing::{job_completed_rule, FakeHost, SIGNING_KEY};
use super::worker::{StreamEnd, Worker};
use crate::config::Plan;
use crate::headers::serialize_map;
use crate::refetch::{RefetchAnswer, RefetchJob};
use crate::stream::{header_pairs, Stream};
use serde_json::{json, Value};
use std::rc::Rc;

const ORG: &str = "657bf08c202997ba9d127922";

fn config(refetch: Option<Value>) -> Value {
    let mut rule = job_completed_rule();
    if let Some(r) = refetch {
        rule["refetch"] = r;
    }
    json!({
        "events": [rule],
        "webhooks": [{
            "id": format!("{:024x}", 1),
            "organisationId": ORG,
            "name": "hook",
            "url": "https://hook.example.com/in",
            "status": "enabled",
            "events": ["job.completed"],
            "apiKey": SIGNING_KEY,
        }],
        "delivery": {"cluster": "egress", "timeoutMs": 1000, "retrySchedule": ["1s", "2s"]},
    })
}

fn plan(refetch: Option<Value>) -> Rc<Plan> {
    Rc::new(from_json(&config(refetch)))
}

fn from_json(config: &Value) -> Plan {
    Plan::from_json(config.to_string().as_bytes(), &|_| None).unwrap()
}

/// A worker on `plan`, and a stream of `POST /jobs/j1/complete` cut after its headers.
fn cut(host: &FakeHost, plan: &Rc<Plan>, worker: &mut Worker, route: Option<&str>) {
    cut_at(host, plan, worker, route, 5_000);
}

fn cut_at(host: &FakeHost, plan: &Rc<Plan>, worker: &mut Worker, route: Option<&str>, now: u64) {
    let mut stream = Stream::new();
    let request = serialize_map(&[
        (b":method", b"POST"),
        (b":path", b"/jobs/j1/complete"),
        (b":authority", b"jobs.internal"),
        (b"x-organisation-id", ORG.as_bytes()),
    ]);
    stream.on_request_headers(plan, &header_pairs(&request));
    let response = serialize_map(&[(b":status", b"200")]);
    assert!(stream.on_response_headers(plan, &header_pairs(&response)));
    assert_eq!(stream.on_response_body(plan, b"{\"id\":"), None);
    let end = StreamEnd {
        details: "downstream_remote_disconnect",
        route_cluster: route,
    };
    worker.on_stream_cut(host, plan, stream.ended_early(), &end, now, || [3; 8]);
}

/// A worker whose own plan is read from the same configuration as `plan`.
fn worker(host: &FakeHost, plan: &Rc<Plan>) -> Worker {
    let rule = &plan.rules[0];
    let refetch = rule
        .refetch
        .as_ref()
        .map(|r| json!({"path": "/jobs/{jobId}", "method": r.method, "cluster": r.cluster}));
    Worker::new(host, from_json(&config(refetch)), None, "p", "w1".into())
}

fn answer(code: u16, body: &str) -> RefetchAnswer {
    RefetchAnswer::Status {
        code,
        content_encoding: None,
        body: body.as_bytes().to_vec(),
    }
}

fn header<'a>(sent: &'a super::testing::SentCallout, name: &str) -> Option<&'a str> {
    sent.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_cut_stream_is_read_again_and_its_event_made_once() {
    let host = FakeHost::default();
    let plan = plan(Some(json!({"path": "/jobs/{jobId}"})));
    let mut w = worker(&host, &plan);
    cut(&host, &plan, &mut w, Some("job_service"));
    let out = w.refetch_pump(&host, 5_000);
    assert_eq!(out.len(), 1);
    let sent = host.take_sent();
    assert_eq!(sent[0].cluster, "job_service");
    assert_eq!(header(&sent[0], ":method"), Some("GET"));
    assert_eq!(header(&sent[0], ":path"), Some("/jobs/j1"));
    assert_eq!(header(&sent[0], ":authority"), Some("jobs.internal"));
    assert_eq!(header(&sent[0], "x-organisation-id"), Some(ORG));
    let (_, job) = out.into_iter().next().unwrap();
    w.on_refetch_answer(
        &host,
        job,
        answer(200, r#"{"id":"j1","status":"completed"}"#),
        5_100,
    );
    assert_eq!(host.metric("events_refetched"), 1);
    assert_eq!(host.metric("events_emitted"), 1);
    assert_eq!(host.metric("refetches_sent"), 1);
    assert_eq!(w.outbox().queued(), 1);
    assert_eq!(
        host.logged(
            LogLevel::Info,
            "read again after its stream ended early (downstream_remote_disconnect)"
        ),
        1
    );
    // Nothing more to send.
    assert!(w.refetch_pump(&host, 100_000).is_empty());
}

#[test]
fn without_refetch_or_a_cluster_the_loss_is_counted_and_logged() {
    let host = FakeHost::default();
    let plan_without = plan(None);
    let mut w = worker(&host, &plan_without);
    cut(&host, &plan_without, &mut w, Some("job_service"));
    assert_eq!(host.metric("events_lost.stream_reset"), 1);
    assert_eq!(
        host.logged(LogLevel::Warn, "event lost: job.completed for \"/jobs/j1/complete\": the stream ended before its body was complete (downstream_remote_disconnect) and the rule has no refetch (reason=stream_reset)"),
        1
    );
    let routed = plan(Some(json!({"path": "/jobs/{jobId}"})));
    let mut w = worker(&host, &routed);
    cut(&host, &routed, &mut w, None);
    assert_eq!(host.metric("events_lost.stream_reset"), 2);
    assert_eq!(
        host.logged(LogLevel::Warn, "Envoy did not say which cluster"),
        1
    );
    assert!(w.refetch_pump(&host, 5_000).is_empty());
}

#[test]
fn lost_event_lines_are_written_at_most_once_a_second_saying_how_many_were_held_back() {
    let host = FakeHost::default();
    let plan_without = plan(None);
    let mut w = worker(&host, &plan_without);
    for now in [5_000, 5_100, 5_999] {
        cut_at(&host, &plan_without, &mut w, Some("job_service"), now);
    }
    assert_eq!(host.metric("events_lost.stream_reset"), 3);
    assert_eq!(host.logged(LogLevel::Warn, "event lost:"), 1);
    cut_at(&host, &plan_without, &mut w, Some("job_service"), 6_000);
    assert_eq!(host.metric("events_lost.stream_reset"), 4);
    assert_eq!(
        host.logged(
            LogLevel::Warn,
            "(reason=stream_reset) (2 more since the last such line)"
        ),
        1
    );
}

#[test]
fn a_failing_refetch_is_retried_along_the_schedule_then_counted() {
    let host = FakeHost::default();
    let plan = plan(Some(
        json!({"path": "/jobs/{jobId}", "cluster": "jobs_read"}),
    ));
    let mut w = worker(&host, &plan);
    cut(&host, &plan, &mut w, None);
    let mut now = 5_000;
    let mut ids = Vec::new();
    for (attempt, next) in [(1, 1_000), (2, 2_000), (3, 0)] {
        let mut out = w.refetch_pump(&host, now);
        assert_eq!(out.len(), 1, "attempt {attempt}");
        let (_, job): (u32, RefetchJob) = out.remove(0);
        ids.push(job.id_random);
        w.on_refetch_answer(&host, job, answer(503, ""), now);
        if next > 0 {
            assert!(w.refetch_pump(&host, now + next - 1).is_empty());
            now += next;
        }
    }
    assert_eq!(host.metric("refetches_sent"), 3);
    assert_eq!(host.metric("refetches_retried"), 2);
    assert_eq!(host.metric("events_lost.refetch_failed"), 1);
    assert_eq!(host.metric("events_emitted"), 0);
    assert!(ids.iter().all(|i| *i == [3; 8]));
    assert_eq!(
        host.logged(LogLevel::Warn, "the refetch GET /jobs/j1 failed: the upstream answered 503, after 3 attempts (reason=refetch_failed)"),
        1
    );
    // A dispatch Envoy refuses counts as an attempt too, and a 404 is final.
    cut(&host, &plan, &mut w, None);
    *host.refuse.borrow_mut() = Some(DispatchRefused::BadArgument);
    assert!(w.refetch_pump(&host, now).is_empty());
    assert_eq!(host.metric("refetches_retried"), 3);
    *host.refuse.borrow_mut() = None;
    let (_, job) = w.refetch_pump(&host, now + 1_000).remove(0);
    w.on_refetch_answer(&host, job, answer(404, "{}"), now + 1_000);
    assert_eq!(host.metric("events_lost.refetch_failed"), 2);
    assert_eq!(
        host.logged(
            LogLevel::Warn,
            "the upstream answered 404, not a status of the rule's match.status"
        ),
        1
    );
}

#[test]
fn status_and_when_mismatches_are_counted_but_are_no_loss() {
    let host = FakeHost::default();
    let plan = plan(None);
    let w = worker(&host, &plan);
    let mut stream = Stream::new();
    let request = serialize_map(&[(b":method", b"POST"), (b":path", b"/jobs/j1/complete")]);
    stream.on_request_headers(&plan, &header_pairs(&request));
    let response = serialize_map(&[(b":status", b"409")]);
    assert!(!stream.on_response_headers(&plan, &header_pairs(&response)));
    w.report_no_event(&host, &stream.skipped().unwrap());
    assert_eq!(host.metric("events_skipped.status"), 1);
    assert_eq!(
        host.logged(
            LogLevel::Debug,
            "\"/jobs/j1/complete\" answered 409, a status no matching rule takes"
        ),
        1
    );
    let mut w = w;
    let mut stream = Stream::new();
    let request = serialize_map(&[
        (b":method", b"POST"),
        (b":path", b"/jobs/j1/complete"),
        (b"x-organisation-id", ORG.as_bytes()),
    ]);
    stream.on_request_headers(&plan, &header_pairs(&request));
    let response = serialize_map(&[(b":status", b"200")]);
    assert!(stream.on_response_headers(&plan, &header_pairs(&response)));
    stream.on_response_body(&plan, br#"{"status":"running"}"#);
    for outcome in stream.finish(&plan, 1, || [1; 8]) {
        w.on_stream_outcome(&host, outcome, 1);
    }
    assert_eq!(host.metric("events_skipped.when"), 1);
    assert_eq!(host.metric("events_emitted"), 0);
}
