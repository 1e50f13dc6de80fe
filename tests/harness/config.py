"""Plugin configurations (the README's configuration reference) for tests: organisations, webhooks, keys, event rules.

Every key made here is registered with the secrets registry, so the suite can prove none reaches a log, and
is given an environment variable name there: configurations refer to keys only as {"env": NAME}
(key_ref), and the harness hands them to Envoy through host_env_keys.
"""

from __future__ import annotations

import base64
import copy
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from . import registry

DEFAULT_MAX_BODY_BYTES = 1048576


def new_key(nbytes: int = 32) -> str:
    """A Standard Webhooks secret: whsec_ + base64 of random bytes. Registered as a secret, with an environment
    variable name (key_ref)."""
    key = registry.register_secret("whsec_" + base64.b64encode(os.urandom(nbytes)).decode())
    registry.register_env_key(key)
    return key


def key_ref(key: str) -> dict:
    """How a configuration names a key made by new_key(): {"env": NAME}. Never put the key itself in one."""
    return {"env": registry.env_name(key)}


def new_id() -> str:
    """24 lowercase hex digits (webhook ids, organisation ids, job ids)."""
    return os.urandom(12).hex()


# Where the shipped configurations take an event's organisation from: the upstream's answer, which it gives
# only after its own authorisation. Tests that exercise the header source use HEADER_ORGANISATION.
BODY_ORGANISATION = {"pointer": "/organisationId"}
HEADER_ORGANISATION = {"header": "x-organisation-id"}
# How the shipped configurations read a job again when its completion's answer was cut short.
REFETCH_JOB = {"path": "/jobs/{jobId}"}


def job_completed_rule(path: str = "/jobs/{jobId}/complete", organisation: Optional[dict] = None,
                       refetch: Optional[dict] = None) -> dict:
    rule = {
        "type": "job.completed",
        "objectType": "job",
        "match": {"methods": ["POST", "PUT", "PATCH"], "path": path, "status": [200]},
        "when": [{"pointer": "/status", "equals": "completed"}],
        "object": "",
        "organisationId": dict(organisation or HEADER_ORGANISATION),
    }
    if refetch is not None:
        rule["refetch"] = dict(refetch)
    return rule


def job_started_rule(path: str = "/jobs/{jobId}/start") -> dict:
    return {
        "type": "job.started",
        "objectType": "job",
        "match": {"methods": ["POST"], "path": path, "status": [200]},
        "when": [{"pointer": "/status", "equals": "started"}],
        "object": "",
        "organisationId": {"header": "x-organisation-id"},
    }


@dataclass
class Hook:
    """One webhook registration, with the key the receiver must verify with."""

    id: str
    organisation_id: str
    url: str
    key: str  # the secret itself (also when the config references it as {"env": VAR})
    events: list
    status: str = "enabled"
    name: str = ""
    env_var: Optional[str] = None  # a variable name of the test's choice (else the registry's name for the key)

    @property
    def path(self) -> str:
        return f"/hooks/{self.id}"

    def to_config(self) -> dict:
        return {
            "id": self.id,
            "organisationId": self.organisation_id,
            "name": self.name or f"hook {self.id[-6:]}",
            "url": self.url,
            "description": "e2e test webhook",
            "status": self.status,
            "events": list(self.events),
            "apiKey": {"env": self.env_var} if self.env_var else key_ref(self.key),
        }


def make_hook(receiver_port: int, organisation_id: str, events: Iterable = ("job.completed",),
              status: str = "enabled", env_var: Optional[str] = None, name: str = "") -> Hook:
    hook_id = new_id()
    return Hook(
        id=hook_id,
        organisation_id=organisation_id,
        url=f"http://127.0.0.1:{receiver_port}/hooks/{hook_id}",
        key=new_key(),
        events=list(events),
        status=status,
        name=name,
        env_var=env_var,
    )


def delivery_section(max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, **overrides) -> dict:
    section = {
        "cluster": "webhooks",
        "timeoutMs": 5000,
        "retrySchedule": ["1s", "2s", "5s"],
        "maxQueued": 10000,
        "maxBodyBytes": max_body_bytes,
        "allowInsecureHttp": True,
        "allowPrivateNetworks": True,
    }
    section.update(overrides)
    return section


@dataclass
class PluginConfig:
    hooks: list
    events: list = field(default_factory=lambda: [job_completed_rule(), job_started_rule()])
    delivery: dict = field(default_factory=delivery_section)

    def to_dict(self) -> dict:
        return {
            "events": copy.deepcopy(self.events),
            "webhooks": [h.to_config() for h in self.hooks],
            "delivery": copy.deepcopy(self.delivery),
        }

    def env_vars(self) -> dict:
        """The variables of hooks whose key has a variable name of the test's choice (Envoy's environment must
        hold them; the registry's names are always there)."""
        return {h.env_var: h.key for h in self.hooks if h.env_var}

    def hook(self, hook_id: str) -> Hook:
        return next(h for h in self.hooks if h.id == hook_id)

    def subscribed(self, organisation_id: str, event_type: str) -> list:
        """The hooks that must receive an event of this type for this organisation."""
        return [
            h for h in self.hooks
            if h.organisation_id == organisation_id and h.status == "enabled" and event_type in h.events
        ]


def simple_config(receiver_port: int, organisations: int = 1, hooks_per_org: int = 1,
                  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> PluginConfig:
    """N organisations with M enabled webhooks each, all subscribed to job.completed."""
    hooks = []
    for _ in range(organisations):
        org = new_id()
        hooks.extend(make_hook(receiver_port, org) for _ in range(hooks_per_org))
    return PluginConfig(hooks=hooks, delivery=delivery_section(max_body_bytes))
