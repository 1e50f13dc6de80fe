"""A small load test of the registry's API on SQLite and on Postgres: prints requests per second, asserts nothing
about speed (speed is measured, never asserted). Run as `make registry-load` (a release build); h2load (Debian's
nghttp2-client) makes the requests over HTTP/1.1 keep-alive, all on loopback.

Scenarios: the proxies' poll answered 304, the whole registry document (100 webhooks, keys decrypted), an
organisation admin listing 20 webhooks (JWT checked on each request), and registrations (writes: one transaction
each, revision bump and audit row). Both databases commit durably (fsync on).

Then the version 2 feed at scale: 100,000 webhooks in 10,000 organisations written by `registry seed`, the time of
a full listing through `GET /v2/registry/changes` (every page, back to back, as a proxy's first sync), and the
proxies' steady-state poll (nothing changed: the small answer) and a poll 100 changes behind (one cached page)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.registry_service import WRITES_UNLIMITED, Postgres, RegistryService  # noqa: E402

BODY = {"name": "Load", "url": "https://hooks.example.com/load", "description": "", "status": "enabled",
        "events": ["job.completed"]}


# The write scenario makes thousands of webhooks in one organisation, as fast as it can: past the default quota
# and the default write rate.
WRITES_UNBOUNDED = ["--max-webhooks-per-organisation", "1000000", *WRITES_UNLIMITED]


def h2load(url: str, requests: int, clients: int, headers: dict, body: Path = None) -> tuple:
    args = ["h2load", "--h1", "-n", str(requests), "-c", str(clients), "-t", "1"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    if body:
        args += ["-d", str(body)]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out).groups()
    return rate, dict(zip(["2xx", "3xx", "4xx", "5xx"], map(int, codes)))


def run(reg: RegistryService, work: Path, requests: int, clients: int) -> list:
    token = reg.token(role="super_admin", org="platform")
    auth = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    for i in range(100):
        org = "org-load" if i < 20 else f"org-{i % 10}"
        assert reg.request("POST", f"/v1/organisations/{org}/webhooks", token=token, body=BODY).status == 201
    etag = reg.feed().headers["etag"]
    body = work / "body.json"
    body.write_text(json.dumps(BODY))
    base = reg.base_url
    results = []
    for name, url, headers, data, expect in [
        ("proxy poll, 304", f"{base}/v1/registry",
         {"authorization": f"Bearer {reg.proxy_token}", "if-none-match": etag}, None, "3xx"),
        ("registry document, 100 webhooks", f"{base}/v1/registry",
         {"authorization": f"Bearer {reg.proxy_token}"}, None, "2xx"),
        ("list 20 webhooks (JWT)", f"{base}/v1/organisations/org-load/webhooks", auth, None, "2xx"),
        ("create a webhook (write)", f"{base}/v1/organisations/org-w/webhooks", auth, body, "2xx"),
    ]:
        n = requests if data is None else max(requests // 5, 200)
        rate, codes = h2load(url, n, clients, headers, data)
        assert codes[expect] == n, (name, codes)
        results.append((name, rate))
    return results


def feed_at_scale(reg: RegistryService, requests: int, clients: int, count: int, organisations: int) -> dict:
    started = time.monotonic()
    reg.seed(count, organisations)
    seeded = time.monotonic() - started
    started = time.monotonic()
    changes, pages = reg.list_all(0)
    listed = time.monotonic() - started
    assert len(changes) == count, len(changes)
    head = json.loads(pages[-1])["next"]
    proxy = {"authorization": f"Bearer {reg.proxy_token}"}
    steady, codes = h2load(f"{reg.base_url}/v2/registry/changes?since={head}", requests, clients, proxy)
    assert codes["2xx"] == requests, codes
    behind, codes = h2load(f"{reg.base_url}/v2/registry/changes?since={head - 100}", requests, clients, proxy)
    assert codes["2xx"] == requests, codes
    return {"seed (s)": seeded, "full listing (s)": listed, "pages": len(pages),
            "steady poll (req/s)": steady, "poll 100 behind (req/s)": behind}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--webhooks", type=int, default=100_000)
    parser.add_argument("--organisations", type=int, default=10_000)
    args = parser.parse_args()
    if not shutil.which("h2load"):
        sys.exit("h2load is missing: bash bench/ensure-h2load.sh installs it (Debian nghttp2-client)")
    extra = {"binary": Path(args.binary)} if args.binary else {}
    work = Path(tempfile.mkdtemp(prefix="registry-load-"))
    table, scale = {}, {}
    scale_args = (args.requests, args.clients, args.webhooks, args.organisations)
    reg = RegistryService(work / "sqlite", extra_args=WRITES_UNBOUNDED, **extra)
    try:
        table["SQLite"] = run(reg, work, args.requests, args.clients)
    finally:
        reg.stop()
    reg = RegistryService(work / "sqlite-scale", **extra)
    try:
        scale["SQLite"] = feed_at_scale(reg, *scale_args)
    finally:
        reg.stop()
    pg = Postgres(durable=True)
    try:
        reg = RegistryService(work / "postgres", database=pg.new_database(), extra_args=WRITES_UNBOUNDED, **extra)
        try:
            table["Postgres"] = run(reg, work, args.requests, args.clients)
        finally:
            reg.stop()
        reg = RegistryService(work / "postgres-scale", database=pg.new_database(), **extra)
        try:
            scale["Postgres"] = feed_at_scale(reg, *scale_args)
        finally:
            reg.stop()
    finally:
        pg.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nregistry API, {args.clients} keep-alive clients, requests per second:")
    print(f"{'scenario':36} {'SQLite':>10} {'Postgres':>10}")
    for i, (name, _) in enumerate(table["SQLite"]):
        print(f"{name:36} {table['SQLite'][i][1]:>10.0f} {table['Postgres'][i][1]:>10.0f}")
    print(f"\nthe version 2 feed at {args.webhooks:,} webhooks in {args.organisations:,} organisations "
          f"({args.clients} keep-alive clients for the polls):")
    print(f"{'measure':36} {'SQLite':>10} {'Postgres':>10}")
    for name in scale["SQLite"]:
        print(f"{name:36} {scale['SQLite'][name]:>10.1f} {scale['Postgres'][name]:>10.1f}")


if __name__ == "__main__":
    main()
