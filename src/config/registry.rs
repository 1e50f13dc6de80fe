//! The registry's document (`GET /v1/registry`): the webhooks registered through the registry
//! service, added to the configuration's own. Each is checked with the same rules as a configured
//! webhook; one that fails is left out (its errors say why) and the others apply.
//!
//! The document: `{"revision": N, "webhooks": [{"id", "organisationId", "name", "url",
//! "description", "status", "events", "apiKeys": [current, previous?], "previousKeyExpiresAt"?}]}`.
//! Fields the registry adds beyond these (timestamps, …) are not the filter's to refuse.

use super::compile::{compile_registry_webhook, index_subscribers};
use super::errors::{ConfigError, Errors};
use super::raw::read_webhook;
use super::{Plan, PreviousKey, Webhook, WebhookRules};
use crate::signature::SigningKey;
use serde_json::{Map, Value};
use std::collections::HashSet;

/// The fields of a registry webhook that are also a configured webhook's.
const WEBHOOK_FIELDS: [&str; 7] = [
    "id",
    "organisationId",
    "name",
    "url",
    "description",
    "status",
    "events",
];

/// A plan with a registry document applied, and what was left out of it.
#[derive(Debug)]
pub struct RegistryUpdate {
    pub plan: Plan,
    /// One error per problem of a webhook that was left out, named by its place in the document.
    pub skipped: Vec<ConfigError>,
    pub revision: Option<u64>,
}

impl Plan {
    /// This configuration with the registry document `doc` as its registry webhooks (replacing
    /// any earlier document's). Err when the document itself can't be read: the plan in force
    /// then stays as it is.
    pub fn with_registry(&self, doc: &[u8]) -> Result<RegistryUpdate, String> {
        let value: Value =
            serde_json::from_slice(doc).map_err(|e| format!("the document is not JSON ({e})"))?;
        let listed = value
            .get("webhooks")
            .and_then(Value::as_array)
            .ok_or("the document has no \"webhooks\" array")?;
        let mut errors = Errors::default();
        let mut webhooks: Vec<Webhook> = self
            .webhooks
            .iter()
            .take(self.static_webhooks)
            .cloned()
            .collect();
        let mut ids: HashSet<String> = webhooks.iter().map(|w| w.id.clone()).collect();
        for (i, item) in listed.iter().enumerate() {
            let at = format!("registry.webhooks[{i}]");
            let Some(webhook) = registry_webhook(item, &at, &self.webhook_rules, &mut errors)
            else {
                continue;
            };
            if !ids.insert(webhook.id.clone()) {
                errors.push(
                    format!("{at}.id"),
                    format!(
                        "{} is a webhook of the configuration, or listed twice",
                        webhook.id
                    ),
                );
                continue;
            }
            webhooks.push(webhook);
        }
        let subscribers = index_subscribers(&webhooks);
        Ok(RegistryUpdate {
            plan: Plan {
                rules: self.rules.clone(),
                webhooks,
                delivery: self.delivery.clone(),
                registry: self.registry.clone(),
                static_webhooks: self.static_webhooks,
                webhook_rules: self.webhook_rules.clone(),
                subscribers,
            },
            skipped: errors.into_vec(),
            revision: value.get("revision").and_then(Value::as_u64),
        })
    }
}

fn registry_webhook(
    value: &Value,
    at: &str,
    rules: &WebhookRules,
    errors: &mut Errors,
) -> Option<Webhook> {
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
    let mut webhook = compile_registry_webhook(&raw, at, rules, errors)?;
    if let Some(previous) = keys.and_then(|k| k.get(1)) {
        let expires = map.get("previousKeyExpiresAt").and_then(Value::as_u64);
        match (previous.as_str().map(SigningKey::parse), expires) {
            (Some(Ok(key)), Some(seconds)) => {
                webhook.previous_key = Some(PreviousKey {
                    key,
                    expires_at_ms: seconds.saturating_mul(1000),
                });
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
