//! The proxy's copy of the registry, kept in step with the feed (`GET /v2/registry/changes`,
//! docs/registry-feed.md): a page is read and checked whole before any of it applies, its changes
//! apply one by one to a map by webhook id (so a page costs what it holds, never the total), and
//! the plan is rebuilt once per catch-up, when a page says nothing more is left. A 410 starts a
//! listing from revision 0 into a new map; the copy in force stays until that listing ends, and
//! then the webhooks it did not contain are forgotten.
//!
//! Pure: the glue (`filter/worker/registry_pull.rs`) sends the requests and hands the answers in.

use crate::config::{webhook_id_bytes, ConfigError, Plan, Webhook, WebhookId};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// Registry webhooks by id.
type ById = HashMap<WebhookId, Rc<Webhook>>;

/// The registry as this proxy knows it, and where it stands in the feed.
#[derive(Debug, Default)]
pub struct RegistrySync {
    /// The registry's webhooks as applied so far (disabled ones are not kept: they get nothing).
    in_force: ById,
    /// A listing from revision 0 under way (the first one, or after a 410): the new copy, which
    /// replaces `in_force` when the listing ends.
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
    /// `in_force` changed since the plan was last built from it.
    changed: bool,
}

/// What one page did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Entries left out (each error names the entry by its place in the page).
    pub skipped: Vec<ConfigError>,
    /// Webhooks added or replaced, and webhooks removed (deleted, disabled, or left out).
    pub upserted: usize,
    pub removed: usize,
    /// The page ended a catch-up: nothing more is left after it.
    pub complete: bool,
    /// The plan must be rebuilt from [`RegistrySync::plan`]: a catch-up with changes ended.
    pub rebuild: bool,
    /// This page ended the first complete listing.
    pub first: bool,
    /// A listing from 0 ended: webhooks of the previous copy it did not contain, now forgotten.
    pub forgotten: usize,
    /// The page's `pendingSends`: whether the registry holds sends to claim (None: not said).
    pub pending_sends: Option<bool>,
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

    /// Registry webhooks in force.
    pub fn len(&self) -> usize {
        self.in_force.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_force.is_empty()
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

    /// The plan `base` with the registry's webhooks in force.
    pub fn plan(&mut self, base: &Plan) -> Plan {
        self.changed = false;
        base.with_registry_webhooks(self.in_force.values().cloned())
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
        let copy = match self.listing.as_mut() {
            Some(listing) => listing,
            None => &mut self.in_force,
        };
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
            let webhook = if deleted || disabled {
                None
            } else {
                // Left out when invalid here: its older version is superseded, so it goes too.
                base.registry_webhook(change, &at, &mut applied.skipped)
            };
            match webhook {
                Some(webhook) => {
                    copy.insert(id, Rc::new(webhook));
                    applied.upserted += 1;
                }
                None => {
                    if copy.remove(&id).is_some() {
                        applied.removed += 1;
                    }
                }
            }
        }
        self.cursor = page.next;
        self.head = page.revision;
        self.more = page.more;
        if self.listing.is_none() {
            self.changed |= applied.upserted + applied.removed > 0;
        }
        if !page.more {
            applied.complete = true;
            applied.first = self.complete_at.is_none();
            if let Some(listing) = self.listing.take() {
                applied.forgotten = self
                    .in_force
                    .keys()
                    .filter(|id| !listing.contains_key(*id))
                    .count();
                self.in_force = listing;
                self.changed = true;
            }
            applied.rebuild = self.changed;
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
