use super::*;

fn buckets(per_second: f64, burst: u32) -> TokenBuckets {
    TokenBuckets::new(Rate { per_second, burst }, 1000)
}

fn allowed(b: &mut TokenBuckets, key: &str, now: u64) -> bool {
    b.take(key, now).decision == Decision::Allowed
}

fn retry_after(b: &mut TokenBuckets, key: &str, now: u64) -> u64 {
    match b.take(key, now).decision {
        Decision::Refused { retry_after_s } => retry_after_s,
        Decision::Allowed => panic!("allowed at {now}"),
    }
}

#[test]
fn a_burst_then_refusals() {
    let mut b = buckets(2.0, 5);
    for _ in 0..5 {
        assert!(allowed(&mut b, "org-a", 1000));
    }
    // One token comes every 500 ms: the next is 500 ms away, which the header says as 1 s.
    assert_eq!(retry_after(&mut b, "org-a", 1000), 1);
    // Another key has its own bucket.
    assert!(allowed(&mut b, "org-b", 1000));
}

#[test]
fn refill_is_by_the_elapsed_time_and_stops_at_the_burst() {
    let mut b = buckets(2.0, 5);
    for _ in 0..5 {
        assert!(allowed(&mut b, "o", 0));
    }
    assert!(!allowed(&mut b, "o", 499));
    assert!(allowed(&mut b, "o", 500));
    assert!(!allowed(&mut b, "o", 500));
    // A long quiet period refills to the burst, not beyond.
    for _ in 0..5 {
        assert!(allowed(&mut b, "o", 3_600_000));
    }
    assert!(!allowed(&mut b, "o", 3_600_000));
}

#[test]
fn retry_after_is_whole_seconds_rounded_up() {
    let mut b = buckets(0.25, 1);
    assert!(allowed(&mut b, "o", 0));
    assert_eq!(retry_after(&mut b, "o", 0), 4);
    assert_eq!(retry_after(&mut b, "o", 1), 4);
    assert_eq!(retry_after(&mut b, "o", 1000), 3);
    assert_eq!(retry_after(&mut b, "o", 3001), 1);
    assert!(allowed(&mut b, "o", 4000));
    assert_eq!(retry_after_s(0), 1);
    assert_eq!(retry_after_s(1), 1);
    assert_eq!(retry_after_s(1000), 1);
    assert_eq!(retry_after_s(1001), 2);
    assert_eq!(retry_after_s(u64::MAX), u64::MAX.div_ceil(1000));
}

#[test]
fn fractional_rates() {
    // Half a write a second: one every 2 s after the burst.
    let mut b = buckets(0.5, 2);
    assert!(allowed(&mut b, "o", 10_000));
    assert!(allowed(&mut b, "o", 10_000));
    assert_eq!(retry_after(&mut b, "o", 10_000), 2);
    assert!(!allowed(&mut b, "o", 11_999));
    assert!(allowed(&mut b, "o", 12_000));
    // 1.5 a second: three in 2 s, the fractions carried over (at 700, 1400 and 2000 ms).
    let mut b = buckets(1.5, 2);
    assert!(allowed(&mut b, "o", 0));
    assert!(allowed(&mut b, "o", 0));
    let later: Vec<bool> = (1..=20).map(|i| allowed(&mut b, "o", i * 100)).collect();
    let at: Vec<u64> = (1..=20)
        .filter(|i| later[*i as usize - 1])
        .map(|i| i * 100)
        .collect();
    assert_eq!(at, [700, 1400, 2000]);
}

#[test]
fn rate_zero_is_off() {
    let mut b = buckets(0.0, 0);
    for i in 0..10_000 {
        assert!(allowed(&mut b, "o", i / 100));
    }
    assert!(b.is_empty(), "no bucket is kept while off");
    assert!(b.rate().is_off());
}

