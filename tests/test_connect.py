"""Connecting mailboxes with the owner's consent, against the test OAuth server's consent page: `inboxd connect`
(loopback redirect) end to end with Dovecot, and the HR app's GET /connect/start -> /oauth/callback -> return_to."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
import sqlalchemy as sa
import structlog
from cryptography.fernet import Fernet

from harness import MailStack, make_message, wait_for
from harness.config import write_stack_config
from harness.oauth import OAuthServer, approve
from inboxd import http as http_module
from inboxd.clock import FakeClock, SystemClock
from inboxd.config import Config, parse_config
from inboxd.connect import ConnectEndpoints, sign_start
from inboxd.connect_state import ConnectState, StateCodec
from inboxd.crypto import SecretBox
from inboxd.disconnect import disconnect
from inboxd.http import Health, HrEndpoints, OpsServer
from inboxd.metrics import Metrics
from inboxd.store import Credential, Store

INBOXD = Path(sys.executable).parent / "inboxd"
SCOPES = '["https://mail.google.com/", "openid", "email"]'
HR = "https://hr.example.com"


def consent_keys(oauth_url: str) -> str:
    return f'auth_uri = "{oauth_url}/authorize"\nrevoke_uri = "{oauth_url}/revoke"\nscopes = {SCOPES}\n'


def inboxd(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INBOXD), "--config", str(config), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class ConnectCommand:
    """`inboxd connect` running in the background, as an admin runs it in a terminal."""

    def __init__(self, config: Path, email: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [str(INBOXD), "--config", str(config), "connect", email, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.printed: list[str] = []
        self.url = ""
        for line in self.proc.stdout:
            self.printed.append(line)
            if "/authorize?" in line:
                self.url = line.strip()
                break
        assert self.url, f"no consent URL printed: {self.printed!r}"

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, "".join(self.printed) + out, err


def follow_to_loopback(location: str) -> requests.Response:
    assert location.startswith("http://127.0.0.1:"), location
    return requests.get(location, timeout=10, allow_redirects=False)


# -- `inboxd connect` ------------------------------------------------------------------------------------------


@pytest.mark.mailstack
def test_connect_command_stores_the_grant_and_the_mailbox_syncs(
    db_url: str, tmp_path: Path, mailstack: MailStack
) -> None:
    config = write_stack_config(tmp_path, db_url, mailstack, extra=consent_keys(mailstack.oauth_url))
    assert inboxd(config, "secrets", "init").returncode == 0
    user = mailstack.new_user("connect")
    command = ConnectCommand(config, user, "--provider", "local", "--hr-user-ref", "rec-42")
    assert f"sign in as {user}" in "".join(command.printed)
    answer = follow_to_loopback(approve(command.url))
    assert answer.status_code == 200 and "close this tab" in answer.text
    code, out, err = command.finish()
    assert code == 0, err
    assert f"account {user}" in out and "connected via local" in out

    mailstack.deliver(user, make_message("Cand <cand@example.org>", user, "after consent", "hello"))
    run = inboxd(config, "run", "--once")
    assert run.returncode == 0, run.stdout + run.stderr
    status = inboxd(config, "status", "--json")
    assert (
        '"messages": 1' in status.stdout
        and '"hr_user_ref": "rec-42"' in inboxd(config, "accounts", "list", "--json").stdout
    )


@pytest.fixture
def private_config(tmp_path: Path, oauth_server: OAuthServer) -> Path:
    """A provider on a private OAuth server (no mail server needed), SQLite, key created."""
    path = tmp_path / "inboxd.toml"
    path.write_text(f"""
