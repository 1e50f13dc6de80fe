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


def _filter_bootstrap(job_service, receiver, plugin_config, wasm, env_vars, host_env_keys, extra_clusters=(),
                      egress=None, layered_runtime=None):
    """The bootstrap of an Envoy whose filter chain holds the webhook-emitter filter with this plugin
    configuration (a PluginConfig, a dict, or a raw string). `egress`: a harness.egress.Egress to add (the
    shipped delivery egress: its listener, clusters and bootstrap extension)."""
    if isinstance(plugin_config, PluginConfig):
        env = dict(plugin_config.env_vars())
        env.update(env_vars or {})
        cfg = plugin_config.to_dict()
    else:
        env, cfg = dict(env_vars or {}), plugin_config
    wasm_filter = wasm_http_filter(wasm, cfg, env_vars=env or None, host_env_keys=host_env_keys)
    listeners, extensions = (), ()
    if egress is not None:
        extra_clusters = [*egress.clusters, *extra_clusters]
        listeners, extensions = egress.listeners, egress.bootstrap_extensions
    return build_bootstrap(job_service.port, receiver.port if receiver else None, wasm_filter, extra_clusters,
                           extra_listeners=listeners, bootstrap_extensions=extensions,
                           layered_runtime=layered_runtime)


def envoy_with_filter(job_service, receiver, plugin_config, wasm=DEFAULT_WASM, name="envoy", env_vars=None,
                      host_env_keys=(), extra_clusters=(), start=True, egress=None, layered_runtime=None,
                      **kwargs):
    """An Envoy whose filter chain holds the webhook-emitter filter with this plugin configuration
    (a PluginConfig, a dict, or a raw string). Started and ready unless start=False."""
    bootstrap = _filter_bootstrap(job_service, receiver, plugin_config, wasm, env_vars, host_env_keys, extra_clusters,
                                  egress, layered_runtime)
    envoy = Envoy(bootstrap, name=name, **kwargs)
    return envoy.start() if start else envoy


def plugin_listeners(job_service, receiver, plugin_config, wasm=DEFAULT_WASM, env_vars=None, host_env_keys=(),
                     **kwargs):
    """The listeners (as envoy_with_filter builds them) for a filter with this plugin configuration: hand them
    to Envoy.set_listeners() of an Envoy started with envoy_with_filter(..., lds=True).

    Keep env_vars and host_env_keys as they were at start: they are part of vm_config, and a changed
    vm_config makes Envoy start a new VM instead of giving the running one a new root context (which is what
    lets the filter carry its queued deliveries over to the new configuration)."""
    bootstrap = _filter_bootstrap(job_service, receiver, plugin_config, wasm, env_vars, host_env_keys, **kwargs)
    return bootstrap["static_resources"]["listeners"]


def update_plugin_config(envoy, job_service, receiver, plugin_config, wasm=DEFAULT_WASM, env_vars=None,
                         host_env_keys=(), timeout: float = 30.0, **kwargs) -> None:
    """Give a running Envoy (started with envoy_with_filter(..., lds=True)) a new plugin configuration, by an
    LDS update of its listener; returns once Envoy has applied it."""
    envoy.set_listeners(plugin_listeners(job_service, receiver, plugin_config, wasm=wasm, env_vars=env_vars,
                                         host_env_keys=host_env_keys, **kwargs), timeout=timeout)


__all__ += ["plugin_listeners", "update_plugin_config"]
