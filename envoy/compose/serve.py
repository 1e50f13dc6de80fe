#!/usr/bin/env python3
"""The demo's job service and webhook receiver, for envoy/docker-compose.yaml (python:3.11-slim, stdlib only).

    python serve.py jobs     [--host 0.0.0.0] [--port 8080]
    python serve.py receiver [--host 0.0.0.0] [--port 8080]

jobs: the test suite's own job service (tests/harness/servers.py, JobService), so the demo answers exactly what
the end-to-end tests get: POST|PUT|PATCH /jobs/{id}/complete answers 200 {"id", "status": "completed", ...};
`?scenario=failed|notfound|big|gzip|...` picks the special answers. The harness serves on 127.0.0.1 with a port
chosen by the OS; here the same request handler is served on a fixed address instead, and each request is
logged rather than kept in memory.

receiver: a webhook endpoint that answers 200 to every delivery and prints one JSON line per request, with
`signatureValid` checked against BILLING_WEBHOOK_KEY (Standard Webhooks: HMAC-SHA256 over "{id}.{ts}.{body}",
stdlib only) when that variable is set.

Every line printed is one JSON object; the first says where the server listens ({"event": "listening", ...}).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The repository's tests/ folder: ../../tests in the repository, /srv/tests in the compose containers (which
# mount tests/ and envoy/compose/ at the same relative places).
TESTS = Path(os.environ.get("WEBHOOK_EMITTER_TESTS", HERE.parents[1] / "tests"))
SIGNATURE_TOLERANCE_S = 300


# The organisation of envoy/compose/envoy.yaml's webhook.
DEMO_ORGANISATION = "657bf08c202997ba9d127922"


def log(**fields) -> None:
    print(json.dumps(fields, separators=(",", ":")), flush=True)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


# ---- job service ---------------------------------------------------------------------------------------------


def job_service_server(host: str, port: int) -> Server:
    sys.path.insert(0, str(TESTS))
    try:
        from harness.servers import JobService
    except ImportError as e:
        raise SystemExit(f"serve.py: cannot import the job service from {TESTS}/harness/servers.py ({e}); "
                         "mount the repository's tests/ folder there or set WEBHOOK_EMITTER_TESTS")

    class LoggingJobService(JobService):
        """The harness keeps every request for the tests' assertions; a long-running demo logs them instead."""

        def _record(self, method, path, headers, body):
            log(event="request", service="jobs", method=method, path=path, bytes=len(body))

    server = Server((host, port), JobService.handler_class)
    # The harness's handler finds its service here (tests/harness/servers.py, _BackgroundServer.start).
    # Every job of the demo belongs to the demo organisation; the answer says so in its organisationId.
    server.owner = LoggingJobService(default_owner=DEMO_ORGANISATION)
    return server


# ---- receiver ------------------------------------------------------------------------------------------------


def signature_valid(key: str, msg_id: str, timestamp: str, body: bytes, signatures: str):
    """True/False per the Standard Webhooks scheme, None when there is no key to check with."""
    if not key:
        return None
    try:
        secret = base64.b64decode(key.removeprefix("whsec_"), validate=True)
        ts = int(timestamp)
    except (binascii.Error, ValueError):
        return False
    if abs(time.time() - ts) > SIGNATURE_TOLERANCE_S:
        return False
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(mac).decode()
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


class ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-receiver/1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        h = {k.lower(): v for k, v in self.headers.items()}
        try:
            event = json.loads(body)
        except ValueError:
            event = {}
        if not isinstance(event, dict):
            event = {}
        obj = (event.get("data") or {}).get("object") if isinstance(event.get("data"), dict) else None
        log(event="delivery", method=self.command, path=self.path,
            webhookId=h.get("webhook-id"), timestamp=h.get("webhook-timestamp"),
            signature=h.get("webhook-signature"), userAgent=h.get("user-agent"),
            eventType=event.get("eventType"), organisationId=event.get("organisationId"),
            objectId=obj.get("id") if isinstance(obj, dict) else None,
            signatureValid=signature_valid(os.environ.get("BILLING_WEBHOOK_KEY", ""), h.get("webhook-id", ""),
                                           h.get("webhook-timestamp", ""), body, h.get("webhook-signature", "")),
            body=body.decode("utf-8", "replace"))
        payload = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_PUT = do_PATCH = do_GET = do_POST


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="demo job service / webhook receiver")
    parser.add_argument("service", choices=["jobs", "receiver"])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    if args.service == "jobs":
        server = job_service_server(args.host, args.port)
    else:
        server = Server((args.host, args.port), ReceiverHandler)
    host, port = server.server_address[:2]
    log(event="listening", service=args.service, host=host, port=port)
    # As a container's PID 1 Python would ignore SIGTERM; stop at once instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
