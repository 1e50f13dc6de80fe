//! The root context: one per worker thread. It owns the worker (plan and outbox) and sends every
//! callout, because the SDK routes a callout's answer to the context that sent it, and drops it
//! once a stream's context is gone.

use super::abi::{self, BufferType, HeaderMap};
use super::host::{Host, LogLevel};
use super::http::EmitterStream;
use super::proxy::{now_ms, random_bytes, ProxyHost};
use super::worker::{Attempt, LogRequest, RegistryAnswer, SharedWorker, Worker};
use crate::config::Plan;
use crate::delivery::AttemptOutcome;
use crate::headers;
use crate::journal::Purpose as JournalRequest;
use crate::refetch::{RefetchAnswer, RefetchJob};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

/// Retries and probes are driven by this tick; new events wake the root at once (the doorbell).
const TICK: Duration = Duration::from_millis(50);
/// A journal answer larger than this is not read (a claim batch of the largest records fits).
const MAX_JOURNAL_ANSWER_BYTES: usize = 32 << 20;
/// A claim answer larger than this is not read (the registry keeps them well under 64 KiB).
const MAX_CLAIM_ANSWER_BYTES: usize = 1 << 20;

thread_local! {
    /// This thread's worker of each plugin (by plugin name). A new configuration arrives as a new
    /// root context in the same VM; it adopts the worker, so queued deliveries survive it.
    static WORKERS: RefCell<HashMap<String, Weak<RefCell<Worker>>>> = RefCell::new(HashMap::new());
}

/// What a callout was for: a delivery attempt, a registry poll, a request to the journal's
/// etcd, or the refetch of a completion whose answer was cut short.
enum Out {
    Delivery(Attempt),
    RegistryPoll,
    Journal(JournalRequest),
    /// A delivery report or a claim of queued sends.
    DeliveryLog(LogRequest),
    Refetch(RefetchJob),
}

#[derive(Default)]
pub struct EmitterRoot {
    worker: Option<SharedWorker>,
    /// Callouts out, by token.
    callouts: HashMap<u32, Out>,
    /// Envoy asked this root to finish (`on_done`) while callouts were still out.
    draining: bool,
}

