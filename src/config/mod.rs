//! The plugin configuration: JSON read by hand and compiled into an immutable [`Plan`]. Every
//! error names the JSON path of its field, unknown fields are errors, and all errors are reported
//! at once. The reader walks a `serde_json::Value` rather than deriving serde models: that gives
//! the exact paths and keeps the `.wasm` small.
//!
//! - `reader`: reads one JSON object field by field, with paths;
//! - `raw`: reads the whole configuration into raw structs, filling in `defaults`;
//! - `compile`: checks what the values mean and builds the [`Plan`];
//! - `errors`: [`ConfigError`], key redaction, and the sink that collects errors.

use crate::delivery::OutboxSettings;
use crate::journal::JournalSettings;
use crate::rules::EventRule;
use crate::signature::SigningKey;
use crate::url::WebhookUrl;
use errors::Errors;
use serde_json::Value;
use std::collections::HashMap;
use std::rc::Rc;

mod compile;
mod defaults;
mod errors;
mod raw;
mod reader;
mod registry;

pub use compile::parse_duration_ms;
// For the registry service (native only), which validates webhooks with the filter's own rules.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use compile::{is_event_type, is_webhook_id};
pub use errors::ConfigError;

/// A registered webhook, as the filter uses it.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    pub organisation_id: String,
    pub url: WebhookUrl,
    pub enabled: bool,
    pub events: Vec<String>,
    pub key: SigningKey,
    /// The key before the last rotation, still used to sign until it expires, so that a receiver
    /// can switch keys without losing a delivery (registry webhooks only).
    /// Boxed: most webhooks have none, and a key is a few hundred bytes of HMAC state.
    pub previous_key: Option<Box<PreviousKey>>,
    /// The Envoy cluster that carries this webhook's deliveries.
    pub cluster: String,
}

#[derive(Debug, Clone)]
pub struct PreviousKey {
    pub key: SigningKey,
    /// Unix milliseconds after which it no longer signs.
    pub expires_at_ms: u64,
}

impl Webhook {
    /// The keys that sign a delivery at `now_ms`: the current one, and the previous one during
    /// its grace period.
    pub fn signing_keys(&self, now_ms: u64) -> impl Iterator<Item = &SigningKey> {
        std::iter::once(&self.key).chain(
            self.previous_key
                .as_ref()
                .filter(|p| now_ms < p.expires_at_ms)
                .map(|p| &p.key),
        )
    }
}

/// `registry`: where this proxy pulls registered webhooks from.
#[derive(Clone)]
pub struct RegistrySettings {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    /// The proxy token (a secret: never printed, see the Debug impl).
    pub token: String,
    pub poll_ms: u64,
    /// Delivery reports to the registry, and claiming its queued sends.
    pub reports: bool,
    pub report_flush_ms: u64,
    pub max_report_bytes: usize,
    /// Registry webhooks taken at most; those beyond are refused.
    pub max_webhooks: usize,
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySettings")
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("token", &"<redacted>")
            .field("poll_ms", &self.poll_ms)
            .field("reports", &self.reports)
            .field("report_flush_ms", &self.report_flush_ms)
            .field("max_report_bytes", &self.max_report_bytes)
            .field("max_webhooks", &self.max_webhooks)
            .finish()
    }
}

/// What registry webhooks are checked against: the configuration's delivery settings and the
/// event types its rules emit.
#[derive(Debug, Clone)]
struct WebhookRules {
    delivery: raw::RawDelivery,
    emitted: std::collections::HashSet<String>,
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
    /// The write-ahead journal in etcd, when configured.
    pub journal: Option<JournalSettings>,
}

/// The validated, immutable configuration, shared by the root and HTTP contexts of a worker.
#[derive(Debug)]
pub struct Plan {
    pub rules: Vec<EventRule>,
    /// The configuration's own webhooks (the registry's are kept beside the plan, by the worker:
    /// src/registry_sync.rs). Their lanes come first, then the registry's.
    pub webhooks: Vec<Rc<Webhook>>,
    pub delivery: DeliverySettings,
    pub registry: Option<RegistrySettings>,
    webhook_rules: WebhookRules,
    /// Event type → organisation → indexes of the enabled webhooks subscribed to it.
    subscribers: HashMap<String, HashMap<String, Vec<usize>>>,
    /// Every webhook's id (as bytes) and its index, sorted by id.
    by_id: Vec<(WebhookId, u32)>,
}

/// A webhook's id as bytes: 24 lowercase hex digits are 12 bytes.
pub type WebhookId = [u8; 12];

/// The 12 bytes of a webhook id, or None when `id` is not 24 lowercase hex digits.
pub fn webhook_id_bytes(id: &str) -> Option<WebhookId> {
    let hex = id.as_bytes();
    if hex.len() != 24 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 12];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// The sorted id index of `webhooks`.
fn index_ids(webhooks: &[Rc<Webhook>]) -> Vec<(WebhookId, u32)> {
    let mut by_id: Vec<(WebhookId, u32)> = webhooks
        .iter()
        .enumerate()
        .filter_map(|(i, w)| Some((webhook_id_bytes(&w.id)?, u32::try_from(i).ok()?)))
        .collect();
    by_id.sort_unstable();
    by_id
}

/// The configuration's JSON read into raw structs: Err for JSON that does not parse, None when
/// the shape has errors (they are in `errors`).
fn read_raw(json: &[u8], errors: &mut Errors) -> Result<Option<raw::RawConfig>, Vec<ConfigError>> {
    let value: Value = serde_json::from_slice(json).map_err(|e| {
        vec![ConfigError::new(
            "configuration",
            format!("invalid JSON ({e})"),
        )]
    })?;
    Ok(raw::read_config(&value, errors).filter(|_| errors.is_empty()))
}

impl Plan {
    /// Parses and validates the plugin configuration. `env` reads the VM's environment variables.
    pub fn from_json(
        json: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Plan, Vec<ConfigError>> {
        let mut errors = Errors::default();
        let plan =
            read_raw(json, &mut errors)?.and_then(|raw| compile::compile(raw, env, &mut errors));
        match plan {
            Some(plan) if errors.is_empty() => Ok(plan),
            _ => Err(errors.into_vec()),
        }
    }

    /// Only the event rules of a plugin configuration (what the Envoy-side gate is built from):
    /// the rest is read for its shape but not compiled, so keys need not be at hand.
    pub fn rules_from_json(json: &[u8]) -> Result<Vec<EventRule>, Vec<ConfigError>> {
        let mut errors = Errors::default();
        let rules = read_raw(json, &mut errors)?
            .map(|raw| compile::compile_rules(&raw, &mut errors))
            .unwrap_or_default();
        if errors.is_empty() {
            Ok(rules)
        } else {
            Err(errors.into_vec())
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
        let key = webhook_id_bytes(id)?;
        let at = self.by_id.binary_search_by(|(k, _)| k.cmp(&key)).ok()?;
        self.by_id.get(at).map(|&(_, i)| i as usize)
    }
}

#[cfg(test)]
mod tests;
