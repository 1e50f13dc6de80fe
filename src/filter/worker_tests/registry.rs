//! The registry pull's decisions: the feed's pages followed back to back, changes applied once
//! a catch-up ends, failures logged with their reason and counted, the gauges that say how far
//! behind the proxy is, and events that wait for the first complete listing.

use super::*;
use crate::filter::worker::RegistryAnswer;
use crate::signature::SigningKey;

const PROXY_TOKEN: &str = "proxy-token-value";
const NEW_KEY: &str = "whsec_Q2hhbmdlZCBrZXkgZm9yIHRoZSByb3RhdGlvbiB0ZXN0cw==";

fn registry_config() -> Value {
    let mut c = config(vec![], json!({}));
    c["registry"] = json!({"cluster": "registry", "authority": "registry.internal",
                           "tokenEnv": "REGISTRY_TOKEN", "pollMs": 1000});
    c
}

fn worker(host: &FakeHost) -> Worker {
    let plan = Plan::from_json(registry_config().to_string().as_bytes(), &|name| {
        (name == "REGISTRY_TOKEN").then(|| PROXY_TOKEN.to_string())
    })
    .unwrap();
    Worker::new(host, plan, None, "p", "w1".into())
}

fn entry(n: usize, revision: u64, status: &str, keys: Value, expires: Option<u64>) -> Value {
    let mut hook = webhook(n, ORG);
    hook.as_object_mut().unwrap().remove("apiKey");
    hook["revision"] = json!(revision);
    hook["status"] = json!(status);
    hook["apiKeys"] = keys;
    if let Some(e) = expires {
        hook["previousKeyExpiresAt"] = json!(e);
    }
    hook
}

fn enabled(n: usize, revision: u64) -> Value {
    entry(n, revision, "enabled", json!([SIGNING_KEY]), None)
}

fn page(revision: u64, next: u64, more: bool, changes: Vec<Value>) -> RegistryAnswer {
    RegistryAnswer::Status {
        code: 200,
        body: json!({"revision": revision, "next": next, "more": more, "changes": changes})
            .to_string()
            .into_bytes(),
    }
}

fn status(code: u16, body: &[u8]) -> RegistryAnswer {
    RegistryAnswer::Status {
        code,
        body: body.to_vec(),
    }
}

fn path_of(host: &FakeHost) -> String {
    let sent = host.take_sent();
    let poll = sent
        .iter()
        .find(|c| c.cluster == "registry")
        .expect("a poll");
    poll.headers
        .iter()
        .find(|(k, _)| k == ":path")
        .map(|(_, v)| v.clone())
        .unwrap()
}

/// Polls at `now` and hands in `answer`.
fn poll(host: &FakeHost, w: &mut Worker, now: u64, answer: RegistryAnswer) -> String {
    assert!(w.registry_poll(host, now).is_some(), "a poll at {now}");
    let path = path_of(host);
    w.on_registry_answer(host, answer, now);
    path
}

#[test]
fn the_poll_carries_the_proxy_token_and_the_cursor_and_follows_more_at_once() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    assert!(w.registry_poll(&host, 0).is_some());
    assert!(w.registry_poll(&host, 10).is_none(), "one poll at a time");
    let sent = host.take_sent();
    let header = |name: &str| {
        sent[0]
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(sent[0].cluster, "registry");
    assert_eq!(
        header("authorization").as_deref(),
        Some("Bearer proxy-token-value")
    );
    assert_eq!(
        header(":path").as_deref(),
        Some("/v2/registry/changes?since=0")
    );
    w.on_registry_answer(&host, page(9, 4, true, vec![enabled(1, 4)]), 5);
    // More pages: the next goes at once, not after pollMs.
    let path = poll(&host, &mut w, 6, page(9, 9, false, vec![enabled(2, 9)]));
    assert_eq!(path, "/v2/registry/changes?since=4");
    assert!(
        w.registry_poll(&host, 500).is_none(),
        "caught up: not before pollMs"
    );
    let path = poll(&host, &mut w, 1_006, page(9, 9, false, vec![]));
    assert_eq!(path, "/v2/registry/changes?since=9");
    assert_eq!(w.webhook_count(), 2);
    assert_eq!(
        host.metric("registry_updates"),
        1,
        "the empty page changes nothing"
    );
    assert_eq!(host.metric("registry_webhooks"), 2);
    assert!(host
        .logs
        .borrow()
        .iter()
        .all(|(_, m)| !m.contains(PROXY_TOKEN)));
}

