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
    pub(super) registry: Option<RawRegistry>,
    /// Every `events[].type` that was given, even in a rule that has other errors, so that webhooks
    /// are not also blamed for subscribing to it.
    pub(super) event_types: HashSet<String>,
}

pub(super) struct RawRule {
    pub(super) event_type: String,
    pub(super) object_type: String,
    pub(super) matching: RawMatch,
    pub(super) when: Vec<RawCondition>,
    pub(super) object: String,
    pub(super) organisation_id: RawOrganisation,
    pub(super) refetch: Option<RawRefetch>,
}

/// `events[].refetch`: how to read the object again when its response was cut short.
pub(super) struct RawRefetch {
    pub(super) path: String,
    pub(super) method: String,
    pub(super) cluster: Option<String>,
}

/// `events[].match`: which requests and responses a rule looks at.
pub(super) struct RawMatch {
    pub(super) methods: Vec<String>,
    pub(super) path: String,
    /// None is the default (every 2xx), filled in when compiled.
    pub(super) status: Option<Vec<u16>>,
    /// `caseInsensitive`: the path's literal segments compare ASCII letters without case.
    pub(super) case_insensitive: bool,
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
    pub(super) status: String,
    pub(super) events: Vec<String>,
    pub(super) api_key: Value,
    pub(super) cluster: Option<String>,
}

/// `registry`: where the proxies pull registered webhooks from.
pub(super) struct RawRegistry {
    pub(super) cluster: String,
    pub(super) authority: String,
    pub(super) path: String,
    pub(super) token_env: String,
    pub(super) poll_ms: u64,
    pub(super) reports: bool,
    pub(super) report_flush_ms: u64,
    pub(super) max_report_bytes: u64,
    pub(super) max_webhooks: u64,
}

#[derive(Debug, Clone)]
pub(super) struct RawDelivery {
    pub(super) cluster: Option<String>,
    pub(super) timeout_ms: u64,
    pub(super) retry_schedule: Vec<String>,
    pub(super) max_queued: u64,
    pub(super) max_queued_bytes: u64,
    pub(super) max_body_bytes: u64,
    pub(super) max_in_flight_per_webhook: u64,
    pub(super) allow_insecure_http: bool,
    pub(super) allow_private_networks: bool,
    pub(super) circuit_failures: u32,
    pub(super) dead_letter: Option<RawDeadLetter>,
    pub(super) journal: Option<RawJournal>,
}

#[derive(Debug, Clone)]
pub(super) struct RawJournal {
    pub(super) cluster: String,
    pub(super) authority: Option<String>,
    pub(super) prefix: String,
    pub(super) lease_seconds: u64,
    pub(super) max_spilled_bytes: u64,
}

#[derive(Debug, Clone)]
pub(super) struct RawDeadLetter {
    pub(super) url: String,
    pub(super) cluster: Option<String>,
    pub(super) api_key: Option<Value>,
}

pub(super) fn read_config(value: &Value, errors: &mut Errors) -> Option<RawConfig> {
    let mut f = fields(
        value,
        "",
        &["events", "webhooks", "delivery", "registry"],
        errors,
    )?;
    let events = f.required_array("events");
    // With a registry, the configuration's own webhooks may be empty or absent.
    let registry_value = f.get("registry");
    let webhooks = if registry_value.is_some() {
        f.opt_array("webhooks").or(Some(&NO_WEBHOOKS))
    } else {
        f.required_array("webhooks")
    };
    // A missing section reads like an empty one, so that its defaults come from one place.
    let no_delivery = Value::Object(Map::new());
    let delivery = read_delivery(f.get("delivery").unwrap_or(&no_delivery), f.errors);
    let errors = f.errors;
    let registry = registry_value.map(|v| read_registry(v, errors));
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
        registry: match registry {
            Some(r) => Some(r?),
            None => None,
        },
        event_types,
    })
    .filter(|_| events.is_some() && webhooks.is_some())
}

static NO_WEBHOOKS: Vec<Value> = Vec::new();

