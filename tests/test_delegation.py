"""Delegated token sources (Workspace domain-wide delegation, Microsoft 365 app-only) against real token endpoints.

The grants go over HTTP to a private instance of the loopback OAuth server (tests/mailstack/oauth_server.py), which
checks the RS256 assertion google-auth signs and answers as Google and Microsoft do; failures the server cannot be
told to produce (5xx, echoed secrets, non-OAuth answers) come from a one-reply endpoint started in the test.
Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.oauth import OAuthServer, make_service_account
from inboxd.clock import FakeClock
from inboxd.delegation import (
    APP_ONLY_GRANTS,
    OUTLOOK_APP_ONLY_SCOPE,
    ClientCredentialsTokenSource,
    ServiceAccountTokenSource,
)
from inboxd.errors import AccountFailed, InboxdError, RetryLater
from inboxd.tokens import ASSUMED_LIFETIME, TokenSource

GMAIL_SCOPE = "https://mail.google.com/"
SA_EMAIL = "inboxd-sync@hr-project.iam.gserviceaccount.com"
DOMAIN = "corp.test"
USER = f"alice@{DOMAIN}"


@pytest.fixture
def clock() -> FakeClock:
    # Far from the machine's wall time on purpose: expiry must follow the injected clock.
    return FakeClock(dt.datetime(2001, 2, 3, 4, 5, 6, tzinfo=dt.UTC))


# --- a one-reply token endpoint for what the OAuth server will not answer ---------------------------------------


@dataclass
class StubEndpoint:
    """Answers every POST with ``status`` and ``body``; ``echo`` puts the raw request body into error_description,
    as a careless server might. Records each request body."""

    status: int = 503
    body: object = field(default_factory=lambda: {"error": "temporarily_unavailable"})
    content_type: str = "application/json"
    echo: bool = False
    url: str = ""
    requests: list[str] = field(default_factory=list)

    def answer(self, raw: str) -> tuple[int, bytes]:
        self.requests.append(raw)
        body = self.body
        if self.echo:
            body = {"error": self.body, "error_description": f"bad request: {raw}"}
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.status, payload


@pytest.fixture
def stub() -> Iterator[StubEndpoint]:
    state = StubEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            status, payload = state.answer(raw)
            self.send_response(status)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/token"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/token"


# --- Google Workspace domain-wide delegation ------------------------------------------------------------------------


@pytest.fixture
def key_file(oauth_server: OAuthServer, tmp_path: Path) -> Path:
    return make_service_account(oauth_server, client_email=SA_EMAIL, domains=[DOMAIN], path=tmp_path / "sa.json")


def sa_source(key_file: Path, clock: FakeClock, **kwargs: object) -> ServiceAccountTokenSource:
    params: dict[str, object] = {"key_file": key_file, "subject": USER, "scopes": [GMAIL_SCOPE], "clock": clock}
    params.update(kwargs)
    return ServiceAccountTokenSource(**params)  # type: ignore[arg-type]


def jwt_grants(server: OAuthServer) -> int:
    return int(server.stats().get("grant:jwt-bearer", 0))


def private_key_texts(key_file: Path) -> list[str]:
    """The key file's private key and each of its base64 lines: none may appear in any message."""
    pem = json.loads(key_file.read_text())["private_key"]
    return [pem, *(line for line in pem.splitlines() if len(line) >= 16 and "PRIVATE KEY" not in line)]


def assert_no_secret(exc: BaseException, secrets: list[str]) -> None:
    for text in (str(exc), repr(exc)):
        for secret in secrets:
            assert secret not in text
        assert "eyJ" not in text  # no signed JWT (assertion or token) either


def with_token_uri(key_file: Path, token_uri: str, path: Path) -> Path:
    """A copy of the key file pointing at another token endpoint."""
    info = json.loads(key_file.read_text())
    info["token_uri"] = token_uri
    path.write_text(json.dumps(info))
    return path


def test_service_account_token_for_a_user_of_the_workspace(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock
) -> None:
    """The token is a real grant for the subject: the server signs it off through introspection."""
    source: TokenSource = sa_source(key_file, clock)
    token = source.access_token()
    assert token
    assert jwt_grants(oauth_server) == 1
    info = oauth_server.introspect(token)
    assert info["active"] is True
    assert info["email"] == USER
    assert info["client_id"] == SA_EMAIL
    assert info["scope"] == GMAIL_SCOPE


