"""The shipped delivery egress (envoy/envoy.yaml), taken from that file for tests and the demo.

The egress is several parts of the bootstrap: the internal listener `webhooks_egress` (dynamic_forward_proxy
HTTP filter + router), the cluster `webhooks_egress` that callouts go to (it leads into that listener), the
dynamic_forward_proxy cluster `webhooks_egress_dfp`, and the internal_listener bootstrap extension. Tests get
them from the shipped file, so what they prove holds for the configuration users copy; only what cannot work on
a test machine is changed: the CA the receivers' certificates are checked against, the DNS resolver, and (for
receivers on loopback, with delivery.allowPrivateNetworks on) the resolved-address filter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from .envoy import REPO

SHIPPED = REPO / "envoy" / "envoy.yaml"
CLUSTER = "webhooks_egress"
DFP_CLUSTER = "webhooks_egress_dfp"
LISTENER = "webhooks_egress"


@dataclass
class Egress:
    listeners: list = field(default_factory=list)
    clusters: list = field(default_factory=list)
    bootstrap_extensions: list = field(default_factory=list)

    @property
    def dns_cache_config(self) -> dict:
        """The DNS cache config of the listener's dynamic_forward_proxy filter (the cluster's is the same)."""
        return _dfp_filter(self.listeners[0])["typed_config"]["dns_cache_config"]


def _dfp_filter(listener: dict) -> dict:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.dynamic_forward_proxy")


def shipped_bootstrap(path: Path = SHIPPED) -> dict:
    return yaml.safe_load(path.read_text())


def shipped_egress(ca: Optional[Path] = None, resolver: Optional[dict] = None, refuse_private: bool = True,
                   path: Path = SHIPPED) -> Egress:
    """The egress of the shipped configuration. `ca`: trust this CA instead of the system's. `resolver`: a
    typed_dns_resolver_config for its DNS cache (for example harness.dns.DnsServer.cares_resolver_config()).
    `refuse_private=False` takes out the resolved-address filter, for receivers on loopback."""
    doc = shipped_bootstrap(path)
    statics = doc["static_resources"]
    listener = copy.deepcopy(next(li for li in statics["listeners"] if li["name"] == LISTENER))
    clusters = [copy.deepcopy(next(c for c in statics["clusters"] if c["name"] == name))
                for name in (CLUSTER, DFP_CLUSTER)]
    dfp = clusters[1]
    dns = _dfp_filter(listener)["typed_config"]["dns_cache_config"]
    # The listener's filter and the cluster must name the same cache with the same settings (Envoy refuses
    # two different configurations of one named cache).
    assert dfp["cluster_type"]["typed_config"]["dns_cache_config"] == dns
    if resolver is not None:
        dns["typed_dns_resolver_config"] = copy.deepcopy(resolver)
    if not refuse_private:
        dns.pop("resolved_address_filter", None)
    dfp["cluster_type"]["typed_config"]["dns_cache_config"] = copy.deepcopy(dns)
    if ca is not None:
        validation = dfp["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
        validation["trusted_ca"] = {"filename": str(ca)}
    return Egress(listeners=[listener], clusters=clusters,
                  bootstrap_extensions=copy.deepcopy(doc.get("bootstrap_extensions", [])))
