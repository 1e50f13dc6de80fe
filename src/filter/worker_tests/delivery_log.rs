//! Delivery reports and claimed sends: what the registry is told, when, and what a claimed send
//! becomes; a registry that is down or answers nonsense costs reports, never deliveries.

use super::*;
use crate::filter::worker::{LogRequest, RegistryAnswer};
use crate::signature::SigningKey;

const PROXY_TOKEN: &str = "proxy-token-value";
const EVENT: &str = "6571a0b2c3d4e5f6a7b8c9d0";

fn worker_with(registry: Value) -> (FakeHost, Worker) {
    let host = FakeHost::default();
    let mut c = config(vec![], json!({"retrySchedule": ["1s", "2s"]}));
    c["registry"] = registry;
    let plan = Plan::from_json(c.to_string().as_bytes(), &|name| {
        (name == "REGISTRY_TOKEN").then(|| PROXY_TOKEN.to_string())
    })
    .unwrap();
    let mut w = Worker::new(&host, plan, None, "p", "w1".into());
    w.set_node("node-a");
    (host, w)
}

fn worker() -> (FakeHost, Worker) {
    worker_with(
        json!({"cluster": "registry", "authority": "registry.internal",
                       "tokenEnv": "REGISTRY_TOKEN", "pollMs": 1000, "reportFlushMs": 100}),
    )
}

/// The registry's first page: webhook 1 of ORG, and `pendingSends` when given.
fn load(host: &FakeHost, w: &mut Worker, pending: Option<bool>) {
    let mut hook = webhook(1, ORG);
    hook.as_object_mut().unwrap().remove("apiKey");
    hook["revision"] = json!(1);
    hook["apiKeys"] = json!([SIGNING_KEY]);
    let mut page = json!({"revision": 1, "next": 1, "more": false, "changes": [hook]});
    if let Some(p) = pending {
        page["pendingSends"] = json!(p);
    }
    assert!(w.registry_poll(host, 0).is_some());
    w.on_registry_answer(
        host,
        RegistryAnswer::Status {
            code: 200,
            body: page.to_string().into_bytes(),
        },
        0,
    );
    host.take_sent();
}

