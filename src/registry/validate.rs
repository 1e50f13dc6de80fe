//! Reading a webhook's fields from a request body, with the filter's own rules: `WebhookUrl::parse` and its
//! private-address guard for the URL, the filter's event-type pattern, and a catalogue of event types.

use super::json::{parse_without_duplicate_keys, JsonError};
use crate::config::is_event_type;
use crate::url::WebhookUrl;
use serde_json::{Map, Value};

const MAX_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 2000;
const MAX_URL: usize = 2048;

/// One bad field: its JSON path in the request body and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// What the registry accepts, from its flags.
#[derive(Debug, Clone)]
pub struct Policy {
    pub event_types: Vec<String>,
    pub allow_insecure_http: bool,
    pub allow_private_networks: bool,
}

impl Policy {
    /// Checks the `--event-types` catalogue itself.
    pub fn check_catalogue(event_types: &[String]) -> Result<(), String> {
        if event_types.is_empty() {
            return Err("--event-types must name at least one event type".into());
        }
        for (i, t) in event_types.iter().enumerate() {
            if !is_event_type(t) {
                return Err(format!(
                    "--event-types: {t:?} must look like resource.event (lowercase letters, digits, _)"
                ));
            }
            if event_types[..i].contains(t) {
                return Err(format!("--event-types: {t:?} is listed twice"));
            }
        }
        Ok(())
    }
}

/// The five fields a registration has; on an update, the ones given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    pub name: Option<String>,
    pub url: Option<String>,
    pub description: Option<String>,
    pub status: Option<String>,
    pub events: Option<Vec<String>>,
}

/// Reads a create (`full`: name, url and events required; description defaults to "", status to "enabled") or an
/// update (any of the five fields). Every bad field is reported, each with its path.
pub fn read_fields(body: &[u8], policy: &Policy, full: bool) -> Result<Fields, Vec<FieldError>> {
    let value = parse_without_duplicate_keys(body).map_err(|e| {
        vec![match e {
            JsonError::Syntax(e) => {
                FieldError::new("", format!("the body must be a JSON object ({e})"))
            }
            JsonError::DuplicateKey(path) => {
                FieldError::new(shown_path(&path), "is given more than once")
            }
        }]
    })?;
    let Value::Object(map) = value else {
        return Err(vec![FieldError::new("", "the body must be a JSON object")]);
    };
    let mut errors = Vec::new();
    for key in map.keys() {
        if !["name", "url", "description", "status", "events"].contains(&key.as_str()) {
            errors.push(FieldError::new(
                shown_path(key),
                "unknown field (expected name, url, description, status, events)",
            ));
        }
    }
    let mut fields = Fields {
        name: text(&map, "name", MAX_NAME, &mut errors),
        url: text(&map, "url", MAX_URL, &mut errors),
        description: text(&map, "description", MAX_DESCRIPTION, &mut errors),
        status: text(&map, "status", 20, &mut errors),
        events: None,
    };
    if let Some(name) = &fields.name {
        if let Err(message) = check_name(name) {
            errors.push(FieldError::new("name", message));
        }
    }
    if let Some(url) = &fields.url {
        if let Err(message) = check_url(url, policy) {
            errors.push(FieldError::new("url", message));
        }
    }
    if let Some(status) = &fields.status {
        if status != "enabled" && status != "disabled" {
            errors.push(FieldError::new(
                "status",
                format!("must be \"enabled\" or \"disabled\", not {}", shown(status)),
            ));
        }
    }
    if let Some(events) = map.get("events") {
        fields.events = read_events(events, policy, &mut errors);
    }
    if full {
        for (present, field) in [
            (fields.name.is_some() || map.contains_key("name"), "name"),
            (fields.url.is_some() || map.contains_key("url"), "url"),
            (map.contains_key("events"), "events"),
        ] {
            if !present {
                errors.push(FieldError::new(field, "is required"));
            }
        }
        fields.description.get_or_insert_with(String::new);
        fields.status.get_or_insert_with(|| "enabled".into());
    } else if map.is_empty() {
        errors.push(FieldError::new(
            "",
            "give at least one of name, url, description, status, events",
        ));
    }
    if errors.is_empty() {
        Ok(fields)
    } else {
        Err(bounded(errors))
    }
}

