"""docs/operations.md's metrics table against what the real Envoy exports: every metric of the README's table has
a row, and each row's Prometheus name and kind are what /stats/prometheus shows, with the values the admin form
shows."""

import re

import harness
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.observe import METRIC, Counters, complete_job

DOC = harness.REPO / "docs" / "operations.md"
README = harness.REPO / "README.md"


def doc_rows() -> dict:
    """admin name -> (Prometheus names, kind) from the operations manual's table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[2] in ("counter", "gauge", "histogram") and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (re.findall(r"`([a-z0-9_]+)`", cells[1]), cells[2])
    return rows


def readme_metrics() -> dict:
    section = README.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z0-9_.]+)` \| (counter|gauge|histogram) \|", section, re.M)}


def test_the_documented_prometheus_names_are_what_envoy_exports(rc, start_envoy):
    documented, listed = doc_rows(), readme_metrics()
    assert len(listed) >= 20, listed
    assert {k: v[1] for k, v in documented.items()} == listed, "docs/operations.md and the README disagree"

    org = new_id()
    hook = make_hook(rc.port, org, ["job.completed"])
    envoy = start_envoy(PluginConfig(hooks=[hook], delivery=delivery_section()))
    counters = Counters(envoy)
    complete_job(envoy, org)
    counters.wait_delta("deliveries_succeeded", 1)

    def scrape():
        text = envoy.admin("/stats/prometheus").body.decode()
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+?)(?:\{[^}]*\})? (\S+)$", text, re.M)}
        # The histogram reaches /stats/prometheus at Envoy's stats flush.
        return (types, values) if values.get("webhook_emitter_delivery_latency_ms_count", 0) >= 1 else None

    types, values = harness.wait_until(scrape, 30, desc="the latency histogram to be flushed")
    admin = envoy.custom_stats()
    for name, (prometheus, kind) in documented.items():
        base = prometheus[0]
        if kind == "histogram":
            base = base.removesuffix("_bucket")
            assert prometheus == [base + "_bucket", "_sum", "_count"], prometheus
            assert types.get(base) == "histogram", (name, base)
            assert values[base + "_count"] >= 1 and base + "_sum" in values, base
            continue
        assert types.get(base) == kind, f"{name}: documented as {base} ({kind}), Envoy says {types.get(base)}"
        assert values[base] == admin.get(METRIC + name, 0), f"{name}: {values[base]} != {admin.get(METRIC + name)}"
    assert values["webhook_emitter_events_emitted"] == 1
    assert values["webhook_emitter_deliveries_succeeded"] == 1
