"""The Envoy-side gate of the shipped configurations (envoy/envoy.yaml): an ExtensionWithMatcher wrapping a
composite filter whose ExecuteFilterAction holds the wasm filter, so that only requests whose method and path some
rule can match reach the VM. The predicate comes from the filter's own CLI (`webhook-emitter envoy-matcher`), as a
user makes it."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from .envoy import REPO

EXTENSION_WITH_MATCHER = "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"
COMPOSITE = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"
EXECUTE_FILTER_ACTION = "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
GATE_NAME = "webhook_emitter_gate"

_cli: Optional[Path] = None


def cli() -> Path:
    """The native `webhook-emitter` CLI, built once per session if needed."""
    global _cli
    if _cli is None:
        proc = subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"cargo build --bin webhook-emitter failed:\n{proc.stderr[-3000:]}"
        _cli = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "debug" / "webhook-emitter"
    return _cli


def predicate(plugin_config) -> dict:
    """`webhook-emitter envoy-matcher --format json` for a plugin configuration (a dict or JSON text)."""
    text = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        f.write(text)
        f.flush()
        proc = subprocess.run([str(cli()), "envoy-matcher", "--format", "json", f.name], capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 0, f"envoy-matcher failed: {proc.stderr}"
    return json.loads(proc.stdout)


def gated(wasm_filter: dict, gate_predicate: dict) -> dict:
    """The wasm filter entry wrapped in the gate (as in envoy/envoy.yaml)."""
    return {
        "name": GATE_NAME,
        "typed_config": {
            "@type": EXTENSION_WITH_MATCHER,
            "extension_config": {"name": "composite", "typed_config": {"@type": COMPOSITE}},
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": gate_predicate,
                "on_match": {"action": {"name": "webhook_emitter", "typed_config": {
                    "@type": EXECUTE_FILTER_ACTION, "typed_config": wasm_filter}}},
            }]}},
        },
    }


def wasm_filter_of(http_filter: dict) -> Optional[dict]:
    """The envoy.filters.http.wasm entry of an HTTP filter, whether it is gated or not (None if it is neither)."""
    if http_filter.get("name") == "envoy.filters.http.wasm":
        return http_filter
    tc = http_filter.get("typed_config", {})
    if tc.get("@type") == EXTENSION_WITH_MATCHER:
        for m in tc.get("xds_matcher", {}).get("matcher_list", {}).get("matchers", []):
            inner = m.get("on_match", {}).get("action", {}).get("typed_config", {}).get("typed_config")
            if inner and inner.get("name") == "envoy.filters.http.wasm":
                return inner
    return None


def gate_predicate_of(http_filter: dict) -> Optional[dict]:
    """The predicate of a gated filter entry."""
    matchers = http_filter.get("typed_config", {}).get("xds_matcher", {}).get("matcher_list", {}).get("matchers")
    return matchers[0]["predicate"] if matchers else None
