"""The loss ledger through the real Envoy (--concurrency 2): a mixed burst of completions, clients that hang up
after the response headers (HTTP/1.1 and HTTP/2), upstreams that cut their body, paths that have no canonical form
(but that the upstream completes), non-JSON bodies, `when` mismatches and statuses no rule takes, sent at once
from several clients. Every completion the upstream made ends
as exactly one delivery or one counted loss, read from Envoy's /stats: deliveries received + counted losses ==
completions the upstream made, exactly; what is no completion is counted apart and is no loss."""

from __future__ import annotations

import random
import re
import threading
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor

import harness
from harness.config import PluginConfig, delivery_section, job_completed_rule, make_hook, new_id
from harness.hangup import h2_cancel_after_headers, h2_complete, http1_hang_up_after_headers, http1_read_cut_answer
from harness.observe import Counters, plugin_log_lines
from harness.servers import _COMPLETE, routing_path
from harness.util import wait_until

# Every counter under which a completion's event can be lost before it is made (README, "Loss ledger").
LOSSES = ("events_lost.stream_reset", "events_lost.refetch_failed", "bodies_too_large", "bodies_undecodable",
          "bodies_not_json", "events_without_organisation", "events_bad_organisation", "events_bad_object",
          "events_dropped.registry_not_loaded", "requests_bad_path.not_utf8", "requests_bad_path.bad_escape",
          "requests_bad_path.escaped_slash")
# Not completions: counted, and no loss.
NOT_COMPLETIONS = {"failed": "events_skipped.when", "notfound": "events_skipped.status"}


def plain(envoy, method: str, scenario: str):
    def send(job: str, org: str) -> None:
        path = f"/jobs/{job}/complete" + (f"?scenario={scenario}" if scenario else "")
        r = envoy.request(method, path, {"x-organisation-id": org}, b"{}", timeout=harness.scaled(30))
        assert r.status in (200, 404), f"{path}: {r.status}"
    return send


