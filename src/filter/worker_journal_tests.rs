//! The worker with a journal: its etcd requests go out as callouts on the journal's cluster, a
//! record follows its deliveries, and a claimed record's deliveries resume, signed afresh with
//! the same webhook id.

use super::host::LogLevel;
use super::testing::{job_completed_rule, FakeHost, SentCallout, SIGNING_KEY};
use super::worker::{RegistryAnswer, Worker};
use crate::config::Plan;
use crate::delivery::AttemptOutcome;
use crate::event::{Event, EventId};
use crate::headers::serialize_map;
use crate::journal::{record, Purpose};
use crate::signature::SigningKey;
use crate::stream::header_pairs;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Map, Value};

const ORG: &str = "657bf08c202997ba9d127922";
const HOOK: &str = "000000000000000000000001";
/// The FakeHost's random_u32 is 200: the owner id is two of them.
const OWNER: &str = "000000c8000000c8";

fn plan() -> Plan {
    plan_from(config())
}

fn plan_from(config: Value) -> Plan {
    Plan::from_json(config.to_string().as_bytes(), &|name| {
        (name == "REGISTRY_TOKEN").then(|| "proxy-token".to_string())
    })
    .expect("valid test config")
}

fn config() -> Value {
    json!({
        "events": [job_completed_rule()],
        "webhooks": [{
            "id": HOOK,
            "organisationId": ORG,
            "name": "hook",
            "url": "https://hook.example.com/in",
            "status": "enabled",
            "events": ["job.completed"],
            "apiKey": SIGNING_KEY,
        }],
        "delivery": {
            "cluster": "egress",
            "retrySchedule": ["1s", "2s"],
            "journal": {"cluster": "etcd", "authority": "etcd.local", "prefix": "wh/", "leaseSeconds": 3},
        },
    })
}

fn header<'a>(c: &'a SentCallout, name: &str) -> &'a str {
    c.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_default()
}

fn request_key(c: &SentCallout) -> String {
    let body: Value = serde_json::from_slice(&c.body).expect("JSON");
    let key = B64
        .decode(body["key"].as_str().expect("key"))
        .expect("base64");
    String::from_utf8(key).expect("utf-8")
}

fn event(seconds: u64) -> Event {
    let mut object = Map::new();
    object.insert("id".into(), "j1".into());
    object.insert("status".into(), "completed".into());
    Event::new(
        EventId::new(seconds, [7; 8]),
        "job.completed",
        "job",
        ORG,
        crate::json::Object::Tree(&object),
        seconds * 1000,
    )
}

fn ok(code: &[u8]) -> AttemptOutcome {
    let map = serialize_map(&[(b":status", code)]);
    AttemptOutcome::from_answer(1, Some(&header_pairs(&map)))
}

/// A worker whose journal owner key is registered; the host's sent list is empty.
fn live_worker(host: &FakeHost) -> Worker {
    live_worker_with(host, plan())
}

