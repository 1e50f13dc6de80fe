"""The shipped delivery egress (envoy/envoy.yaml, through harness.egress), with names resolved by a DNS server on
loopback (harness.dns) that answers 127.0.0.1 for every name of this module: Envoy's DNS cache asks only it
(c-ares with that server as its resolver).

- A webhook name that resolves to a loopback address is refused by the shipped egress (its DNS cache's
  resolved_address_filter), although delivery.allowPrivateNetworks is off and the URL names no address: the
  attempt fails (status 503 from the egress), is logged and retried, and the receiver gets nothing. The same
  egress without the filter (the control) delivers to it.
- The first delivery to a host the DNS cache has never seen goes out on its first attempt: the retry schedule
  waits an hour, so only the first attempt can arrive within the test's deadline.
- The shipped filter's ranges cover every address class the plugin refuses as a literal address.
"""

import ipaddress

import harness
import pytest
from harness.config import PluginConfig, delivery_section, make_hook, new_id
from harness.dns import DnsServer
from harness.egress import CLUSTER, shipped_bootstrap, shipped_egress
from harness.observe import Counters, complete_job, plugin_log_lines, wait_for_log
from harness.tls import Pki, TlsReceiver

REFUSED_NAME = "private.hooks.example.test"
CONTROL_NAME = "control.hooks.example.test"
FRESH_NAME = "fresh.hooks.example.test"
DNS_CACHE = "dns_cache.webhooks_egress_dns."


@pytest.fixture(scope="module")
def dns():
    with DnsServer({n: "127.0.0.1" for n in (REFUSED_NAME, CONTROL_NAME, FRESH_NAME)}) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"), "egress", dns_names=[REFUSED_NAME, CONTROL_NAME, FRESH_NAME])


@pytest.fixture(scope="module")
def tls_receiver(pki):
    with TlsReceiver(pki) as receiver:
        yield receiver


def hook_at(receiver, org, host):
    hook = make_hook(receiver.port, org)
    hook.url = f"https://{host}:{receiver.port}{hook.path}"
    return hook


def start(job_service, wasm, envoys, name, hooks, egress, **delivery):
    section = delivery_section(cluster=CLUSTER, allowPrivateNetworks=False, allowInsecureHttp=False, **delivery)
    envoy = harness.envoy_with_filter(job_service, None, PluginConfig(hooks=hooks, delivery=section), wasm=wasm,
                                      name=name, egress=egress)
    envoys.append(envoy)
    return envoy


def test_a_name_that_resolves_to_loopback_is_refused_by_the_shipped_egress(job_service, tls_receiver, pki, dns,
                                                                             envoys, wasm):
    org = new_id()
    hook = hook_at(tls_receiver, org, REFUSED_NAME)
    envoy = start(job_service, wasm, envoys, "egress-refuses", [hook],
                  shipped_egress(ca=pki.ca, resolver=dns.cares_resolver_config()), retrySchedule=["1h"])
    counters = Counters(envoy)
    queried, handshakes = dns.queried(REFUSED_NAME), tls_receiver.handshake_failures
    complete_job(envoy, org)

    [line] = wait_for_log(envoy, rf"attempt failed, will retry: event=\S+ webhook={hook.id} attempts=1 "
                                 rf"last=status 503 ")
    assert dns.queried(REFUSED_NAME) > queried, "Envoy never asked the DNS server on loopback for the name"
    stats = envoy.stats(r"^dns_cache\.")
    assert stats.get(DNS_CACHE + "dns_address_filter_out", 0) >= 1, stats
    assert counters.deltas("deliveries_failed", "deliveries_retried", "deliveries_succeeded") == \
        {"deliveries_failed": 1, "deliveries_retried": 1, "deliveries_succeeded": 0}
    assert tls_receiver.deliveries(lambda d: d.path == hook.path) == [], "the receiver on loopback got the delivery"
    assert tls_receiver.handshake_failures == handshakes, "Envoy connected to the receiver on loopback"


def test_the_same_egress_without_the_filter_delivers_to_that_name(job_service, tls_receiver, pki, dns, envoys,
                                                                     wasm):
    """The control: the refusal above is the resolved-address filter's doing, nothing else of the setup."""
    org = new_id()
    hook = hook_at(tls_receiver, org, CONTROL_NAME)
    envoy = start(job_service, wasm, envoys, "egress-control", [hook],
                  shipped_egress(ca=pki.ca, resolver=dns.cares_resolver_config(), refuse_private=False),
                  retrySchedule=["1h"])
    job_id = complete_job(envoy, org)
    [delivery] = tls_receiver.wait_for(lambda d: d.path == hook.path and d.object_id() == job_id, timeout=20)
    assert delivery.headers.get("host") == f"{CONTROL_NAME}:{tls_receiver.port}"
    assert envoy.stats(r"^dns_cache\.").get(DNS_CACHE + "dns_address_filter_out", 0) == 0


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


# A sample of each class the plugin refuses as a literal address (src/url.rs), and public neighbours.
REFUSED_SAMPLES = [
    "0.0.0.1", "10.1.2.3", "100.64.0.1", "127.0.0.1", "127.255.0.9", "169.254.169.254", "172.16.0.1",
    "172.31.255.255", "192.0.0.170", "192.88.99.1", "192.168.1.1", "198.18.0.1", "198.19.255.255", "224.0.0.1",
    "240.0.0.1", "255.255.255.255", "::", "::1", "::127.0.0.1", "::ffff:127.0.0.1", "::ffff:0:127.0.0.1",
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "100::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2002:a9fe:a9fe::",
    "fc00::1", "fd12::1", "fe80::1", "fec0::1", "ff02::1",
]
PUBLIC_SAMPLES = ["8.8.8.8", "1.1.1.1", "172.32.0.1", "192.0.1.1", "198.20.0.1", "100.128.0.1",
                  "2001:4860:4860::8888", "2a00:1450::1"]


def test_the_shipped_filter_covers_every_class_the_plugin_refuses_as_a_literal():
    doc = shipped_bootstrap()
    listener = next(li for li in doc["static_resources"]["listeners"] if li["name"] == "webhooks_egress")
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [dfp] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.dynamic_forward_proxy"]
    ranges = [ipaddress.ip_network(f"{r['address_prefix']}/{r['prefix_len']}")
              for r in dfp["typed_config"]["dns_cache_config"]["resolved_address_filter"]["ranges"]]

    def refused(address):
        ip = ipaddress.ip_address(address)
        return any(ip.version == net.version and ip in net for net in ranges)

    assert [a for a in REFUSED_SAMPLES if not refused(a)] == []
    assert [a for a in PUBLIC_SAMPLES if refused(a)] == []
