//! The outbox against its bounds, its retry schedule and its circuits.

use super::*;
use crate::delivery::policy::MAX_RETRY_AFTER_MS;
use crate::delivery::{AttemptOutcome, Payload};
use std::rc::Rc;

const A: LaneId = LaneId::Webhook(0);
const B: LaneId = LaneId::Webhook(1);

fn policy() -> RetryPolicy {
    RetryPolicy::new(vec![200, 500, 1000])
}

fn status(code: u16) -> AttemptOutcome {
    AttemptOutcome::Status {
        code,
        retry_after: None,
    }
}

fn settings(max_queued: usize, max_in_flight: usize, circuit: Option<u32>) -> OutboxSettings {
    OutboxSettings {
        retry: policy(),
        max_queued,
        max_queued_bytes: usize::MAX,
        max_in_flight_per_webhook: max_in_flight,
        circuit_failures: circuit,
    }
}

fn outbox(webhooks: usize) -> Outbox {
    Outbox::new(webhooks, settings(100, 2, None))
}

fn delivery(id: &str, lane: LaneId, body: &[u8], now: u64) -> Delivery {
    Delivery::new(id.into(), lane, Rc::new(Payload::raw(body.to_vec())), now)
}

fn put(o: &mut Outbox, id: &str, lane: LaneId) {
    o.enqueue(delivery(id, lane, b"", 0)).unwrap();
}

fn ids(ds: &[Delivery]) -> Vec<&str> {
    ds.iter().map(|d| &*d.event_id).collect()
}

#[test]
fn a_restored_delivery_waits_for_its_next_attempt_time() {
    let mut o = outbox(1);
    let mut d = delivery("e1", A, b"{}", 1_000);
    d.attempts = 2;
    d.next_attempt_at_ms = 5_000;
    o.enqueue(d).unwrap();
    assert!(o.take_due(4_999).is_empty());
    let d = o.take_due(5_000).pop().unwrap();
    assert_eq!(d.attempts, 3);
}

#[test]
fn a_circuit_opened_from_outside_holds_the_queue_behind_one_probe() {
    let mut o = Outbox::new(1, settings(100, 4, Some(3)));
    put(&mut o, "e1", A);
    put(&mut o, "e2", A);
    assert!(o.open_circuit(A, 1_000, 200));
    assert!(!o.open_circuit(A, 1_000, 200), "already open");
    assert!(o.circuit_open(A));
    assert!(o.take_due(1_000).is_empty());
    let due = o.take_due(1_000 + 200);
    assert_eq!(ids(&due), vec!["e1"], "one probe");
    let mut off = Outbox::new(1, settings(100, 4, None));
    assert!(!off.open_circuit(A, 0, 0), "the breaker is off");
}

#[test]
fn a_lane_marked_gone_hands_its_queue_back_and_takes_nothing_more() {
    let mut o = outbox(2);
    put(&mut o, "e1", A);
    put(&mut o, "e2", A);
    put(&mut o, "e3", B);
    assert_eq!(ids(&o.mark_gone(A)), vec!["e1", "e2"]);
    assert!(o.is_gone(A));
    assert!(o.mark_gone(A).is_empty());
    assert!(o.mark_gone(LaneId::DeadLetter).is_empty());
    assert!(matches!(
        o.enqueue(delivery("e4", A, b"", 0)),
        Err(Refused::WebhookGone(_))
    ));
    assert_eq!(o.queued(), 1);
}

#[test]
fn success_after_two_retries() {
    let mut o = outbox(1);
    o.enqueue(delivery("e1", A, b"{}", 1_000)).unwrap();
    let d = o.take_due(1_000).pop().unwrap();
    assert_eq!(d.attempts, 1);
    assert_eq!(
        o.finish(d, &status(503), 1_010, 200),
        Verdict::Retry { at_ms: 1_210 }
    );
    assert!(o.take_due(1_209).is_empty());
    assert_eq!(o.next_due_at(), Some(1_210));
    let d = o.take_due(1_210).pop().unwrap();
    assert_eq!(d.attempts, 2);
    let reset = AttemptOutcome::NoResponse {
        reason: "reset".into(),
    };
    assert_eq!(
        o.finish(d, &reset, 1_300, 200),
        Verdict::Retry { at_ms: 1_800 }
    );
    let d = o.take_due(2_000).pop().unwrap();
    assert_eq!(
        o.finish(d, &status(204), 2_050, 0),
        Verdict::Delivered { latency_ms: 1_050 }
    );
    assert_eq!((o.queued(), o.queued_bytes(), o.attempts_out()), (0, 0, 0));
}