fn header(c: &crate::filter::testing::SentCallout, name: &str) -> String {
    c.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// The callouts to the registry since the last look, as (path, body).
fn to_registry(host: &FakeHost) -> Vec<(String, Value)> {
    host.take_sent()
        .into_iter()
        .filter(|c| c.cluster == "registry")
        .map(|c| {
            assert_eq!(header(&c, "authorization"), format!("Bearer {PROXY_TOKEN}"));
            assert_eq!(header(&c, ":method"), "POST");
            (
                header(&c, ":path"),
                serde_json::from_slice(&c.body).unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_attempt_is_reported_in_one_batch_per_flush_with_its_envelope_once() {
    let (host, mut w) = worker();
    load(&host, &mut w, Some(false));
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        1_000,
    );
    let (_, attempt) = w.pump(&host, 1_000).pop().unwrap();
    let event_id = attempt.delivery.event_id.to_string();
    w.on_answer(&host, attempt, &answer(b"503"), 1_012);
    let (_, attempt) = w.pump(&host, 3_000).pop().unwrap();
    w.on_answer(&host, attempt, &answer(b"204"), 3_005);
    host.take_sent();
    // Both attempts went into the batch opened at 1,012: one report at the flush.
    assert!(
        w.delivery_log_poll(&host, 1_050).is_empty(),
        "not before reportFlushMs"
    );
    let out = w.delivery_log_poll(&host, 3_010);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1, LogRequest::Report { records: 3 });
    let sent = to_registry(&host);
    assert_eq!(sent.len(), 1);
    let (path, body) = &sent[0];
    assert_eq!(path, "/v2/registry/reports");
    assert_eq!(body["proxy"], "node-a/w1");
    assert_eq!(body["events"].as_array().unwrap().len(), 1);
    assert_eq!(body["events"][0]["eventId"], event_id.as_str());
    let attempts = body["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["status"], 503);
    assert_eq!(attempts[0]["outcome"], "retrying");
    assert_eq!(attempts[0]["latencyMs"], 12);
    assert_eq!(attempts[0]["organisationId"], ORG);
    assert_eq!(attempts[0]["webhookId"], format!("{:024x}", 1));
    assert_eq!(attempts[1]["attempt"], 2);
    assert_eq!(attempts[1]["outcome"], "delivered");
    assert_eq!(attempts[1]["latencyMs"], 5);
    w.delivery_log_answer(&host, out[0].1, Some(204), None, 3_020);
    assert_eq!(host.metric("reports_sent"), 1);
    assert!(
        w.delivery_log_poll(&host, 10_000).is_empty(),
        "nothing new, nothing sent"
    );
}

#[test]
fn a_registry_that_is_down_costs_reports_not_deliveries() {
    let (host, mut w) = worker();
    load(&host, &mut w, Some(false));
    for round in 0..3u64 {
        let now = 10_000 * (round + 1);
        complete(
            &host,
            &mut w,
            ORG.as_bytes(),
            br#"{"status":"completed"}"#,
            now,
        );
        let (_, attempt) = w.pump(&host, now).pop().unwrap();
        w.on_answer(&host, attempt, &answer(b"200"), now + 1);
        let out = w.delivery_log_poll(&host, now + 200);
        assert_eq!(out.len(), 1);
        let status = [Some(503), None, Some(204)][round as usize];
        w.delivery_log_answer(&host, out[0].1, status, None, now + 300);
    }
    assert_eq!(host.metric("deliveries_succeeded"), 3);
    assert_eq!(host.metric("reports_dropped"), 2);
    assert_eq!(host.metric("reports_sent"), 1);
    assert_eq!(
        host.logged(LogLevel::Warn, "delivery report dropped"),
        1,
        "logged once"
    );
    assert_eq!(host.logged(LogLevel::Info, "reach the registry again"), 1);
    // A refused dispatch is a dropped batch too, and the delivery still goes.
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        50_000,
    );
    let (_, attempt) = w.pump(&host, 50_000).pop().unwrap();
    w.on_answer(&host, attempt, &answer(b"200"), 50_001);
    *host.refuse.borrow_mut() = Some(DispatchRefused::InternalFailure);
    assert!(w.delivery_log_poll(&host, 50_200).is_empty());
    assert_eq!(host.metric("reports_dropped"), 3);
    assert_eq!(host.metric("deliveries_succeeded"), 4);
}

#[test]
fn reports_are_bounded_while_the_registry_hangs() {
    let (host, mut w) = worker_with(json!({"cluster": "registry", "authority": "r",
        "tokenEnv": "REGISTRY_TOKEN", "reportFlushMs": 100, "maxReportBytes": 16384}));
    load(&host, &mut w, Some(false));
    let body = format!(r#"{{"status":"completed","pad":"{}"}}"#, "x".repeat(2_000));
    let mut out = 0;
    for i in 1..=200u64 {
        let now = i * 1_000;
        complete(&host, &mut w, ORG.as_bytes(), body.as_bytes(), now);
        let (_, attempt) = w.pump(&host, now).pop().unwrap();
        w.on_answer(&host, attempt, &answer(b"200"), now + 1);
        // Reports are never answered: at most two go out.
        out += w.delivery_log_poll(&host, now + 500).len();
    }
    assert_eq!(out, 2);
    for (_, body) in to_registry(&host) {
        assert!(body.to_string().len() <= 16_384);
    }
    assert_eq!(host.metric("deliveries_succeeded"), 200);
    // ~2.3 KB per record: 6 fit a batch; everything beyond the two out, one building and one
    // sealed was dropped, batch by batch.
    assert!(
        host.metric("reports_dropped") >= 25,
        "{}",
        host.metric("reports_dropped")
    );
    assert_eq!(host.logged(LogLevel::Warn, "delivery report dropped"), 1);
}

#[test]
fn reports_off_sends_nothing_but_the_feed() {
    let (host, mut w) = worker_with(json!({"cluster": "registry", "authority": "r",
        "tokenEnv": "REGISTRY_TOKEN", "reports": false}));
    load(&host, &mut w, Some(true));
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        1_000,
    );
    let (_, attempt) = w.pump(&host, 1_000).pop().unwrap();
    w.on_answer(&host, attempt, &answer(b"200"), 1_001);
    assert!(w.delivery_log_poll(&host, 100_000).is_empty());
    assert!(to_registry(&host).is_empty());
}

/// Polls the delivery log and answers every report 204.
fn answered(host: &FakeHost, w: &mut Worker, now: u64) {
    for (_, request) in w.delivery_log_poll(host, now) {
        w.delivery_log_answer(host, request, Some(204), None, now);
    }
}

fn claim_answer(sends: Vec<Value>) -> Vec<u8> {
    json!({"sends": sends, "leaseMs": 3_000})
        .to_string()
        .into_bytes()
}

fn send(id: u64, webhook: &str, org: &str) -> Value {
    json!({"sendId": id, "kind": "resend", "webhookId": webhook, "organisationId": org,
           "eventId": EVENT, "eventType": "job.completed",
           "body": format!("{{\"id\":\"{EVENT}\",\"resent\":\"é\"}}")})
}

#[test]
fn a_claimed_send_is_delivered_signed_with_its_original_id_and_reported_with_its_send_id() {
    let (host, mut w) = worker();
    load(&host, &mut w, Some(true));
    let out = w.delivery_log_poll(&host, 100);
    assert_eq!(out, vec![(out[0].0, LogRequest::Claim)]);
    let sent = to_registry(&host);
    assert_eq!(sent[0].0, "/v2/registry/sends/claim");
    assert_eq!(sent[0].1, json!({"proxy": "node-a/w1", "max": 16}));
    assert!(
        w.delivery_log_poll(&host, 150).is_empty(),
        "one claim at a time"
    );
    let hook = format!("{:024x}", 1);
    w.delivery_log_answer(
        &host,
        LogRequest::Claim,
        Some(200),
        Some(&claim_answer(vec![send(42, &hook, ORG)])),
        200,
    );
    assert_eq!(host.metric("sends_claimed"), 1);
    let (_, attempt) = w.pump(&host, 200).pop().expect("the send goes out");
    let callout = host.take_sent().pop().unwrap();
    assert_eq!(callout.cluster, "egress");
    let body = format!("{{\"id\":\"{EVENT}\",\"resent\":\"é\"}}");
    assert_eq!(callout.body, body.as_bytes(), "the exact bytes");
    assert_eq!(header(&callout, "webhook-id"), EVENT);
    let timestamp: u64 = header(&callout, "webhook-timestamp").parse().unwrap();
    assert_eq!(timestamp, 0, "a fresh timestamp: now");
    let key = SigningKey::parse(SIGNING_KEY).unwrap();
    assert!(key.verify(
        EVENT,
        timestamp,
        body.as_bytes(),
        &header(&callout, "webhook-signature")
    ));
    w.on_answer(&host, attempt, &answer(b"503"), 210);
    // Held while it is retried: each report renews its lease.
    let out = w.delivery_log_poll(&host, 400);
    assert_eq!(out.len(), 1);
    let report = &to_registry(&host)[0].1;
    assert_eq!(report["holding"], json!([42]));
    assert_eq!(report["attempts"][0]["sendId"], 42);
    assert_eq!(report["attempts"][0]["outcome"], "retrying");
    assert_eq!(report["events"], json!([]), "the registry has the envelope");
    w.delivery_log_answer(&host, out[0].1, Some(204), None, 410);
    // Nothing new to report: a report still renews the lease within a third of it.
    assert!(w.delivery_log_poll(&host, 900).is_empty());
    assert_eq!(w.delivery_log_poll(&host, 1_401).len(), 1);
    let renewal = &to_registry(&host)[0].1;
    assert_eq!(renewal["attempts"], json!([]));
    assert_eq!(renewal["holding"], json!([42]));
    let (_, attempt) = w.pump(&host, 2_000).pop().expect("retried");
    w.on_answer(&host, attempt, &answer(b"200"), 2_010);
    let out = w.delivery_log_poll(&host, 2_200);
    let last = &to_registry(&host)[0].1;
    assert_eq!(last["attempts"][0]["outcome"], "delivered");
    assert_eq!(last["attempts"][0]["sendId"], 42);
    assert_eq!(last["holding"], json!([]));
    assert_eq!(host.metric("sends_delivered"), 1);
    w.delivery_log_answer(&host, out[0].1, Some(204), None, 2_210);
    assert!(
        w.delivery_log_poll(&host, 60_000).is_empty(),
        "nothing held: no renewals"
    );
}

#[test]
fn a_send_this_proxy_cannot_deliver_is_reported_dropped() {
    let (host, mut w) = worker();
    load(&host, &mut w, Some(true));
    w.delivery_log_poll(&host, 100);
    host.take_sent();
    let hook = format!("{:024x}", 1);
    let mut no_body = send(44, &hook, ORG);
    no_body.as_object_mut().unwrap().remove("body");
    let sends = vec![
        send(42, &format!("{:024x}", 9), ORG), // not a webhook of this proxy
        send(43, &hook, OTHER_ORG),            // another organisation's
        no_body,
    ];
    w.delivery_log_answer(
        &host,
        LogRequest::Claim,
        Some(200),
        Some(&claim_answer(sends)),
        200,
    );
    assert!(w.pump(&host, 200).is_empty(), "nothing goes out");
    answered(&host, &mut w, 400);
    let report = &to_registry(&host)[0].1;
    let reasons: Vec<(u64, String)> = report["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["outcome"], "dropped");
            (
                a["sendId"].as_u64().unwrap(),
                a["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (44, "invalid_send".to_string()),
            (43, "unknown_webhook".to_string())
        ]
    );
    // Webhook 9 may be one this proxy's copy does not have yet: its send is held meanwhile...
    assert_eq!(report["holding"], json!([42]));
    answered(&host, &mut w, 9_000);
    // ...and dropped when the copy still does not have it 10 s later.
    answered(&host, &mut w, 10_300);
    answered(&host, &mut w, 10_500);
    let last = to_registry(&host).pop().unwrap().1;
    assert_eq!(last["attempts"][0]["sendId"], 42);
    assert_eq!(last["attempts"][0]["reason"], "unknown_webhook");
    assert_eq!(last["holding"], json!([]));
    assert!(w.pump(&host, 10_400).is_empty());
}

#[test]
fn a_send_for_a_webhook_the_copy_gets_later_is_delivered_then() {
    let (host, mut w) = worker();
    load(&host, &mut w, Some(true));
    w.delivery_log_poll(&host, 100);
    host.take_sent();
    let later = format!("{:024x}", 2);
    let claimed = claim_answer(vec![send(42, &later, ORG)]);
    w.delivery_log_answer(&host, LogRequest::Claim, Some(200), Some(&claimed), 200);
    assert!(w.pump(&host, 200).is_empty());
    // The next page brings webhook 2.
    let mut hook = webhook(2, ORG);
    hook.as_object_mut().unwrap().remove("apiKey");
    hook["revision"] = json!(2);
    hook["apiKeys"] = json!([SIGNING_KEY]);
    assert!(w.registry_poll(&host, 1_000).is_some());
    let page = json!({"revision": 2, "next": 2, "more": false, "changes": [hook]});
    let body = page.to_string().into_bytes();
    w.on_registry_answer(&host, RegistryAnswer::Status { code: 200, body }, 1_000);
    host.take_sent();
    w.delivery_log_poll(&host, 1_050);
    let (_, attempt) = w
        .pump(&host, 1_050)
        .pop()
        .expect("delivered once the copy has it");
    let callout = host.take_sent().pop().unwrap();
    assert_eq!(header(&callout, "webhook-id"), EVENT);
    w.on_answer(&host, attempt, &answer(b"200"), 1_060);
    assert_eq!(host.metric("sends_delivered"), 1);
}

#[test]
fn sends_are_claimed_only_when_the_feed_says_so_or_slowly_when_it_does_not_say() {
    let (host, mut w) = worker();
    // A feed that does not say: a claim at once, then not for 30 s...
    load(&host, &mut w, None);
    assert_eq!(w.delivery_log_poll(&host, 50).len(), 1);
    w.delivery_log_answer(
        &host,
        LogRequest::Claim,
        Some(200),
        Some(&claim_answer(vec![])),
        60,
    );
    assert!(w.delivery_log_poll(&host, 80).is_empty());
    // ...unless a page says sends wait.
    w.sends_pending_for_tests(Some(true));
    assert_eq!(w.delivery_log_poll(&host, 300).len(), 1);
    w.delivery_log_answer(
        &host,
        LogRequest::Claim,
        Some(200),
        Some(&claim_answer(vec![])),
        310,
    );
    w.sends_pending_for_tests(Some(false));
    assert!(w.delivery_log_poll(&host, 400).is_empty());
    // The feed says sends wait: one claim, then none until the feed says so again.
    w.sends_pending_for_tests(Some(true));
    assert_eq!(w.delivery_log_poll(&host, 600).len(), 1);
    let empty = claim_answer(vec![]);
    w.delivery_log_answer(&host, LogRequest::Claim, Some(200), Some(&empty), 610);
    assert!(w.delivery_log_poll(&host, 1_000).is_empty());
    // A registry whose feed does not say: every 30 s.
    w.sends_pending_for_tests(None);
    assert!(w.delivery_log_poll(&host, 1_100).is_empty());
    assert_eq!(w.delivery_log_poll(&host, 30_700).len(), 1);
    w.delivery_log_answer(&host, LogRequest::Claim, Some(404), Some(b"{}"), 30_710);
    assert_eq!(
        host.logged(LogLevel::Warn, "claiming queued sends failed"),
        1
    );
    assert!(w.delivery_log_poll(&host, 50_000).is_empty());
    assert_eq!(w.delivery_log_poll(&host, 60_800).len(), 1);
    // An answer that is not a claim answer changes nothing.
    w.delivery_log_answer(&host, LogRequest::Claim, Some(200), Some(b"\xff"), 60_810);
    assert!(w.pump(&host, 60_900).is_empty());
}
