"""`registry seed` (hidden, for scale tests and the benchmark) on SQLite and Postgres: what it writes reads back
through the feed exactly, whatever its --url-prefix holds (values are bound, never spliced into the SQL), over
several INSERT statements; and it checks its webhooks as the API checks a registration."""

from __future__ import annotations

import subprocess


def test_seeded_webhooks_read_back_exactly_over_several_statements(make_registry, backend):
    registry = make_registry(backend, loopback_webhooks=True)
    prefix = "http://127.0.0.1:9/it's');DROP%20TABLE%20webhooks;--/"
    printed = registry.seed(2500, 7, maximal_every=500, url_prefix=prefix)
    assert "seeded 2500 webhooks in 7 organisations" in printed, printed
    changes, _ = registry.list_all()
    assert len(changes) == 2500
    assert sorted(c["url"] for c in changes) == sorted(f"{prefix}{i}" for i in range(2500))
    assert [c["revision"] for c in changes] == list(range(1, 2501))
    assert sum(1 for c in changes if len(c["description"]) > 0) == 5


def test_a_seed_the_api_would_refuse_writes_nothing(make_registry, backend):
    registry = make_registry(backend, loopback_webhooks=False)
    base = [registry.args[0], "registry", "seed", "--database", registry.database, "--count", "3"]
    base += ["--main-key-env", "REGISTRY_TEST_MAIN_KEY"] if registry.main_key else ["--insecure-plaintext-keys"]
    for extra, expected in [
        (["--url-prefix", "http://hooks.example.com/"], "--url-prefix: webhook 0's url: must be an https URL"),
        (["--url-prefix", "https://127.0.0.1/"], "--url-prefix: webhook 0's url: private or loopback address"),
        (["--events", "Job.Completed"], '--events: "Job.Completed" must look like resource.event'),
    ]:
        done = subprocess.run(base + extra, env=registry.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (extra, done.stdout, done.stderr)
        assert expected in done.stderr, (extra, done.stderr)
    changes, _ = registry.list_all()
    assert changes == []
