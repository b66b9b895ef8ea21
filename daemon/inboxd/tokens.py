"""Access tokens for XOAUTH2: the TokenSource port, CachedTokenSource (cache, lock, metrics and error translation
shared by every grant) and its google-auth adapter over a refresh token. The consent-free grants are in
delegation.py.

A token is fetched once per lifetime (minus a margin) on the injected clock; library errors become ours.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.auth import transport
from google.oauth2.credentials import Credentials

from inboxd.clock import Clock
from inboxd.errors import AccountFailed, ReauthRequired, RetryLater

# The refusals that mean the mailbox owner's grant is gone (revoked, expired, or the provider wants them to sign in
# again): only a person reconnecting fixes them. Any other refusal (invalid_client, unauthorized_client, an unknown
# code, an answer without an OAuth error such as a proxy's or a 404 page) is the admin's configuration: AccountFailed,
# tried again every cycle, so the accounts recover by themselves once the config is fixed. ReauthRequired parks the
# account until someone reconnects it, which no mailbox owner can do about a wrong client secret.
GRANT_REFUSALS = frozenset({"invalid_grant", "interaction_required", "consent_required", "login_required"})

# How many of the refresh tokens a source has held it remembers (as digests), for holds(): the stored one a caller
# read may be a rotation or two behind the source's newest.
HELD_TOKENS = 8

# Used when a token endpoint omits expires_in: short enough that a wrong guess costs little.
ASSUMED_LIFETIME = timedelta(minutes=5)
DEFAULT_HTTP_TIMEOUT = 30.0


class TokenSource(Protocol):
    def access_token(self) -> str:
        """A valid access token; cached until shortly before it expires."""

    def invalidate(self) -> None:
        """The server rejected the last token: the next access_token() fetches a new one."""


class RefreshVault(Protocol):
    """Where the refresh token lives between refreshes (the credentials table): ``token`` is the stored one when the
    slot opens; a ``rotated`` one set on the slot is stored before it closes."""

    token: str
    rotated: str | None


class FailFastRequest(google.auth.transport.requests.Request):
    """google-auth's transport, but a 5xx/429 answer raises at once instead of google-auth retrying it.

    Also applies our timeout (google-auth's default is 120 s) and the CA bundle for a private token endpoint.
    google-auth backs off with time.sleep on the real clock (3 tries, ~3 s) while we hold the refresh lock;
    retrying is the scheduler's job (RetryLater), with its own bounded, injected-clock backoff.
    """

    def __init__(self, session: requests.Session, timeout: float, ca_file: Path | None) -> None:
        super().__init__(session)
        self._timeout = timeout
        # Per request, not session.verify: requests lets $REQUESTS_CA_BUNDLE override a session's verify.
        self._verify: dict[str, str] = {"verify": str(ca_file)} if ca_file is not None else {}

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> Any:
        response = super().__call__(  # type: ignore[no-untyped-call]
            url,
            method=method,
            body=body,
            headers=headers,
            timeout=timeout or self._timeout,
            **self._verify,
            **kwargs,
        )
        # every 5xx (a 502 from a load balancer in front of the endpoint too), 429 and 408: try again later
        if response.status >= 500 or response.status in transport.DEFAULT_RETRYABLE_STATUS_CODES:
            raise RetryableStatus(response.status)
        return response


class RetryableStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class CachedTokenSource(ABC):
    """The cache, lock and metrics callback of a TokenSource; a subclass only fetches a token and its lifetime."""

    def __init__(
        self,
        *,
        clock: Clock,
        margin: timedelta,
        timeout: float,
        ca_file: Path | None,
        on_refresh: Callable[[bool], None] | None,
    ) -> None:
        self._clock = clock
        self._margin = margin
        self._on_refresh = on_refresh or (lambda ok: None)  # metrics: each refresh, successful or not
        self._session = requests.Session()
        self._request = FailFastRequest(self._session, timeout, ca_file)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at: datetime | None = None

    def access_token(self) -> str:
        # One lock around check-and-refresh: concurrent callers wait for one refresh and share its token.
        with self._lock:
            now = self._clock.now()
            if self._token is not None and self._refresh_at is not None and now < self._refresh_at:
                return self._token
            try:
                token, lifetime = self._fetch()
            except Exception:
                self._on_refresh(False)
                raise
            finally:
                # refreshes are about an hour apart: no keep-alive connection (and TLS state) held meanwhile
                self._session.close()
            self._on_refresh(True)
            self._token = token
            # Half the lifetime at most: a token shorter-lived than the margin is still reused for a while.
            self._refresh_at = now + lifetime - min(self._margin, lifetime / 2)
            return token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None
            self._refresh_at = None

    def close(self) -> None:
        self._session.close()

    @abstractmethod
    def _fetch(self) -> tuple[str, timedelta]:
        """A new access token and its lifetime; raises RetryLater, ReauthRequired or AccountFailed."""


@contextmanager
def transport_errors_retry_later(host: str) -> Iterator[None]:
    """Network failures and 5xx/429/408 answers: the scheduler tries again later."""
    try:
        yield
    except RetryableStatus as exc:
        raise RetryLater(f"token endpoint {host} answered {exc}; try again later") from exc
    except google.auth.exceptions.TransportError as exc:
        cause = exc.__cause__ or exc
        raise RetryLater(f"cannot reach token endpoint {host}: {type(cause).__name__}") from exc


def lifetime_until(expiry: datetime | None) -> timedelta:
    # google-auth stamps expiry as naive UTC from the machine's wall clock just after the response;
    # take only the lifetime from it and anchor that on our clock.
    if expiry is None:
        return ASSUMED_LIFETIME
    wall_now = datetime.now(UTC).replace(tzinfo=None)
    return timedelta(seconds=max(0, round((expiry - wall_now).total_seconds())))


class OAuthRefreshTokenSource(CachedTokenSource):
    """Trades a refresh token for access tokens at ``token_uri`` (Google, Microsoft, any RFC 6749 server)."""

    def __init__(
        self,
        *,
        refresh_token: str,
        client_id: str,
        client_secret: str,
        token_uri: str,
        clock: Clock,
        ca_file: Path | None = None,
        margin: timedelta = timedelta(seconds=60),
        on_rotated_refresh_token: Callable[[str], None] | None = None,
        timeout: float = DEFAULT_HTTP_TIMEOUT,
        on_refresh: Callable[[bool], None] | None = None,
        vault: Callable[[], AbstractContextManager[RefreshVault]] | None = None,
    ) -> None:
        self._client = (client_id, client_secret)
        self._token_uri = token_uri
        self._held: tuple[str, ...] = ()  # digests of the refresh tokens this source started from, read or rotated to
        self._credentials = self._credentials_for(refresh_token)
        # With a vault, each refresh holds the stored token (one refresh per account at a time, across processes on
        # PostgreSQL), starts from what is stored (another process may have rotated it) and stores a rotated one
        # in the same transaction.
        self._vault = vault
        self._host = urlsplit(token_uri).hostname or token_uri
        self._on_rotated = on_rotated_refresh_token
        super().__init__(clock=clock, margin=margin, timeout=timeout, ca_file=ca_file, on_refresh=on_refresh)

    def __repr__(self) -> str:
        return f"OAuthRefreshTokenSource(token_uri={self._token_uri!r})"

    def holds(self, refresh_token: str) -> bool:
        """Whether ``refresh_token`` is one this source has held: the one it started from, one it read from the vault
        or one the provider rotated it to. A stored token it never held was put there by a reconnect."""
        return _digest(refresh_token) in self._held

    def _hold(self, refresh_token: str) -> None:
        """Remember a refresh token this source started from, read or was rotated to (the last HELD_TOKENS)."""
        self._held = (*self._held[-(HELD_TOKENS - 1) :], _digest(refresh_token))

    def _credentials_for(self, refresh_token: str) -> Credentials:
        self._hold(refresh_token)
        # Built directly: Credentials.from_authorized_user_info() would silently reset token_uri to Google's.
        return Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=refresh_token,
            client_id=self._client[0],
            client_secret=self._client[1],
            token_uri=self._token_uri,
            scopes=None,
        )

    def _fetch(self) -> tuple[str, timedelta]:
        if self._vault is None:
            return self._refresh()
        with self._vault() as slot:
            if slot.token != self._credentials.refresh_token:
                self._credentials = self._credentials_for(slot.token)
            fetched = self._refresh()
            if self._credentials.refresh_token != slot.token:
                slot.rotated = self._credentials.refresh_token
            return fetched

    def _refresh(self) -> tuple[str, timedelta]:
        creds = self._credentials
        old_refresh_token = creds.refresh_token
        with transport_errors_retry_later(self._host):
            try:
                creds.refresh(self._request)  # type: ignore[no-untyped-call]
            except google.auth.exceptions.RefreshError as exc:
                raise self._translate_refresh_error(exc) from exc
        new_refresh_token = creds.refresh_token
        if new_refresh_token and new_refresh_token != old_refresh_token:
            self._hold(new_refresh_token)
            if self._on_rotated is not None:
                # Microsoft rotates refresh tokens on every use: the caller must persist the new one.
                self._on_rotated(new_refresh_token)
        token: str | None = creds.token
        assert token is not None  # google-auth raises RefreshError for an answer without access_token
        return token, lifetime_until(creds.expiry)

    def _translate_refresh_error(self, exc: google.auth.exceptions.RefreshError) -> Exception:
        details: Mapping[str, Any] = next((a for a in exc.args[1:] if isinstance(a, Mapping)), {})
        code = details.get("error")
        description = self._scrub(str(details.get("error_description") or "no description"))
        if exc.retryable:
            return RetryLater(
                f"token endpoint {self._host} failed temporarily: {code or 'unknown_error'} ({description})"
            )
        if not isinstance(code, str) or not code:
            # An HTML error page (a mistyped token_uri, a proxy) or JSON without "error": google-auth's message
            # carries the body, which is the only clue for the admin.
            summary = self._scrub(str(exc.args[0]) if exc.args else "")
            return AccountFailed(
                f"token endpoint {self._host} gave no access token and no OAuth error; check token_uri: {summary}"
            )
        if code in GRANT_REFUSALS:
            return ReauthRequired(
                f"access to the mailbox was revoked or has expired; connect it again "
                f"({self._host}: {code}: {description})"
            )
        return AccountFailed(
            f"token endpoint {self._host} refused this provider's OAuth client ({code}: {description}); check "
            f"client_id and client_secret of the provider and that the client may use the refresh token grant"
        )

    def _scrub(self, text: str) -> str:
        """Error texts come from the server; make sure none of our secrets is echoed in them."""
        creds = self._credentials
        for secret in (creds.refresh_token, creds.client_secret, self._token):
            if secret:
                text = text.replace(secret, "***")
        return text[:300]


def _digest(refresh_token: str) -> str:
    return hashlib.sha256(refresh_token.encode()).hexdigest()
