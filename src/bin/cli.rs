//! `webhook-emitter`: the command line for the people who register webhooks and receive them.
//! It uses exactly the filter's own code for validation and signing.

use std::io::Read;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};
use webhook_emitter::config::Plan;
use webhook_emitter::signature::SigningKey;

const USAGE: &str = "usage:
  webhook-emitter check CONFIG.json
      Validate a plugin configuration exactly as the filter does; print every error with its
      JSON path. {\"env\": \"VAR\"} keys are read from this process's environment.
  webhook-emitter keygen [--bytes N]
      Print a fresh whsec_ API key (N random bytes, 24 to 64, default 32). Store it now: it is
      shown only once.
  webhook-emitter verify (--key KEY | --key-env VAR) --id ID --timestamp TS --signature SIG
                         [--tolerance SECONDS] < BODY
      Check a delivery's Standard Webhooks signature. The timestamp must be within the tolerance
      of now (default 300 s; 0 turns the check off).
  webhook-emitter registry serve|token [OPTIONS]
      The webhook registry service and its demo tokens; `webhook-emitter registry --help`.";

/// `webhook-emitter registry …`, parsed by clap.
#[derive(clap::Parser)]
#[command(
    name = "webhook-emitter registry",
    bin_name = "webhook-emitter registry",
    about = "The webhook registry: API, dashboard and the proxies' feed"
)]
struct RegistryCli {
    #[command(subcommand)]
    command: webhook_emitter::registry::RegistryCommand,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("registry") {
        use clap::Parser;
        let cli = RegistryCli::parse_from(std::env::args().skip(1));
        return webhook_emitter::registry::run(cli.command);
    }
    let result = match args.first().map(String::as_str) {
        Some("check") => check(&args[1..]),
        Some("keygen") => keygen(&args[1..]),
        Some("verify") => verify(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown or missing command\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: &[String]) -> Result<(), String> {
    let [path] = args else {
        return Err(format!("check takes one file\n{USAGE}"));
    };
    let json = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    match Plan::from_json(&json, &|name| std::env::var(name).ok()) {
        Ok(plan) => {
            println!(
                "{path}: valid ({} event rules, {} webhooks)",
                plan.rules.len(),
                plan.webhooks.len()
            );
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{path}: {e}");
            }
            Err(format!("{path}: {} error(s)", errors.len()))
        }
    }
}

fn keygen(args: &[String]) -> Result<(), String> {
    let bytes = match args {
        [] => 32,
        [flag, n] if flag == "--bytes" => n
            .parse::<usize>()
            .map_err(|_| format!("--bytes: {n:?} is not a number"))?,
        _ => return Err(format!("keygen takes only --bytes N\n{USAGE}")),
    };
    if !(24..=64).contains(&bytes) {
        return Err("--bytes must be from 24 to 64".into());
    }
    let mut secret = vec![0u8; bytes];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness from the OS: {e}"))?;
    println!("{}", SigningKey::format_key(&secret));
    Ok(())
}

fn verify(args: &[String]) -> Result<(), String> {
    let mut key = None;
    let (mut id, mut timestamp, mut signature, mut tolerance) = (None, None, None, 300u64);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--key" => key = Some(value.clone()),
            "--key-env" => {
                key = Some(
                    std::env::var(value).map_err(|_| format!("--key-env: {value} is not set"))?,
                )
            }
            "--id" => id = Some(value.clone()),
            "--timestamp" => {
                timestamp = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| "--timestamp must be Unix seconds")?,
                )
            }
            "--signature" => signature = Some(value.clone()),
            "--tolerance" => {
                tolerance = value.parse().map_err(|_| "--tolerance must be seconds")?
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    let (Some(key), Some(id), Some(timestamp), Some(signature)) = (key, id, timestamp, signature)
    else {
        return Err(format!(
            "verify needs a key, --id, --timestamp and --signature\n{USAGE}"
        ));
    };
    let key = SigningKey::parse(key.trim()).map_err(|e| format!("key: {e}"))?;
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the body from stdin: {e}"))?;
    if tolerance > 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now.abs_diff(timestamp) > tolerance {
            return Err(format!("signature INVALID: timestamp {timestamp} is more than {tolerance} s from now ({now})"));
        }
    }
    if key.verify(&id, timestamp, &body, &signature) {
        println!("signature valid");
        Ok(())
    } else {
        Err("signature INVALID".into())
    }
}
