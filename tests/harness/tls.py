"""TLS for the end-to-end tests: a throwaway CA and `localhost` server certificates made at test time with the
openssl CLI, receivers that speak HTTPS, and a static Envoy cluster that originates TLS to one of them (the
dynamic_forward_proxy egress for any https URL is the shipped one: harness.egress)."""

from __future__ import annotations

import ssl
import subprocess
import threading
from pathlib import Path

from .servers import LOOPBACK, Receiver, _Server

_TLS = "envoy.transport_sockets.tls"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Pki:
    """A CA and one server certificate for `localhost` and `dns_names` (DNS) and 127.0.0.1 (IP), signed by
    that CA."""

    def __init__(self, directory: Path, name: str, dns_names=()):
        self.dir = directory / name
        self.dir.mkdir(parents=True, exist_ok=True)
        d = self.dir
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name} test CA",
                 "-keyout", "ca.key", "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
                 "-out", "server.csr", cwd=d)
        sans = ",".join(f"DNS:{n}" for n in ("localhost", *dns_names))
        (d / "ext.cnf").write_text(f"subjectAltName={sans},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem", cwd=d)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.dir / "server.pem", self.dir / "server.key")
        return ctx


class TlsReceiver(Receiver):
    """The e2e Receiver, over HTTPS with the given PKI's server certificate. A client that rejects the
    certificate never gets as far as a request, so nothing is recorded for it."""

    def __init__(self, pki: Pki):
        super().__init__()
        self._ctx = pki.server_context()
        self.handshake_failures = 0

    def start(self):
        self._server = _Server((LOOPBACK, 0), self.handler_class)
        self._server.owner = self  # type: ignore[attr-defined]
        receiver = self
        plain_get_request = self._server.get_request

        def get_request():
            sock, addr = plain_get_request()
            try:
                return receiver._ctx.wrap_socket(sock, server_side=True), addr
            except (ssl.SSLError, OSError):
                receiver.handshake_failures += 1
                sock.close()
                raise

        self._server.get_request = get_request  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"TlsReceiver:{self.port}")
        self._thread.start()
        return self

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"


def upstream_tls(ca: Path, sni: str | None = "localhost", san: str | None = "localhost") -> dict:
    """An UpstreamTlsContext that validates the server against `ca` (and its DNS SAN, when given)."""
    validation: dict = {"trusted_ca": {"filename": str(ca)}}
    if san:
        validation["match_typed_subject_alt_names"] = [{"san_type": "DNS", "matcher": {"exact": san}}]
    context: dict = {"common_tls_context": {"validation_context": validation}}
    if sni:
        context["sni"] = sni
    return {"name": _TLS, "typed_config": {"@type": _UPSTREAM_TLS, **context}}


def tls_cluster(name: str, port: int, ca: Path) -> dict:
    """A STATIC cluster to 127.0.0.1:port that originates TLS (SNI and SAN `localhost`, validated against ca)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}}]}]},
        "transport_socket": upstream_tls(ca),
    }
