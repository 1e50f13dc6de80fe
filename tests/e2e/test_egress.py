"""The shipped delivery egress (envoy/envoy.yaml, through harness.egress), with names resolved by a DNS server on
loopback (harness.dns) that answers 127.0.0.1 for every name of this module: Envoy's DNS cache asks only it
(c-ares with that server as its resolver).

- The first delivery to a host the DNS cache has never seen goes out on its first attempt: the retry schedule
  waits an hour, so only the first attempt can arrive within the test's deadline.
"""

import harness
import pytest
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.dns import DnsServer
from harness.egress import CLUSTER, shipped_egress
from harness.observe import Counters, complete_job, plugin_log_lines
from harness.tls import Pki, TlsReceiver

FRESH_NAME = "fresh.hooks.example.test"


@pytest.fixture(scope="module")
def dns():
    with DnsServer({n: "127.0.0.1" for n in (FRESH_NAME,)}) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"), "egress", dns_names=[FRESH_NAME])


@pytest.fixture(scope="module")
def tls_receiver(pki):
    with TlsReceiver(pki) as receiver:
        yield receiver


def hook_at(receiver, org, host):
    hook = make_hook(receiver.port, org)
    hook.url = f"https://{host}:{receiver.port}{hook.path}"
    return hook


def start(job_service, wasm, envoys, name, hooks, egress, **delivery):
    section = delivery_section(cluster=CLUSTER, allowInsecureHttp=False, **delivery)
    envoy = harness.envoy_with_filter(job_service, None, PluginConfig(hooks=hooks, delivery=section), wasm=wasm,
                                      name=name, egress=egress)
    envoys.append(envoy)
    return envoy


def test_the_first_delivery_to_a_new_host_goes_out_on_its_first_attempt(job_service, tls_receiver, pki, dns,
                                                                        envoys, wasm):
    org = new_id()
    hook = hook_at(tls_receiver, org, FRESH_NAME)
    # A new Envoy: its DNS cache has never seen the name. The next attempt would be an hour later.
    envoy = start(job_service, wasm, envoys, "egress-first", [hook],
                  shipped_egress(ca=pki.ca, resolver=dns.cares_resolver_config(), refuse_private=False),
                  retrySchedule=["1h"])
    counters = Counters(envoy)
    queried = dns.queried(FRESH_NAME)
    job_id = complete_job(envoy, org)
    tls_receiver.wait_for(lambda d: d.path == hook.path and d.object_id() == job_id, timeout=20)
    counters.wait_delta("deliveries_succeeded", 1)
    assert dns.queried(FRESH_NAME) > queried, "the name was not resolved for this delivery"
    assert counters.deltas("deliveries_attempted", "deliveries_failed", "deliveries_retried") == \
        {"deliveries_attempted": 1, "deliveries_failed": 0, "deliveries_retried": 0}
    assert plugin_log_lines(envoy, "attempt failed") == []
    assert len(tls_receiver.deliveries(lambda d: d.path == hook.path)) == 1
