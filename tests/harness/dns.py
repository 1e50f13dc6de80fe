"""A DNS server on loopback for the end-to-end tests (dnslib encodes and decodes the packets).

It answers A queries for the names it was given, NXDOMAIN for anything else, over UDP on 127.0.0.1 and a port
the OS chose, and counts the queries it got per name. Envoy's DNS cache is pointed at it with the c-ares
resolver (`cares_resolver_config`), so a test can make a public-looking name resolve to 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from typing import Optional

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from .servers import LOOPBACK


class DnsServer:
    def __init__(self, records: Optional[dict] = None, ttl: int = 300):
        self.records = {self._norm(k): v for k, v in (records or {}).items()}
        self.ttl = ttl
        self.queries: Counter = Counter()
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    @staticmethod
    def _norm(name: str) -> str:
        return name.lower().rstrip(".")

    def add(self, name: str, address: str) -> None:
        with self._lock:
            self.records[self._norm(name)] = address

    def queried(self, name: str) -> int:
        with self._lock:
            return self.queries[self._norm(name)]

    @property
    def port(self) -> int:
        assert self._sock is not None, "DNS server not started"
        return self._sock.getsockname()[1]

    def start(self) -> "DnsServer":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"DnsServer:{self.port}")
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                request = DNSRecord.parse(data)
            except Exception:  # not DNS: ignore it, as a real server would
                continue
            reply = request.reply()
            name = self._norm(str(request.q.qname))
            with self._lock:
                self.queries[name] += 1
                address = self.records.get(name)
            if address is None:
                reply.header.rcode = RCODE.NXDOMAIN
            elif request.q.qtype == QTYPE.A:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=self.ttl))
            # Any other type of a known name: an empty NOERROR answer (no such record).
            try:
                self._sock.sendto(reply.pack(), peer)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cares_resolver_config(self) -> dict:
        """A typed_dns_resolver_config that makes a DNS cache ask this server, and only this server."""
        return {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": LOOPBACK, "port_value": self.port}}],
                "use_resolvers_as_fallback": False,
                "dns_resolver_options": {"no_default_search_domain": True},
            },
        }
