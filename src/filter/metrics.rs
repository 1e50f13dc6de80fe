//! Custom metrics. Envoy shows them as `wasmcustom.webhook_emitter.<name>`. Every worker defines
//! the same names and Envoy sums them; gauges therefore move by deltas, never by `set`.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Debug, Clone, Copy, Default)]
pub struct Metric(Option<u32>);

impl Metric {
    fn define(kind: MetricType, name: &str) -> Self {
        Metric(hostcalls::define_metric(kind, &format!("webhook_emitter.{name}")).ok())
    }
    pub fn add(self, n: i64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, n);
        }
    }
    pub fn inc(self) {
        self.add(1);
    }
    pub fn record(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    pub events_emitted: Metric,
    pub events_without_subscribers: Metric,
    pub events_without_organisation: Metric,
    pub events_bad_object: Metric,
    pub bodies_too_large: Metric,
    pub bodies_not_json: Metric,
    pub bodies_undecodable: Metric,
    pub deliveries_attempted: Metric,
    pub deliveries_succeeded: Metric,
    pub deliveries_failed: Metric,
    pub deliveries_retried: Metric,
    pub deliveries_exhausted: Metric,
    pub deliveries_dropped_queue_full: Metric,
    pub deliveries_dropped_webhook_gone: Metric,
    pub deliveries_dropped_webhook_removed: Metric,
    pub webhooks_disabled_gone: Metric,
    pub circuits_opened: Metric,
    pub dead_letters_delivered: Metric,
    pub dead_letters_failed: Metric,
    pub outbox_depth: Metric,
    pub callouts_in_flight: Metric,
    pub delivery_latency_ms: Metric,
}

impl Metrics {
    pub fn define() -> Self {
        use MetricType::{Counter, Gauge, Histogram};
        Metrics {
            events_emitted: Metric::define(Counter, "events_emitted"),
            events_without_subscribers: Metric::define(Counter, "events_without_subscribers"),
            events_without_organisation: Metric::define(Counter, "events_without_organisation"),
            events_bad_object: Metric::define(Counter, "events_bad_object"),
            bodies_too_large: Metric::define(Counter, "bodies_too_large"),
            bodies_not_json: Metric::define(Counter, "bodies_not_json"),
            bodies_undecodable: Metric::define(Counter, "bodies_undecodable"),
            deliveries_attempted: Metric::define(Counter, "deliveries_attempted"),
            deliveries_succeeded: Metric::define(Counter, "deliveries_succeeded"),
            deliveries_failed: Metric::define(Counter, "deliveries_failed"),
            deliveries_retried: Metric::define(Counter, "deliveries_retried"),
            deliveries_exhausted: Metric::define(Counter, "deliveries_exhausted"),
            deliveries_dropped_queue_full: Metric::define(Counter, "deliveries_dropped.queue_full"),
            deliveries_dropped_webhook_gone: Metric::define(
                Counter,
                "deliveries_dropped.webhook_gone",
            ),
            deliveries_dropped_webhook_removed: Metric::define(
                Counter,
                "deliveries_dropped.webhook_removed",
            ),
            webhooks_disabled_gone: Metric::define(Counter, "webhooks_disabled_gone"),
            circuits_opened: Metric::define(Counter, "circuits_opened"),
            dead_letters_delivered: Metric::define(Counter, "dead_letters_delivered"),
            dead_letters_failed: Metric::define(Counter, "dead_letters_failed"),
            outbox_depth: Metric::define(Gauge, "outbox_depth"),
            callouts_in_flight: Metric::define(Gauge, "callouts_in_flight"),
            delivery_latency_ms: Metric::define(Histogram, "delivery_latency_ms"),
        }
    }
}