#[test]
fn exhausted_after_the_schedule() {
    let mut o = outbox(1);
    put(&mut o, "e1", A);
    let mut now = 0;
    let mut verdicts = Vec::new();
    for _ in 0..4 {
        let d = o.take_due(now).pop().expect("an attempt is due");
        let v = o.finish(d, &status(500), now, 200);
        if let Verdict::Retry { at_ms } = v {
            now = at_ms;
        }
        verdicts.push(v);
    }
    assert!(
        matches!(verdicts.last(), Some(Verdict::Exhausted(d)) if d.last_failure.as_deref() == Some("status 500"))
    );
    assert_eq!(verdicts.len() as u32, policy().max_attempts());
    assert_eq!(o.queued(), 0);
}

#[test]
fn redirects_and_client_errors_are_failures() {
    for code in [301, 302, 400, 401, 404, 499] {
        let mut o = outbox(1);
        put(&mut o, "e", A);
        let d = o.take_due(0).pop().unwrap();
        assert!(
            matches!(o.finish(d, &status(code), 0, 0), Verdict::Retry { .. }),
            "{code}"
        );
    }
}

#[test]
fn gone_drops_the_lane_and_refuses_new_deliveries() {
    let mut o = outbox(2);
    for i in 0..3 {
        put(&mut o, &format!("e{i}"), A);
    }
    put(&mut o, "other", B);
    let mut due = o.take_due(0);
    assert_eq!(due.len(), 3, "two for A (max in flight), one for B");
    let first = due.remove(0);
    let Verdict::Gone { dropped } = o.finish(first, &status(410), 0, 0) else {
        panic!()
    };
    assert_eq!(ids(&dropped), ["e0", "e2"]);
    assert!(o.is_gone(A));
    assert!(matches!(
        o.enqueue(delivery("e3", A, b"", 0)),
        Err(Refused::WebhookGone(_))
    ));
    // The attempt still in flight is not retried once the webhook is gone.
    let second = due.remove(0);
    assert!(matches!(
        o.finish(second, &status(500), 0, 0),
        Verdict::Exhausted(_)
    ));
    let other = due.remove(0);
    assert!(matches!(
        o.finish(other, &status(200), 5, 0),
        Verdict::Delivered { .. }
    ));
    assert_eq!(o.queued(), 0);
}

#[test]
fn retry_after_on_429_and_503_only_and_capped() {
    let mut o = outbox(1);
    let ra = |code, v: &str| AttemptOutcome::Status {
        code,
        retry_after: Some(v.as_bytes().to_vec()),
    };
    put(&mut o, "e", A);
    let d = o.take_due(0).pop().unwrap();
    assert_eq!(
        o.finish(d, &ra(429, "2"), 100, 200),
        Verdict::Retry { at_ms: 2_100 }
    );
    let d = o.take_due(2_100).pop().unwrap();
    assert_eq!(
        o.finish(d, &ra(500, "20"), 2_100, 200),
        Verdict::Retry { at_ms: 2_600 }
    );
    let d = o.take_due(2_600).pop().unwrap();
    assert_eq!(
        o.finish(d, &ra(503, "999999"), 2_600, 200),
        Verdict::Retry {
            at_ms: 2_600 + MAX_RETRY_AFTER_MS
        }
    );
}

#[test]
fn a_retry_after_that_is_not_utf8_falls_back_to_the_schedule() {
    let mut o = outbox(1);
    put(&mut o, "e", A);
    let d = o.take_due(0).pop().unwrap();
    let outcome = AttemptOutcome::Status {
        code: 503,
        retry_after: Some(b"\xff\xfe9".to_vec()),
    };
    assert_eq!(o.finish(d, &outcome, 0, 200), Verdict::Retry { at_ms: 200 });
}

