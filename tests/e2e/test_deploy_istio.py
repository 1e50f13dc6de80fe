"""envoy/istio/: the Istio deployment (WasmPlugin, Secret wiring, egress with TLS origination) is well formed, its
plugin configuration passes the filter's own validator the way Istio hands it over, and the pieces agree with
each other (selector and labels, Secret and env names, the callout cluster and Istio's cluster naming).

No Kubernetes or Istio runs here: these are static checks plus `webhook-emitter check`, which validates with the
filter's own code. What Istio itself does with the resources is documented in envoy/istio/README.md."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import harness
from harness import registry

ISTIO = harness.REPO / "envoy" / "istio"
KEY_VAR = "BILLING_WEBHOOK_KEY"
TOKEN_VAR = "REGISTRY_PROXY_TOKEN"  # registry.tokenEnv: the registry's proxy token

EXPECTED = {
    ("v1", "Namespace", "jobs"),
    ("v1", "Service", "jobs"),
    ("apps/v1", "Deployment", "jobs"),
    ("v1", "Secret", "billing-webhook-key"),
    ("networking.istio.io/v1", "ServiceEntry", "billing-webhook"),
    ("networking.istio.io/v1", "DestinationRule", "billing-webhook"),
    ("extensions.istio.io/v1alpha1", "WasmPlugin", "webhook-emitter"),
    ("v1", "Service", "webhook-registry"),
    ("v1", "PersistentVolumeClaim", "webhook-registry-data"),
    ("apps/v1", "Deployment", "webhook-registry"),
    ("v1", "Secret", "webhook-registry"),
    ("v1", "ServiceAccount", "jobs"),
    ("v1", "ServiceAccount", "webhook-egress"),
    ("v1", "ConfigMap", "webhook-egress-envoy"),
    ("v1", "Service", "webhook-egress"),
    ("apps/v1", "Deployment", "webhook-egress"),
    ("security.istio.io/v1", "AuthorizationPolicy", "webhook-egress"),
}
# The fields of istio.extensions.v1alpha1.WasmPlugin (istio/api extensions/v1alpha1/wasm.proto), in JSON names.
WASMPLUGIN_FIELDS = {
    "selector", "targetRef", "targetRefs", "url", "sha256", "imagePullPolicy", "imagePullSecret",
    "verificationKey", "pluginConfig", "pluginName", "phase", "priority", "failStrategy", "vmConfig", "match",
    "type",
}
FAIL_STRATEGIES = {"FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"}
PHASES = {"UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"}
ISTIO_CLUSTER = re.compile(r"^outbound\|(?P<port>\d+)\|(?P<subset>[^|]*)\|(?P<host>[^|]+)$")


# ---- helpers ---------------------------------------------------------------------------------------------------


def cargo_target() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or harness.REPO / "target")


@pytest.fixture(scope="module")
def cli() -> Path:
    """The native `webhook-emitter` CLI (validation with the filter's own code), built if needed."""
    proc = subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=harness.REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"cargo build --bin webhook-emitter failed:\n{proc.stderr[-3000:]}"
    path = cargo_target() / "debug" / "webhook-emitter"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def key(cli) -> str:
    out = subprocess.run([str(cli), "keygen"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    assert out.startswith("whsec_"), "keygen printed no key"
    return registry.register_secret(out)


def run_check(cli: Path, config_text: str, tmp_path: Path, env_extra: dict) -> subprocess.CompletedProcess:
    path = tmp_path / f"plugin-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(config_text)
    env = {k: v for k, v in os.environ.items() if k not in (KEY_VAR, TOKEN_VAR)}
    # The registry's proxy token is set unless a test says otherwise (its own checks: test_deploy_istio_egress.py).
    env[TOKEN_VAR] = "a-proxy-token-for-the-check"
    env.update(env_extra)
    return subprocess.run([str(cli), "check", str(path)], capture_output=True, text=True, env=env, timeout=60)


def load_docs() -> list:
    docs = []
    # journal/ (the optional etcd journal) has its own checks: tests/e2e/test_deploy_istio_journal.py.
    for path in sorted(p for p in ISTIO.rglob("*.yaml") if "journal" not in p.relative_to(ISTIO).parts):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def one(kind: str, name: str = None) -> dict:
    found = [doc for _, doc in load_docs()
             if doc.get("kind") == kind and name in (None, (doc.get("metadata") or {}).get("name"))]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def istio_json(value) -> str:
    """`pluginConfig` as Istio hands it to the filter: the google.protobuf.Struct rendered by protojson
    (pilot/pkg/model/extensions.go: protomarshal.ToJSON(plugin.PluginConfig)). Struct numbers are doubles;
    protojson prints them without an exponent below 1e21, so whole numbers stay integers. Keys come out sorted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        f = float(value)
        assert math.isfinite(f), f"{value!r}: a Struct cannot carry it"
        assert f == value, f"{value!r} is not exactly representable as the double a Struct stores"
        return str(int(f)) if f.is_integer() and abs(f) < 1e21 else repr(f)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(istio_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{istio_json(value[k])}" for k in sorted(value)) + "}"
    raise AssertionError(f"{value!r} ({type(value).__name__}) cannot be a google.protobuf.Struct value")


def env_names(value) -> set:
    """Every {"env": NAME} apiKey reference in a plugin configuration."""
    names = set()
    if isinstance(value, dict):
        if set(value) == {"env"}:
            names.add(value["env"])
        for v in value.values():
            names |= env_names(v)
    elif isinstance(value, list):
        for v in value:
            names |= env_names(v)
    return names


# ---- the manifests -----------------------------------------------------------------------------------------------


def test_manifests_parse_with_expected_kinds():
    docs = load_docs()
    seen = {(d.get("apiVersion"), d.get("kind"), (d.get("metadata") or {}).get("name")) for _, d in docs}
    assert seen == EXPECTED, f"missing: {EXPECTED - seen}; unexpected: {seen - EXPECTED}"
    assert len(docs) == len(EXPECTED), "a resource is defined twice"
    for path, d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "jobs", f"{path.name}: {d['kind']} is not in namespace jobs"
        assert isinstance(d.get("spec") or d.get("stringData") or d.get("metadata"), dict)


def test_example_secret_is_out_of_a_plain_directory_apply():
    """`kubectl apply -f envoy/istio/` is not recursive: it must never apply the example Secret over a real key."""
    top_level_kinds = {doc.get("kind") for p in ISTIO.glob("*.yaml") for doc in yaml.safe_load_all(p.read_text())}
    assert "Secret" not in top_level_kinds
    assert {"Namespace", "Deployment", "WasmPlugin", "AuthorizationPolicy"} <= top_level_kinds
    # The per-host TLS origination pair is an alternative, not part of the shipped path (webhook-egress is).
    assert not {"ServiceEntry", "DestinationRule"} & top_level_kinds


def test_wasmplugin_fields_are_istio_fields():
    spec = one("WasmPlugin")["spec"]
    unknown = set(spec) - WASMPLUGIN_FIELDS
    assert not unknown, f"not WasmPlugin fields (typo?): {unknown}"
    assert spec["url"].startswith("oci://"), spec["url"]
    # A placeholder the CRD's pattern refuses (tests/static/test_istio_crds.py checks it against the CRD): an
    # unfinished apply fails instead of installing a plugin Istio cannot verify. `make oci` fills in the digest.
    assert spec["sha256"] and not re.fullmatch(r"[a-f0-9]{64}", str(spec["sha256"])), spec["sha256"]
    assert spec["failStrategy"] in FAIL_STRATEGIES and spec["failStrategy"] == "FAIL_RELOAD"
    assert spec["phase"] in PHASES and spec["phase"] == "STATS"
    assert spec["type"] == "HTTP"
    assert spec["selector"] == {"matchLabels": {"app": "jobs"}}
    assert spec["match"] == [{"mode": "SERVER", "ports": [{"number": 8080}]}], "only the job service's inbound traffic"
    env = spec["vmConfig"]["env"]
    assert {"name": KEY_VAR, "valueFrom": "HOST"} in env
    for e in env:
        # CRD rule: value may only be set when valueFrom is INLINE; a key must never be inline here.
        assert e.get("valueFrom") == "HOST" and "value" not in e, e


def test_sha256_placeholder_is_documented():
    text = (ISTIO / "README.md").read_text()
    assert "make oci" in text and "manifest digest" in text
    assert "make oci" in (ISTIO / "wasmplugin.yaml").read_text()


# ---- the plugin configuration, validated by the filter's own code --------------------------------------------------


def test_plugin_config_passes_the_filters_validator(cli, key, tmp_path):
    config = one("WasmPlugin")["spec"]["pluginConfig"]
    text = istio_json(config)
    ok = run_check(cli, text, tmp_path, {KEY_VAR: key})
    assert ok.returncode == 0, ok.stderr
    assert "valid (1 event rules, 1 webhooks)" in ok.stdout
    assert key not in ok.stdout + ok.stderr
    # The same text without the variable: the {"env": ...} reference is really what supplies the key.
    missing = run_check(cli, text, tmp_path, {})
    assert missing.returncode != 0
    assert f"webhooks[0].apiKey: environment variable {KEY_VAR} is not set" in missing.stderr


def _set(config: dict, path: tuple, value) -> dict:
    bad = copy.deepcopy(config)
    target = bad
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return bad


_DELETE = object()
CORRUPTIONS = [
    (("webhooks", 0, "url"), "http://billing.example.com/hooks/rapidlogix", "webhooks[0].url"),
    (("webhooks", 0, "id"), "not-an-id", "webhooks[0].id"),
    (("webhooks", 0, "status"), "on", "webhooks[0].status"),
    (("delivery", "retrySchedul"), ["5s"], "delivery.retrySchedul"),
    (("delivery", "timeoutMs"), "10s", "delivery.timeoutMs"),
    (("events", 0, "match", "path"), _DELETE, "events[0].match.path"),
]


@pytest.mark.parametrize("path,value,field", CORRUPTIONS, ids=[c[2] for c in CORRUPTIONS])
def test_a_corrupted_field_is_rejected_by_name(cli, key, tmp_path, path, value, field):
    config = one("WasmPlugin")["spec"]["pluginConfig"]
    bad = run_check(cli, istio_json(_set(config, path, value)), tmp_path, {KEY_VAR: key})
    assert bad.returncode != 0, f"a corrupted {field} was accepted:\n{bad.stdout}"
    assert f"{field}:" in bad.stderr, bad.stderr


def test_struct_conversion_keeps_integers():
    """The filter's numbers are integers (u64): protojson must not turn 10000 into 10000.0 or 1e+04."""
    assert istio_json({"a": 10000, "b": 1048576, "c": [200]}) == '{"a":10000,"b":1048576,"c":[200]}'
    with pytest.raises(AssertionError):
        istio_json({"too_big": 2**53 + 1})


# ---- the pieces agree --------------------------------------------------------------------------------------------


def test_secret_reaches_the_vm_through_the_sidecar_env(cli, tmp_path):
    plugin = one("WasmPlugin")["spec"]
    deployment = one("Deployment", "jobs")
    secret = one("Secret", "billing-webhook-key")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for k, v in plugin["selector"]["matchLabels"].items():
        assert labels.get(k) == v, f"the WasmPlugin selects {k}={v}, the job pods are labelled {labels}"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    host_env = {e["name"] for e in plugin["vmConfig"]["env"] if e.get("valueFrom") == "HOST"}
    referenced = env_names(plugin["pluginConfig"])
    assert referenced == {KEY_VAR} and referenced <= host_env, (referenced, host_env)

    # The filter runs in Envoy, i.e. the istio-proxy container: the variable must be in *its* environment.
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    proxy = containers.get("istio-proxy")
    assert proxy is not None, "no istio-proxy override container: the key would only reach the app container"
    assert proxy.get("image") == "auto", "let the injector pick the proxy image"
    proxy_env = {e["name"]: e for e in proxy.get("env", [])}
    for name in referenced:
        ref = proxy_env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert not any(name in {e["name"] for e in c.get("env", [])} for n, c in containers.items() if n != "istio-proxy"
                   for name in host_env), "a secret is also given to the app container, which does not need it"

    # The example Secret's value is a placeholder the filter refuses, so applying it by mistake fails closed.
    placeholder = secret["stringData"][KEY_VAR]
    refused = run_check(cli, istio_json(plugin["pluginConfig"]), tmp_path, {KEY_VAR: placeholder})
    assert refused.returncode != 0 and "webhooks[0].apiKey" in refused.stderr, refused.stderr


PER_HOST_CLUSTER = "outbound|80||billing.example.com"


def test_the_per_host_alternative_is_istios_tls_originating_cluster_for_the_webhook_host():
    """per-host/billing-webhook.yaml: a webhook whose own `cluster` is Istio's cluster of a ServiceEntry port that
    originates TLS to the webhook's host (the alternative to webhook-egress for one host)."""
    config = copy.deepcopy(one("WasmPlugin")["spec"]["pluginConfig"])
    config["webhooks"][0]["cluster"] = PER_HOST_CLUSTER
    se = one("ServiceEntry")["spec"]
    dr = one("DestinationRule")["spec"]
    assert se["location"] == "MESH_EXTERNAL" and se["resolution"] == "DNS"
    ports = {p["number"]: p for p in se["ports"]}
    assert ports.get(443, {}).get("protocol") == "HTTPS", "port 443 of the external host, as TLS passthrough"
    port_tls = {p["port"]["number"]: p.get("tls", {}) for p in dr["trafficPolicy"].get("portLevelSettings", [])}
    assert "tls" not in dr["trafficPolicy"], "TLS at the top level would also apply to port 443 (double TLS)"

    for what, cluster, url in [(f"webhooks[{i}] ({w['id']})", w["cluster"], w["url"])
                               for i, w in enumerate(config["webhooks"])]:
        m = ISTIO_CLUSTER.match(cluster or "")
        assert m, f"{what}: cluster {cluster!r} is not an Istio outbound cluster name (outbound|port||host)"
        host, port = m["host"], int(m["port"])
        assert m["subset"] == "", f"{what}: no DestinationRule subsets are defined"
        target_port = 443
        if url is not None:
            u = urlsplit(url)
            assert u.scheme == "https", f"{what}: {url}"
            assert host == u.hostname, f"{what}: cluster host {host} is not the webhook's host {u.hostname}"
            target_port = u.port or 443
        assert host in se["hosts"] and dr["host"] == host, f"{what}: {host} has no ServiceEntry/DestinationRule"
        sp = ports.get(port)
        assert sp is not None, f"{what}: the ServiceEntry has no port {port}, so Istio makes no cluster {cluster}"
        assert sp["protocol"] == "HTTP", f"{what}: the filter sends plain HTTP/1.1 to the cluster; the sidecar adds TLS"
        assert sp.get("targetPort", port) == target_port, f"{what}: port {port} does not lead to {target_port}"
        tls = port_tls.get(port, {})
        assert tls.get("mode") == "SIMPLE", f"{what}: no TLS origination on port {port}: deliveries would go out in clear"
        assert tls.get("sni") == host and host in tls.get("subjectAltNames", []), f"{what}: sni/SAN must be {host}"
    for number, p in ports.items():
        if p["protocol"] in ("HTTPS", "TLS"):
            assert port_tls.get(number, {}).get("mode") is None, f"TLS origination on {p['protocol']} port {number}"


def test_no_real_key_in_any_manifest():
    pattern = re.compile(r"whsec_[A-Za-z0-9+/]{32,}={0,2}")
    for path in ISTIO.rglob("*"):
        if path.is_file():
            assert not pattern.search(path.read_text()), f"{path}: looks like a real API key"