state_dir = "{tmp_path / "state"}"
[secrets]
key_file = "{tmp_path / "secret.key"}"
[providers.local]
kind = "imap"
imap_host = "127.0.0.1"
imap_tls = "plain"
auth = "oauth2"
token_uri = "{oauth_server.token_uri}"
client_id = "{oauth_server.client_id}"
client_secret = "{oauth_server.client_secret}"
timeout = 5
{consent_keys(oauth_server.url)}
""")
    assert inboxd(path, "db", "upgrade").returncode == 0
    assert inboxd(path, "secrets", "init").returncode == 0
    return path


def test_connect_command_refuses_another_signed_in_account_and_revokes_its_grant(
    private_config: Path, oauth_server: OAuthServer
) -> None:
    oauth_server.admin("config", consent_user="someone.else@example.test")
    command = ConnectCommand(private_config, "anna@example.test")  # the only OAuth provider: no --provider
    follow_to_loopback(approve(command.url))
    code, _out, err = command.finish()
    assert code == 1
    assert "signed in as someone.else@example.test but connecting anna@example.test" in err
    assert oauth_server.stats()["revoke"] == 1  # the unwanted grant does not linger at the provider
    assert inboxd(private_config, "accounts", "list", "--json").stdout.strip() == "[]"


def test_connect_command_reports_denied_consent(private_config: Path) -> None:
    command = ConnectCommand(private_config, "anna@example.test")
    follow_to_loopback(approve(command.url, decision="deny"))
    code, _out, err = command.finish()
    assert code == 1
    assert "access was not granted" in err


def test_connect_command_gives_up_after_its_timeout(private_config: Path) -> None:
    command = ConnectCommand(private_config, "anna@example.test", "--timeout", "1")
    code, _out, err = command.finish()
    assert code == 1
    assert "no answer from the provider within 1 s" in err


def test_connect_command_rejects_password_providers(tmp_path: Path) -> None:
    path = tmp_path / "inboxd.toml"
    path.write_text(f'state_dir = "{tmp_path}"\n[providers.plain]\nkind = "imap"\nimap_host = "imap.example.com"\n')
    assert inboxd(path, "db", "upgrade").returncode == 0
    assert inboxd(path, "secrets", "init").returncode == 0
    result = inboxd(path, "connect", "a@example.com", "--provider", "plain")
    assert result.returncode == 2
    assert "uses password authentication" in result.stderr


def test_connect_links_of_a_running_daemon_follow_a_key_rotation_and_prune(
    private_config: Path, tmp_path: Path
) -> None:
    """`secrets rotate` then `secrets prune` while `inboxd run` serves the connect endpoints: a node started after
    them derives its state key from the new key alone. The running daemon derived its key once at start, so a flow
    one node began could not end on the other ("this connect link has expired"); it now derives it from the key
    file as it is at each seal and open."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with private_config.open("a") as config:
        config.write(f'[http]\nlisten = "127.0.0.1:{port}"\nreturn_to_origins = ["{HR}"]\n')
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "inboxd.log").open("w") as log:
        daemon = subprocess.Popen([str(INBOXD), "--config", str(private_config), "run"], stdout=log, stderr=log)
    try:
        wait_for(lambda: _answers(f"{base}/healthz"), timeout=20, what="inboxd's HTTP listener")
        for action in ("rotate", "prune"):
            result = inboxd(private_config, "secrets", action)
            assert result.returncode == 0, result.stderr
        # the other node, started after the prune
        other = StateCodec(
            SecretBox.from_key_file(tmp_path / "secret.key").derived("inboxd connect state"), clock=SystemClock()
        )

        begun_there = other.seal(ConnectState("anna@example.test", "local", f"{HR}/people/7", "v" * 43))
        ended_here = requests.get(
            f"{base}/oauth/callback?" + urlencode({"state": begun_there, "error": "access_denied"}),
            timeout=10,
            allow_redirects=False,
        )
        assert ended_here.status_code == 302, ended_here.text
        assert query(ended_here.headers["Location"])["inboxd_email"] == "anna@example.test"

        start = f"{base}/connect/start?" + urlencode({"email": "bob@example.test", "return_to": HR})
        begun_here = requests.get(start, timeout=10, allow_redirects=False)
        assert begun_here.status_code == 302, begun_here.text
        assert other.open(query(begun_here.headers["Location"])["state"]).email == "bob@example.test"
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=20) == 0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


# -- the HR app's flow over HTTP ---------------------------------------------------------------------------------


@dataclass
class Listener:
    base: str
    store: Store
    oauth: OAuthServer
    clock: FakeClock
    holder: list[Config]

    def start_url(self, **params: str) -> str:
        return f"{self.base}/connect/start?{urlencode(params)}"

    def get(self, url: str) -> requests.Response:
        return requests.get(url, timeout=10, allow_redirects=False)

    def use_api_token(self, token: str) -> None:
        self.holder[0] = replace(self.holder[0], http=replace(self.holder[0].http, api_token=token))


