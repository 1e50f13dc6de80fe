//! The worker spills what the outbox has no room for to the journal and pages it back in.

use super::*;

fn take_purpose(out: &mut Vec<(u32, Purpose)>, pred: impl Fn(&Purpose) -> bool) -> Purpose {
    let i = out
        .iter()
        .position(|(_, p)| pred(p))
        .expect("a request of that kind");
    out.remove(i).1
}

#[test]
fn a_delivery_the_outbox_has_no_room_for_waits_in_etcd_and_comes_back() {
    let host = FakeHost::default();
    let mut config = config();
    config["delivery"]["maxQueued"] = json!(1);
    let mut worker = live_worker_with(&host, plan_from(config));
    for seconds in [1_700_000_000, 1_700_000_001] {
        worker.on_stream_outcome(
            &host,
            crate::stream::StreamOutcome::Event(event(seconds)),
            1_000,
        );
    }
    assert_eq!(host.metric("deliveries_spilled"), 1);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 0);
    let mut attempts = worker.pump(&host, 1_000);
    assert_eq!(attempts.len(), 1, "only the first event is in memory");
    // Both records leave in one batch.
    let _ = worker.journal_poll(&host, 1_000);
    assert_eq!(host.logged(LogLevel::Warn, "spilled to the journal"), 1);
    let mut journal = worker.journal_poll(&host, 1_030);
    let sent = host.take_sent();
    let batch = txns(&sent).pop().expect("a batch");
    let puts: Vec<Value> = batch["success"].as_array().expect("ops").clone();
    assert_eq!(puts.len(), 2);
    let spilled_id = event(1_700_000_001).id_hex;
    let spilled_key = format!("wh/records/{OWNER}/{spilled_id}");
    let record = puts
        .iter()
        .map(|op| &op["request_put"])
        .find(|put| {
            B64.decode(put["key"].as_str().expect("key")).expect("b64") == spilled_key.as_bytes()
        })
        .expect("the spilled event's record")
        .clone();
    let batch = take_purpose(&mut journal, |p| matches!(p, Purpose::Batch { .. }));
    worker.journal_answer(
        &host,
        batch,
        Some(200),
        Some(br#"{"succeeded":true}"#),
        1_040,
    );
    // The first delivery succeeds: room frees, the spilled one is read back from etcd.
    let (_, attempt) = attempts.remove(0);
    worker.on_answer(&host, attempt, &ok(b"200"), 1_050);
    let mut journal = worker.journal_poll(&host, 1_060);
    let sent = host.take_sent();
    let read = txns(&sent).pop().expect("a page-in read");
    let read_key = B64
        .decode(
            read["success"][0]["request_range"]["key"]
                .as_str()
                .expect("a read"),
        )
        .expect("b64");
    assert_eq!(read_key, spilled_key.as_bytes());
    let page_in = take_purpose(&mut journal, |p| matches!(p, Purpose::PageIn { .. }));
    let answer = json!({"succeeded": true, "responses": [{"response_range": {"kvs": [
        {"key": record["key"], "value": record["value"], "mod_revision": "3"}
    ]}}]});
    worker.journal_answer(
        &host,
        page_in,
        Some(200),
        Some(answer.to_string().as_bytes()),
        1_070,
    );
    assert_eq!(host.metric("deliveries_paged_in"), 1);
    let attempts = worker.pump(&host, 1_080);
    assert_eq!(attempts.len(), 1);
    let sent = host.take_sent();
    let delivery = sent
        .iter()
        .find(|c| c.cluster == "egress")
        .expect("the paged-in delivery");
    assert_eq!(header(delivery, "webhook-id"), spilled_id);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 0);
}

#[test]
fn without_a_journal_the_outbox_drops_as_before() {
    let host = FakeHost::default();
    let mut config = config();
    config["delivery"]["maxQueued"] = json!(1);
    config["delivery"]
        .as_object_mut()
        .expect("delivery")
        .remove("journal");
    let mut worker = Worker::new(
        &host,
        plan_from(config),
        Some(1),
        "webhook_emitter",
        "w1".into(),
    );
    for seconds in [1_700_000_000, 1_700_000_001] {
        worker.on_stream_outcome(
            &host,
            crate::stream::StreamOutcome::Event(event(seconds)),
            1_000,
        );
    }
    assert_eq!(host.metric("deliveries_spilled"), 0);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_full"), 0);
    assert_eq!(host.metric("deliveries_dropped.journal_behind"), 0);
    let line = format!(
        "delivery dropped: event={} webhook={HOOK} reason=the outbox is full (delivery.maxQueued)",
        event(1_700_000_001).id_hex
    );
    assert_eq!(host.logged(LogLevel::Error, &line), 1);
    assert_eq!(host.logged(LogLevel::Error, " and the journal"), 0);
}

