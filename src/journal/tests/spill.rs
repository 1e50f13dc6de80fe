//! Overload spills to the journal: spilled deliveries wait in etcd only and come back oldest
//! first, each webhook in turn, within the room the outbox gives.

use super::*;
use crate::journal::spill::{SpillOutcome, RECORD_OVERHEAD_BYTES, WEBHOOK_OVERHEAD_BYTES};

const PIN_ROOM: (usize, usize) = (100, 1 << 20);
const ANY_ROOM: &dyn Fn(&str, usize) -> usize = &|_, _| usize::MAX;

/// A txn-of-reads answer: per key asked, the record's value or nothing.
fn reads_answer(values: &[Option<(&str, &[u8])>]) -> Vec<u8> {
    let responses: Vec<Value> = values
        .iter()
        .map(|v| match v {
            Some((key, value)) => json!({"response_range": {"kvs": [
                {"key": b64(key.as_bytes()), "value": b64(value), "mod_revision": "9"}
            ], "count": "1"}}),
            None => json!({"response_range": {"header": {"revision": "9"}}}),
        })
        .collect();
    json!({"header": {"revision": "9"}, "succeeded": true, "responses": responses})
        .to_string()
        .into_bytes()
}

/// The keys a page-in read asks for.
fn read_keys(r: &Request) -> Vec<String> {
    assert_eq!(r.path, etcd::TXN);
    body(r)["success"]
        .as_array()
        .expect("success")
        .iter()
        .map(|op| {
            let k = op["request_range"]["key"].as_str().expect("a read");
            String::from_utf8(B64.decode(k).expect("b64")).expect("utf-8")
        })
        .collect()
}

fn paged_in(notices: Vec<Notice>) -> Vec<(String, Vec<String>)> {
    notices
        .into_iter()
        .filter_map(|n| match n {
            Notice::PagedIn {
                event_id, pending, ..
            } => Some((
                event_id.to_string(),
                pending.into_iter().map(|p| p.webhook_id).collect(),
            )),
            _ => None,
        })
        .collect()
}

/// Record values by key, as a batch put them.
type Values = Vec<(String, Vec<u8>)>;

/// Three events for webhooks A and B, every delivery spilled, their records written: the
/// payloads are gone from memory. Returns the event ids and the records' values by key.
fn three_spilled(j: &mut Journal) -> (Vec<Rc<str>>, Values) {
    let mut ids = Vec::new();
    for s in 0..3 {
        let (id, p) = payload(1_700_000_000 + s);
        j.track(&id, &p, 5, pending(&[HOOK_A, HOOK_B], 5), false);
        assert!(j.spill(&id, &p, HOOK_A, false, PIN_ROOM, 5).spilled());
        assert!(j.spill(&id, &p, HOOK_B, false, PIN_ROOM, 5).spilled());
        ids.push(id);
    }
    assert_eq!(j.spilled(), 6);
    assert!(j.has_spilled(HOOK_A) && j.has_spilled(HOOK_B));
    let batch = one_batch_after_delay(j, 5);
    let values = ops(&batch)
        .into_iter()
        .map(|op| match op {
            Op::Put(key, value) => (key, value),
            Op::Delete(key) => panic!("a delete of {key}"),
        })
        .collect();
    j.on_answer(batch.purpose, Ok(TXN_OK), 30, ROOM);
    (ids, values)
}