def listener_config(tmp_path: Path, oauth: OAuthServer, public_url: str) -> Config:
    text = f"""
[http]
listen = "127.0.0.1:0"
public_url = "{public_url}"
return_to_origins = ["{HR}"]
[providers.gmail]
kind = "gmail"
auth_uri = "{oauth.authorize_uri}"
token_uri = "{oauth.token_uri}"
revoke_uri = "{oauth.revoke_uri}"
client_id = "{oauth.client_id}"
client_secret = "{oauth.client_secret}"
timeout = 5
"""
    return parse_config(text, path=tmp_path / "inboxd.toml", env={})


@pytest.fixture
def listener(store: Store, oauth_server: OAuthServer, fake_clock: FakeClock, tmp_path: Path) -> Iterator[Listener]:
    holder: list[Config] = []
    codec = StateCodec(Fernet(Fernet.generate_key()), clock=fake_clock)
    hr = HrEndpoints(
        connect=ConnectEndpoints(lambda: holder[0], store, codec, clock=fake_clock),
        disconnect=lambda email, purge: disconnect(holder[0], store, None, email, purge=purge),
        api_token=lambda: holder[0].http.api_token,
    )
    server = OpsServer("127.0.0.1", 0, metrics=Metrics(), health=lambda: Health(True), hr=hr).start()
    base = f"http://127.0.0.1:{server.port}"
    holder.append(listener_config(tmp_path, oauth_server, base))
    try:
        yield Listener(base, store, oauth_server, fake_clock, holder)
    finally:
        server.close()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def run_flow(listener: Listener, *, decision: str = "allow", **params: str) -> str:
    """/connect/start -> consent page -> /oauth/callback; returns where inboxd sends the browser at the end."""
    start = listener.get(listener.start_url(**params))
    assert start.status_code == 302, start.text
    callback_url = approve(start.headers["Location"], decision=decision)
    assert callback_url.startswith(f"{listener.base}/oauth/callback?"), callback_url
    callback = listener.get(callback_url)
    assert callback.status_code == 302, callback.text
    assert callback.headers["Cache-Control"] == "no-store"
    assert callback.headers["Referrer-Policy"] == "no-referrer"
    return callback.headers["Location"]


def test_http_connect_creates_the_account_and_returns_to_the_hr_app(listener: Listener) -> None:
    back = run_flow(listener, email="Anna@Example.test", return_to=f"{HR}/people/7?tab=mail", hr_user_ref="rec-7")
    assert back.startswith(f"{HR}/people/7?")
    assert query(back) == {"tab": "mail", "inboxd_email": "anna@example.test", "inboxd_status": "connected"}
    account = listener.store.account("anna@example.test")
    assert account is not None
    assert (account.provider, account.state, account.enabled, account.hr_user_ref) == ("gmail", "active", True, "rec-7")
    stored = listener.store.credential(account.id)
    assert stored.kind == "oauth2_refresh"
    # the stored refresh token is live at the provider
    response = requests.post(
        listener.oauth.token_uri,
        data={
            "grant_type": "refresh_token",
            "refresh_token": stored.secret,
            "client_id": listener.oauth.client_id,
            "client_secret": listener.oauth.client_secret,
        },
        timeout=10,
    )
    assert response.status_code == 200
    assert listener.oauth.stats()["grant:authorization_code"] == 1


def test_http_connect_reconnects_an_account_that_needs_reauth(listener: Listener) -> None:
    account = listener.store.add_account("anna@example.test", "gmail", Credential("oauth2_refresh", "dead"))
    listener.store.set_state(account.id, "needs_reauth", "access was revoked")
    assert query(run_flow(listener, email="anna@example.test", return_to=HR))["inboxd_status"] == "connected"
    again = listener.store.account("anna@example.test")
    assert again is not None and (again.id, again.state, again.state_reason) == (account.id, "active", None)
    assert listener.store.credential(account.id).secret != "dead"


