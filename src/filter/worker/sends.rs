//! Sends the registry queued (resend, recover, test; docs/delivery-reports.md): claimed with
//! `POST /v2/registry/sends/claim` when the feed says `pendingSends` (or, from a registry whose
//! feed does not say, on a slow timer), and delivered like any delivery: queued in the outbox
//! with their exact bytes, signed at dispatch with the webhook's current key(s), retried on the
//! schedule and reported with their `sendId`. Each report lists the sends still held, which
//! renews their leases; a proxy that dies lets its leases run out, and another claims them.

use super::reports::{registry_post, LogRequest, Trace, CLAIM_MAX, UNMATCHED_GRACE_MS};
use super::Worker;
use crate::delivery::report::Outcome;
use crate::delivery::send::{claim_request, read_claim_answer, ClaimedSend};
use crate::delivery::{Delivery, LaneId, Payload};
use crate::filter::host::{log, Host, LogLevel};
use std::rc::Rc;

impl Worker {
    /// The feed's page said whether sends wait to be claimed.
    pub(super) fn sends_pending(&mut self, pending: Option<bool>) {
        if let Some(dlog) = self.delivery_log.as_mut() {
            dlog.sends.feed_says(pending);
        }
    }

    /// What a feed page would say about pending sends, without a page.
    #[cfg(test)]
    pub fn sends_pending_for_tests(&mut self, pending: Option<bool>) {
        self.sends_pending(pending);
    }

    /// Claims sends when the feed says some wait. Returns the callout.
    pub(super) fn sends_claim(
        &mut self,
        host: &dyn Host,
        now_ms: u64,
    ) -> Option<(u32, LogRequest)> {
        let plan = Rc::clone(&self.plan);
        let settings = plan.registry.as_ref()?;
        // A send names a webhook of the registry: claim once this proxy's copy is complete.
        let loaded = !self.waiting_for_registry();
        let dlog = self.delivery_log.as_mut()?;
        if !loaded || !dlog.sends.claim_due(now_ms) {
            return None;
        }
        dlog.sends.last_claim_ms = Some(now_ms);
        // The next page says again whether more wait.
        dlog.sends.pending = dlog.sends.pending.map(|_| false);
        dlog.sends.again = false;
        let body = claim_request(&dlog.proxy, CLAIM_MAX);
        match registry_post(host, settings, &dlog.claim_path.clone(), &body) {
            Ok(token) => {
                dlog.sends.claiming = true;
                Some((token, LogRequest::Claim))
            }
            Err(why) => {
                self.claim_failed(host, &why);
                None
            }
        }
    }

    fn claim_failed(&mut self, host: &dyn Host, why: &str) {
        let Some(dlog) = self.delivery_log.as_mut() else {
            return;
        };
        let first = !dlog.sends.failing;
        dlog.sends.failing = true;
        log(
            host,
            if first {
                LogLevel::Warn
            } else {
                LogLevel::Debug
            },
            || {
                format!("claiming queued sends failed ({why}): they wait in the registry; claimed again when the feed says so")
            },
        );
    }

    /// A claim's answer: each send becomes a delivery of its webhook (one this proxy does not
    /// have, or that the answer gets wrong, is reported dropped so that it is not claimed again).
    pub(super) fn on_claim_answer(
        &mut self,
        host: &dyn Host,
        status: Option<u16>,
        body: Option<&[u8]>,
        now_ms: u64,
    ) {
        let Some(dlog) = self.delivery_log.as_mut() else {
            return;
        };
        dlog.sends.claiming = false;
        let answer = match (status, body) {
            (Some(200), Some(body)) => read_claim_answer(body),
            (Some(200), None) => Err("the answer is too large".to_string()),
            (Some(code), _) => Err(format!("the registry answered {code}")),
            (None, _) => Err("no answer from the registry".to_string()),
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(why) => return self.claim_failed(host, &why),
        };
        if dlog.sends.failing {
            dlog.sends.failing = false;
            log(host, LogLevel::Info, || {
                "claiming queued sends works again".to_string()
            });
        }
        dlog.sends.lease_ms = answer.lease_ms.or(dlog.sends.lease_ms);
        dlog.sends.again = answer.sends.len() + answer.unusable.len() >= CLAIM_MAX;
        if answer.unreadable > 0 {
            log(host, LogLevel::Warn, || {
                format!(
                    "{} claimed sends without a sendId left out",
                    answer.unreadable
                )
            });
        }
        for unusable in answer.unusable {
            self.metrics.sends_claimed.inc(host);
            let why = unusable.why;
            let send = unusable.send;
            log(host, LogLevel::Warn, || {
                format!("claimed send {} dropped: {why}", send.send_id)
            });
            self.drop_send(host, send, "invalid_send", now_ms);
        }
        for send in answer.sends {
            self.metrics.sends_claimed.inc(host);
            self.take_send(host, send, now_ms, false);
        }
        self.ring(host);
        self.report_gauges(host);
    }

