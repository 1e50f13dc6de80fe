//! The proxy's copy of the registry, kept in step with the feed (`GET /v2/registry/changes`,
//! docs/registry-feed.md): a page is read and checked whole before any of it applies, and its
//! changes apply one by one to a [`RegistryTable`] indexed by id and by organisation, so that a
//! page costs what it holds, never the total. Each registry webhook keeps its slot in the table
//! while it exists (its outbox lane is the slot's). A 410 starts a listing from revision 0 into a
//! new map; the copy in force stays until that listing ends, and then the webhooks it did not
//! contain are forgotten.
//!
//! Pure: the glue (`filter/worker/registry_pull.rs`) sends the requests and hands the answers in.

use crate::config::{webhook_id_bytes, ConfigError, Plan, Webhook, WebhookId};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// Registry webhooks by id.
type ById = HashMap<WebhookId, Rc<Webhook>>;

/// The registry's enabled webhooks, each in a slot it keeps while it exists, indexed by id and
/// by organisation (disabled ones are not kept: they get nothing).
#[derive(Debug, Default, Clone)]
pub struct RegistryTable {
    slots: Vec<Option<Rc<Webhook>>>,
    /// Slots free for a new webhook.
    free: Vec<u32>,
    /// Slots emptied by the last page: free once the caller has cleared what it kept for them
    /// (at the next page), so that a new webhook never inherits a removed one's lane.
    emptied: Vec<u32>,
    by_id: HashMap<WebhookId, u32>,
    by_org: HashMap<Box<str>, Vec<u32>>,
}

impl RegistryTable {
    /// The webhook in `slot`.
    pub fn get(&self, slot: usize) -> Option<&Rc<Webhook>> {
        self.slots.get(slot)?.as_ref()
    }

    /// The slot of the webhook with this id.
    pub fn slot_of(&self, id: &str) -> Option<usize> {
        let key = webhook_id_bytes(id)?;
        self.by_id.get(&key).map(|&s| s as usize)
    }

    /// The slots of `organisation`'s webhooks subscribed to `event_type`.
    pub fn subscribers<'a>(
        &'a self,
        event_type: &'a str,
        organisation: &str,
    ) -> impl Iterator<Item = usize> + 'a {
        self.by_org
            .get(organisation)
            .into_iter()
            .flatten()
            .map(|&s| s as usize)
            .filter(move |&s| {
                self.get(s)
                    .is_some_and(|w| w.events.iter().any(|e| e == event_type))
            })
    }

    /// Slots in use or not: lanes up to this many exist.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn upsert(&mut self, id: WebhookId, webhook: Rc<Webhook>) {
        if let Some(&slot) = self.by_id.get(&id) {
            let old = self
                .slots
                .get_mut(slot as usize)
                .and_then(|s| s.replace(Rc::clone(&webhook)));
            if let Some(old) = old.filter(|o| o.organisation_id != webhook.organisation_id) {
                self.unindex_org(&old.organisation_id, slot);
                self.index_org(&webhook.organisation_id, slot);
            }
            return;
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.index_org(&webhook.organisation_id, slot);
        if let Some(place) = self.slots.get_mut(slot as usize) {
            *place = Some(webhook);
        }
        self.by_id.insert(id, slot);
    }

    /// Removes the webhook with this id; returns its slot and the webhook.
    fn remove(&mut self, id: &WebhookId) -> Option<(usize, Rc<Webhook>)> {
        let slot = self.by_id.remove(id)?;
        let webhook = self.slots.get_mut(slot as usize)?.take()?;
        self.unindex_org(&webhook.organisation_id, slot);
        self.emptied.push(slot);
        Some((slot as usize, webhook))
    }

    fn index_org(&mut self, organisation: &str, slot: u32) {
        match self.by_org.get_mut(organisation) {
            Some(slots) => slots.push(slot),
            None => {
                self.by_org.insert(organisation.into(), vec![slot]);
            }
        }
    }

    fn unindex_org(&mut self, organisation: &str, slot: u32) {
        if let Some(slots) = self.by_org.get_mut(organisation) {
            slots.retain(|&s| s != slot);
            if slots.is_empty() {
                self.by_org.remove(organisation);
            }
        }
    }
}

/// The registry as this proxy knows it, and where it stands in the feed.
#[derive(Debug, Default)]
pub struct RegistrySync {
    /// The registry's webhooks as applied so far. Shared with the worker's views of its
    /// webhooks, which do not outlive a callback: a page changes it in place.
    table: Rc<RegistryTable>,
    /// A listing from revision 0 under way (the first one, or after a 410): the new copy, which
    /// replaces the table's webhooks when the listing ends.
    listing: Option<ById>,
    /// `since` of the next request.
    cursor: u64,
    /// The registry's head revision, as last seen.
    head: u64,
    /// The revision up to which the last catch-up (or listing) was complete.
    complete_at: Option<u64>,
    /// When the last catch-up ended (`more: false`), Unix ms.
    complete_ms: Option<u64>,
    /// The last page said more changes follow: ask again at once.
    more: bool,
}

