"""Shared fixtures for the end-to-end suite: the wasm path, the job service, the receiver, and Envoys that are
always stopped and whose logs are checked for API keys when they stop."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def job_service():
    with harness.JobService() as js:
        yield js


@pytest.fixture(scope="module")
def receiver():
    with harness.Receiver() as rc:
        yield rc


def stop_and_check(envoys) -> None:
    """Stop every Envoy, then fail if any API key the session made appears in any of their logs."""
    for envoy in envoys:
        envoy.stop()
    problems = []
    for envoy in envoys:
        leaks = registry.leaks_in(envoy.log_text())
        if leaks:
            problems.append(f"{envoy.name} ({envoy.log_path}): {', '.join(leaks)}")
    assert not problems, "API keys found in Envoy logs: " + "; ".join(problems)


@pytest.fixture(scope="module")
def envoys():
    """A list to put started Envoys in; at module teardown all are stopped and their logs checked for keys."""
    started: list = []
    yield started
    stop_and_check(started)


@pytest.fixture(scope="module")
def rc():
    """A receiver whose answers each test scripts per path (harness.faults.ScriptedReceiver)."""
    from harness.faults import ScriptedReceiver

    with ScriptedReceiver() as r:
        yield r


@pytest.fixture
def start_envoy(job_service, rc, envoys, wasm, request):
    """Starts an Envoy with the filter for this test, delivering to `rc`; stopped when the test ends (the
    module's `envoys` fixture checks its log for keys)."""
    mine = []

    def start(config, **kwargs):
        envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name=request.node.name[:40], **kwargs)
        envoys.append(envoy)
        mine.append(envoy)
        return envoy

    yield start
    for envoy in mine:
        envoy.stop()
