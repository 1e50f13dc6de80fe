//! The root context: one per worker thread. It owns the worker (plan and outbox) and sends every
//! callout, because the SDK routes a callout's answer to the context that sent it, and drops it
//! once a stream's context is gone.

use super::abi::{self, BufferType, HeaderMap};
use super::host::{Host, LogLevel};
use super::http::EmitterStream;
use super::proxy::{now_ms, random_bytes, ProxyHost};
use super::worker::{Attempt, RegistryAnswer, SharedWorker, Worker};
use crate::config::Plan;
use crate::delivery::policy::honours_retry_after;
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
                Rc::new(RefCell::new(Worker::new(
                    &ProxyHost,
                    plan,
                    Self::register_doorbell(),
                    &key,
                    id,
                )))
            }
        };
        WORKERS.with(|w| w.borrow_mut().insert(key, Rc::downgrade(&worker)));
        self.worker = Some(worker);
        self.set_tick_period(TICK);
    }

    /// Sends every delivery that is due. A draining root only collects its answers: the root
    /// that adopted the worker (if any) sends what is still queued.
    /// `now` is the callback's clock reading: one host call per callback, not one per step.
    fn pump(&mut self, now: u64) {
        let Some(worker) = self.worker.clone().filter(|_| !self.draining) else {
            return;
        };
        let sent = worker.borrow_mut().pump(&ProxyHost, now);
        self.callouts
            .extend(sent.into_iter().map(|(t, a)| (t, Out::Delivery(a))));
        let journal = worker.borrow_mut().journal_poll(&ProxyHost, now);
        self.callouts
            .extend(journal.into_iter().map(|(t, r)| (t, Out::Journal(r))));
        let refetches = worker.borrow_mut().refetch_pump(&ProxyHost, now);
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

/// Why a callout ended without an answer, from Envoy's status in the answer's callback
/// (`proxy_get_status`). Envoy says "reset" both for an answer over the callout answer limit
/// (runtime `http.async_response_buffer_limit`) and for a connection cut mid-answer; a refused
/// connection or a timeout is not this, but an answer (503, 504) from Envoy itself.
fn callout_failure() -> String {
    match abi::call_status() {
        Some((_, message)) if message == "reset" => "the answer was reset before its end (Envoy: \"reset\"): over this Envoy's callout answer limit (runtime http.async_response_buffer_limit, 64 KiB as shipped), or the connection was cut mid-answer".into(),
        Some((_, message)) if !message.is_empty() => format!("no answer (Envoy: {message:?})"),
        _ => "no answer (the callout ended without one)".into(),
    }
}

/// What an answer says, from the two headers that matter. They are read as bytes, one value at a
/// time (not the whole map), and only when Envoy says there are headers: a callout that failed
/// before or instead of its headers has none to read. `retry-after` is read only for a status
/// that honours it.
fn attempt_outcome(header_count: usize) -> AttemptOutcome {
    if header_count == 0 {
        return AttemptOutcome::from_answer(0, None);
    }
    let status = match abi::header_value(HeaderMap::CalloutResponse, headers::STATUS) {
        None => return AttemptOutcome::from_answer(header_count, None),
        Some(None) => return AttemptOutcome::from_answer(header_count, Some(&[])),
        Some(Some(status)) => status,
    };
    let retry_after = headers::parse_status(&status)
        .filter(|&code| honours_retry_after(code))
        .and_then(|_| abi::header_value(HeaderMap::CalloutResponse, headers::RETRY_AFTER))
        .flatten();
    let mut pairs: Vec<(&[u8], &[u8])> = vec![(headers::STATUS.as_bytes(), &status)];
    if let Some(value) = &retry_after {
        pairs.push((headers::RETRY_AFTER.as_bytes(), value));
    }
    AttemptOutcome::from_answer(header_count, Some(&pairs))
}

impl Context for EmitterRoot {
    fn on_http_call_response(&mut self, token: u32, headers: usize, body: usize, _trailers: usize) {
        let Some(out) = self.callouts.remove(&token) else {
            return;
        };
        let Some(worker) = self.worker.clone() else {
            return;
        };
        let now = now_ms();
        if let Out::Refetch(job) = out {
            let answer = refetch_answer(headers, body, job.plan.delivery.max_body_bytes);
            worker
                .borrow_mut()
                .on_refetch_answer(&ProxyHost, job, answer, now);
            if self.draining && self.callouts.is_empty() {
                self.done();
            } else {
                self.pump(now);
            }
            return;
        }
        if let Out::RegistryPoll = out {
            let answer = registry_answer(headers, body);
            let mut w = worker.borrow_mut();
            w.on_registry_answer(&ProxyHost, answer, now);
            // While the feed has more pages, the next is asked for at once.
            if !self.draining {
                if let Some(token) = w.registry_poll(&ProxyHost, now) {
                    self.callouts.insert(token, Out::RegistryPoll);
                }
            }
            drop(w);
            if self.draining && self.callouts.is_empty() {
                self.done();
            } else {
                self.pump(now);
            }
            return;
        }
        let outcome = attempt_outcome(headers);
        match out {
            Out::Delivery(attempt) => worker
                .borrow_mut()
                .on_answer(&ProxyHost, attempt, &outcome, now),
            Out::RegistryPoll | Out::Refetch(_) => {}
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
                    now,
                );
            }
        }
        if self.draining && self.callouts.is_empty() {
            self.done();
        } else {
            self.pump(now);
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
        let now = now_ms();
        if let Some(worker) = self.worker.clone().filter(|_| !self.draining) {
            let mut w = worker.borrow_mut();
            w.tick(&ProxyHost, now);
            if let Some(token) = w.registry_poll(&ProxyHost, now) {
                self.callouts.insert(token, Out::RegistryPoll);
            }
        }
        self.pump(now);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        abi::drain_queue(queue_id);
        if let Some(worker) = &self.worker {
            worker.borrow_mut().doorbell_answered();
        }
        self.pump(now_ms());
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: the SDK treats a missing HTTP context as a bug.
        Some(Box::new(EmitterStream::new(self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