fn read_registry(value: &Value, errors: &mut Errors) -> Option<RawRegistry> {
    let at = "registry";
    let known = [
        "cluster",
        "authority",
        "path",
        "tokenEnv",
        "pollMs",
        "reports",
        "reportFlushMs",
        "maxReportBytes",
        "maxWebhooks",
    ];
    let mark = errors.mark();
    let mut f = fields(value, at, &known, errors)?;
    let cluster = f.string("cluster");
    let authority = f.string("authority");
    let path = f.opt_string("path");
    let token_env = f.string("tokenEnv");
    let poll_ms = f.opt_u64("pollMs");
    let reports = f.opt_bool("reports");
    let report_flush_ms = f.opt_u64("reportFlushMs");
    let max_report_bytes = f.opt_u64("maxReportBytes");
    let max_webhooks = f.opt_u64("maxWebhooks");
    if !f.errors.clean_since(mark) {
        return None;
    }
    Some(RawRegistry {
        cluster: cluster?,
        authority: authority?,
        path: path.unwrap_or_else(|| defaults::REGISTRY_PATH.to_string()),
        token_env: token_env?,
        poll_ms: poll_ms.unwrap_or(defaults::REGISTRY_POLL_MS),
        reports: reports.unwrap_or(defaults::REGISTRY_REPORTS),
        report_flush_ms: report_flush_ms.unwrap_or(defaults::REPORT_FLUSH_MS),
        max_report_bytes: max_report_bytes.unwrap_or(defaults::MAX_REPORT_BYTES),
        max_webhooks: max_webhooks.unwrap_or(defaults::REGISTRY_MAX_WEBHOOKS),
    })
}

fn read_rule(value: &Value, at: &str, errors: &mut Errors) -> Option<RawRule> {
    let known = [
        "type",
        "objectType",
        "match",
        "when",
        "object",
        "organisationId",
        "refetch",
    ];
    let mark = errors.mark();
    let mut f = fields(value, at, &known, errors)?;
    let event_type = f.string("type");
    let object_type = f.string("objectType");
    let object = f
        .opt_string("object")
        .unwrap_or_else(|| defaults::OBJECT_POINTER.to_string());
    let matching = f.required("match");
    let when = f.opt_array("when");
    let organisation = f.required("organisationId");
    let refetch = f.get("refetch");
    let errors = f.errors;
    let matching = matching.and_then(|m| read_match(m, &join(at, "match"), errors));
    let when = read_conditions(when.unwrap_or(&Vec::new()), at, errors);
    let organisation_id =
        organisation.and_then(|o| read_organisation(o, &join(at, "organisationId"), errors));
    let refetch = refetch.and_then(|r| read_refetch(r, &join(at, "refetch"), errors));
    if !errors.clean_since(mark) {
        return None;
    }
    Some(RawRule {
        event_type: event_type?,
        object_type: object_type?,
        matching: matching?,
        when,
        object,
        organisation_id: organisation_id?,
        refetch,
    })
}

fn read_refetch(value: &Value, at: &str, errors: &mut Errors) -> Option<RawRefetch> {
    let mark = errors.mark();
    let mut f = fields(value, at, &["path", "method", "cluster"], errors)?;
    let path = f.string("path");
    let method = f
        .opt_string("method")
        .unwrap_or_else(|| defaults::REFETCH_METHOD.to_string());
    let cluster = f.opt_string("cluster");
    if !f.errors.clean_since(mark) {
        return None;
    }
    Some(RawRefetch {
        path: path?,
        method,
        cluster,
    })
}

