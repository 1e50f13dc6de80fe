//! Compilation: the raw configuration checked for meaning (URLs, keys, rules, subscriptions)
//! and turned into the immutable [`Plan`]. Each check records its error and carries on, so that
//! one pass reports every error; a part with errors compiles to None.

use super::defaults;
use super::errors::Errors;
use super::raw::{
    RawCondition, RawConfig, RawDeadLetter, RawDelivery, RawJournal, RawOrganisation, RawRefetch,
    RawRegistry, RawRule, RawWebhook,
};
use super::{DeadLetter, DeliverySettings, Plan, RegistrySettings, Webhook, WebhookRules};
use crate::delivery::{OutboxSettings, RetryPolicy};
use crate::journal::JournalSettings;
use crate::rules::{
    validate_json_pointer, Check, Condition, EventRule, MethodSet, OrganisationSource,
    PathTemplate, RefetchSpec,
};
use crate::signature::SigningKey;
use crate::url::WebhookUrl;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Reads the VM's environment variables (for `{"env": "VARIABLE"}` keys).
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub(super) fn compile(raw: RawConfig, env: Env, errors: &mut Errors) -> Option<Plan> {
    let delivery = compile_delivery(&raw.delivery, env, errors);
    let rules = compile_rules(&raw, errors);
    let webhooks = compile_webhooks(&raw, env, errors);
    let registry = raw
        .registry
        .as_ref()
        .and_then(|r| compile_registry(r, env, errors));
    if !errors.is_empty() {
        return None;
    }
    let webhooks: Vec<Rc<Webhook>> = webhooks.into_iter().map(Rc::new).collect();
    let subscribers = index_subscribers(&webhooks);
    let by_id = super::index_ids(&webhooks);
    Some(Plan {
        rules,
        by_id,
        webhooks,
        delivery,
        registry,
        webhook_rules: WebhookRules {
            delivery: raw.delivery,
            emitted: raw.event_types,
        },
        subscribers,
    })
}

/// The event rules alone (`events[]`).
pub(super) fn compile_rules(raw: &RawConfig, errors: &mut Errors) -> Vec<EventRule> {
    if raw.events.is_empty() {
        errors.push("events", "must list at least one rule");
    }
    raw.events
        .iter()
        .enumerate()
        .filter_map(|(i, r)| compile_rule(r, &format!("events[{i}]"), errors))
        .collect()
}

/// `registry`: the cluster, authority and path of the feed, and the proxy token, read from the
/// VM's environment like a key.
fn compile_registry(raw: &RawRegistry, env: Env, errors: &mut Errors) -> Option<RegistrySettings> {
    let mark = errors.mark();
    if raw.cluster.is_empty() {
        errors.push("registry.cluster", "must not be empty");
    }
    if raw.authority.is_empty() || raw.authority.contains(['/', ' ', '@']) {
        errors.push(
            "registry.authority",
            "must be a host, optionally with :port",
        );
    }
    if !raw.path.starts_with('/') || raw.path.contains(' ') {
        errors.push("registry.path", "must start with '/' and hold no spaces");
    }
    if !defaults::REGISTRY_POLL_MS_RANGE.contains(&raw.poll_ms) {
        errors.push(
            "registry.pollMs",
            format!("must be from 100 to 3600000, not {}", raw.poll_ms),
        );
    }
    if !defaults::REPORT_FLUSH_MS_RANGE.contains(&raw.report_flush_ms) {
        errors.push(
            "registry.reportFlushMs",
            format!("must be from 50 to 60000, not {}", raw.report_flush_ms),
        );
    }
    if !defaults::MAX_REPORT_BYTES_RANGE.contains(&raw.max_report_bytes) {
        errors.push(
            "registry.maxReportBytes",
            format!(
                "must be from 16384 to 1048576 (the registry's limit), not {}",
                raw.max_report_bytes
            ),
        );
    }
    if !defaults::REGISTRY_MAX_WEBHOOKS_RANGE.contains(&raw.max_webhooks) {
        errors.push(
            "registry.maxWebhooks",
            format!("must be from 1 to 10000000, not {}", raw.max_webhooks),
        );
    }
    let token = match env(&raw.token_env).map(|t| t.trim().to_string()) {
        Some(token) if !token.is_empty() => Some(token),
        Some(_) => {
            errors.push(
                "registry.tokenEnv",
                format!("environment variable {} is empty", raw.token_env),
            );
            None
        }
        None => {
            errors.push(
                "registry.tokenEnv",
                format!("environment variable {} is not set", raw.token_env),
            );
            None
        }
    };
    if !errors.clean_since(mark) {
        return None;
    }
    Some(RegistrySettings {
        cluster: raw.cluster.clone(),
        authority: raw.authority.clone(),
        path: raw.path.clone(),
        token: token?,
        poll_ms: raw.poll_ms,
        reports: raw.reports,
        report_flush_ms: raw.report_flush_ms,
        max_report_bytes: usize::try_from(raw.max_report_bytes).unwrap_or(usize::MAX),
        max_webhooks: usize::try_from(raw.max_webhooks).unwrap_or(usize::MAX),
    })
}

