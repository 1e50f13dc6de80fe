//! Taking due work: the deliveries whose attempt is due now, within each lane's limits of
//! attempts out (and behind an open circuit's single probe), and when the next one falls due.

use super::{Outbox, ATTEMPT_BYTES_SHARE};
use crate::delivery::Delivery;

impl Outbox {
    /// Takes the deliveries to attempt now, and counts them as out.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Delivery> {
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut due = Vec::new();
        let max_out = self.settings.max_in_flight_per_webhook.max(1);
        let max_out_bytes = (self.settings.max_queued_bytes / ATTEMPT_BYTES_SHARE).max(1);
        let lanes = self
            .webhooks
            .values_mut()
            .chain(std::iter::once(&mut self.dead_letter));
        for lane in lanes {
            if !lane.waiting.is_empty() {
                let (ready, waiting): (Vec<_>, Vec<_>) = lane
                    .waiting
                    .drain(..)
                    .partition(|d| d.next_attempt_at_ms <= now_ms);
                lane.waiting = waiting;
                // Retries go first: they are older than anything behind them.
                for d in ready.into_iter().rev() {
                    lane.ready.push_front(d);
                }
            }
            let cap = match lane.probe_at_ms {
                None => max_out,
                // An open circuit sends one probe per period, and nothing else.
                Some(at) if at <= now_ms && lane.attempts_out == 0 => 1,
                Some(_) => 0,
            };
            while lane.attempts_out < cap {
                let Some(size) = lane.ready.front().map(|d| d.payload.held_bytes()) else {
                    break;
                };
                // The first attempt always goes, however large; more only within the lane's share.
                if lane.attempts_out > 0 && lane.attempts_out_bytes + size > max_out_bytes {
                    break;
                }
                let Some(mut d) = lane.ready.pop_front() else {
                    break;
                };
                d.attempts += 1;
                d.is_probe = lane.probe_at_ms.is_some();
                lane.attempts_out += 1;
                lane.attempts_out_bytes += size;
                self.attempts_out += 1;
                due.push(d);
            }
        }
        // A lane with nothing left to remember goes: only lanes with work cost a pump its time.
        self.webhooks.retain(|_, lane| !lane.idle());
        due
    }

    /// The earliest time a waiting retry or a probe becomes due.
    pub fn next_due_at(&self) -> Option<u64> {
        let lanes = || {
            self.webhooks
                .values()
                .chain(std::iter::once(&self.dead_letter))
        };
        let retries = lanes()
            .flat_map(|l| &l.waiting)
            .map(|d| d.next_attempt_at_ms);
        let probes = lanes()
            .filter(|l| !l.ready.is_empty() || !l.waiting.is_empty())
            .filter_map(|l| l.probe_at_ms);
        retries.chain(probes).min()
    }
}