#[test]
fn spilled_deliveries_come_back_oldest_first_each_webhook_in_turn() {
    let mut j = live();
    let (ids, values) = three_spilled(&mut j);
    let spilling = j.take_notices();
    assert!(
        matches!(
            spilling[0],
            Notice::Spilling {
                count: 1,
                waiting: 1,
                ..
            }
        ),
        "one line for the first spill, none for the next ones within 10 s: {spilling:?}"
    );
    // Room for 4: A and B of the oldest event, then A and B of the next, in one read.
    j.page_in(40, (4, 1 << 20), ANY_ROOM);
    let read = j
        .poll_all(40)
        .into_iter()
        .find(|r| matches!(r.purpose, Purpose::PageIn { .. }));
    let read = read.expect("a page-in read");
    let keys = read_keys(&read);
    let key = |id: &Rc<str>| format!("wh/records/{OWNER}/{id}");
    assert_eq!(keys, vec![key(&ids[0]), key(&ids[1])]);
    // Only one read out at a time.
    j.page_in(41, (4, 1 << 20), ANY_ROOM);
    assert!(j
        .poll_all(41)
        .iter()
        .all(|r| !matches!(r.purpose, Purpose::PageIn { .. })));
    let value = |k: &str| {
        values
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_slice())
    };
    let answer = reads_answer(&[
        Some((&keys[0], value(&keys[0]).expect("put"))),
        Some((&keys[1], value(&keys[1]).expect("put"))),
    ]);
    j.on_answer(read.purpose, Ok(&answer), 42, ROOM);
    let both = vec![HOOK_A.to_string(), HOOK_B.to_string()];
    assert_eq!(
        paged_in(j.take_notices()),
        vec![
            (ids[0].to_string(), both.clone()),
            (ids[1].to_string(), both.clone())
        ]
    );
    assert_eq!(j.spilled(), 2);
    // A lane with no room left is skipped: only B's delivery of the last event comes back.
    let only_b: &dyn Fn(&str, usize) -> usize = &|w, _| usize::from(w == HOOK_B);
    j.page_in(50, (4, 1 << 20), only_b);
    let read = j
        .poll_all(50)
        .into_iter()
        .find(|r| matches!(r.purpose, Purpose::PageIn { .. }));
    let read = read.expect("a page-in read");
    let keys = read_keys(&read);
    assert_eq!(keys, vec![key(&ids[2])]);
    let answer = reads_answer(&[Some((&keys[0], value(&keys[0]).expect("put")))]);
    j.on_answer(read.purpose, Ok(&answer), 51, ROOM);
    assert_eq!(
        paged_in(j.take_notices()),
        vec![(ids[2].to_string(), vec![HOOK_B.to_string()])]
    );
    assert!(j.has_spilled(HOOK_A) && !j.has_spilled(HOOK_B));
}

#[test]
fn a_spilled_payload_waits_in_memory_until_its_put_lands_and_comes_back_without_a_read() {
    let mut j = live();
    let (id, p) = payload(1_700_000_000);
    j.track(&id, &p, 5, pending(&[HOOK_A], 5), false);
    assert!(j.spill(&id, &p, HOOK_A, false, PIN_ROOM, 5).spilled());
    drop(p);
    // The put has not left yet: the pinned payload comes back at once, no read.
    j.page_in(6, (10, 1 << 20), ANY_ROOM);
    assert!(j
        .poll_all(6)
        .iter()
        .all(|r| !matches!(r.purpose, Purpose::PageIn { .. })));
    assert_eq!(
        paged_in(j.take_notices()),
        vec![(id.to_string(), vec![HOOK_A.to_string()])]
    );
    assert_eq!(j.spilled(), 0);
}

