//! Delivery reports to the registry (docs/delivery-reports.md): every attempt's outcome goes into
//! this worker's batch (src/delivery/report.rs), and the batch leaves from the root context as
//! one `POST /v2/registry/reports` per flush (every `reportFlushMs`, or at once when it is full),
//! through the registry's cluster with the proxy token. A report is never retried: a batch the
//! registry does not take, or that finds two reports still out, is dropped, counted and logged
//! once, so reports hold no memory while the registry is down and never change a delivery.

use super::{Hooks, Worker, USER_AGENT};
use crate::config::{Plan, RegistrySettings};
use crate::delivery::report::{AttemptReport, Outcome, Push, ReportBatch, MAX_HOLDING};
use crate::delivery::{AttemptOutcome, Delivery, LaneId, Payload, Verdict};
use crate::filter::host::{log, Callout, Host, LogLevel};
use crate::headers;
use std::collections::BTreeSet;
use std::rc::Rc;

/// Reports out at once per worker; a batch that finds this many out waits, and is dropped when
/// the next one fills up behind it.
const MAX_REPORTS_OUT: usize = 2;
/// A report (or a claim) is cut off after this long.
pub(super) const REPORT_TIMEOUT_MS: u64 = 5_000;

/// What a delivery-log callout was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogRequest {
    /// A report, with the number of records it carried.
    Report {
        records: usize,
    },
    Claim,
}

/// The reports and claimed sends of one worker.
pub(super) struct DeliveryLog {
    /// `<node id>/<worker id>`: who holds a claimed send.
    pub(super) proxy: String,
    reports_path: String,
    pub(super) claim_path: String,
    flush_ms: u64,
    max_bytes: usize,
    max_envelope_bytes: usize,
    batch: ReportBatch,
    /// A full batch waiting for a report to come back.
    sealed: Option<ReportBatch>,
    out: usize,
    last_sent_ms: u64,
    /// Reports are failing: the first failure was logged; the recovery will be.
    failing: bool,
    pub(super) sends: Sends,
    /// The latest time seen, for records made where no clock is at hand.
    clock_ms: u64,
}

/// Sends asked for per claim.
pub(super) const CLAIM_MAX: usize = 16;
/// How often a worker claims when the feed does not say whether sends are pending.
pub(super) const SLOW_CLAIM_MS: u64 = 30_000;
/// The least time between two claims of one worker.
pub(super) const MIN_CLAIM_GAP_MS: u64 = 200;
/// How long a claimed send for a webhook this proxy does not know waits for its copy of the registry
/// to have it (the send was queued after the proxy's last poll).
pub(super) const UNMATCHED_GRACE_MS: u64 = 10_000;
/// The lease a claim answer without `leaseMs` is taken to give.
const DEFAULT_LEASE_MS: u64 = 60_000;

/// The claimed sends of one worker.
#[derive(Debug, Default)]
pub(super) struct Sends {
    /// Sends claimed and not finished: each report renews their leases.
    pub(super) holding: BTreeSet<u64>,
    /// What the feed's last page said about `pendingSends` (None: it does not say).
    pub(super) pending: Option<bool>,
    pub(super) claiming: bool,
    /// The last claim was answered with as many sends as asked: claim again at once.
    pub(super) again: bool,
    /// When the last claim left.
    pub(super) last_claim_ms: Option<u64>,
    pub(super) lease_ms: Option<u64>,
    /// Claims are failing: logged once until one goes through.
    pub(super) failing: bool,
    /// Claimed sends for a webhook not (yet) in this proxy's copy of the registry, with their
    /// deadlines (they are held meanwhile).
    pub(super) unmatched: Vec<(crate::delivery::send::ClaimedSend, u64)>,
}

impl Sends {
    /// A send's final attempt was reported: it is no longer held.
    pub(super) fn finished(&mut self, send_id: u64) {
        self.holding.remove(&send_id);
    }

    /// How often the leases of held sends are renewed (a third of the lease).
    pub(super) fn renew_every_ms(&self) -> u64 {
        (self.lease_ms.unwrap_or(DEFAULT_LEASE_MS) / 3).max(100)
    }

    /// The feed's page said whether unclaimed sends exist.
    pub(super) fn feed_says(&mut self, pending: Option<bool>) {
        self.pending = pending;
    }