/// What one page did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Entries left out (each error names the entry by its place in the page).
    pub skipped: Vec<ConfigError>,
    /// Webhooks added or replaced.
    pub upserted: usize,
    /// Webhooks removed (deleted, disabled, left out, or forgotten by a new listing), with the
    /// slot each had: what was kept for that slot goes.
    pub removed: Vec<(usize, Rc<Webhook>)>,
    /// The page ended a catch-up: nothing more is left after it.
    pub complete: bool,
    /// This page ended the first complete listing.
    pub first: bool,
    /// A listing from 0 ended: webhooks of the previous copy it did not contain, now forgotten.
    pub forgotten: usize,
    /// The page's `pendingSends`: whether the registry holds sends to claim (None: not said).
    pub pending_sends: Option<bool>,
    /// New webhooks refused because `registry.maxWebhooks` were held, and the id of the first.
    pub refused: usize,
    pub first_refused: Option<String>,
}

/// Why a page was not taken. Nothing of it applies; the cursor stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// The body is not JSON.
    NotJson(String),
    /// JSON, but not a page (a field missing or of the wrong type).
    NotAPage(String),
    /// The page's cursor does not follow from the request's (`next` going back, revisions out
    /// of order or outside the page).
    BrokenCursor(String),
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageError::NotJson(why) => write!(f, "the page is not JSON ({why})"),
            PageError::NotAPage(why) => write!(f, "the answer is not a feed page ({why})"),
            PageError::BrokenCursor(why) => write!(f, "broken cursor: {why}"),
        }
    }
}

/// A page's header fields.
struct Page<'a> {
    revision: u64,
    next: u64,
    more: bool,
    changes: &'a [Value],
}

fn read_page(value: &Value) -> Result<Page<'_>, PageError> {
    let field = |name: &str| {
        value
            .get(name)
            .ok_or_else(|| PageError::NotAPage(format!("no {name:?}")))
    };
    let number = |name: &str| {
        field(name)?
            .as_u64()
            .ok_or_else(|| PageError::NotAPage(format!("{name:?} is not a revision")))
    };
    let more = field("more")?
        .as_bool()
        .ok_or_else(|| PageError::NotAPage("\"more\" is not true or false".into()))?;
    let changes = field("changes")?
        .as_array()
        .ok_or_else(|| PageError::NotAPage("\"changes\" is not an array".into()))?;
    Ok(Page {
        revision: number("revision")?,
        next: number("next")?,
        more,
        changes,
    })
}

impl RegistrySync {
    /// A proxy that knows nothing yet: its first request lists from revision 0.
    pub fn new() -> Self {
        RegistrySync {
            listing: Some(ById::new()),
            ..RegistrySync::default()
        }
    }

    /// The request's path: the feed's path with this proxy's cursor.
    pub fn request_path(&self, feed_path: &str) -> String {
        let join = if feed_path.contains('?') { '&' } else { '?' };
        format!("{feed_path}{join}since={}", self.cursor)
    }

    /// A complete listing has applied at least once: the registry's webhooks are known.
    pub fn loaded(&self) -> bool {
        self.complete_at.is_some()
    }

    /// More changes are waiting in the feed: ask again at once, not after the poll interval.
    pub fn more(&self) -> bool {
        self.more
    }

    /// How many revisions the copy in force is behind the registry's head as last seen.
    pub fn lag(&self) -> u64 {
        self.head.saturating_sub(self.complete_at.unwrap_or(0))
    }

    /// When the last catch-up ended (Unix ms).
    pub fn complete_ms(&self) -> Option<u64> {
        self.complete_ms
    }

    /// The head revision as last seen, and the revision the copy in force is complete at.
    pub fn revisions(&self) -> (u64, Option<u64>) {
        (self.head, self.complete_at)
    }

    /// The registry's webhooks in force.
    pub fn table(&self) -> &Rc<RegistryTable> {
        &self.table
    }

    /// The registry answered 410 (the cursor is older than its compaction point, or newer than
    /// its head): list again from 0. The copy in force stays until that listing ends.
    pub fn relist(&mut self) {
        if self.listing.is_none() {
            self.listing = Some(ById::new());
        }
        self.cursor = 0;
        self.more = true;
    }

