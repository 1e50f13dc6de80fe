"""What a webhook's answer can cost: Envoy buffers each callout's whole answer (up to 32 MiB by default) before the
filter sees it. The shipped configurations cut answers at 64 KiB (runtime http.async_response_buffer_limit,
envoy/envoy.yaml; the harness starts every Envoy with that runtime).

16 webhooks of one organisation answer each delivery 200 with a 30 MB body. Envoy resets each callout once the
answer passes the limit: each attempt fails, is logged and retried on the schedule, Envoy's peak RSS (VmHWM)
stays within a bound, the filter does not trap, and the client's answer is the job service's, unchanged.
Without the limit (Envoy's defaults) the same run took Envoy from about 94 to 557 MB.
"""

import json
import os
import re
import threading
import time
from pathlib import Path

import harness
import pytest
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.observe import Counters, plugin_log_lines
from harness.servers import Delivery, Receiver, _read_body, _ReceiverHandler

HOOKS = 16
ANSWER_BYTES = 30 * 1000 * 1000
CHUNK = 256 * 1024
# Envoy's peak RSS may grow by at most this much while the 16 answers arrive. Without the limit it grows by
# 16 x 30 MB (about 460 MiB); with it, by the callouts' connections and the 64 KiB each, plus the allocator's
# slack.
MAX_GROWTH_KIB = 96 * 1024
TRAPS = re.compile(r"panicked|Uncaught RuntimeError|proxy_on_\w+ failed")


class _BigAnswerHandler(_ReceiverHandler):
    def _handle(self) -> None:
        body = _read_body(self)
        owner: BigAnswerReceiver = self.server.owner  # type: ignore[attr-defined]
        owner._record(Delivery(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                               time.time()))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(ANSWER_BYTES))
        self.end_headers()
        sent = 0
        try:
            while sent < ANSWER_BYTES:
                n = min(CHUNK, ANSWER_BYTES - sent)
                self.wfile.write(owner.chunk[:n])
                sent += n
            self.wfile.flush()
        except OSError:  # Envoy reset the callout: the point of the limit
            self.close_connection = True
        with owner._cond:
            owner.bytes_sent.append(sent)
            owner._cond.notify_all()

    do_POST = _handle


class BigAnswerReceiver(Receiver):
    """Answers every request 200 with a 30 MB body; records how much of each answer it could write."""

    handler_class = _BigAnswerHandler

    def __init__(self):
        super().__init__()
        self.chunk = memoryview(os.urandom(CHUNK))
        self.bytes_sent: list = []


def vm_hwm_kib(envoy) -> int:
    for line in Path(f"/proc/{envoy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.fixture(scope="module")
def run(job_service, envoys, wasm):
    """One run: 16 webhooks answer one event's deliveries with 30 MB each."""
    with BigAnswerReceiver() as receiver:
        org = new_id()
        hooks = [make_hook(receiver.port, org) for _ in range(HOOKS)]
        # One attempt each within the test: the next would be an hour later.
        config = PluginConfig(hooks=hooks, delivery=delivery_section(retrySchedule=["1h"]))
        envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name="big-answers")
        envoys.append(envoy)
        counters = Counters(envoy)
        job_id = new_id()
        direct = job_service_answer(job_service, job_id)
        before = vm_hwm_kib(envoy)
        r = envoy.request("POST", f"/jobs/{job_id}/complete", {"x-organisation-id": org}, b"{}")
        receiver.wait_for(lambda d: d.object_id() == job_id, count=HOOKS, timeout=30)
        harness.wait_until(lambda: len(receiver.bytes_sent) >= HOOKS, timeout=60,
                           desc="the receiver to finish or give up writing every answer")
        yield {"envoy": envoy, "receiver": receiver, "hooks": hooks, "counters": counters, "before": before,
               "after": vm_hwm_kib(envoy), "client": (r.status, r.body), "direct": (200, direct)}


def test_the_shipped_runtime_cuts_callout_answers_at_64_kib(run):
    runtime = run["envoy"].admin("/runtime").json()["entries"]
    assert runtime["http.async_response_buffer_limit"]["final_value"] == "65536", runtime


def test_thirty_megabyte_answers_leave_envoy_bounded_and_the_client_answer_unchanged(run):
    assert run["client"] == run["direct"]
    sent = run["receiver"].bytes_sent
    assert max(sent) < ANSWER_BYTES, "Envoy read a whole 30 MB answer"
    growth = run["after"] - run["before"]
    print(f"\nEnvoy VmHWM {run['before']} KiB before, {run['after']} KiB after {HOOKS} answers of 30 MB "
          f"(+{growth} KiB); the most of one answer written before Envoy reset it: {max(sent)} bytes")
    assert growth <= MAX_GROWTH_KIB, f"Envoy's peak RSS grew by {growth} KiB (bound {MAX_GROWTH_KIB} KiB)"
    assert run["envoy"].running


def test_each_cut_answer_is_a_failed_attempt_retried_on_the_schedule(run):
    envoy, counters, hooks = run["envoy"], run["counters"], run["hooks"]
    counters.wait_delta("deliveries_failed", HOOKS, timeout=15)
    deltas = counters.deltas("deliveries_attempted", "deliveries_failed", "deliveries_retried",
                             "deliveries_succeeded")
    assert deltas == {"deliveries_attempted": HOOKS, "deliveries_failed": HOOKS, "deliveries_retried": HOOKS,
                      "deliveries_succeeded": 0}, deltas
    failed = plugin_log_lines(envoy, "attempt failed, will retry: ")
    for hook in hooks:
        assert any(f" webhook={hook.id} attempts=1 " in line for line in failed), \
            f"no retry line for webhook {hook.id}: {failed}"
    traps = [line for line in envoy.log_text().splitlines() if TRAPS.search(line)]
    assert traps == [], traps


def job_service_answer(job_service, job_id: str) -> bytes:
    """What the job service itself answers for this completion (deterministic), fetched directly."""
    r = harness.http_request(job_service.port, "POST", f"/jobs/{job_id}/complete", {"x-organisation-id": "x"},
                             b"{}")
    assert r.status == 200
    json.loads(r.body)
    return r.body


def test_every_shipped_configuration_cuts_answers_at_64_kib():
    import yaml

    for path in (harness.REPO / "envoy" / "envoy.yaml", harness.REPO / "envoy" / "compose" / "envoy.yaml"):
        layers = yaml.safe_load(path.read_text())["layered_runtime"]["layers"]
        values = [layer["static_layer"].get("http.async_response_buffer_limit") for layer in layers
                  if "static_layer" in layer]
        assert values == [65536], f"{path}: {values}"
    jobs = next(d for d in yaml.safe_load_all((harness.REPO / "envoy" / "istio" / "jobs.yaml").read_text())
                if d and d["kind"] == "Deployment")
    proxy_config = yaml.safe_load(jobs["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    assert proxy_config["runtimeValues"] == {"http.async_response_buffer_limit": "65536"}
