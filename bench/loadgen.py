"""The load generator: h2load (Debian's nghttp2-client), HTTP/1.1, pinned to the load core.

Closed loop (`-c N -D secs`, as fast as Envoy answers) gives the saturation throughput. A fixed offered rate is
`--rps` per connection; h2load starts every connection's rate timer when the connection opens, so connections
opened together fire together and the "fixed rate" arrives in bursts of N requests (at 1,000 req/s over 32
connections that alone made the median latency 4 ms instead of 0.2 ms). So fixed-rate runs open the connections one
per millisecond (`-r 1 --rate-period 1ms`, which needs `-n` instead of `-D`), which spreads the timers' phases.
Latency percentiles come from h2load's per-request log (`--log-file`: start time, status, microseconds to the end
of the response), so they are exact over every request of the step.

Known limit of h2load 1.52 (Debian 12): with `-d FILE` (a request body) a timing-based run (`-D`) never ends and
`--rps` is ignored, so the requests are bodiless POSTs (`-H ':method: POST'`). See results.md, caveats.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent


def ensure_h2load() -> str:
    """h2load's path; installs it the way `make bench` does (bench/ensure-h2load.sh) when it is missing."""
    path = shutil.which("h2load")
    if path:
        return path
    r = subprocess.run(["bash", str(BENCH / "ensure-h2load.sh")], capture_output=True, text=True)
    path = shutil.which("h2load")
    if r.returncode != 0 or not path:
        raise RuntimeError("h2load is missing and could not be installed (bench/ensure-h2load.sh):\n"
                           + r.stdout + r.stderr)
    return path


@dataclass
class LoadResult:
    duration_s: float
    rps: float  # completed requests per second, h2load's own figure
    succeeded: int
    failed: int
    non_2xx: int
    latencies_us: list = field(default_factory=list)
    raw: str = ""

    def percentile(self, p: float) -> Optional[float]:
        if not self.latencies_us:
            return None
        data = self.latencies_us
        k = min(len(data) - 1, max(0, int(round(p / 100.0 * (len(data) - 1)))))
        return float(data[k])


def run(url: str, headers: dict, duration_s: float, connections: int, rate: Optional[float], cpu: Optional[int],
        log_file: Path, timeout_s: float, cap: Optional[float] = None) -> LoadResult:
    """One h2load run: closed loop for `duration_s` when rate is None, else `rate` requests/s in total over
    `connections` for about `duration_s` (`cap`: the most req/s the target can serve, to size the run)."""
    cmd = ["h2load", "--h1", "-c", str(connections), "-H", ":method: POST", "--log-file", str(log_file)]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    if rate is None:
        cmd += ["-D", f"{duration_s:g}"]
    else:
        # -n requests in all; at most `cap` req/s worth of them, so an overloaded configuration still ends on time.
        total = max(connections, int(round(min(rate, cap or rate) * duration_s)))
        cmd += ["-n", str(total), "-r", "1", "--rate-period", "1ms", "--rps", f"{rate / connections:.4f}"]
    cmd.append(url)
    log_file.unlink(missing_ok=True)  # h2load appends to an existing log
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"h2load did not finish in {timeout_s:.0f}s: {' '.join(cmd)}") from e
    out = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {' '.join(cmd)}\n{out[-2000:]}\n{proc.stderr[-2000:]}")
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    n = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (m and n and s):
        raise RuntimeError(f"cannot read h2load's summary:\n{out[-2000:]}")
    secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    lat = []
    with open(log_file) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].startswith("2"):
                lat.append(int(parts[2]))
    lat.sort()
    return LoadResult(duration_s=secs, rps=float(m.group(3)), succeeded=int(n.group(1)), failed=int(n.group(2)),
                      non_2xx=int(s.group(2)) + int(s.group(3)) + int(s.group(4)), latencies_us=lat, raw=out)
