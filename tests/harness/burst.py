"""Many job completions at once, sent from a separate Python process.

The job service and the receiver run on threads of the test process, and share its interpreter lock. Hundreds
of client threads in that same process would compete with them for it, and on a busy 2-core machine hold the
receiver's answers back. Clients in a process of their own compete only for the CPU, as real clients do.

`complete_jobs_at_once(port, organisation_id, jobs)` in the test process; `python -m harness.burst` is the child
(JSON in on stdin, JSON out on stdout). Standard library only.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from pathlib import Path

from .util import scaled

_TESTS_DIR = Path(__file__).resolve().parents[1]


def complete_jobs_at_once(port: int, organisation_id: str, jobs: list, timeout: float = 120.0) -> tuple:
    """POST /jobs/{id}/complete for every job id to 127.0.0.1:port, one client thread per job, released together,
    each on a fresh connection; a request that fails is reported, not re-sent (that could make a second event).
    Returns ({job id: (status, body bytes)}, [errors])."""
    order = {"port": port, "organisation": organisation_id, "jobs": list(jobs), "timeout": scaled(30)}
    child = subprocess.run([sys.executable, "-m", "harness.burst"], input=json.dumps(order).encode(),
                           capture_output=True, cwd=_TESTS_DIR, timeout=scaled(timeout))
    if child.returncode != 0:
        raise AssertionError(f"the burst client exited with {child.returncode}: {child.stderr.decode()[-2000:]}")
    report = json.loads(child.stdout)
    answers = {job: (status, body.encode("latin-1")) for job, (status, body) in report["answers"].items()}
    return answers, report["errors"]


def _send_all(order: dict) -> dict:
    jobs = order["jobs"]
    answers, errors, lock = {}, [], threading.Lock()
    start = threading.Barrier(len(jobs))

    def one(job_id: str) -> None:
        try:
            start.wait(timeout=order["timeout"])
            conn = http.client.HTTPConnection("127.0.0.1", order["port"], timeout=order["timeout"])
            try:
                conn.request("POST", f"/jobs/{job_id}/complete", body=b"{}",
                             headers={"x-organisation-id": order["organisation"], "Content-Length": "2"})
                r = conn.getresponse()
                body = r.read()
            finally:
                conn.close()
            with lock:
                answers[job_id] = (r.status, body.decode("latin-1"))
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            with lock:
                errors.append(f"{job_id}: {e!r}")

    threads = [threading.Thread(target=one, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(order["timeout"] * 4)
    with lock:
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            errors.append(f"{len(stuck)} client threads still running")
        return {"answers": dict(answers), "errors": list(errors)}


if __name__ == "__main__":
    json.dump(_send_all(json.load(sys.stdin)), sys.stdout)
