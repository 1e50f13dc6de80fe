//! The raw readers: the configuration's JSON read into plain structs, with shapes and types
//! checked and defaults filled in. What the values mean is checked when they are compiled.

use super::defaults;
use super::errors::Errors;
use super::reader::{fields, join};
use serde_json::{Map, Value};
use std::collections::HashSet;

pub(super) struct RawConfig {
    pub(super) events: Vec<RawRule>,
    pub(super) webhooks: Vec<RawWebhook>,
    pub(super) delivery: RawDelivery,
    /// Every `events[].type` that was given, even in a rule that has other errors, so that webhooks
    /// are not also blamed for subscribing to it.
    pub(super) event_types: HashSet<String>,
}

pub(super) struct RawRule {
    pub(super) event_type: String,
    pub(super) object_type: String,
    pub(super) methods: Vec<String>,
    pub(super) path: String,
    pub(super) status: Option<Vec<u16>>,
    pub(super) when: Vec<RawCondition>,
    pub(super) object: String,
    pub(super) organisation_id: RawOrganisation,
}

pub(super) struct RawCondition {
    pub(super) pointer: String,
    /// `Some(Value::Null)` is `"equals": null`; None is a missing `equals`.
    pub(super) equals: Option<Value>,
    pub(super) exists: Option<bool>,
}

pub(super) enum RawOrganisation {
    Header(String),
    Pointer(String),
    PathParam(String),
}

pub(super) struct RawWebhook {
    pub(super) id: String,
    pub(super) organisation_id: String,
    pub(super) name: String,
    pub(super) url: String,
    pub(super) description: Option<String>,
    pub(super) status: String,
    pub(super) events: Vec<String>,
    pub(super) api_key: Value,
    pub(super) cluster: Option<String>,
}

pub(super) struct RawDelivery {
    pub(super) cluster: Option<String>,
    pub(super) timeout_ms: u64,
    pub(super) retry_schedule: Vec<String>,
    pub(super) max_queued: u64,
    pub(super) max_body_bytes: u64,
    pub(super) max_in_flight_per_webhook: u64,
    pub(super) allow_insecure_http: bool,
    pub(super) allow_private_networks: bool,
    pub(super) circuit_failures: u32,
    pub(super) dead_letter: Option<RawDeadLetter>,
}

pub(super) struct RawDeadLetter {
    pub(super) url: String,
    pub(super) cluster: Option<String>,
    pub(super) api_key: Option<Value>,
}

pub(super) fn read_config(value: &Value, errors: &mut Errors) -> Option<RawConfig> {
    let mut f = fields(value, "", &["events", "webhooks", "delivery"], errors)?;
    let events_value = f.required("events");
    let events = f.array("events", events_value);
    let webhooks_value = f.required("webhooks");
    let webhooks = f.array("webhooks", webhooks_value);
    // A missing section reads like an empty one, so that its defaults come from one place.
    let no_delivery = Value::Object(Map::new());
    let delivery = read_delivery(f.get("delivery").unwrap_or(&no_delivery), f.errors);
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

fn read_rule(value: &Value, at: &str, errors: &mut Errors) -> Option<RawRule> {
    let mark = errors.mark();
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
    let object = f
        .opt_string("object")
        .unwrap_or_else(|| defaults::OBJECT_POINTER.to_string());
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
            None => Some(defaults::METHODS.map(String::from).to_vec()),
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
    if !errors.clean_since(mark) {
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

fn read_organisation(value: &Value, at: &str, errors: &mut Errors) -> Option<RawOrganisation> {
    let mut f = fields(value, at, &["header", "pointer", "pathParam"], errors)?;
    let given: Vec<&str> = ["header", "pointer", "pathParam"]
        .into_iter()
        .filter(|k| f.map.contains_key(*k))
        .collect();
    let [source] = given.as_slice() else {
        let path = f.at.clone();
        f.errors.push(
            path,
            "must have exactly one of header, pointer or pathParam",
        );
        return None;
    };
    let name = f.string(source)?;
    Some(match *source {
        "header" => RawOrganisation::Header(name),
        "pointer" => RawOrganisation::Pointer(name),
        _ => RawOrganisation::PathParam(name),
    })
}

fn read_webhook(value: &Value, at: &str, errors: &mut Errors) -> Option<RawWebhook> {
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
    let mark = errors.mark();
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
    if !f.errors.clean_since(mark) {
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

fn read_delivery(value: &Value, errors: &mut Errors) -> Option<RawDelivery> {
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
    let mark = errors.mark();
    let mut f = fields(value, "delivery", &known, errors)?;
    let schedule_value = f.get("retrySchedule");
    let mut delivery = RawDelivery {
        cluster: f.opt_string("cluster"),
        timeout_ms: f.opt_u64("timeoutMs", defaults::TIMEOUT_MS),
        retry_schedule: match schedule_value {
            Some(v) => f.strings("retrySchedule", Some(v)).unwrap_or_default(),
            None => defaults::RETRY_SCHEDULE.map(String::from).to_vec(),
        },
        max_queued: f.opt_u64("maxQueued", defaults::MAX_QUEUED),
        max_body_bytes: f.opt_u64("maxBodyBytes", defaults::MAX_BODY_BYTES),
        max_in_flight_per_webhook: f
            .opt_u64("maxInFlightPerWebhook", defaults::MAX_IN_FLIGHT_PER_WEBHOOK),
        allow_insecure_http: f.opt_bool("allowInsecureHttp", defaults::ALLOW_INSECURE_HTTP),
        allow_private_networks: f
            .opt_bool("allowPrivateNetworks", defaults::ALLOW_PRIVATE_NETWORKS),
        circuit_failures: defaults::CIRCUIT_FAILURES,
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
        delivery.circuit_failures = failures.unwrap_or(defaults::CIRCUIT_FAILURES);
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
    errors.clean_since(mark).then_some(delivery)
}