#[test]
fn backoff_wins_over_a_shorter_retry_after() {
    let mut o = outbox(1);
    put(&mut o, "e", A);
    let d = o.take_due(0).pop().unwrap();
    let outcome = AttemptOutcome::Status {
        code: 503,
        retry_after: Some(b"0".to_vec()),
    };
    assert_eq!(o.finish(d, &outcome, 0, 200), Verdict::Retry { at_ms: 200 });
}

#[test]
fn a_full_outbox_makes_room_for_a_lane_below_its_fair_share() {
    let mut o = Outbox::new(2, settings(6, 2, None));
    for i in 0..6 {
        put(&mut o, &format!("a{i}"), A);
    }
    // Full, all of it A's. B holds nothing: its share is 3 of 6, so A's newest queued
    // delivery makes room.
    let evicted = o.enqueue(delivery("b0", B, b"", 0)).unwrap();
    assert_eq!(ids(&evicted), ["a5"]);
    for i in 1..3 {
        let evicted = o.enqueue(delivery(&format!("b{i}"), B, b"", 0)).unwrap();
        assert_eq!(evicted.len(), 1);
    }
    assert_eq!((o.lane_queued(A).0, o.lane_queued(B).0), (3, 3));
    // B now holds its share: a fourth is refused, and A keeps its three.
    assert!(matches!(
        o.enqueue(delivery("b3", B, b"", 0)),
        Err(Refused::QueueFull(..))
    ));
    assert!(matches!(
        o.enqueue(delivery("a6", A, b"", 0)),
        Err(Refused::QueueFull(..))
    ));
    assert_eq!(o.queued(), 6);
}

#[test]
fn a_lane_that_makes_progress_takes_the_place_of_a_stalled_one_whatever_the_shares() {
    let mut o = Outbox::new(2, settings(8, 2, None));
    for i in 0..4 {
        put(&mut o, &format!("a{i}"), A);
        put(&mut o, &format!("b{i}"), B);
    }
    // Both lanes send two attempts; only B's are answered, 10 ms after A's backlog began.
    let due = o.take_due(0);
    for d in due.into_iter().filter(|d| d.lane == B) {
        o.finish(d, &status(200), 10, 0);
    }
    put(&mut o, "b4", B);
    put(&mut o, "b5", B);
    assert_eq!(o.lane_queued(B).0, 4, "B at its share of 8 / 2");
    // Within STUCK_MARGIN_MS of A, B at its share is refused.
    assert!(matches!(
        o.enqueue(delivery("b6", B, b"", 0)),
        Err(Refused::QueueFull(..))
    ));
    // B delivers again at 100 ms, A still nothing: B takes A's queued deliveries' place.
    for d in o.take_due(100) {
        o.finish(d, &status(200), 100, 0);
    }
    put(&mut o, "b6", B);
    put(&mut o, "b7", B);
    for (id, evicted) in [("b8", "a3"), ("b9", "a2")] {
        let got = o.enqueue(delivery(id, B, b"", 0)).unwrap();
        assert_eq!(ids(&got), [evicted]);
    }
    assert!(
        matches!(
            o.enqueue(delivery("b10", B, b"", 0)),
            Err(Refused::QueueFull(..))
        ),
        "A's attempts out stay"
    );
    // A lane that delivers nothing never takes the place of one that does, share or not.
    assert!(matches!(
        o.enqueue(delivery("a9", A, b"", 0)),
        Err(Refused::QueueFull(..))
    ));
}

#[test]
fn attempts_in_flight_are_never_evicted() {
    let mut o = Outbox::new(2, settings(2, 2, None));
    put(&mut o, "a0", A);
    put(&mut o, "a1", A);
    let out = o.take_due(0);
    assert_eq!(out.len(), 2);
    assert!(matches!(
        o.enqueue(delivery("b0", B, b"", 0)),
        Err(Refused::QueueFull(..))
    ));
}

