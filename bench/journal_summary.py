"""The journal's figures of a bench run (summary["journal"] in results.json; their keys go to summary.json):

- journal_cpu_vs_memory: Envoy CPU per request of configuration 7 (1 webhook, journal) over 2 (1 webhook, memory
  only), the median of the A/B pairs (phase ab-sat-27); each pair's ratio in journal_cpu_vs_memory_pairs;
- journal_etcd_requests_per_event: requests etcd handled per event at saturation with 1 webhook (configuration 7),
  the median of its saturation rounds (each round's in ..._rounds; the same for 10 webhooks under ..._10_webhooks);
- overload_dropped_with_journal: deliveries dropped (queue full, over share, journal full or journal behind) over
  every saturation round of configuration 8 (10 webhooks with the journal, its outbox bounded to
  BENCH_OVERLOAD_MAX_QUEUED deliveries, 1,000 by default, so that saturation overflows it, its journal to
  BENCH_OVERLOAD_MAX_SPILLED_BYTES, 512 MiB), with what spilled to etcd meanwhile, and the drain time: from the end
  of the load until every delivery was sent, the spilled ones included (median and each round's);
  overload_dropped_journal_full (and _rounds): how many of those drops were the journal's maxSpilledBytes
  (deliveries_dropped.journal_full); overload_dropped_journal_behind: those whose payloads waited for etcd's writes
  past their room (deliveries_dropped.journal_behind).
"""

from __future__ import annotations

from report import _med, _per_round, _ratio, _steps


def summarise(steps: list) -> dict:
    out: dict = {}
    if any(r["phase"] == "ab-sat-27" for r in steps):
        out["journal_cpu_vs_memory"], out["journal_cpu_vs_memory_pairs"] = _per_round(
            steps, "ab-sat-27", 7, 2, _ratio("cpu_s_per_1k"))
    for c, suffix in ((7, ""), (8, "_10_webhooks")):
        sat = _steps(steps, "saturation", c)
        if not sat:
            continue
        per_event = [r.get("etcd_requests_per_event") for r in sat]
        out[f"journal_etcd_requests_per_event{suffix}"] = _med(per_event)
        out[f"journal_etcd_requests_per_event{suffix}_rounds"] = per_event
    overload = _steps(steps, "saturation", 8)
    if overload:
        dropped = [r.get("dropped_queue_full", 0) + r.get("dropped_over_share", 0) + r.get("dropped_journal_full", 0)
                   + r.get("dropped_journal_behind", 0) for r in overload]
        out["overload_dropped_with_journal"] = sum(dropped)
        out["overload_dropped_with_journal_rounds"] = dropped
        # Of those, the ones the journal's bounds kept out of etcd: maxSpilledBytes reached, or puts behind.
        journal_full = [r.get("dropped_journal_full", 0) for r in overload]
        out["overload_dropped_journal_full"] = sum(journal_full)
        out["overload_dropped_journal_full_rounds"] = journal_full
        out["overload_dropped_journal_behind"] = sum(r.get("dropped_journal_behind", 0) for r in overload)
        out["overload_spilled_rounds"] = [r.get("spilled") for r in overload]
        out["overload_deliveries_rounds"] = [r.get("deliveries") for r in overload]
        out["overload_deliveries_expected_rounds"] = [r.get("deliveries_expected") for r in overload]
        out["overload_drain_s"] = _med(r.get("drain_s") for r in overload)
        out["overload_drain_s_rounds"] = [r.get("drain_s") for r in overload]
        out["overload_drained"] = all(r.get("drained") for r in overload)
    return out
