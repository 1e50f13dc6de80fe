//! `webhook-emitter check`: finds the plugin configurations in a file (a plugin JSON, an Istio
//! WasmPlugin, an Envoy configuration) and validates each with the filter's own code, with the
//! environment the filter's VM would see.

use base64::Engine as _;
use clap::{Args, ValueEnum};
use serde::Deserialize as _;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use webhook_emitter::config::Plan;
use webhook_emitter::signature::SigningKey;

const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";
const BYTES_VALUE: &str = "type.googleapis.com/google.protobuf.BytesValue";

/// Validate plugin configurations exactly as the filter does; print every error with its JSON path
#[derive(Args)]
pub struct CheckArgs {
    /// A plugin configuration (JSON, or the same in YAML), an Istio WasmPlugin (YAML:
    /// spec.pluginConfig) or an Envoy configuration (YAML or JSON: every wasm filter whose root_id
    /// or name is the plugin name); `-` reads standard input
    #[arg(value_name = "FILE")]
    file: String,
    /// Output: lines for people, or one JSON object
    /// {"valid", "errors": [{"path", "message", "source"}], "configurations": […]}
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Accept {"env": "VAR"} keys whose variable is not set here (CI without the secrets); a
    /// variable the VM is never given (not in host_env_keys / vmConfig.env) is still an error
    #[arg(long)]
    allow_unset_env: bool,
    /// The plugin's name: the Envoy filter's root_id (or name), the WasmPlugin's pluginName
    #[arg(long, value_name = "NAME", default_value = "webhook_emitter")]
    plugin_name: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// The environment a filter's VM sees.
#[derive(Default)]
struct VmEnv {
    inline: BTreeMap<String, String>,
    /// Variables copied from the host's (here: this process's) environment; `None` is all of them.
    from_host: Option<BTreeSet<String>>,
}

/// One plugin configuration found in the input.
struct Found {
    /// Where it is in the file; `None` when the file is the configuration itself.
    source: Option<String>,
    json: Vec<u8>,
    env: VmEnv,
}

struct Outcome {
    source: Option<String>,
    errors: Vec<(String, String)>,
    rules: usize,
    webhooks: usize,
}

pub fn run(args: &CheckArgs) -> Result<(), String> {
    let label = if args.file == "-" {
        "<stdin>"
    } else {
        &args.file
    };
    let found =
        crate::read_input(&args.file).and_then(|bytes| configurations(&bytes, &args.plugin_name));
    let unset = RefCell::new(BTreeSet::new());
    let not_given = RefCell::new(BTreeSet::new());
    let (outcomes, input_error) = match found {
        Ok(found) => (
            found
                .iter()
                .map(|f| validate(f, args.allow_unset_env, &unset, &not_given))
                .collect(),
            None,
        ),
        Err(message) => (Vec::new(), Some(message)),
    };
    let valid = input_error.is_none() && outcomes.iter().all(|o| o.errors.is_empty());
    match args.format {
        Format::Json => {
            let mut errors: Vec<Value> = input_error
                .iter()
                .map(|m| json!({"path": "", "message": m}))
                .collect();
            for o in &outcomes {
                for (path, message) in &o.errors {
                    errors.push(json!({"path": path, "message": message, "source": o.source}));
                }
            }
            let configurations: Vec<Value> = outcomes
                .iter()
                .map(|o| {
                    json!({"source": o.source, "valid": o.errors.is_empty(),
                           "eventRules": o.rules, "webhooks": o.webhooks})
                })
                .collect();
            let report = json!({"valid": valid, "errors": errors,
                                "configurations": configurations,
                                "unsetEnv": unset.borrow().iter().collect::<Vec<_>>(),
                                "notGivenToVm": not_given.borrow().iter().collect::<Vec<_>>()});
            println!("{report}");
            if valid {
                Ok(())
            } else {
                Err(String::new())
            }
        }
        Format::Text => {
            if let Some(message) = input_error {
                return Err(format!("{label}: {message}"));
            }
            let mut total = 0;
            for o in &outcomes {
                let at = match &o.source {
                    Some(source) => format!("{label}: {source}"),
                    None => label.to_string(),
                };
                if o.errors.is_empty() {
                    println!(
                        "{at}: valid ({} event rules, {} webhooks)",
                        o.rules, o.webhooks
                    );
                }
                for (path, message) in &o.errors {
                    eprintln!("{at}: {path}: {message}");
                }
                total += o.errors.len();
            }
            for name in unset.borrow().iter() {
                println!("{label}: note: {name} is not set here; its key was not checked");
            }
            for name in not_given.borrow().iter() {
                eprintln!(
                    "{label}: note: {name} is not in the VM's environment: list it in \
                     vm_config.environment_variables.host_env_keys (Envoy) or vmConfig.env (Istio)"
                );
            }
            if valid {
                Ok(())
            } else {
                Err(format!("{label}: {total} error(s)"))
            }
        }
    }
}

fn validate(
    found: &Found,
    allow_unset: bool,
    unset: &RefCell<BTreeSet<String>>,
    not_given: &RefCell<BTreeSet<String>>,
) -> Outcome {
    // A well-formed key that stands in for an unset variable; it is never printed.
    let stand_in = SigningKey::format_key(&[0u8; 32]);
    let lookup = |name: &str| -> Option<String> {
        if let Some(value) = found.env.inline.get(name) {
            return Some(value.clone());
        }
        let given = found
            .env
            .from_host
            .as_ref()
            .is_none_or(|h| h.contains(name));
        if !given {
            not_given.borrow_mut().insert(name.to_string());
            return None;
        }
        match std::env::var(name) {
            Ok(value) => Some(value),
            Err(_) if allow_unset => {
                unset.borrow_mut().insert(name.to_string());
                Some(stand_in.clone())
            }
            Err(_) => None,
        }
    };
    let (errors, rules, webhooks) = match Plan::from_json(&found.json, &lookup) {
        Ok(plan) => (Vec::new(), plan.rules.len(), plan.webhooks.len()),
        Err(errors) => (
            errors.into_iter().map(|e| (e.path, e.message)).collect(),
            0,
            0,
        ),
    };
    Outcome {
        source: found.source.clone(),
        errors,
        rules,
        webhooks,
    }
}

/// Every plugin configuration in the input. A JSON object that is neither an Envoy configuration
/// nor a WasmPlugin is the plugin configuration itself, and goes to the validator byte for byte.
fn configurations(bytes: &[u8], plugin_name: &str) -> Result<Vec<Found>, String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let documents: Vec<Value> = if first == Some(&b'{') {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(value) if is_envoy_or_kubernetes(&value) => vec![value],
            // Invalid JSON too: the validator says what is wrong with it, as the filter would.
            _ => {
                return Ok(vec![Found {
                    source: None,
                    json: bytes.to_vec(),
                    env: VmEnv::default(),
                }])
            }
        }
    } else {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
        let mut documents = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(document).map_err(|e| format!("YAML: {e}"))?;
            if !value.is_null() {
                documents.push(value);
            }
        }
        documents
    };
    let several = documents.len() > 1;
    let mut found = Vec::new();
    for (index, document) in documents.iter().enumerate() {
        let at = if several {
            format!("document {}: ", index + 1)
        } else {
            String::new()
        };
        if !is_envoy_or_kubernetes(document) {
            found.push(Found {
                source: several.then(|| format!("document {}", index + 1)),
                json: document.to_string().into_bytes(),
                env: VmEnv::default(),
            });
        } else if document.get("kind").and_then(Value::as_str) == Some("WasmPlugin") {
            found.extend(from_wasm_plugin(document, plugin_name, &at));
        } else if document.get("kind").and_then(Value::as_str) == Some("List") {
            // `kubectl get wasmplugins -o yaml` answers a List of them.
            let items = document.get("items").and_then(Value::as_array);
            for (i, item) in items.into_iter().flatten().enumerate() {
                if item.get("kind").and_then(Value::as_str) == Some("WasmPlugin") {
                    found.extend(from_wasm_plugin(
                        item,
                        plugin_name,
                        &format!("{at}items[{i}]: "),
                    ));
                }
            }
        } else {
            from_envoy(document, plugin_name, &at, "", &mut found)?;
        }
    }
    if found.is_empty() {
        return Err(format!(
            "no {plugin_name} configuration found: expected a plugin configuration (JSON), an Istio \
             WasmPlugin whose pluginName is {plugin_name}, or an Envoy configuration with an \
             envoy.filters.http.wasm filter whose root_id is {plugin_name}"
        ));
    }
    Ok(found)
}

