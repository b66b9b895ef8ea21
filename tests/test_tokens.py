"""OAuthRefreshTokenSource against a real token endpoint on loopback speaking Google's wire format.

Nothing in google-auth is mocked: every refresh is an HTTP POST over a socket to the server below.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inboxd.clock import FakeClock
from inboxd.errors import AccountFailed, ReauthRequired, RetryLater
from inboxd.tokens import ASSUMED_LIFETIME, OAuthRefreshTokenSource, TokenSource

CLIENT_ID = "inboxd-test-client"
CLIENT_SECRET = "s3cr3t-client-value"
REFRESH_TOKEN = "1//refresh-token-VALUE-abc"


@dataclass
class TokenServer:
    """State of the fake authorization server; tests flip `mode` and read `calls`."""

    url: str = ""
    # ok | unavailable | bad_gateway | invalid_client | unauthorized_client | consent_required | html_404 | no_error
    mode: str = "ok"
    expires_in: int | None = 3600
    rotate: bool = False
    delay: float = 0.0
    calls: int = 0
    issued: int = 0
    refresh_tokens: set[str] = field(default_factory=lambda: {REFRESH_TOKEN})
    seen_refresh_tokens: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, form: dict[str, str]) -> tuple[int, dict[str, object] | str]:
        with self.lock:
            self.calls += 1
            self.seen_refresh_tokens.append(form.get("refresh_token", ""))
        if self.delay:
            time.sleep(self.delay)
        refusal = self.refusal(form)
        if refusal is not None:
            return refusal
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
        if form.get("grant_type") != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        with self.lock:
            if form.get("refresh_token") not in self.refresh_tokens:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "Token has been expired or revoked.",
                }
            self.issued += 1
            body: dict[str, object] = {"access_token": f"ya29.access-{self.issued}", "token_type": "Bearer"}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            if self.rotate:
                new = f"rotated-refresh-{self.issued}"
                self.refresh_tokens = {new}
                body["refresh_token"] = new
        return 200, body

    def refusal(self, form: dict[str, str]) -> tuple[int, dict[str, object] | str] | None:
        """The canned answer of a failing ``mode``; None for "ok"."""
        # descriptions and pages echoing what was sent: the scrubbing must hold
        echoed = f"Client {CLIENT_SECRET} may not use the grant for {form.get('refresh_token')}."
        answers: dict[str, tuple[int, dict[str, object] | str]] = {
            "unavailable": (503, {"error": "temporarily_unavailable"}),
            "bad_gateway": (502, {}),
            "invalid_client": (401, {"error": "invalid_client", "error_description": "The OAuth client was deleted."}),
            "unauthorized_client": (400, {"error": "unauthorized_client", "error_description": echoed}),
            "consent_required": (400, {"error": "consent_required", "error_description": "The user must consent."}),
            # a mistyped token_uri, or a proxy's page
            "html_404": (404, f"<html><body><h1>Not Found</h1><p>{echoed}</p></body></html>"),
            "no_error": (400, {"message": "bad request"}),
        }
        return answers.get(self.mode)


def _handler(state: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length).decode()
            form = {k: v[0] for k, v in parse_qs(raw).items()}
            status, body = state.answer(form)
            html = isinstance(body, str)
            payload = body.encode() if html else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if html else "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def _serve(state: TokenServer, context: ssl.SSLContext | None = None) -> Iterator[TokenServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    scheme = "http"
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    state.url = f"{scheme}://127.0.0.1:{server.server_address[1]}/token"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    yield from _serve(TokenServer())


@pytest.fixture
def clock() -> FakeClock:
    # Far from the machine's wall time on purpose: expiry must follow the injected clock.
    return FakeClock(dt.datetime(2001, 2, 3, 4, 5, 6, tzinfo=dt.UTC))


def make_source(url: str, clock: FakeClock, **kwargs: object) -> OAuthRefreshTokenSource:
    params: dict[str, object] = {
        "refresh_token": REFRESH_TOKEN,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_uri": url,
        "clock": clock,
    }
    params.update(kwargs)
    return OAuthRefreshTokenSource(**params)  # type: ignore[arg-type]


def test_is_a_token_source(token_server: TokenServer, clock: FakeClock) -> None:
    source: TokenSource = make_source(token_server.url, clock)
    assert source.access_token() == "ya29.access-1"


def test_token_is_cached_until_margin_before_expiry(token_server: TokenServer, clock: FakeClock) -> None:
    source = make_source(token_server.url, clock, margin=dt.timedelta(seconds=60))
    first = source.access_token()
    clock.advance(3600 - 61)
    assert source.access_token() == first
    assert token_server.calls == 1
    clock.advance(1)  # now exactly expires_in - margin
    assert source.access_token() != first
    assert token_server.calls == 2


def test_many_calls_refresh_once_per_expiry(token_server: TokenServer, clock: FakeClock) -> None:
    source = make_source(token_server.url, clock)
    tokens = set()
    for _ in range(3):
        for _ in range(50):
            tokens.add(source.access_token())
            clock.advance(10)
        clock.advance(3600)
    assert token_server.calls == 3
    assert len(tokens) == 3


def test_eight_threads_at_once_share_one_refresh(token_server: TokenServer, clock: FakeClock) -> None:
    token_server.delay = 0.2  # keep the first refresh in flight while the other threads arrive
    source = make_source(token_server.url, clock)
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
    assert results == ["ya29.access-1"] * 8
    assert token_server.calls == 1


def test_invalidate_forces_a_refresh(token_server: TokenServer, clock: FakeClock) -> None:
    source = make_source(token_server.url, clock)
    first = source.access_token()
    source.invalidate()
    second = source.access_token()
    assert (first, second) == ("ya29.access-1", "ya29.access-2")
    assert source.access_token() == second
    assert token_server.calls == 2


def test_short_lived_token_is_reused_for_half_its_life(token_server: TokenServer, clock: FakeClock) -> None:
    """A lifetime shorter than the margin must not mean a refresh on every call."""
    token_server.expires_in = 30
    source = make_source(token_server.url, clock, margin=dt.timedelta(seconds=60))
    source.access_token()
    clock.advance(14)
    source.access_token()
    assert token_server.calls == 1
    clock.advance(1)
    source.access_token()
    assert token_server.calls == 2


def test_missing_expires_in_assumes_a_short_lifetime(token_server: TokenServer, clock: FakeClock) -> None:
    token_server.expires_in = None
    source = make_source(token_server.url, clock, margin=dt.timedelta(seconds=60))
    source.access_token()
    clock.advance(ASSUMED_LIFETIME.total_seconds() - 61)
    source.access_token()
    assert token_server.calls == 1
    clock.advance(1)
    source.access_token()
    assert token_server.calls == 2


def test_revoked_refresh_token_needs_reauth_without_leaking_secrets(
    token_server: TokenServer, clock: FakeClock
) -> None:
    token_server.refresh_tokens = set()
    source = make_source(token_server.url, clock)
    with pytest.raises(ReauthRequired) as info:
        source.access_token()
    message = str(info.value)
    assert message == (
        "access to the mailbox was revoked or has expired; connect it again "
        "(127.0.0.1: invalid_grant: Token has been expired or revoked.)"
    )
    for secret in (REFRESH_TOKEN, CLIENT_SECRET):
        assert secret not in message
        assert secret not in repr(info.value)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("invalid_client", r"127\.0\.0\.1 refused this provider's OAuth client \(invalid_client: The OAuth client"),
        ("unauthorized_client", r"127\.0\.0\.1 refused this provider's OAuth client \(unauthorized_client: "),
        ("html_404", r"127\.0\.0\.1 gave no access token and no OAuth error; check token_uri: .*Not Found"),
        ("no_error", r"127\.0\.0\.1 gave no access token and no OAuth error; check token_uri: .*bad request"),
    ],
    ids=["invalid_client", "unauthorized_client", "html_404", "no_error"],
)
def test_a_refusal_of_the_client_or_the_endpoint_is_an_account_failure(
    mode: str, expected: str, token_server: TokenServer, clock: FakeClock
) -> None:
    """The admin's OAuth client or token_uri is wrong, not the mailbox owner's grant: AccountFailed (state "error",
    tried again each cycle), not ReauthRequired, which would park the account until its owner reconnected it even
    after the admin fixed the config. The texts carry the server's answer with every secret scrubbed."""
    token_server.mode = mode
    source = make_source(token_server.url, clock)
    with pytest.raises(AccountFailed, match=expected) as info:
        source.access_token()
    assert not isinstance(info.value, ReauthRequired)
    for secret in (REFRESH_TOKEN, CLIENT_SECRET):
        assert secret not in str(info.value)
    token_server.mode = "ok"  # the admin fixed it: the same source recovers, nobody reconnects
    assert source.access_token() == "ya29.access-1"