impl EmitterRoot {
    fn plugin_name() -> String {
        abi::property(&["plugin_name"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn register_doorbell() -> Option<u32> {
        let suffix: String = random_bytes::<8>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let doorbell =
            hostcalls::register_shared_queue(&format!("webhook_emitter.doorbell.{suffix}")).ok();
        if doorbell.is_none() {
            ProxyHost.log(
                LogLevel::Warn,
                "could not register the doorbell queue; deliveries start on the next tick",
            );
        }
        doorbell
    }

    fn configure(&mut self, plan: Plan) {
        let key = Self::plugin_name();
        let existing = self
            .worker
            .clone()
            .or_else(|| WORKERS.with(|w| w.borrow().get(&key).and_then(Weak::upgrade)));
        let worker = match existing {
            Some(worker) => {
                let mut w = worker.borrow_mut();
                // The doorbell wakes the root context that registered it: take it over.
                w.set_doorbell(Self::register_doorbell());
                w.adopt(&ProxyHost, plan);
                drop(w);
                worker
            }
            None => {
                let id: String = random_bytes::<8>()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let mut worker = Worker::new(&ProxyHost, plan, Self::register_doorbell(), &key, id);
                if let Some(node) = abi::property(&["node", "id"]).filter(|n| !n.is_empty()) {
                    worker.set_node(&String::from_utf8_lossy(&node));
                }
                Rc::new(RefCell::new(worker))
            }
        };
        WORKERS.with(|w| w.borrow_mut().insert(key, Rc::downgrade(&worker)));
        self.worker = Some(worker);
        self.set_tick_period(TICK);
    }

    /// Sends every delivery that is due. A draining root only collects its answers: the root
    /// that adopted the worker (if any) sends what is still queued.
    fn pump(&mut self) {
        let Some(worker) = self.worker.clone().filter(|_| !self.draining) else {
            return;
        };
        let sent = worker.borrow_mut().pump(&ProxyHost, now_ms());
        self.callouts
            .extend(sent.into_iter().map(|(t, a)| (t, Out::Delivery(a))));
        let journal = worker.borrow_mut().journal_poll(&ProxyHost, now_ms());
        self.callouts
            .extend(journal.into_iter().map(|(t, r)| (t, Out::Journal(r))));
        let log = worker.borrow_mut().delivery_log_poll(&ProxyHost, now_ms());
        self.callouts
            .extend(log.into_iter().map(|(t, r)| (t, Out::DeliveryLog(r))));
        let refetches = worker.borrow_mut().refetch_pump(&ProxyHost, now_ms());
        self.callouts
            .extend(refetches.into_iter().map(|(t, j)| (t, Out::Refetch(j))));
    }
}

/// A refetch's answer, read as bytes: at most one byte past `max_body_bytes` of its body (more
/// is too large either way).
fn refetch_answer(header_count: usize, body_size: usize, max_body_bytes: usize) -> RefetchAnswer {
    let map = (header_count > 0)
        .then(|| abi::header_map(HeaderMap::CalloutResponse))
        .flatten();
    let pairs = map.as_deref().and_then(headers::parse_map);
    let Some(pairs) = pairs else {
        return RefetchAnswer::Failed("no answer (connection reset or timeout)".into());
    };
    let Some(code) = headers::first(&pairs, headers::STATUS).and_then(headers::parse_status) else {
        return RefetchAnswer::Failed("answer without a valid :status".into());
    };
    let content_encoding = headers::first(&pairs, headers::CONTENT_ENCODING)
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let wanted = body_size.min(max_body_bytes.saturating_add(1));
    let body = if wanted > 0 {
        abi::buffer(BufferType::CalloutResponseBody, 0, wanted).unwrap_or_default()
    } else {
        Vec::new()
    };
    RefetchAnswer::Status {
        code,
        content_encoding,
        body,
    }
}

/// A registry poll's answer, read as bytes; a callout that failed has no headers to read.
fn registry_answer(header_count: usize, body_size: usize) -> RegistryAnswer {
    let map = (header_count > 0)
        .then(|| abi::header_map(HeaderMap::CalloutResponse))
        .flatten();
    let pairs = map.as_deref().and_then(headers::parse_map);
    let Some(pairs) = pairs else {
        return RegistryAnswer::Failed(callout_failure());
    };
    let Some(code) = headers::first(&pairs, headers::STATUS).and_then(headers::parse_status) else {
        return RegistryAnswer::Failed("answer without a valid :status".into());
    };
    let body = if body_size > 0 {
        abi::buffer(BufferType::CalloutResponseBody, 0, body_size).unwrap_or_default()
    } else {
        Vec::new()
    };
    RegistryAnswer::Status { code, body }
}

/// Why a callout ended without an answer, as Envoy says it (`proxy_get_status` in the answer's
/// callback): an answer over `http.async_response_buffer_limit` is not a reset.
fn callout_failure() -> String {
    match abi::call_status() {
        Some((_, message)) if message.contains("buffer limit") || message.contains("too large") => {
            format!("the answer is over this Envoy's callout answer limit (runtime http.async_response_buffer_limit; Envoy: {message:?})")
        }
        Some((_, message)) if !message.is_empty() => {
            format!("no answer (Envoy: {message:?})")
        }
        _ => "no answer (connection reset or timeout)".into(),
    }
}

impl Context for EmitterRoot {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _trailers: usize) {
        let Some(out) = self.callouts.remove(&token) else {
            return;
        };
        let Some(worker) = self.worker.clone() else {
            return;
        };
        if let Out::Refetch(job) = out {
            let answer = refetch_answer(headers, body, job.plan.delivery.max_body_bytes);
            worker
                .borrow_mut()
                .on_refetch_answer(&ProxyHost, job, answer, now_ms());
            if self.draining && self.callouts.is_empty() {
                self.done();
            } else {
                self.pump();
            }
            return;
        }
        if let Out::RegistryPoll = out {
            let answer = registry_answer(headers, body);
            let mut w = worker.borrow_mut();
            w.on_registry_answer(&ProxyHost, answer, now_ms());
            // While the feed has more pages, the next is asked for at once.
            if !self.draining {
                if let Some(token) = w.registry_poll(&ProxyHost, now_ms()) {
                    self.callouts.insert(token, Out::RegistryPoll);
                }
            }
            drop(w);
            if self.draining && self.callouts.is_empty() {
                self.done();
            } else {
                self.pump();
            }
            return;
        }
        // The answer's headers are read as bytes, and only when Envoy says there are some: a
        // callout that failed before or instead of its headers has none to read.
        let map = (headers > 0)
            .then(|| abi::header_map(HeaderMap::CalloutResponse))
            .flatten();
        let pairs = map.as_deref().and_then(headers::parse_map);
        let outcome = AttemptOutcome::from_answer(headers, pairs.as_deref());
        match out {
            Out::Delivery(attempt) => {
                worker
                    .borrow_mut()
                    .on_answer(&ProxyHost, attempt, &outcome, now_ms())
            }
            Out::RegistryPoll | Out::Refetch(_) => {}
            Out::DeliveryLog(request) => {
                let status = match outcome {
                    AttemptOutcome::Status { code, .. } => Some(code),
                    AttemptOutcome::NoResponse { .. } => None,
                };
                let answer = match body {
                    _ if request != LogRequest::Claim || body > MAX_CLAIM_ANSWER_BYTES => None,
                    0 => Some(Vec::new()),
                    _ => abi::buffer(BufferType::CalloutResponseBody, 0, body),
                };
                worker.borrow_mut().delivery_log_answer(
                    &ProxyHost,
                    request,
                    status,
                    answer.as_deref(),
                    now_ms(),
                );
            }
            Out::Journal(request) => {
                let status = match outcome {
                    AttemptOutcome::Status { code, .. } => Some(code),
                    AttemptOutcome::NoResponse { .. } => None,
                };
                let answer = (body <= MAX_JOURNAL_ANSWER_BYTES)
                    .then(|| abi::buffer(BufferType::CalloutResponseBody, 0, body))
                    .flatten();
                worker.borrow_mut().journal_answer(
                    &ProxyHost,
                    request,
                    status,
                    answer.as_deref(),
                    now_ms(),
                );
            }
        }
        if self.draining && self.callouts.is_empty() {
            self.done();
        } else {
            self.pump();
        }
    }

    fn on_done(&mut self) -> bool {
        // Answers to callouts come back to this context only: stay until they are in.
        self.draining = true;
        self.callouts.is_empty()
    }
}

impl RootContext for EmitterRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        // Counted on every VM start, so that a VM reloaded after a trap shows as one more.
        super::metrics::Metrics::define(&ProxyHost)
            .vm_starts
            .inc(&ProxyHost);
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(json) = abi::buffer(BufferType::PluginConfiguration, 0, usize::MAX) else {
            ProxyHost.log(LogLevel::Error, "configuration rejected: configuration: missing (the plugin needs its JSON configuration)");
            return false;
        };
        match Plan::from_json(&json, &|name| std::env::var(name).ok()) {
            Ok(plan) => {
                ProxyHost.log(
                    LogLevel::Info,
                    &format!(
                        "configured: {} event rules, {} webhooks",
                        plan.rules.len(),
                        plan.webhooks.len()
                    ),
                );
                self.configure(plan);
                true
            }
            Err(errors) => {
                for e in &errors {
                    ProxyHost.log(LogLevel::Error, &format!("configuration rejected: {e}"));
                }
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(worker) = self.worker.clone().filter(|_| !self.draining) {
            let now = now_ms();
            let mut w = worker.borrow_mut();
            w.tick(&ProxyHost, now);
            if let Some(token) = w.registry_poll(&ProxyHost, now) {
                self.callouts.insert(token, Out::RegistryPoll);
            }
        }
        self.pump();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        abi::drain_queue(queue_id);
        if let Some(worker) = &self.worker {
            worker.borrow_mut().doorbell_answered();
        }
        self.pump();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: the SDK treats a missing HTTP context as a bug.
        Some(Box::new(EmitterStream::new(self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
