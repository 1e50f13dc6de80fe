"""envoy/istio/: the mesh's flow with real Envoys, as far as a machine without Kubernetes allows.

- The egress (webhook-egress.yaml) runs its own Envoy configuration, taken from the manifest's ConfigMap; only
  what cannot work here is changed: its listener and admin move to loopback ports the OS picks, its DNS cache
  asks a DNS server on loopback (harness.dns) that resolves the test's public-looking names to 127.0.0.1, its
  trusted CA bundle is the test CA instead of the system bundle, and (where the test delivers to a receiver on
  loopback) its resolved-address filter is taken out. The shipped one refuses that loopback address.
- A sidecar-shaped Envoy runs the filter with the WasmPlugin's pluginConfig as shipped (rendered as Istio hands
  it over), the VM's host_env_keys from vmConfig.env, and clusters that carry Istio's names for the registry
  and egress Services (`outbound|<port>||<service>.<namespace>.svc.cluster.local`), pointing at the real
  registry and the egress Envoy on loopback. Istio's mutual TLS between the sidecars and the
  AuthorizationPolicy are not run here: the policy is checked against its CRD (tests/static/test_istio_crds.py)
  and against the workloads below.
- A webhook registered through the registry's API (its key shown once) gets the job's event over HTTPS through
  the egress, signed so that standardwebhooks verifies it with that key.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import os
import subprocess
import time

import pytest
import yaml
from test_deploy_istio import ISTIO, ISTIO_CLUSTER, istio_json, load_docs, one

import harness
from harness import registry as secrets_registry
from harness.checks import signature_valid
from harness.config import new_id
from harness.dns import DnsServer
from harness.egress import shipped_egress
from harness.envoy import Envoy, build_bootstrap, static_cluster, wasm_http_filter
from harness.registry_service import RegistryService
from harness.tls import Pki, TlsReceiver
from harness.util import http_request

NAMESPACE = "jobs"
EGRESS_LISTENER = "webhook_egress"
EGRESS_DNS_STATS = "dns_cache.webhook_egress_dns."
DELIVERED_NAME = "hooks.example.test"       # resolves to 127.0.0.1; in the receiver's certificate
REFUSED_NAME = "private.example.test"       # resolves to 127.0.0.1; the shipped egress must refuse it
UNCERTIFIED_NAME = "other.example.test"     # resolves to 127.0.0.1; NOT in the receiver's certificate
CUSTOMER_NAME = "customer.example.test"     # the registered webhook's host in the mesh flow
INTERNAL_HEADERS = ["x-forwarded-client-cert", "x-forwarded-for", "x-request-id", "x-b3-traceid", "traceparent",
                    "x-envoy-peer-metadata", "x-envoy-expected-rq-timeout-ms"]


# ---- the manifests -----------------------------------------------------------------------------------------------


def egress_bootstrap_as_shipped() -> dict:
    """The egress Envoy's bootstrap, exactly as the ConfigMap holds it."""
    config_map = one("ConfigMap", "webhook-egress-envoy")
    return yaml.safe_load(config_map["data"]["envoy.yaml"])


def _hcm(bootstrap: dict) -> dict:
    [listener] = bootstrap["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _dfp_filter(bootstrap: dict) -> dict:
    [dfp] = [f for f in _hcm(bootstrap)["http_filters"] if f["name"] == "envoy.filters.http.dynamic_forward_proxy"]
    return dfp


def _dfp_cluster(bootstrap: dict) -> dict:
    [cluster] = bootstrap["static_resources"]["clusters"]
    return cluster


def egress_bootstrap_for_test(ca, resolver: dict, refuse_private: bool = True) -> dict:
    """The shipped bootstrap with only what cannot run here changed (the module docstring lists it)."""
    bootstrap = copy.deepcopy(egress_bootstrap_as_shipped())
    bootstrap["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    [listener] = bootstrap["static_resources"]["listeners"]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": 0}
    dns = copy.deepcopy(_dfp_filter(bootstrap)["typed_config"]["dns_cache_config"])
    dns["typed_dns_resolver_config"] = copy.deepcopy(resolver)
    if not refuse_private:
        dns.pop("resolved_address_filter")
    cluster = _dfp_cluster(bootstrap)
    # The listener's filter and the cluster must name one cache with one configuration (Envoy refuses two).
    _dfp_filter(bootstrap)["typed_config"]["dns_cache_config"] = dns
    cluster["cluster_type"]["typed_config"]["dns_cache_config"] = copy.deepcopy(dns)
    validation = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}, "not the system bundle"
    validation["trusted_ca"] = {"filename": str(ca)}
    return bootstrap


