//! The registry's database: SQLite (a file, the default) or Postgres (several replicas), through sqlx's `Any`
//! driver so both run the same statements. Every change bumps the single `revision` and writes an audit row in the
//! same transaction; the first statement of each change takes the write lock, so SQLite never has to upgrade a
//! read lock.

use super::revisions;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::path::PathBuf;
use std::time::Duration;

/// How long a request waits for a database connection before it is answered 503 (a database that is down must
/// not hold requests).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a statement may run, or wait for a lock, in milliseconds (Postgres `statement_timeout`, SQLite
/// `busy_timeout`).
const STATEMENT_TIMEOUT_MS: u32 = 1500;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS registry_state (id INTEGER PRIMARY KEY, revision BIGINT NOT NULL)",
    "INSERT INTO registry_state (id, revision) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS webhooks (
        id TEXT PRIMARY KEY,
        organisation_id TEXT NOT NULL,
        name TEXT NOT NULL,
        url TEXT NOT NULL,
        description TEXT NOT NULL,
        status TEXT NOT NULL,
        events TEXT NOT NULL,
        key_sealed TEXT NOT NULL,
        previous_key_sealed TEXT,
        previous_key_expires_ms BIGINT,
        key_rotated_ms BIGINT,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        revision BIGINT NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS webhooks_by_organisation ON webhooks (organisation_id, created_ms)",
    "CREATE TABLE IF NOT EXISTS audit (
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        organisation_id TEXT NOT NULL,
        action TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        detail TEXT NOT NULL)",
];

pub(super) const COLUMNS: &str =
    "id, organisation_id, name, url, description, status, events, key_sealed, \
    previous_key_sealed, previous_key_expires_ms, key_rotated_ms, created_ms, updated_ms";

/// A stored webhook; keys stay sealed here.
#[derive(Debug, Clone)]
pub struct StoredWebhook {
    pub id: String,
    pub organisation_id: String,
    pub name: String,
    pub url: String,
    pub description: String,
    pub status: String,
    pub events: Vec<String>,
    pub key_sealed: String,
    pub previous_key_sealed: Option<String>,
    pub previous_key_expires_ms: Option<i64>,
    pub key_rotated_ms: Option<i64>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Who changed what, for the audit table. Never a key.
pub struct Audit<'a> {
    pub at_ms: i64,
    pub actor: &'a str,
    pub role: &'a str,
    pub action: &'a str,
    pub detail: String,
}

pub struct Store {
    pool: AnyPool,
    postgres: bool,
    /// A create beyond this many webhooks in one organisation writes nothing.
    pub max_webhooks_per_organisation: i64,
    /// The SQLite file as it was opened, to notice it being deleted or replaced while the registry runs.
    sqlite_file: Option<SqliteFile>,
}

type Result<T> = std::result::Result<T, sqlx::Error>;

pub(super) fn row_to_webhook(row: &AnyRow) -> Result<StoredWebhook> {
    let events: String = row.try_get("events")?;
    Ok(StoredWebhook {
        id: row.try_get("id")?,
        organisation_id: row.try_get("organisation_id")?,
        name: row.try_get("name")?,
        url: row.try_get("url")?,
        description: row.try_get("description")?,
        status: row.try_get("status")?,
        events: serde_json::from_str(&events).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        key_sealed: row.try_get("key_sealed")?,
        previous_key_sealed: row.try_get("previous_key_sealed")?,
        previous_key_expires_ms: row.try_get("previous_key_expires_ms")?,
        key_rotated_ms: row.try_get("key_rotated_ms")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
    })
}

/// `sqlite:PATH` gains `mode=rwc`, so the file is created on first start.
pub fn connect_url(database: &str) -> std::result::Result<String, String> {
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        Ok(database.to_string())
    } else if let Some(path) = database.strip_prefix("sqlite:") {
        if path.is_empty() || path.contains(":memory:") || path.contains("mode=memory") {
            return Err(format!(
                "--database {database:?}: give a file (sqlite:PATH); an in-memory database is lost on exit"
            ));
        }
        Ok(if path.contains('?') {
            database.to_string()
        } else {
            format!("{database}?mode=rwc")
        })
    } else {
        Err(format!(
            "--database {:?} must be sqlite:PATH or postgres://…",
            database.split(':').next().unwrap_or_default()
        ))
    }
}

