//! Drives webhook-emitter's core through what the filter does for one stream, N times, with a host
//! that does nothing:
//!
//! * `nomatch`: configuration 1 of the bench, a request no rule matches (method bit test + path walk).
//! * `event`: configuration 2/3, one job completion through the filter's own pipeline
//!   (`webhook_emitter::stream::Stream`: request headers, status, body copy, JSON parse, `when` check,
//!   object extraction, event build) and worker (`webhook_emitter::filter::worker::Worker`: fan-out to W
//!   webhooks with one shared envelope, then per delivery: take it from the outbox, sign it, settle its 2xx).
//!
//! `core-driver MODE ITERATIONS WEBHOOKS` prints the nanoseconds per iteration. Run natively, under
//! callgrind (instructions per function), or as wasm32-wasip1 under Node (V8, the engine Envoy uses).

use std::hint::black_box;
use std::time::Instant;
use webhook_emitter::config::Plan;
use webhook_emitter::delivery::AttemptOutcome;
use webhook_emitter::filter::host::{Callout, DispatchRefused, Host, LogLevel, MetricKind};
use webhook_emitter::filter::worker::Worker;
use webhook_emitter::headers::serialize_map;
use webhook_emitter::stream::{header_pairs, Stream};

/// A host that accepts everything and does nothing, so that only the core's own work is measured.
struct NullHost;

impl Host for NullHost {
    fn log(&self, _: LogLevel, _: &str) {}
    fn log_enabled(&self, _: LogLevel) -> bool {
        false
    }
    fn define_metric(&self, _: MetricKind, _: &str) -> Option<u32> {
        None
    }
    fn add_metric(&self, _: u32, _: i64) {}
    fn record_metric(&self, _: u32, _: u64) {}
    fn random_u32(&self) -> u32 {
        7
    }
    fn dispatch(&self, callout: Callout<'_>) -> Result<u32, DispatchRefused> {
        black_box(callout.body.len());
        Ok(1)
    }
    fn wake(&self, _: u32) -> bool {
        true
    }
    fn shared_get(&self, _: &str) -> Option<(Vec<u8>, u32)> {
        None
    }
    fn shared_set(&self, _: &str, _: &[u8], _: u32) -> bool {
        true
    }
}

const ORG: &str = "657bf08c202997ba9d127922";
const BODY: &[u8] = br#"{"id":"bench-load-000000000001","status":"completed","result":{"outputUrl":"s3://results/bench-load-000000000001.json","durationMs":1234,"warnings":[]}}"#;

fn config(webhooks: usize) -> String {
    let hooks: Vec<String> = (0..webhooks)
        .map(|i| {
            format!(
                r#"{{"id":"{:024x}","organisationId":"{ORG}","name":"bench-{i}","url":"http://127.0.0.1:9/hooks/{i}","status":"enabled","events":["job.completed"],"apiKey":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo="}}"#,
                i + 1
            )
        })
        .collect();
    format!(
        r#"{{"events":[{{"type":"job.completed","objectType":"job","match":{{"methods":["POST","PUT","PATCH"],"path":"/jobs/{{jobId}}/complete","status":[200]}},"when":[{{"pointer":"/status","equals":"completed"}}],"object":"","organisationId":{{"header":"x-organisation-id"}}}}],"webhooks":[{}],"delivery":{{"cluster":"webhooks","timeoutMs":5000,"retrySchedule":["1s","2s","5s"],"maxQueued":10000,"maxBodyBytes":1048576,"allowInsecureHttp":true,"allowPrivateNetworks":true}}}}"#,
        hooks.join(",")
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("event", String::as_str);
    let n: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let webhooks: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1);
    let plan = match Plan::from_json(config(webhooks).as_bytes(), &|_| None) {
        Ok(plan) => plan,
        Err(errors) => {
            eprintln!("configuration rejected: {errors:?}");
            std::process::exit(2);
        }
    };
    let host = NullHost;
    let mut worker = Worker::new(&host, plan, None, "bench", "w1".into());
    let plan = worker.plan().clone();
    let now: u64 = 1_795_930_480_000;
    let request = serialize_map(&[
        (b":method", b"POST"),
        (b":path", b"/jobs/bench-load-000000000001/complete"),
        (b"x-organisation-id", ORG.as_bytes()),
    ]);
    let other = serialize_map(&[
        (b":method", b"POST"),
        (b":path", b"/jobs/bench-load-000000000001/progress"),
    ]);
    let response = serialize_map(&[(b":status", b"200"), (b"content-type", b"application/json")]);
    let ok = serialize_map(&[(b":status", b"200")]);
    let mut delivered = 0u64;
    let started = Instant::now();
    for i in 0..n {
        let mut stream = Stream::new();
        match mode {
            "nomatch" => {
                stream.on_request_headers(&plan, &header_pairs(black_box(&other)));
                black_box(stream.is_collecting());
            }
            _ => {
                stream.on_request_headers(&plan, &header_pairs(black_box(&request)));
                if stream.on_response_headers(&plan, &header_pairs(&response)) {
                    let _ = stream.on_response_body(&plan, black_box(BODY));
                }
                for outcome in stream.finish(&plan, now, || i.to_be_bytes()) {
                    worker.on_stream_outcome(&host, outcome, now);
                }
                for (_, attempt) in worker.pump(&host, now) {
                    let outcome = AttemptOutcome::from_answer(1, Some(&header_pairs(&ok)));
                    worker.on_answer(&host, attempt, &outcome, now + 1);
                    delivered += 1;
                }
            }
        }
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("mode={mode} iterations={n} webhooks={webhooks} delivered={delivered} ns_per_iteration={ns:.0}");
}
