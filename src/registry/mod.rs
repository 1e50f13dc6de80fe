//! The webhook registry: a native service where super admins and organisation admins register webhooks (API and
//! dashboard), and from which the proxies pull every webhook with its keys (`GET /v2/registry/changes`, a page
//! of changes at a time; `GET /v1/registry`, the whole document, for older proxies).
//!
//! `registry serve` runs it; `registry token` prints an HS256 token for demos and tests; `registry seed` (hidden)
//! writes many webhooks straight into a database, for scale tests.

mod api;
mod auth;
mod delivery_ingest;
mod delivery_log;
mod delivery_upkeep;
mod feed;
mod health;
mod json;
mod keys;
mod rate_limit;
mod refusals;
mod rejections;
mod revisions;
mod seed;
mod sends;
mod store;
mod validate;
mod write_limit;

use crate::config::parse_duration_ms;
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Run the registry: the API, the dashboard at /, the proxies' feeds (/v2/registry/changes, /v1/registry).
    Serve(ServeArgs),
    /// Print an HS256 token (claims sub, role, organisationId, exp), for demos and tests.
    Token(TokenArgs),
    /// Write many webhooks straight into a database, keys sealed as the API seals them (scale tests).
    #[command(hide = true)]
    Seed(seed::SeedArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, env = "REGISTRY_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// sqlite:PATH (created on first start) or postgres://USER@HOST:PORT/DB (for several replicas).
    #[arg(long, env = "REGISTRY_DATABASE", default_value = "sqlite:registry.db")]
    pub database: String,
    /// Environment variable holding the HS256 secret of the users' tokens (at least 32 bytes).
    #[arg(long, env = "REGISTRY_JWT_SECRET_ENV", value_name = "NAME")]
    pub jwt_secret_env: Option<String>,
    /// PEM public key (RSA: RS256, EC P-256: ES256) of the identity provider that signs the users' tokens.
    #[arg(long, env = "REGISTRY_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,
    /// Also require this `aud` claim.
    #[arg(long, env = "REGISTRY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Also require this `iss` claim.
    #[arg(long, env = "REGISTRY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Environment variable holding the proxies' bearer token for the feeds (at least 16 characters).
    #[arg(long, env = "REGISTRY_PROXY_TOKEN_ENV", value_name = "NAME")]
    pub proxy_token_env: String,
    /// The catalogue of event types a webhook may subscribe to.
    #[arg(
        long,
        env = "REGISTRY_EVENT_TYPES",
        value_delimiter = ',',
        default_value = "job.completed,job.failed"
    )]
    pub event_types: Vec<String>,
    #[command(flatten)]
    pub deliveries: Box<delivery_log::DeliveryArgs>,
    #[command(flatten)]
    pub write_limit: write_limit::WriteLimitArgs,
    /// Environment variable holding the main key (base64 of 32 bytes) that encrypts the API keys at rest.
    #[arg(long, env = "REGISTRY_MAIN_KEY_ENV", value_name = "NAME")]
    pub main_key_env: Option<String>,
    /// Store the API keys unencrypted (demos only; anyone with a copy of the database has the keys).
    #[arg(long)]
    pub insecure_plaintext_keys: bool,
    /// With --main-key-env: at start, encrypt every key stored in the clear (by a registry that ran with
    /// --insecure-plaintext-keys); without it such keys are refused.
    #[arg(long)]
    pub seal_plaintext_keys: bool,
    /// Accept http:// webhook URLs (as the filter's delivery.allowInsecureHttp).
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// Accept private, loopback and link-local addresses (as the filter's delivery.allowPrivateNetworks).
    #[arg(long)]
    pub allow_private_networks: bool,
    /// How long the proxies still sign with the previous key after a rotation (at most 24h).
    #[arg(long, default_value = "24h")]
    pub rotation_grace: String,
    /// Largest body of a page of GET /v2/registry/changes, in bytes (at least 4352).
    #[arg(long, env = "REGISTRY_FEED_PAGE_BYTES", default_value_t = 49_152)]
    pub feed_page_bytes: usize,
    /// How long deletions stay in the feed; a proxy further behind lists everything again (at most 24h).
    #[arg(long, env = "REGISTRY_TOMBSTONE_RETENTION", default_value = "24h")]
    pub tombstone_retention: String,
    /// Most webhooks one organisation may have; a create beyond it is refused (422).
    #[arg(
        long,
        env = "REGISTRY_MAX_WEBHOOKS_PER_ORGANISATION",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_webhooks_per_organisation: u32,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Environment variable holding the HS256 secret (the one the registry is started with).
    #[arg(long, value_name = "NAME")]
    pub jwt_secret_env: String,
    /// super_admin, organisation_admin, or any other role (which may do nothing).
    #[arg(long)]
    pub role: String,
    /// The organisationId claim.
    #[arg(long)]
    pub org: String,
    /// The sub claim: who is acting, for the audit table.
    #[arg(long, default_value = "demo")]
    pub sub: String,
    /// Lifetime: 30s, 15m, 1h… (at most 24h).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
}

pub fn run(command: RegistryCommand) -> ExitCode {
    let result = match command {
        RegistryCommand::Serve(args) => serve(args),
        RegistryCommand::Token(args) => token(args),
        RegistryCommand::Seed(args) => seed::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("registry: {message}");
            ExitCode::FAILURE
        }
    }
}

fn env_var(name: &str, flag: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{flag}: environment variable {name} is not set"))
}

