#!/usr/bin/env python3
"""`make bench`: the data-path cost and the delivery speed of webhook-emitter, side by side, in one run.

Eight configurations of the same Envoy binary (.venv/bin/envoy, --concurrency 1, pinned with taskset to one core)
run for the whole run against the same backend Envoy and receivers (pinned, with h2load and the Python probe, to
the other core), all on 127.0.0.1:

  0  Envoy without a filter (baseline)
  1  webhook-emitter, traffic that matches no rule (pass-through cost)
  2  webhook-emitter, every request a job completion, 1 subscribed webhook
  3  webhook-emitter, every request a job completion, 10 subscribed webhooks
  4  the peer: Envoy's Lua filter doing the same job plainly (bench/peer.lua), 1 webhook, no signing
  5  webhook-emitter behind the shipped gate (envoy/envoy.yaml), traffic that matches no rule
  6  the floor: a Lua filter that makes one bare asynchronous httpCall per response (bench/bare-callout.lua)
  7  as 2, with the write-ahead journal in a local single-member etcd (Debian's etcd-server, on the load core)
  8  as 3 (10 webhooks), with the journal and maxQueued 1,000 (BENCH_OVERLOAD_MAX_QUEUED): at saturation its outbox
     overflows, so its saturation steps are the overload case (deliveries spill to etcd: dropped count, and the
     drain time until every one is delivered)
  9  as 2, the webhook pulled from the registry (`registry serve`, SQLite, on the load core), reports off
  10 as 9, reports on: every attempt reported to the registry (the delivery log)

Phases, each interleaving the configurations (the order rotates every round), so every ratio is taken within one
run and, for saturation and the fixed rate, within one round:
  warm-up     a short closed-loop step per configuration, discarded (V8 tier-up, connection pools)
  saturation  closed loop with BENCH_CONNECTIONS connections, BENCH_ROUNDS rounds
  fixed rate  50% of configuration 0's median saturation, the same absolute rate for all, BENCH_ROUNDS rounds;
              for 2-4 the probe measures event-to-receiver latency meanwhile
  own half    configurations 2-4 at half their own saturation, with the probe
  A/B pairs   BENCH_AB_PAIRS pairs of short (BENCH_AB_DURATION) steps alternating 0/1 (closed loop and fixed rate)
              and 0/5, 2/4, 2/6, 3/4, 2/7, 9/10 (closed loop): the headline ratios (Envoy CPU per request, ours over
              theirs, summary.json; 7 over 2 is the journal's cost) need paired samples
  curve       25%, 75% and 90% of configuration 0's saturation for 0, 1, 2 and 4 (latency.png)

Knobs (environment): BENCH_WASM, BENCH_DURATION (seconds per step), BENCH_ROUNDS, BENCH_CONNECTIONS,
BENCH_RATE_CONNECTIONS, BENCH_AB_PAIRS, BENCH_AB_DURATION, BENCH_PROBE_RATE, BENCH_LOG_LEVEL, BENCH_OUT, BENCH_WORK (Envoy logs; default bench/work), BENCH_ENVOY_CPU,
BENCH_LOAD_CPU, BENCH_CONFIGS (e.g. "2,7,8" or "9,10": only these configurations; the fixed-rate, own-half and
curve phases need 0 among them, the A/B pairs both of theirs). `--quick` is the smoke test's mode.

With the journal (7, 8) each step also counts the requests etcd handled (its gRPC metrics; the idle journaled
configuration's keepalives and scans included) per event, and the deliveries spilled and paged back in; a step's
drain waits until nothing is spilled either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

from harness.envoy import DEFAULT_WASM, ENVOY_BIN  # noqa: E402
from harness.servers import Receiver  # noqa: E402

import envoyproc  # noqa: E402
import journal_summary  # noqa: E402
import loadgen  # noqa: E402
import report  # noqa: E402
import topology  # noqa: E402
from probe import Probe, TimedJobService  # noqa: E402

CONFIGS = {
    0: "Envoy, no filter (baseline)",
    1: "webhook-emitter, traffic matching no rule",
    2: "webhook-emitter, job completions, 1 webhook",
    3: "webhook-emitter, job completions, 10 webhooks",
    4: "Lua peer, job completions, 1 webhook (unsigned)",
    5: "webhook-emitter gated, traffic matching no rule",
    6: "Lua, bare callout per request (the floor)",
    7: "webhook-emitter, job completions, 1 webhook + journal (etcd)",
    8: "webhook-emitter, job completions, 10 webhooks + journal (etcd)",
    9: "webhook-emitter, job completions, 1 webhook from the registry, reports off",
    10: "webhook-emitter, job completions, 1 webhook from the registry, reports on",
}
HOOKS = {0: 0, 1: 1, 2: 1, 3: 10, 4: 1, 5: 1, 6: 1, 7: 1, 8: 10, 9: 1, 10: 1}
DELIVERING = (2, 3, 4, 6, 7, 8, 9, 10)
# Configurations whose events the probe can follow (the bare callout sends a fixed body, not the job).
PROBED = (2, 3, 4, 7)
PASSTHROUGH = (1, 5)
CURVE_CONFIGS = (0, 1, 2, 4)
CURVE_FRACTIONS = (0.25, 0.75, 0.9)
FIXED_FRACTION = 0.5
# A/B pairs for the targets that need the finest comparison: short steps, alternating A-B / B-A, one ratio per pair.
AB_PAIRS = ((0, 1), (0, 5), (2, 4), (2, 6), (3, 4), (2, 7), (9, 10))

STATS = (r"^(http\.ingress\.downstream_rq_(completed|2xx)|cluster\.(webhooks|probe_receiver)\.upstream_rq_"
         r"(active|pending_active|completed|pending_overflow)|wasmcustom\.webhook_emitter\.(outbox_depth|"
         r"deliveries_(attempted|succeeded|failed|dropped\.(queue_full|over_share|journal_full|journal_behind)|spilled|"
         r"paged_in)|"
         r"events_emitted|registry_updates|reports_(sent|dropped)))$")


def env_num(name: str, default, kind=float):
    value = os.environ.get(name, "")
    return kind(value) if value.strip() else default


def settings_from(args) -> dict:
    quick = args.quick
    wasm = Path(args.wasm or os.environ.get("BENCH_WASM") or DEFAULT_WASM).resolve()
    out = Path(args.out or os.environ.get("BENCH_OUT") or BENCH / "results").resolve()
    ncpu = os.cpu_count() or 1
    envoy_cpu = env_num("BENCH_ENVOY_CPU", 0, int)
    load_cpu = env_num("BENCH_LOAD_CPU", 1 if ncpu > 1 else 0, int)
    return {
        "quick": quick,
        "wasm": str(wasm),
        "out": str(out),
        "duration_s": args.duration or env_num("BENCH_DURATION", 1.0 if quick else 5.0),
        "rounds": args.rounds or env_num("BENCH_ROUNDS", 1 if quick else 4, int),
        "connections": env_num("BENCH_CONNECTIONS", 8 if quick else 32, int),
        "rate_connections": env_num("BENCH_RATE_CONNECTIONS", 4 if quick else 16, int),
        "probe_rate": env_num("BENCH_PROBE_RATE", 20.0),
        "warmup_s": 0.0 if quick else 2.0,
        "ab_pairs": env_num("BENCH_AB_PAIRS", 0 if quick else 8, int),
        "ab_duration_s": env_num("BENCH_AB_DURATION", 2.0),
        "log_level": os.environ.get("BENCH_LOG_LEVEL", "info") or "info",
        "envoy_cpu": envoy_cpu,
        "load_cpu": load_cpu,
        "plot": not quick and not args.no_plot,
        "configs": [int(c) for c in os.environ.get("BENCH_CONFIGS", "").split(",") if c.strip()] or list(CONFIGS),
    }


class Bench:
    def __init__(self, s: dict):
        self.s = s
        self.work = Path(tempfile.mkdtemp(prefix="run-", dir=self._work_root()))
        # Envoy loads a private copy: a rebuild of the original during the run cannot change what is measured.
        self.wasm = self.work / "webhook_emitter.wasm"
        shutil.copyfile(s["wasm"], self.wasm)
        self.git_commit = _cmd("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
        self.src_dirty = bool(_cmd("git", "-C", str(REPO), "status", "--porcelain", "--", "src", "Cargo.toml",
                                   "Cargo.lock"))
        self.steps: list = []
        self.configs = [c for c in CONFIGS if c in s["configs"]]
        self.envoys: dict = {}
        self.backend = None
        self.webhooks: dict = {}
        self.t_start = time.time()

    @staticmethod
    def _work_root() -> Path:
        root = Path(os.environ.get("BENCH_WORK") or BENCH / "work")
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("run-*"):  # logs of config 3 at info grow large: keep the last run only
            shutil.rmtree(old, ignore_errors=True)
        return root

    # -- setup --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.s
        self.probe_jobs = TimedJobService().start()
        self.probe_receiver = Receiver().start()
        self.backend = envoyproc.EnvoyProcess("backend", topology.backend_bootstrap(), self.work, s["load_cpu"],
                                              "warning").start()
        self.backend.wait_ready(["jobs", "hooks"])
        jobs_port, hooks_port = self.backend.ports["jobs"], self.backend.ports["hooks"]
        self.etcd = topology.start_etcd(s["load_cpu"]) if set(self.configs) & set(topology.JOURNALED) else None
        self.registry = (topology.start_registry(s["load_cpu"], self.work)
                         if set(self.configs) & set(topology.REGISTRY_REPORTS) else None)
        for c in self.configs:
            if HOOKS[c]:
                self.webhooks[c] = topology.Webhooks(HOOKS[c], hooks_port, self.probe_receiver.port)
        for c in self.configs:
            filters = topology.filters_for(c, self.wasm, self.webhooks, self.registry)
            boot = topology.under_test_bootstrap(f"config{c}", filters, jobs_port, hooks_port,
                                                 self.probe_jobs.port, self.probe_receiver.port,
                                                 etcd=self.etcd if c in topology.JOURNALED else None,
                                                 registry=self.registry if c in topology.REGISTRY_REPORTS else None)
            self.envoys[c] = envoyproc.EnvoyProcess(f"config{c}", boot, self.work, s["envoy_cpu"],
                                                    s["log_level"]).start()
        for c, e in self.envoys.items():
            e.wait_ready(["ingress"], timeout=120)
        for c in set(self.configs) & set(topology.REGISTRY_REPORTS):  # the registry's webhook is in force
            deadline = time.monotonic() + 60
            while not self.envoys[c].stats(STATS).get("wasmcustom.webhook_emitter.registry_updates"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"config{c} did not apply the registry's webhook within 60 s")
                time.sleep(0.1)

    def stop(self) -> None:
        for e in [*self.envoys.values(), self.backend]:
            if e is not None:
                e.stop()
        for srv in (getattr(self, "probe_jobs", None), getattr(self, "probe_receiver", None)):
            if srv is not None:
                srv.stop()
        if getattr(self, "etcd", None) is not None:
            self.etcd.stop()
        if getattr(self, "registry", None) is not None:
            self.registry.stop()

    # -- one step ------------------------------------------------------------------------------------------------
    def hooks_delivered(self) -> int:
        return int(self.backend.stats(r"^http\.hooks\.downstream_rq_2xx$").get("http.hooks.downstream_rq_2xx", 0))

    def drain(self, c: int, timeout: float) -> tuple:
        """Wait until the Envoy under test holds no delivery (outbox empty, no callout in flight). Returns
        (seconds waited, drained?, last stats)."""
        e = self.envoys[c]
        t0 = time.monotonic()
        while True:
            st = e.stats(STATS)
            busy = (st.get("cluster.webhooks.upstream_rq_active", 0) + st.get("cluster.probe_receiver.upstream_rq_active", 0)
                    + st.get("cluster.webhooks.upstream_rq_pending_active", 0)
                    + st.get("wasmcustom.webhook_emitter.outbox_depth", 0)
                    # deliveries waiting in etcd only (the counters run from Envoy's start)
                    + st.get("wasmcustom.webhook_emitter.deliveries_spilled", 0)
                    - st.get("wasmcustom.webhook_emitter.deliveries_paged_in", 0))
            if busy == 0:
                return time.monotonic() - t0, True, st
            if time.monotonic() - t0 > timeout:
                return time.monotonic() - t0, False, st
            time.sleep(0.05)

    def step(self, phase: str, c: int, rate, rnd: int = 0, probe: bool = False, duration=None) -> dict:
        s = self.s
        e = self.envoys[c]
        duration = duration or s["duration_s"]
        path = topology.NON_MATCHING_PATH if c in PASSTHROUGH else topology.MATCHING_PATH
        headers = {"content-type": "application/json"}
        if HOOKS[c]:
            headers["x-organisation-id"] = self.webhooks[c].load_org
        st0 = e.stats(STATS)
        etcd0 = self.etcd.rpc_counts() if c in topology.JOURNALED else {}
        hooks0 = self.hooks_delivered()
        cpu0, ecore0, lcore0, t0 = (e.cpu_seconds(), envoyproc.core_busy_seconds(s["envoy_cpu"]),
                                    envoyproc.core_busy_seconds(s["load_cpu"]), time.monotonic())
        others0 = sum(o.cpu_seconds() for k, o in self.envoys.items() if k != c)
        pr = None
        if probe:
            pr = Probe(self.probe_jobs, self.probe_receiver, e.ports["ingress"], self.webhooks[c].probe_org,
                       s["probe_rate"], f"{phase}-{c}-{rnd}-{int(time.time() * 1000)}").start()
        log_file = self.work / f"h2load-{len(self.steps):03d}.log"
        capacity = self.saturation(c)
        over = bool(rate and capacity and rate > 0.95 * capacity)
        res = loadgen.run(f"http://127.0.0.1:{e.ports['ingress']}{path}", headers, duration,
                          s["connections"] if rate is None else s["rate_connections"], rate, s["load_cpu"], log_file,
                          timeout_s=3 * duration + 60, cap=1.05 * capacity if capacity else None)
        t_load = time.monotonic()
        over = over or bool(rate and res.rps < 0.97 * rate)  # it could not keep up, whatever its saturation said
        lcore1 = envoyproc.core_busy_seconds(s["load_cpu"])
        if pr:
            pr.stop()
        drain_s, drained, st1 = self.drain(c, 10.0 if s["quick"] else (120.0 if c in topology.JOURNALED else 30.0))
        etcd1 = self.etcd.rpc_counts() if c in topology.JOURNALED else {}
        if pr:  # the probe's own deliveries go to the Python receiver: give the last one a moment
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and pr.latencies_ms()[1] > 0:
                time.sleep(0.05)
        t1 = time.monotonic()
        cpu1, ecore1 = e.cpu_seconds(), envoyproc.core_busy_seconds(s["envoy_cpu"])
        others1 = sum(o.cpu_seconds() for k, o in self.envoys.items() if k != c)
        hooks1 = self.hooks_delivered()
        mem = e.memory()
        log_file.unlink(missing_ok=True)

        def d(name):
            return st1.get(name, 0) - st0.get(name, 0)

        requests = d("http.ingress.downstream_rq_completed")
        ok = d("http.ingress.downstream_rq_2xx")
        probe_jobs = len(pr.sent) if pr else 0
        jobs = max(0, ok - probe_jobs) if c not in PASSTHROUGH and HOOKS[c] else 0
        expected = jobs * HOOKS[c] if c in DELIVERING else 0
        delivered = hooks1 - hooks0
        cpu = cpu1 - cpu0
        wall = t1 - t0
        rec = {
            "phase": phase, "config": c, "round": rnd, "offered_rps": rate, "over_capacity": over,
            "duration_s": res.duration_s,
            "rps": res.rps, "succeeded": res.succeeded, "failed": res.failed, "non_2xx": res.non_2xx,
            "p50_us": res.percentile(50), "p90_us": res.percentile(90), "p99_us": res.percentile(99),
            "p999_us": res.percentile(99.9), "max_us": res.latencies_us[-1] if res.latencies_us else None,
            "envoy_requests": requests, "envoy_cpu_s": cpu,
            "cpu_s_per_1k": cpu / requests * 1000.0 if requests else None,
            "envoy_cpu_util": cpu / wall if wall > 0 else None,  # over the load and the drain
            "load_core_util": (lcore1 - lcore0) / (t_load - t0) if t_load > t0 else None,
            # CPU on the Envoy core that was neither this Envoy nor the idle ones: other people's processes.
            "foreign_cpu_on_envoy_core": max(0.0, (ecore1 - ecore0) - cpu - (others1 - others0)) / wall,
            "rss_mib": mem["rss_mib"], "peak_rss_mib": mem["peak_rss_mib"],
            "drain_s": drain_s, "drained": drained,
        }
        if c in DELIVERING:
            rec.update({
                "deliveries": delivered, "deliveries_expected": expected,
                "deliveries_per_s": delivered / res.duration_s if res.duration_s else None,
                "delivery_completeness": delivered / expected if expected else None,
                "dropped_queue_full": d("wasmcustom.webhook_emitter.deliveries_dropped.queue_full"),
                "deliveries_failed": d("wasmcustom.webhook_emitter.deliveries_failed"),
                "callout_overflow": d("cluster.webhooks.upstream_rq_pending_overflow"),
                "reports_sent": d("wasmcustom.webhook_emitter.reports_sent"),
                "reports_dropped": d("wasmcustom.webhook_emitter.reports_dropped"),
                "dropped_over_share": d("wasmcustom.webhook_emitter.deliveries_dropped.over_share"),
                # With a journal: outbox full and the journal could not take them (maxSpilledBytes; puts behind).
                "dropped_journal_full": d("wasmcustom.webhook_emitter.deliveries_dropped.journal_full"),
                "dropped_journal_behind": d("wasmcustom.webhook_emitter.deliveries_dropped.journal_behind"),
            })
        if c in topology.JOURNALED:
            etcd_requests = sum(etcd1.values()) - sum(etcd0.values())
            events = d("wasmcustom.webhook_emitter.events_emitted")
            rec.update({
                "events": events, "etcd_requests": etcd_requests,
                "etcd_requests_by_method": {k: v - etcd0.get(k, 0) for k, v in etcd1.items() if v - etcd0.get(k, 0)},
                "etcd_requests_per_event": etcd_requests / events if events else None,
                "spilled": d("wasmcustom.webhook_emitter.deliveries_spilled"),
                "paged_in": d("wasmcustom.webhook_emitter.deliveries_paged_in"),
            })
        if pr:
            lat, missing = pr.latencies_ms()
            rec.update({"probe_events": len(pr.sent), "probe_missing": missing, "probe_errors": pr.errors[:5],
                        "e2r_p50_ms": _pct(lat, 50), "e2r_p99_ms": _pct(lat, 99), "e2r_max_ms": lat[-1] if lat else None,
                        "e2r_ms": [round(x, 3) for x in lat]})
        self.steps.append(rec)
        self._print(rec)
        return rec

    def saturation(self, c: int):
        """Median closed-loop throughput of configuration c so far (None before the saturation phase)."""
        sat = [r["rps"] for r in self.steps if r["phase"] == "saturation" and r["config"] == c]
        return statistics.median(sat) if sat else None

    def _print(self, r: dict) -> None:
        line = (f"[{time.time() - self.t_start:6.1f}s] {r['phase']:<10} cfg{r['config']} r{r['round']} "
                f"offered={'sat' if r['offered_rps'] is None else '%.0f' % r['offered_rps']:>6}"
                f"{'!' if r['over_capacity'] else ' '}"
                f"rps={r['rps']:8.0f} p50={_us(r['p50_us'])} p99={_us(r['p99_us'])} "
                f"cpu/1k={r['cpu_s_per_1k'] or 0:.4f}s envoy={r['envoy_cpu_util'] or 0:.2f} "
                f"loadcore={r['load_core_util'] or 0:.2f} foreign={r['foreign_cpu_on_envoy_core']:.2f}")
        if "deliveries" in r:
            line += f" deliv={r['deliveries']}/{r['deliveries_expected']} drain={r['drain_s']:.2f}s"
        if "etcd_requests_per_event" in r:
            dropped = sum(r.get(k, 0) for k in ("dropped_queue_full", "dropped_over_share", "dropped_journal_full",
                                                "dropped_journal_behind"))
            line += (f" etcd/event={r['etcd_requests_per_event'] or 0:.3f} spilled={r['spilled']}"
                     f" dropped={dropped} (journal_full={r.get('dropped_journal_full', 0)})")
        if "e2r_p99_ms" in r:
            line += f" e2r p50/p99={_ms(r['e2r_p50_ms'])}/{_ms(r['e2r_p99_ms'])}ms missing={r['probe_missing']}"
        print(line, flush=True)

    # -- phases --------------------------------------------------------------------------------------------------
    @staticmethod
    def rotated(configs, rnd: int) -> list:
        configs = list(configs)
        k = rnd % len(configs)
        return configs[k:] + configs[:k]

    def run(self) -> dict:
        s = self.s
        if s["warmup_s"] > 0:
            for c in self.configs:
                self.step("warmup", c, None, duration=s["warmup_s"])
        for rnd in range(s["rounds"]):
            for c in self.rotated(self.configs, rnd):
                self.step("saturation", c, None, rnd)
        if s["quick"]:
            return self.results(None)
        if 0 not in self.configs:  # only the pairs among the configurations chosen
            self.ab_pairs(None)
            return self.results(None)
        sat0 = statistics.median(r["rps"] for r in self.steps if r["phase"] == "saturation" and r["config"] == 0)
        fixed = round(sat0 * FIXED_FRACTION)
        for rnd in range(s["rounds"]):
            for c in self.rotated(self.configs, rnd):
                self.step("fixed", c, fixed, rnd, probe=c in PROBED)
        for c in self.rotated([c for c in PROBED if c in self.configs], 0):  # the delivery latency target
            self.step("own-half", c, round(self.saturation(c) * 0.5), probe=True)
        self.ab_pairs(fixed)
        for i, f in enumerate(CURVE_FRACTIONS):
            for c in self.rotated([c for c in CURVE_CONFIGS if c in self.configs], i):
                self.step(f"curve-{f:g}", c, round(sat0 * f))
        return self.results(fixed)

    def ab_pairs(self, fixed) -> None:
        s = self.s
        for a, b in AB_PAIRS:
            if a not in self.configs or b not in self.configs:
                continue
            for i in range(s["ab_pairs"]):
                for c in ((a, b) if i % 2 == 0 else (b, a)):
                    self.step(f"ab-sat-{a}{b}", c, None, i, duration=s["ab_duration_s"])
        a, b = AB_PAIRS[0]
        if fixed is None or a not in self.configs or b not in self.configs:
            return
        for i in range(s["ab_pairs"]):
            for c in ((a, b) if i % 2 == 0 else (b, a)):
                self.step(f"ab-fixed-{a}{b}", c, fixed, i, duration=s["ab_duration_s"])

    def results(self, fixed_rate) -> dict:
        s = self.s
        meta = machine_info(s, self.t_start)
        meta.update(git_commit=self.git_commit, src_dirty=self.src_dirty)  # as at the start of the run
        return {
            "meta": meta,
            "settings": s,
            "configs": {str(c): CONFIGS[c] for c in self.configs},
            "webhooks_per_config": {str(c): HOOKS[c] for c in self.configs},
            "wasm": {"path": s["wasm"], "bytes": self.wasm.stat().st_size,
                     "sha256": hashlib.sha256(self.wasm.read_bytes()).hexdigest()},
            "fixed_rate_rps": fixed_rate,
            "steps": self.steps,
            "summary": {**report.summarise(self.steps, fixed_rate, s),
                        "journal": journal_summary.summarise(self.steps)},
        }


def _pct(data: list, p: float):
    if not data:
        return None
    return data[min(len(data) - 1, max(0, int(round(p / 100.0 * (len(data) - 1)))))]


def _us(v) -> str:
    return "     -" if v is None else f"{v:6.0f}us"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _cmd(*cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info(s: dict, t_start: float) -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "wall_s": time.time() - t_start,
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_end": open("/proc/loadavg").read().split()[:3],
        "envoy": _cmd(str(ENVOY_BIN), "--version").split("version:")[-1].strip(),
        "h2load": _cmd("h2load", "--version"),
        "python": platform.python_version(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode: one 1 s saturation step per configuration")
    ap.add_argument("--wasm", help="the .wasm to measure (default: $BENCH_WASM or the release build)")
    ap.add_argument("--out", help="output directory (default: $BENCH_OUT or bench/results)")
    ap.add_argument("--duration", type=float, help="seconds per step (default: $BENCH_DURATION or 5)")
    ap.add_argument("--rounds", type=int, help="rounds of the saturation and fixed-rate phases (default 4)")
    ap.add_argument("--no-plot", action="store_true", help="do not draw latency.png")
    args = ap.parse_args()
    s = settings_from(args)
    if not Path(s["wasm"]).is_file():
        print(f"bench: {s['wasm']} does not exist: run `make wasm` or set BENCH_WASM", file=sys.stderr)
        return 2
    loadgen.ensure_h2load()
    if shutil.which("taskset") is None:
        print("bench: taskset (util-linux) is missing", file=sys.stderr)
        return 2
    # This driver, its probe servers and h2load share the load core with the backend Envoy.
    os.sched_setaffinity(0, {s["load_cpu"]})
    print(f"bench: Envoy under test on cpu {s['envoy_cpu']}, load side on cpu {s['load_cpu']}; "
          f"{s['duration_s']:g}s per step, {s['rounds']} rounds, {s['connections']} connections; wasm {s['wasm']}",
          flush=True)
    bench = Bench(s)
    try:
        bench.start()
        results = bench.run()
    finally:
        bench.stop()
    results["meta"]["wall_s"] = time.time() - bench.t_start
    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if s["plot"]:
        report.plot(results, out / "latency.png")
    (out / "results.md").write_text(report.markdown(results, plotted=s["plot"]))
    head = report.headline(results)
    for key, value in results["summary"]["journal"].items():  # the journal's keys, where report leaves them out
        if head.get(key) is None:
            head[key] = value
    (out / "summary.json").write_text(json.dumps(head, indent=1) + "\n")
    print(f"bench: done in {results['meta']['wall_s']:.0f}s; wrote {out}/results.md, results.json, summary.json"
          + (", latency.png" if s["plot"] else ""))
    print(report.headline_table(results))
    print(report.table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
