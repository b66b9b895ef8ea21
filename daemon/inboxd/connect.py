"""Connecting a mailbox with the person's consent, and the HTTP endpoints' side of it.

`inboxd connect` (an admin, or a recruiter on their own machine) runs the flow with a loopback redirect: a one-shot
HTTP server on 127.0.0.1 receives the provider's answer. The HR app sends the browser to GET /connect/start on
the daemon's listener instead; the provider answers at GET /oauth/callback and the browser is sent back to the HR
app's return_to with the outcome in its query string.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit

import structlog

from inboxd.clock import Clock
from inboxd.config import Config, ProviderConfig, url_origin
from inboxd.connect_state import ConnectState, StateCodec
from inboxd.errors import ConnectFailed, InboxdError, RetryLater, UsageError
from inboxd.oauth_flow import (
    Grant,
    authorization_url,
    callback_error,
    check_consent_provider,
    check_identity,
    exchange_code,
    missing_scopes,
    new_pkce,
    revoke,
)
from inboxd.store import OAUTH2_REFRESH, Account, Credential, Store

log = structlog.get_logger(__name__)


def normalize_email(value: str) -> str:
    email = value.strip().lower()
    local, at, domain = email.rpartition("@")
    if not at or not local or "@" in local or "." not in domain or any(c.isspace() or c in "<>\"'," for c in email):
        raise UsageError(f"{value!r} is not an email address")
    return email


def consent_provider(config: Config, name: str | None) -> ProviderConfig:
    """The named provider, or the only one that can run the consent flow when no name is given."""
    if name is None:
        able = [p for p in config.providers.values() if can_ask_consent(p)]
        if len(able) != 1:
            names = ", ".join(sorted(p.name for p in able)) or "none"
            raise UsageError(f"name the provider (providers able to connect with consent: {names})")
        return able[0]
    provider = config.providers.get(name)
    if provider is None:
        known = ", ".join(sorted(config.providers)) or "none"
        raise UsageError(f"provider {name!r} is not in the config (providers: {known})")
    check_consent_provider(provider)
    return provider


def can_ask_consent(provider: ProviderConfig) -> bool:
    """What check_consent_provider accepts: a Workspace provider with only a service account key cannot."""
    try:
        check_consent_provider(provider)
    except UsageError:
        return False
    return True


def complete(
    store: Store, provider: ProviderConfig, email: str, grant: Grant, *, hr_user_ref: str | None = None
) -> Account:
    """Check the grant is for ``email`` with the mail scopes, then store it: the account is created, or reconnected
    (credentials replaced, state active, enabled again). A refused grant is revoked: inboxd will not use it."""
    try:
        check_identity(email, grant.email)
        missing = missing_scopes(provider, grant.scopes)
        if missing:
            raise ConnectFailed(
                f"access to {', '.join(missing)} was not granted: tick every box on the consent page",
                code="scope_denied",
            )
    except ConnectFailed:
        _revoke_quietly(provider, grant.refresh_token)
        raise
    account = store.add_account(
        email, provider.name, Credential(OAUTH2_REFRESH, grant.refresh_token), hr_user_ref=hr_user_ref
    )
    log.info("account.connected", account=email, provider=provider.name)
    return account


def _revoke_quietly(provider: ProviderConfig, token: str) -> None:
    try:
        revoke(provider, token)
    except RetryLater as exc:
        log.warning("connect.revoke_failed", provider=provider.name, error=str(exc))


# -- `inboxd connect`: loopback redirect ------------------------------------------------------------------------


@dataclass
class _Answer:
    params: dict[str, str] | None = None


def connect_interactive(
    config: Config,
    store: Store,
    email: str,
    provider: ProviderConfig,
    *,
    out: TextIO,
    timeout: float = 300.0,
    port: int = 0,
    hr_user_ref: str | None = None,
    open_browser: Callable[[str], object] | None = None,
) -> Account:
    """Print the consent URL, wait for the provider's redirect to 127.0.0.1, exchange the code, store the grant."""
    check_consent_provider(provider)
    pkce = new_pkce()
    state = secrets.token_urlsafe(24)
    answer = _Answer()
    got_answer = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            params = dict(parse_qsl(url.query))
            if url.path != "/" or params.get("state") != state:
                self._reply(HTTPStatus.NOT_FOUND, "not the answer inboxd is waiting for")
                return
            answer.params = params
            ok = "code" in params and "error" not in params
            self._reply(
                HTTPStatus.OK,
                "inboxd: the provider answered; you can close this tab and go back to the terminal."
                if ok
                else "inboxd: access was not granted; see the terminal.",
            )
            got_answer.set()

        def _reply(self, status: HTTPStatus, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the query string carries the code

    server = HTTPServer(("127.0.0.1", port), Handler)
    # Microsoft registers loopback redirects as http://localhost (any port); Google recommends 127.0.0.1
    host = "localhost" if provider.kind == "microsoft" else "127.0.0.1"
    redirect_uri = f"http://{host}:{server.server_address[1]}/"
    url = authorization_url(provider, redirect_uri=redirect_uri, state=state, pkce=pkce, login_hint=email)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        print(f"Open this URL in a browser and sign in as {email}:\n\n  {url}\n", file=out)
        print(f"Waiting up to {round(timeout)} s for the provider's answer on {redirect_uri} ...", file=out, flush=True)
        if open_browser is not None:
            open_browser(url)
        if not got_answer.wait(timeout):
            raise ConnectFailed(
                f"no answer from the provider within {round(timeout)} s; run the command again", code="timeout"
            )
    finally:
        server.shutdown()
        server.server_close()
    assert answer.params is not None
    error = callback_error(answer.params)
    if error is not None:
        raise error
    grant = exchange_code(provider, answer.params["code"], redirect_uri=redirect_uri, pkce_verifier=pkce.verifier)
    return complete(store, provider, email, grant, hr_user_ref=hr_user_ref)


# -- the HR app's flow over HTTP --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redirect:
    location: str


class ConnectEndpoints:
    """GET /connect/start and GET /oauth/callback. Each answers a Redirect, or raises ConnectFailed/UsageError for
    a request that cannot be sent anywhere safe (the listener shows those as a 400 page)."""

    def __init__(self, config: Callable[[], Config], store: Store, codec: StateCodec, *, clock: Clock) -> None:
        self._current_config = config  # the daemon's, reloads included
        self._store = store
        self._codec = codec
        self._clock = clock

    @property
    def _config(self) -> Config:
        return self._current_config()

    def start(self, params: Mapping[str, str]) -> Redirect:
        http = self._config.http
        if http.redirect_uri is None:
            raise UsageError("the HTTP listener is off (http.listen) and no http.public_url is set")
        return_to = params.get("return_to", "")
        check_return_to(return_to, http.return_to_origins)
        if http.api_token is not None:
            check_signature(params, http.api_token, now=self._clock.now().timestamp())
        email = normalize_email(params.get("email", ""))
        provider = consent_provider(self._config, params.get("provider") or None)
        pkce = new_pkce()
        state = ConnectState(
            email=email,
            provider=provider.name,
            return_to=return_to,
            verifier=pkce.verifier,
            hr_user_ref=params.get("hr_user_ref") or None,
        )
        sealed = self._codec.seal(state)
        log.info("connect.started", account=email, provider=provider.name)
        return Redirect(
            authorization_url(provider, redirect_uri=http.redirect_uri, state=sealed, pkce=pkce, login_hint=email)
        )

    def callback(self, params: Mapping[str, str]) -> Redirect:
        state = self._codec.open(params.get("state", ""))  # ConnectFailed("expired") -> 400 page: no safe return_to
        outcome: dict[str, str] = {"inboxd_email": state.email}
        try:
            error = callback_error(dict(params))
            if error is not None:
                raise error
            provider = consent_provider(self._config, state.provider)
            assert self._config.http.redirect_uri is not None
            grant = exchange_code(
                provider, params["code"], redirect_uri=self._config.http.redirect_uri, pkce_verifier=state.verifier
            )
            complete(self._store, provider, state.email, grant, hr_user_ref=state.hr_user_ref)
            outcome["inboxd_status"] = "connected"
        except ConnectFailed as exc:
            log.warning("connect.failed", account=state.email, code=exc.code, error=str(exc))
            outcome |= {"inboxd_status": "error", "inboxd_error": exc.code, "inboxd_message": str(exc)[:300]}
        except InboxdError as exc:  # provider unreachable, config changed meanwhile
            log.warning("connect.failed", account=state.email, code="unavailable", error=str(exc))
            outcome |= {"inboxd_status": "error", "inboxd_error": "unavailable", "inboxd_message": str(exc)[:300]}
        return Redirect(_with_query(state.return_to, outcome))


def check_return_to(return_to: str, origins: frozenset[str]) -> None:
    """Only back to the HR app: an absolute URL on one of http.return_to_origins (no open redirect)."""
    if not return_to:
        raise UsageError("return_to is required: where the browser goes back to when the mailbox is connected")
    allowed = ", ".join(sorted(origins)) or "none configured (http.return_to_origins)"
    refused = UsageError(f"return_to {return_to[:200]!r} is not on an allowed origin ({allowed})")
    # printable ASCII only (a browser sends a URL percent-encoded): no control characters for the Location header,
    # no Unicode that NFKC folds into "/" or "@" on the way to the netloc
    if not return_to.isascii() or not return_to.isprintable() or "\\" in return_to:
        raise refused
    try:
        parts = urlsplit(return_to)
        parts.port  # noqa: B018 (ValueError for a port that is no number)
    except ValueError:
        raise refused from None
    if parts.username or parts.password or url_origin(parts) not in origins:
        raise refused


def sign_start(params: Mapping[str, str], api_token: str) -> str:
    """The signature the HR app puts in `sig`: HMAC-SHA256 (hex) with the api token over the request's fields,
    one per line in this order: email, provider, return_to, hr_user_ref, expires (absent ones as empty lines)."""
    message = "\n".join(params.get(k, "") for k in ("email", "provider", "return_to", "hr_user_ref", "expires"))
    return hmac.new(api_token.encode(), message.encode(), hashlib.sha256).hexdigest()


def check_signature(params: Mapping[str, str], api_token: str, *, now: float) -> None:
    expires = params.get("expires", "")
    if not (expires.isascii() and expires.isdigit()) or not params.get("sig"):
        raise UsageError("this connect link is not signed (expires and sig are required: http.api_token_file is set)")
    # bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a wrong signature)
    if not hmac.compare_digest(sign_start(params, api_token).encode(), params.get("sig", "").encode()):
        raise UsageError("this connect link's signature is wrong")
    if int(expires) < now:
        raise ConnectFailed("this connect link has expired: start again from the HR app", code="expired")


def _with_query(url: str, extra: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.startswith("inboxd_")]
    return parts._replace(query=urlencode([*query, *extra.items()])).geturl()