#[test]
fn nothing_spills_past_max_spilled_bytes_or_the_pin_room_or_while_etcd_is_out_of_reach_and_it_says_why(
) {
    let (a, pa) = payload(1_700_000_000);
    let (b, pb) = payload(1_700_000_001);
    let one = pa.held_bytes() + RECORD_OVERHEAD_BYTES + 2 * WEBHOOK_OVERHEAD_BYTES;
    let mut j = Journal::new(
        JournalSettings {
            max_spilled_bytes: one,
            ..settings()
        },
        OWNER.into(),
    );
    j.track(&a, &pa, 5, pending(&[HOOK_A, HOOK_B], 5), false);
    assert_eq!(
        j.spill(&a, &pa, HOOK_A, false, PIN_ROOM, 5),
        SpillOutcome::JournalUnavailable,
        "no live lease yet"
    );
    let mut j = {
        let mut live = live();
        live.settings.max_spilled_bytes = one;
        live
    };
    j.track(&a, &pa, 5, pending(&[HOOK_A, HOOK_B], 5), false);
    j.track(&b, &pb, 5, pending(&[HOOK_A], 5), false);
    assert_eq!(
        j.spill(&a, &pa, HOOK_A, false, (0, 1 << 20), 5),
        SpillOutcome::JournalBehind {
            room_bytes: 1 << 20
        },
        "no room to wait for the put"
    );
    assert_eq!(
        j.spill(&a, &pa, HOOK_A, false, PIN_ROOM, 5),
        SpillOutcome::Spilled
    );
    // The same record again costs nothing more; another passes maxSpilledBytes.
    assert_eq!(
        j.spill(&a, &pa, HOOK_B, false, PIN_ROOM, 5),
        SpillOutcome::Spilled
    );
    assert_eq!(
        j.spill(&b, &pb, HOOK_A, false, PIN_ROOM, 5),
        SpillOutcome::JournalFull { max_bytes: one }
    );
    assert_eq!(
        j.spill(&b, &pb, "0000", false, PIN_ROOM, 5),
        SpillOutcome::NotJournaled,
        "a webhook the record does not list"
    );
    let (c, pc) = payload(1_700_000_002);
    assert_eq!(
        j.spill(&c, &pc, HOOK_A, false, PIN_ROOM, 5),
        SpillOutcome::NotJournaled,
        "an event not tracked"
    );
    assert_eq!(j.spilled(), 2);
    // Once a delivery is settled its record's bytes are free again: b spills.
    j.settled(&a, HOOK_A);
    j.settled(&a, HOOK_B);
    assert_eq!(
        j.spill(&b, &pb, HOOK_A, false, PIN_ROOM, 5),
        SpillOutcome::Spilled
    );
}

#[test]
fn with_max_spilled_bytes_zero_spilling_is_off() {
    let mut j = live();
    j.settings.max_spilled_bytes = 0;
    let (a, pa) = payload(1_700_000_000);
    j.track(&a, &pa, 5, pending(&[HOOK_A], 5), false);
    assert_eq!(
        j.spill(&a, &pa, HOOK_A, false, PIN_ROOM, 5),
        SpillOutcome::Off
    );
    assert_eq!(j.spilled(), 0);
}

#[test]
fn a_spilled_record_gone_from_etcd_is_reported_and_owed_no_more() {
    let mut j = live();
    let (ids, _) = three_spilled(&mut j);
    j.take_notices();
    j.page_in(40, (2, 1 << 20), ANY_ROOM);
    let read = j
        .poll_all(40)
        .into_iter()
        .find(|r| matches!(r.purpose, Purpose::PageIn { .. }));
    let read = read.expect("a page-in read");
    j.on_answer(read.purpose, Ok(&reads_answer(&[None])), 41, ROOM);
    let notices = j.take_notices();
    assert!(
        notices
            .iter()
            .any(|n| matches!(n, Notice::SpillLost { event_id, webhooks, .. }
            if *event_id == *ids[0] && webhooks.len() == 2)),
        "{notices:?}"
    );
    assert_eq!(j.spilled(), 4);
    // A failed read puts its deliveries back, first in line.
    j.page_in(5_000, (2, 1 << 20), ANY_ROOM);
    let read = j
        .poll_all(5_000)
        .into_iter()
        .find(|r| matches!(r.purpose, Purpose::PageIn { .. }));
    let read = read.expect("a page-in read");
    let first = read_keys(&read);
    j.on_answer(read.purpose, Err("status 503".into()), 5_001, ROOM);
    assert_eq!(j.spilled(), 4);
    j.page_in(9_000, (2, 1 << 20), ANY_ROOM);
    let read = j
        .poll_all(9_000)
        .into_iter()
        .find(|r| matches!(r.purpose, Purpose::PageIn { .. }));
    assert_eq!(read_keys(&read.expect("read again")), first);
}

#[test]
fn a_lost_lease_does_not_delete_a_spilled_record_no_memory_holds() {
    let mut j = live();
    let (_, _) = three_spilled(&mut j);
    j.take_notices();
    j.touch_all();
    // Nothing can be rewritten (the payloads are in etcd only) and nothing is deleted.
    assert!(flushed(&mut j, 100).is_empty());
    assert_eq!(j.spilled(), 6);
}