fn live_worker_with(host: &FakeHost, plan: Plan) -> Worker {
    let mut worker = Worker::new(host, plan, Some(1), "webhook_emitter", "w1".into());
    let mut out = worker.journal_poll(host, 0);
    let sent = host.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].cluster, "etcd");
    assert_eq!(header(&sent[0], ":path"), "/v3/lease/grant");
    assert_eq!(header(&sent[0], ":authority"), "etcd.local");
    assert_eq!(header(&sent[0], ":method"), "POST");
    let (_, grant) = out.remove(0);
    worker.journal_answer(host, grant, Some(200), Some(br#"{"ID":"5","TTL":"3"}"#), 1);
    let mut out = worker.journal_poll(host, 1);
    let sent = host.take_sent();
    assert_eq!(request_key(&sent[0]), format!("wh/alive/{OWNER}"));
    let (_, register) = out.remove(0);
    worker.journal_answer(host, register, Some(200), Some(b"{}"), 2);
    assert_eq!(host.logged(LogLevel::Info, "is live"), 1);
    worker
}

/// The journal's batches (txns) among the callouts sent.
fn txns(sent: &[SentCallout]) -> Vec<Value> {
    sent.iter()
        .filter(|c| c.cluster == "etcd" && header(c, ":path") == "/v3/kv/txn")
        .map(|c| serde_json::from_slice(&c.body).expect("JSON"))
        .collect()
}

/// The one write of a batch: ("put" or "delete", key).
fn only_write(txn: &Value) -> (&'static str, String) {
    let ops = txn["success"].as_array().expect("success");
    assert_eq!(ops.len(), 1, "{txn}");
    let (kind, op) = match ops[0].get("request_put") {
        Some(put) => ("put", put),
        None => ("delete", &ops[0]["request_delete_range"]),
    };
    let key = B64.decode(op["key"].as_str().expect("key")).expect("b64");
    (kind, String::from_utf8(key).expect("utf-8"))
}

/// An event whose first attempt answers `code`: the worker's deliveries and journal requests
/// until then; returns the journal's requests by token.
fn event_answered(
    host: &FakeHost,
    worker: &mut Worker,
    seconds: u64,
    code: &[u8],
    now: u64,
) -> Vec<(u32, Purpose)> {
    worker.on_stream_outcome(
        host,
        crate::stream::StreamOutcome::Event(event(seconds)),
        now,
    );
    // One pump: the attempt leaves at once, the record waits for its batch.
    let mut attempts = worker.pump(host, now);
    let mut journal = worker.journal_poll(host, now);
    let sent = host.take_sent();
    assert!(sent.iter().any(|c| c.cluster == "egress"));
    assert!(txns(&sent).is_empty(), "the record waits for its batch");
    let (_, attempt) = attempts.remove(0);
    worker.on_answer(host, attempt, &ok(code), now + 5);
    journal.extend(worker.journal_poll(host, now + 5));
    journal
}

#[test]
fn an_event_delivered_before_its_batch_leaves_is_never_written() {
    let host = FakeHost::default();
    let mut worker = live_worker(&host);
    let _ = event_answered(&host, &mut worker, 1_700_000_000, b"200", 1_000);
    let _ = worker.journal_poll(&host, 1_100);
    assert!(txns(&host.take_sent()).is_empty());
    assert_eq!(host.metric("journal_records"), 0);
}

#[test]
fn a_record_owed_a_retry_is_written_in_a_batch_and_deleted_after_it() {
    let host = FakeHost::default();
    let mut worker = live_worker(&host);
    let _ = event_answered(&host, &mut worker, 1_700_000_000, b"503", 1_000);
    let mut journal = worker.journal_poll(&host, 1_100);
    let sent = host.take_sent();
    let batches = txns(&sent);
    assert_eq!(batches.len(), 1);
    let event_id = event(1_700_000_000).id_hex;
    assert_eq!(
        only_write(&batches[0]),
        ("put", format!("wh/records/{OWNER}/{event_id}"))
    );
    assert!(!String::from_utf8_lossy(&sent[0].body).contains("whsec_"));
    let batch = journal
        .iter()
        .position(|(_, p)| matches!(p, Purpose::Batch { .. }))
        .expect("batch");
    let (_, batch) = journal.remove(batch);
    worker.journal_answer(
        &host,
        batch,
        Some(200),
        Some(br#"{"succeeded":true}"#),
        1_120,
    );
    assert_eq!(host.metric("journal_records"), 1);

    // The retry succeeds: the record is deleted with the next batch.
    let mut attempts = worker.pump(&host, 10_000);
    let (_, attempt) = attempts.remove(0);
    worker.on_answer(&host, attempt, &ok(b"200"), 10_010);
    let _ = worker.journal_poll(&host, 10_010);
    let _ = worker.journal_poll(&host, 10_100);
    let batches = txns(&host.take_sent());
    assert_eq!(batches.len(), 1);
    assert_eq!(
        only_write(&batches[0]),
        ("delete", format!("wh/records/{OWNER}/{event_id}"))
    );
}

#[test]
fn an_unreachable_journal_is_logged_and_counted_and_delivery_goes_on() {
    let host = FakeHost::default();
    let mut worker = live_worker(&host);
    let _ = event_answered(&host, &mut worker, 1_700_000_000, b"503", 1_000);
    let mut journal = worker.journal_poll(&host, 1_100);
    let (_, batch) = journal.remove(
        journal
            .iter()
            .position(|(_, p)| matches!(p, Purpose::Batch { .. }))
            .expect("batch"),
    );
    worker.journal_answer(&host, batch, None, None, 1_105);
    assert_eq!(host.metric("journal_unavailable"), 1);
    assert_eq!(host.metric("journal_writes_failed"), 1);
    assert_eq!(
        host.logged(
            LogLevel::Warn,
            "journal unavailable (record batch of 1 writes: no answer)"
        ),
        1
    );
    let mut attempts = worker.pump(&host, 10_000);
    let (_, attempt) = attempts.remove(0);
    worker.on_answer(&host, attempt, &ok(b"204"), 10_010);
    assert_eq!(host.metric("deliveries_succeeded"), 1);
}

#[test]
fn a_claimed_record_resumes_at_its_next_attempt_signed_afresh_with_the_same_id() {
    let host = FakeHost::default();
    let mut worker = live_worker(&host);
    let e = event(1_700_000_000);
    let value = record::encode(
        &e.id_hex,
        e.created_at_ms,
        &e.envelope,
        &[record::PendingWebhook {
            webhook_id: HOOK.into(),
            attempts: 2,
            next_attempt_at_ms: 50_000,
        }],
    );
    let claimed = record::decode(&value).expect("record");
    worker.journal_answer(
        &host,
        Purpose::Claim {
            record: claimed,
            bytes: 10,
        },
        Some(200),
        Some(br#"{"succeeded":true}"#),
        10_000,
    );
    assert_eq!(host.metric("journal_records_claimed"), 1);
    assert_eq!(host.metric("journal_records"), 1);
    assert_eq!(worker.outbox().queued(), 1);
    assert!(worker.pump(&host, 49_999).is_empty(), "waits for its time");
    let out = worker.pump(&host, 50_000);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.delivery.attempts, 3);
    let sent = host.take_sent();
    let attempt = sent.iter().find(|c| c.cluster == "egress").expect("sent");
    assert_eq!(header(attempt, "webhook-id"), e.id_hex);
    assert_eq!(attempt.body, e.envelope_for(HOOK));
    let key = SigningKey::parse(SIGNING_KEY).expect("key");
    let signature = key.sign(&e.id_hex, 50, &attempt.body);
    assert_eq!(header(attempt, "webhook-signature"), signature);
}

#[test]
fn a_proxy_that_pulls_the_registry_claims_nothing_before_its_first_listing() {
    let host = FakeHost::default();
    let mut c = config();
    c["registry"] =
        json!({"cluster": "registry", "authority": "registry", "tokenEnv": "REGISTRY_TOKEN"});
    let mut worker = live_worker_with(&host, plan_from(c));
    let scans = |host: &FakeHost| {
        host.take_sent()
            .iter()
            .filter(|c| c.cluster == "etcd" && header(c, ":path") == "/v3/kv/range")
            .count()
    };
    let _ = worker.journal_poll(&host, 10_000);
    assert_eq!(scans(&host), 0, "no dead owner is looked for yet");
    worker.on_registry_answer(
        &host,
        RegistryAnswer::Status {
            code: 200,
            body: br#"{"revision":0,"next":0,"more":false,"changes":[]}"#.to_vec(),
        },
        10_001,
    );
    let _ = worker.journal_poll(&host, 10_002);
    assert!(
        scans(&host) > 0,
        "the scan starts once the webhooks are known"
    );
}

mod spill;
