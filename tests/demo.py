#!/usr/bin/env python3
"""webhook-emitter demo: one job completes behind Envoy, and a webhook receives the signed event over HTTPS.

Starts, all on 127.0.0.1 with ports chosen by the OS: a job service, an HTTPS webhook receiver (its certificate
for `localhost` is signed by a CA made for this run), and Envoy with the webhook-emitter filter, delivering
through the egress of envoy/envoy.yaml (a dynamic_forward_proxy) that validates the receiver against that CA. Completes one job
through Envoy, waits for the delivery, prints it and checks its signature with the standardwebhooks package.
Stops everything. Exit code 0 when the signature is valid.

    make demo                     # builds the filter and the .venv first
    .venv/bin/python tests/demo.py --wasm target/wasm32-wasip1/release/webhook_emitter.wasm
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness.checks import signature_valid  # noqa: E402
from harness.config import (  # noqa: E402
    BODY_ORGANISATION,
    PluginConfig,
    delivery_section,
    job_completed_rule,
    make_hook,
    new_id,
)
from harness.egress import shipped_egress  # noqa: E402
from harness.tls import Pki, TlsReceiver  # noqa: E402

KEY_VAR = "DEMO_WEBHOOK_KEY"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wasm", default=str(harness.DEFAULT_WASM), help="path of webhook_emitter.wasm")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the delivery")
    args = parser.parse_args()
    wasm = Path(args.wasm)
    if not wasm.is_file():
        print(f"{wasm} not found: run `make wasm` first", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="webhook-emitter-demo-") as pki_dir:
        return run(wasm, Pki(Path(pki_dir), "demo"), args.timeout)


def run(wasm: Path, pki: Pki, timeout: float) -> int:
    with harness.JobService() as jobs, TlsReceiver(pki) as receiver:
        org = new_id()
        hook = make_hook(receiver.port, org, ["job.completed"], env_var=KEY_VAR, name="Billing")
        hook.url = receiver.url(hook.path)  # https://localhost:<port>/hooks/<id>
        # The organisation comes from the job service's answer (its own record of the job), never from
        # anything the client sends.
        config = PluginConfig(hooks=[hook], events=[job_completed_rule(organisation=BODY_ORGANISATION)],
                              delivery=delivery_section(cluster="webhooks_egress"))
        # The egress of envoy/envoy.yaml, trusting this run's CA; the receiver is on loopback, so the
        # resolved-address filter is off (as delivery.allowPrivateNetworks is on).
        egress = shipped_egress(ca=pki.ca, refuse_private=False)
        envoy = harness.envoy_with_filter(jobs, None, config, wasm=wasm, name="demo", start=False, egress=egress)
        try:
            try:
                envoy.start()
            except harness.EnvoyError as e:
                print(f"Envoy did not start:\n{e}", file=sys.stderr)
                return 1
            print("webhook-emitter demo (everything on 127.0.0.1)")
            print(f"  job service  :{jobs.port}")
            print(f"  envoy        :{envoy.listener_port}  (admin :{envoy.admin_port}, log {envoy.log_path})")
            print(f"  webhook      {hook.url}  (organisation {org}, key passed to the VM as {KEY_VAR})")
            print(f"  TLS          the receiver's certificate is checked against a CA made for this run ({pki.ca})")
            print()

            job_id = jobs.own(new_id(), org)
            path = f"/jobs/{job_id}/complete"
            resp = envoy.request("POST", path, {"content-type": "application/json"}, b"{}")
            print(f"client  -> POST {path}  (the job service knows job {job_id} belongs to organisation {org})")
            print(f"client  <- {resp.status} {resp.body.decode(errors='replace')}")
            print()

            try:
                (delivery,) = receiver.wait_for(lambda d: d.object_id() == job_id, count=1, timeout=timeout)
            except harness.WaitTimeout as e:
                print(f"no delivery: {e}\nEnvoy log tail:\n{envoy.log_tail(20)}", file=sys.stderr)
                return 1

            print(f"webhook <- {delivery.method} {delivery.path}  (over HTTPS)")
            for name, value in delivery.headers.items():
                print(f"  {name}: {value}")
            try:
                print(json.dumps(json.loads(delivery.body), indent=2))
            except ValueError:
                print(delivery.body.decode(errors="replace"))
            print()
            if signature_valid(delivery, hook.key):
                print("signature valid (checked with standardwebhooks under the webhook's key)")
                return 0
            print("signature INVALID (standardwebhooks rejected it under the webhook's key)")
            return 1
        finally:
            envoy.stop()


if __name__ == "__main__":
    sys.exit(main())
