//! `registry seed` (hidden): writes many webhooks straight into a registry's database, for scale tests and the
//! load benchmark. Rows are what the API writes (ids and keys from the same generators, keys sealed under the
//! main key and bound to their webhook's id, one revision each, checked by the API's own validator), in batched
//! multi-row inserts with bound values, one transaction.

use super::feed::{entry_bytes_bound, MAX_ENTRY_BYTES};
use super::keys::{new_api_key, new_webhook_id, Sealer};
use super::store::{Store, StoredWebhook};
use super::validate::{read_fields, Policy};
use super::{env_var, now_ms};
use clap::Args;
use std::time::Instant;

/// Values bound per row of the INSERT.
const BINDS_PER_ROW: usize = 11;
/// Rows per INSERT: 11,000 bound values, under SQLite's 32,766 and Postgres's 65,535 a statement.
const ROWS_PER_INSERT: usize = 1000;
const _: () = assert!(ROWS_PER_INSERT * BINDS_PER_ROW <= 32_766);

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// sqlite:PATH or postgres://…, as for `registry serve` (created and migrated when needed).
    #[arg(long)]
    pub database: String,
    /// Environment variable holding the main key the registry runs with.
    #[arg(long, value_name = "NAME")]
    pub main_key_env: Option<String>,
    /// Store the keys in the clear (for a registry run with --insecure-plaintext-keys).
    #[arg(long)]
    pub insecure_plaintext_keys: bool,
    /// How many webhooks to add.
    #[arg(long, default_value_t = 100_000)]
    pub count: usize,
    /// Spread over this many organisations (round robin).
    #[arg(long, default_value_t = 10_000)]
    pub organisations: usize,
    /// Every Nth webhook is maximal: its feed entry as close to the 4 KiB bound as it can be (0: none).
    #[arg(long, default_value_t = 0)]
    pub maximal_every: usize,
    /// Webhook i's URL is this followed by i.
    #[arg(long, default_value = "https://hooks.example.com/seed/")]
    pub url_prefix: String,
    /// The event types each webhook subscribes to.
    #[arg(long, value_delimiter = ',', default_value = "job.completed")]
    pub events: Vec<String>,
    /// Accept an http:// --url-prefix (as `registry serve --allow-insecure-http`).
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// Accept a --url-prefix with a private or loopback address (as `registry serve --allow-private-networks`).
    #[arg(long)]
    pub allow_private_networks: bool,
}

/// The organisation ids of a seed: 24 hex digits, like the product's.
pub fn organisation_id(index: usize) -> String {
    format!("657bf08c2029{index:012x}")
}

pub fn run(args: SeedArgs) -> Result<(), String> {
    let sealer = match (&args.main_key_env, args.insecure_plaintext_keys) {
        (Some(name), false) => Sealer::from_main_key(&env_var(name, "--main-key-env")?)
            .map_err(|e| format!("--main-key-env: {e}"))?,
        (None, true) => Sealer::plaintext(),
        _ => {
            return Err(
                "give exactly one of --main-key-env NAME and --insecure-plaintext-keys".into(),
            )
        }
    };
    if args.organisations == 0 {
        return Err("--organisations must be at least 1".into());
    }
    let started = Instant::now();
    // The last webhook has the longest URL: a description that fits it fits every maximal one.
    let maximal_description = match args.count.checked_sub(1) {
        Some(last) if args.maximal_every > 0 => {
            let mut w = webhook(&args, &sealer, last, "")?;
            w.name = maximal_name(last);
            longest_description(&mut w)
        }
        _ => String::new(),
    };
    let webhooks = (0..args.count)
        .map(|i| webhook(&args, &sealer, i, &maximal_description))
        .collect::<Result<Vec<_>, String>>()?;
    check(&args, &webhooks)?;
    let made = started.elapsed();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let head = runtime.block_on(async {
        let store = Store::open(&args.database).await?;
        insert(&store, &webhooks)
            .await
            .map_err(|e| format!("--database: writing failed: {e}"))
    })?;
    println!(
        "seeded {} webhooks in {} organisations in {:.2} s (made and sealed in {:.2} s); revision {head}",
        args.count,
        args.organisations.min(args.count),
        started.elapsed().as_secs_f64(),
        made.as_secs_f64()
    );
    Ok(())
}

fn webhook(
    args: &SeedArgs,
    sealer: &Sealer,
    i: usize,
    maximal_description: &str,
) -> Result<StoredWebhook, String> {
    let id = new_webhook_id()?;
    let key = new_api_key()?;
    let now = now_ms();
    let maximal = args.maximal_every > 0 && i % args.maximal_every == 0;
    Ok(StoredWebhook {
        key_sealed: sealer.seal(&id, &key)?,
        id,
        organisation_id: organisation_id(i % args.organisations),
        name: if maximal {
            maximal_name(i)
        } else {
            format!("Seed webhook {i}")
        },
        url: format!("{}{i}", args.url_prefix),
        description: if maximal {
            maximal_description.to_string()
        } else {
            String::new()
        },
        status: "enabled".into(),
        events: args.events.clone(),
        previous_key_sealed: None,
        previous_key_expires_ms: None,
        key_rotated_ms: None,
        created_ms: now,
        updated_ms: now,
    })
}

