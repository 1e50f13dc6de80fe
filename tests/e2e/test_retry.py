"""Using the receiver's response plan: a delivery answered 503 then 500 is retried on the
schedule and then succeeds. Every attempt carries the same webhook-id and body, a fresh valid signature, and
the retry counters move."""

import harness
import pytest
from harness.checks import check_delivery, signature_valid
from harness.config import PluginConfig, delivery_section, make_hook, new_id

METRIC = "wasmcustom.webhook_emitter."


@pytest.fixture(scope="module")
def setup(job_service, receiver, envoys, wasm):
    org = new_id()
    hook = make_hook(receiver.port, org, ["job.completed"], name="retry")
    config = PluginConfig(hooks=[hook], delivery=delivery_section(retrySchedule=["1s", "1s", "1s"]))
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name="retry")
    envoys.append(envoy)
    return {"envoy": envoy, "org": org, "hook": hook}


def test_failed_attempts_are_retried_with_the_same_id_and_body(setup, receiver):
    envoy, hook = setup["envoy"], setup["hook"]
    before = envoy.custom_stats()
    receiver.plan(hook.path, [503, 500])
    job_id = new_id()
    assert envoy.request("POST", f"/jobs/{job_id}/complete", {"x-organisation-id": setup["org"]}, b"{}").status == 200
    attempts = receiver.wait_for(lambda d: d.object_id() == job_id, count=3, timeout=30)
    harness.wait_until(
        lambda: envoy.custom_stats().get(METRIC + "deliveries_succeeded", 0) >= before.get(METRIC + "deliveries_succeeded", 0) + 1,
        timeout=10, desc="deliveries_succeeded to go up")

    assert len({d.headers["webhook-id"] for d in attempts}) == 1, [d.headers["webhook-id"] for d in attempts]
    assert len({d.body for d in attempts}) == 1, "the body changed between attempts"
    for d in attempts:
        assert signature_valid(d, hook.key)
    check_delivery(attempts[-1], hook, "job.completed", harness.completed_job(job_id))
    gaps = [b.received_at - a.received_at for a, b in zip(attempts, attempts[1:])]
    assert all(g >= 0.5 for g in gaps), f"retries came too fast for a 1s (±20%) schedule: {gaps}"

    after = envoy.custom_stats()
    assert after.get(METRIC + "deliveries_failed", 0) - before.get(METRIC + "deliveries_failed", 0) == 2, after
    assert after.get(METRIC + "deliveries_retried", 0) - before.get(METRIC + "deliveries_retried", 0) == 2, after
    assert after.get(METRIC + "deliveries_exhausted", 0) == before.get(METRIC + "deliveries_exhausted", 0), after
