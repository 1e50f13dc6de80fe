"""Path spellings through the real Envoy (--concurrency 2) with Envoy's own path normalisation OFF, gated by the
shipped ExtensionWithMatcher gate and ungated: the filter canonicalises the path itself.

- Every spelling a normalising upstream routes to /jobs/X/complete (merged and trailing slashes, escapes of
  unreserved characters, dot segments, `;` parameters, a query) gives exactly one event for job X, over HTTP/1.1
  and HTTP/2; a query that is not UTF-8 does not matter.
- /jobs/X/completed gives none.
- An HTTP/2 :path with a byte that is not UTF-8, and a path with an encoded slash, give no event, the client's
  answer is the job service's own, and each is counted under its reason (requests_bad_path.*) and logged."""

from __future__ import annotations

import socket

import harness
import pytest
from harness.config import PluginConfig, delivery_section, job_completed_rule, make_hook, new_id
from harness.observe import Counters, wait_for_log

SPELLINGS = [
    "//jobs/{X}/complete",
    "/jobs/{X}/complete/",
    "/jobs/{X}/complet%65",
    "/jobs/./{X}/complete",
    "/jobs/{X}/complete;v=1",
    "/jobs/{X}/complete?x=1",
    "/j%6Fbs/{X}/complete",
    "/j%6fbs/{X}/complete",
    "/jobs//{X}/complete",
    "/jobs/{Y}/../{X}/complete",
    "/jobs/%2e/{X}/complete;jsessionid=abc/",
]
H2_SPELLINGS = [b"//jobs/{X}/complete", b"/jobs/{X}/complet%65?q=\xff", b"/jobs/{X}/./complete/"]


def h2_post(port: int, path: bytes, headers: list) -> tuple:
    """One h2c (prior knowledge) POST whose :path is these raw bytes; returns (status, body)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None,
                                                                validate_outbound_headers=False,
                                                                normalize_outbound_headers=False))
    with socket.create_connection(("127.0.0.1", port), timeout=harness.scaled(20)) as s:
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"POST"), (b":path", path), (b":scheme", b"http"),
                                (b":authority", b"jobs")] + headers)
        conn.send_data(sid, b"{}", end_stream=True)
        s.sendall(conn.data_to_send())
        status, body, done = None, b"", False
        while not done:
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            s.sendall(conn.data_to_send())
    return status, body


@pytest.fixture(scope="module", params=["ungated", "gated"])
def setup(request, job_service, receiver, envoys, wasm):
    org = new_id()
    hook = make_hook(receiver.port, org, ["job.completed"], name=f"spellings-{request.param}")
    config = PluginConfig(hooks=[hook], events=[job_completed_rule()], delivery=delivery_section())
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name=f"spellings-{request.param}",
                                      gate=request.param == "gated", path_normalization=False)
    envoys.append(envoy)
    return envoy, hook, org


def test_the_harness_runs_envoy_without_path_normalisation(setup):
    envoy, _, _ = setup
    hcm = envoy.bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert not any(k in hcm for k in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"))


def test_every_spelling_of_a_completion_path_gives_one_event(setup, job_service, receiver):
    envoy, hook, org = setup
    counters = Counters(envoy)
    jobs = []
    for spelling in SPELLINGS:
        job = new_id()
        path = spelling.format(X=job, Y=new_id())
        r = envoy.request("POST", path, {"x-organisation-id": org, "content-type": "application/json"}, b"{}")
        assert r.status == 200, (path, r.status)
        assert r.body == job_service.answer(job, "", {})[1], f"{path}: the job service did not route it to {job}"
        jobs.append(job)
    for spelling in H2_SPELLINGS:
        job = new_id()
        path = spelling.replace(b"{X}", job.encode())
        status, body = h2_post(envoy.listener_port, path, [(b"x-organisation-id", org.encode())])
        assert status == 200 and body == job_service.answer(job, "", {})[1], (path, status, body[:200])
        jobs.append(job)
    # Not a completion path: the job service answers, no rule matches.
    r = envoy.request("POST", f"/jobs/{new_id()}/completed", {"x-organisation-id": org}, b"{}")
    assert r.status == 200

    got = receiver.wait_for(lambda d: d.webhook_id == hook.id and d.object_id() in jobs, count=len(jobs))
    assert sorted(d.object_id() for d in got) == sorted(jobs), "a job's event is missing or doubled"
    # Each response was whole at the filter before the client had it: every event is counted by now.
    assert counters.delta("events_emitted") == len(jobs)
    assert counters.deltas("requests_bad_path.not_utf8", "requests_bad_path.bad_escape",
                           "requests_bad_path.escaped_slash") == {"requests_bad_path.not_utf8": 0,
                                                                  "requests_bad_path.bad_escape": 0,
                                                                  "requests_bad_path.escaped_slash": 0}


def test_a_path_that_is_not_utf8_or_encodes_a_slash_is_counted_not_an_event(setup, job_service, receiver):
    envoy, hook, org = setup
    counters = Counters(envoy)
    job = new_id()
    status, body = h2_post(envoy.listener_port, f"/jobs/{job}".encode() + b"\xff/complete",
                           [(b"x-organisation-id", org.encode())])
    # The client's answer is the job service's own (which read the byte as Latin-1).
    assert status == 200 and body == job_service.answer(f"{job}\xff", "", {})[1], (status, body[:200])
    assert counters.wait_delta("requests_bad_path.not_utf8", 1) == 1
    wait_for_log(envoy, r"request path is not UTF-8: POST hex 2f6a6f6273.*requests_bad_path\.not_utf8")

    r = envoy.request("POST", f"/jobs/a%2F{job}/complete", {"x-organisation-id": org}, b"{}")
    assert r.status == 200
    assert counters.wait_delta("requests_bad_path.escaped_slash", 1) == 1

    # A method no rule takes is none of the filter's business, whatever its path.
    r = envoy.request("GET", f"/jobs/a%2F{job}/complete", {"x-organisation-id": org}, b"")
    assert r.status == 200

    # A completion sent after them is delivered, and nothing else was.
    control = new_id()
    r = envoy.request("POST", f"/jobs/{control}/complete", {"x-organisation-id": org}, b"{}")
    assert r.status == 200
    receiver.wait_for(lambda d: d.object_id() == control, count=1)
    assert counters.delta("events_emitted") == 1
    assert counters.deltas("requests_bad_path.not_utf8", "requests_bad_path.escaped_slash") == {
        "requests_bad_path.not_utf8": 1, "requests_bad_path.escaped_slash": 1}
    assert not receiver.deliveries(lambda d: job in (d.object_id() or ""))
