//! The plugin configuration: a serde model of the JSON, validated as a whole into an immutable
//! [`Plan`]. Every error names the JSON path of the bad field; unknown fields are errors.

use crate::delivery::OutboxSettings;
use crate::rules::EventRule;
use crate::signature::SigningKey;
use crate::url::WebhookUrl;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;

mod compile;
mod raw;
mod reader;

pub use compile::parse_duration_ms;

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
        let raw = raw::read_config(&value, &mut errors);
        match raw {
            Some(raw) if errors.is_empty() => compile::compile(raw, env),
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

#[cfg(test)]
mod tests;
