//! Property test of the loss ledger: arbitrary request and response bytes, streams that end at
//! any point (a reset, a cut body), rules with and without `refetch`, and arbitrary refetch
//! answers. Every request that a rule's method takes and whose path matches the rule's template
//! (or has no canonical form) ends in exactly one counter of the ledger: an event, a loss by its
//! reason, or a skip (no completion); any other request in none.
#![allow(clippy::unwrap_used)] // test code (its cfg is not plain `test`, which clippy.toml allows)

use super::testing::{FakeHost, SIGNING_KEY};
use super::unusable_path::{self, LogSampler};
use super::worker::{StreamEnd, Worker};
use crate::config::Plan;
use crate::headers::serialize_map;
use crate::path;
use crate::refetch::RefetchAnswer;
use crate::stream::{header_pairs, Stream};
use proptest::prelude::*;
use serde_json::json;
use std::rc::Rc;

const ORG: &str = "657bf08c202997ba9d127922";

/// Every counter of the ledger (README, "Loss ledger").
const LEDGER: [&str; 15] = [
    "events_emitted",
    "events_lost.stream_reset",
    "events_lost.refetch_failed",
    "bodies_too_large",
    "bodies_undecodable",
    "bodies_not_json",
    "events_without_organisation",
    "events_bad_organisation",
    "events_bad_object",
    "events_dropped.registry_not_loaded",
    "events_skipped.status",
    "events_skipped.when",
    "requests_bad_path.not_utf8",
    "requests_bad_path.bad_escape",
    "requests_bad_path.escaped_slash",
];

fn ledger(host: &FakeHost) -> i64 {
    LEDGER.iter().map(|m| host.metric(m)).sum()
}

fn config(refetch: bool) -> serde_json::Value {
    let mut rule = json!({
        "type": "job.completed", "objectType": "job",
        "match": {"methods": ["POST"], "path": "/jobs/{jobId}/complete", "status": [200]},
        "when": [{"pointer": "/status", "equals": "completed"}],
        "object": "", "organisationId": {"header": "x-organisation-id"}
    });
    if refetch {
        rule["refetch"] = json!({"path": "/jobs/{jobId}"});
    }
    json!({
        "events": [rule],
        "webhooks": [{
            "id": format!("{:024x}", 1), "organisationId": ORG, "name": "h",
            "url": "https://h.example.com/", "status": "enabled",
            "events": ["job.completed"], "apiKey": SIGNING_KEY,
        }],
        "delivery": {"cluster": "egress", "retrySchedule": ["1s", "1s"], "maxBodyBytes": 4096},
    })
}

fn value(good: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(good.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

fn path_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(b"/jobs/j1/complete".to_vec()),
        1 => Just(b"//jobs/j1/complet%65/".to_vec()),
        1 => Just(b"/jobs/j%zz/complete".to_vec()),
        1 => Just(b"/jobs/j\xff/complete".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(br#"{"status":"completed","id":"j1"}"#.to_vec()),
        1 => Just(br#"{"status":"running"}"#.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(vec![b' '; 5000]),
    ]
}

/// A refetch's answer.
fn answer() -> impl Strategy<Value = Option<(u16, Vec<u8>)>> {
    prop_oneof![
        1 => Just(None),
        2 => (prop_oneof![Just(200u16), Just(404), Just(503), 100u16..600], body()).prop_map(Some),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    method: Vec<u8>,
    path: Vec<u8>,
    orgs: Vec<Vec<u8>>,
    status: Vec<u8>,
    body: Vec<u8>,
    /// Where the stream ends: before the response headers (0), after them with this many body
    /// bytes (1..), or never early (None).
    cut_at: Option<usize>,
    answers: Vec<Option<(u16, Vec<u8>)>>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        value(b"POST"),
        path_value(),
        proptest::collection::vec(value(ORG.as_bytes()), 0..3),
        value(b"200"),
        body(),
        proptest::option::of(0usize..40),
        proptest::collection::vec(answer(), 0..4),
    )
        .prop_map(|(method, path, orgs, status, body, cut_at, answers)| Case {
            method,
            path,
            orgs,
            status,
            body,
            cut_at,
            answers,
        })
}

/// Whether the request is one of the ledger's: a method the rule takes, and a path that matches
/// its template or has no canonical form.
fn in_ledger(plan: &Plan, c: &Case) -> bool {
    let Ok(method) = std::str::from_utf8(&c.method) else {
        return false;
    };
    let rule = &plan.rules[0];
    if !rule.methods.contains(method) {
        return false;
    }
    match path::canonical(&c.path) {
        Err(_) => true,
        Ok(p) => rule.path.matches(p.as_ref()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_matched_request_ends_in_exactly_one_counter(
        cases in proptest::collection::vec(case(), 1..8),
        refetch in any::<bool>(),
    ) {
        let host = FakeHost::default();
        let json = config(refetch).to_string();
        let mut worker = Worker::new(&host, Plan::from_json(json.as_bytes(), &|_| None).unwrap(), None, "t", "w".into());
        let plan: Rc<Plan> = Rc::clone(worker.plan());
        let sampler = LogSampler::default();
        let mut now = 1_000_000u64;
        for c in &cases {
            let before = ledger(&host);
            let mut stream = Stream::new();
            let mut request: Vec<(&[u8], &[u8])> = vec![(b":method", &c.method), (b":path", &c.path)];
            for org in &c.orgs {
                request.push((b"x-organisation-id", org));
            }
            let request = serialize_map(&request);
            if let Some(unusable) = stream.on_request_headers(&plan, &header_pairs(&request)) {
                unusable_path::report(&host, worker.metrics(), &sampler, &unusable, now);
            }
            let mut finished = false;
            if c.cut_at != Some(0) {
                let response = serialize_map(&[(b":status", &c.status)]);
                if stream.on_response_headers(&plan, &header_pairs(&response)) {
                    let upto = c.cut_at.map_or(c.body.len(), |n| (n - 1).min(c.body.len()));
                    if let Some(why) = stream.on_response_body(&plan, &c.body[..upto]) {
                        worker.report_no_event(&host, &why);
                    }
                    if c.cut_at.is_none() {
                        for outcome in stream.finish(&plan, now, || [7; 8]) {
                            worker.on_stream_outcome(&host, outcome, now);
                        }
                        finished = true;
                    }
                }
            }
            // The end of the stream (on_log), whether it finished or not.
            if let Some(why) = stream.skipped() {
                worker.report_no_event(&host, &why);
            }
            let end = StreamEnd { details: "downstream_remote_disconnect", route_cluster: Some("jobs") };
            worker.on_stream_cut(&host, &plan, stream.ended_early(), &end, now, || [9; 8]);
            prop_assert!(!finished || stream.ended_early().is_empty());
            // Every refetch ends: with the given answers, then with no answer until the schedule
            // is used up.
            let mut answers = c.answers.iter();
            for _ in 0..10 {
                for (_, job) in worker.refetch_pump(&host, now) {
                    let answer = match answers.next().cloned().flatten() {
                        None => RefetchAnswer::Failed("reset".into()),
                        Some((code, body)) => RefetchAnswer::Status { code, content_encoding: None, body },
                    };
                    worker.on_refetch_answer(&host, job, answer, now);
                }
                now += 1_000;
            }
            prop_assert!(worker.refetch_pump(&host, now + 1_000_000).is_empty());
            let expected = i64::from(in_ledger(&plan, c));
            prop_assert_eq!(ledger(&host) - before, expected, "{:?}", c);
        }
    }
}
