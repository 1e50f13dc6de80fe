"""The Istio manifests (envoy/istio/) against the CustomResourceDefinitions of the Istio they need: the
openAPIV3Schema of each served version, as the API server applies it on `kubectl apply` (unknown fields refused,
enums, patterns such as `sha256`'s). No cluster: the CRDs are files, from the folder `shared/istio-crds` beside
the repository (`../shared/istio-crds/`; ISTIO_CRDS overrides it).

The schemas' CEL rules (x-kubernetes-validations) are evaluated too, with PyPI cel-python, except the one
that needs Kubernetes' URL library (WasmPlugin `spec.url`'s scheme), which is checked here in Python.
test_deploy_istio.py checks the manifests' consistency with each other."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from pathlib import Path

from urllib.parse import urlsplit

import celpy
import jsonschema
import pytest
import yaml
from celpy import celtypes

from conftest import REPO

ISTIO = REPO / "envoy" / "istio"
CRDS = Path(os.environ.get("ISTIO_CRDS") or REPO.parent / "shared" / "istio-crds")
PLACEHOLDER = "FILL-IN: the manifest digest that make oci prints"
DIGEST = "7631fd1db1e3cf2ce5660699a396b39f8fed5ce0c93e082e98d2554e9def0956"


# Rules cel-python cannot evaluate (Kubernetes CEL libraries), each checked another way below.
URL_RULE_PREFIX = 'isURL(self) ? (url(self).getScheme() in ["", "http", "https", "oci", "file"])'
CEL = celpy.Environment()


def cel_findings(schema: dict, value, path: str = "") -> tuple:
    """(refused, not evaluated): the x-kubernetes-validations rules along `value` that fail, as (path, message),
    and those cel-python could not evaluate, as (path, rule)."""
    refused, unevaluated = [], []

    def walk(node, value, path):
        if value is None or not isinstance(node, dict):
            return
        for rule in node.get("x-kubernetes-validations", []):
            try:
                result = CEL.program(CEL.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
            except Exception:  # noqa: BLE001 - a library the rule needs is missing here
                result = None
            if not isinstance(result, celtypes.BoolType):
                unevaluated.append((path, rule["rule"]))
            elif not result:
                refused.append((path, rule.get("message") or rule["rule"]))
        if isinstance(value, dict):
            for key, child in value.items():
                sub = node.get("properties", {}).get(key, node.get("additionalProperties"))
                walk(sub, child, f"{path}.{key}")
        elif isinstance(value, list):
            for i, child in enumerate(value):
                walk(node.get("items"), child, f"{path}[{i}]")

    walk(schema, value, path)
    return refused, unevaluated


def structural(schema: dict) -> dict:
    """A Kubernetes structural schema as plain JSON Schema: objects with `properties` and no
    x-kubernetes-preserve-unknown-fields refuse other fields (kubectl's default --validate=strict), `nullable`
    allows null, x-kubernetes-int-or-string allows both."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = node.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    """(apiVersion, kind) -> (a validator for the whole resource, the CRD's own schema with its CEL rules), from
    every served version of every CRD."""
    if not CRDS.is_dir():
        pytest.skip(f"Istio CRDs not found at {CRDS} (expected shared/istio-crds beside the repository, or set "
                    f"ISTIO_CRDS): the manifests were NOT validated against Istio's schemas")
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schema = structural(version["schema"]["openAPIV3Schema"])
                    # apiVersion, kind and metadata are the API server's, not the CRD's.
                    for field in ("apiVersion", "kind", "metadata"):
                        schema.setdefault("properties", {})[field] = {}
                    schemas[(f"{group}/{version['name']}", kind)] = (jsonschema.Draft7Validator(schema),
                                                                     version["schema"]["openAPIV3Schema"])
    assert schemas, f"{CRDS}: no CustomResourceDefinition"
    return schemas


def istio_resources(text: str) -> list:
    return [d for d in yaml.safe_load_all(text) if d and ".istio.io/" in d.get("apiVersion", "")]


def errors_of(crd_schemas: dict, resource: dict) -> list:
    """What the API server would refuse: schema errors, then failed CEL rules."""
    key = (resource["apiVersion"], resource["kind"])
    assert key in crd_schemas, f"{key}: no served CRD version (is the apiVersion right for Istio >= 1.27?)"
    validator, crd_schema = crd_schemas[key]
    errors = sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource))
    refused, unevaluated = cel_findings(crd_schema, resource)
    errors += [f"{path[1:]}: {message}" for path, message in refused]
    for path, rule in unevaluated:
        assert path == ".spec.url" and rule.startswith(URL_RULE_PREFIX), f"{path}: a CEL rule not evaluated: {rule}"
        scheme = urlsplit(resource["spec"]["url"]).scheme
        if scheme not in ("", "http", "https", "oci", "file"):
            errors.append(f"spec.url: the scheme {scheme!r} is not one of http, https, oci, file")
    return errors


def shipped() -> list:
    out = []
    for path in sorted(ISTIO.rglob("*.yaml")):
        out += [(path.relative_to(REPO), r) for r in istio_resources(path.read_text())]
    return out


def test_every_istio_resource_is_accepted_by_its_crd(crd_schemas):
    resources = shipped()
    assert {r["kind"] for _, r in resources} == {"WasmPlugin", "ServiceEntry", "DestinationRule",
                                                  "AuthorizationPolicy"}
    for path, resource in resources:
        errors = errors_of(crd_schemas, resource)
        if resource["kind"] == "WasmPlugin":
            # The placeholder is meant to be refused; nothing else may be.
            assert errors == [f"spec.sha256: {PLACEHOLDER!r} does not match '(^$|^[a-f0-9]{{64}}$)'"], \
                f"{path}: {errors}"
            filled = copy.deepcopy(resource)
            filled["spec"]["sha256"] = DIGEST
            errors = errors_of(crd_schemas, filled)
        assert errors == [], f"{path} {resource['kind']} {resource['metadata']['name']}: {errors}"


def test_the_sha256_placeholder_is_refused_and_is_not_the_empty_no_check_value(crd_schemas):
    """An empty sha256 passes the CRD and turns the check off; 64 zeros pass it and make Istio install a deny-all
    filter (403s). The placeholder must be neither."""
    (plugin,) = [r for _, r in shipped() if r["kind"] == "WasmPlugin"]
    assert plugin["spec"]["sha256"] == PLACEHOLDER
    for accepted in ("", "0" * 64):
        other = copy.deepcopy(plugin)
        other["spec"]["sha256"] = accepted
        assert errors_of(crd_schemas, other) == [], f"the CRD should accept {accepted!r}"


def test_the_validation_bites(crd_schemas):
    """Mistakes the API server refuses are refused here too: an unknown field, a bad enum, a bad TLS mode, and
    what only the CEL rules catch."""
    by_kind: dict = {}
    for path, r in shipped():  # the per-host DestinationRule, not the journal's
        if "journal" not in path.parts:
            by_kind.setdefault(r["kind"], r)
    plugin = copy.deepcopy(by_kind["WasmPlugin"])
    plugin["spec"]["sha256"] = DIGEST
    plugin["spec"]["failStrategy"] = "FAIL_RESTART"
    plugin["spec"]["vmConfig"]["env"][0]["from"] = "HOST"
    errors = errors_of(crd_schemas, plugin)
    assert any(e.startswith("spec.failStrategy:") for e in errors), errors
    assert any(e.startswith("spec.vmConfig.env.0:") and "'from'" in e for e in errors), errors
    entry = copy.deepcopy(by_kind["ServiceEntry"])
    entry["spec"]["resolution"] = "dns"
    assert any(e.startswith("spec.resolution:") for e in errors_of(crd_schemas, entry))
    rule = copy.deepcopy(by_kind["DestinationRule"])
    rule["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["mode"] = "TLS"
    assert errors_of(crd_schemas, rule)
    # The CEL rules.
    plugin = copy.deepcopy(by_kind["WasmPlugin"])
    plugin["spec"]["sha256"] = DIGEST
    plugin["spec"]["targetRefs"] = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"}]
    plugin["spec"]["vmConfig"]["env"][0]["value"] = "an inline key"
    plugin["spec"]["url"] = "ftp://registry.example.com/x"
    assert errors_of(crd_schemas, plugin) == [
        "spec: only one of targetRefs or selector can be set",
        "spec.vmConfig.env[0]: value may only be set when valueFrom is INLINE",
        "spec.url: the scheme 'ftp' is not one of http, https, oci, file"]
    entry = copy.deepcopy(by_kind["ServiceEntry"])
    entry["spec"]["ports"].append(dict(entry["spec"]["ports"][0]))
    assert errors_of(crd_schemas, entry) == ["spec.ports: port number cannot be duplicated"]
    rule = copy.deepcopy(by_kind["DestinationRule"])
    rule["spec"]["trafficPolicy"]["portLevelSettings"][0]["connectionPool"]["tcp"]["connectTimeout"] = "0s"
    assert any(e.startswith("spec.trafficPolicy.portLevelSettings[0].connectionPool.tcp.connectTimeout:")
               for e in errors_of(crd_schemas, rule)), errors_of(crd_schemas, rule)


def test_the_egress_authorization_policy_is_what_the_crd_accepts_and_its_mistakes_are_refused(crd_schemas):
    """webhook-egress.yaml's AuthorizationPolicy (only the emitting workloads may use the egress): accepted as
    shipped; an unknown action, a misspelt field, a principal given as a string, and what only its CEL rules
    catch, refused."""
    [policy] = [r for _, r in shipped() if r["kind"] == "AuthorizationPolicy"]
    assert policy["apiVersion"] == "security.istio.io/v1" and errors_of(crd_schemas, policy) == []
    bad = copy.deepcopy(policy)
    bad["spec"]["action"] = "PERMIT"
    assert any(e.startswith("spec.action:") for e in errors_of(crd_schemas, bad))
    bad = copy.deepcopy(policy)
    bad["spec"]["rules"][0]["from"][0]["source"]["principal"] = ["cluster.local/ns/jobs/sa/jobs"]
    assert any("'principal'" in e for e in errors_of(crd_schemas, bad)), errors_of(crd_schemas, bad)
    bad = copy.deepcopy(policy)
    bad["spec"]["rules"][0]["from"][0]["source"]["principals"] = "cluster.local/ns/jobs/sa/jobs"
    assert any(e.startswith("spec.rules.0.from.0.source.principals:") for e in errors_of(crd_schemas, bad))
    # The CEL rules.
    bad = copy.deepcopy(policy)
    bad["spec"]["rules"][0]["from"][0]["source"]["serviceAccounts"] = ["jobs/jobs"]
    bad["spec"]["selector"]["matchLabels"]["app"] = "webhook-*"
    bad["spec"]["targetRefs"] = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "egress"}]
    assert sorted(errors_of(crd_schemas, bad)) == [
        "spec.rules[0].from[0].source: Cannot set serviceAccounts with namespaces or principals",
        "spec.selector.matchLabels.app: wildcard not allowed in label value match",
        "spec: only one of targetRefs or selector can be set"], errors_of(crd_schemas, bad)


def test_fail_reload_is_in_the_crd_the_floor_names(crd_schemas):
    """FAIL_RELOAD, which the WasmPlugin uses, is in these (post-1.27) CRDs; Istio 1.26's lists only FAIL_CLOSE
    and FAIL_OPEN, so 1.27 is the floor every document must state."""
    plugin = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {},
              "spec": {"url": "oci://r/x:1", "failStrategy": "FAIL_RELOAD"}}
    assert errors_of(crd_schemas, plugin) == []
    for rel in ("README.md", "envoy/istio/README.md", "envoy/istio/wasmplugin.yaml", "docs/operations.md"):
        text = (REPO / rel).read_text()
        assert re.search(r"Istio (>= |≥ ?)?1\.27", text), f"{rel}: does not state the Istio floor 1.27"
        assert not re.search(r"Istio (>= ?|≥ ?)1\.2[0-6]\b|1\.2[0-6] or later", text), f"{rel}: an older floor"


def test_make_oci_writes_a_wasmplugin_the_crd_accepts(crd_schemas, tmp_path):
    """`make oci` fills the url and the manifest digest into target/oci/wasmplugin.yaml; that copy is what to
    apply."""
    spec = importlib.util.spec_from_file_location("build_oci", REPO / "envoy" / "oci" / "build_oci.py")
    build_oci = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_oci)
    wasm = tmp_path / "tiny.wasm"
    wasm.write_bytes(b"\0asm\x01\0\0\0")
    out = tmp_path / "oci"
    assert build_oci.main(["--wasm", str(wasm), "--out", str(out), "--repository", "registry.test/team/we",
                           "--tag", "9.9.9", "--json"]) == 0
    image = build_oci.build_image(wasm.read_bytes(), "9.9.9")
    (plugin,) = istio_resources((out / "wasmplugin.yaml").read_text())
    assert plugin["spec"]["sha256"] == image["manifest_digest"].removeprefix("sha256:")
    assert plugin["spec"]["url"] == "oci://registry.test/team/we:9.9.9"
    assert errors_of(crd_schemas, plugin) == []
    # Everything else is the shipped file, comments included, under a header that says where it came from.
    shipped_text = (ISTIO / "wasmplugin.yaml").read_text().splitlines()
    header, filled_text = (out / "wasmplugin.yaml").read_text().split("\n", 2)[:2], \
        (out / "wasmplugin.yaml").read_text().splitlines()[2:]
    assert header[0].startswith("# Written by `make oci`") and image["manifest_digest"] in header[1], header
    changed = [(a, b) for a, b in zip(shipped_text, filled_text) if a != b]
    assert len(shipped_text) == len(filled_text) and len(changed) == 2, changed


def test_make_oci_without_a_repository_writes_no_wasmplugin(tmp_path):
    """Without OCI_REPOSITORY the url would be the example registry: a WasmPlugin that fails its fetch in every
    pod. No file is better; a stale one from an earlier build is removed."""
    spec = importlib.util.spec_from_file_location("build_oci", REPO / "envoy" / "oci" / "build_oci.py")
    build_oci = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_oci)
    wasm = tmp_path / "tiny.wasm"
    wasm.write_bytes(b"\0asm\x01\0\0\0")
    out = tmp_path / "oci"
    out.mkdir()
    (out / "wasmplugin.yaml").write_text("stale")
    assert build_oci.main(["--wasm", str(wasm), "--out", str(out), "--json"]) == 0
    assert not (out / "wasmplugin.yaml").exists()
    assert (out / "webhook-emitter-oci.tar").is_file()
