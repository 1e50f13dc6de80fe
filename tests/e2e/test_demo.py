"""`make demo` stays true: the demo script runs end to end (HTTPS delivery, signature checked by
standardwebhooks), prints the delivered event, and exits 0."""

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
    assert "(over HTTPS)" in out and "host: localhost:" in out, out
    body = json.loads(out[out.index("\n{\n") + 1: out.index("\n}\n") + 2])
    assert body["eventType"] == "job.completed" and body["data"]["object"]["objectType"] == "job", body
    assert "x-envoy" not in out.split("(over HTTPS)")[1].split("{")[0], "Envoy's callout headers reached the receiver"
