//! What the proxy's workers share through Envoy's shared data: endpoints found gone or failing
//! (and which worker leads an open circuit's probing), and what each worker holds, so that the
//! outbox's bounds are the proxy's.

use super::Worker;
use crate::delivery::shared::{EndpointKey, EndpointState, EndpointTable, HeldByWorker, HeldTable};
use crate::delivery::{DeadLetterReason, LaneId};
use crate::filter::host::{log, Host, LogLevel};

/// How often a worker tells the others what it holds even when nothing changed (it is forgotten
/// after [`HeldTable::STALE_MS`] of silence).
const HELD_HEARTBEAT_MS: u64 = 1_000;
/// Attempts at a compare-and-swap update of shared data before giving up until the next tick.
const CAS_TRIES: usize = 8;
/// A worker that did not open a circuit probes only if the worker that did (the leader) has not
/// moved its probe time for this long past it: so one probe per period for the whole proxy, and
/// still probes if the leader's VM is gone.
pub const FOLLOWER_GRACE_MS: u64 = 5_000;

impl Worker {
    /// The tick: what other workers found (endpoints gone or failing, what they hold).
    pub fn tick(&mut self, host: &dyn Host, now_ms: u64) {
        self.sync_endpoints(host, now_ms);
        self.sync_held(host, now_ms);
    }

    fn endpoint_key(&self, lane: LaneId) -> Option<EndpointKey> {
        let LaneId::Webhook(i) = lane else {
            return None;
        };
        let hooks = self.hooks();
        let w = hooks.get(i)?;
        let url = format!(
            "{}://{}{}",
            if w.url.https { "https" } else { "http" },
            w.url.authority,
            w.url.path_and_query
        );
        Some(EndpointKey::new(&w.id, &url))
    }

    /// Tells the proxy's other workers what this one found about an endpoint.
    pub(super) fn publish_endpoint(
        &mut self,
        host: &dyn Host,
        lane: LaneId,
        state: Option<EndpointState>,
    ) {
        let Some(key) = self.endpoint_key(lane) else {
            return;
        };
        for _ in 0..CAS_TRIES {
            let (bytes, cas) = host.shared_get(&self.endpoints_key).unwrap_or_default();
            let mut table = EndpointTable::parse(&bytes);
            table.set(key.clone(), state.clone());
            if host.shared_set(&self.endpoints_key, &table.serialize(), cas) {
                self.tell_endpoints_changed(host);
                return;
            }
        }
        log(host, LogLevel::Warn, || {
            format!(
                "could not share the state of webhook {} with the other workers (shared data busy)",
                key.webhook_id
            )
        });
    }

    /// Rewrites the change key after a change of the endpoint table, so that the other workers'
    /// next events see it (the tick reads the table itself, should this write fail).
    fn tell_endpoints_changed(&self, host: &dyn Host) {
        host.shared_set(&self.endpoints_changed_key, b"1", 0);
    }

    /// Applies the endpoint table before an event only if its change key moved since the last
    /// event: one small read per event, however large the table.
    pub(super) fn sync_endpoints_if_changed(&mut self, host: &dyn Host, now_ms: u64) {
        let Some((_, changed)) = host.shared_get(&self.endpoints_changed_key) else {
            return;
        };
        if changed == self.endpoints_changed_seen {
            return;
        }
        self.endpoints_changed_seen = changed;
        self.sync_endpoints(host, now_ms);
    }

