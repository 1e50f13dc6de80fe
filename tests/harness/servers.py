"""The real HTTP servers the end-to-end tests talk to, all on 127.0.0.1 with OS-assigned ports.

JobService: the upstream service behind Envoy. `POST|PUT|PATCH|GET /jobs/{id}/complete` completes a job;
`?scenario=` picks a special answer (see JobService.answer). `POST /jobs/{id}/start` starts one (a second
event type for the rules). `GET /jobs/{id}` reads a job back as its last completion left it (404 if none did),
which is what a rule's `refetch` asks for. Any other path answers 200 {"status":"completed"}.

Receiver: the webhook endpoints. Records every request it gets, answers 200 unless a per-path plan says
otherwise, and lets tests wait for deliveries with a deadline.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Optional
from urllib.parse import parse_qs, unquote

from .util import WaitTimeout, scaled

LOOPBACK = "127.0.0.1"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default (5) drops SYNs under a burst of concurrent upstream connections
    allow_reuse_address = True


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    te = (handler.headers.get("Transfer-Encoding") or "").lower()
    if "chunked" in te:
        out = bytearray()
        while True:
            line = handler.rfile.readline()
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # trailers until blank line
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class _BackgroundServer:
    """A ThreadingHTTPServer serving from a daemon thread. Use as a context manager or start()/stop()."""

    handler_class: type

    def __init__(self) -> None:
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def start(self):
        self._server = _Server((LOOPBACK, 0), self.handler_class)
        self._server.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name=f"{type(self).__name__}:{self.port}",
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------------------------------------------
# Job service
# --------------------------------------------------------------------------------------------------------------

_COMPLETE = re.compile(r"^/jobs/([^/]+)/complete$")
_START = re.compile(r"^/jobs/([^/]+)/start$")
_JOB = re.compile(r"^/jobs/([^/]+)$")


def routing_path(target: str) -> str:
    """The path the job service routes on, normalised as common frameworks do (and as the filter canonicalises):
    the query and fragment dropped, `;` path parameters dropped in each segment, %-escapes decoded, empty and `.`
    segments dropped, `..` removing the segment before it. (http.server hands the request target over as text,
    its bytes read as Latin-1.)"""
    path = re.split(r"[?#]", target, maxsplit=1)[0]
    segments: list = []
    for raw in path.split("/"):
        segment = unquote(raw.split(";", 1)[0], encoding="latin-1")
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def completed_job(job_id: str) -> dict:
    """The job object the job service answers for a plain completion (also what data.object must hold)."""
    return {
        "id": job_id,
        "status": "completed",
        "result": {"outputUrl": f"s3://results/{job_id}.json", "durationMs": 1234, "warnings": []},
    }


def started_job(job_id: str) -> dict:
    return {"id": job_id, "status": "started", "attempt": 1}


def _big_job(job_id: str, approx_bytes: int) -> bytes:
    rows = []
    i = 0
    size = 0
    while size < approx_bytes:
        row = json.dumps({"n": i, "sku": f"SKU-{i:08d}", "note": "lorem ipsum dolor sit amet " * 3})
        rows.append(row)
        size += len(row) + 1
        i += 1
    head = json.dumps({"id": job_id, "status": "completed"})[:-1]
    return (head + ', "result": {"rows": [' + ",".join(rows) + "]}}").encode()


class _JobHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "job-service/1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _stall(self) -> None:
        """Sends nothing until the peer closes the connection (at most 30 s), then closes it."""
        self.connection.settimeout(scaled(30))
        try:
            while self.connection.recv(65536):
                pass
        except OSError:
            pass
        self.close_connection = True

    def _send_cut(self, status: int, body: bytes, hold: bool) -> None:
        """The headers (with the whole body's Content-Length) and half the body. Then either the connection is
        closed at once (the upstream cut its body), or, with `hold`, kept until the peer closes it (a client that
        hangs up after the headers makes Envoy reset the upstream side too), at most 30 s."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if hold:
            self.connection.settimeout(scaled(30))
            try:
                while self.connection.recv(65536):
                    pass
            except OSError:
                pass
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def _send(self, status: int, body: bytes, headers: Iterable = (), chunk_size: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in headers:
            self.send_header(k, v)
        if chunk_size:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), chunk_size):
                part = body[i : i + chunk_size]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            # Headers and body leave in one write, so Envoy normally reads the whole response at once.
            self.send_header("Content-Length", str(len(body)))
            self._headers_buffer.append(b"\r\n")
            if self.command != "HEAD":
                self._headers_buffer.append(body)
            self.flush_headers()
        self.wfile.flush()

    def _handle(self) -> None:
        body = _read_body(self)
        query_text = self.path.split("?", 1)[1].split("#", 1)[0] if "?" in self.path else ""
        query = {k: v[-1] for k, v in parse_qs(query_text).items()}
        path = routing_path(self.path)
        owner: JobService = self.server.owner  # type: ignore[attr-defined]
        owner._record(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        scenario = query.get("scenario", "")
        m = _COMPLETE.match(path)
        if m:
            status, payload, headers, chunk = owner.answer(m.group(1), scenario, query)
            if scenario in ("hold", "cut"):
                self._send_cut(status, payload, hold=scenario == "hold")
                return
            if scenario in ("stall", "stall-undone"):
                self._stall()
                return
            self._send(status, payload, headers, chunk)
            return
        m = _JOB.match(path)
        if m and self.command == "GET":
            self._send(*owner.read_job(m.group(1)))
            return
        m = _START.match(path)
        if m:
            self._send(200, json.dumps(started_job(m.group(1))).encode())
            return
        self._send(200, b'{"status":"completed"}')

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class JobService(_BackgroundServer):
    """The upstream behind Envoy. Answers are deterministic, so the same request through Envoy with and without
    the filter must give byte-identical bodies."""

    handler_class = _JobHandler
    BIG_BYTES = 5 * 1024 * 1024  # scenario=big: ~5 MB, sent chunked
    BIG_CHUNK = 16 * 1024  # ... in ~320 chunks
    LARGE_BYTES = 1_200_000  # scenario=large default size (over the default maxBodyBytes of 1 MiB)

    # Scenarios that answer completely: through Envoy they must arrive byte-identical.
    SCENARIOS = ("", "failed", "notfound", "big", "invalid", "gzip", "badgzip", "large")
    # Scenarios that hang or cut the answer on purpose (the hang-up and refetch tests).
    BROKEN_SCENARIOS = ("hold", "cut", "stall", "stall-undone")

    def __init__(self, default_owner: Optional[str] = None) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.requests: list = []
        # The service's own record of which organisation each job belongs to: it answers a completion with the
        # job's organisationId, as an upstream does once its own authorisation has looked the job up.
        self.owners: dict = {}
        self.default_owner = default_owner
        # What GET /jobs/{id} answers: each job as its last completion answered it (bytes), and how many more
        # reads of a job must fail with 503 (a failing upstream; -1: all of them).
        self.jobs: dict = {}
        self.read_failures: dict = {}

    def own(self, job_id: str, organisation_id: str) -> str:
        """Records that job_id belongs to organisation_id; returns job_id."""
        with self._lock:
            self.owners[job_id] = organisation_id
        return job_id

    def _record(self, method, path, headers, body):
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})

    def requests_for(self, path_prefix: str) -> list:
        with self._lock:
            return [r for r in self.requests if r["path"].startswith(path_prefix)]

    def fail_reads(self, job_id: str, times: int = -1) -> str:
        """The next `times` GET /jobs/{job_id} answer 503 (-1: every one); returns job_id."""
        with self._lock:
            self.read_failures[job_id] = times
        return job_id

    def read_job(self, job_id: str):
        """(status, body) for GET /jobs/{id}: the job as its last completion left it, 404 if none did."""
        with self._lock:
            failures = self.read_failures.get(job_id, 0)
            if failures:
                self.read_failures[job_id] = failures - 1 if failures > 0 else -1
                return 503, b'{"error": "unavailable"}'
            job = self.jobs.get(job_id)
        if job is None:
            return 404, json.dumps({"error": "job not found", "id": job_id}).encode()
        return 200, job

    def answer(self, job_id: str, scenario: str, query: dict):
        """(status, body bytes, extra headers, chunk size or 0) for /jobs/{id}/complete?scenario=...; a job
        answered with 200 and a JSON body is kept for GET /jobs/{id}. `hold` and `cut` answer the plain
        completion, cut after half its body (see _JobHandler._send_cut); `stall` completes the job but sends
        nothing until the peer hangs up; `stall-undone` does the same without completing it."""
        answer = self._answer(job_id, scenario, query)
        status, body, headers, _ = answer
        if status == 200 and not headers and scenario not in ("invalid", "big", "stall-undone"):
            with self._lock:
                self.jobs[job_id] = body
        return answer

    def _answer(self, job_id: str, scenario: str, query: dict):
        if scenario == "failed":
            job = {"id": job_id, "status": "failed", "error": {"code": "E_TIMEOUT", "message": "worker timed out"}}
            return 200, json.dumps(job).encode(), (), 0
        if scenario == "notfound":
            return 404, json.dumps({"error": "job not found", "id": job_id, "status": "completed"}).encode(), (), 0
        if scenario == "big":
            return 200, _big_job(job_id, int(query.get("bytes", self.BIG_BYTES))), (), self.BIG_CHUNK
        if scenario == "invalid":
            return 200, ('{"id": "%s", "status": "completed", "result": {oops' % job_id).encode(), (), 0
        if scenario == "gzip":
            raw = json.dumps(completed_job(job_id)).encode()
            return 200, gzip.compress(raw, mtime=0), (("Content-Encoding", "gzip"),), 0
        if scenario == "badgzip":
            raw = gzip.compress(json.dumps(completed_job(job_id)).encode(), mtime=0)
            return 200, raw[:12] + bytes(b ^ 0x5A for b in raw[12:]), (("Content-Encoding", "gzip"),), 0
        if scenario == "large":
            n = int(query.get("bytes", self.LARGE_BYTES))
            job = {"id": job_id, "status": "completed", "result": {"blob": "a" * n}}
            return 200, json.dumps(self._owned(job)).encode(), (), 0
        return 200, json.dumps(self._owned(completed_job(job_id))).encode(), (), 0

    def _owned(self, job: dict) -> dict:
        """The job with its organisationId, when the service knows the job's organisation."""
        with self._lock:
            owner = self.owners.get(job["id"], self.default_owner)
        return {**job, "organisationId": owner} if owner else job