impl Store {
    pub async fn open(database: &str) -> std::result::Result<Store, String> {
        sqlx::any::install_default_drivers();
        let url = connect_url(database)?;
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    let bound = if sqlite {
                        format!("PRAGMA busy_timeout = {STATEMENT_TIMEOUT_MS}")
                    } else {
                        format!("SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
                    };
                    sqlx::query(&bound).execute(&mut *connection).await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| format!("--database: cannot open the database: {e}"))?;
        if sqlite {
            // Readers (the proxies' polls) go on while a change is written.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await
                .map_err(|e| format!("--database: {e}"))?;
        }
        let mut store = Store {
            pool,
            postgres: !sqlite,
            max_webhooks_per_organisation: i64::MAX,
            sqlite_file: None,
        };
        store
            .migrate()
            .await
            .map_err(|e| format!("--database: creating the tables failed: {e}"))?;
        if sqlite {
            store.sqlite_file = Some(SqliteFile::opened(&url)?);
        }
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if self.postgres {
            // Replicas starting together would race on CREATE TABLE IF NOT EXISTS: one migrates at a time.
            sqlx::query("SELECT pg_advisory_xact_lock(7215860413)")
                .execute(&mut *tx)
                .await?;
            // Waiting for another replica's migration, or migrating a large table, may take longer than a request.
            sqlx::query("SET LOCAL statement_timeout = 0")
                .execute(&mut *tx)
                .await?;
        }
        for statement in SCHEMA {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        revisions::migrate(&mut tx, self.postgres).await?;
        tx.commit().await
    }

    pub(super) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(super) fn is_postgres(&self) -> bool {
        self.postgres
    }

    pub async fn revision(&self) -> Result<i64> {
        sqlx::query("SELECT revision FROM registry_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await?
            .try_get("revision")
    }

    pub async fn list(&self, organisation: &str) -> Result<Vec<StoredWebhook>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM webhooks WHERE organisation_id = $1 ORDER BY created_ms, id"
        );
        sqlx::query(&sql)
            .bind(organisation)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(row_to_webhook)
            .collect()
    }

    pub async fn get(&self, organisation: &str, id: &str) -> Result<Option<StoredWebhook>> {
        let sql = format!("SELECT {COLUMNS} FROM webhooks WHERE organisation_id = $1 AND id = $2");
        sqlx::query(&sql)
            .bind(organisation)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(row_to_webhook)
            .transpose()
    }

