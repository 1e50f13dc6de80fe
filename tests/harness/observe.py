"""Reading what the filter reports: its counters (as deltas from a snapshot), its log lines, and sending job
completions. Used by the reliability tests; standard library only."""

from __future__ import annotations

import http.client
import os
import re
import statistics
import threading
from typing import Iterable, Optional

from .config import PluginConfig, new_id
from .util import scaled, wait_until

METRIC = "wasmcustom.webhook_emitter."


class Counters:
    """A snapshot of the filter's metrics; delta(name) is how much `name` moved since the snapshot."""

    def __init__(self, envoy):
        self.envoy = envoy
        self.before = envoy.custom_stats()

    def now(self) -> dict:
        return self.envoy.custom_stats()

    def delta(self, name: str, current: Optional[dict] = None) -> int:
        current = current if current is not None else self.now()
        return current.get(METRIC + name, 0) - self.before.get(METRIC + name, 0)

    def deltas(self, *names: str) -> dict:
        current = self.now()
        return {n: self.delta(n, current) for n in names}

    def gauge(self, name: str) -> int:
        return self.now().get(METRIC + name, 0)

    def wait_delta(self, name: str, at_least: int, timeout: float = 20.0) -> int:
        """Wait until `name` has moved by at least `at_least`; return its delta."""

        def moved():
            d = self.delta(name)
            return (d,) if d >= at_least else None

        return wait_until(moved, timeout, desc=f"{METRIC}{name} to go up by {at_least}")[0]


def plugin_log_lines(envoy, contains: str = "") -> list:
    """The filter's own log lines (the part after `webhook-emitter: `), optionally only those containing
    `contains`."""
    out = []
    for line in envoy.wasm_log_lines():
        _, sep, message = line.partition("webhook-emitter: ")
        if sep and contains in message:
            out.append(message)
    return out


def wait_for_log(envoy, pattern: str, count: int = 1, timeout: float = 20.0) -> list:
    """Wait until at least `count` of the filter's log lines match the regex `pattern`; return the matches.

    Each poll reads only what Envoy wrote since the last one: a log of many megabytes read whole 50 times a
    second would keep this process (and the receiver's threads in it) busy."""
    rx = re.compile(pattern)
    path = getattr(envoy, "log_path", None)
    if path is None:  # not a harness Envoy: read its lines whole each time
        def found_whole():
            hits = [m for m in (rx.search(line) for line in plugin_log_lines(envoy)) if m]
            return hits if len(hits) >= count else None

        return wait_until(found_whole, timeout, desc=f"{count} filter log line(s) matching {pattern!r}")

    hits: list = []
    state = {"offset": 0, "partial": b""}

    def found():
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < state["offset"]:  # a new log (Envoy started again): start over
                    state["offset"], state["partial"] = 0, b""
                    hits.clear()
                f.seek(state["offset"])
                chunk = f.read()
        except FileNotFoundError:
            return None
        state["offset"] += len(chunk)
        lines = (state["partial"] + chunk).split(b"\n")
        state["partial"] = lines.pop()  # a line Envoy has not finished writing yet
        for raw in lines:
            line = raw.decode(errors="replace")
            if "wasm log" not in line:
                continue
            _, sep, message = line.partition("webhook-emitter: ")
            hit = rx.search(message) if sep else None
            if hit:
                hits.append(hit)
        return list(hits) if len(hits) >= count else None

    return wait_until(found, timeout, desc=f"{count} filter log line(s) matching {pattern!r}")


def complete_job(envoy, organisation_id: str, job_id: Optional[str] = None, timeout: float = 30.0) -> str:
    """POST /jobs/{id}/complete through Envoy for this organisation; asserts the client got 200; returns the
    job id."""
    job_id = job_id or new_id()
    r = envoy.request("POST", f"/jobs/{job_id}/complete", {"x-organisation-id": organisation_id}, b"{}",
                      timeout=timeout)
    assert r.status == 200, f"job {job_id}: the client got {r.status} {r.body[:200]!r}"
    return job_id


def complete_jobs_concurrently(port: int, organisation_id: str, jobs: list, clients: int = 32,
                               timeout: float = 120.0):
    """POST /jobs/{id}/complete for every job id to 127.0.0.1:port, from `clients` threads, each on one
    keep-alive connection (a request that fails is reported, not re-sent). Returns ({job id: status}, [errors])."""
    statuses, errors, lock = {}, [], threading.Lock()
    start = threading.Barrier(clients)

    def connect():
        return http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(30))

    def worker(mine):
        conn = connect()
        start.wait(timeout=scaled(30))
        for job_id in mine:
            try:
                conn.request("POST", f"/jobs/{job_id}/complete", body=b"{}",
                             headers={"x-organisation-id": organisation_id, "Content-Length": "2"})
                r = conn.getresponse()
                r.read()
                with lock:
                    statuses[job_id] = r.status
            except (http.client.HTTPException, OSError) as e:  # not re-sent: that could make a second event
                with lock:
                    errors.append(f"{job_id}: {e!r}")
                conn.close()
                conn = connect()
        conn.close()

    threads = [threading.Thread(target=worker, args=(jobs[i::clients],), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scaled(timeout))
    assert not any(t.is_alive() for t in threads), "client threads still running"
    return statuses, errors


def plugin_dict(config: PluginConfig, clusters: Optional[dict] = None, **delivery_extra) -> dict:
    """config.to_dict(), with a `cluster` on the webhooks named in `clusters` ({hook id: cluster}) and extra
    `delivery` fields (for example deadLetter, circuitBreaker, maxInFlightPerWebhook)."""
    out = config.to_dict()
    for webhook in out["webhooks"]:
        if clusters and webhook["id"] in clusters:
            webhook["cluster"] = clusters[webhook["id"]]
    out["delivery"].update(delivery_extra)
    return out


def median_ms(values: Iterable[float]) -> float:
    return statistics.median(values) * 1000.0