def test_consent_required_needs_reauth(token_server: TokenServer, clock: FakeClock) -> None:
    """The provider wants the person to sign in or consent again: only they can, so the account waits for them."""
    token_server.mode = "consent_required"
    with pytest.raises(
        ReauthRequired, match=r"connect it again \(127\.0\.0\.1: consent_required: The user must consent"
    ):
        make_source(token_server.url, clock).access_token()


def test_503_is_retry_later_at_once(token_server: TokenServer, clock: FakeClock) -> None:
    """google-auth's own sleeping backoff is bypassed: one request, then the scheduler decides."""
    token_server.mode = "unavailable"
    source = make_source(token_server.url, clock)
    started = time.monotonic()
    with pytest.raises(RetryLater, match="503"):
        source.access_token()
    assert time.monotonic() - started < 0.9
    assert token_server.calls == 1
    token_server.mode = "ok"
    assert source.access_token() == "ya29.access-1"


def test_502_from_a_proxy_is_retry_later(token_server: TokenServer, clock: FakeClock) -> None:
    """Not in google-auth's retryable list: without our own rule a load balancer's 502 would park the account."""
    token_server.mode = "bad_gateway"
    with pytest.raises(RetryLater, match="502"):
        make_source(token_server.url, clock).access_token()


def test_connection_refused_is_retry_later(clock: FakeClock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = make_source(f"http://127.0.0.1:{port}/token", clock)
    with pytest.raises(RetryLater, match=r"cannot reach token endpoint 127\.0\.0\.1: ConnectionError"):
        source.access_token()


def test_rotated_refresh_token_is_reported_and_used(token_server: TokenServer, clock: FakeClock) -> None:
    token_server.rotate = True
    rotated: list[str] = []
    source = make_source(token_server.url, clock, on_rotated_refresh_token=rotated.append)
    source.access_token()
    assert rotated == ["rotated-refresh-1"]
    source.invalidate()
    source.access_token()
    assert rotated == ["rotated-refresh-1", "rotated-refresh-2"]
    assert token_server.seen_refresh_tokens == [REFRESH_TOKEN, "rotated-refresh-1"]


def test_unchanged_refresh_token_is_not_reported(token_server: TokenServer, clock: FakeClock) -> None:
    rotated: list[str] = []
    source = make_source(token_server.url, clock, on_rotated_refresh_token=rotated.append)
    source.access_token()
    assert rotated == []


def test_repr_shows_no_secret(token_server: TokenServer, clock: FakeClock) -> None:
    source = make_source(token_server.url, clock)
    source.access_token()
    text = repr(source)
    assert token_server.url in text
    for secret in (REFRESH_TOKEN, CLIENT_SECRET, "ya29.access-1"):
        assert secret not in text


# --- TLS with a private CA (ca_file) --------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inboxd test token server")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture
def tls_token_server(tmp_path: Path) -> Iterator[tuple[TokenServer, Path]]:
    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    for state in _serve(TokenServer(), context):
        yield state, cert_file


def test_ca_file_verifies_a_private_token_endpoint(
    tls_token_server: tuple[TokenServer, Path], clock: FakeClock
) -> None:
    server, ca_file = tls_token_server
    assert make_source(server.url, clock, ca_file=ca_file).access_token() == "ya29.access-1"


def test_untrusted_certificate_is_retry_later(tls_token_server: tuple[TokenServer, Path], clock: FakeClock) -> None:
    server, _ = tls_token_server
    with pytest.raises(RetryLater, match="cannot reach token endpoint"):
        make_source(server.url, clock).access_token()
    assert server.calls == 0
