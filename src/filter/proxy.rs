//! The real host: Envoy, through proxy-wasm.

use super::host::{Callout, DispatchRefused, Host, LogLevel, MetricKind};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{self, MetricType, Status};
use std::time::Duration;

/// Every log line of the filter starts with this.
pub const LOG_PREFIX: &str = "webhook-emitter";

pub struct ProxyHost;

fn sdk_level(level: LogLevel) -> types::LogLevel {
    match level {
        LogLevel::Trace => types::LogLevel::Trace,
        LogLevel::Debug => types::LogLevel::Debug,
        LogLevel::Info => types::LogLevel::Info,
        LogLevel::Warn => types::LogLevel::Warn,
        LogLevel::Error => types::LogLevel::Error,
        LogLevel::Critical => types::LogLevel::Critical,
    }
}

impl Host for ProxyHost {
    fn log(&self, level: LogLevel, message: &str) {
        let _ = hostcalls::log(sdk_level(level), &format!("{LOG_PREFIX}: {message}"));
    }

    fn log_enabled(&self, level: LogLevel) -> bool {
        hostcalls::get_log_level().is_ok_and(|l| l as u32 <= level as u32)
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).ok()
    }

    fn add_metric(&self, id: u32, delta: i64) {
        let _ = hostcalls::increment_metric(id, delta);
    }

    fn record_metric(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }

    fn random_u32(&self) -> u32 {
        u32::from_le_bytes(random_bytes::<4>())
    }

    fn dispatch(&self, callout: Callout<'_>) -> Result<u32, DispatchRefused> {
        hostcalls::dispatch_http_call(
            callout.cluster,
            callout.headers,
            Some(callout.body),
            vec![],
            Duration::from_millis(callout.timeout_ms),
        )
        .map_err(|status| match status {
            Status::BadArgument => DispatchRefused::BadArgument,
            Status::InternalFailure => DispatchRefused::InternalFailure,
            other => DispatchRefused::Other(other as u32),
        })
    }

    fn wake(&self, queue: u32) -> bool {
        // An empty item: the root drains it without the host calling back into the VM to allocate.
        hostcalls::enqueue_shared_queue(queue, None).is_ok()
    }

    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => Some((value.unwrap_or_default(), cas.unwrap_or(0))),
            Err(_) => None,
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> bool {
        hostcalls::set_shared_data(key, Some(value), (cas != 0).then_some(cas)).is_ok()
    }
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Random bytes from the host (WASI random_get). If the host ever fails, ids stay unique per
/// worker through a counter, and the failure is logged.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use std::cell::Cell;
    thread_local!(static FALLBACK: Cell<u64> = const { Cell::new(0) });
    let mut buf = [0u8; N];
    if getrandom::fill(&mut buf).is_err() {
        ProxyHost.log(
            LogLevel::Error,
            "getrandom failed; using a counter for event ids and jitter",
        );
        let n = FALLBACK.with(|c| {
            c.set(c.get().wrapping_add(1));
            c.get()
        }) ^ now_ms().rotate_left(20);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = n.to_be_bytes()[i % 8];
        }
    }
    buf
}