def test_service_account_token_is_cached_until_margin_before_expiry(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock
) -> None:
    oauth_server.admin("config", access_ttl="600")
    source = sa_source(key_file, clock, margin=dt.timedelta(seconds=60))
    first = source.access_token()
    clock.advance(600 - 61)
    assert source.access_token() == first
    assert jwt_grants(oauth_server) == 1
    clock.advance(1)  # now exactly expires_in - margin
    assert source.access_token() != first
    assert jwt_grants(oauth_server) == 2


def test_service_account_invalidate_forces_a_new_grant(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock
) -> None:
    source = sa_source(key_file, clock)
    first = source.access_token()
    source.invalidate()
    assert source.access_token() != first
    assert jwt_grants(oauth_server) == 2


def test_service_account_eight_threads_share_one_grant(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock
) -> None:
    source = sa_source(key_file, clock)
    barrier = threading.Barrier(8)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(source.access_token())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 8
    assert len(set(results)) == 1
    assert jwt_grants(oauth_server) == 1


def test_service_account_reports_each_refresh_to_metrics(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock
) -> None:
    outcomes: list[bool] = []
    source = sa_source(key_file, clock, on_refresh=outcomes.append)
    source.access_token()
    source.access_token()
    key_file.unlink()
    source.invalidate()
    with pytest.raises(AccountFailed):
        source.access_token()
    assert outcomes == [True, False]


def test_user_outside_the_workspace_needs_an_admin_grant(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock
) -> None:
    """Google's unauthorized_client (the person left the Workspace, or the admin did not grant the client): an
    account failure, tried again each round so that it resumes by itself once access returns, with what the
    Workspace admin must do. No mailbox owner could reconnect it, so it is not parked as needs_reauth."""
    client_id = json.loads(key_file.read_text())["client_id"]
    source = sa_source(key_file, clock, subject="mallory@elsewhere.test")
    with pytest.raises(AccountFailed) as info:
        source.access_token()
    message = str(info.value)
    assert message.startswith(
        f"domain-wide delegation is not granted for service account {SA_EMAIL} (client id {client_id}) and scope "
        f"{GMAIL_SCOPE} in the Google Workspace admin console, or mallory@elsewhere.test is not in that Workspace"
    )
    assert "unauthorized_client" in message
    assert_no_secret(info.value, private_key_texts(key_file))


def test_scope_not_granted_to_the_service_account_needs_an_admin_grant(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock
) -> None:
    readonly = "https://www.googleapis.com/auth/gmail.readonly"
    with pytest.raises(AccountFailed, match=f"domain-wide delegation is not granted .* and scope {readonly} in"):
        sa_source(key_file, clock, scopes=[readonly]).access_token()


def test_deleted_service_account_key_names_the_key_file(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock, tmp_path: Path
) -> None:
    """A key the server does not know (deleted in the Cloud console): invalid_grant "Invalid JWT Signature."."""
    info = json.loads(key_file.read_text())
    stale = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = stale.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    stale_file = tmp_path / "stale.json"
    stale_file.write_text(json.dumps(info))
    with pytest.raises(AccountFailed) as caught:
        sa_source(stale_file, clock).access_token()
    message = str(caught.value)
    assert message.startswith(
        f"service account key {info['private_key_id']} in {stale_file} was deleted or is wrong: "
        f"create a new key for {SA_EMAIL} and replace the file"
    )
    assert "invalid_grant: Invalid JWT Signature." in message
    assert_no_secret(caught.value, private_key_texts(stale_file))