#[test]
fn events_before_the_first_complete_listing_wait_for_it_counted_under_their_own_reason() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    for _ in 0..2 {
        complete(
            &host,
            &mut w,
            ORG.as_bytes(),
            br#"{"status":"completed"}"#,
            0,
        );
    }
    assert!(w.pump(&host, 0).is_empty());
    assert_eq!(host.metric("events_registry_not_loaded"), 2);
    assert_eq!(host.metric("events_without_subscribers"), 0);
    poll(&host, &mut w, 0, page(2, 1, true, vec![enabled(7, 1)]));
    assert!(w.pump(&host, 1).is_empty(), "not before the listing ends");
    poll(&host, &mut w, 2, page(2, 2, false, vec![enabled(8, 2)]));
    assert_eq!(w.pump(&host, 10).len(), 4, "two events to two webhooks");
    assert_eq!(host.metric("registry_updates"), 1);
    assert_eq!(
        host.logged(
            LogLevel::Info,
            "registry revision 2 applied (first): 2 registry webhooks in force"
        ),
        1
    );
    complete(
        &host,
        &mut w,
        OTHER_ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        20,
    );
    assert_eq!(host.metric("events_without_subscribers"), 1);
    assert_eq!(host.metric("events_registry_not_loaded"), 2);
}

#[test]
fn failures_keep_the_copy_in_force_and_are_logged_with_their_reason_once_until_recovery() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    poll(&host, &mut w, 0, page(1, 1, false, vec![enabled(7, 1)]));
    let over_limit = "the answer is over this Envoy's callout answer limit";
    poll(
        &host,
        &mut w,
        1_000,
        RegistryAnswer::Failed(over_limit.into()),
    );
    poll(
        &host,
        &mut w,
        2_000,
        RegistryAnswer::Failed("no answer".into()),
    );
    poll(
        &host,
        &mut w,
        3_000,
        status(
            503,
            br#"{"errors":[{"path":"","message":"database down"}]}"#,
        ),
    );
    poll(&host, &mut w, 4_000, status(200, b"\xff{"));
    poll(&host, &mut w, 5_000, page(1, 0, false, vec![]));
    assert_eq!(host.metric("registry_fetch_failed"), 5);
    assert_eq!(
        host.logged(LogLevel::Warn, &format!("registry poll failed ({over_limit}): the copy complete at revision 1 stays in force")),
        1
    );
    assert_eq!(
        host.logged(LogLevel::Warn, "registry poll failed"),
        1,
        "once until recovery"
    );
    for reason in [
        "the registry answered 503: database down",
        "the page is not JSON",
        "broken cursor: asked for changes since 1",
    ] {
        assert_eq!(host.logged(LogLevel::Debug, reason), 1, "{reason}");
    }
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        5_100,
    );
    assert_eq!(
        w.pump(&host, 5_100).len(),
        1,
        "deliveries go on from the copy in force"
    );
    // The age of the last complete sync grows while polls fail.
    assert!(
        host.metric("registry_sync_age_ms") >= 4_000,
        "{}",
        host.metric("registry_sync_age_ms")
    );
    poll(&host, &mut w, 6_000, page(3, 3, false, vec![]));
    assert_eq!(host.logged(LogLevel::Info, "registry reachable again"), 1);
    assert_eq!(host.metric("registry_sync_age_ms"), 0);
    assert_eq!(host.metric("registry_revision_lag"), 0);
}