    pub(super) fn claim_due(&self, now_ms: u64) -> bool {
        if self.claiming || self.holding.len() + CLAIM_MAX > MAX_HOLDING {
            return false;
        }
        let since = |gap: u64| self.last_claim_ms.is_none_or(|at| now_ms >= at + gap);
        match self.pending {
            Some(pending) => (pending || self.again) && since(MIN_CLAIM_GAP_MS),
            // A registry that does not say: a slow timer.
            None => since(SLOW_CLAIM_MS),
        }
    }
}

/// A delivery as its reports need it, taken before the outbox takes the delivery back.
pub(super) struct Trace {
    lane: LaneId,
    event_id: Rc<str>,
    payload: Rc<Payload>,
    attempt: u32,
    created_at_ms: u64,
    sent_at_ms: u64,
}

impl Trace {
    pub(super) fn of(d: &Delivery) -> Self {
        Trace {
            lane: d.lane,
            event_id: Rc::clone(&d.event_id),
            payload: Rc::clone(&d.payload),
            attempt: d.attempts,
            created_at_ms: d.created_at_ms,
            sent_at_ms: d.sent_at_ms,
        }
    }
}

/// The registry's path next to the feed's: `/v2/registry/changes` → `/v2/registry/<leaf>`.
fn sibling_path(feed_path: &str, leaf: &str) -> String {
    match feed_path.strip_suffix("/changes") {
        Some(base) => format!("{base}/{leaf}"),
        None => format!("/v2/registry/{leaf}"),
    }
}

impl DeliveryLog {
    /// The delivery log of a plan, when it has a registry with reports on.
    pub(super) fn open(plan: &Plan, proxy: String) -> Option<Self> {
        let registry = plan.registry.as_ref().filter(|r| r.reports)?;
        Some(DeliveryLog {
            proxy,
            reports_path: sibling_path(&registry.path, "reports"),
            claim_path: sibling_path(&registry.path, "sends/claim"),
            flush_ms: registry.report_flush_ms,
            max_bytes: registry.max_report_bytes,
            max_envelope_bytes: plan.delivery.max_body_bytes,
            batch: ReportBatch::new(registry.max_report_bytes, plan.delivery.max_body_bytes),
            sealed: None,
            out: 0,
            last_sent_ms: 0,
            failing: false,
            sends: Sends::default(),
            clock_ms: 0,
        })
    }

    /// The same log under a new plan: what it holds is kept, its settings follow the plan.
    pub(super) fn reopen(old: Option<Self>, plan: &Plan, worker_id: &str) -> Option<Self> {
        let proxy = old
            .as_ref()
            .map_or_else(|| format!("envoy/{worker_id}"), |o| o.proxy.clone());
        let mut new = Self::open(plan, proxy)?;
        if let Some(old) = old {
            new.clock_ms = old.clock_ms;
            new.batch = old.batch;
            new.sealed = old.sealed;
            new.out = old.out;
            new.last_sent_ms = old.last_sent_ms;
            new.failing = old.failing;
            new.sends = old.sends;
        }
        Some(new)
    }

    fn fresh_batch(&self) -> ReportBatch {
        ReportBatch::new(self.max_bytes, self.max_envelope_bytes)
    }
}

impl Worker {
    /// Names this worker in reports and claims as `<node>/<worker id>` (Envoy's node id).
    pub fn set_node(&mut self, node: &str) {
        // The registry takes names of at most 200 characters without control characters, and the same
        // name must go into claims and reports.
        let node: String = node.chars().filter(|c| !c.is_control()).take(180).collect();
        let proxy = format!("{node}/{}", self.id);
        if let Some(dlog) = self.delivery_log.as_mut() {
            dlog.proxy = proxy;
        }
    }

    /// Reports and claims due now, sent from the root context. Returns the callouts.
    pub fn delivery_log_poll(&mut self, host: &dyn Host, now_ms: u64) -> Vec<(u32, LogRequest)> {
        if self.delivery_log.is_none() {
            return Vec::new();
        }
        self.sends_rematch(host, now_ms);
        let report = self.report_flush(host, now_ms);
        let claim = self.sends_claim(host, now_ms);
        report.into_iter().chain(claim).collect()
    }

    /// The answer to a report or a claim (`body` only for a claim, when not too large).
    pub fn delivery_log_answer(
        &mut self,
        host: &dyn Host,
        request: LogRequest,
        status: Option<u16>,
        body: Option<&[u8]>,
        now_ms: u64,
    ) {
        match request {
            LogRequest::Report { records } => self.on_report_answer(host, records, status),
            LogRequest::Claim => self.on_claim_answer(host, status, body, now_ms),
        }
    }

