#!/usr/bin/env python3
"""webhook-emitter demo: the product's flow end to end. An organisation admin registers a webhook through the
registry's API and gets its API key, shown once; a job completes behind Envoy; the webhook receives the signed
event over HTTPS and verifies it with that key.

Starts, all on 127.0.0.1 with ports chosen by the OS: the webhook registry (`webhook-emitter registry serve`,
SQLite in a temporary folder), a job service, an HTTPS webhook receiver (its certificate for `localhost` is
signed by a CA made for this run), and Envoy with the webhook-emitter filter, which pulls the registry and
delivers through the egress of envoy/envoy.yaml. Ends with the organisation admin's view: the delivery listed
as delivered, with its attempt, from the registry's deliveries API (the proxy reported it). Stops everything.
Exit code 0 when the signature is valid and the delivery is listed.

    make demo                     # builds the filter, the CLI and the .venv first
    .venv/bin/python tests/demo.py --wasm target/wasm32-wasip1/release/webhook_emitter.wasm
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness.checks import signature_valid  # noqa: E402
from harness.config import (  # noqa: E402
    BODY_ORGANISATION,
    REFETCH_JOB,
    PluginConfig,
    delivery_section,
    job_completed_rule,
    new_id,
)
from harness.egress import shipped_egress  # noqa: E402
from harness.envoy import static_cluster  # noqa: E402
from harness.registry_service import RegistryService  # noqa: E402
from harness.tls import Pki, TlsReceiver  # noqa: E402

POLL_MS = 500


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wasm", default=str(harness.DEFAULT_WASM), help="path of webhook_emitter.wasm")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the delivery")
    args = parser.parse_args()
    wasm = Path(args.wasm)
    if not wasm.is_file():
        print(f"{wasm} not found: run `make wasm` first", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="webhook-emitter-demo-") as work:
        return run(wasm, Path(work), args.timeout)


def run(wasm: Path, work: Path, timeout: float) -> int:
    pki = Pki(work / "pki", "demo")
    registry = RegistryService(work / "registry")
    try:
        with harness.JobService() as jobs, TlsReceiver(pki) as receiver:
            return flow(wasm, registry, jobs, receiver, pki, timeout)
    finally:
        registry.stop()


def flow(wasm, registry, jobs, receiver, pki, timeout) -> int:
    # The filter's configuration names no webhook: they all come from the registry. The organisation of an
    # event comes from the job service's answer (its own record of the job), never from the client.
    config = PluginConfig(hooks=[], events=[job_completed_rule(organisation=BODY_ORGANISATION, refetch=REFETCH_JOB)],
                          delivery=delivery_section(cluster="webhooks_egress")).to_dict()
    config["registry"] = {"cluster": "registry", "authority": "registry", "tokenEnv": "REGISTRY_TOKEN",
                          "pollMs": POLL_MS}
    # The egress of envoy/envoy.yaml, trusting this run's CA; the receiver is on loopback, so the
    # resolved-address filter is off (as delivery.allowPrivateNetworks is on).
    egress = shipped_egress(ca=pki.ca, refuse_private=False)
    # Gated as in envoy/envoy.yaml: only requests some rule can match reach the filter.
    envoy = harness.envoy_with_filter(jobs, None, config, wasm=wasm, name="demo", start=False, egress=egress,
                                      env_vars={"REGISTRY_TOKEN": registry.proxy_token},
                                      extra_clusters=[static_cluster("registry", registry.port)], gate=True)
    try:
        try:
            envoy.start()
        except harness.EnvoyError as e:
            print(f"Envoy did not start:\n{e}", file=sys.stderr)
            return 1
        print("webhook-emitter demo (everything on 127.0.0.1)")
        print(f"  registry     {registry.base_url}  (API and dashboard; SQLite; log {registry.log_path})")
        print(f"  job service  :{jobs.port}")
        print(f"  envoy        :{envoy.listener_port}  (admin :{envoy.admin_port}, log {envoy.log_path})")
        print(f"  receiver     {receiver.url('/')}  (TLS, certificate from a CA made for this run)")
        print()

        org = new_id()
        path = f"/hooks/{new_id()}"
        token = registry.token(role="organisation_admin", org=org, sub="ada@customer.example")
        body = {"name": "Billing", "url": receiver.url(path), "description": "Invoices the customer",
                "status": "enabled", "events": ["job.completed"]}
        print(f"1. An organisation admin of {org} registers a webhook:")
        print(f"   POST {registry.base_url}/v1/organisations/{org}/webhooks")
        print(f"   {json.dumps(body)}")
        answer = registry.request("POST", f"/v1/organisations/{org}/webhooks", token=token, body=body)
        if answer.status != 201:
            print(f"   the registry answered {answer.status}: {answer.body[:300]!r}", file=sys.stderr)
            return 1
        webhook = answer.json()
        key = harness.registry.register_secret(webhook["apiKey"])
        print(f"   <- 201, webhook {webhook['id']}, API key {key}")
        print("   (shown this once: the registry keeps it encrypted and never shows it again)")
        print()

        print(f"2. The proxies pick the registration up (they poll the registry every {POLL_MS} ms);")
        print("   jobs of that organisation complete behind Envoy:")
        registered = time.time()
        delivery = None
        while delivery is None and time.time() < registered + timeout:
            job_id = jobs.own(new_id(), org)
            resp = envoy.request("POST", f"/jobs/{job_id}/complete", {"content-type": "application/json"}, b"{}")
            print(f"   client -> POST /jobs/{job_id}/complete  <- {resp.status}")
            try:
                (delivery,) = receiver.wait_for(lambda d, j=job_id: d.object_id() == j, count=1, timeout=0.5)
            except harness.WaitTimeout:
                pass
        if delivery is None:
            print(f"no delivery within {timeout:.0f} s\nEnvoy log tail:\n{envoy.log_tail(20)}", file=sys.stderr)
            return 1
        print(f"   first delivery {(delivery.received_at - registered) * 1000:.0f} ms after the registration")
        print()

        print(f"3. The webhook receives (over HTTPS): {delivery.method} {delivery.path}")
        for name, value in delivery.headers.items():
            print(f"   {name}: {value}")
        try:
            print(json.dumps(json.loads(delivery.body), indent=2))
        except ValueError:
            print(delivery.body.decode(errors="replace"))
        print()
        if not signature_valid(delivery, key):
            print("signature INVALID (standardwebhooks rejected it under the key the registry showed once)")
            return 1
        print("signature valid (checked with standardwebhooks under the key the registry showed once)")
        print()
        return admin_view(registry, token, org, webhook["id"], delivery.headers["webhook-id"], timeout)
    finally:
        envoy.stop()


def admin_view(registry, token, org, webhook_id, event_id, timeout) -> int:
    """The organisation admin's view of the delivery, from the registry's deliveries API: the proxy reported
    its attempt (one report per worker per second at most)."""
    listing = f"/v1/organisations/{org}/webhooks/{webhook_id}/deliveries"
    print("4. The organisation admin looks at the webhook's deliveries:")
    print(f"   GET {registry.base_url}{listing}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        answer = registry.request("GET", listing, token=token)
        if answer.status != 200:
            print(f"   the registry answered {answer.status}: {answer.body[:300]!r}", file=sys.stderr)
            return 1
        listed = [d for d in answer.json()["deliveries"] if d["eventId"] == event_id]
        if listed and listed[0]["status"] == "delivered":
            (item,) = listed
            print(f"   <- 200, event {item['eventId']} ({item['eventType']}): {item['status']}")
            for a in item["attempts"]:
                print(f"      attempt {a['attempt']} at {a['at']}: status {a.get('status', a.get('error'))}, "
                      f"{a.get('latencyMs')} ms, {a['outcome']}")
            print("   (the dashboard shows the same under Deliveries, with Resend, Recover and Send test event)")
            return 0
        time.sleep(0.2)
    print(f"the delivery of {event_id} was not listed as delivered within {timeout:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
