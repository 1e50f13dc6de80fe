//! A proxy-wasm filter that does (almost) nothing, to measure what Envoy's wasm host charges, whatever the filter:
//! * `"noop"`: every callback returns at once (the floor of any proxy-wasm filter, per stream);
//! * `"headers"`: also reads `:method` and `:path` on the request headers, as webhook-emitter does on every stream;
//! * `"metrics:N"`: also makes N `increment_metric(id, 0)` host calls on the request headers (the price of one
//!   host call, the cheapest there is, is then the difference with `"noop"` divided by N).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone, Copy)]
struct Mode {
    read_headers: bool,
    metric_calls: u32,
    metric: u32,
}

#[derive(Default)]
struct Root {
    mode: Mode,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        self.mode.read_headers = config == "headers";
        if let Some(n) = config.strip_prefix("metrics:") {
            self.mode.metric_calls = n.parse().unwrap_or(0);
            self.mode.metric =
                hostcalls::define_metric(MetricType::Counter, "noop.calls").unwrap_or(0);
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { mode: self.mode }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    mode: Mode,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.mode.read_headers {
            let method = self.get_http_request_header(":method");
            let path = self.get_http_request_header(":path");
            std::hint::black_box((method, path));
        }
        for _ in 0..self.mode.metric_calls {
            let _ = hostcalls::increment_metric(self.mode.metric, 0);
        }
        Action::Continue
    }
}
