"""The registry's deployment files run as written: the Kubernetes Deployment's arguments (envoy/istio/registry.yaml)
and the compose service's command (envoy/docker-compose.yaml) start the real binary, with the secrets their
Secret / environment provide, and answer the health probe."""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
from pathlib import Path

import yaml

from harness.registry_service import REPO, RegistryService

ISTIO = REPO / "envoy" / "istio"


def docs(path: Path) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}


def secret_values() -> dict:
    return {"REGISTRY_MAIN_KEY": base64.b64encode(os.urandom(32)).decode(),
            "REGISTRY_JWT_SECRET": secrets.token_urlsafe(48), "REGISTRY_PROXY_TOKEN": secrets.token_urlsafe(32)}


def start_with(tmp_path: Path, argv: list, env: dict) -> RegistryService:
    """Runs `argv` (the deployment's own arguments) with the listen address and database moved to loopback/tmp."""
    service = RegistryService(tmp_path, start=False)
    args = []
    for a in argv:
        a = re.sub(r"^--listen=.*", "--listen=127.0.0.1:0", a)
        a = re.sub(r"^--database=sqlite:.*", f"--database=sqlite:{tmp_path / 'registry.db'}", a)
        args.append(a)
    if "--listen" in args:
        args[args.index("--listen") + 1] = "127.0.0.1:0"
    if "--database" in args:
        args[args.index("--database") + 1] = f"sqlite:{tmp_path / 'registry.db'}"
    service.args = [str(service.args[0])] + args
    service.env = {**{k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}, **env}
    service.proxy_token = env["REGISTRY_PROXY_TOKEN"]
    service.jwt_secret = env["REGISTRY_JWT_SECRET"]
    return service.start()


def test_the_kubernetes_deployment_starts_as_written(tmp_path):
    manifests = docs(ISTIO / "registry.yaml")
    deployment = manifests[("Deployment", "webhook-registry")]
    service = manifests[("Service", "webhook-registry")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    secret = docs(ISTIO / "secret" / "webhook-registry.example.yaml")[("Secret", "webhook-registry")]
    assert container["envFrom"] == [{"secretRef": {"name": "webhook-registry"}}]
    # Every variable the arguments name comes from the Secret.
    named = {a.split("=", 1)[1] for a in container["args"] if a.split("=")[0].endswith("-env")}
    assert named == set(secret["stringData"]) == set(secret_values())
    # One replica on a ReadWriteOnce volume: SQLite has one writer.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] in {n for k, n in manifests if k == "PersistentVolumeClaim"}
    database = next(a for a in container["args"] if a.startswith("--database="))
    assert database.removeprefix("--database=sqlite:").startswith(container["volumeMounts"][0]["mountPath"] + "/")
    listen_port = int(next(a for a in container["args"] if a.startswith("--listen=")).rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == listen_port == service["spec"]["ports"][0]["targetPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"

    registry = start_with(tmp_path, container["args"], secret_values())
    try:
        assert registry.request("GET", "/healthz").status == 200
        token = registry.token(role="organisation_admin", org="org-a")
        assert registry.request("POST", "/v1/organisations/org-a/webhooks", token=token,
                                body={"name": "n", "url": "https://hooks.example.com/", "events": ["job.failed"]}
                                ).status == 201
        assert registry.feed().status == 200
    finally:
        registry.stop()
    # The example Secret's placeholders are refused, so applying it by mistake starts nothing.
    refused = RegistryService(tmp_path / "placeholders", start=False)
    refused.args = [str(refused.args[0])] + container["args"]
    done = subprocess.run(refused.args, env={**os.environ, **secret["stringData"]}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0


def test_the_compose_service_starts_as_written(tmp_path):
    compose = yaml.safe_load((REPO / "envoy" / "docker-compose.yaml").read_text())
    service = compose["services"]["registry"]
    command = service["command"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert (REPO / "envoy" / mounts[command[0]]).resolve() == (REPO / "target" / "release" / "webhook-emitter")
    assert set(service["environment"]) == set(secret_values())
    named = {command[i + 1] for i, a in enumerate(command) if a.endswith("-env")}
    assert named == set(secret_values())
    assert service["ports"] == ["127.0.0.1:8090:8090"] and command[command.index("--listen") + 1] == "0.0.0.0:8090"
    registry = start_with(tmp_path, command[1:], secret_values())
    try:
        assert registry.request("GET", "/healthz").status == 200
        assert registry.request("GET", "/").status == 200
    finally:
        registry.stop()
