"""Event-to-receiver latency probe, run at a low rate during a fixed-rate load step.

A Python client completes uniquely named jobs through the Envoy under test (header `x-bench-probe` routes them to
the Python probe job service, which echoes the job id in its JSON), for the probe organisation whose one webhook is
the Python probe receiver. The latency of an event is the receiver's arrival time of the delivery whose
data.object.id is the job, minus the time the job service answered that job: both clocks are this process's.
"""

from __future__ import annotations

import http.client
import re
import threading
import time

from harness.servers import JobService, Receiver

_JOB = re.compile(r"^/jobs/([^/?]+)/complete")


class TimedJobService(JobService):
    """The harness's job service, also noting when each job was answered (just before the answer is written)."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: dict = {}

    def _record(self, method, path, headers, body):
        m = _JOB.match(path)
        if m:
            self.answered[m.group(1)] = time.time()
        # Not stored: the harness keeps every request, which the bench does not need.


class Probe:
    def __init__(self, job_service: TimedJobService, receiver: Receiver, port: int, organisation: str,
                 rate: float, tag: str):
        self.job_service = job_service
        self.receiver = receiver
        self.port = port
        self.organisation = organisation
        self.rate = rate
        self.tag = tag
        self.sent: list = []
        self.errors: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe-{tag}", daemon=True)

    def start(self) -> "Probe":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = None
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            job = f"probe-{self.tag}-{i:06d}"
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", f"/jobs/{job}/complete", body=b"{}",
                             headers={"x-organisation-id": self.organisation, "x-bench-probe": "1",
                                      "content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    self.sent.append(job)
                else:
                    self.errors.append(f"{job}: status {r.status}")
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(f"{job}: {e!r}")
                if conn is not None:
                    conn.close()
                conn = None
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()
        if conn is not None:
            conn.close()

    def latencies_ms(self) -> tuple:
        """(sorted latencies in ms of the events that arrived, number of probe jobs whose event never arrived)."""
        jobs = set(self.sent)
        arrived = {}
        for d in self.receiver.deliveries():
            try:
                job = d.object_id()
            except Exception:  # noqa: BLE001 - a malformed delivery simply does not count
                job = None
            if job in jobs and job not in arrived:
                arrived[job] = d.received_at
        lat = sorted((arrived[j] - self.job_service.answered[j]) * 1000.0
                     for j in arrived if j in self.job_service.answered)
        return lat, len(jobs) - len(arrived)