    /// The outcome of a settled attempt, reported: delivered, retrying, failed for good, or (for
    /// a 410) failed and the webhook's queue dropped.
    pub(super) fn report_verdict(
        &mut self,
        host: &dyn Host,
        hooks: &Hooks,
        trace: Option<Trace>,
        answer: &AttemptOutcome,
        verdict: &Verdict,
        now_ms: u64,
    ) {
        let Some(trace) = trace else {
            return;
        };
        let outcome = match verdict {
            Verdict::Delivered { .. } => Outcome::Delivered,
            Verdict::Retry { .. } => Outcome::Retrying,
            Verdict::Exhausted(_) => Outcome::Failed,
            Verdict::Gone { dropped } => {
                // The first is the attempt that got the 410; the rest were queued behind it.
                for d in dropped.iter().skip(1) {
                    self.report_dropped(host, hooks, d, "webhook_gone", now_ms);
                }
                Outcome::Failed
            }
        };
        let Some(webhook_id) = lane_webhook(hooks, trace.lane) else {
            return;
        };
        self.report(host, &webhook_id, &trace, outcome, Some(answer), now_ms);
    }

    /// A trace of `d` for its report, when reports are on and `d` is a webhook's.
    pub(super) fn trace(&self, d: &Delivery) -> Option<Trace> {
        (self.delivery_log.is_some() && d.lane != LaneId::DeadLetter).then(|| Trace::of(d))
    }

    /// A delivery dropped without an answer (`reason` as the report says it).
    pub(super) fn report_dropped(
        &mut self,
        host: &dyn Host,
        hooks: &Hooks,
        d: &Delivery,
        reason: &str,
        now_ms: u64,
    ) {
        if self.delivery_log.is_none() {
            return;
        }
        if let Some(webhook_id) = lane_webhook(hooks, d.lane) {
            self.report_dropped_id(host, &webhook_id, d, reason, now_ms);
        }
    }

    /// The same for a webhook known by its id (its slot may be empty already).
    pub(super) fn report_dropped_id(
        &mut self,
        host: &dyn Host,
        webhook_id: &str,
        d: &Delivery,
        reason: &str,
        now_ms: u64,
    ) {
        if self.delivery_log.is_none() {
            return;
        }
        self.report(
            host,
            webhook_id,
            &Trace::of(d),
            Outcome::Dropped(reason),
            None,
            now_ms,
        );
    }

    /// The answer to an attempt whose webhook a new configuration removed while it was out.
    pub(super) fn report_orphan(
        &mut self,
        host: &dyn Host,
        webhook_id: &str,
        d: &Delivery,
        answer: &AttemptOutcome,
        now_ms: u64,
    ) {
        if self.delivery_log.is_none() {
            return;
        }
        let outcome = if answer.is_success() {
            Outcome::Delivered
        } else {
            Outcome::Dropped("webhook_removed")
        };
        self.report(
            host,
            webhook_id,
            &Trace::of(d),
            outcome,
            Some(answer),
            now_ms,
        );
    }

    /// Adds one record to the batch; a full batch is sealed for the next flush (and a sealed
    /// batch still waiting then is dropped).
    pub(super) fn report(
        &mut self,
        host: &dyn Host,
        webhook_id: &str,
        trace: &Trace,
        outcome: Outcome<'_>,
        answer: Option<&AttemptOutcome>,
        now_ms: u64,
    ) {
        let Some(dlog) = self.delivery_log.as_mut() else {
            return;
        };
        let now_ms = now_ms.max(dlog.clock_ms);
        dlog.clock_ms = now_ms;
        let report = AttemptReport {
            event_id: &trace.event_id,
            webhook_id,
            payload: &trace.payload,
            attempt: trace.attempt,
            at_ms: now_ms,
            created_at_ms: trace.created_at_ms,
            answer,
            latency_ms: answer.map(|_| now_ms.saturating_sub(trace.sent_at_ms)),
            outcome,
        };
        let finished_send = outcome
            .is_final()
            .then(|| trace.payload.claimed_send().map(|c| c.send_id))
            .flatten();
        if let Some(id) = finished_send {
            dlog.sends.finished(id);
            if outcome == Outcome::Delivered {
                self.metrics.sends_delivered.inc(host);
            }
        }
        if dlog.batch.push(&report) != Push::Full {
            return;
        }
        let fresh = dlog.fresh_batch();
        let full = std::mem::replace(&mut dlog.batch, fresh);
        let dropped = dlog.sealed.replace(full);
        dlog.batch.push(&report);
        if let Some(dropped) = dropped {
            self.reports_dropped(
                host,
                dropped.records(),
                "two reports are still out and the batches behind them are full",
            );
        }
    }

