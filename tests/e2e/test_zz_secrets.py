"""Runs last (file order): no API key made during this session appears in any Envoy log of the session, in any
of the forms a log line could take (the whole whsec_ key, its base64 part, its bytes as hex)."""

from pathlib import Path

import pytest
from harness import registry


def test_no_api_key_in_any_envoy_log_of_the_session():
    logs = [Path(p) for p in registry.logs()]
    keys = registry.secrets()
    if not logs:
        pytest.skip("no Envoy ran in this session (run the whole suite: make e2e)")
    assert keys, "Envoys ran but no key was registered: the check would be vacuous"
    missing = [str(p) for p in logs if not p.is_file()]
    assert not missing, f"Envoy logs missing: {missing}"
    leaks = []
    for path in logs:
        found = registry.leaks_in(path.read_text(errors="replace"), keys)
        leaks.extend(f"{path}: {f}" for f in found)
    assert not leaks, "API keys in Envoy logs:\n" + "\n".join(leaks)
