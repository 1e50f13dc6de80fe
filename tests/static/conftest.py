"""Static checks: files the project ships, checked without starting Envoy (schemas, manifests, examples)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli() -> Path:
    """The native `webhook-emitter` CLI (the filter's own validator), built if needed."""
    proc = subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"cargo build --bin webhook-emitter failed:\n{proc.stderr[-3000:]}"
    path = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "debug" / "webhook-emitter"
    assert path.is_file(), path
    return path
