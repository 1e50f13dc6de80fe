"""Shared fixtures for the end-to-end suite: the wasm path, the job service, the receiver, Envoys that are always
stopped, and one session-wide check that no API key made in the session appears in any Envoy log of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from harness import registry  # noqa: E402
from harness.envoy import _live  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--wasm",
        default=os.environ.get("WEBHOOK_EMITTER_WASM", str(harness.DEFAULT_WASM)),
        help="path of webhook_emitter.wasm (default: the release build under target/)",
    )


def pytest_report_header(config):
    return [f"envoy: {harness.ENVOY_BIN}", f"wasm: {config.getoption('--wasm')}",
            f"envoy work dirs and logs: {harness.session_dir()}"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the tail of every running Envoy's log to the report (the evidence to look at)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for envoy in sorted(_live, key=lambda e: e.name):
            report.sections.append((f"{envoy.name} log tail ({envoy.log_path})", envoy.log_tail(60)))


@pytest.fixture(scope="session")
def wasm(pytestconfig) -> Path:
    path = Path(pytestconfig.getoption("--wasm")).resolve()
    if not path.is_file():
        pytest.fail(f"{path} does not exist: run `make wasm` first (or pass --wasm)")
    return path


@pytest.fixture(scope="session")
def cli_built():
    """The native binary (the registry service and the CLI), built once for the session's tests that start it."""
    subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=harness.REPO, check=True,
                   timeout=900)


@pytest.fixture(scope="module")
def job_service():
    with harness.JobService() as js:
        yield js


@pytest.fixture(scope="module")
def receiver():
    with harness.Receiver() as rc:
        yield rc


@pytest.fixture(scope="session", autouse=True)
def no_api_key_in_any_envoy_log():
    """After the last test: no key made in this session (harness.registry) appears in any Envoy log the harness
    produced, in any form a log line could take (the whole whsec_ key, its base64 part, its bytes as hex). A
    leak fails the run as an error in this fixture's teardown."""
    yield
    for envoy in list(_live):
        envoy.stop()
    logs, keys = registry.logs(), registry.secrets()
    if not logs:
        return
    assert keys, "Envoys ran but no key was registered: the check would be vacuous"
    missing = [str(p) for p in logs if not Path(p).is_file()]
    assert not missing, f"Envoy logs missing: {missing}"
    leaks = [f"{p}: {found}" for p in logs for found in registry.leaks_in(Path(p).read_text(errors="replace"), keys)]
    assert not leaks, "API keys in Envoy logs:\n" + "\n".join(leaks)


@pytest.fixture(scope="module")
def envoys():
    """A list to put started Envoys in; all are stopped at module teardown."""
    started: list = []
    yield started
    for envoy in started:
        envoy.stop()


@pytest.fixture(scope="module")
def rc():
    """A receiver whose answers each test scripts per path (harness.faults.ScriptedReceiver)."""
    from harness.faults import ScriptedReceiver

    with ScriptedReceiver() as r:
        yield r


@pytest.fixture
def start_envoy(job_service, rc, envoys, wasm, request):
    """Starts an Envoy with the filter for this test, delivering to `rc`; stopped when the test ends."""
    mine = []

    def start(config, **kwargs):
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name=request.node.name[:40], **kwargs)
        envoys.append(envoy)
        mine.append(envoy)
        return envoy

    yield start
    for envoy in mine:
        envoy.stop()
