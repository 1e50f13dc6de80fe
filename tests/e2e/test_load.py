"""200 job completions at once, 3 subscribed webhooks: exactly 600 deliveries, no (webhookId, id) pair twice,
every signature valid (checked by standardwebhooks), one event id per job shared by its three deliveries."""

import threading
from collections import Counter

import harness
import pytest
from harness.checks import check_delivery
from harness.config import PluginConfig, delivery_section, make_hook, new_id

JOBS = 200
THREADS = JOBS  # one client thread per job, released together


@pytest.fixture(scope="module")
def setup(job_service, receiver, envoys, wasm):
    org = new_id()
    hooks = [make_hook(receiver.port, org, ["job.completed"], name=f"load-{i}") for i in range(3)]
    config = PluginConfig(hooks=hooks, delivery=delivery_section())
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name="load")
    envoys.append(envoy)
    return {"envoy": envoy, "org": org, "hooks": hooks, "config": config}


def test_200_concurrent_completions_give_exactly_600_valid_deliveries(setup, receiver):
    envoy, org, hooks = setup["envoy"], setup["org"], setup["hooks"]
    jobs = [new_id() for _ in range(JOBS)]
    statuses, errors = {}, []
    start = threading.Barrier(THREADS)
    lock = threading.Lock()

    def worker(my_jobs):
        start.wait(timeout=harness.scaled(30))
        for job_id in my_jobs:
            try:
                r = envoy.request("POST", f"/jobs/{job_id}/complete", {"x-organisation-id": org}, b"{}")
                ok = r.status == 200 and r.json() == harness.completed_job(job_id)
                with lock:
                    statuses[job_id] = r.status if ok else f"{r.status} {r.body[:80]!r}"
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(f"{job_id}: {e!r}")

    threads = [threading.Thread(target=worker, args=(jobs[i::THREADS],)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(harness.scaled(120))
    assert not any(t.is_alive() for t in threads), "client threads still running"
    assert not errors, errors[:5]
    bad = {j: s for j, s in statuses.items() if s != 200}
    assert len(statuses) == JOBS and not bad, f"{len(bad)} bad responses, e.g. {list(bad.items())[:3]}"

    job_set = set(jobs)
    receiver.wait_for(lambda d: d.object_id() in job_set, count=3 * JOBS, timeout=90)
    # Positive control: sent after all 200, it arrives after anything they could still produce.
    control = new_id()
    assert envoy.request("POST", f"/jobs/{control}/complete", {"x-organisation-id": org}, b"{}").status == 200
    receiver.wait_for(lambda d: d.object_id() == control, count=3, timeout=30)

    got = receiver.deliveries(lambda d: d.object_id() in job_set)
    pairs = Counter((d.webhook_id, d.event_id) for d in got)
    dupes = {p: n for p, n in pairs.items() if n > 1}
    assert not dupes, f"{len(dupes)} (webhookId, id) pairs delivered more than once, e.g. {list(dupes.items())[:3]}"
    assert len(got) == 3 * JOBS, f"{len(got)} deliveries, expected {3 * JOBS}"

    per_job = {}
    for d in got:
        per_job.setdefault(d.object_id(), []).append(d)
    hook_ids = sorted(h.id for h in hooks)
    for job_id, ds in per_job.items():
        assert sorted(d.webhook_id for d in ds) == hook_ids, f"job {job_id}: {sorted(d.webhook_id for d in ds)}"
        assert len({d.event_id for d in ds}) == 1, f"job {job_id}: event ids {[d.event_id for d in ds]}"
    assert len({ds[0].event_id for ds in per_job.values()}) == JOBS, "two jobs share an event id"
    for d in got:
        check_delivery(d, setup["config"].hook(d.webhook_id), "job.completed", harness.completed_job(d.object_id()))

    harness.wait_until(
        lambda: envoy.custom_stats().get("wasmcustom.webhook_emitter.deliveries_succeeded", 0) >= 3 * JOBS + 3,
        timeout=15, desc="deliveries_succeeded to count every delivery")