@pytest.mark.parametrize(
    ("allowed", "return_to"),
    [(f"{HR}:443", f"{HR}/people/7"), (HR, "https://hr.example.com:443/people/7")],
    ids=["default port in the config", "default port in return_to"],
)
def test_http_connect_start_takes_an_origin_with_or_without_its_default_port(
    listener: Listener, allowed: str, return_to: str
) -> None:
    """An origin with its default port (:443 for https) is the same origin without it, on either side; an entry
    written with :443 never matched what browsers and HR apps send."""
    config = listener.holder[0]
    origins = parse_config(f'[http]\nreturn_to_origins = ["{allowed}"]', path=None, env={}).http.return_to_origins
    listener.holder[0] = replace(config, http=replace(config.http, return_to_origins=origins))
    start = listener.get(listener.start_url(email="anna@example.test", return_to=return_to))
    assert start.status_code == 302, start.text
    assert start.headers["Location"].startswith(listener.oauth.authorize_uri)


def test_http_connect_without_a_provider_ignores_providers_that_cannot_ask_consent(
    listener: Listener, tmp_path: Path
) -> None:
    """A Workspace provider with only a service account key (domain-wide delegation) cannot run the consent flow:
    it does not count when the link names no provider, so the one provider that can is used."""
    config = listener.holder[0]
    gmail = config.providers["gmail"]
    key_file = tmp_path / "service-account.json"
    key_file.write_text("{}")
    workspace = replace(gmail, name="workspace", client_id=None, client_secret=None, service_account_file=key_file)
    listener.holder[0] = replace(config, providers=MappingProxyType({"gmail": gmail, "workspace": workspace}))
    back = run_flow(listener, email="anna@example.test", return_to=HR)
    assert query(back)["inboxd_status"] == "connected", back
    account = listener.store.account("anna@example.test")
    assert account is not None and account.provider == "gmail"


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"email": "a@example.test", "return_to": "https://evil.example.net/"}, "not on an allowed origin"),
        ({"email": "a@example.test"}, "return_to is required"),
        ({"email": "<script>@x", "return_to": HR}, "is not an email address"),
        ({"email": "a@example.test", "return_to": HR, "provider": "nosuch"}, "not in the config"),
        # these raised inside urlsplit, and the browser got no answer at all
        ({"email": "a@example.test", "return_to": "https://["}, "is not on an allowed origin"),
        ({"email": "a@example.test", "return_to": "https://hr.example.test\uff0f@evil.example/"}, "allowed origin"),
        ({"email": "a@example.test", "return_to": HR + ":abc/"}, "is not on an allowed origin"),
        # would have been sent raw in the Location header (a crash after the account was connected)
        ({"email": "a@example.test", "return_to": HR + "/people/\u0420\u0438\u0442\u0430"}, "allowed origin"),
        ({"email": "a@example.test", "return_to": HR + "/x\x0bX-Evil: 1"}, "is not on an allowed origin"),
    ],
)
def test_http_connect_start_refuses_bad_requests_without_redirecting(
    listener: Listener, params: dict[str, str], fragment: str
) -> None:
    response = listener.get(listener.start_url(**params))
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert fragment in response.text.replace("&#x27;", "'")
    assert "<script>@x" not in response.text  # escaped


def test_http_connect_denied_or_wrong_account_returns_the_reason(listener: Listener) -> None:
    denied = query(run_flow(listener, decision="deny", email="anna@example.test", return_to=HR))
    assert (denied["inboxd_status"], denied["inboxd_error"]) == ("error", "access_denied")
    listener.oauth.admin("config", consent_user="bob@example.test")
    wrong = query(run_flow(listener, email="anna@example.test", return_to=HR))
    assert (wrong["inboxd_status"], wrong["inboxd_error"]) == ("error", "wrong_account")
    assert "sign in with anna@example.test" in wrong["inboxd_message"]
    assert listener.store.account("anna@example.test") is None
    assert listener.oauth.stats()["revoke"] == 1


def test_http_connect_state_expires(listener: Listener) -> None:
    start = listener.get(listener.start_url(email="anna@example.test", return_to=HR))
    callback_url = approve(start.headers["Location"])
    listener.clock.advance(16 * 60)
    response = listener.get(callback_url)
    assert response.status_code == 400
    assert "expired" in response.text
    forged = listener.get(f"{listener.base}/oauth/callback?code=x&state=forged")
    assert forged.status_code == 400
    assert listener.store.account("anna@example.test") is None


