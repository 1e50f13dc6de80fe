"""End-to-end test harness for webhook-emitter: a real Envoy, a real job service and a real webhook receiver,
all on loopback with OS-assigned ports. Standard library only (plus standardwebhooks in the tests)."""

from . import registry
from .config import (DEFAULT_MAX_BODY_BYTES, Hook, PluginConfig, delivery_section, job_completed_rule,
                     job_started_rule, make_hook, new_id, new_key, simple_config)
from .envoy import (DEFAULT_WASM, ENVOY_BIN, REPO, Envoy, EnvoyError, build_bootstrap, session_dir, static_cluster,
                    wasm_http_filter)
from .servers import Delivery, JobService, Receiver, completed_job, started_job
from .util import Response, WaitTimeout, http_request, scaled, wait_until

__all__ = [
    "registry", "DEFAULT_MAX_BODY_BYTES", "Hook", "PluginConfig", "delivery_section", "job_completed_rule",
    "job_started_rule", "make_hook", "new_id", "new_key", "simple_config", "DEFAULT_WASM", "ENVOY_BIN", "REPO",
    "Envoy", "EnvoyError", "build_bootstrap", "session_dir", "static_cluster", "wasm_http_filter", "Delivery",
    "JobService", "Receiver", "completed_job", "started_job", "Response", "WaitTimeout", "http_request", "scaled",
    "wait_until", "envoy_with_filter",
]


def _filter_bootstrap(job_service, receiver, plugin_config, wasm, env_vars=None, host_env_keys=None,
                      extra_clusters=(), egress=None, layered_runtime=None, gate=False, path_normalization=True):
    """(bootstrap, environment, host_env_keys) of an Envoy whose filter chain holds the webhook-emitter filter
    with this plugin configuration (a PluginConfig, a dict, or a raw string). `egress`: a harness.egress.Egress
    to add (the shipped delivery egress: its listener, clusters and bootstrap extension).

    Keys reach the VM through host_env_keys only: every key made so far (the registry puts them in this
    process's environment, which Envoy inherits), plus `env_vars` and the variables a PluginConfig's hooks
    chose, which go into Envoy's environment.

    `gate`: wrap the filter in the gate of the shipped configurations (harness.gate), with the predicate the CLI
    prints for this configuration (True) or the given predicate (a dict). `path_normalization`: False turns the
    shipped normalize_path / merge_slashes / path_with_escaped_slashes_action off (harness.envoy.build_bootstrap)."""
    env = dict(plugin_config.env_vars()) if isinstance(plugin_config, PluginConfig) else {}
    env.update(env_vars or {})
    cfg = plugin_config.to_dict() if isinstance(plugin_config, PluginConfig) else plugin_config
    if host_env_keys is None:
        host_env_keys = registry.key_env_names() + sorted(set(env) - set(registry.key_env_names()))
    wasm_filter = wasm_http_filter(wasm, cfg, host_env_keys=host_env_keys)
    if gate:
        from . import gate as gating

        wasm_filter = gating.gated(wasm_filter, gating.predicate(cfg) if gate is True else gate)
    listeners, extensions = (), ()
    if egress is not None:
        extra_clusters = [*egress.clusters, *extra_clusters]
        listeners, extensions = egress.listeners, egress.bootstrap_extensions
    bootstrap = build_bootstrap(job_service.port, receiver.port if receiver else None, wasm_filter, extra_clusters,
                                extra_listeners=listeners, bootstrap_extensions=extensions,
                                layered_runtime=layered_runtime, path_normalization=path_normalization)
    return bootstrap, env, list(host_env_keys)


def envoy_with_filter(job_service, receiver, plugin_config, wasm=DEFAULT_WASM, name="envoy", env_vars=None,
                      extra_clusters=(), start=True, egress=None, layered_runtime=None, env=None, gate=False,
                      path_normalization=True, **kwargs):
    """An Envoy whose filter chain holds the webhook-emitter filter with this plugin configuration
    (a PluginConfig, a dict, or a raw string). Started and ready unless start=False. `env_vars`: more
    variables for Envoy's environment, passed on to the VM through host_env_keys. `gate`, `path_normalization`: see
    _filter_bootstrap."""
    bootstrap, key_env, host_env_keys = _filter_bootstrap(job_service, receiver, plugin_config, wasm, env_vars,
                                                          None, extra_clusters, egress, layered_runtime, gate,
                                                          path_normalization)
    envoy = Envoy(bootstrap, name=name, env={**(env or {}), **key_env}, **kwargs)
    # An update must load the same module, or Envoy makes a new VM (and the worker's state is lost).
    envoy.wasm = wasm
    # An update must give the VM the same host_env_keys, or Envoy makes a new VM (update_plugin_config).
    envoy.host_env_keys = host_env_keys
    return envoy.start() if start else envoy


def plugin_listeners(job_service, receiver, plugin_config, wasm=DEFAULT_WASM, host_env_keys=None, **kwargs):
    """The listeners (as envoy_with_filter builds them) for a filter with this plugin configuration: hand them
    to Envoy.set_listeners() of an Envoy started with envoy_with_filter(..., lds=True).

    Give the host_env_keys of that Envoy (envoy.host_env_keys): they are part of vm_config, and a changed
    vm_config makes Envoy start a new VM instead of giving the running one a new root context (which is what
    lets the filter carry its queued deliveries over to the new configuration). So the keys of a new
    configuration must have been made before that Envoy started."""
    bootstrap, _, _ = _filter_bootstrap(job_service, receiver, plugin_config, wasm, host_env_keys=host_env_keys,
                                        **kwargs)
    return bootstrap["static_resources"]["listeners"]


def update_plugin_config(envoy, job_service, receiver, plugin_config, wasm=None, timeout: float = 30.0,
                         **kwargs) -> None:
    """Give a running Envoy (started with envoy_with_filter(..., lds=True)) a new plugin configuration, by an
    LDS update of its listener; returns once Envoy has applied it. The module is the one the Envoy was started
    with, unless `wasm` says otherwise."""
    wasm = wasm or getattr(envoy, "wasm", DEFAULT_WASM)
    envoy.set_listeners(plugin_listeners(job_service, receiver, plugin_config, wasm=wasm,
                                         host_env_keys=envoy.host_env_keys, **kwargs), timeout=timeout)


__all__ += ["plugin_listeners", "update_plugin_config"]
