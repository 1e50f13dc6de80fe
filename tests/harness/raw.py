"""A receiver that answers with raw bytes, for hostile-peer tests: header values that are not UTF-8, answers
cut short, answers that trickle in. Each request to it is read whole (headers, then Content-Length bytes) and
answered by the next script entry; the last entry repeats. Standard library only."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .servers import LOOPBACK


@dataclass
class RawReply:
    """What to send back: `data`, in one write, or `trickle` bytes every `interval` seconds; then keep the
    connection open (`linger` seconds) or close it."""

    data: bytes = b""
    trickle: Optional[bytes] = None
    interval: float = 0.5
    close: bool = True
    linger: float = 0.0


def ok_with(*headers: bytes) -> RawReply:
    """A 200 whose extra header lines are given as raw bytes."""
    extra = b"".join(h + b"\r\n" for h in headers)
    return RawReply(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 2\r\n\r\n{}")


def status_with(status: int, *headers: bytes) -> RawReply:
    extra = b"".join(h + b"\r\n" for h in headers)
    return RawReply(b"HTTP/1.1 %d X\r\n" % status + extra + b"Content-Length: 0\r\n\r\n")


@dataclass
class RawRequest:
    head: bytes
    body: bytes
    at: float

    def header(self, name: str) -> Optional[str]:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.encode():
                return v.strip().decode("latin-1")
        return None


@dataclass
class RawReceiver:
    script: list = field(default_factory=lambda: [ok_with()])
    requests: list = field(default_factory=list)

    def __post_init__(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(64)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        conn.settimeout(30)
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    self.requests.append(RawRequest(head, body, time.time()))
                    reply = self.script[min(len(self.requests), len(self.script)) - 1]
                if reply.trickle is not None:
                    conn.sendall(reply.data)
                    while not self._stop.wait(reply.interval):
                        conn.sendall(reply.trickle)
                    return
                conn.sendall(reply.data)
                if reply.linger:
                    self._stop.wait(reply.linger)
                if reply.close:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def stop(self):
        self._stop.set()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