/// An Envoy bootstrap, an xDS resource file or a Kubernetes resource; anything else is taken to
/// be a plugin configuration, for the validator to judge.
fn is_envoy_or_kubernetes(value: &Value) -> bool {
    const TOP_LEVEL: [&str; 7] = [
        "static_resources",
        "dynamic_resources",
        "admin",
        "node",
        "resources",
        "kind",
        "apiVersion",
    ];
    value
        .as_object()
        .is_some_and(|o| TOP_LEVEL.iter().any(|k| o.contains_key(*k)))
}

/// An Istio WasmPlugin: `spec.pluginConfig`, handed to the filter as JSON; `spec.vmConfig.env`
/// entries are given inline (`value`) or copied from the proxy's environment (`valueFrom: HOST`).
fn from_wasm_plugin(document: &Value, plugin_name: &str, at: &str) -> Option<Found> {
    let spec = document.get("spec")?;
    if spec.get("pluginName").and_then(Value::as_str) != Some(plugin_name) {
        return None;
    }
    let metadata = document.get("metadata");
    let name = |field| {
        metadata
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or("?")
    };
    let mut env = VmEnv {
        inline: BTreeMap::new(),
        from_host: Some(BTreeSet::new()),
    };
    for entry in spec
        .pointer("/vmConfig/env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(var) = entry.get("name").and_then(Value::as_str) else {
            continue;
        };
        if entry.get("valueFrom").and_then(Value::as_str) == Some("HOST") {
            env.from_host
                .get_or_insert_with(BTreeSet::new)
                .insert(var.into());
        } else if let Some(value) = entry.get("value").and_then(Value::as_str) {
            env.inline.insert(var.into(), value.into());
        }
    }
    let json = match spec.get("pluginConfig") {
        Some(config) => config.to_string().into_bytes(),
        None => Vec::new(),
    };
    Some(Found {
        source: Some(format!(
            "{at}WasmPlugin {}/{}: spec.pluginConfig",
            name("namespace"),
            name("name")
        )),
        json,
        env,
    })
}

