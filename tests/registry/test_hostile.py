"""Hostile peers against the registry: silent and trickling clients, heads too large, bytes that are not HTTP or
not UTF-8. None of them takes the registry down or holds a connection for ever, and the others are still served."""

from __future__ import annotations

import socket
import time

from harness.registry_service import LOOPBACK
from harness.util import scaled, wait_until


def connect(port: int) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=scaled(60))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_silent_and_trickling_clients_are_cut_off(make_registry):
    registry = make_registry()
    token = registry.token()
    half_heads = [connect(registry.port) for _ in range(20)]
    for s in half_heads:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: registry\r\n")
    short_body = connect(registry.port)
    short_body.sendall(f"POST /v1/organisations/org-a/webhooks HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {token}"
                       f"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\":".encode())
    silent = connect(registry.port)
    # Everyone else is served meanwhile.
    started = time.monotonic()
    assert registry.request("GET", "/healthz").status == 200
    assert registry.request("GET", "/v1/organisations/org-a/webhooks", token=token).status == 200
    assert time.monotonic() - started < scaled(5)
    # The registry ends each of them: a head not sent in 10 s, a body not sent in 15 s.
    for s in half_heads + [silent]:
        answer = read_until_closed(s)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:100]
    answer = read_until_closed(short_body)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < scaled(60)
    assert registry.request("GET", "/v1/organisations/org-a/webhooks", token=token).json() == {"webhooks": []}


def test_bad_bytes_get_an_error_and_the_registry_goes_on(registry):
    cases = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello
        b"GET /\xff\xfe HTTP/1.1\r\nHost: r\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: r\r\nX-Bad: \xff\xfe\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: r\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"POST /v1/organisations/org-a/webhooks HTTP/1.1\r\nHost: r\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/organisations/org-a/webhooks HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for payload in cases:
        s = connect(registry.port)
        try:
            s.sendall(payload)
        except OSError:
            pass  # the registry may close before it has read everything
        try:
            answer = read_until_closed(s)
        except ConnectionResetError:
            answer = b""
        s.close()
        assert answer == b"" or answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 401", b"HTTP/1.1 404", b"HTTP/1.1 415",
                                                b"HTTP/1.1 431",
                                                b"HTTP/1.1 408"), (payload[:40], answer[:100])
    for path in ["/v1/organisations/%ff%fe/webhooks", "/v1/organisations/org-a/webhooks/%c0%af",
                 "/v1/organisations/a%00b/webhooks", "/v1/organisations/org-a/webhooks/aaaaaaaaaaaa%00aaaaaaaaaaa",
                 "/v1/organisations/" + "o" * 129 + "/webhooks"]:
        answer = registry.request("GET", path, token=registry.token(role="super_admin"))
        assert answer.status in (400, 404), (path, answer)
    # A super admin may name any organisation, but not one no database can store.
    answer = registry.request("POST", "/v1/organisations/a%00b/webhooks", token=registry.token(role="super_admin"),
                              body={"name": "n", "url": "https://hooks.example.com/", "events": ["job.completed"]})
    assert answer.status == 404, answer
    assert wait_until(lambda: registry.request("GET", "/healthz").status == 200, 10, "the registry to answer")
    assert registry.proc.poll() is None