# --------------------------------------------------------------------------------------------------------------
# Receiver
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    method: str
    path: str
    headers: dict  # lowercased names
    body: bytes
    received_at: float  # time.time()
    # (id, webhookId, data.object.id), parsed once: predicates of wait_for() read them for every recorded
    # request each time one more arrives, so parsing the body every time would cost O(n^2) JSON decoding.
    _ids: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def json(self):
        return json.loads(self.body)

    def _parsed_ids(self) -> tuple:
        if self._ids is None:
            try:
                doc = self.json()
            except ValueError:
                doc = None
            event_id = webhook_id = object_id = None
            if isinstance(doc, dict):
                event_id, webhook_id = doc.get("id"), doc.get("webhookId")
                try:
                    object_id = doc["data"]["object"]["id"]
                except (KeyError, TypeError):
                    pass
            self._ids = (event_id, webhook_id, object_id)
        return self._ids

    @property
    def event_id(self) -> Optional[str]:
        return self._parsed_ids()[0]

    @property
    def webhook_id(self) -> Optional[str]:
        return self._parsed_ids()[1]

    def object_id(self) -> Optional[str]:
        """data.object.id (the job id), or None."""
        return self._parsed_ids()[2]


class _ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, the second waits for a delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server_version = "receiver/1"

    def log_message(self, *args):
        pass

    def _handle(self) -> None:
        body = _read_body(self)
        owner: Receiver = self.server.owner  # type: ignore[attr-defined]
        status = owner._record(
            Delivery(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
        )
        payload = b'{"ok":true}' if 200 <= status < 300 else b'{"ok":false}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        # Headers and body in one write: one system call (and one release of the GIL) less per answer.
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(payload)
        self.flush_headers()
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class Receiver(_BackgroundServer):
    """Records every request; thread-safe. Answers 200 unless plan(path, [statuses]) says otherwise."""

    handler_class = _ReceiverHandler

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()
        self._deliveries: list = []
        self._plans: dict = {}

    def _record(self, d: Delivery) -> int:
        with self._cond:
            self._deliveries.append(d)
            plan = self._plans.get(d.path)
            status = plan.popleft() if plan else 200
            self._cond.notify_all()
            return status

    def plan(self, path: str, statuses: Iterable[int]) -> None:
        """The next requests to `path` get these statuses, in order; after that 200 again."""
        with self._cond:
            self._plans[path] = deque(statuses)

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def deliveries(self, predicate: Optional[Callable[[Delivery], bool]] = None) -> list:
        with self._cond:
            items = list(self._deliveries)
        return [d for d in items if predicate is None or predicate(d)]

    def wait_for(
        self, predicate: Optional[Callable[[Delivery], bool]] = None, count: int = 1, timeout: float = 20.0
    ) -> list:
        """Block until at least `count` recorded requests match `predicate`; return all that match.
        Raises WaitTimeout (an AssertionError) at the deadline, saying how many did arrive."""
        deadline = time.monotonic() + scaled(timeout)
        seen = -1
        while True:
            with self._cond:
                # Sleep until a new request is recorded (at most 0.5 s), then copy the list and look at it
                # outside the lock: the handlers need the lock to record, and a predicate over hundreds of
                # requests must not hold their answers back (the callout times out waiting for them).
                remaining = deadline - time.monotonic()
                if len(self._deliveries) == seen and remaining > 0:
                    self._cond.wait(min(remaining, 0.5))
                items = list(self._deliveries)
            seen = len(items)
            matching = [d for d in items if predicate is None or predicate(d)]
            if len(matching) >= count:
                return matching
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"timed out after {scaled(timeout):.1f}s: {len(matching)} of {count} expected deliveries "
                    f"arrived ({len(items)} requests recorded in total)"
                )
