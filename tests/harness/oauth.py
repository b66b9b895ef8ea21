"""Private instances of the test OAuth server (tests/mailstack/oauth_server.py), the consent-page helper and
Google-format service-account keys, for tests that change the server's config (never the shared 11080 one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.waiting import wait_for

SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "mailstack" / "oauth_server.py"
START_TIMEOUT = 10.0


def _http() -> requests.Session:
    """Every request here goes to loopback: a proxy from the environment must not apply."""
    session = requests.Session()
    session.trust_env = False
    return session


# tokens minted by private servers that have stopped since: tests/secret_scan.py checks the logs for them
ISSUED_BY_PRIVATE_SERVERS: set[str] = set()


class OAuthServer:
    """One private oauth_server.py on a free loopback port, in its own temp dir; close() (or ``with``) ends it.

    Runs under the system ``python3`` like the shared instance, with introspection open (no Basic auth).
    """

    def __init__(self, *, client_id: str = "inboxd-test-client", client_secret: str = "inboxd-test-secret") -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self._dir = Path(tempfile.mkdtemp(prefix="inboxd-oauth-"))
        port_file = self._dir / "port"
        self._log = (self._dir / "oauth.log").open("wb")
        python3 = shutil.which("python3") or "/usr/bin/python3"
        self._proc = subprocess.Popen(
            [
                python3,
                str(SERVER_SCRIPT),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--introspect-auth",
                "",
                "--client-id",
                client_id,
                "--client-secret",
                client_secret,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.port = self._wait_for_port(port_file)
            self.url = f"http://127.0.0.1:{self.port}"
            wait_for(self._healthy, START_TIMEOUT, interval=0.05, what=f"{self.url}/healthz")
        except BaseException:
            self.close()
            raise

    def _wait_for_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if self._proc.poll() is not None:
                raise RuntimeError(f"oauth_server.py exited with {self._proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"oauth_server.py wrote no port file in {START_TIMEOUT} s: {self.log_text()}")
            time.sleep(0.02)
        return int(port_file.read_text())

    def _healthy(self) -> bool:
        try:
            with _http() as http:
                return http.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    # --- endpoints -----------------------------------------------------------------------
    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def authorize_uri(self) -> str:
        return f"{self.url}/authorize"

    @property
    def revoke_uri(self) -> str:
        return f"{self.url}/revoke"

    @property
    def introspect_uri(self) -> str:
        return f"{self.url}/introspect"

    # --- admin -------------------------------------------------------------------------------
    def admin(self, path: str, **form: str | list[str]) -> dict[str, Any]:
        """POST ``form`` to /admin/<path> (a list value repeats the field); raises unless the answer is 200."""
        with _http() as http:
            response = http.post(f"{self.url}/admin/{path.lstrip('/')}", data=form, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"/admin/{path} answered {response.status_code}: {response.text}")
        result: dict[str, Any] = response.json()
        return result

    def stats(self) -> dict[str, Any]:
        """Calls per endpoint and per grant type ("grant:authorization_code", ...), see oauth_server.py."""
        with _http() as http:
            response = http.get(f"{self.url}/admin/stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()["stats"]
        return stats

    def refresh_token(self, user: str) -> str:
        """A refresh token registered for ``user`` (as if consent had been given earlier)."""
        return str(self.admin("refresh_token", user=user)["refresh_token"])

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 answer for ``token`` (as Dovecot sees it)."""
        with _http() as http:
            response = http.post(self.introspect_uri, data={"token": token}, timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def log_text(self) -> str:
        self._log.flush()
        return (self._dir / "oauth.log").read_text(errors="replace")

    # --- lifecycle -----------------------------------------------------------------------
    def issued(self) -> list[str]:
        """Every token and code this server minted (for the run's check that none reached a log)."""
        with _http() as http:
            response = http.get(f"{self.url}/admin/issued", timeout=10)
        response.raise_for_status()
        return list(response.json()["secrets"])

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                ISSUED_BY_PRIVATE_SERVERS.update(self.issued())
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> OAuthServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@pytest.fixture
def oauth_server() -> Iterator[OAuthServer]:
    """A private OAuth server for this test alone: change its /admin/config freely."""
    with OAuthServer() as server:
        yield server


class _ConsentForm(HTMLParser):
    """The hidden inputs and action of the consent page's ``<form id="consent">``."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form" and attr.get("id") == "consent":
            self._inside, self.action = True, attr.get("action", "")
        elif tag == "input" and self._inside and attr.get("type") == "hidden" and "name" in attr:
            self.fields[attr["name"]] = attr.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


def approve(authorize_url: str, *, decision: str = "allow") -> str:
    """Play the person on the consent page without a browser: GET ``authorize_url``, post its form with
    ``decision``, and return where the server redirects (redirect_uri with code and state, or with an error).

    An error the server redirects at once comes back the same way; a 400 error page raises AssertionError.
    """
    with _http() as http:
        page = http.get(authorize_url, allow_redirects=False, timeout=10)
    if page.is_redirect:
        return str(page.headers["Location"])
    if page.status_code != 200:
        raise AssertionError(f"/authorize answered {page.status_code}: {page.text}")
    form = _ConsentForm()
    form.feed(page.text)
    if form.action is None:
        raise AssertionError(f"no consent form on the page: {page.text}")
    split = urlsplit(authorize_url)
    action = f"{split.scheme}://{split.netloc}{form.action}"
    with _http() as http:
        answer = http.post(action, data={**form.fields, "decision": decision}, allow_redirects=False, timeout=10)
    if not answer.is_redirect:
        raise AssertionError(f"the consent form post answered {answer.status_code}: {answer.text}")
    return str(answer.headers["Location"])


class AdminServer(Protocol):
    """An OAuth server of the tests: a private OAuthServer, or the shared one through MailStack."""

    @property
    def token_uri(self) -> str: ...

    def admin(self, path: str, **form: str) -> dict[str, Any]: ...


def make_service_account(
    server: AdminServer,
    *,
    client_email: str,
    domains: list[str] | tuple[str, ...] | str,
    path: Path,
    scopes: list[str] | tuple[str, ...] = ("https://mail.google.com/",),
) -> Path:
    """A fresh RSA key registered at ``server`` for domain-wide delegation over ``domains``, saved as a Google
    service-account JSON key file (mode 0600) at ``path``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()
    server.admin(
        "service_account",
        client_email=client_email,
        n=str(numbers.n),
        e=str(numbers.e),
        domains=domains if isinstance(domains, str) else ",".join(domains),
        scopes=",".join(scopes),
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "inboxd-test",
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": client_email,
        "client_id": "1234567890",
        "token_uri": server.token_uri,
    }
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
    path.chmod(0o600)  # O_CREAT's mode does not apply to an existing file
    return path
