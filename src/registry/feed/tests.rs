use super::*;

fn webhook(description: &str) -> StoredWebhook {
    StoredWebhook {
        id: "65b2f0c1a4e5d6f7a8b9c0d1".into(),
        organisation_id: "657bf08c202997ba9d127922".into(),
        name: "Billing".into(),
        url: "https://billing.example.com/webhooks".into(),
        description: description.into(),
        status: "enabled".into(),
        events: vec!["job.completed".into()],
        key_sealed: String::new(),
        previous_key_sealed: None,
        previous_key_expires_ms: None,
        key_rotated_ms: None,
        created_ms: 0,
        updated_ms: 0,
    }
}

#[test]
fn the_cursor_is_a_whole_number_given_at_most_once() {
    assert_eq!(read_since(None), Ok(0));
    assert_eq!(read_since(Some("")), Ok(0));
    assert_eq!(read_since(Some("since=0")), Ok(0));
    assert_eq!(read_since(Some("other=1&since=1207")), Ok(1207));
    for bad in [
        "since=",
        "since=-1",
        "since=+1",
        "since=1e3",
        "since=99999999999999999999",
        "since=1&since=2",
    ] {
        assert!(read_since(Some(bad)).is_err(), "{bad}");
    }
}

#[test]
fn the_bound_counts_both_keys_and_escapes() {
    let small = webhook("");
    let two_keys = entry_bytes_bound(&small);
    // Two 50-character keys, a 19-digit revision and an expiry are part of the bound.
    assert!(two_keys > 300, "{two_keys}");
    assert!(check_entry_size(&small, None).is_ok());
    // A newline takes two bytes on the wire, a euro sign three.
    let escaped = webhook(&"\n".repeat(2000));
    assert_eq!(entry_bytes_bound(&escaped), two_keys + 4000);
    let wide = webhook(&"€".repeat(1500));
    assert_eq!(entry_bytes_bound(&wide), two_keys + 4500);
    let message = check_entry_size(&wide, None).unwrap_err();
    assert!(message.contains("4096"), "{message}");
    // A webhook stored before the bound may change, as long as it does not grow.
    let mut disabled = wide.clone();
    disabled.status = "disabled".into();
    assert!(check_entry_size(&disabled, Some(&wide)).is_ok());
    let mut longer = wide.clone();
    longer.name.push('x');
    assert!(check_entry_size(&longer, Some(&wide)).is_err());
}

#[test]
fn the_envelope_is_the_documented_shape() {
    let body = envelope(7, 7, false, "");
    assert_eq!(body, r#"{"revision":7,"next":7,"more":false,"changes":[]}"#);
    let most = envelope(i64::MAX, i64::MAX, false, "");
    assert!(most.len() <= ENVELOPE_BYTES, "{}", most.len());
}

#[test]
fn page_sizes_are_checked() {
    assert!(ChangesFeed::new(49_152).is_ok());
    assert!(ChangesFeed::new(MIN_PAGE_BYTES - 1).is_err());
    assert!(ChangesFeed::new(MAX_PAGE_BYTES + 1).is_err());
}