/// At most this many errors are listed in one answer; the rest are counted.
const MAX_ERRORS: usize = 20;
/// Longest piece of the request echoed back in an error (a key or a value), in characters.
const MAX_ECHO: usize = 64;
/// Longest error message, in characters (a URL's own errors may quote its host).
const MAX_MESSAGE: usize = 300;

/// The errors of one body, bounded: a body of 64 KiB of bad items gets an answer of a few KiB.
fn bounded(mut errors: Vec<FieldError>) -> Vec<FieldError> {
    for e in &mut errors {
        if e.message.chars().count() > MAX_MESSAGE {
            e.message = format!(
                "{}…",
                e.message.chars().take(MAX_MESSAGE).collect::<String>()
            );
        }
    }
    if errors.len() > MAX_ERRORS {
        let more = errors.len() - MAX_ERRORS;
        errors.truncate(MAX_ERRORS);
        errors.push(FieldError::new(
            "",
            format!("and {more} more errors (fix these first)"),
        ));
    }
    errors
}

/// A key of the request as an error's path, cut to `MAX_ECHO` characters.
fn shown_path(path: &str) -> String {
    if path.chars().count() <= MAX_ECHO {
        path.to_string()
    } else {
        format!("{}…", path.chars().take(MAX_ECHO).collect::<String>())
    }
}

/// A value of the request, quoted for an error message and cut to `MAX_ECHO` characters.
fn shown(value: &str) -> String {
    if value.chars().count() <= MAX_ECHO {
        format!("{value:?}")
    } else {
        format!("{:?}…", value.chars().take(MAX_ECHO).collect::<String>())
    }
}

fn text(
    map: &Map<String, Value>,
    key: &str,
    max: usize,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match map.get(key)? {
        Value::String(s) if s.chars().count() > max => {
            errors.push(FieldError::new(
                key,
                format!("must be at most {max} characters"),
            ));
            None
        }
        Value::String(s) if s.chars().any(|c| is_refused_control(key, c)) => {
            errors.push(FieldError::new(
                key,
                if key == "description" {
                    "must not contain control characters (newline and tab are allowed)"
                } else {
                    "must not contain control characters"
                },
            ));
            None
        }
        Value::String(s) => Some(s.clone()),
        _ => {
            errors.push(FieldError::new(key, "must be a string"));
            None
        }
    }
}

/// Control characters are refused in every text field (Postgres cannot store NUL, and none of them belongs in a
/// name or a URL); a description may hold newlines and tabs.
fn is_refused_control(key: &str, c: char) -> bool {
    if key == "description" {
        c.is_ascii_control() && c != '\n' && c != '\t'
    } else {
        c.is_control()
    }
}

/// A name is shown to people (the dashboard, logs): it must show something, and must not reorder the text
/// around it.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        return Err("must not be empty");
    }
    if name.chars().any(is_bidi_control) {
        return Err("must not contain bidirectional controls (U+202A to U+202E, U+2066 to U+2069)");
    }
    if !name.chars().any(is_visible) {
        return Err("must hold at least one visible character");
    }
    Ok(())
}

/// The embeddings, overrides and isolates that can make text display in another order than it is stored.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether a character shows on its own: not a space, control, format character (zero-width space, joiners,
/// byte order mark, tags), combining mark, private-use or unassigned code point, nor one of the letters and
/// symbols that render blank (Hangul fillers, the blank Braille pattern).
fn is_visible(c: char) -> bool {
    use unicode_properties::{GeneralCategory as G, GeneralCategoryGroup, UnicodeGeneralCategory};
    if c.is_whitespace()
        || matches!(
            c,
            '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
        )
        || c.general_category_group() == GeneralCategoryGroup::Mark
    {
        return false;
    }
    !matches!(
        c.general_category(),
        G::Control | G::Format | G::Surrogate | G::PrivateUse | G::Unassigned
    )
}

/// The filter's URL rules, with the registry's flags in place of `delivery.allowInsecureHttp` and
/// `delivery.allowPrivateNetworks`.
pub fn check_url(url: &str, policy: &Policy) -> Result<(), String> {
    let parsed = WebhookUrl::parse(url)?;
    if !parsed.https && !policy.allow_insecure_http {
        return Err("must be an https URL".into());
    }
    if let Some(class) = parsed
        .private_host_reason()
        .filter(|_| !policy.allow_private_networks)
    {
        return Err(format!(
            "private or loopback address ({class}) is not allowed"
        ));
    }
    Ok(())
}