#[test]
fn the_revision_lag_shows_a_proxy_behind_until_its_catch_up_ends() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    poll(&host, &mut w, 0, page(10, 4, true, vec![enabled(1, 4)]));
    assert_eq!(
        host.metric("registry_revision_lag"),
        10,
        "nothing complete yet"
    );
    poll(&host, &mut w, 1, page(10, 10, false, vec![enabled(2, 10)]));
    assert_eq!(host.metric("registry_revision_lag"), 0);
    poll(
        &host,
        &mut w,
        1_001,
        page(30, 20, true, vec![enabled(3, 20)]),
    );
    assert_eq!(host.metric("registry_revision_lag"), 20);
}

#[test]
fn a_410_lists_again_and_the_webhooks_it_did_not_contain_go_when_it_ends() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    poll(
        &host,
        &mut w,
        0,
        page(2, 2, false, vec![enabled(1, 1), enabled(2, 2)]),
    );
    let gone = br#"{"errors":[{"path":"since","message":"cursor 2 is older than the compaction point 40: list again from 0"}]}"#;
    poll(&host, &mut w, 1_000, status(410, gone));
    assert_eq!(host.metric("registry_relists"), 1);
    assert_eq!(host.metric("registry_fetch_failed"), 0);
    let path = poll(
        &host,
        &mut w,
        1_001,
        page(50, 40, true, vec![enabled(2, 40)]),
    );
    assert_eq!(path, "/v2/registry/changes?since=0", "at once, from 0");
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        1_002,
    );
    assert_eq!(
        w.pump(&host, 1_002).len(),
        2,
        "the old copy is in force until the listing ends"
    );
    poll(
        &host,
        &mut w,
        1_003,
        page(50, 50, false, vec![enabled(3, 50)]),
    );
    host.take_sent();
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        1_004,
    );
    assert_eq!(w.pump(&host, 1_004).len(), 2);
    let mut ids: Vec<String> = host
        .take_sent()
        .iter()
        .map(|c| {
            serde_json::from_slice::<Value>(&c.body).unwrap()["webhookId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, [format!("{:024x}", 2), format!("{:024x}", 3)]);
    assert_eq!(
        host.logged(LogLevel::Info, "1 forgotten by a new listing"),
        1
    );
}

#[test]
fn a_delete_and_a_disable_drop_queued_deliveries_and_a_rotated_key_signs_beside_the_new_one() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    poll(
        &host,
        &mut w,
        0,
        page(2, 2, false, vec![enabled(7, 1), enabled(8, 2)]),
    );
    // Rotation: the new key first, the old one until its expiry (Unix seconds).
    let rotated = entry(7, 3, "enabled", json!([NEW_KEY, SIGNING_KEY]), Some(100));
    poll(&host, &mut w, 1_000, page(3, 3, false, vec![rotated]));
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        2_000,
    );
    host.take_sent();
    let out = w.pump(&host, 2_000);
    let sent = host.take_sent();
    let to_7 = sent
        .iter()
        .find(|c| String::from_utf8_lossy(&c.body).contains(&format!("{:024x}", 7)))
        .unwrap();
    let header = |name: &str| {
        to_7.headers
            .iter()
            .find(|(k, _)| k == name)
            .unwrap()
            .1
            .clone()
    };
    let timestamp: u64 = header("webhook-timestamp").parse().unwrap();
    for key in [NEW_KEY, SIGNING_KEY] {
        let key = SigningKey::parse(key).unwrap();
        assert!(key.verify(
            &header("webhook-id"),
            timestamp,
            &to_7.body,
            &header("webhook-signature")
        ));
    }
    for (_, attempt) in out {
        w.on_answer(&host, attempt, &answer(b"503"), 2_001);
    }
    // Both retry later; one is disabled and the other deleted: their queued deliveries go.
    let disabled = entry(7, 4, "disabled", json!([NEW_KEY]), None);
    let deleted =
        json!({"revision": 5, "id": format!("{:024x}", 8), "organisationId": ORG, "deleted": true});
    poll(
        &host,
        &mut w,
        3_000,
        page(5, 5, false, vec![disabled, deleted]),
    );
    assert_eq!(host.metric("deliveries_dropped.webhook_removed"), 2);
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        3_100,
    );
    assert!(w.pump(&host, 10_000).is_empty());
    assert_eq!(host.metric("events_without_subscribers"), 1);
    assert_eq!(host.metric("registry_webhooks"), 0);
}

