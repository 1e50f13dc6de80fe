//! Compilation: the raw configuration checked for meaning (URLs, keys, rules, subscriptions)
//! and turned into the immutable [`Plan`].

use super::defaults;
use super::errors::Errors;
use super::raw::{RawConfig, RawDelivery, RawOrganisation, RawRule, RawWebhook};
use super::{DeadLetter, DeliverySettings, Plan, Webhook};
use crate::delivery::{OutboxSettings, RetryPolicy};
use crate::rules::{
    validate_json_pointer, Check, Condition, EventRule, MethodSet, OrganisationSource, PathTemplate,
};
use crate::signature::SigningKey;
use crate::url::WebhookUrl;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

pub(super) fn compile(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> Option<Plan> {
    let delivery = compile_delivery(&raw.delivery, env, errors);

    if raw.events.is_empty() {
        errors.push("events", "must list at least one rule");
    }
    let rules: Vec<EventRule> = raw
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, r)| compile_rule(r, &format!("events[{i}]"), errors))
        .collect();
    let emitted = &raw.event_types;

    let mut seen_ids = HashSet::new();
    let mut webhooks = Vec::new();
    for (i, w) in raw.webhooks.iter().enumerate() {
        let at = format!("webhooks[{i}]");
        if !seen_ids.insert(w.id.as_str()) {
            errors.push(format!("{at}.id"), format!("duplicate webhook id {}", w.id));
        }
        if let Some(webhook) = compile_webhook(w, &at, &raw.delivery, emitted, env, errors) {
            webhooks.push(webhook);
        }
    }

    if !errors.is_empty() {
        return None;
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
    Some(Plan {
        rules,
        webhooks,
        delivery,
        subscribers,
    })
}

