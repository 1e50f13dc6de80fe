"""The webhook registry (`webhook-emitter registry serve`) as a real process, and a real Postgres for it.

Used by tests/registry and meant for the demo and the end-to-end suite: `RegistryService(...)` starts the binary
on a loopback port chosen by the OS, `.register(...)` registers a webhook through the API as an organisation
admin and returns the webhook and its key (the only time the key is shown), `.stop()` stops it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import registry
from .util import scaled, terminate, wait_until

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("WEBHOOK_EMITTER_BIN", REPO / "target" / "debug" / "webhook-emitter"))
LOOPBACK = "127.0.0.1"
# For a registry that a test writes to as fast as it can on purpose (hundreds of invalid fields, a hammer): the
# organisations' write limit (default 10 a second, bursts of 50) turned off.
WRITES_UNLIMITED = ("--org-write-rate", "0")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(secret: str, claims: dict, header: Optional[dict] = None) -> str:
    """A JWT signed with HS256, made here independently of the registry's own code."""
    head = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


class RegistryService:
    """One `registry serve` process. Its secrets are made fresh here; its log is kept in `work_dir`."""

    def __init__(self, work_dir: Path, database: Optional[str] = None, extra_args=(), main_key: Optional[str] = None,
                 jwt_secret: Optional[str] = None, proxy_token: Optional[str] = None, plaintext: bool = False,
                 loopback_webhooks: bool = True, binary: Path = BINARY, env: Optional[dict] = None,
                 start: bool = True, port: int = 0):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.database = database or f"sqlite:{self.work_dir / 'registry.db'}"
        self.jwt_secret = jwt_secret or secrets.token_urlsafe(32)
        self.proxy_token = proxy_token or secrets.token_urlsafe(24)
        self.main_key = None if plaintext else (main_key or base64.b64encode(os.urandom(32)).decode())
        self.args = [str(binary), "registry", "serve", "--listen", f"{LOOPBACK}:{port}", "--database", self.database,
                     "--jwt-secret-env", "REGISTRY_TEST_JWT_SECRET", "--proxy-token-env", "REGISTRY_TEST_PROXY_TOKEN"]
        self.args += ["--insecure-plaintext-keys"] if plaintext else ["--main-key-env", "REGISTRY_TEST_MAIN_KEY"]
        if loopback_webhooks:
            # The tests' receivers are plain HTTP on loopback; the filter is configured to match.
            self.args += ["--allow-insecure-http", "--allow-private-networks"]
        self.args += list(extra_args)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.env.update({"REGISTRY_TEST_JWT_SECRET": self.jwt_secret, "REGISTRY_TEST_PROXY_TOKEN": self.proxy_token})
        if self.main_key:
            self.env["REGISTRY_TEST_MAIN_KEY"] = self.main_key
        self.env.update(env or {})
        self.log_path = self.work_dir / f"registry-{id(self):x}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        if start:
            self.start()

    # --- process ---

    def start(self, timeout: float = 30.0) -> "RegistryService":
        registry.register_log(self.log_path)
        log = open(self.log_path, "ab")
        offset = log.tell()
        self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()

        def listening():
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"the registry exited with {self.proc.returncode}:\n{text}")
            return None

        self.port = wait_until(listening, timeout, "the registry to listen")
        return self

    def stop(self) -> None:
        terminate(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace") if self.log_path.exists() else ""

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # --- tokens ---

    def token(self, role: str = "organisation_admin", org: str = "org-a", sub: str = "tester",
              ttl: int = 3600, **extra) -> str:
        claims = {"sub": sub, "role": role, "organisationId": org, "exp": int(time.time()) + ttl, **extra}
        return hs256_token(self.jwt_secret, claims)

    # --- HTTP ---

    def request(self, method: str, path: str, token: Optional[str] = None, body=None, headers=None,
                timeout: float = 30.0) -> Response:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=scaled(timeout))
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            all_headers = dict(headers or {})
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            payload = b""
            if body is not None:
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                all_headers.setdefault("Content-Type", "application/json")
            all_headers["Content-Length"] = str(len(payload))
            for name, value in all_headers.items():
                conn.putheader(name, value)
            conn.endheaders(payload)
            answer = conn.getresponse()
            return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
        finally:
            conn.close()

    def feed(self, etag: Optional[str] = None) -> Response:
        headers = {"If-None-Match": etag} if etag else {}
        return self.request("GET", "/v1/registry", token=self.proxy_token, headers=headers)

    def changes(self, since: int = 0) -> Response:
        """One page of the version 2 feed, `GET /v2/registry/changes?since=N`, with the proxy token."""
        return self.request("GET", f"/v2/registry/changes?since={since}", token=self.proxy_token)

    def list_all(self, since: int = 0) -> tuple:
        """Follows the version 2 feed's pages from `since` to the end; returns (changes, pages' bodies)."""
        changes, pages = [], []
        while True:
            answer = self.changes(since)
            assert answer.status == 200, answer
            page = answer.json()
            pages.append(answer.body)
            changes += page["changes"]
            since = page["next"]
            if not page["more"]:
                return changes, pages

    def seed(self, count: int, organisations: int, maximal_every: int = 0, url_prefix: str = "",
             timeout: float = 300.0) -> str:
        """Writes `count` webhooks straight into this registry's database (`registry seed`, keys sealed as the API
        seals them); returns what the command printed."""
        args = [self.args[0], "registry", "seed", "--database", self.database, "--count", str(count),
                "--organisations", str(organisations), "--maximal-every", str(maximal_every)]
        args += ["--main-key-env", "REGISTRY_TEST_MAIN_KEY"] if self.main_key else ["--insecure-plaintext-keys"]
        if url_prefix:
            args += ["--url-prefix", url_prefix]
        if "--allow-insecure-http" in self.args:
            # The seed is checked as the API checks a registration, with the registry's own flags.
            args += ["--allow-insecure-http", "--allow-private-networks"]
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=scaled(timeout))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def register(self, org: str, url: str, events=("job.completed",), name: str = "Test webhook",
                 description: str = "", status: str = "enabled") -> tuple:
        """Registers a webhook as an organisation admin of `org`; returns (webhook, apiKey)."""
        answer = self.request("POST", f"/v1/organisations/{org}/webhooks", token=self.token(org=org),
                              body={"name": name, "url": url, "description": description, "status": status,
                                    "events": list(events)})
        assert answer.status == 201, answer
        webhook = answer.json()
        key = registry.register_secret(webhook.pop("apiKey"))
        return webhook, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path:
    """The newest Debian Postgres server's bin directory."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise AssertionError("Postgres is not installed (make test installs the Debian postgresql package)")
    return found[-1].parent


class Postgres:
    """A throwaway Postgres cluster on loopback. Postgres refuses to run as root, so as root it runs as the
    `postgres` user (runuser); the superuser has a random password (scram-sha-256, TCP only)."""

    def __init__(self, timeout: float = 60.0, durable: bool = False):
        self.bin = postgres_bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="webhook-emitter-pg-"))
        self.data = self.dir / "data"
        self.password = secrets.token_hex(16)
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
                   f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8", "--locale=C"])
        self.log_path = self.dir / "postgres.log"
        self.durable = durable
        self.start_server(timeout)
        self._databases = 0

    def start_server(self, timeout: float = 60.0) -> None:
        """Starts the server on its data directory and port (again, after `stop_server`)."""
        log = open(self.log_path, "ab")
        if self.as_root:
            shutil.chown(self.log_path, "postgres", "postgres")
        # Durability is not what the tests are about: fsync off keeps them fast on a shared machine. The load
        # test asks for a durable server, to compare with SQLite's synced commits.
        fast = [] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                        "-c", "full_page_writes=off"]
        self.proc = subprocess.Popen(
            self._as_postgres([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                               *fast, "-c", "max_connections=200"]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited:\n{self.log_path.read_text(errors='replace')}")
            return self.psql("SELECT 1", check=False).returncode == 0

        wait_until(ready, timeout, "postgres to accept connections", interval=0.2)

    def stop_server(self) -> None:
        """Stops the server as an outage would: open sessions are cut (pg_ctl's fast mode); the data stays."""
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        self.proc.wait(scaled(60))

    def _as_postgres(self, argv: list) -> list:
        return ["runuser", "-u", "postgres", "--", *argv] if self.as_root else argv

    def _run(self, argv: list) -> None:
        done = subprocess.run(self._as_postgres(argv), capture_output=True, text=True)
        if done.returncode != 0:
            raise AssertionError(f"{argv[0]} failed:\n{done.stdout}\n{done.stderr}")

    def psql(self, sql: str, database: str = "postgres", check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.bin.parent / "bin" / "psql") if (self.bin / "psql").exists() else "psql",
                               "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", "-d", database, "-XAtq",
                               "-v", "ON_ERROR_STOP=1", "-c", sql],
                              capture_output=True, text=True, env={**os.environ, "PGPASSWORD": self.password})
        if check and done.returncode != 0:
            raise AssertionError(f"psql {sql!r} failed: {done.stderr}")
        return done

    def new_database(self) -> str:
        """A fresh, empty database; returns its postgres:// URL."""
        self._databases += 1
        name = f"registry_{self._databases}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgres://postgres:{self.password}@{LOOPBACK}:{self.port}/{name}"

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
