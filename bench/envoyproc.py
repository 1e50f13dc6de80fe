"""A real Envoy pinned to one core with `taskset`, on loopback ports chosen by the OS, plus what the bench reads
from it: admin stats, CPU time and RSS from /proc. The launcher is the e2e harness's (tests/harness/envoy.py),
with a command prefix, one worker and the bench's own listeners.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from harness.envoy import Envoy

CLK_TCK = os.sysconf("SC_CLK_TCK")


class EnvoyProcess(Envoy):
    def __init__(self, name: str, bootstrap: dict, workdir: Path, cpu: Optional[int], log_level: str = "info"):
        # taskset execs Envoy: same pid, every thread pinned.
        prefix = ("taskset", "-c", str(cpu)) if cpu is not None else ()
        super().__init__(bootstrap, name=name, log_level=log_level, concurrency=1, command_prefix=prefix,
                         listeners=(), workdir=workdir / name)
        self.cpu = cpu

    def start(self) -> "EnvoyProcess":
        super().start(wait=False)
        return self

    def wait_ready(self, listeners: list, timeout: float = 60.0) -> None:
        """Until every one of `listeners` has its port (in `ports`) and /ready says LIVE."""
        self.listeners = tuple(listeners)
        super().wait_ready(timeout)

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


def core_busy_seconds(cpu: int) -> float:
    """Non-idle seconds of one core since boot, from /proc/stat (to tell whether the load side was saturated)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + (v[4] if len(v) > 4 else 0)
                return (sum(v[:8]) - idle) / CLK_TCK
    return 0.0
