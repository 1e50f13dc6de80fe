"""The client's response is never altered: the same request through an Envoy without the filter and through one
with it gives the same status, entity headers and byte-identical body, for every kind of upstream body. Bodies
the filter cannot use are counted (bodies_too_large, bodies_not_json, bodies_undecodable) and emit nothing; a gzip
body still emits."""

import harness
import pytest
from harness.checks import check_delivery
from harness.config import PluginConfig, delivery_section, make_hook, new_id

ENTITY_HEADERS = ("content-type", "content-encoding", "content-length", "transfer-encoding")
METRIC = "wasmcustom.webhook_emitter."


@pytest.fixture(scope="module")
def pair(job_service, receiver, envoys, wasm):
    org = new_id()
    hook = make_hook(receiver.port, org, ["job.completed"], name="passthrough")
    config = PluginConfig(hooks=[hook], delivery=delivery_section(max_body_bytes=1048576))
    plain = harness.Envoy(harness.build_bootstrap(job_service.port, receiver.port), name="passthrough-plain")
    envoys.append(plain)
    plain.start()
    filtered = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name="passthrough-filter")
    envoys.append(filtered)
    return {"plain": plain, "filtered": filtered, "org": org, "hook": hook}


def control_event(pair, receiver):
    job_id = new_id()
    resp = pair["filtered"].request("POST", f"/jobs/{job_id}/complete", {"x-organisation-id": pair["org"]}, b"{}")
    assert resp.status == 200
    receiver.wait_for(lambda d: d.object_id() == job_id, count=1, timeout=20)


# scenario -> (event expected, counter that must go up)
CASES = {
    "small": ("", True, None),
    "chunked-5MB": ("big", False, "bodies_too_large"),
    "invalid-json": ("invalid", False, "bodies_not_json"),
    "gzip": ("gzip", True, None),
    "corrupt-gzip": ("badgzip", False, "bodies_undecodable"),
    "over-maxBodyBytes": ("large", False, "bodies_too_large"),
    "failed": ("failed", False, None),
    "404": ("notfound", False, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_client_response_identical_with_and_without_filter(pair, receiver, case):
    scenario, event_expected, counter = CASES[case]
    filtered = pair["filtered"]
    before = filtered.custom_stats()
    job_id = new_id()
    path = f"/jobs/{job_id}/complete" + (f"?scenario={scenario}" if scenario else "")
    headers = {"x-organisation-id": pair["org"], "content-type": "application/json"}
    if "gzip" in scenario:
        headers["accept-encoding"] = "gzip"
    without = pair["plain"].request("POST", path, headers, b'{"result":"ok"}')
    with_filter = filtered.request("POST", path, headers, b'{"result":"ok"}')

    assert with_filter.status == without.status
    assert {h: with_filter.headers.get(h) for h in ENTITY_HEADERS} == {h: without.headers.get(h) for h in ENTITY_HEADERS}
    assert len(with_filter.body) == len(without.body)
    assert with_filter.body == without.body, "the filter changed the client's response body"
    if scenario == "big":
        assert with_filter.headers.get("transfer-encoding") == "chunked" and len(with_filter.body) >= 5 * 1024 * 1024

    if event_expected:
        (d,) = receiver.wait_for(lambda d: d.object_id() == job_id, count=1, timeout=20)
        check_delivery(d, pair["hook"], "job.completed", harness.completed_job(job_id))
    if counter:
        name = METRIC + counter
        harness.wait_until(lambda: filtered.custom_stats().get(name, 0) >= before.get(name, 0) + 1, timeout=10,
                           desc=f"{name} to go up from {before.get(name)} (custom stats now: {filtered.custom_stats()})")
    control_event(pair, receiver)
    got = receiver.deliveries(lambda d: d.object_id() == job_id)
    assert len(got) == (1 if event_expected else 0), f"{len(got)} deliveries for scenario {case!r}"
