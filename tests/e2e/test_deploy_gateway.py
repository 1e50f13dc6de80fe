"""The filter in an ingress gateway's position, with plain Envoy: a listener that terminates TLS for clients from
outside (HTTP/2 or HTTP/1.1 by ALPN), routes by host, rewrites the public path prefix before the job service,
carries other services' traffic too, and delivers over an https egress cluster (dynamic_forward_proxy, TLS to the
receiver). This is the shape of an Istio ingress gateway's listener (inbound traffic that the proxy terminates);
Istio's own listener layout and WasmPlugin selection are not exercised here (envoy/istio/README.md, "Gateways").

What it shows:
- A job completed by an HTTP/2 client (and an HTTP/1.1 one) through the gateway reaches the receiver, signed;
  the client's response is the job service's, byte for byte.
- The rule matches the path as the client sent it (`/api/jobs/{jobId}/complete`), not the rewritten one the
  job service sees; the same request on another virtual host without the prefix makes no event.
- A 5 MB response over HTTP/2 streams through whole while the filter gives up on it (bodies_too_large).

The client is curl (Debian's, with nghttp2); `make test` installs it when missing.
"""

import json
import shutil
import subprocess

import harness
import pytest
from harness.checks import check_delivery
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.envoy import LISTENER_NAME
from harness.observe import Counters
from harness.servers import JobService
from harness.egress import shipped_egress
from harness.tls import Pki, TlsReceiver

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
RULE = {"type": "job.completed", "objectType": "job",
        "match": {"methods": ["POST"], "path": "/api/jobs/{jobId}/complete", "status": [200]},
        "when": [{"pointer": "/status", "equals": "completed"}], "object": "",
        "organisationId": {"header": "x-organisation-id"}}

pytestmark = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="curl is not installed (make test installs it): the gateway tests did NOT run")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("gateway-pki"), "gateway")


@pytest.fixture(scope="module")
def tls_receiver(pki):
    r = TlsReceiver(pki).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def gateway(job_service, tls_receiver, pki, envoys, wasm):
    org = new_id()
    hook = make_hook(tls_receiver.port, org, ["job.completed"], name="gateway")
    hook.url = tls_receiver.url(hook.path)  # https://localhost:<port>/hooks/<id>
    plugin = PluginConfig(hooks=[hook], events=[RULE], delivery=delivery_section(cluster="webhooks_egress"))
    # The shipped egress, trusting this run's CA (the receiver is on loopback: no resolved-address filter).
    envoy = harness.envoy_with_filter(job_service, None, plugin, wasm=wasm, name="gateway", start=False,
                                      egress=shipped_egress(ca=pki.ca, refuse_private=False))
    bootstrap = envoy.bootstrap
    listener = next(li for li in bootstrap["static_resources"]["listeners"] if li["name"] == LISTENER_NAME)
    chain = listener["filter_chains"][0]
    # TLS for clients, HTTP/2 or HTTP/1.1 by ALPN, as a gateway's public listener.
    chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": str(pki.dir / "server.pem")},
                                  "private_key": {"filename": str(pki.dir / "server.key")}}]}}}
    hcm = chain["filters"][0]["typed_config"]
    hcm["use_remote_address"] = True
    hcm["route_config"]["virtual_hosts"] = [
        # The public API: /api/… on the jobs host, rewritten to the job service's own paths.
        {"name": "jobs", "domains": ["localhost", "localhost:*"],
         "routes": [{"match": {"prefix": "/api/"}, "route": {"cluster": "job_service", "prefix_rewrite": "/"}}]},
        # Everything else the gateway carries (here the same upstream, without the prefix).
        {"name": "other", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "job_service"}}]},
    ]
    assert hcm["http_filters"][-1]["name"] == ROUTER["name"]
    envoy.start()
    envoys.append(envoy)
    return {"envoy": envoy, "org": org, "hook": hook}


def curl(gateway, pki, tmp_path, url_host: str, path: str, http: str, org: str):
    """POST through the gateway with curl; returns (HTTP version, status, body bytes)."""
    out = tmp_path / f"body-{new_id()}"
    port = gateway["envoy"].listener_port
    proc = subprocess.run(
        ["curl", "-sS", f"--{http}", "--cacert", str(pki.ca), "-X", "POST", "-H", f"x-organisation-id: {org}",
         "-H", "content-type: application/json", "--data-binary", "{}", "-o", str(out),
         "-w", "%{http_version} %{http_code}", f"https://{url_host}:{port}{path}"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"curl failed: {proc.stderr}"
    version, status = proc.stdout.split()
    return version, int(status), out.read_bytes()


@pytest.mark.parametrize("http,version", [("http2", "2"), ("http1.1", "1.1")])
def test_a_job_completed_through_the_gateway_is_delivered(gateway, tls_receiver, job_service, pki, tmp_path,
                                                          http, version):
    envoy, hook = gateway["envoy"], gateway["hook"]
    counters = Counters(envoy)
    job_id = new_id()
    got_version, status, body = curl(gateway, pki, tmp_path, "localhost", f"/api/jobs/{job_id}/complete", http,
                                     gateway["org"])
    assert (got_version, status) == (version, 200)
    assert body == JobService().answer(job_id, "", {})[1], "the client's response was changed"
    # The job service got the rewritten path; the filter matched the public one.
    assert [r["path"] for r in job_service.requests_for(f"/jobs/{job_id}/")] == [f"/jobs/{job_id}/complete"]
    [delivery] = tls_receiver.wait_for(lambda d: d.object_id() == job_id, timeout=20)
    check_delivery(delivery, hook, "job.completed", harness.completed_job(job_id))
    counters.wait_delta("deliveries_succeeded", 1)
    assert counters.delta("events_emitted") == 1


def test_the_rule_sees_the_public_path_not_the_rewritten_one(gateway, tls_receiver, job_service, pki, tmp_path):
    envoy = gateway["envoy"]
    counters = Counters(envoy)
    job_id = new_id()
    # The same upstream request, reached through the other virtual host without /api: no rule matches it.
    version, status, body = curl(gateway, pki, tmp_path, "127.0.0.1", f"/jobs/{job_id}/complete", "http2",
                                 gateway["org"])
    assert (version, status) == ("2", 200) and json.loads(body)["id"] == job_id
    assert job_service.requests_for(f"/jobs/{job_id}/complete"), "the request did not reach the job service"
    # A marker through the public path: once it is delivered, the request before it had its chance too.
    marker = new_id()
    curl(gateway, pki, tmp_path, "localhost", f"/api/jobs/{marker}/complete", "http2", gateway["org"])
    tls_receiver.wait_for(lambda d: d.object_id() == marker, timeout=20)
    assert not tls_receiver.deliveries(lambda d: d.object_id() == job_id)
    assert counters.delta("events_emitted") == 1


def test_a_large_response_streams_through_over_http2_while_the_filter_gives_up(gateway, pki, tmp_path):
    envoy = gateway["envoy"]
    counters = Counters(envoy)
    job_id = new_id()
    version, status, body = curl(gateway, pki, tmp_path, "localhost", f"/api/jobs/{job_id}/complete?scenario=big",
                                 "http2", gateway["org"])
    assert (version, status) == ("2", 200)
    assert body == JobService().answer(job_id, "big", {})[1], f"{len(body)} bytes arrived"
    counters.wait_delta("bodies_too_large", 1)
    assert counters.delta("events_emitted") == 0
