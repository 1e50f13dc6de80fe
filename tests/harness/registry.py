"""Process-wide registry of every API key the harness generated and every Envoy log it produced.

Each key made by config.new_key() also gets the name of an environment variable, set in this process's
environment: Envoys the harness starts inherit every key made so far and list those names in the filter's
vm_config.environment_variables.host_env_keys, and configurations refer to keys as {"env": NAME}. So a key is
never in a bootstrap, a plugin configuration or /config_dump (as it would be inline or in `key_values`).

The secrets check (a session-wide fixture in tests/e2e/conftest.py) greps every log for every key, in the forms
a careless log line could take: the whole `whsec_` key, its base64 part, and its bytes in hex.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
from pathlib import Path

_lock = threading.Lock()
_secrets: set = set()
_logs: list = []
_env_names: dict = {}  # key -> environment variable name, in the order the keys were made


def register_secret(key: str) -> str:
    with _lock:
        _secrets.add(key)
    return key


def register_env_key(key: str) -> str:
    """Gives a key (already registered as a secret) its environment variable name, and puts it in this process's
    environment, which every Envoy (and bench Envoy) the harness starts inherits. Returns the name."""
    with _lock:
        if key not in _env_names:
            _env_names[key] = f"WEBHOOK_EMITTER_TEST_KEY_{len(_env_names) + 1}"
            os.environ[_env_names[key]] = key
        return _env_names[key]


def env_name(key: str) -> str:
    """The environment variable that carries this key into Envoys the harness starts."""
    with _lock:
        return _env_names[key]


def key_environment() -> dict:
    """{variable name: key} for every key made so far."""
    with _lock:
        return {name: key for key, name in _env_names.items()}


def key_env_names() -> list:
    """The variable names of every key made so far, in the order they were made."""
    with _lock:
        return list(_env_names.values())


def register_log(path) -> None:
    with _lock:
        _logs.append(Path(path))


def secrets() -> list:
    with _lock:
        return sorted(_secrets)


def logs() -> list:
    with _lock:
        return list(_logs)


def _forms(key: str) -> list:
    forms = {key}
    body = key[len("whsec_"):] if key.startswith("whsec_") else key
    stripped = body.rstrip("=")
    if len(stripped) >= 16:
        forms.add(stripped)
    try:
        raw = base64.b64decode(body + "==", validate=False)
        if len(raw) >= 16:
            forms.add(raw.hex())
    except (binascii.Error, ValueError):
        pass
    return sorted(forms, key=len, reverse=True)


def redact(key: str) -> str:
    return key[:10] + "…" if len(key) > 10 else "…"


def leaks_in(text: str, keys=None) -> list:
    """Descriptions (with the key redacted) of every registered key found in `text`, in any of its forms."""
    found = []
    for key in keys if keys is not None else secrets():
        for form in _forms(key):
            if form in text:
                found.append(f"key {redact(key)} (as {'the whole key' if form == key else 'a ' + str(len(form)) + '-char form'})")
                break
    return found
