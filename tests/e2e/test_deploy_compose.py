"""envoy/docker-compose.yaml and the Envoy configuration it mounts (envoy/compose/envoy.yaml).

No container engine runs in CI, so the stack is never started as containers here. What is checked instead:
the compose file is accepted by the compose tool (`config -q`, which needs no engine) and wires the pieces the
way the Envoy configuration expects; the plugin configuration inside passes the filter's own validator; and the
same Envoy configuration and the same demo servers (envoy/compose/serve.py) run for real on loopback, with the
real Envoy 1.40 and the built module, up to a signed delivery checked with the standardwebhooks library."""

from __future__ import annotations

import copy
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from standardwebhooks import Webhook

import harness
from harness import registry
from harness.gate import GATE_NAME, wasm_filter_of
from harness.registry_service import free_port

ENVOY_DIR = harness.REPO / "envoy"
COMPOSE_FILE = ENVOY_DIR / "docker-compose.yaml"
COMPOSE_ENVOY = ENVOY_DIR / "compose" / "envoy.yaml"
SERVE = ENVOY_DIR / "compose" / "serve.py"
KEY_VAR = "BILLING_WEBHOOK_KEY"
TOKEN_VAR = "REGISTRY_PROXY_TOKEN"
TOKEN = "compose-proxy-token-for-the-loopback-run"
WASM_FILTER = "envoy.filters.http.wasm"
ORG = "657bf08c202997ba9d127922"