def test_deliveries_and_counted_losses_add_up_to_the_completions(rc, job_service, start_envoy):
    org = new_id()
    hook = make_hook(rc.port, org)
    # POST completions are read again when cut; PUT ones are not (the same path, a rule without refetch).
    with_refetch = job_completed_rule(refetch={"path": "/jobs/{jobId}"})
    with_refetch["match"]["methods"] = ["POST"]
    without_refetch = job_completed_rule()
    without_refetch["match"]["methods"] = ["PUT"]
    # Envoy's own path normalisation off, so that a path with no canonical form reaches the filter as sent.
    envoy = start_envoy(PluginConfig(hooks=[hook], events=[with_refetch, without_refetch],
                                     delivery=delivery_section(retrySchedule=["100ms", "200ms"])),
                        path_normalization=False)
    port = envoy.listener_port
    counters = Counters(envoy)

    def hang_up_http1(method):
        return lambda job, o: http1_hang_up_after_headers(port, f"/jobs/{job}/complete?scenario=hold", o, method)

    def cut_by_upstream(method):
        return lambda job, o: http1_read_cut_answer(port, f"/jobs/{job}/complete?scenario=cut", o, method)

    def hang_up_h2(job, o):
        h2_cancel_after_headers(port, f"/jobs/{job}/complete?scenario=hold", o)

    def not_utf8(job, o):
        # The job service reads the byte as Latin-1 and completes job "<id>\xff".
        assert h2_complete(port, f"/jobs/{job}".encode() + b"\xff/complete", o) == 200

    def bad_escape(job, o):
        # The job service leaves "%zz" as it is and completes job "<id>%zz".
        assert plain(envoy, "POST", "")(f"{job}%zz", o) is None

    def hang_up_unreadable(job, o):
        job_service.fail_reads(job)
        http1_hang_up_after_headers(port, f"/jobs/{job}/complete?scenario=hold", o)

    # (kind, how many, how it is sent)
    mix = [
        ("completion", 24, plain(envoy, "POST", "")),
        ("completion-put", 6, plain(envoy, "PUT", "")),
        ("hang-up-http1", 8, hang_up_http1("POST")),
        ("hang-up-h2", 8, hang_up_h2),
        ("cut-body", 8, cut_by_upstream("POST")),
        ("hang-up-unreadable", 4, hang_up_unreadable),
        ("hang-up-no-refetch", 6, hang_up_http1("PUT")),
        ("cut-body-no-refetch", 4, cut_by_upstream("PUT")),
        ("bad-path-not-utf8", 3, not_utf8),
        ("bad-path-escape", 3, bad_escape),
        ("non-json", 6, plain(envoy, "POST", "invalid")),
        ("failed", 6, plain(envoy, "POST", "failed")),
        ("notfound", 4, plain(envoy, "POST", "notfound")),
    ]
    requests = [(kind, send, new_id()) for kind, n, send in mix for _ in range(n)]
    random.Random(16).shuffle(requests)
    errors, lock = [], threading.Lock()

    def run(item):
        kind, send, job = item
        try:
            send(job, org)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            with lock:
                errors.append(f"{kind} {job}: {e!r}")

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(run, requests))
    assert not errors, errors

    # The completions the upstream made, from its own record: a 200 answer to a completion it could complete.
    mine = {job for _, _, job in requests}
    kinds = {job: kind for kind, _, job in requests}
    def completed(r) -> bool:
        m = _COMPLETE.match(routing_path(r["path"]))
        scenario = r["path"].partition("?")[2].removeprefix("scenario=")
        return (r["method"] in ("POST", "PUT") and m is not None and m.group(1)[:24] in mine
                and scenario in ("", "hold", "cut", "invalid"))

    completions = len([r for r in job_service.requests_for("/jobs/") if completed(r)])
    assert completions == sum(n for kind, n, _ in mix if kind not in ("failed", "notfound"))

    refetched = sum(n for kind, n, _ in mix if kind in ("hang-up-http1", "hang-up-h2", "cut-body",
                                                           "hang-up-unreadable"))

    last = {}

    def ours(d) -> bool:
        return (d.object_id() or "")[:24] in mine

    def settled():
        # Every refetch is over (made its event or failed for good), nothing is queued or out.
        c = counters.now()
        last.update(c=c)
        done = counters.delta("events_refetched", c) + counters.delta("events_lost.refetch_failed", c)
        idle = c.get("wasmcustom.webhook_emitter.outbox_depth", 0) == 0
        delivered = len({d.event_id for d in rc.deliveries(ours)})
        losses = sum(counters.delta(name, c) for name in LOSSES)
        if done == refetched and idle and delivered + losses == completions:
            return c, delivered, losses
        return None

    try:
        c, delivered, losses = wait_until(settled, 60, desc="the ledger to add up", interval=0.1)
    except AssertionError:
        c = last["c"]
        delivered = len({d.event_id for d in rc.deliveries(ours)})
        raise AssertionError(f"completions={completions} delivered={delivered} "
                             f"{ {n: counters.delta(n, c) for n in (*LOSSES, 'events_refetched', 'events_emitted')} } "
                             f"outbox_depth={c.get('wasmcustom.webhook_emitter.outbox_depth')}")
    lost = {name: counters.delta(name, c) for name in LOSSES}
    print(f"completions={completions} delivered={delivered} losses={losses} {lost}")

    # By reason, each exactly what the burst holds.
    assert lost == {**{n: 0 for n in LOSSES}, "events_lost.stream_reset": 10, "events_lost.refetch_failed": 4,
                    "bodies_not_json": 6, "requests_bad_path.not_utf8": 3, "requests_bad_path.bad_escape": 3}, lost
    for scenario, counter in NOT_COMPLETIONS.items():
        assert counters.delta(counter, c) == dict((k, n) for k, n, _ in mix)[scenario], counter
    assert counters.delta("events_refetched", c) == 24
    assert counters.delta("events_emitted", c) == delivered
    # One event per completion: no job was delivered twice, and each delivered job is one that completed.
    per_job = Tally(d.object_id()[:24] for d in {d.event_id: d for d in rc.deliveries(ours)}.values())
    assert max(per_job.values()) == 1
    assert {kinds[j] for j in per_job} == {"completion", "completion-put", "hang-up-http1", "hang-up-h2", "cut-body"}
    # Each loss has its line, except lost events: those lines are written at most once a second per worker and
    # reason (a flood of hang-ups must not flood the log), each saying how many it held back; the counters above
    # count every one. A burst gets one line per reason at least, and never more lines than losses.
    for reason, losses in (("stream_reset", 10), ("refetch_failed", 4)):
        lines = plugin_log_lines(envoy, f"(reason={reason})")
        held_back = sum(int(m.group(1)) for m in map(re.compile(r"\((\d+) more since the last such line\)").search,
                                                       lines) if m)
        assert 1 <= len(lines) and len(lines) + held_back <= losses, (reason, lines)
    assert len(plugin_log_lines(envoy, "response body is not JSON")) == 6
    # Bad paths are logged at most once a second per worker (whatever the reason), each line saying how many it
    # held back: a burst within a second gets one line per worker at least.
    assert plugin_log_lines(envoy, "counted in requests_bad_path.")
