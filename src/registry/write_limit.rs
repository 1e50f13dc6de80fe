//! Each organisation's writes through the admin API are limited (`--org-write-rate`, `--org-write-burst`): every
//! call but GET and HEAD under `/v1/organisations/{org}/` takes a token of the organisation's bucket
//! (rate_limit.rs). The check comes after the token is verified (an unauthenticated or foreign caller costs the
//! organisation nothing: its request goes on to be refused by the handler) and before any database work. Over
//! the limit: 429 with `Retry-After`, in the error shape with the code `rate_limited`. The proxies' routes
//! (feeds, reports, claims) are not limited here.
//!
//! Refused writes are logged at most once per organisation per 10 s, with how many were refused since.

use super::rate_limit::{Decision, Rate, Report, TokenBuckets, LEAST_RATE, REPORT_EVERY_MS};
use super::{log, now_ms, rfc3339};
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Args;
use serde_json::json;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most organisations with a bucket at once (under 1 KB each with the longest id: a few MB at most).
const MOST_BUCKETS: usize = 10_000;
/// Highest rate and burst accepted.
const MOST_RATE: f64 = 1_000_000.0;
const MOST_BURST: u32 = 1_000_000;
/// The routes limited: the organisation-scoped admin API.
const ORGANISATION_ROUTES: &str = "/v1/organisations/{org}/";
/// The error code of a 429, for clients to tell it apart.
pub const RATE_LIMITED: &str = "rate_limited";

/// The operator's flags for the organisations' write limit.
#[derive(Debug, Args)]
pub struct WriteLimitArgs {
    /// Writes a second each organisation may make through the admin API (every call but GET: create, update,
    /// delete, key rotation, resend, recover, test); fractional allowed (0.5: one every 2 s); 0 turns the limit
    /// off. Per registry process.
    #[arg(
        long,
        env = "REGISTRY_ORG_WRITE_RATE",
        default_value_t = 10.0,
        value_name = "PER_SECOND",
        allow_negative_numbers = true
    )]
    pub org_write_rate: f64,
    /// Writes an organisation may make at once after a quiet period (its bucket's size).
    #[arg(
        long,
        env = "REGISTRY_ORG_WRITE_BURST",
        default_value_t = 50,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub org_write_burst: u32,
}

impl WriteLimitArgs {
    /// The rate, or why the flags are refused (naming the flag).
    pub fn rate(&self) -> Result<Rate, String> {
        check_rate(self.org_write_rate, self.org_write_burst)
    }
}

/// The flags' checks: a finite rate, 0 (off) or from 0.001 to 1000000, and a burst from 1 to 1000000 while the rate is on.
pub fn check_rate(per_second: f64, burst: u32) -> Result<Rate, String> {
    if !per_second.is_finite() || per_second < 0.0 {
        return Err(format!(
            "--org-write-rate: {per_second} is not a rate: give writes a second, 0 (off) or more"
        ));
    }
    if per_second > 0.0 && per_second < LEAST_RATE {
        return Err(format!(
            "--org-write-rate: {per_second} is less than {LEAST_RATE} writes a second (0 turns the limit off)"
        ));
    }
    if per_second > MOST_RATE {
        return Err(format!(
            "--org-write-rate: {per_second} is more than {MOST_RATE} writes a second"
        ));
    }
    if per_second > 0.0 && burst == 0 {
        return Err(
            "--org-write-burst: must be at least 1 while --org-write-rate is on (0 turns the limit off)"
                .into(),
        );
    }
    if burst > MOST_BURST {
        return Err(format!(
            "--org-write-burst: {burst} is more than {MOST_BURST}"
        ));
    }
    Ok(Rate { per_second, burst })
}

/// The buckets of this registry process, with their monotonic clock.
pub struct WriteLimiter {
    rate: Rate,
    buckets: Mutex<TokenBuckets>,
    started: Instant,
}

impl WriteLimiter {
    pub fn new(rate: Rate) -> Self {
        WriteLimiter {
            rate,
            buckets: Mutex::new(TokenBuckets::new(rate, MOST_BUCKETS)),
            started: Instant::now(),
        }
    }

    pub fn off() -> Self {
        Self::new(Rate {
            per_second: 0.0,
            burst: 0,
        })
    }

