"""Access tokens for mailboxes that need no user consent: Google Workspace domain-wide delegation (a service-account
key signs a JWT per user) and Microsoft 365 app-only access (OAuth2 client credentials, RFC 6749 section 4.4).

Same contract as tokens.py: one fetch per lifetime minus a margin on the injected clock, one lock per source, and
errors translated by what the caller can do; the translations that differ name what an admin has to grant.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import google.auth.exceptions
from google.oauth2 import service_account

from inboxd.clock import Clock
from inboxd.errors import AccountFailed, RetryLater
from inboxd.tokens import (
    ASSUMED_LIFETIME,
    DEFAULT_HTTP_TIMEOUT,
    CachedTokenSource,
    lifetime_until,
    transport_errors_retry_later,
)

OUTLOOK_APP_ONLY_SCOPE = "https://outlook.office365.com/.default"

# What a Microsoft 365 admin must set up before an app may open mailboxes without a user (Microsoft's
# "Authenticate an IMAP, POP or SMTP connection using OAuth", client credentials flow).
APP_ONLY_GRANTS = (
    "a Microsoft 365 admin must grant admin consent for the Office 365 Exchange Online application permissions "
    "IMAP.AccessAsApp and SMTP.SendAsApp to this app, and register its service principal in Exchange Online "
    "(New-ServicePrincipal) with FullAccess on the mailboxes (Add-MailboxPermission)"
)

# A signed JWT (an assertion or an access token) echoed back in an error text is a usable credential until it expires.
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")


class ServiceAccountTokenSource(CachedTokenSource):
    """Tokens for ``subject``'s mailbox through Google Workspace domain-wide delegation.

    The key file is read at every refresh, so a key replaced on disk is used from the next refresh on without a
    restart (refreshes happen about once an hour per mailbox).
    """

    def __init__(
        self,
        *,
        key_file: Path,
        subject: str,
        scopes: Sequence[str],
        clock: Clock,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_HTTP_TIMEOUT,
        margin: timedelta = timedelta(seconds=60),
        on_refresh: Callable[[bool], None] | None = None,
    ) -> None:
        super().__init__(clock=clock, margin=margin, timeout=timeout, ca_file=ca_file, on_refresh=on_refresh)
        self._key_file = key_file
        self._subject = subject
        self._scopes = tuple(scopes)
        self._private_key: str | None = None  # the last one read, kept only to scrub it from messages

    def __repr__(self) -> str:
        return f"ServiceAccountTokenSource(key_file={str(self._key_file)!r}, subject={self._subject!r})"

    def _fetch(self) -> tuple[str, timedelta]:
        key = self._read_key()
        with transport_errors_retry_later(key.host):
            try:
                key.credentials.refresh(self._request)  # type: ignore[no-untyped-call]
            except google.auth.exceptions.RefreshError as exc:
                raise self._translate_refresh_error(exc, key) from exc
        token = key.credentials.token
        if not isinstance(token, str) or not token:
            raise AccountFailed(f"token endpoint {key.host} answered without an access token")
        return token, lifetime_until(key.credentials.expiry)

    def _read_key(self) -> _ServiceAccountKey:
        # A key file that cannot be used is an ops problem shared by every delegated mailbox: not RetryLater (it will
        # not heal by waiting), not ReauthRequired (the mailbox owner cannot fix it, and that state parks the account
        # until someone reconnects it). AccountFailed shows "error" with this text and tries again next cycle, so the
        # accounts recover by themselves once the file is fixed. The texts name the file, never its contents.
        # Read here, not by from_service_account_file: the one read also gives the client id an admin must authorize
        # and the private key to scrub from messages.
        path = self._key_file
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise AccountFailed(f"cannot read service account key file {path}: {why}") from exc
        try:
            info = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AccountFailed(
                f"service account key file {path} is not JSON (line {exc.lineno} column {exc.colno})"
            ) from exc
        if not isinstance(info, dict):
            raise AccountFailed(f"service account key file {path} is not a JSON object")
        if isinstance(info.get("private_key"), str):
            self._private_key = info["private_key"]
        missing = [f for f in ("client_email", "token_uri", "private_key") if not isinstance(info.get(f), str)]
        if missing:
            raise AccountFailed(f"service account key file {path} lacks {', '.join(missing)}")
        try:
            credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info,
                scopes=self._scopes,
                # RFC 7523: aud names the authorization server. google-auth always puts Google's token URL there,
                # which is the key file's token_uri for every Google-issued key; saying so keeps other servers working.
                additional_claims={"aud": info["token_uri"]},
            ).with_subject(self._subject)
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise AccountFailed(f"service account key file {path} holds no usable RSA private_key") from exc
        token_uri = str(info["token_uri"])
        return _ServiceAccountKey(
            credentials=credentials,
            client_email=str(info["client_email"]),
            client_id=str(info.get("client_id") or "unknown"),
            key_id=str(info.get("private_key_id") or "unknown"),
            host=urlsplit(token_uri).hostname or token_uri,
        )

    def _translate_refresh_error(self, exc: google.auth.exceptions.RefreshError, key: _ServiceAccountKey) -> Exception:
        details: Mapping[str, Any] = next((a for a in exc.args[1:] if isinstance(a, Mapping)), {})
        code = details.get("error")
        where = f"token endpoint {key.host}"
        if exc.retryable:
            return RetryLater(f"{where} failed temporarily: {code} ({self._scrub(details.get('error_description'))})")
        if not isinstance(code, str) or not code:
            # Not a refusal of the grant (an HTML error page, a non-Google universe_domain in the key file, ...):
            # someone must fix the endpoint or the key file; a reconnect would not help.
            summary = self._scrub(exc.args[0] if exc.args else None)
            return AccountFailed(f"{where} gave no access token and no OAuth error for {key.client_email}: {summary}")
        description = self._scrub(details.get("error_description"))
        answer = f"{key.host}: {code}: {description}"
        # Every refusal of a delegated grant is AccountFailed: no mailbox owner can reconnect it (only the admin
        # can fix the console or the key, or the person is back in the Workspace), so it is tried again each round
        # and resumes by itself once access returns, without anyone running `accounts add` again.
        if code == "unauthorized_client":
            # Google's answer when the admin has not authorized this client id for these scopes, or when the subject
            # is outside the Workspace the grant covers (a person who left, or suspended)
            return AccountFailed(
                f"domain-wide delegation is not granted for service account {key.client_email} "
                f"(client id {key.client_id}) and scope {' '.join(self._scopes)} in the Google Workspace admin "
                f"console, or {self._subject} is not in that Workspace ({answer})"
            )
        if code == "invalid_grant" and "Invalid JWT Signature" in description:
            # The description only picks the hint for the admin.
            return AccountFailed(
                f"service account key {key.key_id} in {self._key_file} was deleted or is wrong: create a new key "
                f"for {key.client_email} and replace the file ({answer})"
            )
        return AccountFailed(f"{where} refused service account {key.client_email} for {self._subject} ({answer})")

    def _scrub(self, text: object) -> str:
        key = self._private_key or ""
        # the whole PEM and each of its base64 lines, in case only part of it is echoed
        pieces = [key, *(line for line in key.splitlines() if len(line) >= 16)]
        return _scrub(str(text or "no description"), [*pieces, self._token])


@dataclass(frozen=True, slots=True)
class _ServiceAccountKey:
    credentials: service_account.Credentials
    client_email: str
    client_id: str  # the number an admin authorizes under domain-wide delegation
    key_id: str
    host: str


class ClientCredentialsTokenSource(CachedTokenSource):
    """App-only tokens (Microsoft 365) for an app registration: one token serves every mailbox the app may open."""

    def __init__(
        self,
        *,
        token_uri: str,
        client_id: str,
        client_secret: str,
        scope: str = OUTLOOK_APP_ONLY_SCOPE,
        clock: Clock,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_HTTP_TIMEOUT,
        margin: timedelta = timedelta(seconds=60),
        on_refresh: Callable[[bool], None] | None = None,
    ) -> None:
        super().__init__(clock=clock, margin=margin, timeout=timeout, ca_file=ca_file, on_refresh=on_refresh)
        self._token_uri = token_uri
        self._host = urlsplit(token_uri).hostname or token_uri
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope

    def __repr__(self) -> str:
        return f"ClientCredentialsTokenSource(token_uri={self._token_uri!r}, client_id={self._client_id!r})"

    def _fetch(self) -> tuple[str, timedelta]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "scope": self._scope,
        }
        with transport_errors_retry_later(self._host):
            response = self._request(
                url=self._token_uri,
                method="POST",
                body=urlencode(form).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
            )
        answer = _json_object(response.data)
        if response.status == 200:
            token = answer.get("access_token")
            if isinstance(token, str) and token:
                return token, _lifetime_from_expires_in(answer.get("expires_in"))
            raise AccountFailed(f"token endpoint {self._token_uri} answered 200 without an access_token")
        raise self._translate_refusal(response.status, answer)

    def _translate_refusal(self, status: int, answer: Mapping[str, Any]) -> Exception:
        code = answer.get("error")
        if not isinstance(code, str) or not code:
            # A 404 page or a proxy's answer: token_uri is wrong or something is in the way, not a credential issue.
            return AccountFailed(f"token endpoint {self._token_uri} answered HTTP {status} without an OAuth error")
        description = self._scrub(answer.get("error_description"))
        reply = f"{self._host}: {code}: {description}"
        if code in ("temporarily_unavailable", "server_error"):
            return RetryLater(f"token endpoint {self._host} failed temporarily ({reply})")
        # as for a service account: an admin's to fix, tried again each round, resumes by itself once fixed
        if code == "invalid_client":
            return AccountFailed(
                f"app {self._client_id} was refused: its client secret is wrong or expired, or the app was "
                f"deleted; an admin must issue a new secret in Microsoft Entra ID, and {APP_ONLY_GRANTS} ({reply})"
            )
        if code in ("unauthorized_client", "invalid_scope"):
            return AccountFailed(
                f"app {self._client_id} may not get tokens for {self._scope}: {APP_ONLY_GRANTS} ({reply})"
            )
        return AccountFailed(f"token endpoint {self._host} refused app {self._client_id} ({reply})")

    def _scrub(self, text: object) -> str:
        return _scrub(str(text or "no description"), [self._client_secret, self._token])


def _lifetime_from_expires_in(expires_in: Any) -> timedelta:
    try:
        seconds = int(expires_in)  # a number, or a string from older Azure AD endpoints
    except (TypeError, ValueError):
        return ASSUMED_LIFETIME
    return timedelta(seconds=max(0, seconds))


def _json_object(data: bytes) -> Mapping[str, Any]:
    try:
        parsed = json.loads(data)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Error texts come from the server; make sure none of our secrets (nor any signed JWT) is echoed in them."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _JWT.sub("***", text)[:300]
