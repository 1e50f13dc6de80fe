//! The plugin configuration: a serde model of the JSON, validated as a whole into an immutable
//! [`Plan`]. Every error names the JSON path of the bad field; unknown fields are errors.

use crate::delivery::RetryPolicy;
use crate::rules::{
    validate_json_pointer, Check, Condition, EventRule, MethodSet, OrganisationSource, PathTemplate,
};
use crate::signature::SigningKey;
use crate::url::WebhookUrl;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// One configuration error: the JSON path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: redact_keys(&message.into()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A key pasted into the wrong field would otherwise be echoed by serde's type errors.
fn redact_keys(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(crate::signature::KEY_PREFIX) {
        out.push_str(&rest[..at]);
        out.push_str("whsec_<redacted>");
        rest = &rest[at + crate::signature::KEY_PREFIX.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

// ---- the JSON model -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    events: Vec<RawRule>,
    webhooks: Vec<RawWebhook>,
    #[serde(default)]
    delivery: RawDelivery,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    #[serde(rename = "type")]
    event_type: String,
    object_type: String,
    #[serde(rename = "match")]
    matcher: RawMatch,
    #[serde(default)]
    when: Vec<RawCondition>,
    #[serde(default)]
    object: String,
    organisation_id: RawOrganisation,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMatch {
    #[serde(default = "default_methods")]
    methods: Vec<String>,
    path: String,
    #[serde(default)]
    status: Option<Vec<u16>>,
}

fn default_methods() -> Vec<String> {
    vec!["POST".into(), "PUT".into(), "PATCH".into()]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    pointer: String,
    #[serde(default, deserialize_with = "present")]
    equals: Option<Value>,
    #[serde(default)]
    exists: Option<bool>,
}

/// Tells `"equals": null` (compare with null) from a missing `equals`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
enum RawOrganisation {
    Header(String),
    Pointer(String),
    PathParam(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWebhook {
    id: String,
    organisation_id: String,
    name: String,
    url: String,
    #[serde(default)]
    description: Option<String>,
    status: String,
    events: Vec<String>,
    api_key: Value,
    #[serde(default)]
    cluster: Option<String>,
}

// `default` on the struct fills each missing field from `Default`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawDelivery {
    cluster: Option<String>,
    timeout_ms: u64,
    retry_schedule: Vec<String>,
    max_queued: usize,
    max_body_bytes: usize,
    max_in_flight_per_webhook: usize,
    allow_insecure_http: bool,
    allow_private_networks: bool,
}

impl Default for RawDelivery {
    fn default() -> Self {
        RawDelivery {
            cluster: None,
            timeout_ms: 10_000,
            retry_schedule: ["5s", "30s", "2m", "10m", "30m", "1h"]
                .map(String::from)
                .to_vec(),
            max_queued: 10_000,
            max_body_bytes: 1 << 20,
            max_in_flight_per_webhook: 16,
            allow_insecure_http: false,
            allow_private_networks: false,
        }
    }
}

// ---- the compiled plan ----------------------------------------------------------------------

/// A registered webhook, as the filter uses it.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    pub organisation_id: String,
    pub name: String,
    pub description: Option<String>,
    pub url: WebhookUrl,
    pub enabled: bool,
    pub events: Vec<String>,
    pub key: SigningKey,
    /// The Envoy cluster that carries this webhook's deliveries.
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    pub max_queued: usize,
    pub max_body_bytes: usize,
    pub max_in_flight_per_webhook: usize,
}

/// The validated, immutable configuration, shared by the root and HTTP contexts of a worker.
#[derive(Debug)]
pub struct Plan {
    pub rules: Vec<EventRule>,
    pub webhooks: Vec<Webhook>,
    pub delivery: DeliverySettings,
    /// Event type → organisation → indexes of the enabled webhooks subscribed to it.
    subscribers: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl Plan {
    /// Parses and validates the plugin configuration. `env` reads the VM's environment variables.
    pub fn from_json(
        json: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Plan, Vec<ConfigError>> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let raw: RawConfig = match serde_path_to_error::deserialize(&mut de) {
            Ok(raw) => raw,
            Err(err) => return Err(vec![structural_error(&err)]),
        };
        if let Err(e) = de.end() {
            return Err(vec![ConfigError::new(
                "configuration",
                format!("invalid JSON ({e})"),
            )]);
        }
        compile(raw, env)
    }

    /// The enabled webhooks of `organisation` subscribed to `event_type`.
    pub fn subscribers(&self, event_type: &str, organisation: &str) -> &[usize] {
        self.subscribers
            .get(event_type)
            .and_then(|by_org| by_org.get(organisation))
            .map_or(&[], Vec::as_slice)
    }

    pub fn webhook_index(&self, id: &str) -> Option<usize> {
        self.webhooks.iter().position(|w| w.id == id)
    }
}

/// Turns serde's first error into a path-named error, completing the path for field errors.
fn structural_error(err: &serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let inner = err.inner();
    let path = err.path().to_string();
    let base = if path == "." { String::new() } else { path };
    let message = inner.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or_default()
        .to_string();
    let join = |field: &str| {
        if base.is_empty() {
            field.to_string()
        } else {
            format!("{base}.{field}")
        }
    };
    if inner.is_syntax() || inner.is_eof() {
        return ConfigError::new("configuration", format!("invalid JSON ({inner})"));
    }
    if let Some(field) = backticked(&message, "missing field `") {
        return ConfigError::new(join(field), "missing required field");
    }
    if let Some(field) = backticked(&message, "unknown field `") {
        let expected = message.split_once(", ").map(|(_, e)| e).unwrap_or("");
        // serde_path_to_error already put the unknown key on the path.
        let at = if base.ends_with(field) {
            base.clone()
        } else {
            join(field)
        };
        return ConfigError::new(at, format!("unknown field ({expected})"));
    }
    if let Some(variant) = backticked(&message, "unknown variant `") {
        let expected = message.split_once(", ").map(|(_, e)| e).unwrap_or("");
        return ConfigError::new(join(variant), format!("unknown field ({expected})"));
    }
    ConfigError::new(
        if base.is_empty() {
            "configuration".into()
        } else {
            base
        },
        message,
    )
}

fn backticked<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    message.strip_prefix(prefix)?.split('`').next()
}

fn compile(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let delivery = compile_delivery(&raw.delivery, &mut errors);

    if raw.events.is_empty() {
        errors.push(ConfigError::new("events", "must list at least one rule"));
    }
    let rules: Vec<EventRule> = raw
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, r)| compile_rule(r, &format!("events[{i}]"), &mut errors))
        .collect();
    let emitted: HashSet<&str> = raw.events.iter().map(|r| r.event_type.as_str()).collect();

    let mut seen_ids = HashSet::new();
    let mut webhooks = Vec::new();
    for (i, w) in raw.webhooks.iter().enumerate() {
        let at = format!("webhooks[{i}]");
        if !seen_ids.insert(w.id.as_str()) {
            errors.push(ConfigError::new(
                format!("{at}.id"),
                format!("duplicate webhook id {}", w.id),
            ));
        }
        if let Some(webhook) = compile_webhook(w, &at, &raw.delivery, &emitted, env, &mut errors) {
            webhooks.push(webhook);
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let mut subscribers: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
    for (i, w) in webhooks.iter().enumerate().filter(|(_, w)| w.enabled) {
        for event_type in &w.events {
            subscribers
                .entry(event_type.clone())
                .or_default()
                .entry(w.organisation_id.clone())
                .or_default()
                .push(i);
        }
    }
    Ok(Plan {
        rules,
        webhooks,
        delivery,
        subscribers,
    })
}

fn compile_delivery(raw: &RawDelivery, errors: &mut Vec<ConfigError>) -> DeliverySettings {
    let mut schedule = Vec::new();
    for (i, s) in raw.retry_schedule.iter().enumerate() {
        match parse_duration_ms(s) {
            Ok(ms) => schedule.push(ms),
            Err(e) => errors.push(ConfigError::new(format!("delivery.retrySchedule[{i}]"), e)),
        }
    }
    let mut positive = |field: &str, value: u64, max: u64| {
        if value == 0 || value > max {
            errors.push(ConfigError::new(
                format!("delivery.{field}"),
                format!("must be between 1 and {max}"),
            ));
        }
    };
    positive("timeoutMs", raw.timeout_ms, 3_600_000);
    positive("maxQueued", raw.max_queued as u64, 10_000_000);
    positive("maxBodyBytes", raw.max_body_bytes as u64, 64 << 20);
    positive(
        "maxInFlightPerWebhook",
        raw.max_in_flight_per_webhook as u64,
        10_000,
    );
    if let Some(cluster) = &raw.cluster {
        if cluster.is_empty() {
            errors.push(ConfigError::new("delivery.cluster", "must not be empty"));
        }
    }
    DeliverySettings {
        timeout_ms: raw.timeout_ms,
        retry: RetryPolicy::new(schedule),
        max_queued: raw.max_queued,
        max_body_bytes: raw.max_body_bytes,
        max_in_flight_per_webhook: raw.max_in_flight_per_webhook,
    }
}

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`: a whole number and a unit, at most 24 hours.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "{text:?} must be a whole number followed by ms, s, m or h"
            ))
        }
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} must be a whole number followed by ms, s, m or h"))?;
    match value.checked_mul(scale) {
        Some(ms) if ms > 0 && ms <= 86_400_000 => Ok(ms),
        _ => Err(format!("{text:?} must be more than 0 and at most 24h")),
    }
}

fn is_event_type(t: &str) -> bool {
    let word = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    matches!(t.split_once('.'), Some((resource, event)) if word(resource) && word(event))
}

fn compile_rule(raw: &RawRule, at: &str, errors: &mut Vec<ConfigError>) -> Option<EventRule> {
    let before = errors.len();
    if !is_event_type(&raw.event_type) {
        errors.push(ConfigError::new(
            format!("{at}.type"),
            format!(
                "{:?} must follow {{resource}}.{{event}} in lowercase, e.g. job.completed",
                raw.event_type
            ),
        ));
    }
    if raw.object_type.is_empty() {
        errors.push(ConfigError::new(
            format!("{at}.objectType"),
            "must not be empty",
        ));
    }
    let mut methods = MethodSet::default();
    if raw.matcher.methods.is_empty() {
        errors.push(ConfigError::new(
            format!("{at}.match.methods"),
            "must not be empty",
        ));
    }
    for (i, m) in raw.matcher.methods.iter().enumerate() {
        match MethodSet::bit(m) {
            Some(bit) => methods.insert(bit),
            None => errors.push(ConfigError::new(
                format!("{at}.match.methods[{i}]"),
                format!("{m:?} is not an uppercase HTTP method"),
            )),
        }
    }
    let path = PathTemplate::parse(&raw.matcher.path)
        .map_err(|e| errors.push(ConfigError::new(format!("{at}.match.path"), e)))
        .ok();
    let statuses = match &raw.matcher.status {
        None => (200..300).collect(),
        Some(list) => {
            if list.is_empty() {
                errors.push(ConfigError::new(
                    format!("{at}.match.status"),
                    "must not be empty",
                ));
            }
            for (i, s) in list.iter().enumerate() {
                if !(100..600).contains(s) {
                    errors.push(ConfigError::new(
                        format!("{at}.match.status[{i}]"),
                        "must be an HTTP status from 100 to 599",
                    ));
                }
            }
            list.clone()
        }
    };
    let mut when = Vec::new();
    for (i, c) in raw.when.iter().enumerate() {
        let cat = format!("{at}.when[{i}]");
        if let Err(e) = validate_json_pointer(&c.pointer) {
            errors.push(ConfigError::new(format!("{cat}.pointer"), e));
        }
        let check = match (&c.equals, c.exists) {
            (Some(v), None) => Check::Equals(v.clone()),
            (None, Some(b)) => Check::Exists(b),
            _ => {
                errors.push(ConfigError::new(
                    cat,
                    "must have exactly one of equals or exists",
                ));
                continue;
            }
        };
        when.push(Condition {
            pointer: c.pointer.clone(),
            check,
        });
    }
    if let Err(e) = validate_json_pointer(&raw.object) {
        errors.push(ConfigError::new(format!("{at}.object"), e));
    }
    let organisation = match &raw.organisation_id {
        RawOrganisation::Header(name) => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                errors.push(ConfigError::new(
                    format!("{at}.organisationId.header"),
                    "must be a header name",
                ));
            }
            OrganisationSource::Header(name.to_ascii_lowercase())
        }
        RawOrganisation::Pointer(p) => {
            if let Err(e) = validate_json_pointer(p) {
                errors.push(ConfigError::new(format!("{at}.organisationId.pointer"), e));
            }
            OrganisationSource::Pointer(p.clone())
        }
        RawOrganisation::PathParam(name) => {
            if path.as_ref().is_some_and(|t| !t.has_capture(name)) {
                errors.push(ConfigError::new(
                    format!("{at}.organisationId.pathParam"),
                    format!("match.path has no {{{name}}} capture"),
                ));
            }
            OrganisationSource::PathParam(name.clone())
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(EventRule {
        event_type: raw.event_type.clone(),
        object_type: raw.object_type.clone(),
        methods,
        path: path?,
        statuses,
        when,
        object_pointer: raw.object.clone(),
        organisation,
    })
}

fn compile_webhook(
    raw: &RawWebhook,
    at: &str,
    delivery: &RawDelivery,
    emitted: &HashSet<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<Webhook> {
    let before = errors.len();
    let mut err = |field: &str, message: String| {
        errors.push(ConfigError::new(format!("{at}.{field}"), message))
    };
    if raw.id.len() != 24
        || !raw
            .id
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        err("id", "must be 24 lowercase hex digits".into());
    }
    if raw.organisation_id.is_empty() {
        err("organisationId", "must not be empty".into());
    }
    if raw.name.trim().is_empty() {
        err("name", "must not be empty".into());
    }
    let url = match WebhookUrl::parse(&raw.url) {
        Ok(url) => {
            if !url.https && !delivery.allow_insecure_http {
                err(
                    "url",
                    "must be an https URL (set delivery.allowInsecureHttp to allow http)".into(),
                );
            }
            if let Some(class) = url
                .private_host_reason()
                .filter(|_| !delivery.allow_private_networks)
            {
                err(
                    "url",
                    format!("private or loopback address ({class}) is not allowed (set delivery.allowPrivateNetworks to allow it)"),
                );
            }
            Some(url)
        }
        Err(e) => {
            err("url", e);
            None
        }
    };
    let enabled = match raw.status.as_str() {
        "enabled" => true,
        "disabled" => false,
        other => {
            err(
                "status",
                format!("must be \"enabled\" or \"disabled\", not {other:?}"),
            );
            false
        }
    };
    if raw.events.is_empty() {
        err("events", "must not be empty".into());
    }
    for (i, e) in raw.events.iter().enumerate() {
        if !emitted.contains(e.as_str()) {
            err(
                &format!("events[{i}]"),
                format!("no rule in events[] emits {e:?}"),
            );
        } else if raw.events[..i].contains(e) {
            err(&format!("events[{i}]"), format!("{e:?} is listed twice"));
        }
    }
    let key = match &raw.api_key {
        Value::String(inline) => SigningKey::parse(inline)
            .map_err(|e| err("apiKey", e.to_string()))
            .ok(),
        Value::Object(map) => match (map.get("env"), map.len()) {
            (Some(Value::String(var)), 1) => match env(var) {
                Some(value) => SigningKey::parse(value.trim())
                    .map_err(|e| err("apiKey", format!("environment variable {var}: {e}")))
                    .ok(),
                None => {
                    err("apiKey", format!("environment variable {var} is not set"));
                    None
                }
            },
            _ => {
                err(
                    "apiKey",
                    "must be a whsec_ key or {\"env\": \"VARIABLE\"}".into(),
                );
                None
            }
        },
        _ => {
            err(
                "apiKey",
                "must be a whsec_ key or {\"env\": \"VARIABLE\"}".into(),
            );
            None
        }
    };
    let cluster = raw.cluster.clone().or_else(|| delivery.cluster.clone());
    match &cluster {
        None => err(
            "cluster",
            "required when delivery.cluster is not set".into(),
        ),
        Some(c) if c.is_empty() => err("cluster", "must not be empty".into()),
        Some(_) => {}
    }
    if errors.len() > before {
        return None;
    }
    Some(Webhook {
        id: raw.id.clone(),
        organisation_id: raw.organisation_id.clone(),
        name: raw.name.clone(),
        description: raw.description.clone(),
        url: url?,
        enabled,
        events: raw.events.clone(),
        key: key?,
        cluster: cluster?,
    })
}