/// Two webhooks, `maxQueued` 3: the second delivers each event at once, the first holds one out
/// and one queued after two events. The third event: the first webhook takes the last place,
/// then the second (below its share) takes it back, evicting that same event's delivery.
fn evict_own_fan_out(host: &FakeHost, journal: Value) {
    let mut config = config();
    let mut second = config["webhooks"][0].clone();
    second["id"] = json!("000000000000000000000002");
    second["url"] = json!("https://other.example.com/in");
    config["webhooks"]
        .as_array_mut()
        .expect("webhooks")
        .push(second);
    config["delivery"]["maxQueued"] = json!(3);
    config["delivery"]["maxInFlightPerWebhook"] = json!(1);
    for (k, v) in journal.as_object().expect("journal fields") {
        config["delivery"]["journal"][k] = v.clone();
    }
    let mut worker = live_worker_with(host, plan_from(config));
    let emit = |worker: &mut Worker, seconds: u64, now: u64| {
        worker.on_stream_outcome(
            host,
            crate::stream::StreamOutcome::Event(event(seconds)),
            now,
        );
    };
    let mut answered = 0;
    for (seconds, now) in [(1_700_000_000, 1_000), (1_700_000_001, 1_010)] {
        emit(&mut worker, seconds, now);
        for (_, attempt) in worker.pump(host, now + 1) {
            if attempt.lane.name() == "000000000000000000000002" {
                worker.on_answer(host, attempt, &ok(b"200"), now + 2);
                answered += 1;
            }
        }
    }
    assert_eq!(answered, 2);
    assert_eq!(worker.outbox().queued(), 2);
    emit(&mut worker, 1_700_000_002, 1_100);
}

#[test]
fn a_delivery_evicted_by_its_own_events_fan_out_spills_too() {
    let host = FakeHost::default();
    evict_own_fan_out(&host, json!({}));
    // The evicted delivery spills, it is not dropped.
    assert_eq!(host.metric("deliveries_dropped.over_share"), 0);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 0);
    assert_eq!(host.metric("deliveries_spilled"), 1);
}