def test_http_connect_start_needs_a_signed_link_when_an_api_token_is_set(listener: Listener) -> None:
    token = "s" * 40
    listener.use_api_token(token)
    params = {"email": "anna@example.test", "return_to": HR, "expires": str(int(listener.clock.now().timestamp()) + 60)}
    unsigned = listener.get(listener.start_url(**params))
    assert unsigned.status_code == 400 and "not signed" in unsigned.text
    signed = listener.get(listener.start_url(**params, sig=sign_start(params, token)))
    assert signed.status_code == 302
    listener.clock.advance(120)
    late = listener.get(listener.start_url(**params, sig=sign_start(params, token)))
    assert late.status_code == 400 and "expired" in late.text
    for sig in ("\xff", "\u00e9" * 64):  # compare_digest raised TypeError on non-ASCII str: no answer at all
        bad = listener.get(listener.start_url(**params, sig=sig))
        assert bad.status_code == 400 and "signature is wrong" in bad.text
    odd = {**params, "expires": "\u00b2"}  # isdigit() but not int()
    assert listener.get(listener.start_url(**odd, sig=sign_start(odd, token))).status_code == 400


def raw_request(listener: Listener, request: bytes) -> bytes:
    """Send bytes as they are (no client library fixes them up) and read the whole answer."""
    port = int(listener.base.rsplit(":", 1)[1])
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server answered before reading it all
            sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def disconnect_request(token: str, body: bytes, *, length: str | None = None, scheme: str = "Bearer") -> bytes:
    head = f"POST /accounts/disconnect HTTP/1.1\r\nHost: x\r\nAuthorization: {scheme} {token}\r\n"
    head += f"Content-Length: {length if length is not None else len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def test_http_disconnect_refuses_hostile_bodies_with_400(listener: Listener) -> None:
    """A body nested 60,000 deep (RecursionError), a lone surrogate in the email (the database cannot encode it)
    and a negative Content-Length (read to the end, no cap) each gave no answer or an uncapped read; now 400."""
    token = "t" * 40
    listener.use_api_token(token)
    cases = [
        (b"[" * 60000, None),
        (b'{"email": "\\ud800@example.test"}', None),
        (b'{"email": "a@example.test"}' + b" " * 200_000, "-1"),
        (b"{}", "70000"),
    ]
    for body, length in cases:
        answer = raw_request(listener, disconnect_request(token, body, length=length))
        assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]
    # the scheme is case-insensitive (RFC 7235)
    lower = raw_request(listener, disconnect_request(token, b'{"email": "nobody@example.test"}', scheme="bearer"))
    assert lower.startswith(b"HTTP/1.0 404 "), lower[:200]


def test_clients_that_never_finish_a_request_are_capped_and_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slowloris: connections that send half a request held a thread and a descriptor each, forever. At most
    MAX_CONNECTIONS are served at once (more are closed at once), and each must send its whole request within
    REQUEST_TIMEOUT."""
    assert 0 < http_module._Handler.timeout == http_module.REQUEST_TIMEOUT <= 30
    monkeypatch.setattr(http_module, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(http_module._Handler, "timeout", 60.0)  # the cap alone, first
    server = OpsServer("127.0.0.1", 0, metrics=Metrics(), health=lambda: Health(True)).start()
    hanging = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            hanging.append(sock)
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as extra:
            assert extra.recv(100) == b"", "over the cap: closed at once, not left waiting"
        monkeypatch.setattr(http_module._Handler, "timeout", 0.5)
        for sock in hanging:  # finishing one request frees its slot; then a new client is served
            sock.sendall(b"\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.0 200")
        ok = requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        assert ok.status_code == 200
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert slow.recv(100) == b"", "cut off after the (shortened) timeout"
        # a client trickling a byte now and then, each read within the timeout, is cut off all the same
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as trickle:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
                for _ in range(10):
                    time.sleep(0.2)
                    trickle.sendall(b"X")
            try:
                answer = trickle.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", "a request must be sent whole within the timeout"
    finally:
        for sock in hanging:
            sock.close()
        server.close()


OUT_OF_DESCRIPTORS_CHILD = """
import json, os, resource, sys, time
import structlog
from inboxd.http import Health, OpsServer
from inboxd.metrics import Metrics

