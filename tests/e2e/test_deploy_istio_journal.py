"""envoy/istio/journal/: the write-ahead journal on Istio (a 3-member etcd with TLS, mutual TLS from the sidecar).

Static checks like test_deploy_istio.py: the pluginConfig with the journal block passes the filter's own validator
(as Istio hands it over), the journal's cluster is Istio's cluster for the etcd-client service port, the
DestinationRule selects the job service's pods and originates mutual TLS to that host, and etcd requires client
certificates and compacts by revision. No Kubernetes or Istio runs here."""

from __future__ import annotations

import copy

import yaml
from test_deploy_istio import ISTIO, ISTIO_CLUSTER, KEY_VAR, cli, istio_json, key, one, run_check  # noqa: F401

JOURNAL = ISTIO / "journal"


def docs(name: str) -> list:
    return [d for d in yaml.safe_load_all((JOURNAL / name).read_text()) if d is not None]


def by_kind(name: str, kind: str) -> list:
    return [d for d in docs(name) if d["kind"] == kind]


def journal_block() -> dict:
    return yaml.safe_load((JOURNAL / "plugin-journal.yaml").read_text())["journal"]


def test_the_plugin_config_with_the_journal_passes_the_filters_validator(cli, key, tmp_path):  # noqa: F811
    config = copy.deepcopy(one("WasmPlugin")["spec"]["pluginConfig"])
    config["delivery"]["journal"] = journal_block()
    ok = run_check(cli, istio_json(config), tmp_path, {KEY_VAR: key})
    assert ok.returncode == 0, ok.stderr
    config["delivery"]["journal"]["leaseSeconds"] = 1
    bad = run_check(cli, istio_json(config), tmp_path, {KEY_VAR: key})
    assert bad.returncode != 0 and "delivery.journal.leaseSeconds" in bad.stderr


def test_the_journal_cluster_is_istios_cluster_for_the_etcd_client_service():
    journal = journal_block()
    m = ISTIO_CLUSTER.match(journal["cluster"])
    assert m, journal["cluster"]
    [service] = [s for s in by_kind("etcd.yaml", "Service") if s["metadata"]["name"] == "etcd-client"]
    fqdn = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert m["host"] == fqdn and journal["authority"] == fqdn
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert int(m["port"]) in ports, "no such service port: Istio makes no such cluster"
    [statefulset] = by_kind("etcd.yaml", "StatefulSet")
    assert statefulset["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()


def test_the_sidecar_originates_mutual_tls_to_etcd():
    [rule] = by_kind("destinationrule.yaml", "DestinationRule")
    journal = journal_block()
    assert rule["spec"]["host"] == journal["authority"]
    tls = rule["spec"]["trafficPolicy"]["tls"]
    assert tls["mode"] == "MUTUAL" and tls["credentialName"]
    assert tls["sni"] == journal["authority"] and journal["authority"] in tls["subjectAltNames"]
    # credentialName in a sidecar needs a workloadSelector; it must select the pods that run the filter.
    selector = rule["spec"]["workloadSelector"]["matchLabels"]
    plugin_selector = one("WasmPlugin")["spec"]["selector"]["matchLabels"]
    assert selector == plugin_selector
    assert rule["metadata"]["namespace"] == one("WasmPlugin")["metadata"]["namespace"]


def test_etcd_requires_client_certificates_and_compacts_by_revision():
    [statefulset] = by_kind("etcd.yaml", "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["command"])
    for flag in ("--client-cert-auth", "--trusted-ca-file=", "--cert-file=", "--peer-client-cert-auth",
                 "--listen-client-urls=https://", "--auto-compaction-mode=revision"):
        assert flag in script, f"etcd runs without {flag}"
    annotations = statefulset["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("sidecar.istio.io/inject") == "false", "etcd terminates its own TLS: no sidecar"