/// Compiles one webhook the registry holds, with the configuration's rules; its errors are
/// named from `at`.
pub(super) fn compile_registry_webhook(
    raw: &RawWebhook,
    at: &str,
    rules: &WebhookRules,
    errors: &mut Errors,
) -> Option<Webhook> {
    compile_webhook(raw, at, &rules.delivery, &rules.emitted, &|_| None, errors)
}

fn compile_webhooks(raw: &RawConfig, env: Env, errors: &mut Errors) -> Vec<Webhook> {
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
    webhooks
}

/// Event type → organisation → indexes of the enabled webhooks subscribed to it.
pub(super) fn index_subscribers(
    webhooks: &[Rc<Webhook>],
) -> HashMap<String, HashMap<String, Vec<usize>>> {
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
    subscribers
}

// ---- delivery ----

fn compile_delivery(raw: &RawDelivery, env: Env, errors: &mut Errors) -> DeliverySettings {
    let schedule = compile_retry_schedule(&raw.retry_schedule, errors);
    check_limits(raw, errors);
    if raw.cluster.as_deref() == Some("") {
        errors.push("delivery.cluster", "must not be empty");
    }
    let dead_letter = raw
        .dead_letter
        .as_ref()
        .and_then(|dl| compile_dead_letter(dl, raw, env, errors));
    let journal = raw
        .journal
        .as_ref()
        .and_then(|j| compile_journal(j, errors));
    DeliverySettings {
        timeout_ms: raw.timeout_ms,
        max_body_bytes: to_usize(raw.max_body_bytes),
        outbox: OutboxSettings {
            retry: RetryPolicy::new(schedule),
            max_queued: to_usize(raw.max_queued),
            max_queued_bytes: to_usize(raw.max_queued_bytes),
            max_in_flight_per_webhook: to_usize(raw.max_in_flight_per_webhook),
            circuit_failures: (raw.circuit_failures > 0).then_some(raw.circuit_failures),
        },
        dead_letter,
        journal,
    }
}

fn compile_journal(raw: &RawJournal, errors: &mut Errors) -> Option<JournalSettings> {
    let mark = errors.mark();
    if raw.cluster.is_empty() {
        errors.push("delivery.journal.cluster", "must not be empty");
    }
    let authority = raw.authority.clone().unwrap_or_else(|| raw.cluster.clone());
    if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
        errors.push(
            "delivery.journal.authority",
            "must be a host name (printable ASCII, no spaces)",
        );
    }
    // The prefix goes into every key and into log lines: printable ASCII only.
    if raw.prefix.is_empty() || !raw.prefix.bytes().all(|b| b.is_ascii_graphic()) {
        errors.push(
            "delivery.journal.prefix",
            "must be printable ASCII without spaces, and not empty",
        );
    }
    let range = defaults::JOURNAL_LEASE_SECONDS_RANGE;
    if !range.contains(&raw.lease_seconds) {
        errors.push(
            "delivery.journal.leaseSeconds",
            format!("must be between {} and {}", range.start(), range.end()),
        );
    }
    errors.clean_since(mark).then(|| JournalSettings {
        cluster: raw.cluster.clone(),
        authority,
        prefix: raw.prefix.clone(),
        lease_seconds: raw.lease_seconds,
        max_spilled_bytes: to_usize(raw.max_spilled_bytes),
    })
}

fn compile_retry_schedule(steps: &[String], errors: &mut Errors) -> Vec<u64> {
    let mut schedule = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        match parse_duration_ms(s) {
            Ok(ms) => schedule.push(ms),
            Err(e) => errors.push(format!("delivery.retrySchedule[{i}]"), e),
        }
    }
    schedule
}

/// The numbers of `delivery` that must lie within their bounds.
fn check_limits(raw: &RawDelivery, errors: &mut Errors) {
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
    let bytes = defaults::MAX_QUEUED_BYTES_RANGE;
    if !bytes.contains(&raw.max_queued_bytes) {
        errors.push(
            "delivery.maxQueuedBytes",
            format!("must be at least {}", bytes.start),
        );
    }
}

