"""`make demo` stays true: the demo script runs the product's flow end to end (a webhook registered through the
registry's API, its key shown once, an HTTPS delivery through Envoy, the signature checked by standardwebhooks
under that key), prints the delivered event, shows the organisation admin's view of it (listed as delivered with its attempt, from
the registry's deliveries API), and exits 0."""

import json
import subprocess
import sys

import harness


def test_demo_delivers_over_https_and_the_signature_is_valid(wasm):
    proc = subprocess.run([sys.executable, str(harness.REPO / "tests" / "demo.py"), "--wasm", str(wasm)],
                          capture_output=True, text=True, timeout=harness.scaled(120))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "signature valid" in out and "INVALID" not in out, out
    assert "<- 201, webhook " in out and "API key whsec_" in out and "shown this once" in out, out
    assert "(over HTTPS)" in out and "host: localhost:" in out, out
    body = json.loads(out[out.index("\n{\n") + 1: out.index("\n}\n") + 2])
    assert body["eventType"] == "job.completed" and body["data"]["object"]["objectType"] == "job", body
    assert "x-envoy" not in out.split("(over HTTPS)")[1].split("{")[0], "Envoy's callout headers reached the receiver"
    view = out.split("4. The organisation admin looks at the webhook's deliveries:")[1]
    event_id = next(line.split(": ", 1)[1] for line in out.splitlines() if line.strip().startswith("webhook-id:"))
    assert f"<- 200, event {event_id} (job.completed): delivered" in view, out
    assert "attempt 1 at " in view and "status 200" in view and "delivered" in view, out
