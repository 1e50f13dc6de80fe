use super::batch::{FLUSH_DELAY_MS, MAX_TXNS_IN_FLIGHT};
use super::recovery::STEPS_PER_SCAN;
use super::*;
use crate::delivery::Payload;
use crate::event::{Event, EventId};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use record::PendingWebhook;
use serde_json::{json, Map, Value};

const OWNER: &str = "00000000000000aa";
const HOOK_A: &str = "66b2e3ddb97f60b5270d5ce9";
const HOOK_B: &str = "66b2e3ddb97f60b5270d5cea";
const ROOM: Room = Room {
    deliveries: 1000,
    bytes: 1 << 30,
};

/// Polls as a proxy that knows all its webhooks.
trait PollAll {
    fn poll_all(&mut self, now: u64) -> Vec<Request>;
}

impl PollAll for Journal {
    fn poll_all(&mut self, now: u64) -> Vec<Request> {
        self.poll(now, true)
    }
}

fn settings() -> JournalSettings {
    JournalSettings {
        cluster: "etcd".into(),
        authority: "etcd".into(),
        prefix: "wh/".into(),
        lease_seconds: 15,
        max_spilled_bytes: 64 << 20,
    }
}

fn payload(seconds: u64) -> (Rc<str>, Rc<Payload>) {
    let mut object = Map::new();
    object.insert("id".into(), "job-1".into());
    let e = Event::new(
        EventId::new(seconds, [2; 8]),
        "job.completed",
        "job",
        "657bf08c202997ba9d127922",
        crate::json::Object::Tree(&object),
        seconds * 1000,
    );
    (
        Rc::from(e.id_hex.as_str()),
        Rc::new(Payload::event(e.envelope)),
    )
}

fn pending(ids: &[&str], now: u64) -> Vec<PendingWebhook> {
    ids.iter()
        .map(|id| PendingWebhook {
            webhook_id: id.to_string(),
            attempts: 0,
            next_attempt_at_ms: now,
        })
        .collect()
}

fn body(r: &Request) -> Value {
    serde_json::from_slice(&r.body).expect("request body is JSON")
}

