//! The proxies' feed, version 2 (`GET /v2/registry/changes?since=N`, docs/registry-feed.md): the changes after a
//! cursor, in revision order, in pages bounded in bytes. A poll that finds nothing new costs one read of the head
//! revision; pages are built from the revision index, so their cost is their own size, never the registry's; and
//! concurrent identical polls share one page per `(since, head)`, built once.

use super::keys::Sealer;
use super::log;
use super::revisions::{self, Change, LiveRow};
use super::store::{self, Store, StoredWebhook};
use crate::signature::SigningKey;
use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

/// One webhook's entry on the wire, both keys present, is at most this many bytes.
pub const MAX_ENTRY_BYTES: usize = 4096;
/// `--feed-page-bytes` bounds: a page must hold the largest entry with its envelope.
pub const MIN_PAGE_BYTES: usize = MAX_ENTRY_BYTES + 256;
pub const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// The envelope around the entries at its largest: `{"revision":H,"next":N,"more":false,"changes":[` … `]}`,
/// with 19-digit revisions.
const ENVELOPE_BYTES: usize = 90;
/// The database must answer a poll within this time, or the poll gets 503.
const DATABASE_DEADLINE: Duration = Duration::from_secs(2);
/// Pages kept for the current head: at most this many bytes of them (at most 256 pages); beyond, the cache starts
/// over.
const MAX_CACHED_BYTES: usize = 32 * 1024 * 1024;

/// The fields of an entry, borrowed from a stored webhook or a feed row.
struct Entry<'a> {
    revision: i64,
    id: &'a str,
    organisation_id: &'a str,
    name: &'a str,
    url: &'a str,
    description: &'a str,
    status: &'a str,
    events: &'a [String],
}

impl Entry<'_> {
    fn to_json(&self, keys: &[String], previous_key_expires_ms: Option<i64>) -> String {
        let mut entry = json!({
            "revision": self.revision,
            "id": self.id,
            "organisationId": self.organisation_id,
            "name": self.name,
            "url": self.url,
            "description": self.description,
            "status": self.status,
            "events": self.events,
            "apiKeys": keys,
        });
        if let Some(expires) = previous_key_expires_ms.filter(|_| keys.len() > 1) {
            entry["previousKeyExpiresAt"] = json!(expires / 1000);
        }
        entry.to_string()
    }
}

/// The largest the webhook's entry can be on the wire: its fields as they are, the largest revision, the longer
/// status, two keys and an expiry (a disable or a rotation must not push it past the bound).
pub fn entry_bytes_bound(w: &StoredWebhook) -> usize {
    let key = SigningKey::format_key(&[0u8; 32]);
    Entry {
        revision: i64::MAX,
        id: &w.id,
        organisation_id: &w.organisation_id,
        name: &w.name,
        url: &w.url,
        description: &w.description,
        status: "disabled",
        events: &w.events,
    }
    .to_json(&[key.clone(), key], Some(9_999_999_999_999))
    .len()
}

/// Refuses a webhook whose entry could exceed `MAX_ENTRY_BYTES`, naming the limit. A change to a webhook stored
/// before the bound (`was`) is refused only when it makes the entry larger, so it can still be disabled.
pub fn check_entry_size(w: &StoredWebhook, was: Option<&StoredWebhook>) -> Result<(), String> {
    let bytes = entry_bytes_bound(w);
    if bytes > MAX_ENTRY_BYTES && was.is_none_or(|old| bytes > entry_bytes_bound(old)) {
        Err(format!(
            "the webhook's entry in the proxies' feed would take {bytes} bytes, more than the limit of \
             {MAX_ENTRY_BYTES} bytes: shorten the description, name or url (characters outside ASCII and \
             escaped ones take more than one byte)"
        ))
    } else {
        Ok(())
    }
}

