use super::*;
use serde_json::json;

#[test]
fn documents_read_as_serde_json_reads_them() {
    for text in [
        r#"{"name": "a", "events": ["x.y", 1, 2.5, -3, true, null, {"k": [{}]}]}"#,
        "[]",
        "\"text\"",
        "18446744073709551615",
    ] {
        assert_eq!(
            parse_without_duplicate_keys(text.as_bytes()),
            Ok(serde_json::from_str::<Value>(text).unwrap()),
            "{text}"
        );
    }
}

#[test]
fn duplicate_keys_are_named_by_their_path() {
    for (text, path) in [
        (r#"{"a": 1, "a": 2}"#, "a"),
        (r#"{"name": 1, "n\u0061me": 2}"#, "name"),
        (r#"{"x": {"k": 1, "k": 2}}"#, "x.k"),
        (r#"{"e": [{"k": 1}, {"k": 1, "k": 1}]}"#, "e[1].k"),
        (r#"[{"a": 1, "a": 1}]"#, "[0].a"),
        (r#"{"a": [[], [{"k": 1}, {"k": 1, "k": 2}]]}"#, "a[1][1].k"),
        (
            r#"{"a": {"b": [1]}, "c": [{"d": {"e": 1, "e": 2}}]}"#,
            "c[0].d.e",
        ),
    ] {
        assert_eq!(
            parse_without_duplicate_keys(text.as_bytes()),
            Err(JsonError::DuplicateKey(path.into())),
            "{text}"
        );
    }
    assert_eq!(
        parse_without_duplicate_keys(br#"{"a": {"b": 1}, "c": {"b": 1}}"#),
        Ok(json!({"a": {"b": 1}, "c": {"b": 1}}))
    );
}

#[test]
fn bad_json_is_a_syntax_error() {
    for text in [
        &b""[..],
        b"{",
        b"{} x",
        b"\xff{}",
        b"{\"a\" 1}",
        &[b'['; 200][..],
    ] {
        assert!(
            matches!(
                parse_without_duplicate_keys(text),
                Err(JsonError::Syntax(_))
            ),
            "{text:?}"
        );
    }
}