def test_replaced_key_file_is_used_from_the_next_refresh(
    oauth_server: OAuthServer, key_file: Path, clock: FakeClock, tmp_path: Path
) -> None:
    """The key file is read at each refresh: fixing it on disk heals the account without a restart."""
    path = tmp_path / "rotating.json"
    info = json.loads(key_file.read_text())
    stale = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = stale.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(json.dumps(info))
    source = sa_source(path, clock)
    with pytest.raises(AccountFailed):
        source.access_token()
    make_service_account(oauth_server, client_email=SA_EMAIL, domains=[DOMAIN], path=path)
    assert source.access_token()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read service account key file {path}: No such file or directory"),
        ("{not json", "service account key file {path} is not JSON (line 1 column 2)"),
        ("[]", "service account key file {path} is not a JSON object"),
        ('{"type": "service_account"}', "service account key file {path} lacks client_email, token_uri, private_key"),
    ],
    ids=["missing", "not-json", "not-an-object", "fields-missing"],
)
def test_unusable_key_file_is_an_account_failure_naming_the_file(
    tmp_path: Path, clock: FakeClock, content: str | None, problem: str
) -> None:
    """An ops problem: not RetryLater (waiting does not fix it), not ReauthRequired (the user cannot)."""
    path = tmp_path / "sa.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AccountFailed) as info:
        sa_source(path, clock).access_token()
    assert str(info.value) == problem.format(path=path)


def test_corrupt_private_key_is_an_account_failure_that_does_not_show_the_key(
    key_file: Path, clock: FakeClock, tmp_path: Path
) -> None:
    info = json.loads(key_file.read_text())
    pem_lines = info["private_key"].splitlines()
    info["private_key"] = "\n".join(pem_lines[:3] + pem_lines[-1:])  # truncated: no longer an RSA key
    path = tmp_path / "corrupt.json"
    path.write_text(json.dumps(info))
    with pytest.raises(AccountFailed) as caught:
        sa_source(path, clock).access_token()
    assert str(caught.value) == f"service account key file {path} holds no usable RSA private_key"
    assert_no_secret(caught.value, [*private_key_texts(key_file), info["private_key"]])


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_service_account_endpoint_busy_is_retry_later_at_once(
    key_file: Path, clock: FakeClock, tmp_path: Path, stub: StubEndpoint, status: int
) -> None:
    """One request, no google-auth backoff (502 included, which google-auth would not retry)."""
    stub.status = status
    source = sa_source(with_token_uri(key_file, stub.url, tmp_path / "stub.json"), clock)
    started = time.monotonic()
    with pytest.raises(RetryLater, match=f"token endpoint 127.0.0.1 answered HTTP {status}; try again later"):
        source.access_token()
    assert time.monotonic() - started < 0.9
    assert len(stub.requests) == 1
    assert "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in stub.requests[0]


def test_service_account_unreachable_endpoint_is_retry_later(
    key_file: Path, clock: FakeClock, tmp_path: Path, closed_port_url: str
) -> None:
    source = sa_source(with_token_uri(key_file, closed_port_url, tmp_path / "closed.json"), clock)
    with pytest.raises(RetryLater, match=r"cannot reach token endpoint 127\.0\.0\.1: ConnectionError"):
        source.access_token()


def test_echoed_assertion_is_scrubbed(key_file: Path, clock: FakeClock, tmp_path: Path, stub: StubEndpoint) -> None:
    """A server that quotes the request (the signed assertion) back: the message keeps the text, not the JWT."""
    stub.status, stub.body, stub.echo = 400, "invalid_grant", True
    source = sa_source(with_token_uri(key_file, stub.url, tmp_path / "stub.json"), clock)
    with pytest.raises(AccountFailed) as info:
        source.access_token()
    assert "assertion=eyJ" in stub.requests[0]  # the premise: the assertion was in what came back
    assert "invalid_grant: bad request: " in str(info.value)
    assert_no_secret(info.value, private_key_texts(key_file))


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (404, b"<html>Not Found</html>", "text/html"),
        (200, {"token_type": "Bearer"}, "application/json"),
    ],
    ids=["html-404", "200-without-token"],
)
def test_service_account_answer_without_oauth_error_is_an_account_failure(
    key_file: Path, clock: FakeClock, tmp_path: Path, stub: StubEndpoint, status: int, body: object, content_type: str
) -> None:
    """Not a refusal of the grant (wrong token_uri, a proxy): reconnecting would not help."""
    stub.status, stub.body, stub.content_type = status, body, content_type
    source = sa_source(with_token_uri(key_file, stub.url, tmp_path / "stub.json"), clock)
    with pytest.raises(AccountFailed, match=f"token endpoint 127.0.0.1 gave no access token .* for {SA_EMAIL}"):
        source.access_token()


