"""HTTPS deliveries: TLS receivers with certificates from a CA made at test time.

- Through a per-webhook cluster that originates TLS and validates against the CA: the delivery arrives over
  TLS and its signature verifies.
- A receiver whose certificate the CA did not sign gets no event data; the attempt fails, is counted and retried.
- The shipped egress (envoy/envoy.yaml: an internal listener with the dynamic_forward_proxy filter, and a
  dynamic_forward_proxy cluster with auto_sni, auto_san_validation) carries deliveries to two different https
  URLs by their host, with no cluster per webhook; its upstream header_mutation filter strips the x-envoy-* and
  x-forwarded-* headers Envoy puts on callouts before they reach a third party.
"""

import harness
import pytest
from harness.checks import check_delivery
from harness.config import PluginConfig, delivery_section, new_id
from harness.egress import shipped_egress
from harness.tls import Pki, TlsReceiver, tls_cluster

METRIC = "wasmcustom.webhook_emitter."


def https_hook(receiver: TlsReceiver, org: str, cluster: str) -> harness.Hook:
    hook = harness.make_hook(receiver.port, org)
    hook.url = receiver.url(hook.path)
    hook.cluster = cluster
    return hook


def with_clusters(config: PluginConfig) -> dict:
    out = config.to_dict()
    for webhook, hook in zip(out["webhooks"], config.hooks):
        webhook["cluster"] = hook.cluster
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    return {"trusted": Pki(base, "trusted"), "rogue": Pki(base, "rogue")}


@pytest.fixture(scope="module")
def receivers(pki):
    started = [TlsReceiver(pki["trusted"]).start() for _ in range(2)] + [TlsReceiver(pki["rogue"]).start()]
    yield {"good": started[0], "good2": started[1], "rogue": started[2]}
    for r in started:
        r.stop()


@pytest.fixture(scope="module")
def static_tls(job_service, receivers, pki, envoys, wasm):
    """Per-webhook TLS clusters, all validating against the trusted CA."""
    org = new_id()
    good = https_hook(receivers["good"], org, "tls_good")
    rogue = https_hook(receivers["rogue"], org, "tls_rogue")
    config = PluginConfig(hooks=[good, rogue], delivery=delivery_section(retrySchedule=["300ms"] * 20))
    clusters = [tls_cluster("tls_good", receivers["good"].port, pki["trusted"].ca),
                tls_cluster("tls_rogue", receivers["rogue"].port, pki["trusted"].ca)]
    envoy = harness.envoy_with_filter(job_service, None, with_clusters(config), wasm=wasm, name="tls-static",
                                      extra_clusters=clusters)
    envoys.append(envoy)
    return {"envoy": envoy, "org": org, "good": good, "rogue": rogue}


def complete(envoy, org: str) -> str:
    job_id = new_id()
    r = envoy.request("POST", f"/jobs/{job_id}/complete", {"x-organisation-id": org}, b"{}")
    assert r.status == 200, r.status
    return job_id


def test_delivery_arrives_over_tls_and_verifies(static_tls, receivers):
    job_id = complete(static_tls["envoy"], static_tls["org"])
    [delivery] = receivers["good"].wait_for(lambda d: d.object_id() == job_id, timeout=20)
    hook = static_tls["good"]
    # The Host is the URL's host; the signature is checked by standardwebhooks inside check_delivery.
    check_delivery(delivery, hook, "job.completed", harness.completed_job(job_id))
    assert delivery.headers["host"] == f"localhost:{receivers['good'].port}"


def test_untrusted_certificate_gets_nothing_and_is_retried(static_tls, receivers):
    envoy = static_tls["envoy"]
    before = envoy.custom_stats()
    failures_before = receivers["rogue"].handshake_failures
    job_id = complete(envoy, static_tls["org"])
    # The trusted webhook of the same event is the positive control.
    receivers["good"].wait_for(lambda d: d.object_id() == job_id, timeout=20)
    harness.wait_until(
        lambda: envoy.custom_stats().get(METRIC + "deliveries_retried", 0) >= before.get(METRIC + "deliveries_retried", 0) + 2,
        timeout=20, desc="two failed attempts to the untrusted receiver to be retried")
    assert receivers["rogue"].handshake_failures > failures_before, "Envoy never tried the untrusted receiver"
    assert receivers["rogue"].deliveries() == [], "the untrusted receiver got event data"
    after = envoy.custom_stats()
    assert after[METRIC + "deliveries_failed"] - before.get(METRIC + "deliveries_failed", 0) >= 2
    retry_lines = [l for l in envoy.wasm_log_lines()
                   if "attempt failed, will retry" in l and f"webhook={static_tls['rogue'].id}" in l]
    assert retry_lines, "no retry log line for the untrusted webhook"


def test_one_dynamic_forward_proxy_cluster_reaches_any_https_url(job_service, receivers, pki, envoys, wasm):
    org = new_id()
    hooks = [https_hook(receivers["good"], org, "webhooks_egress"),
             https_hook(receivers["good2"], org, "webhooks_egress")]
    config = PluginConfig(hooks=hooks, delivery=delivery_section(retrySchedule=["300ms"] * 5))
    envoy = harness.envoy_with_filter(job_service, None, with_clusters(config), wasm=wasm, name="tls-dfp",
                                      egress=shipped_egress(ca=pki["trusted"].ca, refuse_private=False))
    envoys.append(envoy)
    job_id = complete(envoy, org)
    for hook, receiver in zip(hooks, (receivers["good"], receivers["good2"])):
        [delivery] = receiver.wait_for(lambda d, h=hook: d.object_id() == job_id and d.path == h.path, timeout=20)
        check_delivery(delivery, hook, "job.completed", harness.completed_job(job_id))
        # The shipped egress strips the headers Envoy adds to callouts.
        assert not [h for h in delivery.headers if h.startswith("x-envoy") or h.startswith("x-forwarded")
                    or h == "x-request-id"], delivery.headers
    # Envoy counts a 2xx once the answer is back, which can be just after the receiver recorded the request.
    harness.wait_until(
        lambda: envoy.stats(r"^cluster\.webhooks_egress_dfp\.upstream_rq_2xx$").get(
            "cluster.webhooks_egress_dfp.upstream_rq_2xx", 0) >= 2,
        timeout=10, desc="both deliveries to be counted as 2xx on the egress cluster")
