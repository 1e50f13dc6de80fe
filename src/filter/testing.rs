//! A test double of the host that records what the glue asks of it and answers as told.

use super::host::{Callout, DispatchRefused, Host, LogLevel, MetricKind};
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct SentCallout {
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Default)]
pub struct FakeHost {
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    metric_names: RefCell<Vec<String>>,
    pub metric_values: RefCell<HashMap<String, i64>>,
    pub sent: RefCell<Vec<SentCallout>>,
    /// When set, every dispatch is refused with this.
    pub refuse: RefCell<Option<DispatchRefused>>,
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Reads of shared data, by key.
    pub shared_reads: RefCell<HashMap<String, u32>>,
    next_token: RefCell<u32>,
    pub wakes: RefCell<u32>,
}

/// The rule the glue's tests run: `job.completed` on `POST /jobs/{jobId}/complete`, 200, with the
/// organisation from the `x-organisation-id` header.
pub fn job_completed_rule() -> serde_json::Value {
    serde_json::json!({
        "type": "job.completed",
        "objectType": "job",
        "match": {"methods": ["POST"], "path": "/jobs/{jobId}/complete", "status": [200]},
        "when": [{"pointer": "/status", "equals": "completed"}],
        "object": "",
        "organisationId": {"header": "x-organisation-id"}
    })
}

pub const SIGNING_KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

impl FakeHost {
    pub fn metric(&self, name: &str) -> i64 {
        self.metric_values
            .borrow()
            .get(&format!("webhook_emitter.{name}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn logged(&self, level: LogLevel, needle: &str) -> usize {
        self.logs
            .borrow()
            .iter()
            .filter(|(l, m)| *l == level && m.contains(needle))
            .count()
    }

    pub fn take_sent(&self) -> Vec<SentCallout> {
        std::mem::take(&mut self.sent.borrow_mut())
    }
}

impl Host for FakeHost {
    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
    fn log_enabled(&self, _level: LogLevel) -> bool {
        true
    }
    fn define_metric(&self, _kind: MetricKind, name: &str) -> Option<u32> {
        let mut names = self.metric_names.borrow_mut();
        names.push(name.to_string());
        Some(names.len() as u32 - 1)
    }
    fn add_metric(&self, id: u32, delta: i64) {
        let name = self.metric_names.borrow()[id as usize].clone();
        *self.metric_values.borrow_mut().entry(name).or_default() += delta;
    }
    fn record_metric(&self, id: u32, _value: u64) {
        self.add_metric(id, 1);
    }
    fn random_u32(&self) -> u32 {
        200
    }
    fn dispatch(&self, callout: Callout<'_>) -> Result<u32, DispatchRefused> {
        if let Some(refused) = *self.refuse.borrow() {
            return Err(refused);
        }
        self.sent.borrow_mut().push(SentCallout {
            cluster: callout.cluster.to_string(),
            headers: callout
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: callout.body.to_vec(),
        });
        let mut token = self.next_token.borrow_mut();
        *token += 1;
        Ok(*token)
    }
    fn wake(&self, _queue: u32) -> bool {
        *self.wakes.borrow_mut() += 1;
        true
    }
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        *self
            .shared_reads
            .borrow_mut()
            .entry(key.to_string())
            .or_default() += 1;
        self.shared.borrow().get(key).cloned()
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> bool {
        let mut shared = self.shared.borrow_mut();
        let current = shared.get(key).map_or(0, |(_, c)| *c);
        if cas != 0 && cas != current {
            return false;
        }
        shared.insert(key.to_string(), (value.to_vec(), current + 1));
        true
    }
}