# ---- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli() -> Path:
    proc = subprocess.run(["cargo", "build", "--quiet", "--bin", "webhook-emitter"], cwd=harness.REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"cargo build --bin webhook-emitter failed:\n{proc.stderr[-3000:]}"
    path = Path(os.environ.get("CARGO_TARGET_DIR") or harness.REPO / "target") / "debug" / "webhook-emitter"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def key(cli) -> str:
    out = subprocess.run([str(cli), "keygen"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    assert out.startswith("whsec_")
    return registry.register_secret(out)


def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def envoy_doc() -> dict:
    return yaml.safe_load(COMPOSE_ENVOY.read_text())


def http_filters(bootstrap: dict) -> list:
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["http_filters"]


def wasm_config(bootstrap: dict) -> dict:
    found = [w for w in map(wasm_filter_of, http_filters(bootstrap)) if w]
    assert len(found) == 1, "exactly one wasm filter expected"
    return found[0]["typed_config"]["config"]


def plugin_json(bootstrap: dict) -> str:
    configuration = wasm_config(bootstrap)["configuration"]
    assert configuration["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    return configuration["value"]


def clusters(bootstrap: dict) -> dict:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def endpoint(cluster: dict) -> dict:
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]


def run_check(cli: Path, text: str, tmp_path: Path, env_extra: dict) -> subprocess.CompletedProcess:
    path = tmp_path / f"plugin-{uuid.uuid4().hex[:8]}.json"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != KEY_VAR}
    env.update(env_extra)
    return subprocess.run([str(cli), "check", str(path)], capture_output=True, text=True, env=env, timeout=60)


def mounts(service: dict) -> dict:
    """container path -> (host path resolved like compose does, read-only?)"""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        assert len(parts) in (2, 3), v
        src, dst = parts[0], parts[1]
        out[dst] = ((COMPOSE_FILE.parent / src).resolve(), len(parts) == 3 and "ro" in parts[2].split(","))
    return out


def compose_tool():
    """The compose CLI: the Docker CLI plugin (`docker compose`) or Debian's docker-compose; None if neither."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


# ---- the compose file ----------------------------------------------------------------------------------------------


def test_compose_file_wires_envoy_module_config_and_demo_servers():
    doc = compose_doc()
    services = doc["services"]
    assert set(services) == {"envoy", "jobs", "receiver", "registry", "etcd"}

    envoy = services["envoy"]
    assert re.fullmatch(r"(\$\{ENVOY_IMAGE:-)?envoyproxy/envoy:v1\.40(\.\d+|-latest)\}?", envoy["image"]), envoy["image"]
    m = mounts(envoy)
    wasm_cfg = wasm_config(envoy_doc())
    module_in_container = wasm_cfg["vm_config"]["code"]["local"]["filename"]
    assert m[module_in_container] == (harness.DEFAULT_WASM.resolve(), True), "the built module, mounted read-only"
    cmd = envoy["command"]
    config_in_container = cmd[cmd.index("-c") + 1]
    assert m[config_in_container] == (COMPOSE_ENVOY.resolve(), True)
    assert KEY_VAR in envoy["environment"] and "${" + KEY_VAR in envoy["environment"][KEY_VAR], \
        "the key must come from the caller's environment, not be written into the compose file"
    assert KEY_VAR in wasm_cfg["vm_config"]["environment_variables"]["host_env_keys"]
    assert set(envoy.get("depends_on", [])) == {"jobs", "receiver", "registry", "etcd"}
    # The journal's cluster reaches the etcd service, which compacts its history.
    journal = json.loads(plugin_json(envoy_doc()))["delivery"]["journal"]
    ep = endpoint(clusters(envoy_doc())[journal["cluster"]])
    assert (ep["address"], ep["port_value"]) == ("etcd", 2379)
    etcd_cmd = services["etcd"]["command"]
    assert "--listen-client-urls=http://0.0.0.0:2379" in etcd_cmd
    assert "--auto-compaction-mode=revision" in etcd_cmd

    bootstrap_clusters = clusters(envoy_doc())
    for name, cluster_name in (("jobs", "job_service"), ("receiver", "receiver")):
        svc = services[name]
        assert svc["image"] == "python:3.11-slim"
        cmd = svc["command"]
        script = cmd[1]
        dirs = mounts(svc)
        host_dir, ro = dirs[str(Path(script).parent)]
        assert ro and host_dir / Path(script).name == SERVE.resolve(), f"{name}: {script} is not envoy/compose/serve.py"
        assert cmd[2] == name
        port = int(cmd[cmd.index("--port") + 1])
        ep = endpoint(bootstrap_clusters[cluster_name])
        assert (ep["address"], ep["port_value"]) == (name, port), f"Envoy's {cluster_name} cluster does not reach {name}"
    # The job service imports the harness from the mounted tests/ (serve.py finds it two levels above itself).
    jobs_mounts = mounts(services["jobs"])
    tests_in_container = str(Path(services["jobs"]["command"][1]).parents[2] / "tests")
    assert jobs_mounts[tests_in_container] == ((harness.REPO / "tests").resolve(), True)


def test_compose_tool_accepts_the_file(key):
    tool = compose_tool()
    if tool is None:
        pytest.skip("no compose tool: install Debian's `docker-compose` (apt-get install -y docker-compose) or the "
                    "Docker CLI compose plugin; the rest of this file's checks still ran")
    env = {k: v for k, v in os.environ.items() if k not in (KEY_VAR, "ENVOY_IMAGE")}
    # The registry's secrets (tests/registry/test_deploy.py checks its service).
    env.update({name: "set-by-the-test" for name in ("REGISTRY_MAIN_KEY", "REGISTRY_JWT_SECRET", "REGISTRY_PROXY_TOKEN")})
    base = [*tool, "-f", str(COMPOSE_FILE)]
    ok = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, timeout=60,
                        env={**env, KEY_VAR: key}, cwd=harness.REPO)
    assert ok.returncode == 0, ok.stderr
    # The normalised file, as the tool will run it: mounts resolved to this checkout's files.
    full = subprocess.run([*base, "config"], capture_output=True, text=True, timeout=60,
                          env={**env, KEY_VAR: "whsec_placeholder"}, cwd=harness.REPO)
    assert full.returncode == 0, full.stderr
    normalised = yaml.safe_load(full.stdout)
    volumes = json.dumps(normalised["services"]["envoy"]["volumes"])
    assert str(harness.DEFAULT_WASM) in volumes and str(COMPOSE_ENVOY) in volumes
    assert normalised["services"]["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    # Without the key the tool refuses to start anything, naming the variable.
    missing = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, timeout=60, env=env,
                             cwd=harness.REPO)
    assert missing.returncode != 0
    assert KEY_VAR in missing.stderr + missing.stdout


# ---- the Envoy configuration of the compose stack ----------------------------------------------------------------


def test_compose_envoy_config_has_the_gated_filter_before_the_router():
    bootstrap = envoy_doc()
    names = [f["name"] for f in http_filters(bootstrap)]
    assert names == [GATE_NAME, "envoy.filters.http.router"]
    assert wasm_filter_of(http_filters(bootstrap)[0])["name"] == WASM_FILTER
    cfg = wasm_config(bootstrap)
    assert cfg["failure_policy"] == "FAIL_RELOAD"
    assert cfg["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    plugin = json.loads(plugin_json(bootstrap))
    known = clusters(bootstrap)
    for w in plugin["webhooks"]:
        cluster = w.get("cluster") or plugin["delivery"]["cluster"]
        assert cluster in known, f"webhook {w['id']}: no cluster {cluster!r} in the compose Envoy config"
        assert w["url"].startswith(f"http://{endpoint(known[cluster])['address']}:")
    assert "whsec_" not in COMPOSE_ENVOY.read_text(), "a key is written into the compose Envoy config"


def test_compose_plugin_config_passes_the_filters_validator(cli, key, tmp_path):
    text = plugin_json(envoy_doc())
    ok = run_check(cli, text, tmp_path, {KEY_VAR: key, TOKEN_VAR: TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert "valid (1 event rules, 1 webhooks)" in ok.stdout
    # The demo receiver is plain HTTP on the compose network: only allowed because the file says so.
    plugin = json.loads(text)
    del plugin["delivery"]["allowInsecureHttp"]
    bad = run_check(cli, json.dumps(plugin), tmp_path, {KEY_VAR: key, TOKEN_VAR: TOKEN})
    assert bad.returncode != 0 and "webhooks[0].url: must be an https URL" in bad.stderr, bad.stderr
    missing = run_check(cli, text, tmp_path, {})
    assert missing.returncode != 0 and f"environment variable {KEY_VAR} is not set" in missing.stderr
    assert f"registry.tokenEnv: environment variable {TOKEN_VAR} is not set" in missing.stderr


# ---- the same configuration and servers, run for real on loopback -------------------------------------------------


class Served:
    """envoy/compose/serve.py in a subprocess on 127.0.0.1 with a free port; its JSON lines in a queue."""

    def __init__(self, service: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(SERVE), service, "--host", "127.0.0.1", "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **env}, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.raw: list = []
        threading.Thread(target=self._pump, daemon=True).start()
        first = self.next_event(timeout=15)
        assert first["event"] == "listening" and first["service"] == service, first
        self.port = first["port"]

    def _pump(self):
        for line in self.proc.stdout:
            self.raw.append(line)
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass

    def next_event(self, timeout: float, event: str | None = None) -> dict:
        deadline = time.monotonic() + harness.scaled(timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise harness.WaitTimeout(f"no {event or 'line'} from serve.py; output so far:\n{''.join(self.raw)}")
            try:
                item = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise AssertionError(f"serve.py exited ({self.proc.returncode}):\n{''.join(self.raw)}")
                continue
            if event is None or item.get("event") == event:
                return item

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def loopback_bootstrap(wasm: Path, jobs_port: int, receiver_port: int, etcd_port: int) -> dict:
    """compose/envoy.yaml with loopback addresses and free ports in place of the compose network's."""
    b = copy.deepcopy(envoy_doc())
    b["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    b["static_resources"]["listeners"][0]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    wasm_config(b)["vm_config"]["code"]["local"]["filename"] = str(wasm)
    known = clusters(b)
    endpoint(known["job_service"]).update(address="127.0.0.1", port_value=jobs_port)
    endpoint(known["receiver"]).update(address="127.0.0.1", port_value=receiver_port)
    # No registry runs here: the configured webhook is delivered without waiting for it.
    endpoint(known["registry"]).update(address="127.0.0.1", port_value=free_port())
    endpoint(known["etcd"]).update(address="127.0.0.1", port_value=etcd_port)
    return b


def test_compose_config_and_servers_deliver_a_signed_event_on_loopback(wasm, key, envoys):
    from harness.etcd import Etcd, wait_journal_live

    jobs = Served("jobs", {})
    receiver = Served("receiver", {KEY_VAR: key})
    etcd = Etcd(1, name="etcd-compose").start()
    try:
        envoy = harness.Envoy(loopback_bootstrap(wasm, jobs.port, receiver.port, etcd.members[0].client_port),
                              name="compose-envoy", env={KEY_VAR: key, TOKEN_VAR: TOKEN})
        envoys.append(envoy)
        envoy.start()
        wait_journal_live(envoy)
        job_id = "job-" + uuid.uuid4().hex[:12]
        # A client naming another organisation changes nothing: the organisation is the job service's answer.
        r = envoy.request("POST", f"/jobs/{job_id}/complete", headers={"x-organisation-id": "f" * 24}, body=b"{}")
        assert r.status == 200 and r.json() == {**harness.completed_job(job_id), "organisationId": ORG}, \
            (r.status, r.body[:300])
        seen = jobs.next_event(timeout=5, event="request")
        assert seen["path"] == f"/jobs/{job_id}/complete"

        d = receiver.next_event(timeout=20, event="delivery")
        assert d["method"] == "POST" and d["path"] == "/hooks/rapidlogix"
        assert d["eventType"] == "job.completed" and d["objectId"] == job_id and d["organisationId"] == ORG
        assert d["signatureValid"] is True, d
        headers = {"webhook-id": d["webhookId"], "webhook-timestamp": d["timestamp"],
                   "webhook-signature": d["signature"]}
        event = Webhook(key).verify(d["body"], headers)  # an implementation other than ours
        assert event["data"]["object"] == {**harness.completed_job(job_id), "organisationId": ORG, "objectType": "job"}
        assert d["userAgent"].startswith("webhook-emitter/")
        # The record written ahead of the delivery is deleted once it is delivered.
        harness.wait_until(lambda: etcd.keys("webhook-emitter/records/") == [], 10,
                           desc="the delivered event's record deleted from etcd")
    finally:
        receiver.stop()
        jobs.stop()
        etcd.stop()
    text = "".join(receiver.raw) + "".join(jobs.raw)
    assert key not in text, "serve.py printed the key"


def test_receiver_flags_a_bad_signature(key):
    receiver = Served("receiver", {KEY_VAR: key})
    try:
        body = b'{"id":"x"}'
        r = harness.http_request(receiver.port, "POST", "/hooks/rapidlogix", body=body, headers={
            "content-type": "application/json", "webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="})
        assert r.status == 200
        d = receiver.next_event(timeout=5, event="delivery")
        assert d["signatureValid"] is False
    finally:
        receiver.stop()