#[test]
fn bytes_are_bounded_and_a_shared_payload_counts_once() {
    let mut s = settings(100, 1, None);
    s.max_queued_bytes = 1_000;
    let mut o = Outbox::new(3, s);
    let lanes = [A, B, LaneId::Webhook(2)];
    let fan_out = |o: &mut Outbox, id: &str, byte: u8| {
        let payload = Rc::new(Payload::raw(vec![byte; 400]));
        lanes
            .iter()
            .map(|&lane| o.enqueue(Delivery::new(id.into(), lane, Rc::clone(&payload), 0)))
            .filter(Result::is_ok)
            .count()
    };
    assert_eq!(fan_out(&mut o, "e1", b'x'), 3);
    assert_eq!(o.queued_bytes(), 400, "one event, three lanes, one copy");
    assert_eq!(fan_out(&mut o, "e2", b'y'), 3);
    assert_eq!(o.queued_bytes(), 800);
    // A third does not fit, whoever it is for: every lane holds 800 bytes of a 333-byte share.
    assert_eq!(fan_out(&mut o, "e3", b'z'), 0);
    // Evicting one lane's copy frees nothing while other lanes hold the payload; the bytes go
    // with the last holder, even if the evicted deliveries are still alive elsewhere.
    let mut kept = Vec::new();
    for _ in 0..3 {
        for d in o.take_due(0) {
            kept.push(Delivery::new(
                d.event_id.clone(),
                d.lane,
                Rc::clone(&d.payload),
                0,
            ));
            o.finish(d, &status(200), 1, 0);
        }
    }
    assert_eq!((o.queued(), o.queued_bytes()), (0, 0));
    assert_eq!(kept.len(), 6);
}

#[test]
fn attempts_out_of_one_lane_hold_at_most_a_sixteenth_of_the_byte_bound() {
    let mut s = settings(100, 16, None);
    s.max_queued_bytes = 16_000;
    let mut o = Outbox::new(2, s);
    for i in 0..5 {
        o.enqueue(delivery(&format!("a{i}"), A, &[b'x'; 400], 0))
            .unwrap();
    }
    o.enqueue(delivery("big", B, &[b'y'; 5_000], 0)).unwrap();
    let due = o.take_due(0);
    // A: 2 × 400 bytes fit in 1,000; B's 5,000-byte delivery goes alone.
    assert_eq!(ids(&due), ["a0", "a1", "big"]);
    for d in due {
        o.finish(d, &status(200), 1, 0);
    }
    assert_eq!(o.take_due(1).len(), 2);
}

#[test]
fn lanes_are_not_stuck_behind_each_other() {
    let mut o = Outbox::new(2, settings(5, 2, None));
    for i in 0..5 {
        put(&mut o, &format!("a{i}"), A);
    }
    let due = o.take_due(0);
    assert_eq!(due.len(), 2, "A is capped at 2 in flight");
    assert_eq!(o.queued(), 5);
    for d in due {
        o.finish(d, &status(200), 1, 0);
    }
    put(&mut o, "b1", B);
    let due = o.take_due(1);
    assert!(due.iter().any(|d| &*d.event_id == "b1"));
}

#[test]
fn reconfigure_keeps_surviving_webhooks() {
    let mut o = outbox(3);
    put(&mut o, "keep", A);
    put(&mut o, "drop", B);
    put(&mut o, "moved", LaneId::Webhook(2));
    // New plan: old 0 stays 0, old 1 is removed, old 2 becomes 1.
    let dropped = o.reconfigure(2, |i| [Some(0), None, Some(1)][i], settings(100, 2, None));
    assert_eq!(ids(&dropped), ["drop"]);
    assert_eq!(o.queued(), 2);
    let due = o.take_due(0);
    let mut got: Vec<_> = due.iter().map(|d| (&*d.event_id, d.lane)).collect();
    got.sort();
    assert_eq!(got, [("keep", A), ("moved", B)]);
    assert_eq!(o.lane_queued(B).0, 1);
}

