//! A proxy-wasm filter that does (almost) nothing, to measure what Envoy's wasm host charges, whatever the filter:
//! * `"noop"`: every callback returns at once (the floor of any proxy-wasm filter, per stream);
//! * `"headers"`: also reads `:method` and `:path` on the request headers, as webhook-emitter does on every stream;
//! * `"metrics:N"`: also makes N `increment_metric(id, 0)` host calls on the request headers (the price of one
//!   host call, the cheapest there is, is then the difference with `"noop"` divided by N);
//! * `"callout-root CLUSTER AUTHORITY PATH"`: at the end of each response, rings a shared-queue doorbell; the root
//!   context dequeues it and sends one callout (the bare Lua callout's 5 headers and 374-byte body), and reads the
//!   answer's `:status`: the floor of a proxy-wasm filter that delivers the way webhook-emitter does;
//! * `"callout-stream CLUSTER AUTHORITY PATH"`: the same callout sent from the stream's own context, no doorbell
//!   (Envoy owns the callout in the root context either way; the SDK drops an answer whose stream is gone);
//! * `"callout-host CLUSTER AUTHORITY PATH"`: `callout-root`, plus the host calls webhook-emitter makes for an
//!   event besides its callout: both header maps read whole, the body read, the clock read three times, eight
//!   random bytes, eight counter increments (what is left of an event's cost is the filter's own code).

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Callout {
    from_root: bool,
    host_calls: bool,
    cluster: String,
    authority: String,
    path: String,
}

#[derive(Default, Clone)]
struct Mode {
    read_headers: bool,
    metric_calls: u32,
    metric: u32,
    callout: Option<Callout>,
    doorbell: u32,
}

#[derive(Default)]
struct Root {
    mode: Mode,
}

fn body() -> Vec<u8> {
    let mut b = br#"{"id":"0000000000000000000000000","data":""#.to_vec();
    b.extend(std::iter::repeat_n(b'x', 330));
    b.extend(br#""}"#);
    b
}

fn send(c: &Callout) {
    let headers = vec![
        (":method", "POST"),
        (":path", c.path.as_str()),
        (":authority", c.authority.as_str()),
        ("content-type", "application/json"),
        ("webhook-id", "000000000000000000000000"),
    ];
    let _ = hostcalls::dispatch_http_call(
        &c.cluster,
        headers,
        Some(&body()),
        vec![],
        Duration::from_secs(5),
    );
}

fn read_status() {
    std::hint::black_box(hostcalls::get_map_value_bytes(
        MapType::HttpCallResponseHeaders,
        ":status",
    ))
    .ok();
}

impl Context for Root {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        read_status();
    }
}

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
        let words: Vec<&str> = config.split(' ').collect();
        if let ["callout-root" | "callout-stream" | "callout-host", cluster, authority, path] = words[..] {
            self.mode.metric =
                hostcalls::define_metric(MetricType::Counter, "noop.calls").unwrap_or(0);
            self.mode.callout = Some(Callout {
                from_root: words[0] != "callout-stream",
                host_calls: words[0] == "callout-host",
                cluster: cluster.into(),
                authority: authority.into(),
                path: path.into(),
            });
            // A name of this VM's own: the main thread's root registers one too.
            let nanos = hostcalls::get_current_time()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            self.mode.doorbell =
                hostcalls::register_shared_queue(&format!("noop.doorbell.{nanos}")).unwrap_or(0);
        }
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {
            if let Some(c) = &self.mode.callout {
                send(c);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            mode: self.mode.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    mode: Mode,
}

impl Stream {
    fn host_calls(&self) -> bool {
        self.mode.callout.as_ref().is_some_and(|c| c.host_calls)
    }

    fn respond_ended(&self) {
        if self.host_calls() {
            for _ in 0..3 {
                std::hint::black_box(hostcalls::get_current_time()).ok();
            }
            let mut random = [0u8; 8];
            std::hint::black_box(getrandom_bytes(&mut random));
            for _ in 0..8 {
                let _ = hostcalls::increment_metric(self.mode.metric, 1);
            }
        }
        match &self.mode.callout {
            Some(c) if c.from_root => {
                let _ = hostcalls::enqueue_shared_queue(self.mode.doorbell, Some(b"1"));
            }
            Some(c) => send(c),
            None => {}
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        read_status();
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if self.host_calls() {
            std::hint::black_box(hostcalls::get_map_bytes(MapType::HttpRequestHeaders)).ok();
        }
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

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.host_calls() {
            std::hint::black_box(hostcalls::get_map_bytes(MapType::HttpResponseHeaders)).ok();
        }
        if end_of_stream {
            self.respond_ended();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.host_calls() && size > 0 {
            std::hint::black_box(hostcalls::get_buffer(
                proxy_wasm::types::BufferType::HttpResponseBody,
                0,
                size,
            ))
            .ok();
        }
        if end_of_stream {
            self.respond_ended();
        }
        Action::Continue
    }
}

/// WASI's random_get, as getrandom calls it, without the dependency.
fn getrandom_bytes(buf: &mut [u8]) -> bool {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        fn random_get(buf: *mut u8, len: usize) -> u16;
    }
    // SAFETY: the buffer is valid for its length.
    unsafe { random_get(buf.as_mut_ptr(), buf.len()) == 0 }
}
