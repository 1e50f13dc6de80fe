#!/usr/bin/env python3
"""Where an Envoy under the bench's load spends its CPU per request, by difference between filter variants.

The machine is noisy (the same configuration's CPU per request moves by ±20% from one 5 s step to the next), so
every comparison is a set of A/B pairs: short closed-loop steps alternating A-B then B-A, one difference per pair,
the median reported with the range. Variants (each its own Envoy, pinned like the bench's, all alive at once):

  none          no filter
  noop          a proxy-wasm filter that does nothing (bench/profile/noop-filter): the wasm host's floor per stream
  calls50       the same, making 50 increment_metric(id, 0) host calls per request: the price of one host call
  nomatch       webhook-emitter, traffic matching no rule (bench configuration 1)
  event         webhook-emitter, job completions, 1 webhook (bench configuration 2)
  event-warn    the same with Envoy at log level warning (Envoy drops the filter's info lines, if it logs any)
  event-NAME    an ablated build from bench/profile/ablate.py (--ablation NAME=PATH.wasm)
  lua           the Lua peer, 1 webhook (bench configuration 4)
  bare          one bare asynchronous Lua httpCall per response (bench configuration 6, the floor)
  wcall-root    the do-nothing proxy-wasm filter sending the bare callout the way webhook-emitter does: a doorbell
                rung at the response's end, the callout sent from the root context, its :status read
  wcall-stream  the same callout sent from the stream's context at once (no doorbell)
  wcall-host    wcall-root plus the host calls webhook-emitter makes per event besides its callout (header maps,
                body, clock, random bytes, counters): event − wcall-host is the filter's own code

`--pair A:B` (repeatable) runs only those comparisons, with only the variants they name, and skips perf and strace
unless asked: the quick way to compare two builds (`--ablation new=PATH.wasm --pair event:event-new`).

Then, for none/nomatch/event/lua: `perf record -e cpu-clock` (no hardware counters in this VM) by shared object
(Envoy is stripped, so its own code, V8 and LuaJIT included, is one bucket; the wasm's JIT code is `[JIT] tid N`),
and with strace present, the system calls per request (strace -c -f, 3 s at 2,000 req/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

from harness.envoy import wasm_http_filter  # noqa: E402
from harness.servers import Receiver  # noqa: E402

import envoyproc  # noqa: E402
import loadgen  # noqa: E402
import topology  # noqa: E402
from probe import TimedJobService  # noqa: E402

BASE_PAIRS = [("none", "noop"), ("noop", "calls50"), ("none", "nomatch"), ("event", "event-warn"), ("lua", "event"),
              # The event, step by step from the bare Lua callout: a proxy-wasm callout sent as ours is, the
              # host calls of an event, then the filter's own code.
              ("bare", "wcall-root"), ("wcall-root", "wcall-host"), ("wcall-host", "event")]
PROFILED = ("none", "nomatch", "event", "lua", "bare")


def noop_filter(wasm: Path, mode: str) -> dict:
    f = wasm_http_filter(wasm, mode)
    f["typed_config"]["config"]["vm_config"]["vm_id"] = "noop"
    f["typed_config"]["config"]["name"] = f["typed_config"]["config"]["root_id"] = "noop"
    return f


def perf_dso(data: Path) -> list:
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "--percent-limit", "0.5"],
                         capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line.split()[0].endswith("%"):
            pct, _, name = line.partition("%")
            rows.append((float(pct), " ".join(name.split())))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", required=True)
    ap.add_argument("--noop", required=True)
    ap.add_argument("--ablation", action="append", default=[], help="NAME=PATH.wasm (from ablate.py)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--pair", action="append", default=[], help="A:B, only these comparisons (repeatable)")
    ap.add_argument("--out")
    args = ap.parse_args()
    ablations = dict(a.split("=", 1) for a in args.ablation)
    envoy_cpu, load_cpu = 0, 1 if (os.cpu_count() or 1) > 1 else 0
    os.sched_setaffinity(0, {load_cpu})
    (REPO / ".cache").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=REPO / ".cache"))
    probe_jobs, probe_rx = TimedJobService().start(), Receiver().start()
    backend = envoyproc.EnvoyProcess("backend", topology.backend_bootstrap(), work, load_cpu, "warning").start()
    envoys, hooks = {}, {}
    pairs = [tuple(p.split(":", 1)) for p in args.pair] or \
        BASE_PAIRS + [("event", f"event-{n}") for n in ablations]
    wanted = {v for p in pairs for v in p} | (set() if args.pair else set(PROFILED))
    try:
        backend.wait_ready(["jobs", "hooks"])
        jp, hp = backend.ports["jobs"], backend.ports["hooks"]
        filters = {"none": [], "noop": [noop_filter(Path(args.noop), "noop")],
                   "calls50": [noop_filter(Path(args.noop), "metrics:50")]}
        for v, wasm in [("nomatch", args.wasm), ("event", args.wasm), ("event-warn", args.wasm),
                        *[(f"event-{n}", w) for n, w in ablations.items()]]:
            hooks[v] = topology.Webhooks(1, hp, probe_rx.port)
            filters[v] = [wasm_http_filter(Path(wasm), hooks[v].plugin_config())]
        hooks["lua"] = topology.Webhooks(1, hp, probe_rx.port)
        filters["lua"] = [topology.lua_filter(hooks["lua"])]
        hooks["bare"] = topology.Webhooks(1, hp, probe_rx.port)
        filters["bare"] = [topology.bare_callout_filter(hooks["bare"])]
        for v in ("wcall-root", "wcall-stream", "wcall-host"):
            hooks[v] = topology.Webhooks(1, hp, probe_rx.port)
            hook = hooks[v].load[0]
            authority = hook.url.split("//", 1)[1].split("/", 1)[0]
            filters[v] = [noop_filter(Path(args.noop), f"callout-{v[6:]} webhooks {authority} {hook.path}")]
        filters = {v: f for v, f in filters.items() if v in wanted}
        for v, f in filters.items():
            boot = topology.under_test_bootstrap(v, f, jp, hp, probe_jobs.port, probe_rx.port)
            envoys[v] = envoyproc.EnvoyProcess(v, boot, work, envoy_cpu,
                                               "warning" if v == "event-warn" else "info").start()
        for e in envoys.values():
            e.wait_ready(["ingress"], timeout=120)

        def target(v):
            path = topology.NON_MATCHING_PATH if v == "nomatch" else topology.MATCHING_PATH
            headers = {"x-organisation-id": hooks[v].load_org} if v in hooks else {}
            return f"http://127.0.0.1:{envoys[v].ports['ingress']}{path}", headers

        def completed(e):
            st = "http.ingress.downstream_rq_completed"
            return e.stats("^" + st.replace(".", r"\.") + "$").get(st, 0)

        def settle(e):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                st = e.stats(r"^cluster\.webhooks\.upstream_rq_active$|^wasmcustom\.webhook_emitter\.outbox_depth$")
                if not any(st.values()):
                    return
                time.sleep(0.05)

        def step(v: str, duration: float, rate=None, connections=None) -> dict:
            e = envoys[v]
            url, headers = target(v)
            n0, c0 = completed(e), e.cpu_seconds()
            res = loadgen.run(url, headers, duration, connections or args.connections, rate, load_cpu,
                              work / "h2load.log", timeout_s=duration + 60)
            settle(e)
            n1, c1 = completed(e), e.cpu_seconds()
            return {"variant": v, "rps": res.rps, "cpu_us": (c1 - c0) / max(1, n1 - n0) * 1e6}

        for v in envoys:  # warm-up
            step(v, 2.0)
        results = []
        # Round-robin over the comparisons, so that the machine's drift (other users come and go) falls on all
        # of them alike.
        for i in range(args.pairs):
            for a, b in pairs:
                ra, rb = (step(a, args.duration), step(b, args.duration)) if i % 2 == 0 else \
                    tuple(reversed((step(b, args.duration), step(a, args.duration))))
                results.append({"a": a, "b": b, "pair": i, "a_rps": ra["rps"], "b_rps": rb["rps"],
                                "a_cpu_us": ra["cpu_us"], "b_cpu_us": rb["cpu_us"]})
        for a, b in pairs:
            diffs = [r["b_cpu_us"] - r["a_cpu_us"] for r in results if (r["a"], r["b"]) == (a, b)]
            ratios = [r["b_cpu_us"] / r["a_cpu_us"] for r in results if (r["a"], r["b"]) == (a, b)]
            print(f"{b} − {a}: {statistics.median(diffs):+.1f} us/request  {[round(d, 1) for d in diffs]}  "
                  f"{b}/{a}: {statistics.median(ratios):.3f} {[round(x, 3) for x in ratios]}", flush=True)

        syscalls = {}
        if args.strace:
            for v in [v for v in PROFILED if v in envoys]:
                e, out = envoys[v], work / f"strace-{v}.txt"
                tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(e.pid), "-o", str(out)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                url, headers = target(v)
                res = loadgen.run(url, headers, 3.0, 16, 2000.0, load_cpu, work / "h2load.log", timeout_s=60)
                settle(e)
                tracer.terminate()
                tracer.wait(30)
                counts = {}
                for line in out.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                        counts[parts[-1]] = int(parts[3]) / max(1, res.succeeded)
                syscalls[v] = counts
        perf = {}
        if args.perf:
            for v in [v for v in PROFILED if v in envoys]:
                data = work / f"perf-{v}.data"
                rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-p",
                                        str(envoys[v].pid), "-o", str(data), "--", "sleep", "5"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                r = step(v, 5.0)
                rec.wait(60)
                perf[v] = {"cpu_us": r["cpu_us"], "dso": perf_dso(data)}
    finally:
        for e in [*envoys.values(), backend]:
            e.stop()
        probe_jobs.stop()
        probe_rx.stop()

    lines = [f"A/B pairs: {args.pairs} pairs of {args.duration:g} s closed-loop steps ({args.connections} connections) "
             "per comparison, order alternating; the difference is taken within each pair.", "",
             "| B − A | Envoy CPU µs/request, median difference (min … max over pairs) | B/A throughput (median) "
             "| A's CPU µs/request (median) |", "|---|---|---|---|"]
    for a, b in pairs:
        rs = [r for r in results if (r["a"], r["b"]) == (a, b)]
        d = [r["b_cpu_us"] - r["a_cpu_us"] for r in rs]
        lines.append(f"| {b} − {a} | {statistics.median(d):+.1f} ({min(d):+.1f} … {max(d):+.1f}) "
                     f"| {statistics.median(r['b_rps'] / r['a_rps'] for r in rs):.1%} "
                     f"| {statistics.median(r['a_cpu_us'] for r in rs):.1f} |")
    if perf:
        dsos = []
        for p in perf.values():
            for _, name in p["dso"]:
                key = "[JIT] (wasm code)" if name.startswith("[JIT]") else name
                if key not in dsos:
                    dsos.append(key)
        lines += ["", "perf (cpu-clock, 5 s closed loop): CPU µs per request by shared object (share of samples × "
                      "the step's Envoy CPU per request):", "",
                  "| shared object | " + " | ".join(perf) + " |", "|---|" + "---|" * len(perf)]
        for dname in dsos:
            cells = []
            for p in perf.values():
                share = sum(pct for pct, name in p["dso"]
                            if name == dname or (dname.startswith("[JIT]") and name.startswith("[JIT]")))
                cells.append(f"{share / 100 * p['cpu_us']:.1f}")
            lines.append(f"| {dname} | " + " | ".join(cells) + " |")
        lines.append("| total | " + " | ".join(f"{p['cpu_us']:.1f}" for p in perf.values()) + " |")
    if syscalls:
        names = sorted({n for c in syscalls.values() for n, k in c.items() if k >= 0.05},
                       key=lambda n: -max(c.get(n, 0) for c in syscalls.values()))
        lines += ["", "System calls per request (strace -c -f, 3 s at 2,000 req/s over 16 connections):", "",
                  "| syscall | " + " | ".join(syscalls) + " |", "|---|" + "---|" * len(syscalls)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{c.get(n, 0):.2f}" for c in syscalls.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    (work / "results.json").write_text(json.dumps({"pairs": results, "perf": perf, "syscalls": syscalls}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
