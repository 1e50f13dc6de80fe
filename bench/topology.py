"""The bench's Envoy bootstraps and plugin configurations.

backend Envoy (the load core): listener `jobs` answers every request with the job service's completed-job JSON
(direct_response, 200) and listener `hooks` is the webhook receiver (direct_response, 200, empty); deliveries are
counted with `http.hooks.downstream_rq_2xx`.

Envoy under test (its own core), one per configuration, all running for the whole run so they can be interleaved:
listener `ingress` -> [filter] -> router. Requests carrying `x-bench-probe` go to the Python probe job service
(cluster `probe_jobs`), everything else to the backend's `jobs` listener (cluster `job_service`). Webhooks of the
load organisation use cluster `webhooks` (the backend's `hooks` listener); the probe organisation's single webhook
uses cluster `probe_receiver` (the Python probe receiver).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from harness.config import delivery_section, job_completed_rule, make_hook, new_id
from harness import gate
from harness.envoy import static_cluster, wasm_http_filter
from harness.etcd import journal_section
from harness.servers import completed_job

BENCH = Path(__file__).resolve().parent
LOAD_JOB_ID = "bench-load-000000000001"
# The same request for every configuration, except configuration 1, whose path matches no rule (same length,
# same method, so the path-template walk runs to the last segment before it fails).
MATCHING_PATH = f"/jobs/{LOAD_JOB_ID}/complete"
NON_MATCHING_PATH = f"/jobs/{LOAD_JOB_ID}/progress"
JOB_RESPONSE = json.dumps(completed_job(LOAD_JOB_ID), separators=(",", ":"))
REQUEST_BODY = b'{"result":"ok"}'

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _addr(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _listener(name: str, stat_prefix: str, routes: list, http_filters: list) -> dict:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [*http_filters, ROUTER],
    }
    return {"name": name, "address": _addr(0),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _bootstrap(node: str, listeners: list, clusters: list) -> dict:
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": _addr(0)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# A direct_response is sent as soon as the request headers are routed; when the request still has a body to come,
# Envoy then closes the HTTP/1.1 connection ("connection: close"), so every delivery (a POST with a body) would pay
# a new TCP connection. The buffer filter first reads the whole request, as a real receiver does, and the
# connections stay alive.
BUFFER = {"name": "envoy.filters.http.buffer",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                           "max_request_bytes": 1048576}}


def backend_bootstrap() -> dict:
    jobs = [{"match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_string": JOB_RESPONSE}},
             "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}]
    hooks = [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]
    return _bootstrap("bench-backend", [_listener("jobs", "jobs", jobs, [BUFFER]),
                                        _listener("hooks", "hooks", hooks, [BUFFER])], [])


class Webhooks:
    """The run's organisations and webhooks: `load_hooks` webhooks for the load organisation on the backend
    receiver, and one webhook for the probe organisation on the Python probe receiver."""

    def __init__(self, load_hooks: int, backend_hooks_port: int, probe_receiver_port: int):
        self.load_org = new_id()
        self.probe_org = new_id()
        self.load = [make_hook(backend_hooks_port, self.load_org, name=f"bench-{i}") for i in range(load_hooks)]
        self.probe = make_hook(probe_receiver_port, self.probe_org, name="bench-probe")

    def plugin_config(self) -> dict:
        hooks = []
        for h in self.load:
            hooks.append(h.to_config())  # cluster: delivery.cluster = "webhooks"
        probe = self.probe.to_config()
        probe["cluster"] = "probe_receiver"
        hooks.append(probe)
        return {"events": [job_completed_rule()], "webhooks": hooks, "delivery": delivery_section()}

    def lua_table(self) -> str:
        def entry(h, cluster):
            host = h.url.split("//", 1)[1].split("/", 1)[0]
            return '{id = "%s", cluster = "%s", authority = "%s", path = "%s"}' % (h.id, cluster, host, h.path)

        load = ", ".join(entry(h, "webhooks") for h in self.load)
        return ('{ ["%s"] = { %s }, ["%s"] = { %s } }'
                % (self.load_org, load, self.probe_org, entry(self.probe, "probe_receiver")))


def lua_filter(webhooks: Webhooks) -> dict:
    source = (BENCH / "peer.lua").read_text()
    marker = "local WEBHOOKS = {} -- @@WEBHOOKS@@"
    assert marker in source, "bench/peer.lua lost its WEBHOOKS marker line"
    code = source.replace(marker, "local WEBHOOKS = " + webhooks.lua_table())
    return {"name": "envoy.filters.http.lua",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                             "default_source_code": {"inline_string": code}}}


# Configurations whose filter journals to etcd (bench.py CONFIGS).
JOURNALED = (7, 8)
# Configuration 8's outbox bound: small enough that saturation overflows it within a step (the default 10,000 holds
# a few seconds of it), so that its saturation steps are the overload case.
OVERLOAD_MAX_QUEUED = int(os.environ.get("BENCH_OVERLOAD_MAX_QUEUED", "") or 1000)
# Its journal's maxSpilledBytes: what a closed-loop saturation step spills must fit, or the step measures that bound
# (the default 64 MiB filled in about 3 s at ~7,700 requests/s x 10 webhooks on a fast machine).
OVERLOAD_MAX_SPILLED_BYTES = int(os.environ.get("BENCH_OVERLOAD_MAX_SPILLED_BYTES", "") or 536870912)
# Configurations whose load webhook comes from the registry, and whether they report to it (bench.py CONFIGS).
REGISTRY_REPORTS = {9: False, 10: True}
REGISTRY_TOKEN_ENV = "BENCH_REGISTRY_TOKEN"


def start_registry(cpu: int, workdir: Path):
    """The registry (`webhook-emitter registry serve`, SQLite) for the registry configurations, pinned to the
    load core like the backend; the proxy token reaches the Envoys under test through their environment."""
    from harness.registry_service import BINARY, RegistryService

    if not BINARY.is_file():
        subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=BENCH.parent, check=True)
    registry = RegistryService(workdir / "registry", start=False)
    # Started under taskset, so that the threads it makes later (SQLite's) stay on the load core too.
    registry.args = ["taskset", "-c", str(cpu), *registry.args]
    registry.start()
    os.environ[REGISTRY_TOKEN_ENV] = registry.proxy_token
    return registry


def registry_plugin_config(webhooks: "Webhooks", registry, reports: bool) -> dict:
    """The load organisation's webhooks registered in the registry (the filter pulls them); the probe's stays
    in the configuration."""
    for h in webhooks.load:
        answer = registry.request("POST", f"/v1/organisations/{h.organisation_id}/webhooks",
                                  token=registry.token(org=h.organisation_id),
                                  body={"name": h.name or "bench", "url": h.url, "events": h.events})
        assert answer.status == 201, answer
    probe = webhooks.probe.to_config()
    probe["cluster"] = "probe_receiver"
    return {"events": [job_completed_rule()], "webhooks": [probe], "delivery": delivery_section(),
            "registry": {"cluster": "registry", "authority": "registry", "tokenEnv": REGISTRY_TOKEN_ENV,
                         "pollMs": 1000, "reports": reports}}


def start_etcd(cpu: int):
    """A single-member etcd for the journal configuration, pinned to the load core like the backend."""
    from harness.etcd import Etcd

    etcd = Etcd(1, name="bench-etcd")
    etcd.start()
    for m in etcd.members:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(m.proc.pid)], capture_output=True)
    return etcd


def under_test_bootstrap(name: str, http_filters: list, backend_jobs_port: int, backend_hooks_port: int,
                         probe_jobs_port: int, probe_receiver_port: int, etcd=None, registry=None) -> dict:
    routes = [
        {"match": {"prefix": "/", "headers": [{"name": "x-bench-probe", "present_match": True}]},
         "route": {"cluster": "probe_jobs", "timeout": "30s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "job_service", "timeout": "30s"}},
    ]
    clusters = [
        static_cluster("job_service", backend_jobs_port, large_circuit_breakers=True),
        static_cluster("probe_jobs", probe_jobs_port),
        static_cluster("webhooks", backend_hooks_port, large_circuit_breakers=True),
        static_cluster("probe_receiver", probe_receiver_port, large_circuit_breakers=True),
    ]
    if etcd is not None:
        clusters.append(etcd.envoy_cluster())
    if registry is not None:
        clusters.append(static_cluster("registry", registry.port))
    return _bootstrap(f"bench-{name}", [_listener("ingress", "ingress", routes, http_filters)], clusters)


def bare_callout_filter(webhooks: Webhooks) -> dict:
    """The floor: one asynchronous httpCall per response to the load organisation's first webhook, with the
    headers (5) and about the body size (380 B) of a delivery, and nothing else."""
    hook = webhooks.load[0]
    source = (BENCH / "bare-callout.lua").read_text()
    marker = "local TARGET = {} -- @@TARGET@@"
    assert marker in source, "bench/bare-callout.lua lost its TARGET marker line"
    host = hook.url.split("//", 1)[1].split("/", 1)[0]
    code = source.replace(marker, 'local TARGET = {cluster = "webhooks", authority = "%s", path = "%s"}'
                          % (host, hook.path))
    return {"name": "envoy.filters.http.lua",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                             "default_source_code": {"inline_string": code}}}


def filters_for(config: int, wasm: Path, webhooks_by_config: dict, registry=None) -> list:
    """The HTTP filters of configuration 0..10 (see bench.py CONFIGS)."""
    if config in REGISTRY_REPORTS:
        from harness import registry as keys

        plugin = registry_plugin_config(webhooks_by_config[config], registry, REGISTRY_REPORTS[config])
        return [wasm_http_filter(wasm, plugin, host_env_keys=[*keys.key_env_names(), REGISTRY_TOKEN_ENV])]
    if config == 0:
        return []
    if config in (1, 2, 3):
        return [wasm_http_filter(wasm, webhooks_by_config[config].plugin_config())]
    if config == 4:
        return [lua_filter(webhooks_by_config[config])]
    if config == 5:  # as envoy/envoy.yaml ships it: the gate's predicate from `webhook-emitter envoy-matcher`
        plugin = webhooks_by_config[config].plugin_config()
        return [gate.gated(wasm_http_filter(wasm, plugin), gate.predicate(plugin))]
    if config == 6:
        return [bare_callout_filter(webhooks_by_config[config])]
    if config in JOURNALED:
        plugin = webhooks_by_config[config].plugin_config()
        plugin["delivery"]["journal"] = journal_section(f"bench-{new_id()[:8]}/", lease_seconds=15)
        if config == 8:
            plugin["delivery"]["maxQueued"] = OVERLOAD_MAX_QUEUED
            plugin["delivery"]["journal"]["maxSpilledBytes"] = OVERLOAD_MAX_SPILLED_BYTES
        return [wasm_http_filter(wasm, plugin)]
    raise ValueError(config)