fn key_of(r: &Request) -> String {
    let k = body(r)["key"].as_str().expect("key").to_string();
    String::from_utf8(B64.decode(k).expect("base64")).expect("utf-8")
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

const OK: &[u8] = br#"{"header":{"revision":"2"}}"#;

/// A journal whose owner key is registered.
fn live() -> Journal {
    let mut j = Journal::new(settings(), OWNER.into());
    let grant = j.poll_all(0);
    assert_eq!(grant.len(), 1);
    assert_eq!(grant[0].path, etcd::LEASE_GRANT);
    assert_eq!(body(&grant[0])["TTL"], "15");
    let g = grant.into_iter().next().expect("grant");
    j.on_answer(g.purpose, Ok(br#"{"ID":"77","TTL":"15"}"#), 0, ROOM);
    let register = j.poll_all(0);
    assert_eq!(register.len(), 1);
    assert_eq!(key_of(&register[0]), format!("wh/alive/{OWNER}"));
    assert_eq!(body(&register[0])["lease"], "77");
    let r = register.into_iter().next().expect("register");
    j.on_answer(r.purpose, Ok(OK), 0, ROOM);
    assert_eq!(
        j.take_notices(),
        vec![Notice::OwnerLive {
            owner: OWNER.into()
        }]
    );
    j
}

/// Polls, answering nothing, and returns the batches of writes (the scan's requests are left
/// out).
fn writes(j: &mut Journal, now: u64) -> Vec<Request> {
    j.poll_all(now)
        .into_iter()
        .filter(|r| matches!(r.purpose, Purpose::Batch { .. }))
        .collect()
}

/// The one batch due at `now`.
fn one_batch(j: &mut Journal, now: u64) -> Request {
    let mut out = writes(j, now);
    assert_eq!(out.len(), 1, "one batch");
    out.remove(0)
}

/// A write of a batch: a put (with its value) or a delete, and its key.
#[derive(Debug, PartialEq, Eq)]
enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

fn ops(r: &Request) -> Vec<Op> {
    assert_eq!(r.path, etcd::TXN);
    let t = body(r);
    assert_eq!(t["compare"], json!([]), "a batch compares nothing");
    let text = |v: &Value| {
        String::from_utf8(B64.decode(v.as_str().expect("key")).expect("b64")).expect("utf-8")
    };
    t["success"]
        .as_array()
        .expect("success")
        .iter()
        .map(|op| {
            if let Some(put) = op.get("request_put") {
                let value = B64
                    .decode(put["value"].as_str().expect("value"))
                    .expect("b64");
                Op::Put(text(&put["key"]), value)
            } else {
                Op::Delete(text(&op["request_delete_range"]["key"]))
            }
        })
        .collect()
}

fn put_record(op: &Op) -> record::Record {
    match op {
        Op::Put(_, value) => record::decode(value).expect("a record"),
        Op::Delete(key) => panic!("a delete of {key}"),
    }
}

/// The one batch that left by the time the delay after `now` is over.
fn one_batch_after_delay(j: &mut Journal, now: u64) -> Request {
    let mut out = flushed(j, now);
    assert_eq!(out.len(), 1, "one batch");
    out.remove(0)
}

/// Polls at `now` and once the delay is over: the batches that left.
fn flushed(j: &mut Journal, now: u64) -> Vec<Request> {
    let mut out = writes(j, now);
    out.extend(writes(j, now + FLUSH_DELAY_MS));
    out
}

const TXN_OK: &[u8] = br#"{"header":{"revision":"2"},"succeeded":true}"#;

#[test]
fn nothing_is_written_before_the_owner_key_is_live() {
    let mut j = Journal::new(settings(), OWNER.into());
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 0, pending(&[HOOK_A], 0), false);
    let out = j.poll_all(0);
    assert!(out
        .iter()
        .all(|r| !matches!(r.purpose, Purpose::Batch { .. })));
    // A peer that saw a record before its owner key would claim it at once.
    let grant = out.into_iter().next().expect("grant");
    j.on_answer(grant.purpose, Err("no answer".into()), 0, ROOM);
    assert!(j.poll_all(500).is_empty(), "a failed grant waits a second");
    assert_eq!(j.poll_all(1000)[0].path, etcd::LEASE_GRANT);
}

#[test]
fn a_record_is_put_then_deleted_once_every_webhook_settled() {
    let mut j = live();
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A, HOOK_B], 5), false);
    assert!(
        writes(&mut j, 5).is_empty(),
        "a write waits for others to join its batch"
    );
    let put = one_batch(&mut j, 5 + FLUSH_DELAY_MS);
    let written = ops(&put);
    assert_eq!(written.len(), 1);
    assert!(matches!(&written[0], Op::Put(key, _) if *key == format!("wh/records/{OWNER}/{id}")));
    assert_eq!(put_record(&written[0]).pending.len(), 2);

    // Both deliveries succeed while the put is out: the delete waits for the put's answer, so
    // that it cannot overtake it (nor name the key twice in one txn).
    j.settled(&id, HOOK_A);
    j.on_answer(put.purpose, Ok(TXN_OK), 30, ROOM);
    assert_eq!(j.take_notices(), vec![Notice::RecordsDelta(1)]);
    assert!(
        writes(&mut j, 100).is_empty(),
        "one webhook settled of two: no rewrite"
    );
    let (id2, p2) = payload(1_700_000_001);
    j.track(&id2, &p2, 100, pending(&[HOOK_A, HOOK_B], 100), false);
    writes(&mut j, 100);
    let put = one_batch(&mut j, 100 + FLUSH_DELAY_MS);
    j.settled(&id2, HOOK_A);
    j.settled(&id2, HOOK_B);
    assert!(writes(&mut j, 200).is_empty());
    j.on_answer(put.purpose, Ok(TXN_OK), 200, ROOM);
    j.settled(&id, HOOK_B);
    assert_eq!(j.take_notices(), vec![Notice::RecordsDelta(1)]);
    // Both deletes leave in one txn.
    writes(&mut j, 200);
    let deletes = one_batch(&mut j, 200 + FLUSH_DELAY_MS);
    assert_eq!(
        ops(&deletes),
        vec![
            Op::Delete(format!("wh/records/{OWNER}/{id2}")),
            Op::Delete(format!("wh/records/{OWNER}/{id}")),
        ]
    );
    j.on_answer(deletes.purpose, Ok(TXN_OK), 300, ROOM);
    assert_eq!(
        j.take_notices(),
        vec![Notice::RecordsDelta(-2)],
        "one notice per batch"
    );
    assert_eq!(j.tracked(), 0);
    assert!(writes(&mut j, 1000).is_empty());
}

#[test]
fn an_event_settled_before_its_batch_leaves_is_never_written() {
    let mut j = live();
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A, HOOK_B], 5), false);
    assert!(writes(&mut j, 5).is_empty());
    j.settled(&id, HOOK_A);
    j.settled(&id, HOOK_B);
    assert!(writes(&mut j, 5 + FLUSH_DELAY_MS).is_empty());
    assert_eq!(j.tracked(), 0);
    assert!(j.take_notices().is_empty());
}

