"""Bad plugin configurations are refused as a whole: Envoy 1.40 with a static wasm HTTP filter whose on_configure
returns false logs `Plugin ... failed to load` and exits with a non-zero code before its listener opens. The filter
logs one line per error, `webhook-emitter: configuration rejected: <path>: <message>`.

All cases start at once (a few at a time), in a module fixture; each test then asserts on its own case."""

import copy
import os
from concurrent.futures import ThreadPoolExecutor

import harness
import pytest
from harness import registry
from harness.config import PluginConfig, delivery_section, make_hook, new_id

EXIT_WAIT_S = 60
REJECTED = "webhook-emitter: configuration rejected: "


def _set(path, value):
    def mutate(cfg):
        target = cfg
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(cfg):
        target = cfg
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


def _duplicate_hook(cfg):
    twin = copy.deepcopy(cfg["webhooks"][0])
    twin["name"] = "twin"
    cfg["webhooks"].append(twin)


def _private_without_permission(cfg):
    cfg["delivery"]["allowPrivateNetworks"] = False  # url stays http://127.0.0.1:<port>/..., insecure http allowed


# Literal hosts the SSRF guard refuses without a DNS lookup (names are left to the egress cluster's
# resolved_address_filter). Each becomes one webhook of one configuration; each must be named by its path.
RESERVED_HOSTS = [
    "localhost.", "foo.localhost.", "LOCALHOST", "[::127.0.0.1]", "[::ffff:0:127.0.0.1]", "[::ffff:7f00:1]",
    "[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "[fec0::1]", "192.0.0.170", "198.18.0.1", "240.0.0.1",
]


def _reserved_hosts_without_permission(cfg):
    cfg["delivery"]["allowPrivateNetworks"] = False
    first = cfg["webhooks"][0]
    cfg["webhooks"] = []
    for host in RESERVED_HOSTS:
        hook = copy.deepcopy(first)
        hook["id"] = new_id()
        hook["url"] = f"https://{host}:8443/hooks/{hook['id']}"
        cfg["webhooks"].append(hook)


def _https_required(cfg):
    cfg["delivery"]["allowInsecureHttp"] = False
    cfg["webhooks"][0]["url"] = "http://hooks.example.com/rapidlogix"


_MALFORMED_KEY = registry.register_secret("sk_live_" + os.urandom(24).hex())  # a secret even when malformed

# id -> (mutation of a valid config dict, or a raw configuration string; expected path; expected message start)
CASES = {
    "missing-url": (_delete(["webhooks", 0, "url"]), "webhooks[0].url", "missing required field"),
    "http-url": (_https_required, "webhooks[0].url", "must be an https URL"),
    "unknown-field": (_set(["webhooks", 0, "colour"], "blue"), "webhooks[0].colour", "unknown field"),
    "malformed-key": (_set(["webhooks", 0, "apiKey"], _MALFORMED_KEY), "webhooks[0].apiKey", "must be whsec_"),
    "bad-pointer": (_set(["events", 0, "when", 0, "pointer"], "status"), "events[0].when[0].pointer",
                    "must be empty or start with '/'"),
    "duplicate-id": (_duplicate_hook, "webhooks[1].id", "duplicate webhook id"),
    "no-rule-emits": (_set(["webhooks", 0, "events"], ["job.failed"]), "webhooks[0].events[0]",
                      "no rule in events[] emits"),
    "empty-events": (_set(["webhooks", 0, "events"], []), "webhooks[0].events", "must not be empty"),
    "status-paused": (_set(["webhooks", 0, "status"], "paused"), "webhooks[0].status",
                      'must be "enabled" or "disabled"'),
    "missing-env-var": (_set(["webhooks", 0, "apiKey"], {"env": "WH_MISSING"}), "webhooks[0].apiKey",
                        "environment variable WH_MISSING is not set"),
    "bad-webhook-id": (_set(["webhooks", 0, "id"], "66B2E3DDB97F60B5270D5CE9"), "webhooks[0].id",
                       "must be 24 lowercase hex digits"),
    "loopback-ip": (_private_without_permission, "webhooks[0].url", "private or loopback address"),
    "reserved-hosts": (_reserved_hosts_without_permission, "webhooks[0].url", "private or loopback address"),
    # A key pasted into the wrong field is refused without being echoed (the secrets check reads these logs).
    "key-as-status": (_set(["webhooks", 0, "status"], harness.new_key()), "webhooks[0].status",
                      'must be "enabled" or "disabled"'),
    "key-as-id": (_set(["webhooks", 0, "id"], harness.new_key()), "webhooks[0].id", "must be 24 lowercase hex digits"),
    "key-as-event": (_set(["webhooks", 0, "events"], [harness.new_key()]), "webhooks[0].events[0]",
                     "no rule in events[] emits"),
    "not-json": ('{"events": [{"type": "job.completed",', "configuration", "invalid JSON"),
}


