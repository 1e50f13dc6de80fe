//! webhook-emitter: an Envoy proxy-wasm filter that turns upstream "job completed" responses
//! into signed Standard Webhooks deliveries.
//!
//! Data flows one way: request facts and the response ([`stream`], using [`rules`]) → an event
//! ([`event`]) → the outbox ([`delivery`]) → attempts, sent and settled by the glue ([`filter`]).
//! Everything but `filter` is the pure core: no host calls, clock and randomness passed in.

pub mod body;
pub mod config;
pub mod delivery;
pub mod event;
pub mod filter;
pub mod gate;
pub mod headers;
pub mod journal;
pub mod json;
pub mod path;
pub mod refetch;
// The webhook registry service: native only, nothing of it in the .wasm.
#[cfg(not(target_arch = "wasm32"))]
pub mod registry;
pub mod registry_sync;
pub mod rules;
pub mod signature;
pub mod stream;
pub mod time;
pub mod url;