fn compile_delivery(
    raw: &RawDelivery,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
) -> DeliverySettings {
    let mut schedule = Vec::new();
    for (i, s) in raw.retry_schedule.iter().enumerate() {
        match parse_duration_ms(s) {
            Ok(ms) => schedule.push(ms),
            Err(e) => errors.push(format!("delivery.retrySchedule[{i}]"), e),
        }
    }
    let limits = [
        ("timeoutMs", raw.timeout_ms, defaults::TIMEOUT_MS_RANGE),
        ("maxQueued", raw.max_queued, defaults::MAX_QUEUED_RANGE),
        (
            "maxBodyBytes",
            raw.max_body_bytes,
            defaults::MAX_BODY_BYTES_RANGE,
        ),
        (
            "maxInFlightPerWebhook",
            raw.max_in_flight_per_webhook,
            defaults::MAX_IN_FLIGHT_PER_WEBHOOK_RANGE,
        ),
    ];
    for (field, value, range) in limits {
        if !range.contains(&value) {
            errors.push(
                format!("delivery.{field}"),
                format!("must be between {} and {}", range.start(), range.end()),
            );
        }
    }
    if let Some(cluster) = &raw.cluster {
        if cluster.is_empty() {
            errors.push("delivery.cluster", "must not be empty");
        }
    }
    let dead_letter = raw.dead_letter.as_ref().and_then(|dl| {
        let url = compile_url(&dl.url, "delivery.deadLetter.url", raw, errors);
        let cluster = dl.cluster.clone().or_else(|| raw.cluster.clone());
        if cluster.is_none() {
            errors.push(
                "delivery.deadLetter.cluster",
                "required when delivery.cluster is not set",
            );
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
        max_body_bytes: to_usize(raw.max_body_bytes),
        outbox: OutboxSettings {
            retry: RetryPolicy::new(schedule),
            max_queued: to_usize(raw.max_queued),
            max_in_flight_per_webhook: to_usize(raw.max_in_flight_per_webhook),
            circuit_failures: (raw.circuit_failures > 0).then_some(raw.circuit_failures),
        },
        dead_letter,
    }
}

/// A count or size as the outbox keeps it. Checked bounds make it fit even a 32-bit `usize`
/// (wasm32), where a plain cast would wrap 2^32 + 1 to 1; anything larger saturates.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Parses a delivery URL and applies the https and private-network rules of `delivery`.
fn compile_url(
    text: &str,
    at: &str,
    delivery: &RawDelivery,
    errors: &mut Errors,
) -> Option<WebhookUrl> {
    match WebhookUrl::parse(text) {
        Ok(url) => {
            let mark = errors.mark();
            if !url.https && !delivery.allow_insecure_http {
                errors.push(
                    at,
                    "must be an https URL (set delivery.allowInsecureHttp to allow http)",
                );
            }
            if let Some(class) = url
                .private_host_reason()
                .filter(|_| !delivery.allow_private_networks)
            {
                errors.push(
                    at,
                    format!("private or loopback address ({class}) is not allowed (set delivery.allowPrivateNetworks to allow it)"),
                );
            }
            errors.clean_since(mark).then_some(url)
        }
        Err(e) => {
            errors.push(at, e);
            None
        }
    }
}

/// A `whsec_` key given inline or as `{"env": "VARIABLE"}`.
fn compile_key(
    value: &Value,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Errors,
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
    result.map_err(|e| errors.push(at, e)).ok()
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

fn compile_rule(raw: &RawRule, at: &str, errors: &mut Errors) -> Option<EventRule> {
    let mark = errors.mark();
    if !is_event_type(&raw.event_type) {
        errors.push(
            format!("{at}.type"),
            format!(
                "{:?} must follow {{resource}}.{{event}} in lowercase, e.g. job.completed",
                raw.event_type
            ),
        );
    }
    if raw.object_type.is_empty() {
        errors.push(format!("{at}.objectType"), "must not be empty");
    }
    let mut methods = MethodSet::default();
    if raw.methods.is_empty() {
        errors.push(format!("{at}.match.methods"), "must not be empty");
    }
    for (i, m) in raw.methods.iter().enumerate() {
        match MethodSet::bit(m) {
            Some(bit) => methods.insert(bit),
            None => errors.push(
                format!("{at}.match.methods[{i}]"),
                format!("{m:?} is not an uppercase HTTP method"),
            ),
        }
    }
    let path = PathTemplate::parse(&raw.path)
        .map_err(|e| errors.push(format!("{at}.match.path"), e))
        .ok();
    let statuses = match &raw.status {
        None => defaults::STATUSES.collect(),
        Some(list) => {
            if list.is_empty() {
                errors.push(format!("{at}.match.status"), "must not be empty");
            }
            for (i, s) in list.iter().enumerate() {
                if !(100..600).contains(s) {
                    errors.push(
                        format!("{at}.match.status[{i}]"),
                        "must be an HTTP status from 100 to 599",
                    );
                }
            }
            list.clone()
        }
    };
    let mut when = Vec::new();
    for (i, c) in raw.when.iter().enumerate() {
        let cat = format!("{at}.when[{i}]");
        if let Err(e) = validate_json_pointer(&c.pointer) {
            errors.push(format!("{cat}.pointer"), e);
        }
        let check = match (&c.equals, c.exists) {
            (Some(v), None) => Check::Equals(v.clone()),
            (None, Some(b)) => Check::Exists(b),
            _ => {
                errors.push(cat, "must have exactly one of equals or exists");
                continue;
            }
        };
        when.push(Condition {
            pointer: c.pointer.clone(),
            check,
        });
    }
    if let Err(e) = validate_json_pointer(&raw.object) {
        errors.push(format!("{at}.object"), e);
    }
    let organisation = match &raw.organisation_id {
        RawOrganisation::Header(name) => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                errors.push(
                    format!("{at}.organisationId.header"),
                    "must be a header name",
                );
            }
            OrganisationSource::Header(name.to_ascii_lowercase())
        }
        RawOrganisation::Pointer(p) => {
            if let Err(e) = validate_json_pointer(p) {
                errors.push(format!("{at}.organisationId.pointer"), e);
            }
            OrganisationSource::Pointer(p.clone())
        }
        RawOrganisation::PathParam(name) => {
            if path.as_ref().is_some_and(|t| !t.has_capture(name)) {
                errors.push(
                    format!("{at}.organisationId.pathParam"),
                    format!("match.path has no {{{name}}} capture"),
                );
            }
            OrganisationSource::PathParam(name.clone())
        }
    };
    if !errors.clean_since(mark) {
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
    errors: &mut Errors,
) -> Option<Webhook> {
    let mark = errors.mark();
    if raw.id.len() != 24
        || !raw
            .id
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        errors.push(format!("{at}.id"), "must be 24 lowercase hex digits");
    }
    if raw.organisation_id.is_empty() {
        errors.push(format!("{at}.organisationId"), "must not be empty");
    }
    if raw.name.trim().is_empty() {
        errors.push(format!("{at}.name"), "must not be empty");
    }
    let url = compile_url(&raw.url, &format!("{at}.url"), delivery, errors);
    let enabled = match raw.status.as_str() {
        "enabled" => true,
        "disabled" => false,
        other => {
            errors.push(
                format!("{at}.status"),
                format!("must be \"enabled\" or \"disabled\", not {other:?}"),
            );
            false
        }
    };
    if raw.events.is_empty() {
        errors.push(format!("{at}.events"), "must not be empty");
    }
    for (i, e) in raw.events.iter().enumerate() {
        if !emitted.contains(e.as_str()) {
            errors.push(
                format!("{at}.events[{i}]"),
                format!("no rule in events[] emits {e:?}"),
            );
        } else if raw.events[..i].contains(e) {
            errors.push(
                format!("{at}.events[{i}]"),
                format!("{e:?} is listed twice"),
            );
        }
    }
    let key = compile_key(&raw.api_key, &format!("{at}.apiKey"), env, errors);
    let cluster = raw.cluster.clone().or_else(|| delivery.cluster.clone());
    match &cluster {
        None => errors.push(
            format!("{at}.cluster"),
            "required when delivery.cluster is not set",
        ),
        Some(c) if c.is_empty() => errors.push(format!("{at}.cluster"), "must not be empty"),
        Some(_) => {}
    }
    if !errors.clean_since(mark) {
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