    /// Applies one page of the feed (the answer to [`RegistrySync::request_path`]), all or
    /// nothing: a page that is not one, or whose cursor does not follow, changes nothing.
    pub fn apply_page(
        &mut self,
        base: &Plan,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Applied, PageError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| PageError::NotJson(e.to_string()))?;
        let page = read_page(&value)?;
        self.check_cursor(&page)?;
        let mut applied = Applied {
            pending_sends: value.get("pendingSends").and_then(Value::as_bool),
            ..Applied::default()
        };
        // Only views that end with their callback share the table: this does not copy it.
        let table = Rc::make_mut(&mut self.table);
        let emptied = std::mem::take(&mut table.emptied);
        table.free.extend(emptied);
        let max_webhooks = base
            .registry
            .as_ref()
            .map_or(usize::MAX, |r| r.max_webhooks);
        for (i, change) in page.changes.iter().enumerate() {
            let at = format!("changes[{i}]");
            let Some(id) = change
                .get("id")
                .and_then(Value::as_str)
                .and_then(webhook_id_bytes)
            else {
                applied.skipped.push(ConfigError {
                    path: format!("{at}.id"),
                    message: "must be 24 lowercase hex digits".into(),
                });
                continue;
            };
            let deleted = change.get("deleted").and_then(Value::as_bool) == Some(true);
            let disabled = change.get("status").and_then(Value::as_str) == Some("disabled");
            let (held, known) = match self.listing.as_ref() {
                Some(listing) => (listing.len(), listing.contains_key(&id)),
                None => (table.len(), table.by_id.contains_key(&id)),
            };
            let adds = !deleted && !disabled && !known;
            if adds && held >= max_webhooks {
                // Each VM holds its own copy: a registry that grows past the bound is refused
                // here rather than exhausting the VM's memory.
                applied.refused += 1;
                if applied.first_refused.is_none() {
                    applied.first_refused =
                        change.get("id").and_then(Value::as_str).map(str::to_string);
                }
                continue;
            }
            let webhook = if deleted || disabled {
                None
            } else {
                // Left out when invalid here: its older version is superseded, so it goes too.
                base.registry_webhook(change, &at, &mut applied.skipped)
            };
            match (webhook, self.listing.as_mut()) {
                (Some(webhook), Some(listing)) => {
                    listing.insert(id, Rc::new(webhook));
                    applied.upserted += 1;
                }
                (None, Some(listing)) => {
                    listing.remove(&id);
                }
                (Some(webhook), None) => {
                    table.upsert(id, Rc::new(webhook));
                    applied.upserted += 1;
                }
                (None, None) => applied.removed.extend(table.remove(&id)),
            }
        }
        self.cursor = page.next;
        self.head = page.revision;
        self.more = page.more;
        if !page.more {
            applied.complete = true;
            applied.first = self.complete_at.is_none();
            if let Some(listing) = self.listing.take() {
                let gone: Vec<WebhookId> = table
                    .by_id
                    .keys()
                    .filter(|id| !listing.contains_key(*id))
                    .copied()
                    .collect();
                applied.forgotten = gone.len();
                for id in &gone {
                    applied.removed.extend(table.remove(id));
                }
                for (id, webhook) in listing {
                    table.upsert(id, webhook);
                }
            }
            self.complete_at = Some(page.next);
            self.complete_ms = Some(now_ms);
        }
        Ok(applied)
    }

    /// A page follows from the request: `next` does not go back (and moves on when more is
    /// left), changes are in order within `(since, next]`, and `next` is not past the head.
    fn check_cursor(&self, page: &Page<'_>) -> Result<(), PageError> {
        let since = self.cursor;
        if page.next < since {
            return Err(PageError::BrokenCursor(format!(
                "asked for changes since {since}, the page's next is {}",
                page.next
            )));
        }
        if page.next > page.revision {
            return Err(PageError::BrokenCursor(format!(
                "the page's next {} is past its head revision {}",
                page.next, page.revision
            )));
        }
        if page.more && (page.next == since || page.changes.is_empty()) {
            return Err(PageError::BrokenCursor(format!(
                "the page says more changes follow but moves the cursor nowhere (since {since})"
            )));
        }
        let mut last = since;
        for (i, change) in page.changes.iter().enumerate() {
            let revision = change.get("revision").and_then(Value::as_u64);
            match revision {
                Some(r) if r > last && r <= page.next => last = r,
                Some(r) => {
                    return Err(PageError::BrokenCursor(format!(
                    "changes[{i}] has revision {r}, not after {last} and within the page's next {}",
                    page.next
                )))
                }
                None => return Err(PageError::NotAPage(format!("changes[{i}] has no revision"))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
