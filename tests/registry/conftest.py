"""Fixtures for the registry suites: the binary, a real Postgres (one cluster per session), and registries on
SQLite and on Postgres (the `registry` fixture runs each test against both)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.registry_service import BINARY, Postgres, RegistryService  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def binary():
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: run `cargo build --bin webhook-emitter` (make registry-test does)")
    return BINARY


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres()
    yield pg
    pg.stop()


@pytest.fixture
def make_registry(tmp_path, request):
    """Starts registries; all are stopped after the test. backend: "sqlite" or "postgres"."""
    started = []

    def make(backend: str = "sqlite", **kwargs) -> RegistryService:
        if backend == "postgres" and "database" not in kwargs:
            kwargs["database"] = request.getfixturevalue("postgres").new_database()
        service = RegistryService(tmp_path / f"r{len(started)}", **kwargs)
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    return request.param


@pytest.fixture
def registry(make_registry, backend):
    """A registry with the filter's default URL rules: https only, no private or loopback addresses."""
    return make_registry(backend, loopback_webhooks=False)