#[test]
fn configured_webhooks_do_not_wait_for_the_registry() {
    let host = FakeHost::default();
    let mut c = registry_config();
    c["webhooks"] = json!([webhook(1, ORG)]);
    let plan = Plan::from_json(c.to_string().as_bytes(), &|name| {
        (name == "REGISTRY_TOKEN").then(|| PROXY_TOKEN.to_string())
    })
    .unwrap();
    let mut w = Worker::new(&host, plan, None, "p", "w1".into());
    complete(
        &host,
        &mut w,
        ORG.as_bytes(),
        br#"{"status":"completed"}"#,
        0,
    );
    let first = w.pump(&host, 0);
    assert_eq!(first.len(), 1, "the configured webhook has it at once");
    for (_, attempt) in first {
        w.on_answer(&host, attempt, &answer(b"200"), 1);
    }
    poll(&host, &mut w, 0, page(1, 1, false, vec![enabled(7, 1)]));
    let later = w.pump(&host, 10);
    assert_eq!(
        later.len(),
        1,
        "the registry's webhook gets it with the first listing, once"
    );
    let sent = host.take_sent();
    let v: Value = serde_json::from_slice(&sent.last().unwrap().body).unwrap();
    assert_eq!(v["webhookId"], format!("{:024x}", 7));
}

#[test]
fn a_new_configuration_keeps_the_copy_in_force_and_lists_again() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    poll(&host, &mut w, 0, page(1, 1, false, vec![enabled(7, 1)]));
    let plan = Plan::from_json(registry_config().to_string().as_bytes(), &|_| {
        Some("t".into())
    })
    .unwrap();
    w.adopt(&host, plan);
    assert_eq!(w.webhook_count(), 1);
    let path = poll(&host, &mut w, 10, page(1, 1, false, vec![enabled(7, 1)]));
    assert_eq!(path, "/v2/registry/changes?since=0");
    assert_eq!(w.webhook_count(), 1);
}

#[test]
fn a_failure_in_the_middle_of_a_catch_up_waits_for_poll_ms_before_the_next_try() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    poll(&host, &mut w, 0, page(9, 4, true, vec![enabled(1, 4)]));
    poll(&host, &mut w, 1, status(503, b""));
    assert!(
        w.registry_poll(&host, 2).is_none(),
        "no tight loop on a failing registry"
    );
    assert!(w.registry_poll(&host, 999).is_none());
    let path = poll(&host, &mut w, 1_001, page(9, 9, false, vec![enabled(2, 9)]));
    assert_eq!(path, "/v2/registry/changes?since=4", "the cursor stayed");
    assert_eq!(w.webhook_count(), 2);
}

