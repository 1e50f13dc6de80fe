//! The glue's decisions, against a host that answers as a broken or hostile one would.

use super::host::{DispatchRefused, LogLevel};
use super::testing::{job_completed_rule, FakeHost, SIGNING_KEY};
use super::worker::{Attempt, Worker};
use crate::config::Plan;
use crate::delivery::AttemptOutcome;
use crate::headers::serialize_map;
use crate::stream::{header_pairs, Stream};
use serde_json::{json, Value};

const ORG: &str = "657bf08c202997ba9d127922";
const OTHER_ORG: &str = "657bf08c202997ba9d127923";

fn webhook(n: usize, org: &str) -> Value {
    json!({
        "id": format!("{n:024x}"),
        "organisationId": org,
        "name": format!("hook {n}"),
        "url": format!("https://hook{n}.example.com/in"),
        "status": "enabled",
        "events": ["job.completed"],
        "apiKey": SIGNING_KEY,
    })
}

fn config(webhooks: Vec<Value>, delivery: Value) -> Value {
    let mut d = json!({
        "cluster": "egress",
        "timeoutMs": 1000,
        "retrySchedule": ["1s", "2s"],
    });
    for (k, v) in delivery.as_object().unwrap() {
        d[k] = v.clone();
    }
    json!({
        "events": [job_completed_rule()],
        "webhooks": webhooks,
        "delivery": d,
    })
}

fn plan(config: &Value) -> Plan {
    Plan::from_json(config.to_string().as_bytes(), &|_| None).expect("valid test config")
}

/// Runs one job completion through the pipeline into the worker.
fn complete(host: &FakeHost, worker: &mut Worker, org: &[u8], body: &[u8], now: u64) {
    let plan = worker.plan().clone();
    let mut stream = Stream::new();
    let request = serialize_map(&[
        (b":method", b"POST"),
        (b":path", b"/jobs/j1/complete"),
        (b"x-organisation-id", org),
    ]);
    stream.on_request_headers(&plan, &header_pairs(&request));
    let response = serialize_map(&[(b":status", b"200")]);
    assert!(stream.on_response_headers(&plan, &header_pairs(&response)));
    assert_eq!(stream.on_response_body(&plan, body), None);
    let mut n = 0u8;
    for outcome in stream.finish(&plan, now, || {
        n += 1;
        [n; 8]
    }) {
        worker.on_stream_outcome(host, outcome, now);
    }
}

fn answer(code: &[u8]) -> AttemptOutcome {
    let map = serialize_map(&[(b":status", code)]);
    AttemptOutcome::from_answer(1, Some(&header_pairs(&map)))
}

#[test]
fn a_callout_that_failed_before_its_headers_is_retried_not_trapped() {
    let host = FakeHost::default();
    let mut worker = Worker::new(
        &host,
        plan(&config(vec![webhook(1, ORG)], json!({}))),
        Some(1),
        "test",
        "w1".into(),
    );
    complete(
        &host,
        &mut worker,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        1_000,
    );
    let mut out = worker.pump(&host, 1_000);
    assert_eq!(out.len(), 1);
    let (_, attempt) = out.remove(0);
    // headers == 0: Envoy reports a reset or a timeout mid-answer this way.
    let outcome = AttemptOutcome::from_answer(0, None);
    worker.on_answer(&host, attempt, &outcome, 1_010);
    assert_eq!(host.metric("deliveries_retried"), 1);
    assert_eq!(host.logged(LogLevel::Info, "will retry"), 1);
    assert_eq!(worker.outbox().queued(), 1, "still held for its retry");
    // The retry goes out on schedule and succeeds.
    let mut out = worker.pump(&host, 1_010 + 1_000);
    let (_, attempt) = out.remove(0);
    worker.on_answer(&host, attempt, &answer(b"204"), 2_100);
    assert_eq!(host.metric("deliveries_succeeded"), 1);
    assert_eq!(host.metric("outbox_depth"), 0);
}