def _run_case(job_service, receiver, wasm, name, config):
    envoy = harness.envoy_with_filter(job_service, receiver, config, wasm=wasm, name=f"badcfg-{name}", start=False)
    envoy.start(wait=False)
    result = {"envoy": envoy, "rc": None, "listener_opened": False}
    try:
        try:
            result["rc"] = envoy.wait_exit(EXIT_WAIT_S)
        except harness.WaitTimeout:
            result["listener_opened"] = envoy.listener_opened()
    finally:
        envoy.stop()
    return result


@pytest.fixture(scope="module")
def results(job_service, receiver, envoys, wasm):
    hook = make_hook(receiver.port, new_id(), ["job.completed"], name="badcfg")
    base = PluginConfig(hooks=[hook], delivery=delivery_section()).to_dict()
    configs = {}
    for name, (change, _, _) in CASES.items():
        if isinstance(change, str):
            configs[name] = change
        else:
            cfg = copy.deepcopy(base)
            change(cfg)
            configs[name] = cfg
    # The unchanged base config must be accepted, or the rejections below would prove nothing.
    valid = harness.envoy_with_filter(job_service, receiver, base, wasm=wasm, name="badcfg-valid", start=False)
    envoys.append(valid)
    valid.start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_case, job_service, receiver, wasm, name, cfg) for name, cfg in configs.items()}
        out = {name: f.result() for name, f in futures.items()}
    envoys.extend(r["envoy"] for r in out.values())
    out["valid"] = {"envoy": valid}
    return out


def test_base_config_is_accepted(results):
    valid = results["valid"]["envoy"]
    assert valid.running and valid.listener_port
    assert REJECTED not in valid.log_text()
    assert valid.request("GET", "/healthz").status == 200


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused_with_its_path_and_message(results, case):
    _, path, message = CASES[case]
    r = results[case]
    envoy = r["envoy"]
    log = envoy.log_text()
    rejected = [line.split(REJECTED, 1)[1] for line in log.splitlines() if REJECTED in line]
    assert r["rc"] is not None, (
        f"Envoy did not exit within {EXIT_WAIT_S}s (listener opened: {r['listener_opened']}); "
        f"filter said: {rejected}; log: {envoy.log_path}")
    assert r["rc"] != 0, f"Envoy exited 0; filter said: {rejected}"
    assert any(line.startswith(f"{path}: ") and message in line.split(": ", 1)[1] for line in rejected), (
        f"expected `{REJECTED}{path}: {message}…`; the filter logged {rejected!r}")
    assert "failed to load" in log, "Envoy did not report the plugin as failing to load"


def test_every_reserved_literal_host_is_refused_by_its_own_path(results):
    envoy = results["reserved-hosts"]["envoy"]
    rejected = [line.split(REJECTED, 1)[1] for line in envoy.log_text().splitlines() if REJECTED in line]
    missing = [f"webhooks[{i}].url ({host})" for i, host in enumerate(RESERVED_HOSTS)
               if not any(line.startswith(f"webhooks[{i}].url: private or loopback address") for line in rejected)]
    assert not missing, f"not refused: {missing}; the filter logged {rejected!r}"
    assert results["reserved-hosts"]["rc"] not in (None, 0)
