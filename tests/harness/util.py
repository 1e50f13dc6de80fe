"""Small shared helpers: deadlines, timeouts scaled for slow machines, loopback HTTP client calls."""

from __future__ import annotations

import http.client
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

# Every timeout in the harness is multiplied by this, so a very slow machine can get more slack without
# editing tests: E2E_TIMEOUT_SCALE=3 make e2e
TIMEOUT_SCALE = float(os.environ.get("E2E_TIMEOUT_SCALE", "1") or "1")


def terminate(proc, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds. Safe on a process that already exited."""
    import signal
    import subprocess

    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
    except ProcessLookupError:
        pass


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline (an AssertionError, so pytest reports it as a failure)."""


def wait_until(predicate: Callable[[], T], timeout: float, desc: str = "condition", interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy, and return that. Raise WaitTimeout at the deadline.

    The predicate is always evaluated at least once more after the deadline has passed, so a slow poll
    loop never misses a condition that became true just in time."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            value = predicate()
            if value:
                return value
            raise WaitTimeout(f"timed out after {scaled(timeout):.1f}s waiting for {desc}")
        time.sleep(interval)


@dataclass
class Response:
    status: int
    headers: dict  # lowercased names; repeated headers joined with ", "
    body: bytes  # de-chunked entity body, exactly as sent (no content decoding)
    header_list: list = field(default_factory=list)  # [(lowercased name, value)] in order

    def json(self):
        import json

        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    headers: Optional[dict] = None,
    body: Optional[bytes] = None,
    timeout: float = 30.0,
    host: str = "127.0.0.1",
) -> Response:
    """One request on a fresh connection. The body is read in full; transfer-encoding is undone by
    http.client, content-encoding is not (so gzip bytes stay gzip bytes)."""
    conn = http.client.HTTPConnection(host, port, timeout=scaled(timeout))
    try:
        hdrs = dict(headers or {})
        if body is not None and not any(k.lower() == "content-length" for k in hdrs):
            hdrs["Content-Length"] = str(len(body))
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        pairs = [(k.lower(), v) for k, v in resp.getheaders()]
        merged: dict = {}
        for k, v in pairs:
            merged[k] = f"{merged[k]}, {v}" if k in merged else v
        return Response(resp.status, merged, data, pairs)
    finally:
        conn.close()