def test_service_account_repr_shows_no_secret(key_file: Path, clock: FakeClock) -> None:
    source = sa_source(key_file, clock)
    token = source.access_token()
    text = repr(source)
    assert str(key_file) in text
    assert USER in text
    for secret in [token, *private_key_texts(key_file)]:
        assert secret not in text


# --- Microsoft 365 app-only (client credentials) --------------------------------------------------------------------


def app_source(
    server_url: str, clock: FakeClock, oauth: OAuthServer | None = None, **kwargs: object
) -> ClientCredentialsTokenSource:
    params: dict[str, object] = {
        "token_uri": server_url,
        "client_id": oauth.client_id if oauth else "app-client-id",
        "client_secret": oauth.client_secret if oauth else "app-client-secret-value",
        "clock": clock,
    }
    params.update(kwargs)
    return ClientCredentialsTokenSource(**params)  # type: ignore[arg-type]


def app_grants(server: OAuthServer) -> int:
    return int(server.stats().get("grant:client_credentials", 0))


def test_app_only_token(oauth_server: OAuthServer, clock: FakeClock) -> None:
    source: TokenSource = app_source(oauth_server.token_uri, clock, oauth_server)
    token = source.access_token()
    info = oauth_server.introspect(token)
    assert info["active"] is True
    assert info["app_only"] is True
    assert info["scope"] == OUTLOOK_APP_ONLY_SCOPE
    assert app_grants(oauth_server) == 1


def test_app_only_token_is_cached_until_margin_before_expiry(oauth_server: OAuthServer, clock: FakeClock) -> None:
    oauth_server.admin("config", access_ttl="300")
    source = app_source(oauth_server.token_uri, clock, oauth_server, margin=dt.timedelta(seconds=60))
    first = source.access_token()
    clock.advance(300 - 61)
    assert source.access_token() == first
    assert app_grants(oauth_server) == 1
    clock.advance(1)
    assert source.access_token() != first
    assert app_grants(oauth_server) == 2


def test_app_only_invalidate_forces_a_new_grant(oauth_server: OAuthServer, clock: FakeClock) -> None:
    outcomes: list[bool] = []
    source = app_source(oauth_server.token_uri, clock, oauth_server, on_refresh=outcomes.append)
    first = source.access_token()
    source.invalidate()
    assert source.access_token() != first
    assert app_grants(oauth_server) == 2
    assert outcomes == [True, True]


def test_app_without_service_principal_needs_admin_consent(oauth_server: OAuthServer, clock: FakeClock) -> None:
    """Microsoft's AADSTS7000229: an account failure (tried again each round), and the text says what to grant."""
    oauth_server.admin("config", app_only="0")
    outcomes: list[bool] = []
    source = app_source(oauth_server.token_uri, clock, oauth_server, on_refresh=outcomes.append)
    with pytest.raises(AccountFailed) as info:
        source.access_token()
    message = str(info.value)
    assert message.startswith(f"app {oauth_server.client_id} may not get tokens for {OUTLOOK_APP_ONLY_SCOPE}: ")
    assert APP_ONLY_GRANTS in message
    assert "unauthorized_client: AADSTS7000229: The client application is missing service principal" in message
    assert outcomes == [False]


def test_wrong_scope_needs_admin_consent(oauth_server: OAuthServer, clock: FakeClock) -> None:
    scope = "https://graph.microsoft.com/.default"
    source = app_source(oauth_server.token_uri, clock, oauth_server, scope=scope)
    with pytest.raises(AccountFailed) as info:
        source.access_token()
    assert str(info.value).startswith(f"app {oauth_server.client_id} may not get tokens for {scope}: ")
    assert "invalid_scope: AADSTS70011" in str(info.value)


def test_wrong_client_secret_needs_a_new_secret_without_showing_it(oauth_server: OAuthServer, clock: FakeClock) -> None:
    wrong = "wrong-secret-value-123"
    source = app_source(oauth_server.token_uri, clock, oauth_server, client_secret=wrong)
    with pytest.raises(AccountFailed) as info:
        source.access_token()
    message = str(info.value)
    assert message.startswith(f"app {oauth_server.client_id} was refused: its client secret is wrong or expired")
    assert "invalid_client" in message
    assert APP_ONLY_GRANTS in message
    assert_no_secret(info.value, [wrong, oauth_server.client_secret])
    assert wrong not in repr(source)


