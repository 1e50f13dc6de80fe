use super::*;

#[test]
fn rfc3339_times() {
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(
        parse_rfc3339("2025-12-31T23:59:59.999Z"),
        Some(1_767_225_599_999)
    );
    assert_eq!(
        parse_rfc3339("2000-02-29T01:00:00+01:00"),
        Some(951_782_400_000)
    );
    assert_eq!(
        parse_rfc3339("2000-02-28T23:00:00.5-01:00"),
        Some(951_782_400_500)
    );
    assert_eq!(
        parse_rfc3339(&rfc3339(1_767_312_000_123)),
        Some(1_767_312_000_123)
    );
    for bad in [
        "",
        "yesterday",
        "2025-02-29T00:00:00Z",
        "2025-13-01T00:00:00Z",
        "2025-01-01T24:00:00Z",
        "2025-01-01T00:00:00",
        "2025-01-01T00:00:00.Z",
        "2025-01-01T00:00:00+1:00",
        "2025-01-01T00:00:00Zjunk",
        "+025-01-01T00:00:00Z",
        "2025-01-01T00:00:00\u{e9}",
    ] {
        assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
    }
}

#[test]
fn cursors_round_trip_and_refuse_anything_else() {
    let row = DeliveryRow {
        event_id: "6571a0b2c3d4e5f6a7b8c9d0".into(),
        event_type: "job.completed".into(),
        status: "failed".into(),
        created_ms: 1_767_312_000_123,
        updated_ms: 0,
        attempt_count: 0,
        last_http_status: None,
        last_error: None,
        attempts: Vec::new(),
    };
    let cursor = decode_cursor(&encode_cursor(&row)).unwrap();
    assert_eq!(cursor.created_ms, row.created_ms);
    assert_eq!(cursor.event_id, row.event_id);
    assert!(decode_cursor("bm9wZQ").is_none());
    assert!(decode_cursor("!!").is_none());
    assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("12:' OR 1=1 --")).is_none());
}

#[test]
fn list_queries() {
    assert!(read_query(None).is_ok());
    let (status, cursor, limit) = read_query(Some("status=failed&limit=7")).ok().unwrap();
    assert_eq!(
        (status.as_deref(), cursor, limit),
        (Some("failed"), None, 7)
    );
    for bad in ["status=lost", "limit=0", "limit=101", "cursor=x", "other=1"] {
        assert!(read_query(Some(bad)).is_err(), "{bad}");
    }
}

#[test]
fn the_pending_flag_is_added_once() {
    use super::super::reports::with_pending_flag;
    assert_eq!(
        with_pending_flag(br#"{"revision":3}"#),
        br#"{"pendingSends":true,"revision":3}"#
    );
    assert_eq!(with_pending_flag(b"{}"), br#"{"pendingSends":true}"#);
    assert_eq!(
        with_pending_flag(br#"{"pendingSends":true,"revision":3}"#),
        br#"{"pendingSends":true,"revision":3}"#
    );
    assert_eq!(with_pending_flag(b"[]"), b"[]");
}

#[test]
fn the_pending_cache_is_fresh_for_a_moment() {
    let cache = crate::registry::delivery_log::PendingCache::default();
    assert_eq!(cache.get(1_000), None);
    cache.set(1_000, true);
    assert_eq!(cache.get(1_100), Some(true));
    assert_eq!(cache.get(1_300), None);
    assert_eq!(
        cache.get(900),
        None,
        "a clock stepping back does not keep it"
    );
    cache.set(2_000, false);
    assert_eq!(cache.get(2_000), Some(false));
    cache.forget();
    assert_eq!(cache.get(2_000), None);
}