#[test]
fn an_evicted_delivery_the_full_journal_cannot_take_names_the_journal_bound() {
    let host = FakeHost::default();
    // Less than any record: the journal is full from the start.
    evict_own_fan_out(&host, json!({"maxSpilledBytes": 1}));
    assert_eq!(host.metric("deliveries_spilled"), 0);
    assert_eq!(host.metric("deliveries_dropped.journal_full"), 1);
    assert_eq!(host.metric("deliveries_dropped.over_share"), 0);
    let line = format!(
        "delivery dropped: event={} webhook={HOOK} reason=the outbox is full, this webhook holds more than its fair share and the journal holds journal.maxSpilledBytes (1 bytes) of spilled deliveries",
        event(1_700_000_002).id_hex
    );
    assert_eq!(host.logged(LogLevel::Error, &line), 1, "{line}");
    // With spilling off, the same eviction is the outbox's drop, as without a journal.
    let host = FakeHost::default();
    evict_own_fan_out(&host, json!({"maxSpilledBytes": 0}));
    assert_eq!(host.metric("deliveries_dropped.over_share"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_full"), 0);
    assert_eq!(
        host.logged(
            LogLevel::Error,
            "reason=the outbox is full and this webhook holds more than its fair share"
        ),
        1
    );
}

/// The bytes of one event's envelope in the outbox, measured on a worker without a journal.
fn envelope_bytes() -> usize {
    let host = FakeHost::default();
    let mut config = config();
    config["delivery"]
        .as_object_mut()
        .expect("delivery")
        .remove("journal");
    let mut worker = Worker::new(
        &host,
        plan_from(config),
        Some(1),
        "webhook_emitter",
        "w".into(),
    );
    worker.on_stream_outcome(
        &host,
        crate::stream::StreamOutcome::Event(event(1_700_000_000)),
        1_000,
    );
    usize::try_from(host.metric("outbox_bytes")).expect("a size")
}

/// A worker whose outbox holds one delivery, with a journal bounded by `journal` fields, its
/// registry loaded (empty) so that its drops are reported.
fn reporting_worker(host: &FakeHost, delivery: Value) -> Worker {
    let mut config = config();
    for (k, v) in delivery.as_object().expect("fields") {
        if k == "journal" {
            for (jk, jv) in v.as_object().expect("journal fields") {
                config["delivery"]["journal"][jk] = jv.clone();
            }
        } else {
            config["delivery"][k] = v.clone();
        }
    }
    config["registry"] = json!({"cluster": "registry", "authority": "registry.internal",
        "tokenEnv": "REGISTRY_TOKEN", "pollMs": 1000, "reportFlushMs": 100});
    let mut worker = live_worker_with(host, plan_from(config));
    assert!(worker.registry_poll(host, 2).is_some());
    let page = json!({"revision": 1, "next": 1, "more": false, "changes": []});
    worker.on_registry_answer(
        host,
        RegistryAnswer::Status {
            code: 200,
            body: page.to_string().into_bytes(),
        },
        3,
    );
    host.take_sent();
    worker
}

/// The reasons of the dropped deliveries in the reports sent since the last look.
fn reported_drops(host: &FakeHost, worker: &mut Worker, now_ms: u64) -> Vec<(String, String)> {
    let _ = worker.delivery_log_poll(host, now_ms);
    host.take_sent()
        .iter()
        .filter(|c| c.cluster == "registry" && header(c, ":path").ends_with("/reports"))
        .flat_map(|c| {
            let body: Value = serde_json::from_slice(&c.body).expect("JSON");
            body["attempts"].as_array().cloned().unwrap_or_default()
        })
        .filter(|a| a["outcome"] == "dropped")
        .map(|a| {
            (
                a["eventId"].as_str().unwrap_or_default().to_string(),
                a["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn emit(host: &FakeHost, worker: &mut Worker, seconds: &[u64]) {
    for &s in seconds {
        worker.on_stream_outcome(host, crate::stream::StreamOutcome::Event(event(s)), 1_000);
    }
}

#[test]
fn past_max_spilled_bytes_a_drop_names_the_journal_bound_not_the_outbox() {
    let host = FakeHost::default();
    // Room in etcd for one spilled record (one webhook), not two.
    let max = envelope_bytes() + 512 + 128;
    let mut worker = reporting_worker(
        &host,
        json!({"maxQueued": 1, "journal": {"maxSpilledBytes": max}}),
    );
    emit(
        &host,
        &mut worker,
        &[1_700_000_000, 1_700_000_001, 1_700_000_002],
    );
    assert_eq!(host.metric("deliveries_spilled"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_full"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_behind"), 0);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 0);
    let dropped = event(1_700_000_002).id_hex;
    let line = format!(
        "delivery dropped: event={dropped} webhook={HOOK} reason=the outbox is full (delivery.maxQueued) and the journal holds journal.maxSpilledBytes ({max} bytes) of spilled deliveries"
    );
    assert_eq!(host.logged(LogLevel::Error, &line), 1, "{line}");
    assert_eq!(host.logged(LogLevel::Error, "delivery dropped"), 1);
    assert_eq!(
        reported_drops(&host, &mut worker, 1_200),
        vec![(dropped, "journal_full".to_string())]
    );
}

#[test]
fn payloads_waiting_for_their_put_past_the_pin_room_name_the_journal_falling_behind() {
    let host = FakeHost::default();
    let size = envelope_bytes();
    // The outbox holds one envelope; one more may wait in memory for its put, not two.
    let room = size * 3 / 2;
    let mut worker = reporting_worker(&host, json!({"maxQueued": 1, "maxQueuedBytes": room}));
    emit(
        &host,
        &mut worker,
        &[1_700_000_000, 1_700_000_001, 1_700_000_002],
    );
    assert_eq!(host.metric("deliveries_spilled"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_behind"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_full"), 0);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 0);
    let dropped = event(1_700_000_002).id_hex;
    let line = format!(
        "delivery dropped: event={dropped} webhook={HOOK} reason=the outbox is full (delivery.maxQueued) and the journal is behind: spilled deliveries waiting for their etcd write hold delivery.maxQueuedBytes ({room} bytes)"
    );
    assert_eq!(host.logged(LogLevel::Error, &line), 1, "{line}");
    assert_eq!(
        reported_drops(&host, &mut worker, 1_200),
        vec![(dropped, "journal_behind".to_string())]
    );
}

#[test]
fn with_etcd_out_of_reach_or_spilling_off_a_drop_is_the_outbox_s_as_without_a_journal() {
    // Spilling off: maxSpilledBytes 0.
    let host = FakeHost::default();
    let mut worker = reporting_worker(
        &host,
        json!({"maxQueued": 1, "journal": {"maxSpilledBytes": 0}}),
    );
    emit(&host, &mut worker, &[1_700_000_000, 1_700_000_001]);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_full"), 0);
    let dropped = event(1_700_000_001).id_hex;
    let line = format!(
        "delivery dropped: event={dropped} webhook={HOOK} reason=the outbox is full (delivery.maxQueued)"
    );
    assert_eq!(host.logged(LogLevel::Error, &line), 1);
    assert_eq!(host.logged(LogLevel::Error, "journal.maxSpilledBytes"), 0);
    assert_eq!(
        reported_drops(&host, &mut worker, 1_200),
        vec![(dropped, "queue_full".to_string())]
    );
    // Before the lease is live, the journal cannot take it either: the outbox's drop.
    let host = FakeHost::default();
    let mut config = config();
    config["delivery"]["maxQueued"] = json!(1);
    let mut worker = Worker::new(
        &host,
        plan_from(config),
        Some(1),
        "webhook_emitter",
        "w1".into(),
    );
    emit(&host, &mut worker, &[1_700_000_000, 1_700_000_001]);
    assert_eq!(host.metric("deliveries_spilled"), 0);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 1);
    assert_eq!(host.metric("deliveries_dropped.journal_full"), 0);
    assert_eq!(host.metric("deliveries_dropped.journal_behind"), 0);
}