/// A count or size as the outbox keeps it. The bounds were checked on the `u64`, because a cast
/// to a 32-bit `usize` (the wasm build) would wrap 2^32 + 1 to 1. A size beyond `usize` (only
/// `maxQueuedBytes` has no upper bound) saturates: more than the VM can hold bounds nothing.
fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

fn compile_dead_letter(
    raw: &RawDeadLetter,
    delivery: &RawDelivery,
    env: Env,
    errors: &mut Errors,
) -> Option<DeadLetter> {
    let url = compile_url(&raw.url, "delivery.deadLetter.url", delivery, errors);
    let cluster = compile_cluster(
        raw.cluster.as_ref(),
        delivery,
        "delivery.deadLetter.cluster",
        errors,
    );
    let key = match &raw.api_key {
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
}

/// The cluster named here, or else `delivery.cluster`.
fn compile_cluster(
    own: Option<&String>,
    delivery: &RawDelivery,
    at: &str,
    errors: &mut Errors,
) -> Option<String> {
    match own.or(delivery.cluster.as_ref()) {
        None => {
            errors.push(at, "required when delivery.cluster is not set");
            None
        }
        Some(c) if c.is_empty() => {
            errors.push(at, "must not be empty");
            None
        }
        Some(c) => Some(c.clone()),
    }
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
fn compile_key(value: &Value, at: &str, env: Env, errors: &mut Errors) -> Option<SigningKey> {
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

/// The longest one step of `retrySchedule` may wait: 24 hours, as the error message says.
const MAX_RETRY_DELAY_MS: u64 = 86_400_000;

/// `"500ms"`, `"5s"`, `"2m"`, `"1h"`: a whole number and a unit, at most 24 hours.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    crate::time::parse_period_ms(text, false, MAX_RETRY_DELAY_MS, "24h")
}

// ---- events[] ----

mod rules;
use rules::compile_rule;

/// `{resource}.{event}` in lowercase, e.g. `job.completed`.
pub(crate) fn is_event_type(t: &str) -> bool {
    let word = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    matches!(t.split_once('.'), Some((resource, event)) if word(resource) && word(event))
}

// ---- webhooks[] ----

fn compile_webhook(
    raw: &RawWebhook,
    at: &str,
    delivery: &RawDelivery,
    emitted: &HashSet<String>,
    env: Env,
    errors: &mut Errors,
) -> Option<Webhook> {
    let mark = errors.mark();
    if !is_webhook_id(&raw.id) {
        errors.push(format!("{at}.id"), "must be 24 lowercase hex digits");
    }
    if raw.organisation_id.is_empty() {
        errors.push(format!("{at}.organisationId"), "must not be empty");
    }
    if raw.name.trim().is_empty() {
        errors.push(format!("{at}.name"), "must not be empty");
    }
    let url = compile_url(&raw.url, &format!("{at}.url"), delivery, errors);
    let enabled = compile_status(&raw.status, &format!("{at}.status"), errors);
    check_subscriptions(&raw.events, emitted, &format!("{at}.events"), errors);
    let key = compile_key(&raw.api_key, &format!("{at}.apiKey"), env, errors);
    let cluster = compile_cluster(
        raw.cluster.as_ref(),
        delivery,
        &format!("{at}.cluster"),
        errors,
    );
    if !errors.clean_since(mark) {
        return None;
    }
    Some(Webhook {
        id: raw.id.clone(),
        organisation_id: raw.organisation_id.clone(),
        url: url?,
        enabled,
        events: raw.events.clone(),
        key: key?,
        previous_key: None,
        cluster: cluster?,
    })
}

/// 24 lowercase hex digits, the shape of the registry's ids.
pub(crate) fn is_webhook_id(id: &str) -> bool {
    id.len() == 24
        && id
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// `status`: whether events are pushed to the webhook.
fn compile_status(status: &str, at: &str, errors: &mut Errors) -> bool {
    match status {
        "enabled" => true,
        "disabled" => false,
        other => {
            errors.push(
                at,
                format!("must be \"enabled\" or \"disabled\", not {other:?}"),
            );
            false
        }
    }
}

/// A webhook's `events`: not empty, no duplicates, each emitted by some rule (`emitted`).
fn check_subscriptions(
    events: &[String],
    emitted: &HashSet<String>,
    at: &str,
    errors: &mut Errors,
) {
    if events.is_empty() {
        errors.push(at, "must not be empty");
    }
    for (i, e) in events.iter().enumerate() {
        if !emitted.contains(e.as_str()) {
            errors.push(
                format!("{at}[{i}]"),
                format!("no rule in events[] emits {e:?}"),
            );
        } else if events[..i].contains(e) {
            errors.push(format!("{at}[{i}]"), format!("{e:?} is listed twice"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

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
