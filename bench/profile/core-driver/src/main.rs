//! Drives webhook-emitter's pure core through what the filter does for one stream, N times, with no host:
//!
//! * `nomatch`: configuration 1 of the bench, a request no rule matches (method bit test + path walk).
//! * `event`: configuration 2/3, one job completion: path match, request facts, body copy, JSON parse,
//!   `when` check, object extraction, event build, fan-out to W webhooks (envelope per webhook), then per
//!   delivery what the root context does: take it from the outbox, sign it, settle its 2xx.
//!
//! `core-driver MODE ITERATIONS WEBHOOKS` prints the nanoseconds per iteration. Run natively, under
//! callgrind (instructions per function), or as wasm32-wasip1 under Node (V8, the engine Envoy uses).

use std::hint::black_box;
use std::time::Instant;
use webhook_emitter::body::{BodyBuffer, Encoding};
use webhook_emitter::config::Plan;
use webhook_emitter::delivery::{AttemptOutcome, Outbox};
use webhook_emitter::event::{Event, EventId};
use webhook_emitter::rules::Evaluation;

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
    let mut outbox = Outbox::new(plan.webhooks.len(), plan.delivery.outbox.clone());
    let now: u64 = 1_795_930_480_000;
    let mut delivered = 0u64;
    let started = Instant::now();
    for i in 0..n {
        match mode {
            "nomatch" => {
                let path = black_box("/jobs/bench-load-000000000001/progress");
                let hit = plan
                    .rules
                    .iter()
                    .any(|r| r.matches_request(black_box("POST"), path));
                black_box(hit);
            }
            _ => {
                let path = black_box("/jobs/bench-load-000000000001/complete");
                let candidates: Vec<_> = plan
                    .rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.matches_request(black_box("POST"), path))
                    .map(|(i, r)| (i, r.request_facts(path, |_| Some(ORG.to_string()))))
                    .collect();
                for (index, facts) in candidates {
                    let rule = &plan.rules[index];
                    if !rule.matches_status(200) {
                        continue;
                    }
                    let mut body = BodyBuffer::new(plan.delivery.max_body_bytes);
                    body.push(black_box(BODY));
                    let Ok(json) = body.parse(&Encoding::from_header(None)) else {
                        continue;
                    };
                    if let Evaluation::Matched {
                        organisation_id,
                        object,
                    } = rule.evaluate(&facts, &json)
                    {
                        let id = EventId::new(now / 1000, (i as u64).to_be_bytes());
                        let event = Event::new(
                            id,
                            &rule.event_type,
                            &rule.object_type,
                            &organisation_id,
                            object,
                            now,
                        );
                        let _ = outbox.fan_out(&plan, &event, now);
                    }
                }
                for d in outbox.take_due(now) {
                    let key = &plan.webhooks[d.webhook].key;
                    black_box(key.sign(&d.event_id, now / 1000, &d.body));
                    black_box(d.body.len().to_string());
                    let ok = AttemptOutcome::Status {
                        code: 200,
                        retry_after: None,
                    };
                    black_box(outbox.finish(d, &ok, now + 1, 7));
                    delivered += 1;
                }
            }
        }
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("mode={mode} iterations={n} webhooks={webhooks} delivered={delivered} ns_per_iteration={ns:.0}");
}
