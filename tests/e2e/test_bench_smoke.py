"""`make bench`'s harness (bench/bench.py) in its quick mode: one 1 s closed-loop step for each of the nine
configurations (no filter, the filter on non-matching traffic, the filter with 1 and with 10 webhooks, the Lua
peer, the gated filter on non-matching traffic, the bare Lua callout, the filter with 1 and with 10 webhooks and the
journal in etcd), against the real Envoy. Asserts only that each configuration produced numbers, that configurations
2-4 and 6-8 delivered webhooks and that summary.json has its keys (the journal's too); the numbers themselves mean
nothing at this length.

The load generator (h2load) is installed by the harness the same way `make bench` does (bench/ensure-h2load.sh);
if that is impossible the bench exits non-zero saying so, and this test fails with its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_mode_measures_every_configuration(wasm, tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}  # the user's knobs stay out
    env["BENCH_WORK"] = str(tmp_path / "work")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--quick", "--wasm", str(wasm), "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(REPO),
    )
    assert proc.returncode == 0, f"bench --quick failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").is_file()
    steps = {s["config"]: s for s in results["steps"] if s["phase"] == "saturation"}
    assert sorted(steps) == [0, 1, 2, 3, 4, 5, 6, 7, 8], f"configurations measured: {sorted(steps)}\n{proc.stdout}"
    for c, s in steps.items():
        assert s["rps"] > 0 and s["succeeded"] > 0, f"configuration {c}: no throughput: {s}"
        assert s["non_2xx"] == 0 and s["failed"] == 0, f"configuration {c}: failed requests: {s}"
        assert s["p50_us"] and s["p99_us"], f"configuration {c}: no latency: {s}"
        assert s["envoy_requests"] > 0 and s["cpu_s_per_1k"] is not None and s["rss_mib"] > 0, f"configuration {c}: {s}"
    for c in (2, 3, 4, 6, 7, 8):
        assert steps[c]["deliveries"] > 0, f"configuration {c}: no delivery reached the receiver: {steps[c]}"
    assert results["wasm"]["bytes"] > 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("passthrough_gated_cpu_vs_none", "passthrough_ungated_cpu_vs_none", "event1_cpu_vs_lua_peer",
                "event1_cpu_vs_bare_callout", "event10_cpu_vs_lua_peer", "wasm_bytes"):
        assert isinstance(summary.get(key), (int, float)) and summary[key] > 0, f"summary.json {key}: {summary}"
    # The journal's: requests etcd handled per event, the overload's drops (a number, whatever it is at this length).
    for key in ("journal_etcd_requests_per_event", "overload_dropped_with_journal"):
        assert isinstance(summary.get(key), (int, float)), f"summary.json {key}: {summary}"
    # No probe in the smoke run: the latency key is there, without a number.
    assert "event_to_receiver_p99_ms" in summary, summary
    assert summary["git_commit"] == results["meta"]["git_commit"] and summary["git_commit"], summary
