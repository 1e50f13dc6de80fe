"""Tenancy that can't be forged. The shipped rules take the organisation from the upstream's answer, so a client
naming another organisation changes nothing. A header source is safe only behind a trusted filter that sets the
header and strips the client's copy: envoy/trusted-organisation-header.yaml, run here as shipped (with a local key
set in place of remote_jwks)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time

import harness
import pytest
import yaml
from harness.config import (BODY_ORGANISATION, HEADER_ORGANISATION, PluginConfig, job_completed_rule, make_hook,
                            new_id)
from harness.observe import Counters

TRUSTED = harness.REPO / "envoy" / "trusted-organisation-header.yaml"


def test_a_client_naming_another_organisation_changes_nothing(job_service, rc, envoys, wasm):
    a, b = new_id(), new_id()
    hook_a, hook_b = make_hook(rc.port, a, name="tenant-a"), make_hook(rc.port, b, name="tenant-b")
    config = PluginConfig(hooks=[hook_a, hook_b], events=[job_completed_rule(organisation=BODY_ORGANISATION)])
    envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="tenancy-body")
    envoys.append(envoy)
    forged = job_service.own(new_id(), a)
    r = envoy.request("POST", f"/jobs/{forged}/complete", {"x-organisation-id": b}, b"{}")
    assert r.status == 200
    (got,) = rc.wait_for(lambda d: d.object_id() == forged, timeout=15)
    assert got.path == hook_a.path and got.json()["organisationId"] == a
    # B's own event afterwards arrives, and nothing of A's job went to B.
    own_b = job_service.own(new_id(), b)
    assert envoy.request("POST", f"/jobs/{own_b}/complete", {}, b"{}").status == 200
    rc.wait_for(lambda d: d.object_id() == own_b and d.path == hook_b.path, timeout=15)
    assert not [d for d in rc.deliveries(lambda d: d.path == hook_b.path) if d.object_id() == forged]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(secret: bytes, claims: dict) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


@pytest.fixture
def trusted_envoy(job_service, rc, envoys, wasm):
    """The filters of envoy/trusted-organisation-header.yaml in front of webhook-emitter (header source)."""
    secret = os.urandom(32)
    a, b = new_id(), new_id()
    hooks = [make_hook(rc.port, a, name="jwt-a"), make_hook(rc.port, b, name="jwt-b")]
    config = PluginConfig(hooks=hooks, events=[job_completed_rule(organisation=HEADER_ORGANISATION)])
    envoy = harness.envoy_with_filter(job_service, rc, config, wasm=wasm, name="tenancy-jwt", start=False)
    filters = yaml.safe_load(TRUSTED.read_text())["http_filters"]
    provider = filters[1]["typed_config"]["providers"]["saas"]
    del provider["remote_jwks"]
    provider["local_jwks"] = {"inline_string": json.dumps({"keys": [{"kty": "oct", "alg": "HS256",
                                                                      "k": b64url(secret)}]})}
    hcm = envoy.bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0:0] = filters
    envoy.start()
    envoys.append(envoy)

    def token(org, **extra):
        claims = {"iss": "https://id.example.com/", "aud": "jobs", "sub": "user-1", "organisationId": org,
                  "exp": int(time.time()) + 600}
        claims.update(extra)
        return hs256_token(secret, claims)

    return envoy, hooks, token


def test_the_trusted_header_comes_from_the_token_never_from_the_client(trusted_envoy, rc):
    envoy, (hook_a, hook_b), token = trusted_envoy
    counters = Counters(envoy)
    job = new_id()
    r = envoy.request("POST", f"/jobs/{job}/complete",
                      {"authorization": f"Bearer {token(hook_a.organisation_id)}",
                       "x-organisation-id": hook_b.organisation_id}, b"{}")
    assert r.status == 200
    (got,) = rc.wait_for(lambda d: d.object_id() == job, timeout=15)
    assert got.path == hook_a.path and got.json()["organisationId"] == hook_a.organisation_id
    assert counters.delta("events_bad_organisation") == 0, "the client's copy was not removed"


@pytest.mark.parametrize("auth", ["none", "forged", "expired"])
def test_without_a_valid_token_the_request_never_reaches_the_job_service(trusted_envoy, job_service, rc, auth):
    envoy, (hook_a, hook_b), token = trusted_envoy
    headers = {"x-organisation-id": hook_b.organisation_id}
    if auth == "forged":
        headers["authorization"] = "Bearer " + hs256_token(b"not-the-key" * 3, {"organisationId": hook_b.organisation_id})
    elif auth == "expired":
        headers["authorization"] = "Bearer " + token(hook_b.organisation_id, exp=int(time.time()) - 3600)
    job = new_id()
    r = envoy.request("POST", f"/jobs/{job}/complete", headers, b"{}")
    assert r.status == 401, (r.status, r.body[:200])
    assert not job_service.requests_for(f"/jobs/{job}/")
    # An ordinary event right after shows that nothing was emitted for the refused one.
    control = new_id()
    assert envoy.request("POST", f"/jobs/{control}/complete",
                         {"authorization": f"Bearer {token(hook_b.organisation_id)}"}, b"{}").status == 200
    rc.wait_for(lambda d: d.object_id() == control, timeout=15)
    assert not rc.deliveries(lambda d: d.object_id() == job)