/// A live webhook's entry with its key(s), or None when its key does not open (logged; one unreadable key must
/// not take the other webhooks off the proxies).
fn live_entry(row: &LiveRow<StoredWebhook>, sealer: &Sealer, now_ms: i64) -> Option<String> {
    let w = &row.webhook;
    let current = match sealer.open(&w.id, &w.key_sealed) {
        Ok(key) => key,
        Err(e) => {
            log(&format!("registry changes: skipped: {e}"));
            return None;
        }
    };
    let mut keys = vec![current];
    let mut expires_ms = None;
    if let (Some(previous), Some(expires)) = (&w.previous_key_sealed, w.previous_key_expires_ms) {
        if now_ms < expires {
            match sealer.open(&w.id, previous) {
                Ok(key) => {
                    keys.push(key);
                    expires_ms = Some(expires);
                }
                Err(e) => log(&format!("registry changes: previous key left out: {e}")),
            }
        }
    }
    Some(
        Entry {
            revision: row.revision,
            id: &w.id,
            organisation_id: &w.organisation_id,
            name: &w.name,
            url: &w.url,
            description: &w.description,
            status: &w.status,
            events: &w.events,
        }
        .to_json(&keys, expires_ms),
    )
}

fn deleted_entry(revision: i64, id: &str, organisation_id: &str) -> String {
    json!({"revision": revision, "id": id, "organisationId": organisation_id, "deleted": true})
        .to_string()
}

/// A built answer to `(since, head)`: a page, or the cursor cannot be served.
#[derive(Clone)]
enum Page {
    Changes(Bytes),
    Gone(String),
}

#[derive(Default)]
struct PageCache {
    head: i64,
    pages: HashMap<i64, Arc<OnceCell<Page>>>,
}

pub struct ChangesFeed {
    page_bytes: usize,
    max_cached_pages: usize,
    cache: Mutex<PageCache>,
}

impl ChangesFeed {
    pub fn new(page_bytes: usize) -> Result<Self, String> {
        if !(MIN_PAGE_BYTES..=MAX_PAGE_BYTES).contains(&page_bytes) {
            return Err(format!(
                "--feed-page-bytes {page_bytes} must be from {MIN_PAGE_BYTES} (the largest entry and its \
                 envelope) to {MAX_PAGE_BYTES}"
            ));
        }
        Ok(ChangesFeed {
            page_bytes,
            max_cached_pages: (MAX_CACHED_BYTES / page_bytes).clamp(2, 256),
            cache: Mutex::new(PageCache::default()),
        })
    }

