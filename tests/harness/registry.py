"""Process-wide registry of every API key the harness generated and every Envoy log it produced.

The secrets check (tests/e2e/test_zz_secrets.py, and a teardown check per Envoy) greps every log for every
key, in the forms a careless log line could take: the whole `whsec_` key, its base64 part, and its bytes in hex.
"""

from __future__ import annotations

import base64
import binascii
import threading
from pathlib import Path

_lock = threading.Lock()
_secrets: set = set()
_logs: list = []


def register_secret(key: str) -> str:
    with _lock:
        _secrets.add(key)
    return key


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
