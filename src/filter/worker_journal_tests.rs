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

#[test]
fn the_record_is_written_beside_the_first_attempt_and_deleted_after_it() {
    let host = FakeHost::default();
    let mut worker = live_worker(&host);
    worker.on_stream_outcome(
        &host,
        crate::stream::StreamOutcome::Event(event(1_700_000_000)),
        1_000,
    );
    // One pump: the attempt and the journal put leave together.
    let mut attempts = worker.pump(&host, 1_000);
    let mut journal = worker.journal_poll(&host, 1_000);
    let sent = host.take_sent();
    let clusters: Vec<&str> = sent.iter().map(|c| c.cluster.as_str()).collect();
    assert!(clusters.contains(&"egress") && clusters.contains(&"etcd"));
    let put = sent
        .iter()
        .find(|c| header(c, ":path") == "/v3/kv/put")
        .expect("put");
    let event_id = event(1_700_000_000).id_hex;
    assert_eq!(request_key(put), format!("wh/records/{OWNER}/{event_id}"));
    assert!(!String::from_utf8_lossy(&put.body).contains("whsec_"));

    let (_, attempt) = attempts.remove(0);
    worker.on_answer(&host, attempt, &ok(b"200"), 1_010);
    let journal_puts = journal
        .iter()
        .position(|(_, p)| matches!(p, Purpose::Write { .. }))
        .expect("write");
    let (_, write) = journal.remove(journal_puts);
    worker.journal_answer(&host, write, Some(200), Some(b"{}"), 1_020);
    assert_eq!(host.metric("journal_records"), 1);
    let _ = worker.journal_poll(&host, 1_030);
    let delete = host
        .take_sent()
        .into_iter()
        .find(|c| header(c, ":path") == "/v3/kv/deleterange")
        .expect("the record is deleted once delivered");
    assert_eq!(
        request_key(&delete),
        format!("wh/records/{OWNER}/{event_id}")
    );
}

#[test]
fn an_unreachable_journal_is_logged_and_counted_and_delivery_goes_on() {
    let host = FakeHost::default();
    let mut worker = live_worker(&host);
    worker.on_stream_outcome(
        &host,
        crate::stream::StreamOutcome::Event(event(1_700_000_000)),
        1_000,
    );
    let mut attempts = worker.pump(&host, 1_000);
    let mut journal = worker.journal_poll(&host, 1_000);
    let (_, write) = journal.remove(
        journal
            .iter()
            .position(|(_, p)| matches!(p, Purpose::Write { .. }))
            .expect("write"),
    );
    worker.journal_answer(&host, write, None, None, 1_005);
    assert_eq!(host.metric("journal_unavailable"), 1);
    assert_eq!(host.metric("journal_writes_failed"), 1);
    assert_eq!(
        host.logged(
            LogLevel::Warn,
            "journal unavailable (record write: no answer)"
        ),
        1
    );
    let (_, attempt) = attempts.remove(0);
    worker.on_answer(&host, attempt, &ok(b"204"), 1_010);
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
