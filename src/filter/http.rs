//! The HTTP context: one per stream. It hands what Envoy shows of the stream to the core's
//! pipeline ([`crate::stream::Stream`]) and what the pipeline produces to the worker. Every
//! callback returns `Continue`: the client's answer is never paused or changed.
//!
//! Envoy calls `on_log` (and `on_done`) at the end of every stream, a reset one included: a
//! candidate that has not finished by then was cut short, and goes to the worker with what Envoy
//! says of the end (`response.code_details`) and of the route (`xds.cluster_name`).

use super::abi::{self, BufferType, HeaderMap};
use super::proxy::{now_ms, random_bytes, ProxyHost};
use super::worker::{SharedWorker, StreamEnd};
use crate::config::Plan;
use crate::stream::{header_pairs, Stream};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct EmitterStream {
    worker: Option<SharedWorker>,
    /// The plan this stream was matched against, even if a new configuration arrives mid-stream.
    plan: Option<Rc<Plan>>,
    stream: Stream,
}

impl EmitterStream {
    pub fn new(worker: Option<SharedWorker>) -> Self {
        let plan = worker.as_ref().map(|w| Rc::clone(w.borrow().plan()));
        EmitterStream {
            worker,
            plan,
            stream: Stream::new(),
        }
    }

    fn finish(&mut self) {
        let (Some(worker), Some(plan)) = (&self.worker, &self.plan) else {
            return;
        };
        let now = now_ms();
        for outcome in self.stream.finish(plan, now, random_bytes::<8>) {
            worker
                .borrow_mut()
                .on_stream_outcome(&ProxyHost, outcome, now);
        }
    }

    /// The stream is over: a candidate that did not finish is reported as cut.
    fn ended(&mut self) {
        if let (Some(why), Some(worker)) = (self.stream.skipped(), &self.worker) {
            worker.borrow().report_no_event(&ProxyHost, &why);
        }
        let cuts = self.stream.ended_early();
        if cuts.is_empty() {
            return;
        }
        let (Some(worker), Some(plan)) = (&self.worker, &self.plan) else {
            return;
        };
        let text = |path: &[&str]| {
            abi::property(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .filter(|s| !s.is_empty())
        };
        let details = text(&["response", "code_details"]);
        let cluster = text(&["xds", "cluster_name"]);
        let end = StreamEnd {
            details: details.as_deref().unwrap_or("no details"),
            route_cluster: cluster.as_deref(),
        };
        worker.borrow_mut().on_stream_cut(
            &ProxyHost,
            plan,
            cuts,
            &end,
            now_ms(),
            random_bytes::<8>,
        );
    }
}

impl Context for EmitterStream {
    fn on_done(&mut self) -> bool {
        self.ended();
        true
    }
}

impl HttpContext for EmitterStream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let Some(plan) = &self.plan {
            let map = abi::header_map(HeaderMap::Request).unwrap_or_default();
            let unusable = self.stream.on_request_headers(plan, &header_pairs(&map));
            if let (Some(unusable), Some(worker)) = (unusable, &self.worker) {
                worker
                    .borrow()
                    .on_unusable_path(&ProxyHost, &unusable, now_ms());
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        // A stream no rule matched does not copy its response headers out of Envoy.
        if !self.stream.is_candidate() {
            return Action::Continue;
        }
        if let Some(plan) = &self.plan {
            let map = abi::header_map(HeaderMap::Response).unwrap_or_default();
            if self.stream.on_response_headers(plan, &header_pairs(&map)) && end_of_stream {
                self.finish();
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.stream.is_collecting() {
            return Action::Continue;
        }
        let (Some(worker), Some(plan)) = (&self.worker, &self.plan) else {
            return Action::Continue;
        };
        // Each call sees only the new chunk, because every call returns Continue.
        let chunk = if body_size > 0 {
            abi::buffer(BufferType::HttpResponseBody, 0, body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        if let Some(why) = self.stream.on_response_body(plan, &chunk) {
            worker.borrow().report_no_event(&ProxyHost, &why);
        } else if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.finish();
        Action::Continue
    }

    fn on_log(&mut self) {
        self.ended();
    }
}
