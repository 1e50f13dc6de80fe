//! The database side of the revisioned feed (docs/registry-feed.md): every webhook row carries the revision of its
//! latest write, a deletion leaves a tombstone, and tombstones past the retention are pruned up to the compaction
//! point. Plain functions over a pool or a transaction, so the store and the feed both use them.

use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Row, Transaction};

type Result<T> = std::result::Result<T, sqlx::Error>;

/// Tables of a fresh database or one from before revisions; `migrate` adds the column to existing webhooks.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS webhook_tombstones (
        revision BIGINT PRIMARY KEY,
        id TEXT NOT NULL,
        organisation_id TEXT NOT NULL,
        deleted_ms BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS webhook_tombstones_by_time ON webhook_tombstones (deleted_ms)",
    "CREATE TABLE IF NOT EXISTS feed_compaction (id INTEGER PRIMARY KEY, revision BIGINT NOT NULL)",
    "INSERT INTO feed_compaction (id, revision) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
];

/// Brings the webhooks table to revisions: adds the column when a database from before them lacks it, and gives
/// every row without a revision its own, in creation order, after the current head (which moves past them).
pub async fn migrate(tx: &mut Transaction<'_, Any>, postgres: bool) -> Result<()> {
    let has_column = if postgres {
        "SELECT COUNT(*) AS n FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = 'webhooks' AND column_name = 'revision'"
    } else {
        "SELECT COUNT(*) AS n FROM pragma_table_info('webhooks') WHERE name = 'revision'"
    };
    let n: i64 = sqlx::query(has_column)
        .fetch_one(&mut **tx)
        .await?
        .try_get("n")?;
    if n == 0 {
        sqlx::query("ALTER TABLE webhooks ADD COLUMN revision BIGINT NOT NULL DEFAULT 0")
            .execute(&mut **tx)
            .await?;
    }
    for statement in SCHEMA {
        sqlx::query(statement).execute(&mut **tx).await?;
    }
    let unstamped: i64 = sqlx::query("SELECT COUNT(*) AS n FROM webhooks WHERE revision = 0")
        .fetch_one(&mut **tx)
        .await?
        .try_get("n")?;
    if unstamped > 0 {
        sqlx::query(
            "UPDATE webhooks SET revision = numbered.n + (SELECT revision FROM registry_state WHERE id = 1) \
             FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY created_ms, id) AS n FROM webhooks WHERE revision = 0) \
             AS numbered WHERE webhooks.id = numbered.id",
        )
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE registry_state SET revision = revision + $1 WHERE id = 1")
            .bind(unstamped)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("CREATE INDEX IF NOT EXISTS webhooks_by_revision ON webhooks (revision)")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Bumps the global revision and returns it. The first statement of every write: it locks the counter row until
/// the transaction ends, so revisions commit in order.
pub async fn next_revision(tx: &mut Transaction<'_, Any>) -> Result<i64> {
    sqlx::query("UPDATE registry_state SET revision = revision + 1 WHERE id = 1 RETURNING revision")
        .fetch_one(&mut **tx)
        .await?
        .try_get("revision")
}

pub async fn insert_tombstone(
    tx: &mut Transaction<'_, Any>,
    revision: i64,
    organisation: &str,
    id: &str,
    at_ms: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO webhook_tombstones (revision, id, organisation_id, deleted_ms) VALUES ($1, $2, $3, $4)",
    )
    .bind(revision)
    .bind(id)
    .bind(organisation)
    .bind(at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How many webhooks an organisation has, counted inside the write's transaction (after `next_revision` took
/// the lock), so concurrent creates cannot both pass a quota.
pub async fn count_in_organisation(
    tx: &mut Transaction<'_, Any>,
    organisation: &str,
) -> Result<i64> {
    sqlx::query("SELECT COUNT(*) AS n FROM webhooks WHERE organisation_id = $1")
        .bind(organisation)
        .fetch_one(&mut **tx)
        .await?
        .try_get("n")
}

/// The highest revision whose tombstone was pruned: cursors below it cannot be served.
pub async fn compaction_point(pool: &AnyPool) -> Result<i64> {
    sqlx::query("SELECT revision FROM feed_compaction WHERE id = 1")
        .fetch_one(pool)
        .await?
        .try_get("revision")
}

/// Prunes the tombstones deleted before `before_ms`, and every older one, moving the compaction point up (never
/// down, whatever another replica's clock says). Returns how many were pruned.
pub async fn prune_tombstones(pool: &AnyPool, before_ms: i64) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let moved = sqlx::query(
        "UPDATE feed_compaction SET revision = CASE WHEN pruned.top > revision THEN pruned.top ELSE revision END \
         FROM (SELECT MAX(revision) AS top FROM webhook_tombstones WHERE deleted_ms < $1) AS pruned \
         WHERE feed_compaction.id = 1 AND pruned.top IS NOT NULL",
    )
    .bind(before_ms)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved == 0 {
        tx.rollback().await?;
        return Ok(0);
    }
    let pruned = sqlx::query(
        "DELETE FROM webhook_tombstones WHERE revision <= (SELECT revision FROM feed_compaction WHERE id = 1)",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(pruned)
}

/// One webhook's row as the feed reads it (keys still sealed), with its revision. `W` is the store's webhook: the
/// store reads it (its columns and its row reader), this module only its revision.
#[derive(Debug, Clone)]
pub struct LiveRow<W> {
    pub revision: i64,
    pub webhook: W,
}

#[derive(Debug, Clone)]
pub enum Change<W> {
    Live(LiveRow<W>),
    Deleted {
        revision: i64,
        id: String,
        organisation_id: String,
    },
}

impl<W> Change<W> {
    pub fn revision(&self) -> i64 {
        match self {
            Change::Live(row) => row.revision,
            Change::Deleted { revision, .. } => *revision,
        }
    }
}

/// The first `limit` changes with a revision in `(after, up_to]`, in revision order: live webhooks, and with
/// `tombstones` the deletions too. Both reads use the revision indexes, so a page costs its own size only.
pub async fn changes<W>(
    pool: &AnyPool,
    after: i64,
    up_to: i64,
    limit: i64,
    tombstones: bool,
    columns: &str,
    read: fn(&AnyRow) -> Result<W>,
) -> Result<Vec<Change<W>>> {
    let sql = format!(
        "SELECT revision, {columns} FROM webhooks WHERE revision > $1 AND revision <= $2 \
         ORDER BY revision LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    let mut out = rows
        .iter()
        .map(|row| {
            Ok(Change::Live(LiveRow {
                revision: row.try_get("revision")?,
                webhook: read(row)?,
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    if tombstones {
        let rows = sqlx::query(
            "SELECT revision, id, organisation_id FROM webhook_tombstones \
             WHERE revision > $1 AND revision <= $2 ORDER BY revision LIMIT $3",
        )
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .fetch_all(pool)
        .await?;
        for row in &rows {
            out.push(Change::Deleted {
                revision: row.try_get("revision")?,
                id: row.try_get("id")?,
                organisation_id: row.try_get("organisation_id")?,
            });
        }
        // Each list held its first `limit`; the first `limit` of both together are among them.
        out.sort_by_key(Change::revision);
        out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    Ok(out)
}
