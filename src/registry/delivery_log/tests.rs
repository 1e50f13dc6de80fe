use super::*;

fn attempt(webhook: &str, event: &str, n: i64, at: i64, outcome: Outcome) -> ReportedAttempt {
    ReportedAttempt {
        event_id: event.into(),
        webhook_id: webhook.into(),
        organisation_id: "o".into(),
        event_type: "job.completed".into(),
        attempt: n,
        at_ms: at,
        http_status: (n > 0).then_some(if outcome == Outcome::Delivered {
            200
        } else {
            503
        }),
        error: None,
        latency_ms: Some(3),
        outcome,
        reason: None,
        send_id: None,
    }
}

#[test]
fn periods() {
    assert_eq!(parse_period("7d"), Ok(7 * DAY_MS));
    assert_eq!(parse_period("250ms"), Ok(250));
    assert_eq!(parse_period("36h"), Ok(36 * 3_600_000));
    for bad in ["", "0s", "7", "7 d", "-1d", "3651d", "1w"] {
        assert!(parse_period(bad).is_err(), "{bad}");
    }
    assert_eq!(
        super::super::delivery_upkeep::describe_period(5 * DAY_MS),
        "5d"
    );
    assert_eq!(
        super::super::delivery_upkeep::describe_period(90_000),
        "90s"
    );
}

#[test]
fn placeholders_number_every_value() {
    assert_eq!(placeholders(2, 3), "($1, $2, $3), ($4, $5, $6)");
    assert_eq!(placeholders(1, 1), "($1)");
}

#[test]
fn a_report_folds_into_one_change_per_delivery_the_latest_attempt_deciding() {
    let report = Report {
        proxy: "p".into(),
        events: vec![ReportedEvent {
            event_id: "e1".into(),
            organisation_id: "o".into(),
            event_type: "job.completed".into(),
            created_ms: 90,
            envelope: None,
        }],
        attempts: vec![
            // Out of order: the final outcome is reported before a retry that happened earlier.
            attempt("w1", "e1", 2, 300, Outcome::Delivered),
            attempt("w1", "e1", 1, 100, Outcome::Retrying),
            attempt("w2", "e1", 0, 150, Outcome::Dropped),
            attempt("w1", "e2", 1, 400, Outcome::Failed),
        ],
        holding: Vec::new(),
    };
    let changes = fold_deliveries(&report);
    assert_eq!(changes.len(), 3);
    let w1e1 = &changes[0];
    assert_eq!(
        (w1e1.webhook_id.as_str(), w1e1.event_id.as_str()),
        ("w1", "e1")
    );
    assert_eq!(w1e1.status, "delivered");
    assert_eq!(
        (w1e1.created_ms, w1e1.updated_ms, w1e1.attempt_count),
        (90, 300, 2)
    );
    assert_eq!(w1e1.last_http_status, Some(200));
    let w1e2 = &changes[1];
    assert_eq!(
        (w1e2.status, w1e2.created_ms, w1e2.attempt_count),
        ("failed", 400, 1)
    );
    let w2e1 = &changes[2];
    assert_eq!(
        (w2e1.status, w2e1.attempt_count, w2e1.last_http_status),
        ("failed", 0, None)
    );
}

#[test]
fn health_counts_failures_since_the_last_success_in_any_order() {
    use super::super::delivery_upkeep::Health;
    let mut h = Health::default();
    h.record(100, false);
    h.record(50, false);
    assert_eq!(
        (h.failing_since_ms, h.last_failure_ms),
        (Some(50), Some(100))
    );
    h.record(120, true);
    assert_eq!((h.failing_since_ms, h.last_failure_ms), (None, None));
    // A failure older than the last success says nothing.
    h.record(110, false);
    assert_eq!(h.failing_since_ms, None);
    h.record(200, false);
    h.record(300, false);
    assert_eq!(
        (h.failing_since_ms, h.last_failure_ms),
        (Some(200), Some(300))
    );
    // A late report of a success between them: the failures after it still count, from the latest known.
    h.record(250, true);
    assert_eq!(
        (h.failing_since_ms, h.last_failure_ms),
        (Some(300), Some(300))
    );
    assert_eq!(h.last_success_ms, Some(250));
}
