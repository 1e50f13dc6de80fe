//! The plugin configuration: a serde model of the JSON, validated as a whole into an immutable
//! [`Plan`]. Every error names the JSON path of the bad field; unknown fields are errors.

use crate::delivery::{OutboxSettings, RetryPolicy};
use crate::rules::{
    validate_json_pointer, Check, Condition, EventRule, MethodSet, OrganisationSource, PathTemplate,
};
use crate::signature::SigningKey;
use crate::url::WebhookUrl;
use serde_json::{Map, Value};
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
        let after = &rest[at + crate::signature::KEY_PREFIX.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
            .unwrap_or(after.len());
        out.push_str(&rest[..at]);
        out.push_str(if end == 0 {
            "whsec_"
        } else {
            "whsec_<redacted>"
        });
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

// ---- the JSON model, read by hand so that every error carries its path -------------------------

struct RawConfig {
    events: Vec<RawRule>,
    webhooks: Vec<RawWebhook>,
    delivery: RawDelivery,
    /// Every `events[].type` that was given, even in a rule that has other errors, so that webhooks
    /// are not also blamed for subscribing to it.
    event_types: HashSet<String>,
}

struct RawRule {
    event_type: String,
    object_type: String,
    methods: Vec<String>,
    path: String,
    status: Option<Vec<u16>>,
    when: Vec<RawCondition>,
    object: String,
    organisation_id: RawOrganisation,
}

struct RawCondition {
    pointer: String,
    /// `Some(Value::Null)` is `"equals": null`; None is a missing `equals`.
    equals: Option<Value>,
    exists: Option<bool>,
}

enum RawOrganisation {
    Header(String),
    Pointer(String),
    PathParam(String),
}

struct RawWebhook {
    id: String,
    organisation_id: String,
    name: String,
    url: String,
    description: Option<String>,
    status: String,
    events: Vec<String>,
    api_key: Value,
    cluster: Option<String>,
}

struct RawDelivery {
    cluster: Option<String>,
    timeout_ms: u64,
    retry_schedule: Vec<String>,
    max_queued: usize,
    max_body_bytes: usize,
    max_in_flight_per_webhook: usize,
    allow_insecure_http: bool,
    allow_private_networks: bool,
    circuit_failures: u32,
    dead_letter: Option<RawDeadLetter>,
}

struct RawDeadLetter {
    url: String,
    cluster: Option<String>,
    api_key: Option<Value>,
}

/// One JSON object being read: its fields by name, its path, and where errors go.
struct Fields<'v, 'e> {
    map: &'v Map<String, Value>,
    at: String,
    errors: &'e mut Vec<ConfigError>,
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// Starts reading `value` as an object with exactly the `known` fields; unknown fields are errors.
fn fields<'v, 'e>(
    value: &'v Value,
    at: &str,
    known: &[&str],
    errors: &'e mut Vec<ConfigError>,
) -> Option<Fields<'v, 'e>> {
    let Value::Object(map) = value else {
        errors.push(ConfigError::new(at_or_root(at), "must be a JSON object"));
        return None;
    };
    for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
        let expected = known
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        errors.push(ConfigError::new(
            join(at, key),
            format!("unknown field (expected one of {expected})"),
        ));
    }
    Some(Fields {
        map,
        at: at.to_string(),
        errors,
    })
}

fn at_or_root(at: &str) -> &str {
    if at.is_empty() {
        "configuration"
    } else {
        at
    }
}

/// What a value is, for error messages: numbers and booleans as themselves, the rest by kind (a
/// string may hold a key, so it is never echoed).
fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl<'v> Fields<'v, '_> {
    fn path(&self, key: &str) -> String {
        join(&self.at, key)
    }

    fn fail(&mut self, key: &str, message: impl Into<String>) {
        let path = self.path(key);
        self.errors.push(ConfigError::new(path, message));
    }

    /// A field's value; `null` counts as absent.
    fn get(&self, key: &str) -> Option<&'v Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn required(&mut self, key: &str) -> Option<&'v Value> {
        let value = self.get(key);
        if value.is_none() {
            self.fail(key, "missing required field");
        }
        value
    }

    fn typed<T>(
        &mut self,
        key: &str,
        value: Option<&'v Value>,
        want: &str,
        read: impl Fn(&'v Value) -> Option<T>,
    ) -> Option<T> {
        let value = value?;
        let got = read(value);
        if got.is_none() {
            self.fail(key, format!("must be {want}, not {}", kind(value)));
        }
        got
    }

    fn string(&mut self, key: &str) -> Option<String> {
        let value = self.required(key);
        self.typed(key, value, "a string", |v| v.as_str().map(str::to_string))
    }

    fn opt_string(&mut self, key: &str) -> Option<String> {
        let value = self.get(key);
        self.typed(key, value, "a string", |v| v.as_str().map(str::to_string))
    }

    fn opt_bool(&mut self, key: &str, default: bool) -> bool {
        let value = self.get(key);
        self.typed(key, value, "true or false", Value::as_bool)
            .unwrap_or(default)
    }

    fn opt_u64(&mut self, key: &str, default: u64) -> u64 {
        let value = self.get(key);
        self.typed(key, value, "a whole number", Value::as_u64)
            .unwrap_or(default)
    }

    fn array(&mut self, key: &str, value: Option<&'v Value>) -> Option<&'v Vec<Value>> {
        self.typed(key, value, "an array", Value::as_array)
    }

    /// An array of strings; each bad element is named by its index.
    fn strings(&mut self, key: &str, value: Option<&'v Value>) -> Option<Vec<String>> {
        let items = self.array(key, value)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(s) => out.push(s.to_string()),
                None => self.fail(
                    &format!("{key}[{i}]"),
                    format!("must be a string, not {}", kind(item)),
                ),
            }
        }
        (out.len() == items.len()).then_some(out)
    }
}

