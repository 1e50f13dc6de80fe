"""Receivers that misbehave on purpose, for the retry, isolation and load tests.

ScriptedReceiver: a Receiver (same recording, same wait_for) whose answer to each request is chosen by a
per-path script: a status, extra headers (Retry-After), a delay, a gate to wait for, or no answer at all (the
connection stays open until the receiver stops). Requests to paths without a script are answered as Receiver
answers them (its plan(), else 200).

LateReceiver: a ScriptedReceiver whose port is reserved (bound) at start() but that only listens from open()
on. Until then a connection to it is refused (the kernel answers a SYN with RST), as a closed port would be.

Standard library only.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from .servers import LOOPBACK, Delivery, Receiver, _read_body, _ReceiverHandler, _Server


@dataclass
class Reply:
    """How to answer one request."""

    status: int = 200
    headers: tuple = ()  # extra (name, value) pairs, e.g. (("Retry-After", "2"),)
    delay: float = 0.0  # seconds to wait before answering
    gate: Optional[threading.Event] = None  # wait until this is set (or the receiver stops) before answering
    hang: bool = False  # never answer: hold the connection open until the receiver stops


# A script entry: a Reply, a bare status, or a function (delivery, n) -> Reply | int, where n counts the
# requests to that path so far (1 for the first).
Answer = Union[Reply, int, Callable[[Delivery, int], Union[Reply, int]]]


def _as_reply(answer, delivery: Delivery, n: int) -> Reply:
    if callable(answer) and not isinstance(answer, Reply):
        answer = answer(delivery, n)
    if isinstance(answer, Reply):
        return answer
    return Reply(status=int(answer))


class _ScriptedHandler(_ReceiverHandler):
    def _handle(self) -> None:
        body = _read_body(self)
        owner: ScriptedReceiver = self.server.owner  # type: ignore[attr-defined]
        delivery = Delivery(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                            time.time())
        reply = owner._record_scripted(delivery)
        if reply.hang:
            owner._stopping.wait()
            self.close_connection = True
            return
        if reply.gate is not None:
            while not reply.gate.wait(0.05):
                if owner._stopping.is_set():
                    self.close_connection = True
                    return
        if reply.delay > 0:
            if owner._stopping.wait(reply.delay):
                self.close_connection = True
                return
        payload = b'{"ok":true}' if 200 <= reply.status < 300 else b'{"ok":false}'
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            for k, v in reply.headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            # Headers and body in one write: as two small writes, Nagle's algorithm and the peer's delayed ACK
            # hold the body back ~40 ms, and Envoy would see every answer that much later.
            self._headers_buffer.append(b"\r\n")
            self._headers_buffer.append(payload)
            self.flush_headers()
            self.wfile.flush()
        except OSError:  # the client (Envoy) gave up on this request already
            self.close_connection = True
        owner._count_answer(reply.status)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class ScriptedReceiver(Receiver):
    """A Receiver whose answers follow per-path scripts (see Reply). Thread-safe."""

    handler_class = _ScriptedHandler

    def __init__(self) -> None:
        super().__init__()
        self._scripts: dict = {}  # path -> deque of answers (consumed) or a single standing answer
        self._standing: dict = {}  # path -> answer used for every request once the deque is empty
        self._counts: dict = {}  # path -> requests so far
        self._default: Optional[Answer] = None
        self._stopping = threading.Event()
        self.answered: dict = {}  # status -> how many answers were actually written

    # -- scripting ----------------------------------------------------------------------------------------
    def script(self, path: str, answers: Iterable[Answer] = (), then: Optional[Answer] = None) -> None:
        """The next requests to `path` are answered by `answers` in order; after them, by `then` for every
        request (None: as Receiver would, i.e. its plan() or 200). Replaces any earlier script of the path."""
        with self._cond:
            self._scripts[path] = deque(answers)
            if then is None:
                self._standing.pop(path, None)
            else:
                self._standing[path] = then

    def always(self, path: str, answer: Answer) -> None:
        """Every request to `path` from now on is answered by `answer`."""
        self.script(path, (), then=answer)

    def default(self, answer: Optional[Answer]) -> None:
        """The answer for paths that have no script (None: Receiver's plan() or 200)."""
        with self._cond:
            self._default = answer

    def requests_to(self, path: str) -> list:
        return self.deliveries(lambda d: d.path == path)

    def accepted(self, predicate: Optional[Callable[[Delivery], bool]] = None) -> list:
        """The recorded requests that were (or are being) answered 2xx, matching `predicate`."""
        return self.deliveries(lambda d: 200 <= (getattr(d, "answer", None) or 0) < 300
                               and (predicate is None or predicate(d)))

    # -- internals ----------------------------------------------------------------------------------------
    def _record_scripted(self, d: Delivery) -> Reply:
        with self._cond:
            self._deliveries.append(d)
            n = self._counts.get(d.path, 0) + 1
            self._counts[d.path] = n
            queue = self._scripts.get(d.path)
            if queue:
                answer = queue.popleft()
            elif d.path in self._standing:
                answer = self._standing[d.path]
            elif self._default is not None:
                answer = self._default
            else:
                plan = self._plans.get(d.path)
                answer = plan.popleft() if plan else 200
            reply = _as_reply(answer, d, n)
            # What this request is (or will be) answered: its status, or None when it is never answered.
            d.answer = None if reply.hang else reply.status  # type: ignore[attr-defined]
            self._cond.notify_all()
        return reply

    def _count_answer(self, status: int) -> None:
        with self._cond:
            self.answered[status] = self.answered.get(status, 0) + 1

    def stop(self) -> None:
        self._stopping.set()  # lets hanging and gated handlers return
        super().stop()


def random_failures(rate: float, status: int = 503, seed: Optional[int] = None) -> Callable[[Delivery, int], int]:
    """An answer that fails a fraction `rate` of requests at random with `status`, and answers 200 otherwise."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def answer(_delivery: Delivery, _n: int) -> int:
        with lock:
            return status if rng.random() < rate else 200

    return answer


class LateReceiver(ScriptedReceiver):
    """Port reserved at start(), refusing connections until open()."""

    def start(self):
        self._server = _Server((LOOPBACK, 0), self.handler_class, bind_and_activate=False)
        self._server.owner = self  # type: ignore[attr-defined]
        try:
            self._server.server_bind()  # bound, not listening: a connection attempt is refused
        except BaseException:
            self._server.server_close()
            raise
        return self

    @property
    def is_open(self) -> bool:
        return self._thread is not None

    def open(self) -> None:
        """Start listening and serving on the reserved port."""
        assert self._server is not None and self._thread is None, "not started, or already open"
        self._server.server_activate()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"LateReceiver:{self.port}")
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is None:  # never opened: nothing serves, just close
            self._stopping.set()
            self._server.server_close()
            self._server = None
            return
        super().stop()
