"""Summary, markdown report and latency plot of a bench run (bench/bench.py)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

TARGETS = {
    "cfg1_throughput_vs_0": 0.97,
    "cfg1_p99_delta_us": 50.0,
    "cfg2_throughput_vs_0": 0.85,
    "cfg2_vs_4_throughput": 1.3,
    "e2r_p99_ms": 20.0,
    "wasm_bytes": 250 * 1000,
}


def _med(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _pct(data: list, p: float) -> Optional[float]:
    if not data:
        return None
    data = sorted(data)
    return data[min(len(data) - 1, max(0, int(round(p / 100.0 * (len(data) - 1)))))]


def _steps(steps, phase, config):
    return [r for r in steps if r["phase"] == phase and r["config"] == config]


def _per_round(steps, phase, config, base, fn):
    """fn(step of config, step of base) for every round where both ran; their median."""
    out = []
    for r in _steps(steps, phase, config):
        b = [x for x in _steps(steps, phase, base) if x["round"] == r["round"]]
        if b:
            v = fn(r, b[0])
            if v is not None:
                out.append(v)
    return _med(out), out


def _ratio(key):
    return lambda a, b: a[key] / b[key] if a.get(key) and b.get(key) else None


def _delta(key):
    return lambda a, b: a[key] - b[key] if a.get(key) is not None and b.get(key) is not None else None


def summarise(steps: list, fixed_rate, s: dict) -> dict:
    configs = sorted({r["config"] for r in steps})
    per = {}
    for c in configs:
        sat, fix = _steps(steps, "saturation", c), _steps(steps, "fixed", c)
        e2r = [x for r in fix for x in r.get("e2r_ms", [])]
        own = _steps(steps, "own-half", c)
        own_e2r = [x for r in own for x in r.get("e2r_ms", [])]
        per[str(c)] = {
            "sat_rps": _med(r["rps"] for r in sat),
            "sat_rps_rounds": [r["rps"] for r in sat],
            "sat_p50_us": _med(r["p50_us"] for r in sat),
            "sat_p99_us": _med(r["p99_us"] for r in sat),
            "sat_cpu_s_per_1k": _med(r["cpu_s_per_1k"] for r in sat),
            "sat_envoy_cpu_util": _med(r["envoy_cpu_util"] for r in sat),
            "sat_load_core_util": _med(r["load_core_util"] for r in sat),
            "sat_deliveries_per_s": _med(r.get("deliveries_per_s") for r in sat),
            "sat_delivery_completeness": _med(r.get("delivery_completeness") for r in sat),
            "sat_drain_s": _med(r.get("drain_s") for r in sat),
            "fixed_rps": _med(r["rps"] for r in fix),
            "fixed_p50_us": _med(r["p50_us"] for r in fix),
            "fixed_p99_us": _med(r["p99_us"] for r in fix),
            "fixed_cpu_s_per_1k": _med(r["cpu_s_per_1k"] for r in fix),
            "fixed_deliveries_per_s": _med(r.get("deliveries_per_s") for r in fix),
            "fixed_delivery_completeness": _med(r.get("delivery_completeness") for r in fix),
            "fixed_e2r_p50_ms": _pct(e2r, 50),
            "fixed_e2r_p99_ms": _pct(e2r, 99),
            "fixed_e2r_samples": len(e2r),
            "fixed_probe_missing": sum(r.get("probe_missing", 0) for r in fix),
            "own_half_rate": own[0]["offered_rps"] if own else None,
            "own_half_rps": own[0]["rps"] if own else None,
            "own_half_p99_us": own[0]["p99_us"] if own else None,
            "own_half_deliveries_per_s": own[0].get("deliveries_per_s") if own else None,
            "own_half_delivery_completeness": own[0].get("delivery_completeness") if own else None,
            "own_half_e2r_p50_ms": _pct(own_e2r, 50),
            "own_half_e2r_p99_ms": _pct(own_e2r, 99),
            "own_half_e2r_samples": len(own_e2r),
            "own_half_probe_missing": sum(r.get("probe_missing", 0) for r in own),
            "fixed_over_capacity": any(r.get("over_capacity") for r in fix),
            "rss_mib": max((r["rss_mib"] for r in steps if r["config"] == c), default=None),
            "peak_rss_mib": max((r["peak_rss_mib"] for r in steps if r["config"] == c), default=None),
            "dropped_queue_full": sum(r.get("dropped_queue_full", 0) for r in steps if r["config"] == c),
            "max_foreign_cpu_on_envoy_core": max((r["foreign_cpu_on_envoy_core"] for r in steps
                                                  if r["config"] == c and r["phase"] != "warmup"), default=None),
        }
    ratios = {}
    for c in configs:
        if c == 0:
            continue
        ratios[f"{c}_vs_0_sat_rps"], ratios[f"{c}_vs_0_sat_rps_rounds"] = _per_round(
            steps, "saturation", c, 0, _ratio("rps"))
        ratios[f"{c}_vs_0_sat_cpu_per_1k"], _ = _per_round(steps, "saturation", c, 0, _ratio("cpu_s_per_1k"))
        ratios[f"{c}_vs_0_fixed_cpu_per_1k"], _ = _per_round(steps, "fixed", c, 0, _ratio("cpu_s_per_1k"))
        ratios[f"{c}_minus_0_fixed_p50_us"], _ = _per_round(steps, "fixed", c, 0, _delta("p50_us"))
        ratios[f"{c}_minus_0_fixed_p99_us"], ratios[f"{c}_minus_0_fixed_p99_us_rounds"] = _per_round(
            steps, "fixed", c, 0, _delta("p99_us"))
    if 2 in configs and 4 in configs:
        ratios["2_vs_4_sat_rps"], ratios["2_vs_4_sat_rps_rounds"] = _per_round(steps, "saturation", 2, 4,
                                                                               _ratio("rps"))
        # How much more CPU the peer spends per request than the filter (>1: the filter is cheaper).
        ratios["4_vs_2_sat_cpu_per_1k"], _ = _per_round(steps, "saturation", 4, 2, _ratio("cpu_s_per_1k"))
        ratios["4_vs_2_fixed_cpu_per_1k"], _ = _per_round(steps, "fixed", 4, 2, _ratio("cpu_s_per_1k"))
    if any(r["phase"] == "ab-sat-01" for r in steps):
        ratios["ab_1_vs_0_sat_rps"], ratios["ab_1_vs_0_sat_rps_pairs"] = _per_round(steps, "ab-sat-01", 1, 0,
                                                                                  _ratio("rps"))
        ratios["ab_1_vs_0_sat_cpu_per_1k"], _ = _per_round(steps, "ab-sat-01", 1, 0, _ratio("cpu_s_per_1k"))
        ratios["ab_1_minus_0_fixed_p50_us"], _ = _per_round(steps, "ab-fixed-01", 1, 0, _delta("p50_us"))
        ratios["ab_1_minus_0_fixed_p99_us"], ratios["ab_1_minus_0_fixed_p99_us_pairs"] = _per_round(
            steps, "ab-fixed-01", 1, 0, _delta("p99_us"))
        ratios["ab_1_vs_0_fixed_cpu_per_1k"], _ = _per_round(steps, "ab-fixed-01", 1, 0, _ratio("cpu_s_per_1k"))
    if any(r["phase"] == "ab-sat-24" for r in steps):
        ratios["ab_2_vs_4_sat_rps"], ratios["ab_2_vs_4_sat_rps_pairs"] = _per_round(steps, "ab-sat-24", 2, 4,
                                                                                  _ratio("rps"))
        ratios["ab_4_vs_2_sat_cpu_per_1k"], _ = _per_round(steps, "ab-sat-24", 4, 2, _ratio("cpu_s_per_1k"))
    # Envoy CPU per request, ours over theirs: the headline figures (summary.json). The A/B pairs give the
    # finer figure; the saturation rounds stand in when there are no pairs (the smoke run).
    for ours, theirs in HEADLINE_PAIRS:
        a, b = sorted((ours, theirs))
        ratios[f"{ours}_vs_{theirs}_sat_cpu_per_1k"], _ = _per_round(steps, "saturation", ours, theirs,
                                                                     _ratio("cpu_s_per_1k"))
        if any(r["phase"] == f"ab-sat-{a}{b}" for r in steps):
            ratios[f"ab_{ours}_vs_{theirs}_sat_cpu_per_1k"], ratios[f"ab_{ours}_vs_{theirs}_sat_cpu_per_1k_pairs"] = \
                _per_round(steps, f"ab-sat-{a}{b}", ours, theirs, _ratio("cpu_s_per_1k"))
    for c in configs:
        ab = [r["cpu_s_per_1k"] for r in steps if r["config"] == c and r["phase"].startswith("ab-sat-")]
        per[str(c)]["ab_cpu_us_per_request"] = None if not ab else _med(ab) * 1000.0
        sat = per[str(c)]["sat_cpu_s_per_1k"]
        per[str(c)]["sat_cpu_us_per_request"] = None if sat is None else sat * 1000.0
    return {"per_config": per, "ratios": ratios}


# (ours, theirs) for the headline ratios, and their keys in summary.json. (7, 2) is the journal's cost: computed
# when the bench runs that pair (phase ab-sat-27), never taken from the saturation rounds.
HEADLINE_PAIRS = ((5, 0), (1, 0), (2, 4), (2, 6), (3, 4), (7, 2))
HEADLINE_KEYS = {
    (5, 0): "passthrough_gated_cpu_vs_none",
    (1, 0): "passthrough_ungated_cpu_vs_none",
    (2, 4): "event1_cpu_vs_lua_peer",
    (2, 6): "event1_cpu_vs_bare_callout",
    (3, 4): "event10_cpu_vs_lua_peer",
}
HEADLINE_TARGETS = {
    "passthrough_gated_cpu_vs_none": 1.03,
    "event1_cpu_vs_lua_peer": 1.00,
    "event1_cpu_vs_bare_callout": 1.25,
    "event_to_receiver_p99_ms": 5.0,
}
# The journal's figures in summary.json: null ("not measured") until the bench measures them. The CPU ratio comes
# from the (7, 2) A/B pairs; the others from results["summary"]["journal"], where the bench puts what it measured
# under these same keys (it may put the ratio there too, from another pair of configurations).
JOURNAL_KEYS = ("journal_cpu_vs_memory", "journal_etcd_requests_per_event", "overload_dropped_with_journal")
JOURNAL_TARGETS = {
    "journal_cpu_vs_memory": 1.30,
    "journal_etcd_requests_per_event": 0.25,
    "overload_dropped_with_journal": 0,
}


def headline(results: dict) -> dict:
    """summary.json: Envoy CPU per request, ours over theirs (lower is better), medians of the A/B pairs (of the
    saturation rounds in the smoke run, which has no pairs); event-to-receiver p99 of configuration 2 at half its
    own saturation (null in the smoke run)."""
    ratios, per = results["summary"]["ratios"], results["summary"]["per_config"]
    out = {}
    for pair, key in HEADLINE_KEYS.items():
        ab = ratios.get(f"ab_{pair[0]}_vs_{pair[1]}_sat_cpu_per_1k")
        out[key] = ab if ab is not None else ratios.get(f"{pair[0]}_vs_{pair[1]}_sat_cpu_per_1k")
    out["event_to_receiver_p99_ms"] = per.get("2", {}).get("own_half_e2r_p99_ms")
    out["wasm_bytes"] = results["wasm"]["bytes"]
    out["git_commit"] = results["meta"]["git_commit"]
    out["ratios_from"] = "A/B pairs" if any(
        ratios.get(f"ab_{a}_vs_{b}_sat_cpu_per_1k") is not None for a, b in HEADLINE_KEYS) else "saturation rounds"
    out["cpu_us_per_request"] = {c: (p.get("ab_cpu_us_per_request") or p.get("sat_cpu_us_per_request"))
                                 for c, p in per.items()}
    journal = results["summary"].get("journal") or {}
    out["journal_cpu_vs_memory"] = journal.get("journal_cpu_vs_memory", ratios.get("ab_7_vs_2_sat_cpu_per_1k"))
    for key in JOURNAL_KEYS[1:]:
        out[key] = journal.get(key)
    out["configs"] = results["configs"]
    out["targets"] = {**HEADLINE_TARGETS, **JOURNAL_TARGETS}
    out["quick"] = bool(results["settings"]["quick"])
    return out


def targets(results: dict) -> list:
    summ, per = results["summary"]["ratios"], results["summary"]["per_config"]
    rows = []

    def add(name, target, value, ok, fmt):
        rows.append({"target": name, "goal": target, "measured": None if value is None else fmt(value),
                     "met": None if value is None else bool(ok(value))})

    def both(ab, rounds):
        """The A/B pairs' figure when there is one (it is the finer), else the rounds'."""
        return summ.get(ab) if summ.get(ab) is not None else summ.get(rounds)

    def note(ab, rounds, fmt):
        if summ.get(ab) is None or summ.get(rounds) is None:
            return fmt
        return lambda v: f"{fmt(v)} (A/B pairs; rounds: {fmt(summ[rounds])})"

    pct = lambda v: f"{v:.1%}"  # noqa: E731
    us = lambda v: f"{v:+.0f} µs"  # noqa: E731
    times = lambda v: f"{v:.2f}×"  # noqa: E731
    head = headline(results)
    for key, names in (("passthrough_gated_cpu_vs_none", "pass-through, gated (5) vs no filter (0)"),
                       ("event1_cpu_vs_lua_peer", "1 webhook (2) vs the Lua peer (4)"),
                       ("event1_cpu_vs_bare_callout", "1 webhook (2) vs the bare Lua callout (6)")):
        goal = HEADLINE_TARGETS[key]
        add(f"Envoy CPU per request: {names}", f"≤ {goal:.2f}×", head[key], lambda v, g=goal: v <= g, times)
    add("event-to-receiver p99, 1 webhook (2), at half its saturation", "≤ 5 ms", head["event_to_receiver_p99_ms"],
        lambda v: v <= 5.0, lambda v: f"{v:.1f} ms")
    goal = JOURNAL_TARGETS
    add("Envoy CPU per request: 1 webhook with the journal vs without (A/B pairs)",
        f"≤ {goal['journal_cpu_vs_memory']:.2f}×", head["journal_cpu_vs_memory"],
        lambda v: v <= goal["journal_cpu_vs_memory"], times)
    add("etcd requests per event at saturation, with the journal", f"≤ {goal['journal_etcd_requests_per_event']}",
        head["journal_etcd_requests_per_event"], lambda v: v <= goal["journal_etcd_requests_per_event"],
        lambda v: f"{v:.2f}")
    add("deliveries dropped in overload with the journal (10 webhooks at saturation)", "0",
        head["overload_dropped_with_journal"], lambda v: v <= 0, lambda v: f"{v:.0f}")
    add("1 vs 0 throughput at saturation", "≥ 97%", both("ab_1_vs_0_sat_rps", "1_vs_0_sat_rps"),
        lambda v: v >= 0.97, note("ab_1_vs_0_sat_rps", "1_vs_0_sat_rps", pct))
    add("1 vs 0 p99 at the fixed rate", "≤ +50 µs", both("ab_1_minus_0_fixed_p99_us", "1_minus_0_fixed_p99_us"),
        lambda v: v <= 50, note("ab_1_minus_0_fixed_p99_us", "1_minus_0_fixed_p99_us", us))
    add("2 vs 0 throughput at saturation", "≥ 85%", summ.get("2_vs_0_sat_rps"), lambda v: v >= 0.85, pct)
    add("2 vs 4 (Lua) throughput at saturation", "≥ 1.3×", both("ab_2_vs_4_sat_rps", "2_vs_4_sat_rps"),
        lambda v: v >= 1.3, note("ab_2_vs_4_sat_rps", "2_vs_4_sat_rps", times))
    for c in ("2", "3", "4", "7"):
        p = per.get(c, {})
        add(f"config {c}: event-to-receiver p99 at half its own saturation", "≤ 20 ms", p.get("own_half_e2r_p99_ms"),
            lambda v: v <= 20, lambda v: f"{v:.1f} ms")
    add(".wasm size", "≤ 250 KB", results["wasm"]["bytes"], lambda v: v <= 250_000,
        lambda v: f"{v / 1000:.0f} KB ({v} bytes)")
    return rows


def _f(v, fmt="{:.0f}", none="–"):
    return none if v is None else fmt.format(v)


def _us_per_req(s_per_1k):
    return None if s_per_1k is None else s_per_1k * 1000.0


def headline_table(results: dict) -> str:
    head = headline(results)
    rat = results["summary"]["ratios"]
    lines = ["| Envoy CPU per request, ours over theirs | median | pairs |", "|---|---|---|"]
    for (ours, theirs), key in HEADLINE_KEYS.items():
        pairs = rat.get(f"ab_{ours}_vs_{theirs}_sat_cpu_per_1k_pairs") or []
        lines.append(f"| `{key}` ({ours} vs {theirs}) | {_f(head[key], '{:.3f}')}× "
                     f"| {', '.join(f'{v:.2f}' for v in pairs) or '–'} |")
    for key in JOURNAL_KEYS:
        lines.append(f"| `{key}` | {_f(head[key], '{:.3g}', 'not measured')} | – |")
    lines += ["", f"Event-to-receiver p99 (configuration 2, half its own saturation): "
                  f"{_f(head['event_to_receiver_p99_ms'], '{:.1f}')} ms. Ratios from {head['ratios_from']}.", ""]
    return "\n".join(lines)


def table(results: dict) -> str:
    per, rat = results["summary"]["per_config"], results["summary"]["ratios"]
    fixed = results.get("fixed_rate_rps")
    lines = [
        f"| # | configuration | saturation req/s | vs 0 | p50 / p99 at {_f(fixed)} req/s (µs) | p99 − cfg 0 (µs) "
        f"| p50 / p99 at saturation (µs) | Envoy CPU µs / req (fixed / sat / A/B) | CPU vs 0 (sat) | RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, name in results["configs"].items():
        p = per.get(c)
        if not p:
            continue
        vs0 = "1" if c == "0" else _f(rat.get(f"{c}_vs_0_sat_rps"), "{:.1%}")
        d99 = "0" if c == "0" else _f(rat.get(f"{c}_minus_0_fixed_p99_us"), "{:+.0f}")
        cpu0 = "1" if c == "0" else _f(rat.get(f"{c}_vs_0_sat_cpu_per_1k"), "{:.2f}×")
        mark = "†" if p.get("fixed_over_capacity") else ""
        lines.append(
            f"| {c} | {name} | {_f(p['sat_rps'])} | {vs0} | {_f(p['fixed_p50_us'])} / {_f(p['fixed_p99_us'])}{mark} "
            f"| {d99} | {_f(p['sat_p50_us'])} / {_f(p['sat_p99_us'])} "
            f"| {_f(_us_per_req(p['fixed_cpu_s_per_1k']), '{:.1f}')} / {_f(p.get('sat_cpu_us_per_request'), '{:.1f}')}"
            f" / {_f(p.get('ab_cpu_us_per_request'), '{:.1f}')} | {cpu0} "
            f"| {_f(p['rss_mib'], '{:.0f}')} (peak {_f(p['peak_rss_mib'], '{:.0f}')}) |")
    lines += [
        "",
        f"| # | at {_f(fixed)} req/s: deliveries/s, delivered/expected, event→receiver p50 / p99 (ms) "
        f"| at half its own saturation: rate, deliveries/s, event→receiver p50 / p99 (ms) "
        f"| at saturation: deliveries/s, delivered/expected, drain (s) | dropped (queue full) |",
        "|---|---|---|---|---|",
    ]
    for c in ("2", "3", "4", "6", "7"):
        p = per.get(c)
        if not p:
            continue
        mark = "†" if p.get("fixed_over_capacity") else ""
        lines.append(
            f"| {c} | {_f(p['fixed_deliveries_per_s'])}{mark}, {_f(p['fixed_delivery_completeness'], '{:.1%}')}, "
            f"{_f(p['fixed_e2r_p50_ms'], '{:.1f}')} / {_f(p['fixed_e2r_p99_ms'], '{:.1f}')}{mark} "
            f"(n={p['fixed_e2r_samples']}, missing {p['fixed_probe_missing']}) "
            f"| {_f(p['own_half_rate'])} req/s, {_f(p['own_half_deliveries_per_s'])}, "
            f"{_f(p['own_half_e2r_p50_ms'], '{:.1f}')} / {_f(p['own_half_e2r_p99_ms'], '{:.1f}')} "
            f"(n={p['own_half_e2r_samples']}, missing {p['own_half_probe_missing']}) "
            f"| {_f(p['sat_deliveries_per_s'])}, {_f(p['sat_delivery_completeness'], '{:.1%}')}, "
            f"{_f(p['sat_drain_s'], '{:.2f}')} | {p['dropped_queue_full']} |")
    if any(p.get("fixed_over_capacity") for p in per.values()):
        over = ", ".join(c for c, p in per.items() if p.get("fixed_over_capacity"))
        lines += ["", f"† over capacity: the fixed rate ({_f(fixed)} req/s) is above the saturation throughput of "
                      f"configuration(s) {over}, so those figures are taken in overload (h2load then sends as fast "
                      f"as they answer, over {results['settings']['rate_connections']} connections)."]
    if "2_vs_4_sat_rps" in rat:
        lines += ["", f"2 vs 4 (filter vs Lua peer): throughput {_f(rat['2_vs_4_sat_rps'], '{:.2f}')}× at saturation; "
                      f"the peer spends {_f(rat.get('4_vs_2_sat_cpu_per_1k'), '{:.2f}')}× the filter's CPU per request "
                      f"at saturation, {_f(rat.get('4_vs_2_fixed_cpu_per_1k'), '{:.2f}')}× at the fixed rate."]
    if "ab_1_vs_0_sat_rps" in rat:
        pairs = ", ".join(f"{v:.0%}" for v in rat["ab_1_vs_0_sat_rps_pairs"])
        lines += ["", f"A/B pairs ({results['settings']['ab_pairs']} pairs of {results['settings']['ab_duration_s']:g} s "
                      f"steps, alternating order): 1 vs 0 throughput {_f(rat['ab_1_vs_0_sat_rps'], '{:.1%}')} "
                      f"(pairs: {pairs}), CPU per request {_f(rat.get('ab_1_vs_0_sat_cpu_per_1k'), '{:.2f}')}× at "
                      f"saturation and {_f(rat.get('ab_1_vs_0_fixed_cpu_per_1k'), '{:.2f}')}× at {_f(fixed)} req/s; "
                      f"latency at {_f(fixed)} req/s p50 {_f(rat.get('ab_1_minus_0_fixed_p50_us'), '{:+.0f}')} µs, "
                      f"p99 {_f(rat.get('ab_1_minus_0_fixed_p99_us'), '{:+.0f}')} µs; 2 vs 4 throughput "
                      f"{_f(rat.get('ab_2_vs_4_sat_rps'), '{:.2f}')}×, the peer's CPU per request "
                      f"{_f(rat.get('ab_4_vs_2_sat_cpu_per_1k'), '{:.2f}')}× the filter's."]
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in targets(results):
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured'] or 'not measured'} | {met} |")
    return "\n".join(lines) + "\n"


def markdown(results: dict, plotted: bool) -> str:
    m, s, w = results["meta"], results["settings"], results["wasm"]
    sat_rounds = ", ".join(
        f"cfg {c}: " + " / ".join(f"{v:.0f}" for v in p["sat_rps_rounds"])
        for c, p in results["summary"]["per_config"].items())
    steps = results["steps"]
    load_util = max((r["load_core_util"] or 0 for r in steps if r["phase"] == "saturation"), default=0)
    envoy_util = [r["envoy_cpu_util"] or 0 for r in steps if r["phase"] == "saturation"]
    foreign = max((r["foreign_cpu_on_envoy_core"] for r in steps if r["phase"] != "warmup"), default=0)
    out = [
        "# webhook-emitter benchmark (`make bench`)",
        "",
        f"Run {m['date_utc']}, {m['wall_s']:.0f} s, commit `{m['git_commit']}`"
        + (" (src/ had uncommitted changes)" if m.get("src_dirty") else "") + ". "
        f"Envoy `{m['envoy']}`, {m['h2load']}. Machine: {m['cpus']} × {m['cpu_model']}, Linux {m['kernel']}, "
        f"load average at the end {' '.join(m['loadavg_end'])}.",
        "",
        f"`.wasm`: `{w['path']}`, **{w['bytes']} bytes** (sha256 `{w['sha256'][:16]}…`).",
        "",
        f"Settings: {s['duration_s']:g} s per step, {s['rounds']} interleaved rounds, {s['connections']} "
        f"connections, probe {s['probe_rate']:g} events/s, Envoy log level `{s['log_level']}`"
        + (" — **quick (smoke) mode, the numbers mean nothing**" if s["quick"] else "") + ".",
        "",
        "## Results",
        "",
        "Medians over the rounds; ratios are taken per round (each configuration against configuration 0 of the "
        "same round) and their median is shown. Latency is client-side (h2load), request start to end of response.",
        "",
        headline_table(results),
        table(results),
        "",
    ]
    if plotted:
        out += ["![latency vs offered load](latency.png)", ""]
    out += [
        "## Method",
        "",
        "- One Envoy 1.40 binary (`.venv/bin/envoy`) for everything. Five Envoys under test, one per configuration, "
        "each `--concurrency 1`, all pinned with `taskset` to cpu "
        f"{s['envoy_cpu']}; they run for the whole run, idle except when measured, so the configurations can be "
        f"interleaved. The backend Envoy, h2load, the probe and this driver are pinned to cpu {s['load_cpu']}.",
        "- Backend Envoy (`direct_response`): listener `jobs` answers every request 200 with the completed-job JSON "
        "(the job service), listener `hooks` answers 200, empty (the webhook receivers). Deliveries are counted with "
        "its `http.hooks.downstream_rq_2xx`. Both listeners read the whole request first (buffer filter): a "
        "`direct_response` sent before a POST's body is read makes Envoy close the connection, and every delivery "
        "then paid a new TCP connection.",
        "- Requests: `POST /jobs/<id>/complete` with `x-organisation-id` of the load organisation (configuration 1: "
        "`POST /jobs/<id>/progress`, same length, same method, no rule matches; its plugin configuration is "
        "configuration 2's). HTTP/1.1 keep-alive. Saturation: h2load closed loop over "
        f"{s['connections']} connections. Fixed rates: h2load `--rps` over {s['rate_connections']} connections "
        "opened 1 ms apart (`-r 1 --rate-period 1ms`): h2load starts each connection's rate timer when it opens, so "
        "connections opened together send in bursts (at 1,000 req/s over 32 connections, bursts made the median "
        "4 ms instead of 0.2 ms).",
        "- Phases: warm-up (discarded), saturation × rounds, fixed rate (50% of configuration 0's median "
        "saturation, the same absolute rate for all) × rounds, configurations 2–4 at half their own saturation "
        "(with the probe), A/B pairs (short steps alternating 0/1 closed-loop and at the fixed rate, and 2/4 "
        "closed-loop, the order flipping every pair: one ratio per pair, so slow drifts of the machine cancel), "
        "then the latency curve (25/75/90% of configuration 0's saturation for 0, 1, 2, 4). The order of the "
        "configurations rotates every round.",
        "- CPU: utime+stime of the Envoy under test from `/proc/<pid>/stat`, from the start of the step until every "
        "delivery it caused has finished (outbox empty, no callout in flight), divided by the requests Envoy "
        "completed (`http.ingress.downstream_rq_completed`). So deliveries still being sent after the load stopped "
        "are charged to the configuration. RSS is VmRSS after the step (max over steps) and VmHWM.",
        "- Event-to-receiver latency (configurations 2–4, fixed-rate and half-own-saturation steps): a Python "
        "client completes uniquely "
        f"named jobs at {s['probe_rate']:g}/s through the same Envoy (routed by a header to a Python job service "
        "that echoes the id) for a second organisation whose single webhook is a Python receiver. Latency = arrival "
        "at the receiver (matched by `data.object.id`) − the moment the job service answered; both clocks are the "
        "driver's. It includes the Python servers' own delay on the busy load core.",
        "- The peer (configuration 4, `bench/peer.lua`): method and path matched on the request, status on the "
        "response, `response_handle:body()`, a string find for `\"status\":\"completed\"`, the envelope built by "
        "string concatenation, one asynchronous `httpCall` per webhook. **It does not sign** (no HMAC-SHA256, no "
        "base64), **keeps no queue, never retries and counts nothing**, which all favour it. It also makes Envoy "
        "buffer the whole response before the client gets it (the filter never holds the response).",
        "",
        "## Caveats",
        "",
        f"- Shared, noisy 2-core VM. Per-round saturation req/s: {sat_rounds}. CPU on the Envoy core used by other "
        f"processes during a step was at most {foreign:.0%} of the core. Envoy under test used "
        f"{min(envoy_util, default=0):.0%}–{max(envoy_util, default=0):.0%} of its core during saturation steps; "
        f"the load core was at most {load_util:.0%} busy, "
        + ("so the load side may have capped some saturation numbers (they are then lower bounds)."
           if load_util > 0.95 else "so the load side was not the bottleneck."),
        "- h2load 1.52 (Debian 12) hangs on `-D` and ignores `--rps` when given a request body (`-d`), so requests are "
        "bodiless POSTs. With a body, the wasm filter would also get one `on_request_body` call per chunk.",
        "- One worker thread and loopback only: no TLS, no network latency; real deployments add both to every "
        "configuration alike.",
        f"- Envoy runs at log level `{s['log_level']}` (`BENCH_LOG_LEVEL`; Envoy's default is info): whatever the "
        "filter logs at that level is part of its measured cost.",
        "- The `vs 0` and `CPU vs 0` columns are per-round ratios; the medians of the absolute numbers in the "
        "other columns need not divide to them exactly.",
        "",
        *drops_note(results),
        "Every step (per round, with h2load's and Envoy's figures) is in `results.json`.",
        "",
    ]
    return "\n".join(out)


def drops_note(results: dict) -> list:
    out = []
    for c, p in results["summary"]["per_config"].items():
        if p.get("dropped_queue_full"):
            out.append(f"- Configuration {c} dropped {p['dropped_queue_full']} deliveries because the outbox was full "
                       "(`maxQueued`, 10,000 per worker), all during closed-loop steps: the responses (and so the "
                       "events) come faster than the deliveries drain. Each drop is logged and counted "
                       "(`deliveries_dropped.queue_full`).")
    return out + ([""] if out else [])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    steps = results["steps"]
    names = results["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharex=True)
    for c in (0, 1, 2, 4):
        pts = {}
        for r in steps:
            if r["config"] == c and (r["phase"] == "fixed" or r["phase"].startswith("curve")):
                pts.setdefault(r["offered_rps"], []).append(r)
        xs = sorted(pts)
        sat = [r for r in steps if r["config"] == c and r["phase"] == "saturation"]
        for ax, key, label in ((axes[0], "p50_us", "p50"), (axes[1], "p99_us", "p99")):
            ys = [_med(r[key] for r in pts[x]) / 1000.0 for x in xs]
            over = [any(r.get("over_capacity") for r in pts[x]) for x in xs]
            line, = ax.plot(xs, ys, label=f"{c}: {names[str(c)]}")
            col = line.get_color()
            ax.scatter([x for x, o in zip(xs, over) if not o], [y for y, o in zip(ys, over) if not o], color=col,
                       zorder=3)
            ax.scatter([x for x, o in zip(xs, over) if o], [y for y, o in zip(ys, over) if o], facecolors="white",
                       edgecolors=col, zorder=3)
            if sat:
                ax.plot([_med(r["rps"] for r in sat)], [_med(r[key] for r in sat) / 1000.0], marker="*",
                        markersize=13, color=col, linestyle="none")
            ax.set_title(f"{label} latency")
    for ax in axes:
        ax.set_xlabel("offered load (requests/s); ★ = closed-loop saturation at its throughput")
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9,
               title="hollow markers: offered load above that configuration's capacity (overload)", title_fontsize=8)
    fig.suptitle(f"webhook-emitter bench {results['meta']['date_utc']}: Envoy 1.40, 1 worker on 1 core, "
                 f"h2load HTTP/1.1 on the other")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