#[test]
fn many_events_leave_as_few_txns_within_etcds_limits() {
    let mut j = live();
    let events: Vec<(Rc<str>, Rc<Payload>)> =
        (0..200).map(|i| payload(1_700_000_000 + i)).collect();
    for (id, p) in &events {
        j.track(id, p, 5, pending(&[HOOK_A, HOOK_B], 5), false);
    }
    // A full batch is due: the flush goes at once, everything due in as many txns as it takes.
    let flush = writes(&mut j, 5);
    assert_eq!(flush.len(), 2);
    let (first, second) = (&flush[0], &flush[1]);
    let first_ops = ops(first);
    assert_eq!(first_ops.len(), etcd::MAX_TXN_OPS);
    assert_eq!(ops(second).len(), 200 - etcd::MAX_TXN_OPS);
    // Each key once, oldest first.
    let keys: Vec<String> = first_ops
        .iter()
        .chain(ops(second).iter())
        .map(|op| match op {
            Op::Put(key, _) | Op::Delete(key) => key.clone(),
        })
        .collect();
    let expected: Vec<String> = events
        .iter()
        .map(|(id, _)| format!("wh/records/{OWNER}/{id}"))
        .collect();
    assert_eq!(keys, expected);
    // Short of a full batch, a flush waits for the txns out.
    let (id, p) = payload(1_500_000_000);
    j.track(&id, &p, 10, pending(&[HOOK_A], 10), false);
    assert!(
        flushed(&mut j, 10).is_empty(),
        "a partial flush waits for the txns out"
    );
    for b in flush {
        j.on_answer(b.purpose, Ok(TXN_OK), 31, ROOM);
    }
    assert_eq!(
        j.take_notices(),
        vec![Notice::RecordsDelta(128), Notice::RecordsDelta(72)]
    );
    let single = one_batch(&mut j, 31);
    assert_eq!(ops(&single).len(), 1);
    j.on_answer(single.purpose, Ok(TXN_OK), 32, ROOM);

    // Full batches go at once while fewer than MAX_TXNS_IN_FLIGHT are out.
    let more: Vec<(Rc<str>, Rc<Payload>)> = (0..(MAX_TXNS_IN_FLIGHT + 1) * etcd::MAX_TXN_OPS)
        .map(|i| payload(1_600_000_000 + i as u64))
        .collect();
    for (id, p) in &more {
        j.track(id, p, 40, pending(&[HOOK_A], 40), false);
    }
    let out = writes(&mut j, 40);
    assert_eq!(out.len(), MAX_TXNS_IN_FLIGHT);
    assert!(out.iter().all(|b| ops(b).len() == etcd::MAX_TXN_OPS));
    assert!(writes(&mut j, 1_000).is_empty(), "four batches out");
    let answered = out.into_iter().next().expect("a batch");
    j.on_answer(answered.purpose, Ok(TXN_OK), 1_001, ROOM);
    assert_eq!(ops(&one_batch(&mut j, 1_001)).len(), etcd::MAX_TXN_OPS);
}

#[test]
fn a_batch_stays_under_etcds_request_limit() {
    let mut j = live();
    // Records of about 400 KB: three fit in one request of 1.5 MiB, not four.
    let big: Vec<(Rc<str>, Rc<Payload>)> = (0..5)
        .map(|i| {
            let mut object = Map::new();
            object.insert("blob".into(), "x".repeat(400_000).into());
            let e = Event::new(
                EventId::new(1_700_000_000 + i, [4; 8]),
                "t",
                "job",
                "o",
                crate::json::Object::Tree(&object),
                1000,
            );
            (
                Rc::from(e.id_hex.as_str()),
                Rc::new(Payload::event(e.envelope)),
            )
        })
        .collect();
    for (id, p) in &big {
        j.track(id, p, 5, pending(&[HOOK_A], 5), false);
    }
    let batches = flushed(&mut j, 5);
    let sizes: Vec<usize> = batches.iter().map(|b| ops(b).len()).collect();
    assert_eq!(sizes, vec![3, 2]);
    for b in &batches {
        let weight: usize = ops(b)
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => k.len() + v.len(),
                Op::Delete(k) => k.len(),
            })
            .sum();
        assert!(weight + etcd::REQUEST_OVERHEAD_BYTES <= etcd::MAX_REQUEST_BYTES);
    }
}

