//! Requests whose method some rule takes but whose `:path` has no canonical form (not UTF-8, a bad
//! `%` escape, an encoded slash): each is counted under its reason, and logged at warn, at most
//! one line a second per worker so that a client cannot flood the log (the line says how many
//! were not logged since the last one).

use super::host::{log, Host, LogLevel};
use super::metrics::Metrics;
use crate::path::BadPath;
use crate::stream::UnusablePath;
use std::cell::Cell;

/// One line per this many milliseconds at most, per worker.
const LOG_EVERY_MS: u64 = 1000;

/// When the last line was written, and how many requests were counted but not logged since.
#[derive(Debug, Default)]
pub struct LogSampler {
    last_ms: Cell<Option<u64>>,
    unlogged: Cell<u64>,
}

impl LogSampler {
    /// Whether to write a line now; if so, how many were not logged before it.
    pub(crate) fn take(&self, now_ms: u64) -> Option<u64> {
        if self
            .last_ms
            .get()
            .is_some_and(|last| now_ms.saturating_sub(last) < LOG_EVERY_MS)
        {
            self.unlogged.set(self.unlogged.get() + 1);
            return None;
        }
        self.last_ms.set(Some(now_ms));
        Some(self.unlogged.replace(0))
    }
}

pub fn report(
    host: &dyn Host,
    metrics: Metrics,
    sampler: &LogSampler,
    path: &UnusablePath,
    now_ms: u64,
) {
    let metric = match path.why {
        BadPath::NotUtf8 => metrics.requests_bad_path_not_utf8,
        BadPath::BadEscape => metrics.requests_bad_path_bad_escape,
        BadPath::EscapedSlash => metrics.requests_bad_path_escaped_slash,
    };
    metric.inc(host);
    let Some(unlogged) = sampler.take(now_ms) else {
        return;
    };
    log(host, LogLevel::Warn, || {
        let what = match path.why {
            BadPath::NotUtf8 => "is not UTF-8",
            BadPath::BadEscape => "has a '%' not followed by two hex digits",
            BadPath::EscapedSlash => "encodes a '/' or '\\' in a segment (%2F, %5C)",
        };
        let more = if unlogged > 0 {
            format!(" ({unlogged} more since the last such line)")
        } else {
            String::new()
        };
        format!(
            "request path {what}: {} {}: matched against no rule, no event; counted in requests_bad_path.{}{more}",
            path.method,
            path.preview,
            path.why.reason()
        )
    });
}

#[cfg(test)]
mod tests;
