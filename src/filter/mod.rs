//! The glue between Envoy and the core. [`worker`] holds the glue's decisions and talks to the
//! host only through the [`host::Host`] trait, so it is compiled and unit-tested everywhere; the
//! proxy-wasm contexts (one root per worker thread, one HTTP context per stream) and the real
//! host exist only in the wasm build, and only turn host callbacks into calls on the worker.

pub mod host;
pub mod metrics;
pub mod unusable_path;
pub mod worker;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod worker_journal_tests;
#[cfg(all(test, not(target_arch = "wasm32")))]
mod worker_ledger_props;
#[cfg(all(test, not(target_arch = "wasm32")))]
mod worker_props;
#[cfg(test)]
mod worker_refetch_tests;
#[cfg(test)]
mod worker_tests;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod abi;
#[cfg(all(target_arch = "wasm32", not(test)))]
mod http;
#[cfg(all(target_arch = "wasm32", not(test)))]
mod proxy;
#[cfg(all(target_arch = "wasm32", not(test)))]
mod root;

#[cfg(all(target_arch = "wasm32", not(test)))]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    // A panic traps the VM. `set_log_level` already installs the SDK's hook, which logs the
    // panic at critical level before the trap; Envoy then applies the plugin's failure_policy.
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::EmitterRoot::default())
    });
}}
