"""Hostile peers through the real Envoy: clients that send header bytes that are not UTF-8 (HTTP/1 and h2) or
repeat the organisation header, receivers whose answers carry bytes that are not UTF-8, are cut short, or
trickle past the timeout. None of it may trap the VM, change a client's answer, or lose a delivery without a
trace; the next ordinary event is still delivered."""

from __future__ import annotations

import json
import re
import socket

import harness
import pytest
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.observe import Counters, complete_job, wait_for_log
from harness.raw import RawReceiver, RawReply, ok_with, status_with

# What Envoy or the SDK print when the VM traps.
TRAP = re.compile(r"panicked at|Uncaught RuntimeError|Function: proxy_on_\w+ failed|wasm trap|unreachable")


def assert_no_trap(envoy):
    traps = [line for line in envoy.log_text().splitlines() if TRAP.search(line)]
    assert not traps, "the VM trapped:\n" + "\n".join(traps[:5])


def raw_http1(port: int, path: str, headers: list) -> tuple:
    """One HTTP/1.1 request whose header lines are raw bytes; returns (status, body)."""
    lines = [b"POST %s HTTP/1.1" % path.encode(), b"Host: jobs", b"Content-Length: 2", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=harness.scaled(20)) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n{}")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, body


def h2_request(port: int, path: str, headers: list) -> tuple:
    """One h2c (prior knowledge) request with raw header bytes; returns (status, body)."""
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
        conn.send_headers(sid, [(b":method", b"POST"), (b":path", path.encode()), (b":scheme", b"http"),
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


@pytest.fixture
def envoy_for(job_service, envoys, wasm, request):
    def start(receiver, config):
        envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name=request.node.name[:40])
        envoys.append(envoy)
        return envoy
    return start


@pytest.mark.parametrize("protocol", ["http1", "h2"])
def test_an_organisation_header_that_is_not_utf8_makes_no_event_and_changes_nothing(
        protocol, rc, envoy_for):
    org = new_id()
    hook = make_hook(rc.port, org)
    envoy = envoy_for(rc, PluginConfig(hooks=[hook]))
    counters = Counters(envoy)
    send = raw_http1 if protocol == "http1" else h2_request
    job_id = new_id()
    status, body = send(envoy.listener_port, f"/jobs/{job_id}/complete", [(b"x-organisation-id", b"caf\xe9")])
    assert status == 200
    assert json.loads(body) == harness.completed_job(job_id), "the client's answer changed"
    assert counters.wait_delta("events_bad_organisation", 1) == 1
    wait_for_log(envoy, r"job\.completed matched but its organisation header is not UTF-8 \(bytes 636166e9\)")
    # The VM is alive and the next ordinary event is delivered.
    job_id = complete_job(envoy, org)
    rc.wait_for(lambda d: d.object_id() == job_id, timeout=15)
    assert counters.delta("events_emitted") == 1
    assert_no_trap(envoy)


def test_a_repeated_organisation_header_makes_no_event(rc, envoy_for):
    a, b = new_id(), new_id()
    hook_a, hook_b = make_hook(rc.port, a), make_hook(rc.port, b)
    envoy = envoy_for(rc, PluginConfig(hooks=[hook_a, hook_b]))
    counters = Counters(envoy)
    job_id = new_id()
    status, body = raw_http1(envoy.listener_port, f"/jobs/{job_id}/complete",
                             [(b"x-organisation-id", a.encode()), (b"x-organisation-id", b.encode())])
    assert status == 200 and json.loads(body) == harness.completed_job(job_id)
    assert counters.wait_delta("events_bad_organisation", 1) == 1
    wait_for_log(envoy, r"organisation header appears more than once: no event")
    control = complete_job(envoy, a)
    rc.wait_for(lambda d: d.object_id() == control, timeout=15)
    assert not rc.deliveries(lambda d: d.object_id() == job_id), "an event was made from a repeated header"
    assert_no_trap(envoy)


def one_hostile_receiver(envoy_for, script, **delivery):
    raw = RawReceiver(script=script)
    org = new_id()
    hook = make_hook(raw.port, org)
    config = PluginConfig(hooks=[hook], delivery=delivery_section(**delivery))
    envoy = envoy_for(raw, config)
    return raw, envoy, org


def test_answers_with_header_bytes_that_are_not_utf8(envoy_for):
    # A 503 whose Retry-After is not UTF-8 (retried on the schedule), then a 200 with a header that is not
    # UTF-8 (a success).
    raw, envoy, org = one_hostile_receiver(
        envoy_for, [status_with(503, b"Retry-After: \xff\xfe"), ok_with(b"X-Odd: caf\xe9")],
        retrySchedule=["300ms", "300ms"])
    with raw:
        counters = Counters(envoy)
        complete_job(envoy, org)
        assert counters.wait_delta("deliveries_succeeded", 1) == 1
        assert counters.deltas("deliveries_retried", "deliveries_exhausted") == \
            {"deliveries_retried": 1, "deliveries_exhausted": 0}
        first, second = raw.requests[:2]
        assert first.header("webhook-id") == second.header("webhook-id")
        gap = second.at - first.at
        assert 0.2 <= gap < 5, f"the retry came {gap:.2f}s later; the schedule says 300ms ±20%"
        assert_no_trap(envoy)


def test_answers_cut_short_or_trickling_past_the_timeout_are_failed_attempts(envoy_for):
    script = [
        RawReply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"),  # headers, then the body is cut
        RawReply(b"HTTP/1.1 20"),  # cut inside the status line
        RawReply(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", trickle=b"x", interval=0.2),  # past timeoutMs
        RawReply(b""),  # closed without a byte
        ok_with(),
    ]
    raw, envoy, org = one_hostile_receiver(envoy_for, script, timeoutMs=1000,
                                           retrySchedule=["200ms", "200ms", "200ms", "200ms", "200ms"])
    with raw:
        counters = Counters(envoy)
        job_id = complete_job(envoy, org)
        assert counters.wait_delta("deliveries_succeeded", 1, timeout=30) == 1
        assert raw.count() == 5
        assert counters.deltas("deliveries_retried", "deliveries_exhausted") == \
            {"deliveries_retried": 4, "deliveries_exhausted": 0}
        ids = {r.header("webhook-id") for r in raw.requests}
        assert len(ids) == 1
        assert json.loads(raw.requests[-1].body)["data"]["object"]["id"] == job_id
        assert_no_trap(envoy)


def test_poison_requests_do_not_change_other_clients_answers(rc, envoy_for):
    org = new_id()
    hook = make_hook(rc.port, org)
    envoy = envoy_for(rc, PluginConfig(hooks=[hook]))
    jobs = []
    for _ in range(10):
        status, _ = raw_http1(envoy.listener_port, f"/jobs/{new_id()}/complete", [(b"x-organisation-id", b"\xe9")])
        assert status == 200
        jobs.append(complete_job(envoy, org))
    for job_id in jobs:
        rc.wait_for(lambda d, j=job_id: d.object_id() == j, timeout=15)
    assert_no_trap(envoy)
