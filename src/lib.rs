//! webhook-emitter: an Envoy proxy-wasm filter that turns upstream "job completed" responses
//! into signed Standard Webhooks deliveries.
//!
//! Everything but `filter` is the pure core: no host calls, clock and randomness passed in.

pub mod body;
pub mod config;
pub mod delivery;
pub mod event;
// The webhook registry service: native only, nothing of it in the .wasm.
#[cfg(not(target_arch = "wasm32"))]
pub mod registry;
pub mod rules;
pub mod signature;
pub mod url;

// The host glue; left out of test builds so the core's tests run in a plain wasm engine too.
#[cfg(all(target_arch = "wasm32", not(test)))]
mod filter;
