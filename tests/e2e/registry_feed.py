"""Helpers of the registry feed's end-to-end tests (test_registry_feed*.py): an Envoy that pulls a real registry,
job completions, the filter's per-VM log lines with their times, and Envoy's memory and CPU time from /proc."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import harness
from harness.config import BODY_ORGANISATION, PluginConfig, delivery_section, job_completed_rule, new_id
from harness.envoy import static_cluster

# Envoy's log line: [2026-12-07 07:40:51.579][5193][info][wasm] ... webhook-emitter: <message>
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]\[(\d+)\]\[\w+\]\[wasm\].*?webhook-emitter: (.*)$")
# The VMs that pull: one per worker (--concurrency 2) and the main thread's.
PULLING_VMS = 3


def envoy_pulling(job_service, rc, registry, envoys, wasm, name, poll_ms, registry_settings=None, **delivery):
    """An Envoy whose filter pulls its webhooks from `registry` (every `poll_ms`), with these `delivery` settings and
    more `registry` settings of the plugin (e.g. reportFlushMs)."""
    config = PluginConfig(hooks=[], events=[job_completed_rule(organisation=BODY_ORGANISATION)],
                          delivery=delivery_section(**delivery)).to_dict()
    config["registry"] = {"cluster": "registry", "authority": "registry", "tokenEnv": "REGISTRY_TOKEN",
                          "pollMs": poll_ms, **(registry_settings or {})}
    envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name=name,
                                      env_vars={"REGISTRY_TOKEN": registry.proxy_token},
                                      extra_clusters=[static_cluster("registry", registry.port)])
    envoys.append(envoy)
    return envoy


def complete(envoy, job_service, org) -> str:
    job_id = job_service.own(new_id(), org)
    assert envoy.request("POST", f"/jobs/{job_id}/complete", {}, b"{}").status == 200
    return job_id


def filter_lines(envoy, contains: str = "") -> list:
    """The filter's log lines as (wall-clock seconds, thread id, message)."""
    out = []
    for line in envoy.log_text().splitlines():
        m = LOG_LINE.match(line)
        if m and contains in m.group(3):
            at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
            out.append((at.replace(tzinfo=datetime.timezone.utc).timestamp(), m.group(2), m.group(3)))
    return out


def applied_by_every_vm(envoy, pattern: str, since: float = 0.0):
    """The time by which every pulling VM logged a line matching `pattern` (after `since`), or None."""
    rx = re.compile(pattern)
    first_by_thread = {}
    for at, thread, message in filter_lines(envoy):
        if at >= since and rx.search(message) and thread not in first_by_thread:
            first_by_thread[thread] = at
    return max(first_by_thread.values()) if len(first_by_thread) >= PULLING_VMS else None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of the process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