#[test]
fn an_open_circuit_holds_the_queue_and_probes_once_per_period() {
    let mut o = Outbox::new(2, settings(100, 4, Some(2)));
    for i in 0..6 {
        put(&mut o, &format!("e{i}"), A);
    }
    let due = o.take_due(0);
    assert_eq!(due.len(), 4);
    let mut due = due.into_iter();
    o.finish(due.next().unwrap(), &status(503), 10, 200);
    assert!(!o.circuit_open(A));
    o.finish(due.next().unwrap(), &status(503), 10, 200);
    assert!(o.circuit_open(A));
    assert_eq!(o.take_circuit_change(), Some(CircuitChange::Opened));
    // Attempts already out finish normally; nothing new goes out while the circuit is open.
    o.finish(due.next().unwrap(), &status(503), 10, 200);
    o.finish(due.next().unwrap(), &status(503), 10, 200);
    assert!(o.take_due(100).is_empty());
    // Other lanes are unaffected.
    put(&mut o, "other", B);
    assert_eq!(o.take_due(100).len(), 1);
    // The probe: exactly one attempt per period (first period 200 ms after the opening failure).
    let probe = o.take_due(210);
    assert_eq!(probe.len(), 1);
    assert!(o.take_due(10_000).is_empty(), "one probe at a time");
    let probe = probe.into_iter().next().unwrap();
    o.finish(probe, &status(503), 300, 200);
    assert!(o.circuit_open(A));
    assert!(o.take_due(700).is_empty(), "the second period is 500 ms");
    let probe = o.take_due(800).pop().unwrap();
    o.finish(probe, &status(200), 810, 200);
    assert_eq!(o.take_circuit_change(), Some(CircuitChange::Closed));
    assert_eq!(
        o.take_due(810).len(),
        4,
        "closed again: up to max in flight"
    );
}

#[test]
fn a_circuit_does_not_consume_attempts_of_queued_deliveries() {
    let mut o = Outbox::new(1, settings(100, 1, Some(1)));
    for id in ["a", "b", "c"] {
        put(&mut o, id, A);
    }
    let a = o.take_due(0).pop().unwrap();
    o.finish(a, &status(500), 0, 200);
    let mut now = 0;
    let mut probes = Vec::new();
    for _ in 0..3 {
        now += 10_000;
        let due = o.take_due(now);
        assert_eq!(due.len(), 1, "one probe per period");
        for d in due {
            probes.push(d.event_id.to_string());
            o.finish(d, &status(500), now, 200);
        }
    }
    assert_eq!(probes, ["a", "a", "a"], "the oldest delivery probes");
    assert_eq!(o.queued(), 2, "a is exhausted after 4 attempts");
    now += 10_000;
    let b = o.take_due(now).pop().unwrap();
    assert_eq!((&*b.event_id, b.attempts), ("b", 1));
}

#[test]
fn reconfigure_keeps_the_dead_letter_lane() {
    let mut o = outbox(2);
    put(&mut o, "dl", LaneId::DeadLetter);
    let dropped = o.reconfigure(1, |_| None, settings(100, 2, None));
    assert!(dropped.is_empty());
    let due = o.take_due(0);
    assert_eq!((&*due[0].event_id, due[0].lane), ("dl", LaneId::DeadLetter));
}

#[test]
fn attempts_out_are_counted_across_lanes_reconfiguration_and_orphans() {
    let mut o = outbox(2);
    put(&mut o, "a", A);
    put(&mut o, "b", B);
    let mut due = o.take_due(0);
    assert_eq!(o.attempts_out(), 2);
    // Webhook 1 is removed while its attempt is out: the attempt stays counted until answered.
    o.reconfigure(1, |i| (i == 0).then_some(0), settings(100, 2, None));
    assert_eq!(o.attempts_out(), 2);
    let b = due.pop().unwrap();
    assert_eq!(&*b.event_id, "b");
    o.release_orphan(&b);
    assert_eq!(o.attempts_out(), 1);
    o.finish(due.pop().unwrap(), &status(200), 1, 0);
    assert_eq!((o.attempts_out(), o.queued()), (0, 0));
}