#[test]
fn a_configuration_without_registry_drops_the_waiting_events_loudly_and_zeroes_the_gauges() {
    let host = FakeHost::default();
    let mut w = worker(&host);
    for _ in 0..2 {
        complete(
            &host,
            &mut w,
            ORG.as_bytes(),
            br#"{"status":"completed"}"#,
            0,
        );
    }
    // A listing that has begun and not ended: the events wait, the gauges moved.
    poll(&host, &mut w, 0, page(9, 4, true, vec![enabled(1, 4)]));
    poll(&host, &mut w, 1, status(503, b""));
    assert!(w.registry_poll(&host, 3_000).is_some());
    assert_ne!(host.metric("registry_revision_lag"), 0);
    assert_ne!(host.metric("registry_sync_age_ms"), 0);
    w.adopt(&host, plan(&config(vec![], json!({}))));
    assert_eq!(host.metric("events_dropped.registry_not_loaded"), 2);
    assert_eq!(
        host.logged(
            LogLevel::Error,
            "reason=a new configuration removed registry before its first complete listing"
        ),
        2
    );
    let logs = host.logs.borrow();
    let line = logs
        .iter()
        .find(|(_, m)| m.contains("removed registry"))
        .map(|(_, m)| m.clone())
        .unwrap();
    let id = line
        .split("event=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap();
    assert_eq!(id.len(), 24, "the event id is in the line: {line}");
    drop(logs);
    for gauge in [
        "registry_webhooks",
        "registry_revision_lag",
        "registry_sync_age_ms",
    ] {
        assert_eq!(host.metric(gauge), 0, "{gauge}");
    }
    assert!(w.pump(&host, 10).is_empty());
}

#[test]
fn events_waiting_for_the_registry_count_against_the_outbox_bounds() {
    let host = FakeHost::default();
    let mut c = registry_config();
    c["webhooks"] = json!([webhook(1, ORG)]);
    c["delivery"]["maxQueued"] = json!(4);
    let plan = Plan::from_json(c.to_string().as_bytes(), &|name| {
        (name == "REGISTRY_TOKEN").then(|| PROXY_TOKEN.to_string())
    })
    .unwrap();
    let mut w = Worker::new(&host, plan, None, "p", "w1".into());
    for _ in 0..3 {
        complete(
            &host,
            &mut w,
            ORG.as_bytes(),
            br#"{"status":"completed"}"#,
            0,
        );
    }
    // Two deliveries to the configured webhook and two events waiting fill maxQueued 4.
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 1);
    assert_eq!(host.metric("events_dropped.registry_not_loaded"), 1);
    poll(&host, &mut w, 0, page(1, 1, false, vec![enabled(7, 1)]));
    assert_eq!(
        w.pump(&host, 10).len(),
        4,
        "the waiting events take their places in the outbox"
    );
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 1);
}

#[test]
fn webhooks_beyond_max_webhooks_are_refused_counted_and_logged_once_a_second() {
    let host = FakeHost::default();
    let mut c = registry_config();
    c["registry"]["maxWebhooks"] = json!(2);
    c["registry"]["pollMs"] = json!(100);
    let plan = Plan::from_json(c.to_string().as_bytes(), &|name| {
        (name == "REGISTRY_TOKEN").then(|| PROXY_TOKEN.to_string())
    })
    .unwrap();
    let mut w = Worker::new(&host, plan, None, "p", "w1".into());
    let first: Vec<Value> = (1..=4).map(|n| enabled(n, n as u64)).collect();
    poll(&host, &mut w, 0, page(4, 4, false, first));
    assert_eq!(w.webhook_count(), 2);
    assert_eq!(host.metric("registry_webhooks_skipped"), 2);
    let line = format!(
        "registry webhook skipped: {:024x} (1 more since the last such line): registry.maxWebhooks (2)",
        3
    );
    assert_eq!(host.logged(LogLevel::Warn, &line), 1);
    // A webhook in force still changes; a new one is refused, its line held back within the second.
    let again = vec![enabled(1, 5), enabled(5, 6)];
    poll(&host, &mut w, 200, page(6, 6, false, again));
    assert_eq!(w.webhook_count(), 2);
    assert_eq!(host.metric("registry_webhooks_skipped"), 3);
    assert_eq!(host.logged(LogLevel::Warn, "registry webhook skipped"), 1);
    // Room again after a delete: the next new one gets in.
    let room = vec![
        entry(2, 7, "enabled", json!([SIGNING_KEY]), None),
        json!({"id": format!("{:024x}", 1), "revision": 8, "deleted": true}),
        enabled(6, 9),
        enabled(7, 10),
    ];
    poll(&host, &mut w, 1_500, page(10, 10, false, room));
    assert_eq!(w.webhook_count(), 2);
    assert_eq!(host.metric("registry_webhooks_skipped"), 4);
    assert_eq!(
        host.logged(
            LogLevel::Warn,
            &format!(
                "registry webhook skipped: {:024x} (1 more since the last such line)",
                7
            )
        ),
        1,
        "the line says how many were held back"
    );
}