    /// The answer to `GET /v2/registry/changes` with this query string (the proxy token already checked).
    pub async fn answer(&self, store: &Store, sealer: &Sealer, query: Option<&str>) -> Response {
        let since = match read_since(query) {
            Ok(since) => since,
            Err(message) => return error(StatusCode::BAD_REQUEST, "since", &message),
        };
        let outcome =
            tokio::time::timeout(DATABASE_DEADLINE, self.page(store, sealer, since)).await;
        match outcome {
            Ok(Ok(Page::Changes(body))) => {
                let head = self
                    .cache
                    .lock()
                    .map_or(since, |cache| cache.head.max(since));
                super::refusals::note_feed_pull(head, StatusCode::OK, body.len());
                (
                    StatusCode::OK,
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CACHE_CONTROL, "no-store"),
                    ],
                    body,
                )
                    .into_response()
            }
            Ok(Ok(Page::Gone(message))) => error(StatusCode::GONE, "since", &message),
            Ok(Err(e)) => {
                log(&format!("registry changes: database error: {e}"));
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "",
                    "the database did not answer; try again",
                )
            }
            Err(_) => {
                log("registry changes: the database did not answer within 2 s");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "",
                    "the database did not answer; try again",
                )
            }
        }
    }

    async fn page(&self, store: &Store, sealer: &Sealer, since: i64) -> Result<Page, sqlx::Error> {
        let head = store.revision().await?;
        if since == head {
            return Ok(Page::Changes(Bytes::from(envelope(head, head, false, ""))));
        }
        if since > head {
            return Ok(Page::Gone(format!(
                "cursor {since} is newer than the head {head} (was the database restored?): list again from 0"
            )));
        }
        // Read after the head, so never ahead of it; checked before the cache, whose pages outlive a pruning.
        if since > 0 {
            let compacted = revisions::compaction_point(store.pool()).await?;
            if since < compacted {
                return Ok(gone_compacted(since, compacted));
            }
        }
        let cell = self.cell(since, head);
        let build = || self.build(store, sealer, since, head);
        match cell {
            Some(cell) => cell.get_or_try_init(build).await.cloned(),
            None => build().await,
        }
    }

    /// The shared slot of `(since, head)`, or None when `head` is behind the cache's (a read that raced a write).
    fn cell(&self, since: i64, head: i64) -> Option<Arc<OnceCell<Page>>> {
        let mut cache = self.cache.lock().ok()?;
        if head > cache.head || cache.pages.len() >= self.max_cached_pages {
            cache.pages.clear();
            cache.head = cache.head.max(head);
        }
        if head < cache.head {
            return None;
        }
        Some(cache.pages.entry(since).or_default().clone())
    }

    async fn build(
        &self,
        store: &Store,
        sealer: &Sealer,
        since: i64,
        head: i64,
    ) -> Result<Page, sqlx::Error> {
        let pool = store.pool();
        let now = super::now_ms();
        let budget = self.page_bytes - ENVELOPE_BYTES;
        // Rows per read: about a page of small entries; a page of larger ones stops early.
        let chunk = i64::try_from(self.page_bytes / 160)
            .unwrap_or(1024)
            .clamp(16, 1024);
        let mut entries = String::new();
        let mut count = 0usize;
        let mut last = since;
        let mut more = false;
        'reading: loop {
            let changes = revisions::changes(
                pool,
                last,
                head,
                chunk,
                since > 0,
                store::COLUMNS,
                store::row_to_webhook,
            )
            .await?;
            let exhausted = i64::try_from(changes.len()).unwrap_or(i64::MAX) < chunk;
            for change in &changes {
                let entry = match change {
                    Change::Live(row) => live_entry(row, sealer, now),
                    Change::Deleted {
                        revision,
                        id,
                        organisation_id,
                    } => Some(deleted_entry(*revision, id, organisation_id)),
                };
                if let Some(entry) = entry {
                    // At least one change per page, whatever its size.
                    if count > 0 && entries.len() + 1 + entry.len() > budget {
                        more = true;
                        break 'reading;
                    }
                    if count > 0 {
                        entries.push(',');
                    }
                    entries.push_str(&entry);
                    count += 1;
                }
                last = change.revision();
            }
            if exhausted {
                break;
            }
        }
        // Read after the changes: a pruning that removed tombstones this page needed shows here.
        if since > 0 {
            let compacted = revisions::compaction_point(pool).await?;
            if since < compacted {
                return Ok(gone_compacted(since, compacted));
            }
        }
        let next = if more { last } else { head };
        Ok(Page::Changes(Bytes::from(envelope(
            head, next, more, &entries,
        ))))
    }
}

fn gone_compacted(since: i64, compacted: i64) -> Page {
    log(&format!(
        "registry changes: cursor {since} is older than the compaction point {compacted}: 410"
    ));
    Page::Gone(format!(
        "cursor {since} is older than the compaction point {compacted}: list again from 0"
    ))
}

fn envelope(head: i64, next: i64, more: bool, entries: &str) -> String {
    format!("{{\"revision\":{head},\"next\":{next},\"more\":{more},\"changes\":[{entries}]}}")
}

/// `since` from the query string: absent is 0 (the full listing); otherwise a whole number, given once.
fn read_since(query: Option<&str>) -> Result<i64, String> {
    let mut found = None;
    for pair in query.unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "since" {
            continue;
        }
        if found.is_some() {
            return Err("give since once".into());
        }
        found = Some(
            value
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    "must be a revision: a whole number, 0 or more (0 lists everything)".to_string()
                })?,
        );
    }
    Ok(found.unwrap_or(0))
}

fn error(status: StatusCode, path: &str, message: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json!({"errors": [{"path": path, "message": message}]}).to_string(),
    )
        .into_response()
}

/// Prunes tombstones older than `retention_ms`, every quarter of it (at least every minute), for as long as the
/// registry runs. A failure is logged and tried again at the next round.
pub async fn prune_forever(store: &Store, retention_ms: i64) {
    let every = Duration::from_millis(
        u64::try_from((retention_ms / 4).clamp(50, 60_000)).unwrap_or(60_000),
    );
    loop {
        tokio::time::sleep(every).await;
        let before = super::now_ms().saturating_sub(retention_ms);
        match revisions::prune_tombstones(store.pool(), before).await {
            Ok(0) => {}
            Ok(n) => log(&format!("pruned {n} tombstones of deleted webhooks")),
            Err(e) => log(&format!(
                "pruning tombstones failed (tried again later): {e}"
            )),
        }
    }
}

#[cfg(test)]
mod tests;