    fn rate(&self) -> Rate {
        self.rate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenBuckets> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// One write of `organisation`: None if allowed, else the seconds until the next one is.
    fn take(&self, organisation: &str) -> Option<u64> {
        let now = self.elapsed_ms();
        let taken = self.lock().take(organisation, now);
        if let Some(report) = taken.report {
            self.log_report(&report, now);
        }
        match taken.decision {
            Decision::Allowed => None,
            Decision::Refused { retry_after_s } => Some(retry_after_s),
        }
    }

    fn log_report(&self, report: &Report, now: u64) {
        let rate = self.rate();
        let since = now_ms()
            .saturating_sub(i64::try_from(now.saturating_sub(report.since_ms)).unwrap_or(0));
        let whose = if report.key.is_empty() {
            "of organisations whose buckets were pushed out of the full table".to_string()
        } else {
            format!("of organisation {:?}", report.key)
        };
        log(&format!(
            "rate limited: {} write{} {whose} refused (429) since {}: over --org-write-rate {} (--org-write-burst {})",
            report.refused,
            if report.refused == 1 { "" } else { "s" },
            rfc3339(since),
            rate.per_second,
            rate.burst
        ));
    }

    /// Every 10 s: forgets the buckets full again, logs the refusals no refused write has logged yet.
    pub async fn sweep_forever(&self) {
        if self.rate().is_off() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(REPORT_EVERY_MS)).await;
            let now = self.elapsed_ms();
            let reports = self.lock().sweep(now);
            for report in reports {
                self.log_report(&report, now);
            }
        }
    }

    /// Logs the refusals no line has counted yet (when the registry stops).
    pub fn log_final_reports(&self) {
        let now = self.elapsed_ms();
        let reports = self.lock().final_reports();
        for report in reports {
            self.log_report(&report, now);
        }
    }
}

/// What the limit needs of the application (the API's `App`).
pub trait LimitsWrites: Send + Sync + 'static {
    fn write_limiter(&self) -> &WriteLimiter;
    /// Whether the request's token may manage the organisation (the handler checks it again and says why not).
    fn may_manage(&self, headers: &HeaderMap, organisation: &str) -> bool;
}

/// The check point: a write by a caller who may manage the organisation takes a token, or is refused with 429.
pub async fn limit_writes<A: LimitsWrites>(
    State(app): State<Arc<A>>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    let organisation_route = matched
        .as_ref()
        .is_some_and(|m| m.as_str().starts_with(ORGANISATION_ROUTES));
    if read || !organisation_route {
        return next.run(request).await;
    }
    let organisation = params.ok().and_then(|p| {
        p.iter()
            .find(|(k, _)| *k == "org")
            .map(|(_, v)| v.to_string())
    });
    let Some(organisation) = organisation else {
        return next.run(request).await;
    };
    if !app.may_manage(request.headers(), &organisation) {
        return next.run(request).await;
    }
    match app.write_limiter().take(&organisation) {
        None => next.run(request).await,
        Some(retry_after_s) => too_many(&organisation, retry_after_s, app.write_limiter().rate()),
    }
}

/// 429 in the error shape, with the code `rate_limited` and `Retry-After`.
fn too_many(organisation: &str, retry_after_s: u64, rate: Rate) -> Response {
    let message = format!(
        "too many writes for organisation {organisation:?}: at most {} a second (bursts of {}); retry in {retry_after_s} s",
        rate.per_second, rate.burst
    );
    let body = json!({"errors": [{"path": "", "message": message, "code": RATE_LIMITED}]});
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked() {
        assert!(check_rate(10.0, 50).is_ok());
        assert!(check_rate(0.5, 1).is_ok());
        assert!(check_rate(0.0, 0).is_ok(), "off needs no burst");
        for bad in [-1.0, -0.0001, f64::NAN, f64::INFINITY, 2e6, 0.0001] {
            assert!(check_rate(bad, 50)
                .unwrap_err()
                .starts_with("--org-write-rate:"));
        }
        assert!(check_rate(1.0, 0)
            .unwrap_err()
            .starts_with("--org-write-burst:"));
        assert!(check_rate(1.0, 2_000_000)
            .unwrap_err()
            .starts_with("--org-write-burst:"));
    }
}
