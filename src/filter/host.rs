//! The host seam: the few things the glue asks of Envoy, behind a trait, so that the glue's
//! decisions (what an answer means, which log line and metric it makes, what happens next) are
//! unit-tested with a test double that answers as a hostile or broken host would.

/// Log levels, as proxy-wasm numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// Why Envoy refused to dispatch a callout, from the proxy-wasm status it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchRefused {
    /// BadArgument: the cluster is not known to this Envoy (or a pseudo-header is missing, which
    /// the filter never sends).
    BadArgument,
    /// InternalFailure: Envoy's async client ended the request before the call returned: no
    /// healthy host, a circuit-breaker overflow, or (with a bare dynamic_forward_proxy cluster) a
    /// host not yet resolved.
    InternalFailure,
    Other(u32),
}

impl DispatchRefused {
    /// The reason as a log line says it, pointing at what to check.
    pub fn reason(self, cluster: &str) -> String {
        match self {
            DispatchRefused::BadArgument => {
                format!("dispatch refused: cluster {cluster:?} is not defined in this Envoy (BadArgument)")
            }
            DispatchRefused::InternalFailure => format!(
                "dispatch refused: cluster {cluster:?} failed the callout at once: no healthy host, circuit breaker overflow, or host not resolved yet (InternalFailure)"
            ),
            DispatchRefused::Other(status) => {
                format!("dispatch refused: cluster {cluster:?} (proxy-wasm status {status})")
            }
        }
    }
}

/// One callout as the glue hands it to the host.
#[derive(Debug)]
pub struct Callout<'a> {
    pub cluster: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
    pub timeout_ms: u64,
}

pub trait Host {
    fn log(&self, level: LogLevel, message: &str);
    /// Whether a line at `level` would be written, so that none is formatted for nothing.
    fn log_enabled(&self, level: LogLevel) -> bool;
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn add_metric(&self, id: u32, delta: i64);
    fn record_metric(&self, id: u32, value: u64);
    /// Random bits for jitter.
    fn random_u32(&self) -> u32;
    /// Sends a callout; the token identifies its answer.
    fn dispatch(&self, callout: Callout<'_>) -> Result<u32, DispatchRefused>;
    /// Wakes this worker's root context (the doorbell queue). False when it could not.
    fn wake(&self, queue: u32) -> bool;
    /// Proxy-wide shared data (all workers of this Envoy): the value and its CAS token.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Sets shared data if `cas` still matches (0: unconditionally). False on a CAS mismatch or
    /// a host error.
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> bool;
}

/// Logs through `host` with the filter's prefix, formatting only when the level is on.
pub fn log(host: &dyn Host, level: LogLevel, message: impl FnOnce() -> String) {
    if level >= LogLevel::Info || host.log_enabled(level) {
        host.log(level, &message());
    }
}