fn read_config(value: &Value, errors: &mut Vec<ConfigError>) -> Option<RawConfig> {
    let mut f = fields(value, "", &["events", "webhooks", "delivery"], errors)?;
    let events_value = f.required("events");
    let events = f.array("events", events_value);
    let webhooks_value = f.required("webhooks");
    let webhooks = f.array("webhooks", webhooks_value);
    let delivery = match f.get("delivery") {
        Some(d) => read_delivery(d, f.errors),
        None => Some(RawDelivery::default()),
    };
    let errors = f.errors;
    let event_types = events
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("type").and_then(Value::as_str).map(str::to_string))
        .collect();
    let rules = events
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, r)| read_rule(r, &format!("events[{i}]"), errors))
        .collect();
    let hooks = webhooks
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, w)| read_webhook(w, &format!("webhooks[{i}]"), errors))
        .collect();
    Some(RawConfig {
        events: rules,
        webhooks: hooks,
        delivery: delivery?,
        event_types,
    })
    .filter(|_| events.is_some() && webhooks.is_some())
}

fn read_rule(value: &Value, at: &str, errors: &mut Vec<ConfigError>) -> Option<RawRule> {
    let before = errors.len();
    let mut f = fields(
        value,
        at,
        &[
            "type",
            "objectType",
            "match",
            "when",
            "object",
            "organisationId",
        ],
        errors,
    )?;
    let event_type = f.string("type");
    let object_type = f.string("objectType");
    let object = f.opt_string("object").unwrap_or_default();
    let matcher = f.required("match");
    let when_value = f.get("when");
    let when_items = f.array("when", when_value);
    let organisation_value = f.required("organisationId");
    let errors = f.errors;

    let mut methods = None;
    let mut path = None;
    let mut status = None;
    if let Some(m) = matcher.and_then(|m| {
        fields(
            m,
            &join(at, "match"),
            &["methods", "path", "status"],
            errors,
        )
    }) {
        let mut m = m;
        let methods_value = m.get("methods");
        methods = match methods_value {
            Some(v) => m.strings("methods", Some(v)),
            None => Some(vec!["POST".into(), "PUT".into(), "PATCH".into()]),
        };
        path = m.string("path");
        if let Some(list) = m.get("status").and_then(|v| m.array("status", Some(v))) {
            let mut codes = Vec::new();
            for (i, code) in list.iter().enumerate() {
                match code.as_u64().and_then(|c| u16::try_from(c).ok()) {
                    Some(c) => codes.push(c),
                    None => m.fail(
                        &format!("status[{i}]"),
                        "must be an HTTP status from 100 to 599",
                    ),
                }
            }
            status = Some(codes);
        }
    }
    let mut when = Vec::new();
    for (i, c) in when_items.into_iter().flatten().enumerate() {
        let Some(mut c) = fields(
            c,
            &format!("{at}.when[{i}]"),
            &["pointer", "equals", "exists"],
            errors,
        ) else {
            continue;
        };
        let pointer = c.string("pointer");
        let equals = c.map.get("equals").cloned();
        let exists_value = c.get("exists");
        let exists = c.typed("exists", exists_value, "true or false", Value::as_bool);
        if let Some(pointer) = pointer {
            when.push(RawCondition {
                pointer,
                equals,
                exists,
            });
        }
    }
    let organisation_id =
        organisation_value.and_then(|o| read_organisation(o, &join(at, "organisationId"), errors));
    if errors.len() > before {
        return None;
    }
    Some(RawRule {
        event_type: event_type?,
        object_type: object_type?,
        methods: methods?,
        path: path?,
        status,
        when,
        object,
        organisation_id: organisation_id?,
    })
}