    /// Applies what other workers found: a webhook gone for them is gone here too (its queued
    /// deliveries dropped with a trace and dead-lettered); an open circuit holds this worker's
    /// queue too, and a circuit closed elsewhere opens here again.
    pub(super) fn sync_endpoints(&mut self, host: &dyn Host, now_ms: u64) {
        let Some((bytes, cas)) = host.shared_get(&self.endpoints_key) else {
            return;
        };
        if cas == self.endpoints_seen {
            return;
        }
        self.endpoints_seen = cas;
        let table = EndpointTable::parse(&bytes);
        // The lanes the table names (by webhook id and URL), and the lanes whose circuit is open
        // here (a circuit closed elsewhere is no longer in the table): not every webhook.
        let hooks = self.hooks();
        let mut lanes: Vec<LaneId> = table
            .entries
            .keys()
            .filter_map(|k| hooks.lane_of(&k.webhook_id))
            .map(LaneId::Webhook)
            .collect();
        lanes.extend(self.outbox.lanes_with_open_circuits());
        lanes.sort_unstable_by_key(|l| match l {
            LaneId::Webhook(i) => *i,
            LaneId::DeadLetter => usize::MAX,
        });
        lanes.dedup();
        for lane in lanes {
            let Some(key) = self.endpoint_key(lane) else {
                continue;
            };
            let name = &key.webhook_id;
            match table.entries.get(&key) {
                Some(EndpointState::Gone) if !self.outbox.is_gone(lane) => {
                    let dropped = self.outbox.mark_gone(lane);
                    log(host, LogLevel::Warn, || {
                        format!(
                            "webhook {name} answered 410 Gone to another worker: disabled here too"
                        )
                    });
                    for d in &dropped {
                        self.report_dropped(host, &self.hooks(), d, "webhook_gone", now_ms);
                        self.metrics.deliveries_dropped_webhook_gone.inc(host);
                        log(host, LogLevel::Error, || {
                            format!("delivery dropped: event={} webhook={name} reason=the webhook answered 410 Gone", d.event_id)
                        });
                        self.dead_letter(host, d, DeadLetterReason::WebhookGone, now_ms);
                    }
                }
                Some(EndpointState::Open {
                    probe_at_ms,
                    leader,
                }) if *leader != self.id => {
                    let follow = probe_at_ms + FOLLOWER_GRACE_MS;
                    if self.outbox.probe_at(lane) != Some(follow) {
                        self.outbox.set_probe_at(lane, Some(follow));
                        log(host, LogLevel::Debug, || {
                            format!("circuit of webhook {name} is open on worker {leader}: holding")
                        });
                    }
                }
                None if self.outbox.probe_at(lane).is_some() => {
                    self.outbox.set_probe_at(lane, None);
                    log(host, LogLevel::Debug, || {
                        format!("circuit of webhook {name} closed by another worker")
                    });
                }
                _ => {}
            }
        }
        self.report_gauges(host);
    }

    /// Tells the other workers what this one holds, and learns what they hold, so that
    /// `maxQueued` and `maxQueuedBytes` bound the whole proxy (to within a tick).
    fn sync_held(&mut self, host: &dyn Host, now_ms: u64) {
        let mine = self.outbox.held();
        let (said_queued, said_bytes, said_at) = self.held_said;
        let due = (said_queued, said_bytes) != mine
            || now_ms.saturating_sub(said_at) >= HELD_HEARTBEAT_MS;
        let (bytes, cas) = host.shared_get(&self.held_key).unwrap_or_default();
        let mut table = HeldTable::parse(&bytes);
        if due {
            table.update(
                &self.id,
                HeldByWorker {
                    queued: mine.0,
                    queued_bytes: mine.1,
                    updated_ms: now_ms,
                },
            );
            // One try: on a CAS mismatch the next tick says it again.
            if host.shared_set(&self.held_key, &table.serialize(), cas) {
                self.held_said = (mine.0, mine.1, now_ms);
            }
        }
        self.outbox.set_others(table.others(&self.id, now_ms));
        for d in self.outbox.trim() {
            self.drop_evicted(host, d, now_ms);
        }
    }

    /// This worker's circuit of `lane` is open: it leads the probing for the proxy, unless another
    /// live worker already does; then this one follows (holds its queue, probes only if the leader
    /// falls silent).
    pub(super) fn lead_circuit(&mut self, host: &dyn Host, lane: LaneId, now_ms: u64) {
        let (Some(key), Some(mine)) = (self.endpoint_key(lane), self.outbox.probe_at(lane)) else {
            return;
        };
        for _ in 0..CAS_TRIES {
            let (bytes, cas) = host.shared_get(&self.endpoints_key).unwrap_or_default();
            let mut table = EndpointTable::parse(&bytes);
            match table.entries.get(&key) {
                Some(EndpointState::Gone) => return,
                Some(EndpointState::Open {
                    probe_at_ms,
                    leader,
                }) if *leader != self.id && probe_at_ms + FOLLOWER_GRACE_MS > now_ms => {
                    self.outbox
                        .set_probe_at(lane, Some(probe_at_ms + FOLLOWER_GRACE_MS));
                    return;
                }
                _ => {}
            }
            let state = EndpointState::Open {
                probe_at_ms: mine,
                leader: self.id.clone(),
            };
            table.set(key.clone(), Some(state));
            if host.shared_set(&self.endpoints_key, &table.serialize(), cas) {
                self.tell_endpoints_changed(host);
                return;
            }
        }
    }
}
