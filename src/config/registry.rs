//! Registry webhooks (the entries of the registry feed, `GET /v2/registry/changes`, see
//! docs/registry-feed.md) checked with the same rules as a configured webhook. The worker keeps
//! them beside the plan (src/registry_sync.rs), which holds the configuration's own only.
//!
//! An entry: `{"revision", "id", "organisationId", "name", "url", "description", "status",
//! "events", "apiKeys": [current, previous?], "previousKeyExpiresAt"?}`. Fields the registry adds
//! beyond these (timestamps, …) are not the filter's to refuse; the filter keeps neither the name
//! nor the description.

use super::compile::compile_registry_webhook;
use super::errors::{ConfigError, Errors};
use super::raw::read_webhook;
use super::{Plan, PreviousKey, Webhook};
use crate::signature::SigningKey;
use serde_json::{Map, Value};

/// The fields of a registry entry that are also a configured webhook's (the description is left
/// out: it is not used, and may be the largest field).
const WEBHOOK_FIELDS: [&str; 6] = ["id", "organisationId", "name", "url", "status", "events"];

impl Plan {
    /// One registry entry compiled with this configuration's rules; None (with its errors named
    /// from `at`) when it is not valid here, or when its id is one of the configuration's own.
    pub fn registry_webhook(
        &self,
        value: &Value,
        at: &str,
        errors: &mut Vec<ConfigError>,
    ) -> Option<Webhook> {
        let mut sink = Errors::default();
        let webhook = compile_entry(self, value, at, &mut sink);
        errors.extend(sink.into_vec());
        webhook
    }

    /// Whether `id` names one of the configuration's own webhooks.
    fn is_configured(&self, id: &str) -> bool {
        self.webhook_index(id).is_some()
    }
}

fn compile_entry(plan: &Plan, value: &Value, at: &str, errors: &mut Errors) -> Option<Webhook> {
    let Value::Object(map) = value else {
        errors.push(at, "must be a JSON object");
        return None;
    };
    let mark = errors.mark();
    let mut shaped = Map::new();
    for key in WEBHOOK_FIELDS {
        if let Some(v) = map.get(key) {
            shaped.insert(key.to_string(), v.clone());
        }
    }
    let keys = map.get("apiKeys").and_then(Value::as_array);
    let Some(current) = keys.and_then(|k| k.first()) else {
        errors.push(format!("{at}.apiKeys"), "must hold at least one key");
        return None;
    };
    shaped.insert("apiKey".to_string(), current.clone());
    let raw = read_webhook(&Value::Object(shaped), at, errors)?;
    let mut webhook = compile_registry_webhook(&raw, at, &plan.webhook_rules, errors)?;
    if plan.is_configured(&webhook.id) {
        errors.push(
            format!("{at}.id"),
            format!("{} is a webhook of the configuration", webhook.id),
        );
        return None;
    }
    if let Some(previous) = keys.and_then(|k| k.get(1)) {
        let expires = map.get("previousKeyExpiresAt").and_then(Value::as_u64);
        match (previous.as_str().map(SigningKey::parse), expires) {
            (Some(Ok(key)), Some(seconds)) => {
                webhook.previous_key = Some(Box::new(PreviousKey {
                    key,
                    expires_at_ms: seconds.saturating_mul(1000),
                }));
            }
            (Some(Err(e)), _) => errors.push(format!("{at}.apiKeys[1]"), e.to_string()),
            (None, _) => errors.push(format!("{at}.apiKeys[1]"), "must be a whsec_ key"),
            (Some(Ok(_)), None) => errors.push(
                format!("{at}.previousKeyExpiresAt"),
                "must be Unix seconds when apiKeys holds a previous key",
            ),
        }
    }
    errors.clean_since(mark).then_some(webhook)
}