    /// Sends whose webhook this proxy did not know yet: queued once the registry's copy has it, or
    /// reported dropped when it still does not after [`UNMATCHED_GRACE_MS`].
    pub(super) fn sends_rematch(&mut self, host: &dyn Host, now_ms: u64) {
        let Some(dlog) = self.delivery_log.as_mut() else {
            return;
        };
        if dlog.sends.unmatched.is_empty() {
            return;
        }
        let unmatched = std::mem::take(&mut dlog.sends.unmatched);
        for (send, deadline) in unmatched {
            let known = self.hooks().lane_of(&send.webhook_id).is_some();
            if known || now_ms >= deadline {
                if let Some(dlog) = self.delivery_log.as_mut() {
                    dlog.sends.holding.remove(&send.send_id);
                }
                self.take_send(host, send, now_ms, true);
            } else if let Some(dlog) = self.delivery_log.as_mut() {
                dlog.sends.unmatched.push((send, deadline));
            }
        }
        self.ring(host);
        self.report_gauges(host);
    }

    /// Queues a claimed send as a delivery of its webhook. A webhook this proxy does not know may
    /// be one its copy of the registry does not have yet: the send waits for it (unless `last`).
    fn take_send(&mut self, host: &dyn Host, send: ClaimedSend, now_ms: u64, last: bool) {
        let hooks = self.hooks();
        if !last && hooks.lane_of(&send.webhook_id).is_none() {
            if let Some(dlog) = self.delivery_log.as_mut() {
                dlog.sends.holding.insert(send.send_id);
                dlog.sends
                    .unmatched
                    .push((send, now_ms + UNMATCHED_GRACE_MS));
            }
            return;
        }
        let lane = hooks.lane_of(&send.webhook_id).filter(|&i| {
            hooks
                .get(i)
                .is_some_and(|w| w.enabled && w.organisation_id == send.organisation_id)
        });
        let (send_id, event_id, webhook_id) = (send.send_id, &send.event_id, &send.webhook_id);
        let Some(i) = lane else {
            log(host, LogLevel::Warn, || {
                format!("claimed send {send_id} ({}) dropped: event={event_id} webhook={webhook_id} reason=this proxy has no such enabled webhook of that organisation", send.kind)
            });
            return self.drop_send(host, send, "unknown_webhook", now_ms);
        };
        log(host, LogLevel::Info, || {
            format!(
                "claimed send {send_id} ({}): event={event_id} webhook={webhook_id}",
                send.kind
            )
        });
        if let Some(dlog) = self.delivery_log.as_mut() {
            dlog.sends.holding.insert(send_id);
        }
        let delivery = Delivery::new(
            Rc::from(send.event_id.as_str()),
            LaneId::Webhook(i),
            Rc::new(Payload::claimed(send.body)),
            now_ms,
        );
        match self.outbox.enqueue(delivery) {
            Ok(evicted) => {
                for d in evicted {
                    self.drop_evicted(host, d, now_ms);
                }
            }
            Err(refused) => self.report_refused(host, refused, now_ms),
        }
    }

    /// A claimed send that cannot be delivered: reported dropped, so that it is done.
    fn drop_send(&mut self, host: &dyn Host, send: ClaimedSend, reason: &str, now_ms: u64) {
        let webhook_id = send.webhook_id;
        let delivery = Delivery::new(
            Rc::from(send.event_id.as_str()),
            LaneId::DeadLetter,
            Rc::new(Payload::claimed(send.body)),
            now_ms,
        );
        self.report(
            host,
            &webhook_id,
            &Trace::of(&delivery),
            Outcome::Dropped(reason),
            None,
            now_ms,
        );
    }
}
