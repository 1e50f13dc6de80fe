//! Every default of the configuration, and the bounds its numbers must stay within, in one place.
//! The README's configuration reference shows the defaults; keep the two in step.

use std::ops::{Range, RangeFrom, RangeInclusive};

// ---- events[] ----

/// `match.methods`.
pub(super) const METHODS: [&str; 3] = ["POST", "PUT", "PATCH"];
/// `match.status`: every 2xx.
pub(super) const STATUSES: Range<u16> = 200..300;
/// `object`: the whole response body.
pub(super) const OBJECT_POINTER: &str = "";
/// `refetch.method`.
pub(super) const REFETCH_METHOD: &str = "GET";

// ---- delivery ----

pub(super) const TIMEOUT_MS: u64 = 10_000;
pub(super) const RETRY_SCHEDULE: [&str; 6] = ["5s", "30s", "2m", "10m", "30m", "1h"];
pub(super) const MAX_QUEUED: u64 = 10_000;
pub(super) const MAX_QUEUED_BYTES: u64 = 64 << 20;
pub(super) const MAX_BODY_BYTES: u64 = 1 << 20;
pub(super) const MAX_IN_FLIGHT_PER_WEBHOOK: u64 = 16;
pub(super) const ALLOW_INSECURE_HTTP: bool = false;
pub(super) const ALLOW_PRIVATE_NETWORKS: bool = false;
/// `circuitBreaker.failures`.
pub(super) const CIRCUIT_FAILURES: u32 = 10;

/// `journal.prefix` and `journal.leaseSeconds`.
pub(super) const JOURNAL_PREFIX: &str = "webhook-emitter/";
pub(super) const JOURNAL_LEASE_SECONDS: u64 = 15;
/// `journal.maxSpilledBytes`: records of deliveries that wait in etcd only, per worker.
pub(super) const JOURNAL_MAX_SPILLED_BYTES: u64 = 64 << 20;

// ---- registry ----

pub(super) const REGISTRY_PATH: &str = "/v2/registry/changes";
pub(super) const REGISTRY_POLL_MS: u64 = 2_000;
/// `registry.reports`, `reportFlushMs`, `maxReportBytes`.
pub(super) const REGISTRY_REPORTS: bool = true;
pub(super) const REPORT_FLUSH_MS: u64 = 1_000;
pub(super) const MAX_REPORT_BYTES: u64 = 256 << 10;
/// Each VM holds its own copy of the registry's webhooks (a few hundred bytes each).
pub(super) const REGISTRY_MAX_WEBHOOKS: u64 = 200_000;

// ---- bounds: a value outside is an error ----

pub(super) const TIMEOUT_MS_RANGE: RangeInclusive<u64> = 1..=3_600_000;
pub(super) const MAX_QUEUED_RANGE: RangeInclusive<u64> = 1..=10_000_000;
/// No upper bound: beyond the VM's memory it is the same as none.
pub(super) const MAX_QUEUED_BYTES_RANGE: RangeFrom<u64> = 1..;
pub(super) const MAX_BODY_BYTES_RANGE: RangeInclusive<u64> = 1..=64 << 20;
pub(super) const MAX_IN_FLIGHT_PER_WEBHOOK_RANGE: RangeInclusive<u64> = 1..=10_000;
/// etcd refuses a lease shorter than about 1.5 election timeouts (2 s with its defaults).
pub(super) const JOURNAL_LEASE_SECONDS_RANGE: RangeInclusive<u64> = 2..=3600;

pub(super) const REGISTRY_POLL_MS_RANGE: RangeInclusive<u64> = 100..=3_600_000;
pub(super) const REPORT_FLUSH_MS_RANGE: RangeInclusive<u64> = 50..=60_000;
/// The registry takes a report body of at most 1 MiB.
pub(super) const MAX_REPORT_BYTES_RANGE: RangeInclusive<u64> = 16_384..=1 << 20;
pub(super) const REGISTRY_MAX_WEBHOOKS_RANGE: RangeInclusive<u64> = 1..=10_000_000;