    /// Every webhook and the revision they are at, read in one transaction.
    pub async fn snapshot(&self) -> Result<(i64, Vec<StoredWebhook>)> {
        let mut tx = self.pool.begin().await?;
        let revision: i64 = sqlx::query("SELECT revision FROM registry_state WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get("revision")?;
        let sql =
            format!("SELECT {COLUMNS} FROM webhooks ORDER BY organisation_id, created_ms, id");
        let rows = sqlx::query(&sql).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok((
            revision,
            rows.iter().map(row_to_webhook).collect::<Result<_>>()?,
        ))
    }

    /// Writes a new webhook (`replacing` None), or replaces one whose sealed key is still `replacing` (so an edit
    /// never writes back a key that a concurrent rotation replaced); bumps the revision, stamps it on the row and
    /// audits. Returns false when nothing was written: the webhook is gone or changed meanwhile, or (a new one)
    /// its organisation already has `max_webhooks_per_organisation`.
    pub async fn put(
        &self,
        webhook: &StoredWebhook,
        replacing: Option<&str>,
        audit: Audit<'_>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let revision = revisions::next_revision(&mut tx).await?;
        if replacing.is_none()
            && revisions::count_in_organisation(&mut tx, &webhook.organisation_id).await?
                >= self.max_webhooks_per_organisation
        {
            tx.rollback().await?;
            return Ok(false);
        }
        let events =
            serde_json::to_string(&webhook.events).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let written = if let Some(old_key) = replacing {
            sqlx::query(
                "UPDATE webhooks SET name = $1, url = $2, description = $3, status = $4, events = $5, \
                 key_sealed = $6, previous_key_sealed = $7, previous_key_expires_ms = $8, key_rotated_ms = $9, \
                 updated_ms = $10, revision = $14 WHERE id = $11 AND organisation_id = $12 AND key_sealed = $13",
            )
            .bind(&webhook.name)
            .bind(&webhook.url)
            .bind(&webhook.description)
            .bind(&webhook.status)
            .bind(&events)
            .bind(&webhook.key_sealed)
            .bind(&webhook.previous_key_sealed)
            .bind(webhook.previous_key_expires_ms)
            .bind(webhook.key_rotated_ms)
            .bind(webhook.updated_ms)
            .bind(&webhook.id)
            .bind(&webhook.organisation_id)
            .bind(old_key)
            .bind(revision)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            sqlx::query(&format!(
                "INSERT INTO webhooks ({COLUMNS}, revision) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
            ))
            .bind(&webhook.id)
            .bind(&webhook.organisation_id)
            .bind(&webhook.name)
            .bind(&webhook.url)
            .bind(&webhook.description)
            .bind(&webhook.status)
            .bind(&events)
            .bind(&webhook.key_sealed)
            .bind(&webhook.previous_key_sealed)
            .bind(webhook.previous_key_expires_ms)
            .bind(webhook.key_rotated_ms)
            .bind(webhook.created_ms)
            .bind(webhook.updated_ms)
            .bind(revision)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        };
        if written != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_audit(&mut tx, &webhook.organisation_id, &webhook.id, &audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn delete(&self, organisation: &str, id: &str, audit: Audit<'_>) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let revision = revisions::next_revision(&mut tx).await?;
        let deleted = sqlx::query("DELETE FROM webhooks WHERE organisation_id = $1 AND id = $2")
            .bind(organisation)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        revisions::insert_tombstone(&mut tx, revision, organisation, id, audit.at_ms).await?;
        insert_audit(&mut tx, organisation, id, &audit).await?;
        tx.commit().await?;
        Ok(true)
    }
}

pub(super) async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    organisation: &str,
    id: &str,
    audit: &Audit<'_>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit (at_ms, actor, role, organisation_id, action, webhook_id, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(audit.at_ms)
    .bind(audit.actor)
    .bind(audit.role)
    .bind(organisation)
    .bind(audit.action)
    .bind(id)
    .bind(&audit.detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The identity of the SQLite file the registry opened. A file deleted while the registry runs stays readable and
/// writable through the connections already open, so every write would vanish with the last of them: the health
/// check and every request compare the path's file with this one first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SqliteFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl SqliteFile {
    fn opened(url: &str) -> std::result::Result<SqliteFile, String> {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        let path = path.strip_prefix("//").unwrap_or(path);
        let path = PathBuf::from(path.split('?').next().unwrap_or(path));
        let identity = file_identity(&path)
            .map_err(|e| format!("--database: the file {}: {e}", path.display()))?;
        Ok(SqliteFile { path, identity })
    }

    fn check(&self) -> Result<()> {
        match file_identity(&self.path) {
            Ok(identity) if identity == self.identity => Ok(()),
            _ => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "the database file {} was deleted or replaced while the registry ran (restart it on the \
                     right file)",
                    self.path.display()
                ),
            ))),
        }
    }
}

#[cfg(unix)]
fn file_identity(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_identity(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|meta| (meta.len().min(1), 0))
}

impl Store {
    /// The SQLite file is still the one opened (always true on Postgres).
    pub fn check_file(&self) -> Result<()> {
        self.sqlite_file.as_ref().map_or(Ok(()), SqliteFile::check)
    }

    /// An audit row alone, for a refused write: nothing changed, so the revision stays.
    pub async fn audit_only(&self, organisation: &str, id: &str, audit: Audit<'_>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_audit(&mut tx, organisation, id, &audit).await?;
        tx.commit().await
    }

    /// The webhooks (organisation, id) with a key stored in the clear, current or previous.
    pub async fn with_plaintext_keys(&self) -> Result<Vec<(String, String)>> {
        sqlx::query(
            "SELECT organisation_id, id FROM webhooks \
             WHERE key_sealed LIKE 'plain:%' OR previous_key_sealed LIKE 'plain:%'",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("organisation_id")?, row.try_get("id")?)))
        .collect()
    }

    /// The database answers a query on the registry's own table (for the health check).
    pub async fn check(&self) -> Result<()> {
        self.check_file()?;
        self.revision().await.map(|_| ())
    }
}

/// Whether an error means the database is not there (down, unreachable, too slow, its file gone) rather than a
/// fault of the request or of the registry: the answer is then 503, and the client may retry.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // SQLite (extended result codes): BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
                let primary = code.parse::<u32>().unwrap_or(0) & 0xff;
                [5, 6, 8, 10, 13, 14].contains(&primary)
            } else {
                // Postgres SQLSTATE: connection exceptions, insufficient resources, operator intervention
                // (shutdown, a cancelled statement), lock not available.
                code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code == "55P03"
            }
        }
        _ => false,
    }
}
