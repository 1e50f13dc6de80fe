"""A real etcd (Debian's etcd-server) for the journal tests: one member or a cluster, on loopback.

Each member gets a client and a peer port reserved from the OS (bound to port 0, read back, released just
before etcd binds it), its own data directory under the session directory, and its log beside it. Members
can be killed (SIGKILL) and started again on the same ports and data. The JSON gateway helpers here read
what the journal wrote, so that tests check etcd itself, not the filter's word for it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from .envoy import LOOPBACK, session_dir, static_cluster
from .util import WaitTimeout, http_request, scaled, terminate

ETCD_BIN = os.environ.get("ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class EtcdMember:
    def __init__(self, name: str, workdir: Path):
        self.name = name
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.data_dir = workdir / f"{name}.data"
        self.log_path = workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def client_url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, initial_cluster: str, state: str) -> None:
        self._log = open(self.log_path, "ab")
        cmd = [
            ETCD_BIN, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", "webhook-emitter-e2e",
            # What the README asks of a journal's etcd.
            "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000",
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> None:
        """SIGKILL: the member dies with no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(scaled(10))
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


class Etcd:
    """An etcd cluster of `members` members (1 or 3), started and healthy on entry, stopped on exit."""

    def __init__(self, members: int = 1, name: str = "etcd"):
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=session_dir()))
        self.members = [EtcdMember(f"{name}{i}", self.workdir) for i in range(members)]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout: float = 60.0) -> "Etcd":
        assert Path(ETCD_BIN).exists(), f"{ETCD_BIN} missing: `make test` installs Debian's etcd-server"
        for m in self.members:
            m.start(self.initial_cluster, "new")
        self.wait_healthy(timeout)
        return self

    def __enter__(self) -> "Etcd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def kill_member(self, i: int) -> None:
        self.members[i].kill()

    def restart_member(self, i: int, timeout: float = 60.0) -> None:
        """Starts a killed member again on its ports and data."""
        self.members[i].start(self.initial_cluster, "existing")
        self.wait_healthy(timeout)

    # -- the JSON gateway -------------------------------------------------------------------------------------
    def call(self, path: str, body: dict, timeout: float = 5.0) -> dict:
        """POST to the first running member that answers; raises when none does."""
        last = None
        for m in self.members:
            if not m.running:
                continue
            try:
                r = http_request(m.client_port, "POST", path, {"content-type": "application/json"},
                                 json.dumps(body).encode(), timeout=timeout)
            except OSError as e:
                last = e
                continue
            if r.status == 200:
                return r.json()
            last = AssertionError(f"{m.name} {path}: {r.status} {r.body[:200]!r}")
        raise AssertionError(f"no etcd member answered {path}: {last}")

    def healthy(self) -> bool:
        try:
            self.call("/v3/kv/range", {"key": b64(b"health")}, timeout=2)
            return True
        except AssertionError:
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + scaled(timeout)
        while not self.healthy():
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None and m.proc.returncode not in (None, -9):
                    raise AssertionError(f"{m.name} exited ({m.proc.returncode}); log: {m.log_path}")
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"etcd not healthy after {scaled(timeout):.0f}s; logs in {self.workdir}")
            time.sleep(0.1)

    def keys(self, prefix: str) -> list:
        """Every key under `prefix` (as text)."""
        p = prefix.encode()
        doc = self.call("/v3/kv/range", {"key": b64(p), "range_end": b64(prefix_end(p)), "keys_only": True})
        return [base64.b64decode(kv["key"]).decode(errors="replace") for kv in doc.get("kvs", [])]

    def values(self, prefix: str) -> dict:
        """{key: value bytes} of every key under `prefix`."""
        p = prefix.encode()
        doc = self.call("/v3/kv/range", {"key": b64(p), "range_end": b64(prefix_end(p))})
        return {base64.b64decode(kv["key"]).decode(errors="replace"): base64.b64decode(kv.get("value", ""))
                for kv in doc.get("kvs", [])}

    def rpc_counts(self) -> dict:
        """{grpc method: calls handled} summed over the running members (their /metrics), whatever the code."""
        import re

        counts: dict = {}
        rx = re.compile(r'^grpc_server_handled_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)$')
        for m in self.members:
            if not m.running:
                continue
            r = http_request(m.client_port, "GET", "/metrics", timeout=5)
            for line in r.body.decode(errors="replace").splitlines():
                hit = rx.match(line)
                if hit:
                    counts[hit.group(1)] = counts.get(hit.group(1), 0) + int(float(hit.group(2)))
        return counts

    def key_writes(self) -> dict:
        """{"put": n, "delete": n, "txn": n} from etcd's own counters of key operations (etcd_mvcc_*_total, the puts
        and deletes inside txns included), summed over the running members."""
        counts: dict = {}
        rx = re.compile(r'^etcd_mvcc_(put|delete|txn)_total (\S+)$')
        for m in self.members:
            if not m.running:
                continue
            r = http_request(m.client_port, "GET", "/metrics", timeout=5)
            for line in r.body.decode(errors="replace").splitlines():
                hit = rx.match(line)
                if hit:
                    counts[hit.group(1)] = counts.get(hit.group(1), 0) + int(float(hit.group(2)))
        return counts

    # -- Envoy ------------------------------------------------------------------------------------------------
    def envoy_cluster(self, name: str = "etcd") -> dict:
        """The Envoy cluster the journal's callouts use: every member, health-checked on /health so that a
        dead member is left out within a second, with room for many requests at once."""
        cluster = static_cluster(name, self.members[0].client_port, large_circuit_breakers=True,
                                 connect_timeout="1s")
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": m.client_port}}}}
            for m in self.members
        ]
        if len(self.members) > 1:
            cluster["health_checks"] = [{
                "timeout": "1s", "interval": "0.5s", "unhealthy_threshold": 1, "healthy_threshold": 1,
                "http_health_check": {"path": "/health"},
            }]
        return cluster


def journal_section(prefix: str, lease_seconds: int = 2, cluster: str = "etcd") -> dict:
    """`delivery.journal` for the tests: a short lease, so that a dead owner's records are claimed soon."""
    return {"cluster": cluster, "authority": "etcd", "prefix": prefix, "leaseSeconds": lease_seconds}


def wait_journal_live(envoy, timeout: float = 30.0) -> list:
    """Until every root context of `envoy` (one per worker, one on the main thread) is live in the journal: each
    is an owner of its own and reaches etcd on its own, so one "is live" line says nothing of the others."""
    from .observe import wait_for_log

    return wait_for_log(envoy, r"journal: owner \w+ is live", count=envoy.concurrency + 1, timeout=timeout)