#[test]
fn refusals_are_reported_at_most_once_per_key_per_period() {
    let mut b = buckets(1.0, 1);
    assert!(b.take("o", 0).report.is_none());
    let first = b
        .take("o", 0)
        .report
        .expect("the first refusal is reported");
    assert_eq!(
        first,
        Report {
            key: "o".into(),
            refused: 1,
            since_ms: 0
        }
    );
    // 1 token a second: at 1000, 2000… one allowed; the refusals in between are counted, not reported.
    let mut reports = vec![];
    for now in 1..10_000 {
        if let Some(r) = b.take("o", now).report {
            reports.push(r);
        }
    }
    assert!(reports.is_empty());
    assert!(allowed(&mut b, "o", 10_000));
    let second = b.take("o", 10_000).report.expect("due again after 10 s");
    // 9999 calls, 9 of them allowed (at 1000…9000), then the refusal at 10 000.
    assert_eq!(second.refused, 9999 - 9 + 1);
    assert_eq!(second.since_ms, 1);
    // Counted refusals no later call reports come out of the sweep once due.
    assert!(b.take("o", 10_001).report.is_none());
    assert!(b.sweep(15_000).is_empty());
    assert_eq!(
        b.sweep(20_000),
        vec![Report {
            key: "o".into(),
            refused: 1,
            since_ms: 10_001
        }]
    );
}

#[test]
fn full_buckets_are_forgotten_by_the_sweep() {
    let mut b = buckets(10.0, 50);
    assert!(allowed(&mut b, "quiet", 0));
    for _ in 0..51 {
        b.take("busy", 0);
    }
    assert_eq!(b.len(), 2);
    // At 1 s, "quiet" is full again (0.1 s to refill its one token); "busy" (refused, reported at 0) is not.
    let reports = b.sweep(1000);
    assert!(reports.is_empty(), "{reports:?}");
    assert_eq!(b.len(), 1);
    // Full at 5 s, but its last report is younger than 10 s: kept, so that its next refusal is not reported
    // again within the period.
    b.sweep(6000);
    assert_eq!(b.len(), 1);
    b.sweep(10_000);
    assert!(b.is_empty());
    // Forgetting a full bucket changes nothing: the key starts again with a full burst.
    for _ in 0..50 {
        assert!(allowed(&mut b, "quiet", 20_000));
    }
    assert!(!allowed(&mut b, "quiet", 20_000));
}

#[test]
fn the_table_is_bounded_and_pushes_out_the_fullest() {
    let mut b = TokenBuckets::new(
        Rate {
            per_second: 1.0,
            burst: 10,
        },
        3,
    );
    // Three keys, each drained to a different level at time 0.
    for (key, writes) in [("a", 10), ("b", 5), ("c", 8)] {
        for _ in 0..writes {
            assert!(allowed(&mut b, key, 0));
        }
    }
    assert_eq!(b.len(), 3);
    // A fourth key pushes out "b", the fullest (5 tokens left).
    assert!(allowed(&mut b, "d", 0));
    assert_eq!(b.len(), 3);
    assert!(!allowed(&mut b, "a", 0), "a keeps its empty bucket");
    for _ in 0..2 {
        assert!(allowed(&mut b, "c", 0));
    }
    assert!(!allowed(&mut b, "c", 0), "c keeps its bucket");
    // Junk keys by the thousand never hold more than the bound, and the drained keys are the last to go.
    for i in 0..10_000 {
        b.take(&format!("junk-{i}"), 1);
        assert!(b.len() <= 3);
    }
}

#[test]
fn refusals_of_buckets_pushed_out_are_still_reported() {
    let mut b = TokenBuckets::new(
        Rate {
            per_second: 1.0,
            burst: 1,
        },
        1,
    );
    assert!(allowed(&mut b, "a", 0));
    assert!(b.take("a", 0).report.is_some());
    assert!(b.take("a", 1).report.is_none());
    assert!(b.take("a", 2).report.is_none());
    // "b" needs the only place: "a" (not full, 2 refusals unreported) goes.
    assert!(allowed(&mut b, "b", 3));
    let reports = b.sweep(4);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].key, "");
    assert_eq!(reports[0].refused, 2);
    assert_eq!(reports[0].since_ms, 1);
}

#[test]
fn a_clock_that_goes_back_refills_nothing() {
    let mut b = buckets(1.0, 1);
    assert!(allowed(&mut b, "o", 5000));
    assert!(!allowed(&mut b, "o", 1000));
    assert!(!allowed(&mut b, "o", 5999));
    assert!(allowed(&mut b, "o", 6000));
}

#[test]
fn the_final_reports_hold_every_refusal_not_reported() {
    let mut b = buckets(1.0, 1);
    assert!(allowed(&mut b, "o", 0));
    assert!(b.take("o", 0).report.is_some());
    for now in 1..5 {
        assert!(b.take("o", now).report.is_none());
    }
    assert_eq!(
        b.final_reports(),
        vec![Report {
            key: "o".into(),
            refused: 4,
            since_ms: 1
        }]
    );
    assert!(b.final_reports().is_empty());
}
