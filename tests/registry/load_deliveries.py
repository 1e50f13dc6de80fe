"""A small load test of the delivery log on SQLite and on Postgres: prints what it measures, asserts nothing about
speed. Run with a release build: `cargo build --release --bin webhook-emitter && .venv/bin/python
tests/registry/load_deliveries.py --binary target/release/webhook-emitter`; h2load (Debian's nghttp2-client)
makes the requests over HTTP/1.1 keep-alive, on loopback.

Scenarios: proxies posting reports (each 100 attempts of 50 events on 2 webhooks, events with their envelopes;
one transaction each: multi-row inserts, the deliveries' upsert, the webhooks' health), an organisation admin
listing a page of 25 deliveries of a webhook that holds 50,000, and the same page filtered to failures."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.registry_service import Postgres, RegistryService  # noqa: E402
from load import h2load  # noqa: E402
from test_deliveries import attempt, create, event  # noqa: E402


def report_body(webhooks: list, events: int = 50) -> dict:
    now = int(time.time() * 1000)
    evs, attempts = [], []
    for i in range(events):
        eid = os.urandom(12).hex()
        evs.append(event(eid, created=now + i))
        for w in webhooks:
            ok = i % 10
            attempts.append(attempt(eid, w, 1, "delivered" if ok else "failed", at=now + i + 1,
                                    status=200 if ok else 503))
    return {"proxy": "load/worker-0", "events": evs, "attempts": attempts}


def run(reg: RegistryService, work: Path, requests: int, clients: int, history: int) -> dict:
    hooks = [create(reg)["id"], create(reg, name="Second")["id"]]
    body = work / "report.json"
    body.write_text(json.dumps(report_body(hooks)))
    proxy = {"authorization": f"Bearer {reg.proxy_token}", "content-type": "application/json"}
    n = max(requests // 10, 100)
    reports, codes = h2load(f"{reg.base_url}/v2/registry/reports", n, clients, proxy, body)
    assert codes["2xx"] == n, codes
    # A history to list from: distinct events, posted in reports of 500.
    posted = 0
    while posted < history:
        answer = reg.request("POST", "/v2/registry/reports", token=reg.proxy_token,
                             body=report_body(hooks[:1], 500))
        assert answer.status == 204, answer
        posted += 500
    admin = {"authorization": f"Bearer {reg.token(org='org-a')}"}
    base = f"{reg.base_url}/v1/organisations/org-a/webhooks/{hooks[0]}/deliveries"
    page, codes = h2load(base, requests, clients, admin)
    assert codes["2xx"] == requests, codes
    failed, codes = h2load(base + "?status=failed", requests, clients, admin)
    assert codes["2xx"] == requests, codes
    return {"reports/s (100 attempts each)": reports, "attempts/s": reports * 100,
            "list a page of 25 (req/s)": page, "list failures only (req/s)": failed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=None)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--history", type=int, default=50_000)
    args = parser.parse_args()
    if not shutil.which("h2load"):
        sys.exit("h2load is missing: bash bench/ensure-h2load.sh installs it (Debian nghttp2-client)")
    extra = {"binary": Path(args.binary)} if args.binary else {}
    work = Path(tempfile.mkdtemp(prefix="registry-load-deliveries-"))
    results = {}
    reg = RegistryService(work / "sqlite", **extra)
    try:
        results["SQLite"] = run(reg, work, args.requests, args.clients, args.history)
    finally:
        reg.stop()
    pg = Postgres(durable=True)
    try:
        reg = RegistryService(work / "postgres", database=pg.new_database(), **extra)
        try:
            results["Postgres"] = run(reg, work, args.requests, args.clients, args.history)
        finally:
            reg.stop()
    finally:
        pg.stop()
    for backend, numbers in results.items():
        print(backend)
        for name, value in numbers.items():
            print(f"  {name:32} {value:,.0f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