/// Every `envoy.filters.http.wasm` filter for this plugin anywhere in an Envoy configuration
/// (listeners, ECDS resources, per-route configs). Its `config.configuration` is a
/// `google.protobuf.StringValue` (or `BytesValue`) holding the JSON; the VM's environment is
/// `vm_config.environment_variables` (`key_values` inline, `host_env_keys` from Envoy's own).
fn from_envoy(
    value: &Value,
    plugin_name: &str,
    at: &str,
    path: &str,
    found: &mut Vec<Found>,
) -> Result<(), String> {
    match value {
        Value::Object(object) => {
            if object.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE) {
                if let Some(config) = object.get("config").and_then(Value::as_object) {
                    if names(config, plugin_name) {
                        found.push(wasm_filter(config, &format!("{at}{path}.config"))?);
                    }
                }
                return Ok(());
            }
            for (key, child) in object {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                from_envoy(child, plugin_name, at, &child_path, found)?;
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                from_envoy(child, plugin_name, at, &format!("{path}[{i}]"), found)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn names(config: &Map<String, Value>, plugin_name: &str) -> bool {
    ["root_id", "name"]
        .iter()
        .any(|field| config.get(*field).and_then(Value::as_str) == Some(plugin_name))
}

fn wasm_filter(config: &Map<String, Value>, source: &str) -> Result<Found, String> {
    let json = match config.get("configuration") {
        None => Vec::new(),
        Some(any) => {
            let value = any.get("value");
            match any.get("@type").and_then(Value::as_str) {
                Some(STRING_VALUE) => value
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec(),
                Some(BYTES_VALUE) => base64::engine::general_purpose::STANDARD
                    .decode(value.and_then(Value::as_str).unwrap_or_default())
                    .map_err(|e| format!("{source}.configuration.value: not base64 ({e})"))?,
                other => {
                    return Err(format!(
                    "{source}.configuration: \"@type\" is {}; the filter reads JSON text from a \
                         {STRING_VALUE}",
                    other.unwrap_or("missing")
                ))
                }
            }
        }
    };
    let variables = config
        .get("vm_config")
        .and_then(|vm| vm.get("environment_variables"));
    let env = VmEnv {
        inline: variables
            .and_then(|v| v.get("key_values"))
            .and_then(Value::as_object)
            .map(|kv| {
                kv.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default(),
        from_host: Some(
            variables
                .and_then(|v| v.get("host_env_keys"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|k| Some(k.as_str()?.to_string()))
                .collect(),
        ),
    };
    Ok(Found {
        source: Some(format!("{source}.configuration")),
        json,
        env,
    })
}
