"""envoy/plugin.schema.json against the filter's own validator (`webhook-emitter check`): every shipped example
and every configuration in tests/config-corpus/valid/ is accepted by both; every configuration in
tests/config-corpus/invalid/ is refused by both, the validator naming the field the file was made to break
(tests/config-corpus/invalid-paths.json).

The schema checks less than the validator (cross-field rules, URL hosts, key lengths: see its description), so
the invalid corpus holds only what both can see. Where JSON Schema and the validator read a value differently
(`200.0` is an integer to JSON Schema, not to the validator), the corpus leaves it out."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO

SCHEMA_PATH = REPO / "envoy" / "plugin.schema.json"
CORPUS = REPO / "tests" / "config-corpus"
WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=None)


def schema_errors(validator, config) -> list:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(config)]


def check(cli: Path, text: str, tmp_path: Path, name: str) -> dict:
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run([str(cli), "check", "--format", "json", "--allow-unset-env", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 1), f"{name}: exit {proc.returncode}: {proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["valid"] == (proc.returncode == 0)
    return report


# ---- the shipped examples ----------------------------------------------------------------------------------------


def envoy_configurations(path: Path) -> list:
    """The plugin configuration of every webhook_emitter wasm filter in an Envoy YAML."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("@type") == WASM_FILTER and node.get("config", {}).get("root_id") == "webhook_emitter":
                found.append(json.loads(node["config"]["configuration"]["value"]))
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(path.read_text()))
    assert found, f"{path}: no webhook_emitter filter"
    return found


def readme_configuration() -> dict:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Configuration reference"):]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block, "README: no JSON example in the configuration reference"
    return json.loads(block.group(1))


def shipped_examples() -> list:
    examples = [("envoy/plugin.example.json", json.loads((REPO / "envoy/plugin.example.json").read_text())),
                ("README.md configuration reference", readme_configuration())]
    for rel in ("envoy/envoy.yaml", "envoy/compose/envoy.yaml"):
        examples += [(f"{rel} filter {i}", c) for i, c in enumerate(envoy_configurations(REPO / rel))]
    plugin = next(d for d in yaml.safe_load_all((REPO / "envoy/istio/wasmplugin.yaml").read_text())
                  if d and d.get("kind") == "WasmPlugin")
    examples.append(("envoy/istio/wasmplugin.yaml spec.pluginConfig", plugin["spec"]["pluginConfig"]))
    examples += [(f"tests/config-corpus/valid/{p.name}", json.loads(p.read_text()))
                 for p in sorted((CORPUS / "valid").glob("*.json"))]
    return examples


EXAMPLES = shipped_examples()


@pytest.mark.parametrize("name,config", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_every_shipped_example_is_valid_under_both(validator, cli, tmp_path, name, config):
    assert schema_errors(validator, config) == [], f"{name}: the schema refuses a configuration the project ships"
    report = check(cli, json.dumps(config), tmp_path, "example.json")
    assert report["valid"], f"{name}: the validator refuses it: {report['errors']}"


# ---- the invalid corpus ------------------------------------------------------------------------------------------

EXPECTED_PATHS = json.loads((CORPUS / "invalid-paths.json").read_text())
INVALID = sorted((CORPUS / "invalid").glob("*.json"))


def test_the_invalid_corpus_and_its_paths_list_agree():
    assert {p.stem for p in INVALID} == set(EXPECTED_PATHS)
    assert len(INVALID) >= 50


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_every_invalid_configuration_is_refused_by_both(validator, cli, tmp_path, path):
    config = json.loads(path.read_text())
    assert schema_errors(validator, config), f"{path.name}: the schema accepts it"
    report = check(cli, path.read_text(), tmp_path, path.name)
    assert not report["valid"], f"{path.name}: the validator accepts it"
    paths = [e["path"] for e in report["errors"]]
    assert EXPECTED_PATHS[path.stem] in paths, f"{path.name}: refused for another reason: {report['errors']}"


# ---- the schema itself -------------------------------------------------------------------------------------------


def test_every_field_has_a_description():
    """The descriptions are what an editor shows: every property of the configuration has one (directly, or on
    the definition it refers to)."""
    schema = json.loads(SCHEMA_PATH.read_text())
    defs = schema["$defs"]
    missing = []

    def described(node) -> bool:
        if "description" in node:
            return True
        for key in ("$ref",):
            if key in node:
                return "description" in defs[node[key].split("/")[-1]]
        return any(described(n) for n in node.get("anyOf", []))

    def walk(node, at):
        for name, prop in node.get("properties", {}).items():
            if not described(prop) and name not in ("match", "circuitBreaker", "pointer"):
                missing.append(f"{at}.{name}")
            walk(prop, f"{at}.{name}")
        for key in ("items",):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{at}[]")

    walk(schema, "")
    for name, d in defs.items():
        walk(d, f"$defs.{name}")
    assert not missing, f"properties without a description: {missing}"
