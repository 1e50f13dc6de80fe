"""A real Envoy pinned to one core with `taskset`, on loopback ports chosen by the OS, plus what the bench reads
from it: admin stats, CPU time and RSS from /proc.

This is a small copy of the e2e harness's launcher (tests/harness/envoy.py), which has no way to prefix the
command with `taskset` and names one listener only; the harness itself is imported read-only elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from harness.envoy import ENVOY_BIN
from harness.util import terminate
from harness.util import http_request

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class EnvoyProcess:
    def __init__(self, name: str, bootstrap: dict, workdir: Path, cpu: Optional[int], log_level: str = "info"):
        self.name = name
        self.bootstrap = bootstrap
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cpu = cpu
        self.log_level = log_level
        self.proc: Optional[subprocess.Popen] = None
        self.admin_port: Optional[int] = None
        self.ports: dict = {}
        self._log = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "envoy.log"

    def start(self) -> "EnvoyProcess":
        config = self.workdir / "bootstrap.json"
        config.write_text(json.dumps(self.bootstrap, indent=1))
        admin_path = self.workdir / "admin-address"
        admin_path.unlink(missing_ok=True)
        cmd = [str(ENVOY_BIN), "-c", str(config), "--concurrency", "1", "-l", self.log_level,
               "--disable-hot-restart", "--admin-address-path", str(admin_path)]
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]  # taskset execs Envoy: same pid, every thread pinned
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(self.workdir), start_new_session=True)
        return self

    def wait_ready(self, listeners: list, timeout: float = 60.0) -> None:
        admin_path = self.workdir / "admin-address"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if self.admin_port is None:
                    text = admin_path.read_text().strip() if admin_path.exists() else ""
                    if ":" in text:
                        self.admin_port = int(text.rsplit(":", 1)[1])
                if self.admin_port is not None:
                    r = http_request(self.admin_port, "GET", "/listeners?format=json", timeout=2)
                    for status in r.json().get("listener_statuses", []):
                        port = status.get("local_address", {}).get("socket_address", {}).get("port_value", 0)
                        if port:
                            self.ports[status["name"]] = int(port)
                    if all(n in self.ports for n in listeners) and \
                            http_request(self.admin_port, "GET", "/ready", timeout=2).status == 200:
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        terminate(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- measurements -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (every thread), from /proc/<pid>/stat."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory(self) -> dict:
        """VmRSS and VmHWM (peak RSS) in MiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) / 1024.0
        return {"rss_mib": out.get("VmRSS", 0.0), "peak_rss_mib": out.get("VmHWM", 0.0)}

    def stats(self, regex: str) -> dict:
        r = http_request(self.admin_port, "GET", "/stats?format=json&filter=" + quote(regex), timeout=10)
        out = {}
        for entry in r.json().get("stats", []):
            if "name" in entry and "value" in entry:
                out[entry["name"]] = entry["value"]
        return out

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def core_busy_seconds(cpu: int) -> float:
    """Non-idle seconds of one core since boot, from /proc/stat (to tell whether the load side was saturated)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                return (sum(v[:8]) - idle) / CLK_TCK
    return 0.0