def fqdn(service: dict) -> str:
    return f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"


def istio_cluster_of(service_name: str) -> str:
    """Istio's name for the sidecars' cluster of a Service's (only) HTTP port."""
    service = one("Service", service_name)
    [port] = service["spec"]["ports"]
    return f"outbound|{port['port']}||{fqdn(service)}"


# ---- static: the pieces agree --------------------------------------------------------------------------------------


def test_the_plugin_pulls_the_registry_through_its_services_istio_cluster():
    plugin = one("WasmPlugin")["spec"]
    block = plugin["pluginConfig"]["registry"]
    assert block["cluster"] == istio_cluster_of("webhook-registry")
    assert ISTIO_CLUSTER.match(block["cluster"])["host"] == block["authority"]
    # The feed's path is the filter's default, so the proxies follow the filter's feed version.
    assert "path" not in block
    # The token reaches the VM like a key: Secret -> istio-proxy env -> vmConfig.env (HOST) -> tokenEnv.
    assert {"name": block["tokenEnv"], "valueFrom": "HOST"} in plugin["vmConfig"]["env"]
    jobs = one("Deployment", "jobs")["spec"]["template"]["spec"]
    [proxy] = [c for c in jobs["containers"] if c["name"] == "istio-proxy"]
    [env] = [e for e in proxy["env"] if e["name"] == block["tokenEnv"]]
    ref = env["valueFrom"]["secretKeyRef"]
    registry_deployment = one("Deployment", "webhook-registry")["spec"]["template"]["spec"]
    [registry_container] = registry_deployment["containers"]
    assert {"secretRef": {"name": ref["name"]}} in registry_container["envFrom"], "not the registry's own Secret"
    assert f"--proxy-token-env={ref['key']}" in registry_container["args"]
    assert ref["key"] in one("Secret", ref["name"])["stringData"]