    /// Counts and logs (once, until reports go through again) a batch that was not taken.
    fn reports_dropped(&mut self, host: &dyn Host, records: usize, why: &str) {
        self.metrics.reports_dropped.inc(host);
        let Some(dlog) = self.delivery_log.as_mut() else {
            return;
        };
        if !dlog.failing {
            dlog.failing = true;
            log(host, LogLevel::Warn, || {
                format!("delivery report dropped ({why}): {records} records lost for the registry's delivery log, deliveries go on; further drops are counted in reports_dropped")
            });
        }
    }

    /// Sends the report when one is due: a sealed batch, a batch open for `reportFlushMs`, or
    /// the leases of held sends to renew. Returns the callout.
    pub(super) fn report_flush(
        &mut self,
        host: &dyn Host,
        now_ms: u64,
    ) -> Option<(u32, LogRequest)> {
        let plan = Rc::clone(&self.plan);
        let settings = plan.registry.as_ref()?;
        let dlog = self.delivery_log.as_mut()?;
        let open_due = dlog
            .batch
            .opened_ms()
            .is_some_and(|at| now_ms.saturating_sub(at) >= dlog.flush_ms);
        let renew_due = !dlog.sends.holding.is_empty()
            && now_ms.saturating_sub(dlog.last_sent_ms) >= dlog.sends.renew_every_ms();
        if dlog.out >= MAX_REPORTS_OUT || !(dlog.sealed.is_some() || open_due || renew_due) {
            return None;
        }
        let batch = match dlog.sealed.take() {
            Some(sealed) => sealed,
            None => {
                let fresh = dlog.fresh_batch();
                std::mem::replace(&mut dlog.batch, fresh)
            }
        };
        let records = batch.records();
        let holding: Vec<u64> = dlog.sends.holding.iter().copied().collect();
        let body = batch.into_body(&dlog.proxy, &holding);
        dlog.last_sent_ms = now_ms;
        let path = dlog.reports_path.clone();
        match registry_post(host, settings, &path, &body) {
            Ok(token) => {
                dlog.out += 1;
                Some((token, LogRequest::Report { records }))
            }
            Err(why) => {
                self.reports_dropped(host, records, &why);
                None
            }
        }
    }

    /// A report's answer: 2xx taken; anything else drops the batch (counted, logged once).
    pub(super) fn on_report_answer(
        &mut self,
        host: &dyn Host,
        records: usize,
        status: Option<u16>,
    ) {
        let Some(dlog) = self.delivery_log.as_mut() else {
            return;
        };
        dlog.out = dlog.out.saturating_sub(1);
        match status {
            Some(code) if (200..300).contains(&code) => {
                self.metrics.reports_sent.inc(host);
                if dlog.failing {
                    dlog.failing = false;
                    log(host, LogLevel::Info, || {
                        "delivery reports reach the registry again".to_string()
                    });
                }
            }
            Some(code) => {
                self.reports_dropped(host, records, &format!("the registry answered {code}"))
            }
            None => self.reports_dropped(host, records, "no answer from the registry"),
        }
    }
}

/// The webhook id of a lane.
fn lane_webhook(hooks: &Hooks, lane: LaneId) -> Option<String> {
    match lane {
        LaneId::Webhook(i) => hooks.get(i).map(|w| w.id.clone()),
        LaneId::DeadLetter => None,
    }
}

/// A POST to the registry with the proxy token.
pub(super) fn registry_post(
    host: &dyn Host,
    settings: &RegistrySettings,
    path: &str,
    body: &[u8],
) -> Result<u32, String> {
    let authorization = format!("Bearer {}", settings.token);
    host.dispatch(Callout {
        cluster: &settings.cluster,
        headers: vec![
            (headers::METHOD, "POST"),
            (headers::PATH, path),
            (headers::AUTHORITY, settings.authority.as_str()),
            (headers::SCHEME, "http"),
            (headers::CONTENT_TYPE, "application/json"),
            (headers::USER_AGENT, USER_AGENT),
            (headers::AUTHORIZATION, authorization.as_str()),
        ],
        body,
        timeout_ms: REPORT_TIMEOUT_MS,
    })
    .map_err(|refused| refused.reason(&settings.cluster))
}
