//! `webhook-emitter`: the command line for the people who register webhooks and receive them.
//! It uses exactly the filter's own code for validation and signing.
//!
//! Exit status: 0 on success, 1 when the input is invalid (a configuration with errors, a bad
//! signature, an unreadable file), 2 for a usage error (clap's convention).

#[path = "cli/check.rs"]
mod check;

use clap::{Args, Parser, Subcommand};
use std::io::Read;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};
use webhook_emitter::signature::SigningKey;

#[derive(Parser)]
#[command(
    name = "webhook-emitter",
    version,
    about = "The webhook-emitter filter's command line: check configurations, make keys, verify deliveries",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One variant per subcommand; a group of subcommands is one variant holding its own
/// `clap::Subcommand` enum (`#[command(subcommand)] Group(group::GroupCommand)`).
#[derive(Subcommand)]
enum Command {
    Check(check::CheckArgs),
    EnvoyMatcher(EnvoyMatcherArgs),
    Keygen(KeygenArgs),
    Verify(VerifyArgs),
    /// The webhook registry: API, dashboard and the proxies' feed.
    #[command(subcommand)]
    Registry(webhook_emitter::registry::RegistryCommand),
}

fn main() -> ExitCode {
    // Usage errors exit 2, --help and --version exit 0; clap prints them.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Registry(command) => return webhook_emitter::registry::run(command),
        Command::Check(args) => check::run(&args),
        Command::EnvoyMatcher(args) => envoy_matcher(&args),
        Command::Keygen(args) => keygen(&args),
        Command::Verify(args) => verify(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{message}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Print the Envoy gate for a plugin configuration: the predicate of the matcher that lets only
/// requests some rule can match (by method and path) reach the filter
#[derive(Args)]
struct EnvoyMatcherArgs {
    /// The plugin configuration (JSON); `-` reads standard input
    #[arg(value_name = "CONFIG.json")]
    file: String,
    /// Output: the predicate as YAML (to paste into an Envoy configuration) or JSON
    #[arg(long, value_enum, default_value_t = MatcherFormat::Yaml)]
    format: MatcherFormat,
    /// Print the whole `xds_matcher` of the ExtensionWithMatcher with the action named NAME
    /// (an ExecuteFilterAction whose filter is left for you to fill in), not only its predicate
    #[arg(long, value_name = "NAME")]
    with_action: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MatcherFormat {
    Yaml,
    Json,
}

fn envoy_matcher(args: &EnvoyMatcherArgs) -> Result<(), String> {
    let json = read_input(&args.file)?;
    let rules = webhook_emitter::config::Plan::rules_from_json(&json).map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("configuration rejected: {e}"))
            .collect();
        lines.join("\n")
    })?;
    let value = match &args.with_action {
        None => webhook_emitter::gate::predicate(&rules),
        Some(name) => webhook_emitter::gate::xds_matcher(
            &rules,
            serde_json::json!({
                "name": name,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                    "typed_config": {"name": "envoy.filters.http.wasm", "typed_config": {}},
                },
            }),
        ),
    };
    let text = match args.format {
        MatcherFormat::Json => serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?,
        MatcherFormat::Yaml => serde_yaml_ng::to_string(&value).map_err(|e| e.to_string())?,
    };
    println!("{}", text.trim_end());
    Ok(())
}

/// Print a fresh whsec_ API key. Store it now: it is shown only once.
#[derive(Args)]
struct KeygenArgs {
    /// Random bytes in the key
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u8).range(24..=64))]
    bytes: u8,
}

fn keygen(args: &KeygenArgs) -> Result<(), String> {
    let mut secret = vec![0u8; usize::from(args.bytes)];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness from the OS: {e}"))?;
    println!("{}", SigningKey::format_key(&secret));
    Ok(())
}

/// Check a delivery's Standard Webhooks signature; the body is read from a file or standard input.
#[derive(Args)]
#[command(group = clap::ArgGroup::new("secret").required(true).args(["key", "key_env"]))]
struct VerifyArgs {
    /// The webhook's whsec_ key (visible to other local users in the process list: prefer --key-env)
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// The name of an environment variable holding the whsec_ key
    #[arg(long, value_name = "VAR")]
    key_env: Option<String>,
    /// The webhook-id header
    #[arg(long)]
    id: String,
    /// The webhook-timestamp header (Unix seconds)
    #[arg(long, value_name = "SECONDS")]
    timestamp: u64,
    /// The webhook-signature header (one or more space-separated v1,… signatures)
    #[arg(long)]
    signature: String,
    /// How far the timestamp may be from now, in seconds; 0 turns the check off
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    tolerance: u64,
    /// The body as received, byte for byte; `-` is standard input
    #[arg(long, value_name = "FILE", default_value = "-")]
    body: String,
}

fn verify(args: &VerifyArgs) -> Result<(), String> {
    let key = match (&args.key, &args.key_env) {
        (Some(key), _) => key.clone(),
        (None, Some(var)) => {
            std::env::var(var).map_err(|_| format!("--key-env: {var} is not set"))?
        }
        (None, None) => return Err("a key is needed: --key or --key-env".into()),
    };
    let key = SigningKey::parse(key.trim()).map_err(|e| format!("key: {e}"))?;
    let body = read_input(&args.body)?;
    if args.tolerance > 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now.abs_diff(args.timestamp) > args.tolerance {
            return Err(format!(
                "signature INVALID: timestamp {} is more than {} s from now ({now})",
                args.timestamp, args.tolerance
            ));
        }
    }
    if key.verify(&args.id, args.timestamp, &body, &args.signature) {
        println!("signature valid");
        Ok(())
    } else {
        Err("signature INVALID".into())
    }
}

/// A file's bytes, or standard input's for `-`.
pub(crate) fn read_input(path: &str) -> Result<Vec<u8>, String> {
    if path == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading standard input: {e}"))?;
        Ok(bytes)
    } else {
        std::fs::read(path).map_err(|e| format!("{path}: {e}"))
    }
}