#[test]
fn a_retry_updates_the_record() {
    let mut j = live();
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A], 5), false);
    writes(&mut j, 5);
    let put = one_batch(&mut j, 5 + FLUSH_DELAY_MS);
    j.on_answer(put.purpose, Ok(TXN_OK), 30, ROOM);
    j.scheduled(&id, HOOK_A, 1, 30_000);
    writes(&mut j, 40);
    let update = one_batch(&mut j, 40 + FLUSH_DELAY_MS);
    let written = ops(&update);
    assert_eq!(written.len(), 1);
    let record = put_record(&written[0]);
    assert_eq!(record.pending[0].attempts, 1);
    assert_eq!(record.pending[0].next_attempt_at_ms, 30_000);
    // Unknown events and webhooks (dead letters, say) change nothing.
    j.scheduled("ffff", HOOK_A, 1, 1);
    j.settled(&id, "abcdef");
    assert!(writes(&mut j, 1000).is_empty());
}

#[test]
fn an_unreachable_etcd_is_reported_once_and_writes_are_retried_with_backoff() {
    let mut j = live();
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A], 5), false);
    writes(&mut j, 5);
    let put = one_batch(&mut j, 5 + FLUSH_DELAY_MS);
    j.on_answer(put.purpose, Err("status 503".into()), 30, ROOM);
    let notices = j.take_notices();
    assert!(notices.contains(&Notice::RequestFailed));
    assert!(notices
        .iter()
        .any(|n| matches!(n, Notice::Unavailable(why) if why.contains("503"))));
    assert!(
        writes(&mut j, 500).is_empty(),
        "writes pause after a failure"
    );
    writes(&mut j, 1030);
    let again = one_batch(&mut j, 1030 + FLUSH_DELAY_MS);
    j.on_answer(again.purpose, Err("no answer".into()), 1100, ROOM);
    assert_eq!(j.take_notices(), vec![Notice::RequestFailed]);
    assert!(
        writes(&mut j, 2200).is_empty(),
        "the second failure in a row pauses twice as long"
    );
    writes(&mut j, 3100);
    let again = one_batch(&mut j, 3100 + FLUSH_DELAY_MS);
    assert_eq!(ops(&again).len(), 1, "the same record, still owed");
    j.on_answer(again.purpose, Ok(TXN_OK), 3200, ROOM);
    // The failed put may have landed, so the record already counted once.
    assert_eq!(j.take_notices(), vec![Notice::Recovered]);
}

