//! Custom metrics. Envoy shows them as `wasmcustom.webhook_emitter.<name>` (admin form) and
//! `webhook_emitter_<name>` in Prometheus form. Every worker defines the same names and Envoy sums
//! them; gauges therefore move by deltas, never by `set`.

use super::host::{Host, MetricKind};

/// The prefix of every metric name.
pub const PREFIX: &str = "webhook_emitter.";

/// One metric: its name (after [`PREFIX`]) and kind. The list is the metrics reference.
macro_rules! metrics {
    ($($field:ident: $kind:ident = $name:literal,)*) => {
        /// Metric ids of this VM; a metric the host refused to define is a no-op.
        #[derive(Debug, Clone, Copy, Default)]
        pub struct Metrics { $(pub $field: Metric,)* }

        /// Every metric's name and kind, in the order of the reference.
        pub const ALL: &[(&str, MetricKind)] = &[$(($name, MetricKind::$kind),)*];

        impl Metrics {
            pub fn define(host: &dyn Host) -> Self {
                Metrics { $($field: Metric::define(host, MetricKind::$kind, $name),)* }
            }
        }
    };
}

metrics! {
    events_emitted: Counter = "events_emitted",
    events_without_subscribers: Counter = "events_without_subscribers",
    events_without_organisation: Counter = "events_without_organisation",
    events_bad_organisation: Counter = "events_bad_organisation",
    events_bad_object: Counter = "events_bad_object",
    bodies_too_large: Counter = "bodies_too_large",
    bodies_not_json: Counter = "bodies_not_json",
    bodies_undecodable: Counter = "bodies_undecodable",
    events_lost_stream_reset: Counter = "events_lost.stream_reset",
    events_lost_refetch_failed: Counter = "events_lost.refetch_failed",
    events_refetched: Counter = "events_refetched",
    events_skipped_status: Counter = "events_skipped.status",
    events_skipped_when: Counter = "events_skipped.when",
    refetches_sent: Counter = "refetches_sent",
    refetches_retried: Counter = "refetches_retried",
    requests_bad_path_not_utf8: Counter = "requests_bad_path.not_utf8",
    requests_bad_path_bad_escape: Counter = "requests_bad_path.bad_escape",
    requests_bad_path_escaped_slash: Counter = "requests_bad_path.escaped_slash",
    deliveries_attempted: Counter = "deliveries_attempted",
    deliveries_succeeded: Counter = "deliveries_succeeded",
    deliveries_failed: Counter = "deliveries_failed",
    deliveries_retried: Counter = "deliveries_retried",
    deliveries_exhausted: Counter = "deliveries_exhausted",
    deliveries_dropped_queue_full: Counter = "deliveries_dropped.queue_full",
    deliveries_spilled: Counter = "deliveries_spilled",
    deliveries_paged_in: Counter = "deliveries_paged_in",
    deliveries_dropped_over_share: Counter = "deliveries_dropped.over_share",
    deliveries_dropped_journal_full: Counter = "deliveries_dropped.journal_full",
    deliveries_dropped_journal_behind: Counter = "deliveries_dropped.journal_behind",
    deliveries_dropped_webhook_gone: Counter = "deliveries_dropped.webhook_gone",
    deliveries_dropped_webhook_removed: Counter = "deliveries_dropped.webhook_removed",
    webhooks_disabled_gone: Counter = "webhooks_disabled_gone",
    circuits_opened: Counter = "circuits_opened",
    dead_letters_delivered: Counter = "dead_letters_delivered",
    dead_letters_failed: Counter = "dead_letters_failed",
    vm_starts: Counter = "vm_starts",
    journal_unavailable: Counter = "journal_unavailable",
    journal_writes_failed: Counter = "journal_writes_failed",
    journal_records_claimed: Counter = "journal_records_claimed",
    journal_records_too_large: Counter = "journal_records_too_large",
    journal_records_unreadable: Counter = "journal_records_unreadable",
    journal_records: Gauge = "journal_records",
    registry_updates: Counter = "registry_updates",
    registry_fetch_failed: Counter = "registry_fetch_failed",
    registry_webhooks_skipped: Counter = "registry_webhooks_skipped",
    events_dropped_registry_not_loaded: Counter = "events_dropped.registry_not_loaded",
    events_registry_not_loaded: Counter = "events_registry_not_loaded",
    registry_relists: Counter = "registry_relists",
    registry_webhooks: Gauge = "registry_webhooks",
    registry_revision_lag: Gauge = "registry_revision_lag",
    registry_sync_age_ms: Gauge = "registry_sync_age_ms",
    reports_sent: Counter = "reports_sent",
    reports_dropped: Counter = "reports_dropped",
    sends_claimed: Counter = "sends_claimed",
    sends_delivered: Counter = "sends_delivered",
    outbox_depth: Gauge = "outbox_depth",
    outbox_bytes: Gauge = "outbox_bytes",
    callouts_in_flight: Gauge = "callouts_in_flight",
    delivery_latency_ms: Histogram = "delivery_latency_ms",
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Metric(Option<u32>);

impl Metric {
    fn define(host: &dyn Host, kind: MetricKind, name: &str) -> Self {
        Metric(host.define_metric(kind, &format!("{PREFIX}{name}")))
    }
    pub fn add(self, host: &dyn Host, n: i64) {
        if let Some(id) = self.0 {
            host.add_metric(id, n);
        }
    }
    pub fn inc(self, host: &dyn Host) {
        self.add(host, 1);
    }
    pub fn record(self, host: &dyn Host, value: u64) {
        if let Some(id) = self.0 {
            host.record_metric(id, value);
        }
    }
}
