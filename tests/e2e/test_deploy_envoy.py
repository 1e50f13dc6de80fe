"""envoy/envoy.yaml, the config users copy, is accepted by `envoy --mode validate`. Validate mode loads the wasm
module and runs the plugin's on_configure, so the file must exist (the test points the config at the built
module) and the plugin configuration inside it is checked too, including its {"env": ...} key."""

import os
import subprocess

import harness
from harness import registry
from harness.gate import gate_predicate_of, predicate, wasm_filter_of

REFERENCE = harness.REPO / "envoy" / "envoy.yaml"
WASM_IN_FILE = "target/wasm32-wasip1/release/webhook_emitter.wasm"


def validate(wasm, extra_env: dict, name: str):
    text = REFERENCE.read_text()
    assert WASM_IN_FILE in text
    work = harness.session_dir() / f"reference-{name}"
    work.mkdir(exist_ok=True)
    config = work / "envoy.yaml"
    config.write_text(text.replace(WASM_IN_FILE, str(wasm)))
    env = {k: v for k, v in os.environ.items() if k != "BILLING_WEBHOOK_KEY"}
    env.update(extra_env)
    log = work / "envoy.log"
    registry.register_log(log)
    with open(log, "wb") as out:
        proc = subprocess.run(
            [str(harness.ENVOY_BIN), "--mode", "validate", "-c", str(config), "-l", "info", "--disable-hot-restart"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(work),
            timeout=harness.scaled(60),
        )
    return proc.returncode, log.read_text(errors="replace")


def test_reference_config_shape():
    text = REFERENCE.read_text()
    for needle in ("port_value: 10000", "port_value: 9901", "envoy.filters.http.wasm", "envoy.wasm.runtime.v8",
                   "failure_policy: FAIL_RELOAD", '"apiKey": { "env": "BILLING_WEBHOOK_KEY" }',
                   "host_env_keys: [BILLING_WEBHOOK_KEY]", "max_pending_requests", "name: job_service",
                   '"cluster": "webhooks_egress"', "envoy.clusters.dynamic_forward_proxy", "auto_san_validation: true",
                   "remove: x-envoy-internal", "resolved_address_filter", "internal_listener: {}",
                   '"journal": { "cluster": "etcd"', "- name: etcd"):
        assert needle in text, f"envoy/envoy.yaml lacks {needle!r}"
    assert "whsec_" not in text.replace("whsec_...", ""), "a key is written into the reference config"


def test_reference_config_is_accepted_by_envoy_validate(wasm):
    rc, out = validate(wasm, {"BILLING_WEBHOOK_KEY": harness.new_key()}, "with-key")
    assert rc == 0 and "OK" in out, out[-3000:]
    assert "configuration rejected" not in out


def test_reference_config_without_its_key_is_refused(wasm):
    rc, out = validate(wasm, {}, "without-key")
    assert rc != 0, out[-3000:]
    assert "configuration rejected: webhooks[0].apiKey: environment variable BILLING_WEBHOOK_KEY is not set" in out, \
        out[-3000:]


def test_the_example_plugin_config_is_the_one_in_envoy_yaml_and_passes_check(tmp_path):
    """envoy/plugin.example.json (what the README's walk-through copies) is the configuration embedded in
    envoy/envoy.yaml, and `webhook-emitter check` accepts it when its key is in the environment."""
    import json

    import yaml

    doc = yaml.safe_load(REFERENCE.read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [wasm_filter] = [w for w in map(wasm_filter_of, hcm["http_filters"]) if w]
    embedded = json.loads(wasm_filter["typed_config"]["config"]["configuration"]["value"])
    example = harness.REPO / "envoy" / "plugin.example.json"
    assert json.loads(example.read_text()) == embedded

    subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=harness.REPO, check=True)
    cli = harness.REPO / "target" / "debug" / "webhook-emitter"
    env = dict(os.environ, BILLING_WEBHOOK_KEY=harness.new_key())
    ok = subprocess.run([str(cli), "check", str(example)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "valid (1 event rules, 1 webhooks)" in ok.stdout, ok.stdout + ok.stderr
    env.pop("BILLING_WEBHOOK_KEY")
    missing = subprocess.run([str(cli), "check", str(example)], env=env, capture_output=True, text=True)
    assert missing.returncode != 0
    assert "webhooks[0].apiKey: environment variable BILLING_WEBHOOK_KEY is not set" in missing.stderr


def test_every_shipped_envoy_configuration_gates_the_filter_with_the_matcher_of_its_rules():
    """envoy/envoy.yaml and envoy/compose/envoy.yaml wrap the filter in the gate, and the gate's predicate is
    exactly what `webhook-emitter envoy-matcher` prints for the plugin configuration they embed (so the two
    have not drifted apart)."""
    import json

    import yaml

    for path in (REFERENCE, harness.REPO / "envoy" / "compose" / "envoy.yaml"):
        doc = yaml.safe_load(path.read_text())
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        first = hcm["http_filters"][0]
        assert first["name"] == "webhook_emitter_gate", f"{path}: the first HTTP filter is {first['name']}"
        wasm_filter = wasm_filter_of(first)
        assert wasm_filter is not None, f"{path}: no wasm filter inside the gate"
        assert not any(f["name"] == "envoy.filters.http.wasm" for f in hcm["http_filters"]), \
            f"{path}: an ungated copy of the filter"
        plugin = json.loads(wasm_filter["typed_config"]["config"]["configuration"]["value"])
        assert gate_predicate_of(first) == predicate(plugin), f"{path}: run webhook-emitter envoy-matcher again"