with structlog.testing.capture_logs() as logs:
    server = OpsServer("127.0.0.1", 0, metrics=Metrics(), health=lambda: Health(True))
    calls = 0
    handle = server._server.handle_request

    def counted():
        global calls
        calls += 1
        handle()

    server._server.handle_request = counted
    server.start()
    time.sleep(0.2)
    in_use = len(os.listdir("/proc/self/fd")) + 1  # listdir's own descriptor
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 2, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(server.port, flush=True)
    sys.stdin.readline()  # the parent has queued more connections than there are descriptors left
    calls = 0
    time.sleep(2.0)
    spun = calls
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    time.sleep(1.2)  # the back-off ends; the queued connections are accepted now
    server.close()
print(json.dumps({"calls": spun, "events": [e["event"] for e in logs if e["event"].startswith("http.")]}))
"""


def test_a_listener_out_of_descriptors_pauses_instead_of_spinning_and_recovers() -> None:
    """accept() failing with EMFILE leaves the connection queued and the socket readable: the serving loop
    went round thousands of times a second, a core at 100%, for as long as the process was out of descriptors."""
    clients = []
    with subprocess.Popen(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            port = int(child.stdout.readline())
            for _ in range(8):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            child.stdin.write("go\n")
            child.stdin.flush()
            clients[-1].sendall(b"GET /healthz HTTP/1.0\r\n\r\n")  # queued behind the limit: answered after it
            answer = clients[-1].recv(100)
            report = json.loads(child.stdout.read())
        finally:
            for sock in clients:
                sock.close()
            child.kill()
    assert report["calls"] <= 2 / http_module.ACCEPT_BACKOFF + 3, report  # 312,278 before the pause
    assert report["events"].count("http.accept_failed") == 1, report  # once a minute at most
    assert answer.startswith(b"HTTP/1.0 200"), answer


# -- disconnect over HTTP ----------------------------------------------------------------------------------------


def post_disconnect(listener: Listener, body: object, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{listener.base}/accounts/disconnect", json=body, headers=headers, timeout=10)


def test_http_disconnect_needs_the_api_token_and_revokes(listener: Listener) -> None:
    assert query(run_flow(listener, email="anna@example.test", return_to=HR))["inboxd_status"] == "connected"
    account = listener.store.account("anna@example.test")
    assert account is not None
    refresh_token = listener.store.credential(account.id).secret

    assert post_disconnect(listener, {"email": "anna@example.test"}, None).status_code == 403  # no token configured
    listener.use_api_token("t" * 40)
    assert post_disconnect(listener, {"email": "anna@example.test"}, "wrong").status_code == 401
    assert post_disconnect(listener, {"email": 7}, "t" * 40).status_code == 400
    assert post_disconnect(listener, {"email": "nobody@example.test"}, "t" * 40).status_code == 404

    response = post_disconnect(listener, {"email": "anna@example.test"}, "t" * 40)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "email": "anna@example.test",
        "revocation": "revoked",
        "outbox_failed": 0,
        "purged": None,
    }
    assert listener.oauth.introspect(refresh_token).get("active") is not True
    after = listener.store.account("anna@example.test")
    assert after is not None and (after.enabled, after.state) == (False, "disabled")
    assert listener.store.credential_kind(account.id) is None
    with listener.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM inboxd_credentials")).scalar() == 0


def test_a_malformed_request_line_is_logged_without_its_query(listener: Listener) -> None:
    """The request line of a bad request is quoted in http.request_failed: its query (an OAuth code) is not."""
    with structlog.testing.capture_logs() as logs:
        raw_request(listener, b"GET /oauth/callback?code=SECRETCODE&state=S x HTTP/1.1\r\n\r\n")
    failed = [entry for entry in logs if entry["event"] == "http.request_failed"]
    assert failed, logs
    assert all("SECRETCODE" not in str(entry) for entry in logs)
    assert "/oauth/callback?" in failed[0]["detail"]