#[test]
fn a_failed_batch_is_split_and_etcd_answering_again_ends_the_pause() {
    let mut j = live();
    let events: Vec<(Rc<str>, Rc<Payload>)> = (0..10).map(|i| payload(1_700_000_000 + i)).collect();
    for (id, p) in &events {
        j.track(id, p, 5, pending(&[HOOK_A], 5), false);
    }
    let mut out = j.poll_all(5);
    let list_alive = take(&mut out, |p| matches!(p, Purpose::ListAlive));
    let batch = one_batch(&mut j, 5 + FLUSH_DELAY_MS);
    assert_eq!(ops(&batch).len(), 10);
    // An etcd set to a lower --max-txn-ops refuses it: the next batches are half as large.
    j.on_answer(batch.purpose, Err("status 400".into()), 30, ROOM);
    j.take_notices();
    assert!(
        flushed(&mut j, 40).is_empty(),
        "writes pause after a failure"
    );
    // The scan's answer: etcd is there, the writes need not wait out their pause.
    j.on_answer(list_alive.purpose, Ok(br#"{"header":{}}"#), 70, ROOM);
    assert_eq!(j.take_notices(), vec![Notice::Recovered]);
    let halves = flushed(&mut j, 70);
    let sizes: Vec<usize> = halves.iter().map(|b| ops(b).len()).collect();
    assert_eq!(sizes, vec![5, 5]);
    for b in halves {
        j.on_answer(b.purpose, Ok(TXN_OK), 100, ROOM);
    }
    // Each batch that goes through doubles the bound again: 20 writes leave as one batch.
    let more: Vec<(Rc<str>, Rc<Payload>)> = (0..20).map(|i| payload(1_600_000_000 + i)).collect();
    for (id, p) in &more {
        j.track(id, p, 200, pending(&[HOOK_A], 200), false);
    }
    let batches = flushed(&mut j, 200);
    assert_eq!(batches.len(), 1);
    assert_eq!(ops(&batches[0]).len(), 20);
}

#[test]
fn a_record_too_large_for_etcd_is_not_written() {
    let mut j = live();
    let mut object = Map::new();
    object.insert("blob".into(), "x".repeat(etcd::MAX_REQUEST_BYTES).into());
    let e = Event::new(
        EventId::new(1, [3; 8]),
        "t",
        "job",
        "o",
        crate::json::Object::Tree(&object),
        1000,
    );
    let id: Rc<str> = Rc::from(e.id_hex.as_str());
    let p = Rc::new(Payload::event(e.envelope));
    j.track(&id, &p, 1, pending(&[HOOK_A], 1), false);
    assert!(flushed(&mut j, 1).is_empty());
    assert!(matches!(
        j.take_notices().as_slice(),
        [Notice::TooLarge { bytes, .. }] if *bytes > etcd::MAX_REQUEST_BYTES
    ));
    j.settled(&id, HOOK_A);
    assert_eq!(j.tracked(), 0);
    assert!(writes(&mut j, 2).is_empty());
}

#[test]
fn a_lost_lease_is_granted_again_and_records_rewritten() {
    let mut j = live();
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A], 5), false);
    let put = one_batch_after_delay(&mut j, 5);
    j.on_answer(put.purpose, Ok(TXN_OK), 6, ROOM);
    j.take_notices();
    let keepalive = j
        .poll_all(5_000)
        .into_iter()
        .find(|r| r.path == etcd::LEASE_KEEPALIVE)
        .expect("keepalive at a third of the TTL");
    assert_eq!(body(&keepalive)["ID"], "77");
    j.on_answer(
        keepalive.purpose,
        Ok(br#"{"result":{"ID":"77"}}"#),
        5_001,
        ROOM,
    );
    assert_eq!(j.take_notices(), vec![Notice::LeaseLost]);
    let out = j.poll_all(5_002);
    assert_eq!(out.len(), 1, "only the grant until the owner key is back");
    assert_eq!(out[0].path, etcd::LEASE_GRANT);
    let grant = out.into_iter().next().expect("grant");
    j.on_answer(grant.purpose, Ok(br#"{"ID":"78","TTL":"15"}"#), 5_003, ROOM);
    let register = j.poll_all(5_003).into_iter().next().expect("register");
    j.on_answer(register.purpose, Ok(OK), 5_004, ROOM);
    let rewrite = one_batch_after_delay(&mut j, 5_005);
    let written = ops(&rewrite);
    assert_eq!(written.len(), 1);
    assert!(matches!(&written[0], Op::Put(key, _) if *key == format!("wh/records/{OWNER}/{id}")));
}

fn range_answer(kvs: &[(&str, &[u8], i64)]) -> Vec<u8> {
    let kvs: Vec<Value> = kvs
        .iter()
        .map(|(k, v, rev)| json!({"key": b64(k.as_bytes()), "value": b64(v), "mod_revision": rev.to_string()}))
        .collect();
    json!({"header": {}, "kvs": kvs}).to_string().into_bytes()
}

fn take(out: &mut Vec<Request>, pred: impl Fn(&Purpose) -> bool) -> Request {
    let i = out.iter().position(|r| pred(&r.purpose)).expect("request");
    out.remove(i)
}

#[test]
fn the_records_of_a_dead_owner_are_claimed_within_the_room_left() {
    let mut j = live();
    let mut out = j.poll_all(10);
    let list_alive = take(&mut out, |p| matches!(p, Purpose::ListAlive));
    assert_eq!(key_of(&list_alive), "wh/alive/");
    let alive = range_answer(&[("wh/alive/00000000000000bb", b"", 1)]);
    j.on_answer(list_alive.purpose, Ok(&alive), 11, ROOM);

    // The walk: the live owner bb is skipped, the dead owner cc is read.
    let mut out = j.poll_all(11);
    let first = take(&mut out, |p| matches!(p, Purpose::NextOwner));
    assert_eq!(key_of(&first), "wh/records/");
    let bb = range_answer(&[("wh/records/00000000000000bb/e1", b"", 3)]);
    j.on_answer(first.purpose, Ok(&bb), 12, ROOM);
    let mut out = j.poll_all(12);
    let next = take(&mut out, |p| matches!(p, Purpose::NextOwner));
    assert_eq!(key_of(&next), "wh/records/00000000000000bb0");
    let cc = range_answer(&[("wh/records/00000000000000cc/e1", b"", 3)]);
    j.on_answer(next.purpose, Ok(&cc), 13, ROOM);
    let mut out = j.poll_all(13);
    let orphans = take(&mut out, |p| matches!(p, Purpose::Orphans { .. }));
    assert_eq!(key_of(&orphans), "wh/records/00000000000000cc/");
    assert!(body(&orphans).get("keys_only").is_none());

    let (id1, p1) = payload(1_700_000_001);
    let (id2, p2) = payload(1_700_000_002);
    let rec = |id: &str, p: &Payload, hooks: &[&str]| {
        record::encode(id, 1, p.envelope().expect("an event"), &pending(hooks, 99))
    };
    let v1 = rec(&id1, &p1, &[HOOK_A, HOOK_B]);
    let v2 = rec(&id2, &p2, &[HOOK_A]);
    let records = range_answer(&[
        (&format!("wh/records/00000000000000cc/{id1}"), &v1, 40),
        ("wh/records/00000000000000cc/bad", b"\xff not a record", 41),
        (&format!("wh/records/00000000000000cc/{id2}"), &v2, 42),
    ]);
    // Room for two deliveries: the first record (two webhooks) fits, the last must wait.
    let room = Room {
        deliveries: 2,
        bytes: 1 << 20,
    };
    j.on_answer(orphans.purpose, Ok(&records), 14, room);
    let notices = j.take_notices();
    assert!(notices
        .iter()
        .any(|n| matches!(n, Notice::Unreadable { key, .. } if key.ends_with("/bad"))));
    let mut out = j.poll_all(14);
    let claims: Vec<&Request> = out
        .iter()
        .filter(|r| matches!(r.purpose, Purpose::Claim { .. }))
        .collect();
    assert_eq!(claims.len(), 1, "only what fits is claimed");
    let t = body(claims[0]);
    assert_eq!(
        B64.decode(t["compare"][0]["key"].as_str().expect("key"))
            .expect("b64"),
        b"wh/alive/00000000000000cc"
    );
    assert_eq!(t["compare"][1]["mod_revision"], "40");
    let moved = B64
        .decode(t["success"][0]["request_put"]["key"].as_str().expect("key"))
        .expect("b64");
    assert_eq!(moved, format!("wh/records/{OWNER}/{id1}").into_bytes());
    let quarantine = take(&mut out, |p| matches!(p, Purpose::Quarantine));
    let q = body(&quarantine);
    assert_eq!(
        B64.decode(q["success"][0]["request_put"]["key"].as_str().expect("key"))
            .expect("b64"),
        b"wh/unreadable/wh/records/00000000000000cc/bad"
    );
    // The outbox was full: the scan stopped, and no further owner is looked for.
    assert!(!out.iter().any(|r| matches!(r.purpose, Purpose::NextOwner)));

    let claim = take(&mut out, |p| matches!(p, Purpose::Claim { .. }));
    j.on_answer(claim.purpose, Ok(br#"{"succeeded":true}"#), 15, ROOM);
    match j.take_notices().as_slice() {
        [Notice::Claimed(record)] => {
            assert_eq!(record.event_id, *id1);
            assert_eq!(record.pending.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    // The claimed record is tracked as stored: nothing is written until something changes.
    j.track(&id1, &p1, 1, pending(&[HOOK_A, HOOK_B], 99), true);
    assert_eq!(j.take_notices(), vec![Notice::RecordsDelta(1)]);
    assert!(flushed(&mut j, 16).is_empty());
    j.settled(&id1, HOOK_A);
    j.settled(&id1, HOOK_B);
    let delete = one_batch_after_delay(&mut j, 100);
    assert_eq!(
        ops(&delete),
        vec![Op::Delete(format!("wh/records/{OWNER}/{id1}"))]
    );
}

#[test]
fn a_lost_claim_race_and_the_end_of_the_walk() {
    let mut j = live();
    let mut out = j.poll_all(10);
    let list_alive = take(&mut out, |p| matches!(p, Purpose::ListAlive));
    j.on_answer(list_alive.purpose, Ok(br#"{"header":{}}"#), 11, ROOM);
    let first = take(&mut j.poll_all(11), |p| matches!(p, Purpose::NextOwner));
    // No record at all: the scan ends and starts again a period later.
    j.on_answer(first.purpose, Ok(br#"{"header":{}}"#), 12, ROOM);
    let out = j.poll_all(12);
    assert!(!out.iter().any(|r| matches!(r.purpose, Purpose::ListAlive)));
    let out = j.poll_all(12 + 5_000);
    assert!(out.iter().any(|r| matches!(r.purpose, Purpose::ListAlive)));
    // A claim another proxy won is no event.
    let (id, p) = payload(1);
    let env = p.envelope().expect("an event");
    let record = record::decode(&record::encode(&id, 1, env, &[])).expect("record");
    j.on_answer(
        Purpose::Claim { record, bytes: 10 },
        Ok(br#"{"header":{}}"#),
        13,
        ROOM,
    );
    assert!(j.take_notices().is_empty());
}

#[test]
fn gone_endpoints_are_published_and_read() {
    let mut j = live();
    j.publish_gone(HOOK_A, b"https://a.example/h");
    let mut out = j.poll_all(10);
    let publish = take(&mut out, |p| matches!(p, Purpose::PublishGone));
    assert_eq!(key_of(&publish), format!("wh/endpoints/gone/{HOOK_A}"));
    assert_eq!(
        B64.decode(body(&publish)["value"].as_str().expect("value"))
            .expect("b64"),
        b"https://a.example/h"
    );
    let list = take(&mut out, |p| matches!(p, Purpose::ListGone));
    let answer = range_answer(&[
        (
            &format!("wh/endpoints/gone/{HOOK_A}"),
            b"https://a.example/h",
            1,
        ),
        (
            &format!("wh/endpoints/gone/{HOOK_B}"),
            b"https://b.example/h",
            2,
        ),
    ]);
    j.on_answer(list.purpose, Ok(&answer), 11, ROOM);
    // Only what this journal did not know yet.
    assert_eq!(
        j.take_notices(),
        vec![Notice::EndpointGone {
            webhook_id: HOOK_B.to_string(),
            url: b"https://b.example/h".to_vec()
        }]
    );
}

#[test]
fn open_circuits_are_published_on_the_lease_and_read() {
    let mut j = live();
    j.publish_circuit(HOOK_A, b"https://a.example/h", true);
    j.publish_circuit(HOOK_A, b"https://a.example/h", false);
    let mut out = j.poll_all(10);
    let open = take(&mut out, |p| matches!(p, Purpose::PublishCircuit));
    assert_eq!(open.path, etcd::PUT);
    assert_eq!(key_of(&open), format!("wh/endpoints/circuit/{HOOK_A}"));
    assert_eq!(body(&open)["lease"], "77", "tied to this owner's lease");
    let closed = take(&mut out, |p| matches!(p, Purpose::PublishCircuit));
    assert_eq!(closed.path, etcd::DELETE_RANGE);
    let list = take(&mut out, |p| matches!(p, Purpose::ListCircuits));
    let answer = range_answer(&[
        (
            &format!("wh/endpoints/circuit/{HOOK_A}"),
            b"https://a.example/h",
            1,
        ),
        (
            &format!("wh/endpoints/circuit/{HOOK_B}"),
            b"https://b.example/h",
            2,
        ),
    ]);
    j.on_answer(list.purpose, Ok(&answer), 11, ROOM);
    assert_eq!(
        j.take_notices(),
        vec![Notice::EndpointCircuitOpen {
            webhook_id: HOOK_B.to_string(),
            url: b"https://b.example/h".to_vec()
        }]
    );
    // Listed again: not news. Gone from the list and back: news again.
    j.on_answer(Purpose::ListCircuits, Ok(&answer), 12, ROOM);
    assert!(j.take_notices().is_empty());
    j.on_answer(Purpose::ListCircuits, Ok(br#"{"header":{}}"#), 13, ROOM);
    j.on_answer(Purpose::ListCircuits, Ok(&answer), 14, ROOM);
    assert_eq!(j.take_notices().len(), 2);
}

#[test]
fn no_open_circuit_is_published_without_a_live_lease() {
    let mut j = Journal::new(settings(), OWNER.into());
    j.publish_circuit(HOOK_A, b"https://a.example/h", true);
    assert!(!j
        .poll_all(0)
        .iter()
        .any(|r| matches!(r.purpose, Purpose::PublishCircuit)));
}

#[test]
fn a_long_backlog_is_claimed_batch_after_batch_and_the_walk_resumes_where_it_stopped() {
    let mut j = live();
    let mut out = j.poll_all(10);
    let list_alive = take(&mut out, |p| matches!(p, Purpose::ListAlive));
    j.on_answer(list_alive.purpose, Ok(br#"{"header":{}}"#), 11, ROOM);
    let first = take(&mut j.poll_all(11), |p| matches!(p, Purpose::NextOwner));
    let dd = range_answer(&[("wh/records/00000000000000dd/e1", b"", 3)]);
    j.on_answer(first.purpose, Ok(&dd), 12, ROOM);
    let orphans = take(&mut j.poll_all(12), |p| {
        matches!(p, Purpose::Orphans { .. })
    });
    // A full batch with more behind it: the next batch follows at once, after its last key.
    let (id, p) = payload(1_700_000_001);
    let env = p.envelope().expect("an event");
    let value = record::encode(&id, 1, env, &pending(&[HOOK_A], 9));
    let key = format!("wh/records/00000000000000dd/{id}");
    let mut answer: Value =
        serde_json::from_slice(&range_answer(&[(&key, &value, 5)])).expect("json");
    answer["more"] = json!(true);
    j.on_answer(orphans.purpose, Ok(answer.to_string().as_bytes()), 13, ROOM);
    let mut out = j.poll_all(13);
    assert!(out
        .iter()
        .any(|r| matches!(r.purpose, Purpose::Claim { .. })));
    let next = take(&mut out, |p| matches!(p, Purpose::Orphans { .. }));
    let from = B64
        .decode(body(&next)["key"].as_str().expect("key"))
        .expect("b64");
    assert_eq!(from, format!("{key}\0").into_bytes());

    // Walking past owners that are not dead takes steps too: after STEPS_PER_SCAN requests the
    // scan ends, and the next scan starts from where it stopped. (Three steps are taken: the first
    // owner and two batches; the one owner found from here on is this journal's own.)
    j.on_answer(next.purpose, Ok(br#"{"header":{}}"#), 14, ROOM);
    let mine = range_answer(&[(&format!("wh/records/{OWNER}/e"), b"", 1)]);
    let mut walked = 0;
    let mut at = 14;
    while let Some(r) = j
        .poll_all(at)
        .into_iter()
        .find(|r| matches!(r.purpose, Purpose::NextOwner))
    {
        walked += 1;
        j.on_answer(r.purpose, Ok(&mine), at, ROOM);
        at += 1;
        assert!(walked < 1000, "the walk never ends");
    }
    assert_eq!(walked, STEPS_PER_SCAN - 3);
    let out = j.poll_all(at + 5_000);
    let list = out
        .into_iter()
        .find(|r| matches!(r.purpose, Purpose::ListAlive))
        .expect("the next scan");
    j.on_answer(list.purpose, Ok(br#"{"header":{}}"#), at + 5_001, ROOM);
    let resumed = take(&mut j.poll_all(at + 5_001), |p| {
        matches!(p, Purpose::NextOwner)
    });
    assert_eq!(
        key_of(&resumed),
        format!("wh/records/{OWNER}0"),
        "from where the last scan stopped"
    );
}

#[test]
fn a_later_fan_out_of_the_same_event_adds_its_webhooks_to_the_record() {
    let mut j = live();
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A], 5), false);
    let put = one_batch_after_delay(&mut j, 5);
    j.on_answer(put.purpose, Ok(TXN_OK), 30, ROOM);
    j.track(&id, &p, 5, pending(&[HOOK_A, HOOK_B], 40), false);
    let update = one_batch_after_delay(&mut j, 40);
    let written = ops(&update);
    assert_eq!(written.len(), 1);
    let ids: Vec<String> = put_record(&written[0])
        .pending
        .into_iter()
        .map(|p| p.webhook_id)
        .collect();
    assert_eq!(ids, vec![HOOK_A.to_string(), HOOK_B.to_string()]);
}

#[test]
fn no_dead_owner_is_looked_for_until_this_proxy_knows_its_webhooks() {
    let mut j = live();
    let out = j.poll(10, false);
    assert!(!out.iter().any(|r| matches!(r.purpose, Purpose::ListAlive)));
    // The lease is still kept alive meanwhile.
    assert!(j
        .poll(5_000, false)
        .iter()
        .any(|r| r.path == etcd::LEASE_KEEPALIVE));
    assert!(j
        .poll_all(5_001)
        .iter()
        .any(|r| matches!(r.purpose, Purpose::ListAlive)));
}

#[test]
fn while_writes_pause_the_events_delivered_meanwhile_are_not_kept() {
    let mut j = live();
    let (id, p) = payload(1_600_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A], 5), false);
    let batch = one_batch_after_delay(&mut j, 5);
    j.on_answer(batch.purpose, Err("no answer".into()), 30, ROOM);
    // etcd is away: 1,000 events come and are delivered before any write could leave.
    for i in 0..1000 {
        let (id, p) = payload(1_700_000_000 + i);
        j.track(&id, &p, 40, pending(&[HOOK_A, HOOK_B], 40), false);
        j.settled(&id, HOOK_A);
        j.settled(&id, HOOK_B);
    }
    assert_eq!(j.tracked(), 1, "only the record still owed");
    // When the pause is over, only that record is written.
    let again = one_batch_after_delay(&mut j, 1_100);
    assert_eq!(
        ops(&again)
            .iter()
            .map(|op| matches!(op, Op::Put(..)))
            .collect::<Vec<_>>(),
        vec![true]
    );
}

mod spill;
