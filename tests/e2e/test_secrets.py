"""API keys stay out of Envoy's debug log and /config_dump when they reach the VM through `host_env_keys`, the
only way the harness passes them (harness.registry): Envoy runs at `-l debug`, delivers signed events, dead
letters one (with its own key), takes a configuration update and refuses a configuration with a wrong key. The
session-wide check (conftest.py) scans this log too, in every form a key could take.

The control shows what the README warns about and that the check can see a key: the same setup with the key
inline in the plugin configuration, or in `vm_config.environment_variables.key_values`, puts it in
/config_dump and in the debug log (the control's keys are made outside the registry, so the session-wide check
leaves them be).
"""

import base64
import json
import os

import harness
import pytest
from harness import registry
from harness.config import PluginConfig, delivery_section, key_ref, make_hook, new_id, new_key
from harness.observe import Counters, complete_job, plugin_dict

DEBUG = "debug"


def config_dump(envoy) -> str:
    r = envoy.admin("/config_dump?include_eds")
    assert r.status == 200
    return r.body.decode(errors="replace")


def test_no_key_in_the_debug_log_or_config_dump(job_service, rc, envoys, wasm):
    org = new_id()
    hooks = [make_hook(rc.port, org, name="kept"), make_hook(rc.port, org, name="added later")]
    failing = make_hook(rc.port, org, name="always 500")
    dead_path, dead_key = f"/dead-letters/{new_id()}", new_key()
    delivery = delivery_section(retrySchedule=["100ms"])
    dead_letter = {"url": rc.url(dead_path), "apiKey": key_ref(dead_key)}

    def config(*hs):
        return plugin_dict(PluginConfig(hooks=list(hs), delivery=delivery), deadLetter=dead_letter)

    envoy = harness.envoy_with_filter(job_service, rc, config(hooks[0], failing), wasm=wasm, name="secrets-debug",
                                      log_level=DEBUG, lds=True)
    envoys.append(envoy)
    counters = Counters(envoy)
    rc.always(failing.path, 500)
    job_id = complete_job(envoy, org)
    rc.wait_for(lambda d: d.path == hooks[0].path and d.object_id() == job_id, timeout=20)
    rc.wait_for(lambda d: d.path == dead_path, timeout=20)
    counters.wait_delta("dead_letters_delivered", 1)

    harness.update_plugin_config(envoy, job_service, rc, config(*hooks, failing), wasm=wasm)
    later = complete_job(envoy, org)
    rc.wait_for(lambda d: d.path == hooks[1].path and d.object_id() == later, timeout=20)

    keys = [h.key for h in (*hooks, failing)] + [dead_key]
    dump = config_dump(envoy)
    assert "host_env_keys" in dump and registry.env_name(dead_key) in dump, "the dump is not the filter's config"
    assert registry.leaks_in(dump, keys) == []
    log = envoy.log_text()
    assert "][debug][" in log, "Envoy did not log at debug level"
    assert registry.leaks_in(log, keys) == []
    envoy.stop()
    assert registry.leaks_in(envoy.log_text(), keys) == []


def test_a_refused_configuration_does_not_echo_its_key_at_debug(job_service, rc, envoys, wasm):
    """A malformed key in Envoy's environment (an API key of another kind) is refused by its path; neither the
    refusal nor anything else Envoy logs at debug shows it."""
    malformed = registry.register_secret("sk_live_" + os.urandom(24).hex())
    hook = make_hook(rc.port, new_id(), env_var="WEBHOOK_EMITTER_TEST_MALFORMED_KEY")
    hook.key = malformed
    envoy = harness.envoy_with_filter(job_service, rc, PluginConfig(hooks=[hook], delivery=delivery_section()),
                                      wasm=wasm, name="secrets-debug-refused", log_level=DEBUG, start=False)
    envoys.append(envoy)
    envoy.start(wait=False)
    try:
        assert envoy.wait_exit(60) != 0
    finally:
        envoy.stop()
    log = envoy.log_text()
    assert "configuration rejected: webhooks[0].apiKey: " in log
    assert registry.leaks_in(log, [malformed]) == []


def unregistered_key() -> str:
    """A key the registry does not know: the session-wide log check must not count the control's leak."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.mark.parametrize("how", ["inline", "key_values"])
def test_control_a_key_given_inline_or_in_key_values_shows_in_config_dump_and_the_debug_log(job_service, rc, envoys, wasm, how):
    org, key = new_id(), unregistered_key()
    hook = make_hook(rc.port, org)
    cfg = PluginConfig(hooks=[hook], delivery=delivery_section()).to_dict()
    envoy = harness.envoy_with_filter(job_service, rc, cfg, wasm=wasm, name=f"secrets-control-{how}",
                                      log_level=DEBUG, start=False)
    wasm_config = envoy.bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"][0]["typed_config"]["config"]
    if how == "inline":
        cfg["webhooks"][0]["apiKey"] = key
        wasm_config["configuration"]["value"] = json.dumps(cfg)
    else:
        name = "CONTROL_" + registry.env_name(hook.key)
        cfg["webhooks"][0]["apiKey"] = {"env": name}
        wasm_config["configuration"]["value"] = json.dumps(cfg)
        wasm_config["vm_config"]["environment_variables"] = {"key_values": {name: key}}
    envoys.append(envoy)
    envoy.start()
    job_id = complete_job(envoy, org)
    rc.wait_for(lambda d: d.path == hook.path and d.object_id() == job_id, timeout=20)
    assert registry.leaks_in(config_dump(envoy), [key]) != [], f"the {how} key is not in /config_dump"
    envoy.stop()
    assert registry.leaks_in(envoy.log_text(), [key]) != [], f"the {how} key is not in Envoy's debug log"
