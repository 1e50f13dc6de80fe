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
}

#[test]
fn a_delivery_evicted_by_its_own_events_fan_out_spills_too() {
    let host = FakeHost::default();
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
    let mut worker = live_worker_with(&host, plan_from(config));
    let emit = |worker: &mut Worker, seconds: u64, now: u64| {
        worker.on_stream_outcome(
            &host,
            crate::stream::StreamOutcome::Event(event(seconds)),
            now,
        );
    };
    // The second webhook delivers each event at once; the first holds one out and one queued.
    let mut answered = 0;
    for (seconds, now) in [(1_700_000_000, 1_000), (1_700_000_001, 1_010)] {
        emit(&mut worker, seconds, now);
        for (_, attempt) in worker.pump(&host, now + 1) {
            if attempt.lane.name() == "000000000000000000000002" {
                worker.on_answer(&host, attempt, &ok(b"200"), now + 2);
                answered += 1;
            }
        }
    }
    assert_eq!(answered, 2);
    assert_eq!(worker.outbox().queued(), 2);
    // The third event: the first webhook takes the last place, then the second (below its
    // share) takes it back, evicting that same event's delivery: it spills, it is not dropped.
    emit(&mut worker, 1_700_000_002, 1_100);
    assert_eq!(host.metric("deliveries_dropped.over_share"), 0);
    assert_eq!(host.metric("deliveries_dropped.queue_full"), 0);
    assert_eq!(host.metric("deliveries_spilled"), 1);
}