/// Checks the seed's webhooks as the API checks a registration: the first, the last (the longest URL) and the
/// last maximal one stand for all (the others differ from them only in the number after --url-prefix).
fn check(args: &SeedArgs, webhooks: &[StoredWebhook]) -> Result<(), String> {
    Policy::check_catalogue(&args.events).map_err(|e| e.replace("--event-types", "--events"))?;
    let policy = Policy {
        event_types: args.events.clone(),
        allow_insecure_http: args.allow_insecure_http,
        allow_private_networks: args.allow_private_networks,
    };
    let last = webhooks.len().saturating_sub(1);
    let last_maximal = last - last.checked_rem(args.maximal_every).unwrap_or(0);
    for i in [0, last_maximal, last] {
        let Some(w) = webhooks.get(i) else {
            continue;
        };
        let body = serde_json::json!({
            "name": w.name, "url": w.url, "description": w.description, "status": w.status, "events": w.events,
        });
        if let Err(errors) = read_fields(body.to_string().as_bytes(), &policy, true) {
            let named: Vec<String> = errors
                .iter()
                .map(|e| {
                    let flag = match e.path.split('[').next() {
                        Some("url") => "--url-prefix",
                        Some("events") => "--events",
                        _ => "the seed's",
                    };
                    format!("{flag}: webhook {i}'s {}: {}", e.path, e.message)
                })
                .collect();
            return Err(named.join("; "));
        }
    }
    Ok(())
}

/// A name of the most characters allowed (200).
fn maximal_name(i: usize) -> String {
    format!("Seed webhook {i} ")
        .repeat(20)
        .chars()
        .take(200)
        .collect()
}

/// The longest description (three-byte characters) with which the webhook's entry still fits the bound.
fn longest_description(w: &mut StoredWebhook) -> String {
    let (mut low, mut high) = (0usize, 2000usize);
    while low < high {
        let mid = (low + high).div_ceil(2);
        w.description = "€".repeat(mid);
        if entry_bytes_bound(w) <= MAX_ENTRY_BYTES {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    "€".repeat(low)
}

/// Appends the webhooks after the current head, one revision each, in one transaction; returns the new head.
async fn insert(store: &Store, webhooks: &[StoredWebhook]) -> Result<i64, sqlx::Error> {
    use sqlx::Row;
    let mut tx = store.pool().begin().await?;
    let count = i64::try_from(webhooks.len()).unwrap_or(i64::MAX);
    // The first statement takes the write lock (and the counter row), as every API write does.
    let head: i64 = sqlx::query(
        "UPDATE registry_state SET revision = revision + $1 WHERE id = 1 RETURNING revision",
    )
    .bind(count)
    .fetch_one(&mut *tx)
    .await?
    .try_get("revision")?;
    let mut revision = head - count;
    // Values are bound, never written into the statement. Placeholders are numbered ($N) by hand: through
    // `sqlx::Any`, `QueryBuilder` writes `?`, which Postgres refuses.
    for batch in webhooks.chunks(ROWS_PER_INSERT) {
        let sql = insert_statement(batch.len());
        let mut insert = sqlx::query(&sql);
        for w in batch {
            revision += 1;
            let events =
                serde_json::to_string(&w.events).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            insert = insert
                .bind(w.id.clone())
                .bind(w.organisation_id.clone())
                .bind(w.name.clone())
                .bind(w.url.clone())
                .bind(w.description.clone())
                .bind(w.status.clone())
                .bind(events)
                .bind(w.key_sealed.clone())
                .bind(w.created_ms)
                .bind(w.updated_ms)
                .bind(revision);
        }
        insert.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(head)
}

/// `INSERT INTO webhooks … VALUES` with `rows` rows of numbered placeholders (`BINDS_PER_ROW` each).
fn insert_statement(rows: usize) -> String {
    use std::fmt::Write;
    let mut sql = String::from(
        "INSERT INTO webhooks (id, organisation_id, name, url, description, status, events, key_sealed, \
         previous_key_sealed, previous_key_expires_ms, key_rotated_ms, created_ms, updated_ms, revision) VALUES ",
    );
    for row in 0..rows {
        let n = row * BINDS_PER_ROW;
        let p = |i: usize| n + i;
        let _ = write!(
            sql,
            "{}(${},${},${},${},${},${},${},${},NULL,NULL,NULL,${},${},${})",
            if row > 0 { "," } else { "" },
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(7),
            p(8),
            p(9),
            p(10),
            p(11),
        );
    }
    sql
}
