//! Property test: arbitrary request and response bytes through the pipeline, arbitrary answers
//! through the worker. Nothing panics, and every delivery ends accounted for: delivered, dropped
//! or exhausted with a counter, never lost.
#![allow(clippy::unwrap_used)] // test code (its cfg is not plain `test`, which clippy.toml allows)

use super::host::DispatchRefused;
use super::testing::{FakeHost, SIGNING_KEY};
use super::worker::Worker;
use crate::config::Plan;
use crate::delivery::AttemptOutcome;
use crate::headers::serialize_map;
use crate::stream::{header_pairs, Stream};
use proptest::prelude::*;
use serde_json::json;

const ORG: &str = "657bf08c202997ba9d127922";

fn plan(max_queued: usize, max_queued_bytes: usize) -> Plan {
    let hooks: Vec<_> = (1..=3)
        .map(|n| {
            json!({
                "id": format!("{n:024x}"), "organisationId": ORG, "name": "h",
                "url": format!("https://h{n}.example.com/"), "status": "enabled",
                "events": ["job.completed"], "apiKey": SIGNING_KEY,
            })
        })
        .collect();
    let config = json!({
        "events": [{
            "type": "job.completed", "objectType": "job",
            "match": {"methods": ["POST"], "path": "/jobs/{jobId}/complete", "status": [200]},
            "when": [{"pointer": "/status", "equals": "completed"}],
            "object": "", "organisationId": {"header": "x-organisation-id"}
        }],
        "webhooks": hooks,
        "delivery": {"cluster": "egress", "retrySchedule": ["1s", "1s"], "maxQueued": max_queued, "maxQueuedBytes": max_queued_bytes,
                     "maxInFlightPerWebhook": 2, "maxBodyBytes": 4096},
    });
    Plan::from_json(config.to_string().as_bytes(), &|_| None).unwrap()
}

/// Request header values: mostly the ones that match, sometimes anything.
fn header_value(good: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(good.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

#[derive(Debug, Clone)]
struct Request {
    method: Vec<u8>,
    path: Vec<u8>,
    orgs: Vec<Vec<u8>>,
    status: Vec<u8>,
    chunks: Vec<Vec<u8>>,
}

fn request() -> impl Strategy<Value = Request> {
    let body = prop_oneof![
        3 => Just(br#"{"status":"completed","id":"j"}"#.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(vec![b' '; 5000]),
    ];
    (
        header_value(b"POST"),
        header_value(b"/jobs/j1/complete"),
        proptest::collection::vec(header_value(ORG.as_bytes()), 0..3),
        header_value(b"200"),
        body,
        1usize..4,
    )
        .prop_map(|(method, path, orgs, status, body, pieces)| {
            let size = body.len().div_ceil(pieces).max(1);
            Request {
                method,
                path,
                orgs,
                status,
                chunks: body.chunks(size).map(<[u8]>::to_vec).collect(),
            }
        })
}

/// An answer as the host may report it.
#[derive(Debug, Clone)]
enum Answer {
    NoHeaders,
    Headers(Vec<(Vec<u8>, Vec<u8>)>),
    Refused,
}

fn answer() -> impl Strategy<Value = Answer> {
    let status = prop_oneof![
        Just(b"200".to_vec()),
        Just(b"503".to_vec()),
        Just(b"410".to_vec()),
        Just(b"429".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..5),
    ];
    let retry_after = proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12));
    prop_oneof![
        1 => Just(Answer::NoHeaders),
        1 => Just(Answer::Refused),
        6 => (status, retry_after, any::<bool>()).prop_map(|(s, ra, with_status)| {
            let mut h = Vec::new();
            if with_status {
                h.push((b":status".to_vec(), s));
            }
            if let Some(ra) = ra {
                h.push((b"retry-after".to_vec(), ra));
            }
            Answer::Headers(h)
        }),
    ]
}

fn counted(host: &FakeHost) -> i64 {
    [
        "deliveries_succeeded",
        "deliveries_exhausted",
        "deliveries_dropped.queue_full",
        "deliveries_dropped.over_share",
        "deliveries_dropped.webhook_gone",
    ]
    .iter()
    .map(|m| host.metric(m))
    .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn no_input_panics_and_no_delivery_is_lost(
        requests in proptest::collection::vec(request(), 1..12),
        answers in proptest::collection::vec(answer(), 0..40),
        max_queued in 1usize..8,
        max_queued_bytes in 100usize..2_000,
    ) {
        let host = FakeHost::default();
        let mut worker = Worker::new(&host, plan(max_queued, max_queued_bytes), None, "test", "w1".into());
        let plan = worker.plan().clone();
        let mut now = 1_000_000u64;
        let mut answers = answers.into_iter();
        for r in &requests {
            let mut stream = Stream::new();
            let mut request: Vec<(&[u8], &[u8])> = vec![(b":method", &r.method), (b":path", &r.path)];
            for org in &r.orgs {
                request.push((b"x-organisation-id", org));
            }
            let request = serialize_map(&request);
            stream.on_request_headers(&plan, &header_pairs(&request));
            let response = serialize_map(&[(b":status", &r.status)]);
            if stream.on_response_headers(&plan, &header_pairs(&response)) {
                for chunk in &r.chunks {
                    if let Some(why) = stream.on_response_body(&plan, chunk) {
                        worker.report_no_event(&host, &why);
                    }
                }
            }
            for outcome in stream.finish(&plan, now, || [7; 8]) {
                worker.on_stream_outcome(&host, outcome, now);
            }
            // Answer what is out with the next arbitrary answers.
            *host.refuse.borrow_mut() = None;
            for (_, attempt) in worker.pump(&host, now) {
                let outcome = match answers.next() {
                    None => AttemptOutcome::from_answer(1, Some(&[(b":status", b"200")])),
                    Some(Answer::NoHeaders) => AttemptOutcome::from_answer(0, None),
                    Some(Answer::Refused) => {
                        *host.refuse.borrow_mut() = Some(DispatchRefused::InternalFailure);
                        AttemptOutcome::from_answer(0, None)
                    }
                    Some(Answer::Headers(h)) => {
                        let pairs: Vec<(&[u8], &[u8])> =
                            h.iter().map(|(k, v)| (&k[..], &v[..])).collect();
                        let map = serialize_map(&pairs);
                        AttemptOutcome::from_answer(pairs.len(), Some(&header_pairs(&map)))
                    }
                };
                worker.on_answer(&host, attempt, &outcome, now);
            }
            now += 500;
        }
        // Then every receiver recovers: everything still held is delivered.
        *host.refuse.borrow_mut() = None;
        for _ in 0..50 {
            now += 5_000;
            for (_, attempt) in worker.pump(&host, now) {
                let ok = AttemptOutcome::from_answer(1, Some(&[(b":status", b"200")]));
                worker.on_answer(&host, attempt, &ok, now);
            }
        }
        prop_assert_eq!(worker.outbox().queued(), 0);
        prop_assert_eq!(worker.outbox().queued_bytes(), 0);
        prop_assert_eq!(worker.outbox().attempts_out(), 0);
        prop_assert_eq!(host.metric("outbox_depth"), 0);
        prop_assert_eq!(host.metric("outbox_bytes"), 0);
        // Each event of the organisation made one delivery per webhook (3), and each of those is
        // counted once as delivered, exhausted or dropped.
        let made = (host.metric("events_emitted") - host.metric("events_without_subscribers")) * 3;
        prop_assert_eq!(counted(&host), made);
    }
}