fn read_events(
    value: &Value,
    policy: &Policy,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<String>> {
    let Value::Array(items) = value else {
        errors.push(FieldError::new("events", "must be an array of event types"));
        return None;
    };
    if items.is_empty() {
        errors.push(FieldError::new("events", "must not be empty"));
        return None;
    }
    let before = errors.len();
    let mut events: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("events[{i}]");
        match item {
            Value::String(e) if !is_event_type(e) => errors.push(FieldError::new(
                at,
                format!(
                    "{} must look like resource.event (lowercase letters, digits, _)",
                    shown(e)
                ),
            )),
            // The catalogue is not repeated in every error: GET /v1/event-types lists it.
            Value::String(e) if !policy.event_types.contains(e) => errors.push(FieldError::new(
                at,
                format!(
                    "{} is not in the catalogue (GET /v1/event-types lists it)",
                    shown(e)
                ),
            )),
            Value::String(e) if events.contains(e) => {
                errors.push(FieldError::new(at, format!("{} is listed twice", shown(e))))
            }
            Value::String(e) => events.push(e.clone()),
            _ => errors.push(FieldError::new(at, "must be a string")),
        }
    }
    (errors.len() == before).then_some(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> Policy {
        Policy {
            event_types: vec!["job.completed".into(), "job.failed".into()],
            allow_insecure_http: false,
            allow_private_networks: false,
        }
    }

    fn paths(body: Value, full: bool) -> Vec<String> {
        match read_fields(body.to_string().as_bytes(), &policy(), full) {
            Ok(_) => vec![],
            Err(errors) => errors.into_iter().map(|e| e.path).collect(),
        }
    }

    #[test]
    fn a_full_registration_reads_with_defaults() {
        let fields = read_fields(
            br#"{"name":"Billing","url":"https://hooks.example.com/a","events":["job.completed"]}"#,
            &policy(),
            true,
        )
        .unwrap();
        assert_eq!(fields.status.as_deref(), Some("enabled"));
        assert_eq!(fields.description.as_deref(), Some(""));
    }

    #[test]
    fn every_bad_field_is_named() {
        let bad = json!({"name": " ", "url": "http://10.0.0.1/x", "description": 3,
                         "status": "on", "events": ["job.done", "Job", 1], "extra": true});
        assert_eq!(
            paths(bad, true),
            [
                "extra",
                "description",
                "name",
                "url",
                "status",
                "events[0]",
                "events[1]",
                "events[2]"
            ]
        );
        assert_eq!(paths(json!({}), true), ["name", "url", "events"]);
        assert_eq!(paths(json!({}), false), [""]);
        assert_eq!(paths(json!([1]), false), [""]);
        assert_eq!(paths(json!({"events": []}), false), ["events"]);
        assert_eq!(
            paths(json!({"events": ["job.failed", "job.failed"]}), false),
            ["events[1]"]
        );
    }

    #[test]
    fn the_filters_url_rules_apply() {
        for url in [
            "http://hooks.example.com/",
            "https://127.0.0.1/",
            "https://localhost/",
            "https://[::1]/",
            "https://169.254.169.254/latest",
            "https://127.1/",
            "https://user@hooks.example.com/",
            "ftp://hooks.example.com/",
            "https://hooks.example.com/#frag",
        ] {
            assert!(check_url(url, &policy()).is_err(), "{url}");
        }
        let open = Policy {
            allow_insecure_http: true,
            allow_private_networks: true,
            ..policy()
        };
        assert!(check_url("http://127.0.0.1:8080/hook", &open).is_ok());
        assert!(check_url("https://hooks.example.com:8443/a?b=c", &policy()).is_ok());
    }

    #[test]
    fn the_catalogue_is_checked() {
        assert!(Policy::check_catalogue(&["job.completed".into()]).is_ok());
        assert!(Policy::check_catalogue(&[]).is_err());
        assert!(Policy::check_catalogue(&["Job".into()]).is_err());
        assert!(Policy::check_catalogue(&["a.b".into(), "a.b".into()]).is_err());
    }
}
