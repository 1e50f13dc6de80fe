//! The proxy-wasm glue: one root context per worker (configuration, outbox, callouts) and one
//! HTTP context per stream (request facts, body copy, event hand-off). Decisions live in the core.

mod http;
mod metrics;
mod root;

use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

pub(crate) const LOG_PREFIX: &str = "webhook-emitter";

pub(crate) fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, &format!("{LOG_PREFIX}: {message}"));
}

/// Whether Envoy would print a debug line, so that one is not formatted for nothing.
pub(crate) fn debug_enabled() -> bool {
    hostcalls::get_log_level().is_ok_and(|l| l as u32 <= LogLevel::Debug as u32)
}

pub(crate) fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Random bytes from the host (WASI random_get). If the host ever fails, the id stays unique
/// per worker through a counter, and the failure is logged.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use std::cell::Cell;
    thread_local!(static FALLBACK: Cell<u64> = const { Cell::new(0) });
    let mut buf = [0u8; N];
    if getrandom::fill(&mut buf).is_err() {
        log(
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

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // A panic traps the VM; make sure it is at least logged (Envoy then applies failure_policy).
    std::panic::set_hook(Box::new(|info| log(LogLevel::Critical, &format!("panic: {info}"))));
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::EmitterRoot::default())
    });
}}