def test_echoed_client_secret_is_scrubbed(clock: FakeClock, stub: StubEndpoint) -> None:
    stub.status, stub.body, stub.echo = 401, "invalid_client", True
    source = app_source(stub.url, clock)
    with pytest.raises(AccountFailed) as info:
        source.access_token()
    assert "client_secret=app-client-secret-value" in stub.requests[0]  # the premise: it was echoed back
    assert "invalid_client: bad request: " in str(info.value)
    assert "client_secret=***" in str(info.value)
    assert_no_secret(info.value, ["app-client-secret-value"])


def test_app_only_request_is_the_client_credentials_grant(clock: FakeClock, stub: StubEndpoint) -> None:
    stub.status, stub.body = 200, {"access_token": "app-token", "expires_in": 3599}
    assert app_source(stub.url, clock).access_token() == "app-token"
    assert parse_qs(stub.requests[0]) == {
        "grant_type": ["client_credentials"],
        "client_id": ["app-client-id"],
        "client_secret": ["app-client-secret-value"],
        "scope": [OUTLOOK_APP_ONLY_SCOPE],
    }


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [("3599", 3599), (None, ASSUMED_LIFETIME.total_seconds())],
    ids=["string", "missing"],
)
def test_app_only_lifetime_from_expires_in(
    clock: FakeClock, stub: StubEndpoint, expires_in: str | None, lifetime: float
) -> None:
    stub.status, stub.body = 200, {"access_token": "app-token", **({"expires_in": expires_in} if expires_in else {})}
    source = app_source(stub.url, clock, margin=dt.timedelta(seconds=60))
    source.access_token()
    clock.advance(lifetime - 61)
    source.access_token()
    assert len(stub.requests) == 1
    clock.advance(1)
    source.access_token()
    assert len(stub.requests) == 2


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_app_only_endpoint_busy_is_retry_later_at_once(clock: FakeClock, stub: StubEndpoint, status: int) -> None:
    stub.status = status
    source = app_source(stub.url, clock)
    with pytest.raises(RetryLater, match=f"token endpoint 127.0.0.1 answered HTTP {status}; try again later"):
        source.access_token()
    assert len(stub.requests) == 1
    stub.status, stub.body = 200, {"access_token": "app-token", "expires_in": 3599}
    assert source.access_token() == "app-token"


def test_app_only_temporarily_unavailable_error_is_retry_later(clock: FakeClock, stub: StubEndpoint) -> None:
    stub.status, stub.body = 400, {"error": "temporarily_unavailable", "error_description": "try later"}
    with pytest.raises(RetryLater, match="failed temporarily"):
        app_source(stub.url, clock).access_token()


def test_app_only_unreachable_endpoint_is_retry_later(clock: FakeClock, closed_port_url: str) -> None:
    with pytest.raises(RetryLater, match=r"cannot reach token endpoint 127\.0\.0\.1: ConnectionError"):
        app_source(closed_port_url, clock).access_token()


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [
        (404, b"<html>Not Found</html>", "answered HTTP 404 without an OAuth error"),
        (200, {"token_type": "Bearer"}, "answered 200 without an access_token"),
        (200, b"<html>proxy login</html>", "answered 200 without an access_token"),
    ],
    ids=["html-404", "200-without-token", "200-html"],
)
def test_app_only_answer_without_oauth_error_is_an_account_failure(
    clock: FakeClock, stub: StubEndpoint, status: int, body: object, problem: str
) -> None:
    stub.status, stub.body = status, body
    with pytest.raises(AccountFailed) as info:
        app_source(stub.url, clock).access_token()
    assert str(info.value) == f"token endpoint {stub.url} {problem}"


def test_every_error_is_an_inboxd_error(clock: FakeClock, stub: StubEndpoint) -> None:
    """Nothing from requests or google-auth leaks past the adapter."""
    for status, body in ((418, b"teapot"), (400, {"error": "invalid_request"}), (503, b"")):
        stub.status, stub.body = status, body
        with pytest.raises(InboxdError):
            app_source(stub.url, clock).access_token()