fn read_organisation(
    value: &Value,
    at: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<RawOrganisation> {
    let mut f = fields(value, at, &["header", "pointer", "pathParam"], errors)?;
    let given: Vec<&str> = ["header", "pointer", "pathParam"]
        .into_iter()
        .filter(|k| f.map.contains_key(*k))
        .collect();
    let [source] = given.as_slice() else {
        let path = f.at.clone();
        f.errors.push(ConfigError::new(
            path,
            "must have exactly one of header, pointer or pathParam",
        ));
        return None;
    };
    let name = f.string(source)?;
    Some(match *source {
        "header" => RawOrganisation::Header(name),
        "pointer" => RawOrganisation::Pointer(name),
        _ => RawOrganisation::PathParam(name),
    })
}

fn read_webhook(value: &Value, at: &str, errors: &mut Vec<ConfigError>) -> Option<RawWebhook> {
    let known = [
        "id",
        "organisationId",
        "name",
        "url",
        "description",
        "status",
        "events",
        "apiKey",
        "cluster",
    ];
    let before = errors.len();
    let mut f = fields(value, at, &known, errors)?;
    let id = f.string("id");
    let organisation_id = f.string("organisationId");
    let name = f.string("name");
    let url = f.string("url");
    let description = f.opt_string("description");
    let status = f.string("status");
    let events_value = f.required("events");
    let events = f.strings("events", events_value);
    let api_key = f.required("apiKey").cloned();
    let cluster = f.opt_string("cluster");
    if f.errors.len() > before {
        return None;
    }
    Some(RawWebhook {
        id: id?,
        organisation_id: organisation_id?,
        name: name?,
        url: url?,
        description,
        status: status?,
        events: events?,
        api_key: api_key?,
        cluster,
    })
}

fn read_delivery(value: &Value, errors: &mut Vec<ConfigError>) -> Option<RawDelivery> {
    let known = [
        "cluster",
        "timeoutMs",
        "retrySchedule",
        "maxQueued",
        "maxBodyBytes",
        "maxInFlightPerWebhook",
        "allowInsecureHttp",
        "allowPrivateNetworks",
        "circuitBreaker",
        "deadLetter",
    ];
    let before = errors.len();
    let mut f = fields(value, "delivery", &known, errors)?;
    let d = RawDelivery::default();
    let schedule_value = f.get("retrySchedule");
    let mut delivery = RawDelivery {
        cluster: f.opt_string("cluster"),
        timeout_ms: f.opt_u64("timeoutMs", d.timeout_ms),
        retry_schedule: match schedule_value {
            Some(v) => f.strings("retrySchedule", Some(v)).unwrap_or_default(),
            None => d.retry_schedule,
        },
        max_queued: f.opt_u64("maxQueued", d.max_queued as u64) as usize,
        max_body_bytes: f.opt_u64("maxBodyBytes", d.max_body_bytes as u64) as usize,
        max_in_flight_per_webhook: f
            .opt_u64("maxInFlightPerWebhook", d.max_in_flight_per_webhook as u64)
            as usize,
        allow_insecure_http: f.opt_bool("allowInsecureHttp", false),
        allow_private_networks: f.opt_bool("allowPrivateNetworks", false),
        circuit_failures: d.circuit_failures,
        dead_letter: None,
    };
    let breaker = f.get("circuitBreaker");
    let dead_letter = f.get("deadLetter");
    let errors = f.errors;
    if let Some(mut cb) =
        breaker.and_then(|v| fields(v, "delivery.circuitBreaker", &["failures"], errors))
    {
        let failures = cb.required("failures");
        let failures = cb.typed(
            "failures",
            failures,
            "a whole number (0 turns the breaker off)",
            |v| v.as_u64().and_then(|n| u32::try_from(n).ok()),
        );
        delivery.circuit_failures = failures.unwrap_or(d.circuit_failures);
    }
    if let Some(mut dl) = dead_letter.and_then(|v| {
        fields(
            v,
            "delivery.deadLetter",
            &["url", "cluster", "apiKey"],
            errors,
        )
    }) {
        let url = dl.string("url");
        let cluster = dl.opt_string("cluster");
        let api_key = dl.get("apiKey").cloned();
        delivery.dead_letter = url.map(|url| RawDeadLetter {
            url,
            cluster,
            api_key,
        });
    }
    (errors.len() == before).then_some(delivery)
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
            circuit_failures: 10,
            dead_letter: None,
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

/// Where deliveries that finally failed are POSTed, so that a durable store can keep them.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub url: WebhookUrl,
    pub cluster: String,
    /// Signs dead letters like deliveries when set.
    pub key: Option<SigningKey>,
}

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub timeout_ms: u64,
    pub max_body_bytes: usize,
    pub outbox: OutboxSettings,
    pub dead_letter: Option<DeadLetter>,
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
        let value: Value = serde_json::from_slice(json).map_err(|e| {
            vec![ConfigError::new(
                "configuration",
                format!("invalid JSON ({e})"),
            )]
        })?;
        let mut errors = Vec::new();
        let raw = read_config(&value, &mut errors);
        match raw {
            Some(raw) if errors.is_empty() => compile(raw, env),
            _ => Err(errors),
        }
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

fn compile(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let delivery = compile_delivery(&raw.delivery, env, &mut errors);

    if raw.events.is_empty() {
        errors.push(ConfigError::new("events", "must list at least one rule"));
    }
    let rules: Vec<EventRule> = raw
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, r)| compile_rule(r, &format!("events[{i}]"), &mut errors))
        .collect();
    let emitted = &raw.event_types;

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
        if let Some(webhook) = compile_webhook(w, &at, &raw.delivery, emitted, env, &mut errors) {
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

fn compile_delivery(
    raw: &RawDelivery,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> DeliverySettings {
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
    let dead_letter = raw.dead_letter.as_ref().and_then(|dl| {
        let url = compile_url(&dl.url, "delivery.deadLetter.url", raw, errors);
        let cluster = dl.cluster.clone().or_else(|| raw.cluster.clone());
        if cluster.is_none() {
            errors.push(ConfigError::new(
                "delivery.deadLetter.cluster",
                "required when delivery.cluster is not set",
            ));
        }
        let key = match &dl.api_key {
            None => None,
            Some(value) => Some(compile_key(
                value,
                "delivery.deadLetter.apiKey",
                env,
                errors,
            )?),
        };
        Some(DeadLetter {
            url: url?,
            cluster: cluster?,
            key,
        })
    });
    DeliverySettings {
        timeout_ms: raw.timeout_ms,
        max_body_bytes: raw.max_body_bytes,
        outbox: OutboxSettings {
            retry: RetryPolicy::new(schedule),
            max_queued: raw.max_queued,
            max_in_flight_per_webhook: raw.max_in_flight_per_webhook,
            circuit_failures: (raw.circuit_failures > 0).then_some(raw.circuit_failures),
        },
        dead_letter,
    }
}

/// Parses a delivery URL and applies the https and private-network rules of `delivery`.
fn compile_url(
    text: &str,
    at: &str,
    delivery: &RawDelivery,
    errors: &mut Vec<ConfigError>,
) -> Option<WebhookUrl> {
    match WebhookUrl::parse(text) {
        Ok(url) => {
            let before = errors.len();
            if !url.https && !delivery.allow_insecure_http {
                errors.push(ConfigError::new(
                    at,
                    "must be an https URL (set delivery.allowInsecureHttp to allow http)",
                ));
            }
            if let Some(class) = url
                .private_host_reason()
                .filter(|_| !delivery.allow_private_networks)
            {
                errors.push(ConfigError::new(
                    at,
                    format!("private or loopback address ({class}) is not allowed (set delivery.allowPrivateNetworks to allow it)"),
                ));
            }
            (errors.len() == before).then_some(url)
        }
        Err(e) => {
            errors.push(ConfigError::new(at, e));
            None
        }
    }
}

/// A `whsec_` key given inline or as `{"env": "VARIABLE"}`.
fn compile_key(
    value: &Value,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<SigningKey> {
    let result = match value {
        Value::String(inline) => SigningKey::parse(inline).map_err(|e| e.to_string()),
        Value::Object(map) => match (map.get("env"), map.len()) {
            (Some(Value::String(var)), 1) => match env(var) {
                Some(value) => SigningKey::parse(value.trim())
                    .map_err(|e| format!("environment variable {var}: {e}")),
                None => Err(format!("environment variable {var} is not set")),
            },
            _ => Err("must be a whsec_ key or {\"env\": \"VARIABLE\"}".into()),
        },
        _ => Err("must be a whsec_ key or {\"env\": \"VARIABLE\"}".into()),
    };
    result
        .map_err(|e| errors.push(ConfigError::new(at, e)))
        .ok()
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

pub(crate) fn is_event_type(t: &str) -> bool {
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
    if raw.methods.is_empty() {
        errors.push(ConfigError::new(
            format!("{at}.match.methods"),
            "must not be empty",
        ));
    }
    for (i, m) in raw.methods.iter().enumerate() {
        match MethodSet::bit(m) {
            Some(bit) => methods.insert(bit),
            None => errors.push(ConfigError::new(
                format!("{at}.match.methods[{i}]"),
                format!("{m:?} is not an uppercase HTTP method"),
            )),
        }
    }
    let path = PathTemplate::parse(&raw.path)
        .map_err(|e| errors.push(ConfigError::new(format!("{at}.match.path"), e)))
        .ok();
    let statuses = match &raw.status {
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
    emitted: &HashSet<String>,
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
    let url = compile_url(&raw.url, &format!("{at}.url"), delivery, errors);
    let mut err = |field: &str, message: String| {
        errors.push(ConfigError::new(format!("{at}.{field}"), message))
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
    let key = compile_key(&raw.api_key, &format!("{at}.apiKey"), env, errors);
    let mut err = |field: &str, message: String| {
        errors.push(ConfigError::new(format!("{at}.{field}"), message))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn valid() -> Value {
        json!({
            "events": [{
                "type": "job.completed",
                "objectType": "job",
                "match": {"methods": ["POST", "PUT", "PATCH"], "path": "/jobs/{jobId}/complete", "status": [200]},
                "when": [{"pointer": "/status", "equals": "completed"}],
                "object": "",
                "organisationId": {"header": "X-Organisation-Id"}
            }],
            "webhooks": [{
                "id": "66b2e3ddb97f60b5270d5ce9",
                "organisationId": "657bf08c202997ba9d127922",
                "name": "Billing",
                "url": "https://billing.example.com/hooks/rapidlogix",
                "description": "Invoices the customer when a job completes",
                "status": "enabled",
                "events": ["job.completed"],
                "apiKey": KEY_A,
                "cluster": "billing_webhook"
            }],
            "delivery": {
                "cluster": "webhooks_egress",
                "timeoutMs": 10000,
                "retrySchedule": ["5s", "30s", "2m", "10m", "30m", "1h"],
                "maxQueued": 10000,
                "maxBodyBytes": 1048576
            }
        })
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn errors_of(config: &Value) -> Vec<String> {
        match Plan::from_json(config.to_string().as_bytes(), &no_env) {
            Ok(_) => vec![],
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    /// Applies `edit` to the valid config and expects one error starting with `expected`.
    fn rejects(edit: impl FnOnce(&mut Value), expected: &str) {
        let mut config = valid();
        edit(&mut config);
        let errors = errors_of(&config);
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "expected {expected:?}, got {errors:?}"
        );
    }

    #[test]
    fn the_design_example_is_valid() {
        let plan = Plan::from_json(valid().to_string().as_bytes(), &no_env).unwrap();
        assert_eq!(plan.rules.len(), 1);
        assert_eq!(plan.webhooks[0].cluster, "billing_webhook");
        assert_eq!(plan.webhooks[0].url.authority, "billing.example.com");
        assert_eq!(
            plan.delivery.outbox.retry.schedule_ms,
            [5_000, 30_000, 120_000, 600_000, 1_800_000, 3_600_000]
        );
        assert_eq!(
            plan.subscribers("job.completed", "657bf08c202997ba9d127922"),
            [0]
        );
        assert!(plan.subscribers("job.completed", "other").is_empty());
        assert_eq!(
            plan.rules[0].organisation,
            OrganisationSource::Header("x-organisation-id".into())
        );
    }

    #[test]
    fn defaults_fill_the_delivery_section() {
        let mut config = valid();
        config["delivery"] = json!({"cluster": "egress"});
        let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
        assert_eq!(plan.delivery.timeout_ms, 10_000);
        assert_eq!(plan.delivery.outbox.max_queued, 10_000);
        assert_eq!(plan.delivery.outbox.max_in_flight_per_webhook, 16);
        assert_eq!(plan.delivery.outbox.retry.max_attempts(), 7);
        assert_eq!(plan.delivery.outbox.circuit_failures, Some(10));
        assert!(plan.delivery.dead_letter.is_none());
    }

    #[test]
    fn structural_errors_name_the_field() {
        rejects(
            |c| drop(c["webhooks"][0].as_object_mut().unwrap().remove("url")),
            "webhooks[0].url: missing required field",
        );
        rejects(
            |c| c["webhooks"][0]["colour"] = json!("red"),
            "webhooks[0].colour: unknown field",
        );
        rejects(
            |c| c["delivery"]["timeout"] = json!(1),
            "delivery.timeout: unknown field",
        );
        rejects(
            |c| c["events"][0]["match"]["status"] = json!(["200"]),
            "events[0].match.status[0]: must be an HTTP status from 100 to 599",
        );
        rejects(
            |c| c["events"][0]["organisationId"] = json!({"cookie": "x"}),
            "events[0].organisationId.cookie: unknown field",
        );
        rejects(|c| c["extra"] = json!(true), "extra: unknown field");
        rejects(
            |c| c["webhooks"][0]["name"] = json!(7),
            "webhooks[0].name: must be a string, not 7",
        );
        rejects(
            |c| c["webhooks"][0]["events"] = json!(["job.completed", 3]),
            "webhooks[0].events[1]: must be a string, not 3",
        );
        rejects(
            |c| c["events"][0]["when"] = json!({}),
            "events[0].when: must be an array, not an object",
        );
        rejects(
            |c| c["events"][0]["match"] = json!([]),
            "events[0].match: must be a JSON object",
        );
        rejects(
            |c| c["delivery"]["allowInsecureHttp"] = json!("yes"),
            "delivery.allowInsecureHttp: must be true or false, not a string",
        );
        rejects(
            |c| c["events"][0]["organisationId"] = json!({"header": "a", "pointer": "/b"}),
            "events[0].organisationId: must have exactly one of header, pointer or pathParam",
        );
        rejects(
            |c| {
                drop(
                    c["events"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("organisationId"),
                )
            },
            "events[0].organisationId: missing required field",
        );
        assert_eq!(
            errors_of(&json!([])),
            ["configuration: must be a JSON object"]
        );
        let errors = match Plan::from_json(b"{\"events\": [", &no_env) {
            Err(e) => e,
            Ok(_) => panic!("accepted broken JSON"),
        };
        assert!(
            errors[0]
                .to_string()
                .starts_with("configuration: invalid JSON"),
            "{errors:?}"
        );
        let trailing = format!("{} {{}}", valid());
        let errors = Plan::from_json(trailing.as_bytes(), &no_env).unwrap_err();
        assert!(
            errors[0].to_string().starts_with("configuration:"),
            "{errors:?}"
        );
    }

    #[test]
    fn semantic_errors_name_the_field() {
        rejects(
            |c| c["webhooks"][0]["url"] = json!("http://billing.example.com/"),
            "webhooks[0].url: must be an https URL",
        );
        rejects(
            |c| c["webhooks"][0]["url"] = json!("https://127.0.0.1/"),
            "webhooks[0].url: private or loopback address",
        );
        rejects(
            |c| c["webhooks"][0]["url"] = json!("billing"),
            "webhooks[0].url: must be an absolute URL",
        );
        rejects(
            |c| c["webhooks"][0]["apiKey"] = json!("whsec_short"),
            "webhooks[0].apiKey: must be whsec_",
        );
        rejects(
            |c| c["webhooks"][0]["apiKey"] = json!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            "webhooks[0].apiKey: must be whsec_",
        );
        rejects(
            |c| c["webhooks"][0]["apiKey"] = json!({"env": "WH_MISSING"}),
            "webhooks[0].apiKey: environment variable WH_MISSING is not set",
        );
        rejects(
            |c| c["webhooks"][0]["apiKey"] = json!({"file": "/x"}),
            "webhooks[0].apiKey: must be a whsec_ key or",
        );
        rejects(
            |c| c["events"][0]["when"][0]["pointer"] = json!("status"),
            "events[0].when[0].pointer: must be empty or start with '/'",
        );
        rejects(
            |c| c["events"][0]["when"][0]["exists"] = json!(true),
            "events[0].when[0]: must have exactly one of equals or exists",
        );
        rejects(
            |c| c["events"][0]["object"] = json!("job"),
            "events[0].object: must be empty or start with '/'",
        );
        rejects(
            |c| c["webhooks"][0]["events"] = json!(["job.failed"]),
            "webhooks[0].events[0]: no rule in events[] emits \"job.failed\"",
        );
        rejects(
            |c| c["webhooks"][0]["events"] = json!([]),
            "webhooks[0].events: must not be empty",
        );
        rejects(
            |c| c["webhooks"][0]["status"] = json!("paused"),
            "webhooks[0].status: must be \"enabled\" or \"disabled\"",
        );
        rejects(
            |c| c["webhooks"][0]["id"] = json!("66B2E3DDB97F60B5270D5CE9"),
            "webhooks[0].id: must be 24 lowercase hex digits",
        );
        rejects(
            |c| c["webhooks"][0]["name"] = json!(" "),
            "webhooks[0].name: must not be empty",
        );
        rejects(
            |c| c["events"][0]["type"] = json!("JobCompleted"),
            "events[0].type: \"JobCompleted\" must follow",
        );
        rejects(
            |c| c["events"][0]["match"]["methods"] = json!(["post"]),
            "events[0].match.methods[0]: \"post\" is not an uppercase HTTP method",
        );
        rejects(
            |c| c["events"][0]["match"]["path"] = json!("/jobs/{id"),
            "events[0].match.path:",
        );
        rejects(
            |c| c["events"][0]["organisationId"] = json!({"pathParam": "org"}),
            "events[0].organisationId.pathParam: match.path has no {org} capture",
        );
        rejects(
            |c| c["delivery"]["retrySchedule"] = json!(["5s", "soon"]),
            "delivery.retrySchedule[1]:",
        );
        rejects(
            |c| c["delivery"]["maxQueued"] = json!(0),
            "delivery.maxQueued: must be between",
        );
        rejects(
            |c| {
                c["delivery"].as_object_mut().unwrap().remove("cluster");
                c["webhooks"][0].as_object_mut().unwrap().remove("cluster");
            },
            "webhooks[0].cluster: required when delivery.cluster is not set",
        );
        rejects(
            |c| {
                let copy = c["webhooks"][0].clone();
                c["webhooks"].as_array_mut().unwrap().push(copy);
            },
            "webhooks[1].id: duplicate webhook id 66b2e3ddb97f60b5270d5ce9",
        );
    }

    #[test]
    fn dead_letter_and_circuit_breaker() {
        let config = valid_with(|c| {
            c["delivery"]["deadLetter"] =
                json!({"url": "https://store.example.com/dead?x=1", "apiKey": KEY_A});
            c["delivery"]["circuitBreaker"] = json!({"failures": 0});
        });
        let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
        let dl = plan.delivery.dead_letter.as_ref().unwrap();
        assert_eq!(
            (dl.cluster.as_str(), dl.url.path_and_query.as_str()),
            ("webhooks_egress", "/dead?x=1")
        );
        assert!(dl.key.is_some());
        assert_eq!(plan.delivery.outbox.circuit_failures, None);
        rejects(
            |c| c["delivery"]["deadLetter"] = json!({"url": "http://store.example.com/"}),
            "delivery.deadLetter.url: must be an https URL",
        );
        rejects(
            |c| c["delivery"]["deadLetter"] = json!({"url": "https://s.example/", "apiKey": "x"}),
            "delivery.deadLetter.apiKey: must be whsec_",
        );
        rejects(
            |c| c["delivery"]["deadLetter"] = json!({"uri": "https://s.example/"}),
            "delivery.deadLetter.uri: unknown field",
        );
        rejects(
            |c| c["delivery"]["circuitBreaker"] = json!({"failures": -1}),
            "delivery.circuitBreaker.failures: must be a whole number (0 turns the breaker off), not -1",
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let mut config = valid();
        config["webhooks"][0]["status"] = json!("paused");
        config["webhooks"][0]["url"] = json!("http://x.example/");
        config["events"][0]["object"] = json!("bad");
        assert_eq!(errors_of(&config).len(), 3, "{:?}", errors_of(&config));
    }

    #[test]
    fn keys_never_appear_in_errors() {
        let mut config = valid();
        config["webhooks"][0]["name"] = json!(KEY_A);
        config["webhooks"][0]["events"] = json!(KEY_A);
        for e in errors_of(&config) {
            assert!(!e.contains("MfKQ9r8GKYqr"), "{e}");
        }
        config["webhooks"][0]["apiKey"] = json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLa!!");
        for e in errors_of(&valid_with(|c| {
            c["webhooks"][0]["apiKey"] = json!("whsec_MfKQ9r8GKYqrTwjUPD8IL!")
        })) {
            assert!(!e.contains("MfKQ9r8GKYqr"), "{e}");
        }
    }

    fn valid_with(edit: impl FnOnce(&mut Value)) -> Value {
        let mut c = valid();
        edit(&mut c);
        c
    }

    #[test]
    fn keys_come_from_the_environment() {
        let config = valid_with(|c| c["webhooks"][0]["apiKey"] = json!({"env": "BILLING_KEY"}));
        let env = |name: &str| (name == "BILLING_KEY").then(|| KEY_A.to_string());
        let plan = Plan::from_json(config.to_string().as_bytes(), &env).unwrap();
        let expected = SigningKey::parse(KEY_A).unwrap().sign("m", 1, b"x");
        assert_eq!(plan.webhooks[0].key.sign("m", 1, b"x"), expected);
        let bad_env = |_: &str| Some("nope".to_string());
        let errors = Plan::from_json(config.to_string().as_bytes(), &bad_env).unwrap_err();
        assert!(errors[0]
            .to_string()
            .starts_with("webhooks[0].apiKey: environment variable BILLING_KEY: must be whsec_"));
    }

    #[test]
    fn tenancy_index_only_holds_enabled_subscribed_webhooks() {
        let mut config = valid();
        config["events"].as_array_mut().unwrap().push(json!({
            "type": "job.started", "objectType": "job",
            "match": {"path": "/jobs/{jobId}/start"}, "organisationId": {"pathParam": "jobId"}
        }));
        let hook = |id: &str, org: &str, status: &str, events: Value| json!({"id": id, "organisationId": org, "name": "n", "url": "https://h.example/", "status": status, "events": events, "apiKey": KEY_A});
        config["webhooks"] = json!([
            hook(
                "000000000000000000000001",
                "o1",
                "enabled",
                json!(["job.completed"])
            ),
            hook(
                "000000000000000000000002",
                "o1",
                "disabled",
                json!(["job.completed"])
            ),
            hook(
                "000000000000000000000003",
                "o1",
                "enabled",
                json!(["job.started"])
            ),
            hook(
                "000000000000000000000004",
                "o2",
                "enabled",
                json!(["job.completed", "job.started"])
            ),
        ]);
        let plan = Plan::from_json(config.to_string().as_bytes(), &no_env).unwrap();
        assert_eq!(plan.subscribers("job.completed", "o1"), [0]);
        assert_eq!(plan.subscribers("job.started", "o1"), [2]);
        assert_eq!(plan.subscribers("job.completed", "o2"), [3]);
        assert_eq!(plan.subscribers("job.started", "o2"), [3]);
        assert!(plan.subscribers("job.completed", "o3").is_empty());
        assert_eq!(
            plan.rules[1].statuses.len(),
            100,
            "status defaults to every 2xx"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("200ms"), Ok(200));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        for bad in [
            "",
            "5",
            "s",
            "0s",
            "1.5s",
            "25h",
            "-1s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