fn read_match(value: &Value, at: &str, errors: &mut Errors) -> Option<RawMatch> {
    let mark = errors.mark();
    let mut m = fields(
        value,
        at,
        &["methods", "path", "status", "caseInsensitive"],
        errors,
    )?;
    let methods = match m.get("methods") {
        Some(v) => m.strings("methods", Some(v)),
        None => Some(defaults::METHODS.map(String::from).to_vec()),
    };
    let path = m.string("path");
    let case_insensitive = m.opt_bool("caseInsensitive").unwrap_or(false);
    let mut status = None;
    if let Some(list) = m.opt_array("status") {
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
    if !m.errors.clean_since(mark) {
        return None;
    }
    Some(RawMatch {
        methods: methods?,
        path: path?,
        status,
        case_insensitive,
    })
}

/// `when[]`; a condition with errors is left out (the errors fail the rule).
fn read_conditions(items: &[Value], at: &str, errors: &mut Errors) -> Vec<RawCondition> {
    let mut when = Vec::new();
    for (i, c) in items.iter().enumerate() {
        let Some(mut c) = fields(
            c,
            &format!("{at}.when[{i}]"),
            &["pointer", "equals", "exists"],
            errors,
        ) else {
            continue;
        };
        let pointer = c.string("pointer");
        // Not `get`: here `null` is a value to compare with, not an absent field.
        let equals = c.map.get("equals").cloned();
        let exists = c.opt_bool("exists");
        if let Some(pointer) = pointer {
            when.push(RawCondition {
                pointer,
                equals,
                exists,
            });
        }
    }
    when
}

fn read_organisation(value: &Value, at: &str, errors: &mut Errors) -> Option<RawOrganisation> {
    const SOURCES: [&str; 3] = ["header", "pointer", "pathParam"];
    let mut f = fields(value, at, &SOURCES, errors)?;
    let given: Vec<&str> = SOURCES
        .into_iter()
        .filter(|k| f.map.contains_key(*k))
        .collect();
    let [source] = given.as_slice() else {
        f.errors
            .push(at, "must have exactly one of header, pointer or pathParam");
        return None;
    };
    let name = f.string(source)?;
    Some(match *source {
        "header" => RawOrganisation::Header(name),
        "pointer" => RawOrganisation::Pointer(name),
        _ => RawOrganisation::PathParam(name),
    })
}

pub(super) fn read_webhook(value: &Value, at: &str, errors: &mut Errors) -> Option<RawWebhook> {
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
    // Checked for its type only: the filter never uses a description.
    let _ = f.opt_string("description");
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
        "maxQueuedBytes",
        "maxBodyBytes",
        "maxInFlightPerWebhook",
        "allowInsecureHttp",
        "allowPrivateNetworks",
        "circuitBreaker",
        "deadLetter",
        "journal",
    ];
    let mark = errors.mark();
    let mut f = fields(value, "delivery", &known, errors)?;
    let retry_schedule = match f.get("retrySchedule") {
        Some(v) => f.strings("retrySchedule", Some(v)).unwrap_or_default(),
        None => defaults::RETRY_SCHEDULE.map(String::from).to_vec(),
    };
    let mut delivery = RawDelivery {
        cluster: f.opt_string("cluster"),
        timeout_ms: f.opt_u64("timeoutMs").unwrap_or(defaults::TIMEOUT_MS),
        retry_schedule,
        max_queued: f.opt_u64("maxQueued").unwrap_or(defaults::MAX_QUEUED),
        max_queued_bytes: f
            .opt_u64("maxQueuedBytes")
            .unwrap_or(defaults::MAX_QUEUED_BYTES),
        max_body_bytes: f
            .opt_u64("maxBodyBytes")
            .unwrap_or(defaults::MAX_BODY_BYTES),
        max_in_flight_per_webhook: f
            .opt_u64("maxInFlightPerWebhook")
            .unwrap_or(defaults::MAX_IN_FLIGHT_PER_WEBHOOK),
        allow_insecure_http: f
            .opt_bool("allowInsecureHttp")
            .unwrap_or(defaults::ALLOW_INSECURE_HTTP),
        allow_private_networks: f
            .opt_bool("allowPrivateNetworks")
            .unwrap_or(defaults::ALLOW_PRIVATE_NETWORKS),
        circuit_failures: defaults::CIRCUIT_FAILURES,
        dead_letter: None,
        journal: None,
    };
    let breaker = f.get("circuitBreaker");
    let dead_letter = f.get("deadLetter");
    let journal = f.get("journal");
    let errors = f.errors;
    if let Some(failures) = breaker.and_then(|v| read_circuit_breaker(v, errors)) {
        delivery.circuit_failures = failures;
    }
    delivery.dead_letter = dead_letter.and_then(|v| read_dead_letter(v, errors));
    delivery.journal = journal.and_then(|v| read_journal(v, errors));
    errors.clean_since(mark).then_some(delivery)
}

/// `delivery.circuitBreaker`: its `failures`.
fn read_circuit_breaker(value: &Value, errors: &mut Errors) -> Option<u32> {
    let mut f = fields(value, "delivery.circuitBreaker", &["failures"], errors)?;
    let failures = f.required("failures");
    f.typed(
        "failures",
        failures,
        "a whole number (0 turns the breaker off)",
        |v| v.as_u64().and_then(|n| u32::try_from(n).ok()),
    )
}

fn read_dead_letter(value: &Value, errors: &mut Errors) -> Option<RawDeadLetter> {
    let mut f = fields(
        value,
        "delivery.deadLetter",
        &["url", "cluster", "apiKey"],
        errors,
    )?;
    let url = f.string("url");
    let cluster = f.opt_string("cluster");
    let api_key = f.get("apiKey").cloned();
    Some(RawDeadLetter {
        url: url?,
        cluster,
        api_key,
    })
}

/// `delivery.journal`: where the write-ahead journal lives.
fn read_journal(value: &Value, errors: &mut Errors) -> Option<RawJournal> {
    let mut f = fields(
        value,
        "delivery.journal",
        &[
            "cluster",
            "authority",
            "prefix",
            "leaseSeconds",
            "maxSpilledBytes",
        ],
        errors,
    )?;
    let cluster = f.string("cluster");
    let authority = f.opt_string("authority");
    let prefix = f
        .opt_string("prefix")
        .unwrap_or_else(|| defaults::JOURNAL_PREFIX.to_string());
    let lease_seconds = f
        .opt_u64("leaseSeconds")
        .unwrap_or(defaults::JOURNAL_LEASE_SECONDS);
    let max_spilled_bytes = f
        .opt_u64("maxSpilledBytes")
        .unwrap_or(defaults::JOURNAL_MAX_SPILLED_BYTES);
    Some(RawJournal {
        cluster: cluster?,
        authority,
        prefix,
        lease_seconds,
        max_spilled_bytes,
    })
}