fn serve(args: ServeArgs) -> Result<(), String> {
    validate::Policy::check_catalogue(&args.event_types)?;
    let verifier = match (&args.jwt_secret_env, &args.jwt_public_key) {
        (Some(name), None) => auth::Verifier::hs256(env_var(name, "--jwt-secret-env")?.as_bytes())
            .map_err(|e| format!("--jwt-secret-env: {e}"))?,
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("--jwt-public-key {}: {e}", path.display()))?;
            auth::Verifier::from_public_pem(&pem)
                .map_err(|e| format!("--jwt-public-key {}: {e}", path.display()))?
        }
        _ => {
            return Err(
                "give exactly one of --jwt-secret-env NAME and --jwt-public-key FILE".into(),
            )
        }
    }
    .requiring(args.jwt_audience.as_deref(), args.jwt_issuer.as_deref());
    let proxy_token = auth::ProxyToken::new(&env_var(&args.proxy_token_env, "--proxy-token-env")?)
        .map_err(|e| format!("--proxy-token-env: {e}"))?;
    let sealer = match (&args.main_key_env, args.insecure_plaintext_keys) {
        (Some(name), false) => keys::Sealer::from_main_key(&env_var(name, "--main-key-env")?)
            .map_err(|e| format!("--main-key-env: {e}"))?,
        (None, true) => {
            log("WARNING: --insecure-plaintext-keys: API keys are stored unencrypted");
            keys::Sealer::plaintext()
        }
        (Some(_), true) => {
            return Err("give --main-key-env or --insecure-plaintext-keys, not both".into())
        }
        (None, false) => {
            return Err(
                "--main-key-env NAME is required: it encrypts the API keys at rest \
                        (--insecure-plaintext-keys stores them in the clear, for demos only)"
                    .into(),
            )
        }
    };
    if args.seal_plaintext_keys && !sealer.encrypts() {
        return Err("--seal-plaintext-keys needs --main-key-env (the key that seals them)".into());
    }
    let rotation_grace_ms =
        parse_duration_ms(&args.rotation_grace).map_err(|e| format!("--rotation-grace: {e}"))?;
    let tombstone_retention_ms = parse_duration_ms(&args.tombstone_retention)
        .map_err(|e| format!("--tombstone-retention: {e}"))?;
    let changes = feed::ChangesFeed::new(args.feed_page_bytes)?;
    let delivery_settings = args.deliveries.settings()?;
    let write_rate = args.write_limit.rate()?;
    let policy = validate::Policy {
        event_types: args.event_types.clone(),
        allow_insecure_http: args.allow_insecure_http,
        allow_private_networks: args.allow_private_networks,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let mut store = store::Store::open(&args.database).await?;
        store.max_webhooks_per_organisation = i64::from(args.max_webhooks_per_organisation);
        if args.seal_plaintext_keys {
            keys::seal_plaintext_keys(&store, &sealer).await?;
        }
        delivery_log::migrate(&store).await?;
        let mut app = api::App::new(
            store,
            verifier,
            proxy_token,
            sealer,
            policy,
            i64::try_from(rotation_grace_ms).unwrap_or(i64::MAX),
            changes,
        );
        app.deliveries = delivery_settings.clone();
        app.write_limiter = write_limit::WriteLimiter::new(write_rate);
        let app = Arc::new(app);
        let limiter = app.clone();
        tokio::spawn(async move { limiter.write_limiter.sweep_forever().await });
        let pruner = app.clone();
        tokio::spawn(async move {
            let retention = i64::try_from(tombstone_retention_ms).unwrap_or(i64::MAX);
            feed::prune_forever(&pruner.store, retention).await;
        });
        let upkeep = app.clone();
        tokio::spawn(async move {
            delivery_upkeep::upkeep_forever(&upkeep.store, delivery_settings).await;
        });
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("--listen {}: {e}", args.listen))?;
        let address = listener
            .local_addr()
            .map_err(|e| format!("--listen {}: {e}", args.listen))?;
        log(&format!(
            "listening on http://{address} (database {}, keys {})",
            args.database
                .split('?')
                .next()
                .unwrap_or_default()
                .split('@')
                .next_back()
                .unwrap_or_default(),
            if app.sealer.encrypts() {
                "encrypted"
            } else {
                "NOT encrypted"
            }
        ));
        serve_connections(listener, api::router(app.clone())).await;
        app.write_limiter.log_final_reports();
        log("stopped");
        Ok(())
    })
}

/// A client gets this long to send a request's headers (a slow or silent peer does not hold a connection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// How long open connections may finish their requests after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/1.1 on each accepted connection, with a header read timeout; on SIGTERM or Ctrl-C, stops accepting and
/// lets the open requests finish.
async fn serve_connections(listener: tokio::net::TcpListener, router: axum::Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little instead of spinning.
                        log(&format!("accepting a connection failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES);
                let connection = graceful.watch(
                    http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone())),
                );
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {},
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => log("connections still open after the drain time are closed"),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = terminate.recv() => {},
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn token(args: TokenArgs) -> Result<(), String> {
    let secret = env_var(&args.jwt_secret_env, "--jwt-secret-env")?;
    let ttl = parse_duration_ms(&args.ttl).map_err(|e| format!("--ttl: {e}"))? / 1000;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let token = auth::issue_hs256(
        secret.as_bytes(),
        &args.sub,
        &args.role,
        &args.org,
        now + ttl.max(1),
    )
    .map_err(|e| format!("--jwt-secret-env: {e}"))?;
    println!("{token}");
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One log line on stderr: time, then what happened. Never a key.
pub(crate) fn log(message: &str) {
    eprintln!("{} registry: {message}", rfc3339(now_ms()));
}

/// Milliseconds since the epoch as `2025-01-31T12:34:56.789Z` (UTC).
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_767_225_599_999), "2025-12-31T23:59:59.999Z");
    }
}
