"""Measure (not a test): Envoy's memory idle, and with N deliveries queued for a dead endpoint.

    .venv/bin/python tests/e2e/measure_rss.py [--wasm target/wasm32-wasip1/release/webhook_emitter.wasm] [--events 10000]

One Envoy (the harness default of two workers) runs the filter with one webhook whose cluster points at a port
that is reserved but never listens, so every attempt is refused (Envoy answers 503). maxQueued is above the
event count and the schedule is long (1h steps), so every delivery stays queued. Reported: VmRSS (and VmHWM)
from /proc/<pid>/status, and admin /memory (allocated, heap_size) idle, after the events, and the difference
per queued delivery. The gauge outbox_depth confirms how many are held.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from harness.config import PluginConfig, delivery_section, make_hook, new_id  # noqa: E402
from harness.envoy import static_cluster  # noqa: E402
from harness.faults import LateReceiver  # noqa: E402
from harness.observe import METRIC, complete_jobs_concurrently, plugin_dict  # noqa: E402


def proc_status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])  # kB
    return out


def memory(envoy) -> dict:
    doc = envoy.admin("/memory").json()
    return {k: int(doc[k]) for k in ("allocated", "heap_size", "pageheap_unmapped", "pageheap_free",
                                     "total_physical_bytes") if k in doc}


def snapshot(envoy, label: str) -> dict:
    snap = {"label": label, **proc_status(envoy.proc.pid), **{f"memory.{k}": v for k, v in memory(envoy).items()},
            "outbox_depth": envoy.custom_stats().get(METRIC + "outbox_depth", 0)}
    mem = {k: f"{v / 1048576:.1f} MiB" for k, v in memory(envoy).items()}
    print(f"{label:>28}: VmRSS {snap['VmRSS'] / 1024:.1f} MiB (RssAnon {snap.get('RssAnon', 0) / 1024:.1f}, "
          f"VmHWM {snap['VmHWM'] / 1024:.1f}); /memory {mem}; outbox_depth {snap['outbox_depth']}")
    return snap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wasm", default=str(harness.DEFAULT_WASM))
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    with harness.JobService() as jobs_svc:
        dead = LateReceiver().start()  # reserved, never opened: connections are refused
        try:
            org = new_id()
            hook = make_hook(dead.port, org, name="dead")
            config = PluginConfig(hooks=[hook], delivery=delivery_section(
                maxQueued=max(10000, args.events + 100), retrySchedule=["1h"] * 6))
            envoy = harness.envoy_with_filter(
                jobs_svc, None, plugin_dict(config, clusters={hook.id: "dead"}), wasm=args.wasm, name="measure-rss",
                extra_clusters=[static_cluster("dead", dead.port, large_circuit_breakers=True)])
            try:
                time.sleep(1.0)  # let start-up settle (this is a measurement, not a synchronisation)
                idle = snapshot(envoy, "idle")
                ids = [new_id() for _ in range(args.events)]
                t0 = time.monotonic()
                statuses, errors = complete_jobs_concurrently(envoy.listener_port, org, ids, 32)
                assert not errors and all(s == 200 for s in statuses.values()), (errors[:3], set(statuses.values()))
                harness.wait_until(lambda: envoy.custom_stats().get(METRIC + "outbox_depth", 0) >= args.events,
                                   timeout=60, desc=f"{args.events} deliveries queued")
                print(f"{args.events} events sent and queued in {time.monotonic() - t0:.1f}s")
                time.sleep(1.0)
                full = snapshot(envoy, f"{args.events} deliveries queued")
                stats = envoy.custom_stats()
                print("counters:", {k[len(METRIC):]: v for k, v in stats.items() if v})
                d_rss = (full["VmRSS"] - idle["VmRSS"]) * 1024
                d_alloc = full.get("memory.allocated", 0) - idle.get("memory.allocated", 0)
                print(f"difference: VmRSS +{d_rss / 1048576:.1f} MiB ({d_rss / args.events:.0f} B per delivery); "
                      f"/memory allocated +{d_alloc / 1048576:.1f} MiB ({d_alloc / args.events:.0f} B per delivery)")
                if args.json:
                    Path(args.json).write_text(json.dumps({"idle": idle, "queued": full, "events": args.events},
                                                          indent=1))
            finally:
                envoy.stop()
        finally:
            dead.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