#[test]
fn an_answer_without_a_valid_status_is_a_failed_attempt() {
    let host = FakeHost::default();
    let mut worker = Worker::new(
        &host,
        plan(&config(vec![webhook(1, ORG)], json!({}))),
        None,
        "test",
        "w1".into(),
    );
    complete(
        &host,
        &mut worker,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let (_, attempt) = worker.pump(&host, 0).remove(0);
    worker.on_answer(&host, attempt, &answer(b"\xff\xfe\xfd"), 5);
    assert_eq!(host.metric("deliveries_retried"), 1);
    assert_eq!(host.logged(LogLevel::Info, "invalid :status"), 1);
}

#[test]
fn a_refused_dispatch_is_retried_and_logs_the_real_reason() {
    let host = FakeHost::default();
    let mut worker = Worker::new(
        &host,
        plan(&config(vec![webhook(1, ORG)], json!({}))),
        None,
        "test",
        "w1".into(),
    );
    complete(
        &host,
        &mut worker,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    *host.refuse.borrow_mut() = Some(DispatchRefused::BadArgument);
    assert!(worker.pump(&host, 0).is_empty());
    assert_eq!(host.metric("deliveries_retried"), 1);
    assert_eq!(
        host.logged(LogLevel::Info, "is not defined in this Envoy"),
        1
    );
    assert_eq!(worker.outbox().queued(), 1);
    assert_eq!(worker.outbox().attempts_out(), 0);
}

#[test]
fn an_organisation_header_that_is_not_utf8_makes_no_event() {
    let host = FakeHost::default();
    let mut worker = Worker::new(
        &host,
        plan(&config(vec![webhook(1, ORG)], json!({}))),
        None,
        "test",
        "w1".into(),
    );
    complete(
        &host,
        &mut worker,
        b"caf\xe9",
        br#"{"status":"completed"}"#,
        0,
    );
    assert_eq!(host.metric("events_emitted"), 0);
    assert_eq!(host.metric("events_bad_organisation"), 1);
    assert_eq!(host.logged(LogLevel::Warn, "not UTF-8 (bytes 636166e9)"), 1);
    assert!(worker.pump(&host, 0).is_empty());
}

#[test]
fn one_event_holds_one_copy_of_its_envelope_for_all_its_webhooks() {
    let host = FakeHost::default();
    let hooks = (1..=8).map(|n| webhook(n, ORG)).collect();
    let mut worker = Worker::new(
        &host,
        plan(&config(hooks, json!({}))),
        None,
        "test",
        "w1".into(),
    );
    let big = format!(
        r#"{{"status":"completed","blob":"{}"}}"#,
        "x".repeat(100_000)
    );
    complete(&host, &mut worker, ORG.as_bytes(), big.as_bytes(), 0);
    assert_eq!(worker.outbox().queued(), 8);
    let bytes = worker.outbox().queued_bytes();
    assert!((100_000..110_000).contains(&bytes), "{bytes}");
    assert_eq!(host.metric("outbox_bytes"), bytes as i64);
    // Each webhook still gets its own webhookId, signed.
    let out = worker.pump(&host, 0);
    let sent = host.take_sent();
    assert_eq!(sent.len(), 8);
    for (i, s) in sent.iter().enumerate() {
        assert_eq!(s.cluster, "egress");
        let v: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(v["webhookId"], format!("{:024x}", i + 1));
        assert!(s.headers.iter().any(|(k, _)| k == "webhook-signature"));
    }
    for (_, attempt) in out {
        worker.on_answer(&host, attempt, &answer(b"200"), 1);
    }
    assert_eq!(
        (worker.outbox().queued(), worker.outbox().queued_bytes()),
        (0, 0)
    );
    assert_eq!(host.metric("outbox_bytes"), 0);
}

#[test]
fn the_byte_bound_drops_with_a_trace_and_another_organisation_still_gets_in() {
    let host = FakeHost::default();
    let hooks = vec![webhook(1, ORG), webhook(2, OTHER_ORG)];
    let config = config(
        hooks,
        json!({"maxInFlightPerWebhook": 1, "maxQueuedBytes": 350_000}),
    );
    let mut worker = Worker::new(&host, plan(&config), None, "test", "w1".into());
    let big = format!(
        r#"{{"status":"completed","blob":"{}"}}"#,
        "x".repeat(100_000)
    );
    for _ in 0..5 {
        complete(&host, &mut worker, ORG.as_bytes(), big.as_bytes(), 0);
    }
    assert_eq!(
        host.metric("deliveries_dropped.queue_full"),
        2,
        "3 × 100 KB fit in 350 KB"
    );
    assert_eq!(host.logged(LogLevel::Error, "reason=the outbox is full"), 2);
    // The other organisation's webhook is below its fair share: room is made for it.
    complete(&host, &mut worker, OTHER_ORG.as_bytes(), big.as_bytes(), 0);
    assert_eq!(host.metric("deliveries_dropped.over_share"), 1);
    assert_eq!(
        host.logged(LogLevel::Error, "holds more than its fair share"),
        1
    );
    assert_eq!(
        worker
            .outbox()
            .lane_queued(crate::delivery::LaneId::Webhook(1))
            .0,
        1
    );
    assert!(worker.outbox().queued_bytes() <= 350_000);
}

fn with_dead_letter(extra: Value) -> Value {
    let mut d = json!({
        "deadLetter": {"url": "https://dlq.example.com/store"},
    });
    for (k, v) in extra.as_object().unwrap() {
        d[k] = v.clone();
    }
    d
}

fn exhaust(host: &FakeHost, worker: &mut Worker, mut now: u64) -> u64 {
    loop {
        let out = worker.pump(host, now);
        if out.is_empty() {
            return now;
        }
        for (_, attempt) in out {
            worker.on_answer(host, attempt, &answer(b"500"), now);
        }
        now += 10_000;
    }
}

#[test]
fn dead_letters_queued_when_the_dead_letter_endpoint_is_removed_are_lost_loudly() {
    let host = FakeHost::default();
    let cfg = config(vec![webhook(1, ORG)], with_dead_letter(json!({})));
    let mut worker = Worker::new(&host, plan(&cfg), None, "test", "w1".into());
    complete(
        &host,
        &mut worker,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    // Fail the delivery for good; the dead letter is queued, but not sent yet.
    let mut now = 0;
    for _ in 0..3 {
        for (_, attempt) in worker.pump(&host, now) {
            if let Attempt {
                lane: super::worker::LaneKey::Webhook(_),
                ..
            } = &attempt
            {
                worker.on_answer(&host, attempt, &answer(b"500"), now);
            }
        }
        now += 10_000;
    }
    assert_eq!(host.metric("deliveries_exhausted"), 1);
    assert_eq!(worker.outbox().queued(), 1, "the dead letter waits");
    worker.adopt(&host, plan(&config(vec![webhook(1, ORG)], json!({}))));
    assert_eq!(host.metric("dead_letters_failed"), 1);
    assert_eq!(
        host.logged(LogLevel::Critical, "dead letter could not be stored"),
        1
    );
    assert_eq!(worker.outbox().queued(), 0);
}

#[test]
fn a_dead_letter_store_that_answers_410_is_retried_then_lost_loudly() {
    let host = FakeHost::default();
    let cfg = config(vec![webhook(1, ORG)], with_dead_letter(json!({})));
    let mut worker = Worker::new(&host, plan(&cfg), None, "test", "w1".into());
    complete(
        &host,
        &mut worker,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let mut now = 0;
    loop {
        let out = worker.pump(&host, now);
        if out.is_empty() && worker.outbox().queued() == 0 {
            break;
        }
        for (_, attempt) in out {
            let code: &[u8] = match attempt.lane {
                super::worker::LaneKey::DeadLetter => b"410",
                _ => b"500",
            };
            worker.on_answer(&host, attempt, &answer(code), now);
        }
        now += 10_000;
        assert!(now < 1_000_000, "the dead letter never settled");
    }
    assert_eq!(
        host.metric("webhooks_disabled_gone"),
        0,
        "the store is not a webhook"
    );
    assert_eq!(host.metric("deliveries_dropped.webhook_gone"), 0);
    assert_eq!(host.metric("dead_letters_failed"), 1);
    assert_eq!(
        host.logged(LogLevel::Critical, "dead letter could not be stored"),
        1
    );
    let _ = exhaust(&host, &mut worker, now);
}

#[test]
fn a_410_seen_by_one_worker_stops_every_worker_of_the_proxy() {
    let host = FakeHost::default();
    let cfg = config(vec![webhook(1, ORG)], json!({}));
    let mut first = Worker::new(&host, plan(&cfg), None, "p", "w1".into());
    let mut second = Worker::new(&host, plan(&cfg), None, "p", "w2".into());
    // The second worker holds a delivery waiting for its retry.
    complete(
        &host,
        &mut second,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let (_, attempt) = second.pump(&host, 0).remove(0);
    second.on_answer(&host, attempt, &answer(b"503"), 0);
    assert_eq!(second.outbox().queued(), 1);
    // The first worker's delivery is answered 410.
    complete(
        &host,
        &mut first,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let (_, attempt) = first.pump(&host, 0).remove(0);
    first.on_answer(&host, attempt, &answer(b"410"), 1);
    assert_eq!(host.metric("webhooks_disabled_gone"), 1);
    // The second worker learns it on its next event (before fan-out) or tick: its queued delivery is
    // dropped with a trace, and the new event is refused.
    complete(
        &host,
        &mut second,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        5,
    );
    assert_eq!(
        host.logged(LogLevel::Warn, "answered 410 Gone to another worker"),
        1
    );
    // The 410'd delivery, the one waiting on the second worker, and the new event's.
    assert_eq!(host.metric("deliveries_dropped.webhook_gone"), 3);
    assert!(second.pump(&host, 100_000).is_empty());
    assert_eq!(second.outbox().queued(), 0);
}

#[test]
fn an_event_copies_the_shared_endpoint_table_only_after_it_changed() {
    let host = FakeHost::default();
    let cfg = config(vec![webhook(1, ORG), webhook(2, ORG)], json!({}));
    let mut first = Worker::new(&host, plan(&cfg), None, "p", "w1".into());
    let mut second = Worker::new(&host, plan(&cfg), None, "p", "w2".into());
    let table_reads = || {
        host.shared_reads
            .borrow()
            .get("webhook_emitter.p.endpoints")
            .copied()
            .unwrap_or(0)
    };
    complete(
        &host,
        &mut first,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let sent = first.pump(&host, 0);
    assert_eq!(sent.len(), 2);
    let (_, gone) = sent.into_iter().next().unwrap();
    first.on_answer(&host, gone, &answer(b"410"), 1);
    let after_410 = table_reads();
    // The second worker's next event reads the changed table once; the events after it do not.
    for now in 2..12 {
        complete(
            &host,
            &mut second,
            ORG.as_bytes(),
            br#"{"status":"completed"}"#,
            now,
        );
    }
    assert_eq!(table_reads(), after_410 + 1);
    assert_eq!(
        host.shared_reads.borrow()["webhook_emitter.p.endpoints.changed"],
        11,
        "one small read per event, the first worker's included"
    );
    // Only the healthy webhook gets the second worker's events.
    assert_eq!(second.pump(&host, 12).len(), 10);
}

#[test]
fn a_gone_webhook_pointed_at_a_new_url_is_a_new_endpoint() {
    let host = FakeHost::default();
    let cfg = config(vec![webhook(1, ORG)], json!({}));
    let mut first = Worker::new(&host, plan(&cfg), None, "p", "w1".into());
    complete(
        &host,
        &mut first,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let (_, attempt) = first.pump(&host, 0).remove(0);
    first.on_answer(&host, attempt, &answer(b"410"), 1);
    let mut moved = webhook(1, ORG);
    moved["url"] = json!("https://moved.example.com/in");
    let mut second = Worker::new(
        &host,
        plan(&config(vec![moved], json!({}))),
        None,
        "p",
        "w2".into(),
    );
    complete(
        &host,
        &mut second,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        5,
    );
    assert_eq!(second.pump(&host, 5).len(), 1);
}

#[test]
fn an_open_circuit_holds_every_worker_and_a_close_reopens_them() {
    let host = FakeHost::default();
    let cfg = config(
        vec![webhook(1, ORG)],
        json!({"circuitBreaker": {"failures": 1}, "retrySchedule": ["1s", "1s", "1s", "1s"]}),
    );
    let mut first = Worker::new(&host, plan(&cfg), None, "p", "w1".into());
    let mut second = Worker::new(&host, plan(&cfg), None, "p", "w2".into());
    complete(
        &host,
        &mut first,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let (_, attempt) = first.pump(&host, 0).remove(0);
    first.on_answer(&host, attempt, &answer(b"500"), 0);
    assert_eq!(host.metric("circuits_opened"), 1);
    // The second worker's new event waits behind the open circuit instead of being sent now.
    complete(
        &host,
        &mut second,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        10,
    );
    assert!(second.pump(&host, 10).is_empty());
    // The first worker's probe succeeds: the circuit closes for both.
    let (_, probe) = first.pump(&host, 2_000).remove(0);
    first.on_answer(&host, probe, &answer(b"200"), 2_000);
    second.tick(&host, 2_001);
    assert_eq!(second.pump(&host, 2_001).len(), 1);
}

#[test]
fn the_bounds_hold_for_the_whole_proxy() {
    let host = FakeHost::default();
    let cfg = config(vec![webhook(1, ORG)], json!({"maxQueued": 3}));
    let mut first = Worker::new(&host, plan(&cfg), None, "p", "w1".into());
    let mut second = Worker::new(&host, plan(&cfg), None, "p", "w2".into());
    for _ in 0..2 {
        complete(
            &host,
            &mut first,
            ORG.as_bytes(),
            br#"{"status":"completed"}"#,
            0,
        );
    }
    first.tick(&host, 0);
    second.tick(&host, 0);
    complete(
        &host,
        &mut second,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    complete(
        &host,
        &mut second,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    assert_eq!(
        second.outbox().queued(),
        1,
        "2 + 1 = maxQueued for the proxy"
    );
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 1);
    // A worker that stops saying what it holds is forgotten.
    second.tick(&host, 10_000);
    complete(
        &host,
        &mut second,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        10_000,
    );
    assert_eq!(second.outbox().queued(), 2);
}

#[test]
fn one_worker_probes_for_the_proxy_and_another_takes_over_when_it_falls_silent() {
    let host = FakeHost::default();
    let cfg = config(
        vec![webhook(1, ORG)],
        json!({"circuitBreaker": {"failures": 1}, "retrySchedule": ["1s", "1s", "1s", "1s", "1s", "1s"]}),
    );
    let body = br#"{"status":"completed"}"#;
    let mut leader = Worker::new(&host, plan(&cfg), None, "p", "w1".into());
    let mut follower = Worker::new(&host, plan(&cfg), None, "p", "w2".into());
    complete(&host, &mut leader, ORG.as_bytes(), body, 0);
    let (_, attempt) = leader.pump(&host, 0).remove(0);
    leader.on_answer(&host, attempt, &answer(b"500"), 0);
    complete(&host, &mut follower, ORG.as_bytes(), body, 10);
    // Probe periods go by: only the leader probes.
    let mut now = 0;
    for _ in 0..3 {
        now += 1_000;
        follower.tick(&host, now);
        assert!(
            follower.pump(&host, now).is_empty(),
            "the follower probed at {now}"
        );
        let (_, probe) = leader.pump(&host, now).remove(0);
        leader.on_answer(&host, probe, &answer(b"500"), now);
    }
    // The leader falls silent (its VM is gone): the follower probes after the grace period.
    now += 1_000;
    follower.tick(&host, now);
    assert!(follower.pump(&host, now).is_empty());
    now += super::worker::FOLLOWER_GRACE_MS;
    follower.tick(&host, now);
    assert_eq!(follower.pump(&host, now).len(), 1);
}

#[test]
fn a_worker_never_waits_for_another_to_make_room_and_the_tick_trims_the_overshoot() {
    let host = FakeHost::default();
    let cfg = config(
        vec![webhook(1, ORG), webhook(2, OTHER_ORG)],
        json!({"maxQueued": 4}),
    );
    let body = br#"{"status":"completed"}"#;
    let mut hog = Worker::new(&host, plan(&cfg), None, "p", "w1".into());
    let mut other = Worker::new(&host, plan(&cfg), None, "p", "w2".into());
    other.tick(&host, 0);
    for _ in 0..4 {
        complete(&host, &mut hog, ORG.as_bytes(), body, 0);
    }
    hog.tick(&host, 0);
    other.tick(&host, 0);
    // The proxy is full with the first worker's deliveries; the second still has its equal split.
    for _ in 0..2 {
        complete(&host, &mut other, OTHER_ORG.as_bytes(), body, 1);
    }
    assert_eq!(other.outbox().queued(), 2);
    other.tick(&host, 2);
    // The first worker's next tick gives back what the proxy holds over its bound.
    hog.tick(&host, 3);
    assert_eq!(hog.outbox().queued(), 2);
    assert_eq!(host.metric("deliveries_dropped.over_share"), 2);
    assert_eq!(
        host.logged(LogLevel::Error, "holds more than its fair share"),
        2
    );
}

#[test]
fn large_events_to_hanging_endpoints_are_trimmed_back_within_the_proxy_byte_bound() {
    let host = FakeHost::default();
    let hooks = (1..=8).map(|n| webhook(n, ORG)).collect();
    let cfg = config(
        hooks,
        json!({"maxQueuedBytes": 8_000_000, "retrySchedule": ["1h"]}),
    );
    let big = format!(
        r#"{{"status":"completed","blob":"{}"}}"#,
        "x".repeat(100_000)
    );
    let mut workers: Vec<Worker> = (0..2)
        .map(|i| Worker::new(&host, plan(&cfg), None, "p", format!("w{i}")))
        .collect();
    let mut out = Vec::new();
    for round in 0..150u64 {
        let w = &mut workers[(round % 2) as usize];
        complete(&host, w, ORG.as_bytes(), big.as_bytes(), round);
        out.extend(w.pump(&host, round)); // never answered
        if round % 10 == 0 {
            for w in workers.iter_mut() {
                w.tick(&host, round);
            }
        }
    }
    for w in workers.iter_mut() {
        w.tick(&host, 200);
    }
    for w in workers.iter_mut() {
        w.tick(&host, 201);
    }
    let total: usize = workers.iter().map(|w| w.outbox().queued_bytes()).sum();
    assert!(total <= 8_000_000, "{total}");
}

mod delivery_log;
mod registry;