def test_every_delivery_goes_through_the_egress_service():
    config = one("WasmPlugin")["spec"]["pluginConfig"]
    egress = istio_cluster_of("webhook-egress")
    assert config["delivery"]["cluster"] == egress
    assert [w["id"] for w in config["webhooks"] if w.get("cluster", egress) != egress] == [], \
        "a configured webhook bypasses the egress"
    service = one("Service", "webhook-egress")
    [port] = service["spec"]["ports"]
    assert port.get("appProtocol") == "http" or port["name"].startswith("http"), "Istio must see an HTTP port"
    deployment = one("Deployment", "webhook-egress")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [listener] = egress_bootstrap_as_shipped()["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == port["targetPort"]
    # The egress Envoy runs the ConfigMap's configuration.
    [container] = pod["spec"]["containers"]
    [volume] = [v for v in pod["spec"]["volumes"] if v.get("configMap", {}).get("name") == "webhook-egress-envoy"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert container["args"][:2] == ["-c", f"{mount['mountPath']}/envoy.yaml"]
    assert container["image"].startswith("envoyproxy/envoy:v1.40"), "the Envoy the tests run"
    # Its own connections to the webhook hosts are not captured by its sidecar (which handles inbound only).
    assert pod["metadata"]["annotations"]["traffic.sidecar.istio.io/includeOutboundIPRanges"] == ""
    admin = egress_bootstrap_as_shipped()["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1", "the egress's admin interface must not be reachable from the mesh"


def test_only_the_emitting_workloads_may_use_the_egress():
    policy = one("AuthorizationPolicy", "webhook-egress")["spec"]
    egress_pod = one("Deployment", "webhook-egress")["spec"]["template"]
    assert policy["selector"]["matchLabels"].items() <= egress_pod["metadata"]["labels"].items()
    assert policy.get("action", "ALLOW") == "ALLOW"
    # The workloads the WasmPlugin runs in, and the service accounts they run as.
    selector = one("WasmPlugin")["spec"]["selector"]["matchLabels"]
    emitting = [d for _, d in load_docs() if d["kind"] == "Deployment"
                and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert [d["metadata"]["name"] for d in emitting] == ["jobs"]
    accounts = {d["spec"]["template"]["spec"].get("serviceAccountName", "default") for d in emitting}
    assert "default" not in accounts, "the job service must run as its own service account"
    for account in accounts:
        one("ServiceAccount", account)
    expected = {f"cluster.local/ns/{NAMESPACE}/sa/{a}" for a in accounts}
    principals = set()
    for rule in policy["rules"]:
        sources = rule.get("from")
        assert sources, "a rule without `from` lets every caller in"
        for source in sources:
            assert set(source["source"]) == {"principals"}, source
            principals |= set(source["source"]["principals"])
        for op in rule.get("to", []):
            assert set(op["operation"].get("ports", ["8080"])) == {"8080"}
    assert principals == expected, (principals, expected)


def test_the_egress_refuses_the_same_ranges_as_the_plain_envoy_egress():
    shipped = _dfp_filter(egress_bootstrap_as_shipped())["typed_config"]["dns_cache_config"]
    plain = shipped_egress().dns_cache_config
    assert shipped["resolved_address_filter"] == plain["resolved_address_filter"]
    cluster = _dfp_cluster(egress_bootstrap_as_shipped())
    assert cluster["cluster_type"]["typed_config"]["dns_cache_config"] == shipped
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["upstream_http_protocol_options"] == {"auto_sni": True, "auto_san_validation": True}
    ranges = [ipaddress.ip_network(f"{r['address_prefix']}/{r['prefix_len']}")
              for r in shipped["resolved_address_filter"]["ranges"]]
    for address in ("10.96.0.1", "127.0.0.1", "169.254.169.254", "172.20.0.5", "192.168.1.1", "::1", "fd00::1"):
        ip = ipaddress.ip_address(address)
        assert any(ip.version == n.version and ip in n for n in ranges), f"{address} (a cluster or pod address)"


def test_envoy_accepts_the_egress_configuration_exactly_as_shipped(tmp_path):
    """`envoy --mode validate` on the ConfigMap's text, unchanged (the system CA bundle path included)."""
    config_map = one("ConfigMap", "webhook-egress-envoy")
    path = tmp_path / "envoy.yaml"
    path.write_text(config_map["data"]["envoy.yaml"])
    done = subprocess.run([str(harness.ENVOY_BIN), "--mode", "validate", "-c", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    broken = tmp_path / "broken.yaml"
    broken.write_text(config_map["data"]["envoy.yaml"].replace("auto_san_validation", "auto_san_validations"))
    done = subprocess.run([str(harness.ENVOY_BIN), "--mode", "validate", "-c", str(broken)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "auto_san_validations" in done.stdout + done.stderr


# ---- the egress's own Envoy ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns():
    names = (DELIVERED_NAME, REFUSED_NAME, UNCERTIFIED_NAME, CUSTOMER_NAME)
    with DnsServer({n: "127.0.0.1" for n in names}) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"), "mesh", dns_names=[DELIVERED_NAME, REFUSED_NAME, CUSTOMER_NAME])


@pytest.fixture(scope="module")
def tls_receiver(pki):
    with TlsReceiver(pki) as receiver:
        yield receiver


def start_egress(envoys, name, pki, dns, refuse_private) -> Envoy:
    bootstrap = egress_bootstrap_for_test(pki.ca, dns.cares_resolver_config(), refuse_private=refuse_private)
    envoy = Envoy(bootstrap, name=name, listeners=(EGRESS_LISTENER,))
    envoys.append(envoy)
    return envoy.start()


@pytest.fixture(scope="module")
def open_egress(envoys, pki, dns):
    """The egress as shipped, but without the resolved-address filter: the receivers here are on loopback."""
    return start_egress(envoys, "webhook-egress-open", pki, dns, refuse_private=False)


def post_through(egress: Envoy, authority: str, path: str, headers=None) -> harness.Response:
    """What the sidecar sends on: plain HTTP/1.1 with the webhook's host in :authority."""
    return http_request(egress.ports[EGRESS_LISTENER], "POST", path,
                        {"Host": authority, "Content-Type": "application/json", **(headers or {})}, b'{"n":1}')


def test_the_egress_delivers_over_https_and_strips_what_the_mesh_added(open_egress, tls_receiver):
    path = f"/hooks/{new_id()}"
    authority = f"{DELIVERED_NAME}:{tls_receiver.port}"
    internal = {name: "cluster.local/ns/jobs/sa/jobs" for name in INTERNAL_HEADERS}
    answer = post_through(open_egress, authority, path, internal)
    assert answer.status == 200, answer
    [delivery] = tls_receiver.wait_for(lambda d: d.path == path, timeout=10)
    assert delivery.headers["host"] == authority
    assert delivery.body == b'{"n":1}'
    assert [h for h in INTERNAL_HEADERS if h in delivery.headers] == [], delivery.headers
    stats = open_egress.stats(r"^cluster\.webhook_egress_dfp\.ssl\.handshake$")
    assert stats.get("cluster.webhook_egress_dfp.ssl.handshake", 0) >= 1, "the delivery did not go out over TLS"


def test_the_egress_checks_the_certificate_against_the_host(open_egress, tls_receiver):
    """auto_san_validation: a certificate the CA signed, but for other names, is refused."""
    path = f"/hooks/{new_id()}"
    failures = tls_receiver.handshake_failures
    answer = post_through(open_egress, f"{UNCERTIFIED_NAME}:{tls_receiver.port}", path)
    assert answer.status == 503, answer
    assert tls_receiver.deliveries(lambda d: d.path == path) == []
    harness.wait_until(lambda: tls_receiver.handshake_failures > failures, timeout=5,
                       desc="the receiver to see the refused handshake")


def test_the_shipped_egress_refuses_a_name_that_resolves_to_loopback(envoys, pki, dns, tls_receiver):
    egress = start_egress(envoys, "webhook-egress-shipped", pki, dns, refuse_private=True)
    path = f"/hooks/{new_id()}"
    queried, failures = dns.queried(REFUSED_NAME), tls_receiver.handshake_failures
    answer = post_through(egress, f"{REFUSED_NAME}:{tls_receiver.port}", path)
    assert answer.status == 503, answer
    assert dns.queried(REFUSED_NAME) > queried, "the egress never asked the DNS server for the name"
    stats = egress.stats(r"^dns_cache\.")
    assert stats.get(EGRESS_DNS_STATS + "dns_address_filter_out", 0) >= 1, stats
    assert tls_receiver.deliveries(lambda d: d.path == path) == []
    assert tls_receiver.handshake_failures == failures, "the egress connected to the loopback receiver"
    # Literal addresses too: a caller in the mesh cannot send the egress to one by naming it in :authority.
    for literal in (f"127.0.0.1:{tls_receiver.port}", f"[::1]:{tls_receiver.port}"):
        dropped = egress.stats(r"^dns_cache\.").get(EGRESS_DNS_STATS + "dns_address_filter_out", 0)
        answer = post_through(egress, literal, path)
        assert answer.status == 503, (literal, answer)
        assert egress.stats(r"^dns_cache\.").get(EGRESS_DNS_STATS + "dns_address_filter_out", 0) > dropped, literal
    assert tls_receiver.deliveries(lambda d: d.path == path) == []
    assert tls_receiver.handshake_failures == failures, "the egress connected to the loopback receiver"
    egress.stop()


# ---- the mesh flow: registry -> sidecar-shaped Envoy -> egress -> receiver -------------------------------------------


@pytest.fixture(scope="module")
def registry_service(tmp_path_factory):
    subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=harness.REPO, check=True,
                   timeout=900)
    # As deployed: no --allow-insecure-http / --allow-private-networks (the webhook URL is an https name).
    service = RegistryService(tmp_path_factory.mktemp("registry"), loopback_webhooks=False)
    yield service
    service.stop()


def sidecar_shaped_envoy(envoys, wasm, job_service, registry_service, egress) -> Envoy:
    """The filter as Istio installs it from the WasmPlugin: pluginConfig as shipped, host_env_keys from vmConfig.env,
    failStrategy FAIL_RELOAD; clusters with Istio's names for the registry and egress Services."""
    spec = one("WasmPlugin")["spec"]
    config = spec["pluginConfig"]
    host_env_keys = [e["name"] for e in spec["vmConfig"]["env"] if e["valueFrom"] == "HOST"]
    assert spec["failStrategy"] == "FAIL_RELOAD"
    wasm_filter = wasm_http_filter(wasm, istio_json(config), host_env_keys=host_env_keys,
                                   failure_policy="FAIL_RELOAD")
    wasm_filter["typed_config"]["config"]["root_id"] = spec["pluginName"]
    clusters = [static_cluster(config["registry"]["cluster"], registry_service.port),
                static_cluster(config["delivery"]["cluster"], egress.ports[EGRESS_LISTENER],
                               large_circuit_breakers=True)]
    # The names are Istio's: outbound|8090||webhook-registry.jobs.svc.cluster.local and the egress's.
    assert [c["name"] for c in clusters] == [istio_cluster_of("webhook-registry"), istio_cluster_of("webhook-egress")]
    bootstrap = build_bootstrap(job_service.port, None, wasm_filter, extra_clusters=clusters)
    billing_key = secrets_registry.register_secret("whsec_" + base64.b64encode(os.urandom(32)).decode())
    env = {"BILLING_WEBHOOK_KEY": billing_key, config["registry"]["tokenEnv"]: registry_service.proxy_token}
    envoy = Envoy(bootstrap, name="sidecar-shaped", env=env)
    envoys.append(envoy)
    return envoy.start()


def test_registered_through_the_api_delivered_over_https_through_the_egress(
        envoys, wasm, job_service, registry_service, open_egress, tls_receiver):
    secrets_registry.register_secret(registry_service.proxy_token)
    sidecar = sidecar_shaped_envoy(envoys, wasm, job_service, registry_service, open_egress)
    poll_ms = one("WasmPlugin")["spec"]["pluginConfig"]["registry"]["pollMs"]
    registry_stat = f"cluster.{istio_cluster_of('webhook-registry')}.upstream_rq_completed"
    # The proxy has its first answer from the registry before the registration: the webhook comes with a later poll.
    harness.wait_until(lambda: sidecar.stats(r"\.upstream_rq_completed$").get(registry_stat, 0) >= 1, timeout=15,
                       desc="the first registry poll through outbound|8090||webhook-registry…")
    org = new_id()
    path = f"/hooks/{new_id()}"
    registered_at = time.time()
    webhook, key = registry_service.register(org, f"https://{CUSTOMER_NAME}:{tls_receiver.port}{path}")
    # Jobs complete until one is delivered: the first arrives once the registration reached the proxy.
    first = None
    deadline = registered_at + harness.scaled(poll_ms / 1000 + 15)
    while first is None and time.time() < deadline:
        job_id = job_service.own(new_id(), org)
        assert sidecar.request("POST", f"/jobs/{job_id}/complete", {}, b"{}").status == 200
        try:
            [first] = tls_receiver.wait_for(lambda d, j=job_id: d.path == path and d.object_id() == j, timeout=0.5)
        except harness.WaitTimeout:
            pass
    assert first is not None, f"no delivery within pollMs + 15 s of the registration; sidecar log:\n" \
                              f"{sidecar.log_tail()}"
    print(f"\nregistration to first delivery through the egress: "
          f"{(first.received_at - registered_at) * 1000:.0f} ms (pollMs {poll_ms})")
    assert first.json()["webhookId"] == webhook["id"] and first.json()["organisationId"] == org
    assert first.headers["host"] == f"{CUSTOMER_NAME}:{tls_receiver.port}"
    assert signature_valid(first, key), "standardwebhooks does not verify the delivery with the key shown once"
    assert not signature_valid(first, "whsec_" + base64.b64encode(os.urandom(32)).decode())
    # It went the mesh's way: the registry polled on its Istio-named cluster, the delivery through the egress.
    polls = sidecar.stats(r"\.upstream_rq_200$").get(f"cluster.{istio_cluster_of('webhook-registry')}.upstream_rq_200")
    assert polls and polls >= 1, "the registry was not polled through its Istio-named cluster"
    egress_stats = open_egress.stats(r"^http\.webhook_egress\.downstream_rq_2xx$")
    assert egress_stats.get("http.webhook_egress.downstream_rq_2xx", 0) >= 1
    assert secrets_registry.leaks_in(sidecar.log_text(), [registry_service.proxy_token, key]) == []
