"""The OAuth2 authorization-code flow with PKCE (RFC 6749 4.1, RFC 7636) that connects a mailbox, and revocation
(RFC 7009) when it is disconnected. Used by `inboxd connect` (loopback redirect) and by the HTTP connect endpoints.

Hand-written over requests rather than google-auth-oauthlib: oauthlib refuses the plain-http loopback token endpoint
of our test server, and the web flow keeps the PKCE verifier in our own encrypted `state` (see connect_state.py)
instead of a server-side session. The identity is read from the id_token the token endpoint returns over TLS, which
OpenID Connect Core 3.1.3.7 allows without checking its signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests

from inboxd.config import ProviderConfig
from inboxd.errors import ConnectFailed, RetryLater, UsageError

# OpenID/offline scopes asked for beside the mail ones; a grant may leave them out of its "scope" answer
IDENTITY_SCOPES = frozenset({"openid", "email", "profile", "offline_access"})


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str

    def __repr__(self) -> str:
        return "Pkce(<hidden>)"


def new_pkce() -> Pkce:
    verifier = secrets.token_urlsafe(48)  # 64 characters, within RFC 7636's 43-128
    return Pkce(verifier, challenge_for(verifier))


def challenge_for(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class Grant:
    """What the code exchange gave: the refresh token to store and who signed in."""

    refresh_token: str
    email: str
    scopes: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Grant(email={self.email!r}, scopes={self.scopes!r}, refresh_token=<hidden>)"


def check_consent_provider(provider: ProviderConfig) -> None:
    """A provider the consent flow can use: OAuth with an authorization endpoint and scopes."""
    if provider.auth != "oauth2":
        raise UsageError(
            f"provider {provider.name!r} uses password authentication: add the account with "
            "`inboxd accounts add EMAIL --provider NAME --password-file FILE`"
        )
    if provider.client_id is None or provider.client_secret is None:
        raise UsageError(
            f"provider {provider.name!r} has no OAuth client (client_id, client_secret_file): it can only connect "
            "mailboxes with --delegated"
        )
    if provider.auth_uri is None or not provider.scopes:
        raise UsageError(
            f"provider {provider.name!r} has no auth_uri/scopes: set them in [providers.{provider.name}] "
            "to connect mailboxes with consent"
        )


def authorization_url(provider: ProviderConfig, *, redirect_uri: str, state: str, pkce: Pkce, login_hint: str) -> str:
    """Where to send the person's browser: the provider's consent page for ``login_hint``'s mailbox."""
    check_consent_provider(provider)
    assert provider.auth_uri is not None
    assert provider.client_id is not None
    params = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(provider.scopes),
        "state": state,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "login_hint": login_hint,
    }
    if provider.kind == "microsoft":
        params["response_mode"] = "query"
        params["prompt"] = "select_account"
    else:
        # Google returns a refresh token only with access_type=offline, and again on a reconnect only after consent
        params["access_type"] = "offline"
        params["prompt"] = "consent"
    separator = "&" if urlsplit(provider.auth_uri).query else "?"
    return provider.auth_uri + separator + urlencode(params)


def callback_error(params: dict[str, str]) -> ConnectFailed | None:
    """The provider's error answer on the redirect (RFC 6749 4.1.2.1), or None when it carries a code."""
    error = params.get("error")
    if error is None and params.get("code"):
        return None
    if error is None:
        return ConnectFailed("the provider's answer carries neither a code nor an error", code="provider_error")
    description = _printable(params.get("error_description", ""))[:200]
    if error == "access_denied":
        return ConnectFailed("access was not granted on the consent page (denied or cancelled)", code="access_denied")
    return ConnectFailed(
        f"the provider refused the request: {_printable(error)[:60]} {description}".strip(), code=error
    )


def exchange_code(provider: ProviderConfig, code: str, *, redirect_uri: str, pkce_verifier: str) -> Grant:
    """Trade the authorization code for tokens at the provider's token endpoint; the access token is not kept."""
    assert provider.token_uri is not None
    assert provider.client_id is not None
    assert provider.client_secret is not None
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": provider.client_id,
        "client_secret": provider.client_secret,
        "code_verifier": pkce_verifier,
    }
    body = _post(provider, provider.token_uri, form, what="token endpoint")
    secrets_seen = (code, provider.client_secret, pkce_verifier)
    if "error" in body or "access_token" not in body:
        error = _printable(str(body.get("error") or "no_access_token"))[:60]
        description = _scrub(str(body.get("error_description") or ""), secrets_seen)
        raise ConnectFailed(
            f"the token endpoint refused the authorization code: {error} ({description[:200]})", code="invalid_grant"
        )
    refresh_token = body.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise ConnectFailed(
            "the provider gave no refresh token: remove the app's access in the account's security settings "
            "(Google: myaccount.google.com/permissions) and connect again",
            code="no_refresh_token",
        )
    email = _id_token_email(body.get("id_token"))
    scope = body.get("scope")
    granted = tuple(scope.split()) if isinstance(scope, str) else provider.scopes
    return Grant(refresh_token=refresh_token, email=email, scopes=granted)


def check_identity(expected: str, signed_in: str) -> None:
    """The mailbox connected must be the one asked for: someone signed in to another account is refused."""
    if canonical_mailbox(expected) != canonical_mailbox(signed_in):
        raise ConnectFailed(
            f"signed in as {signed_in} but connecting {expected}: sign in with {expected} and try again",
            code="wrong_account",
        )


def canonical_mailbox(address: str) -> str:
    """Lowercase; googlemail.com is gmail.com (both name one Google account)."""
    local, _, domain = address.strip().lower().rpartition("@")
    return f"{local}@{'gmail.com' if domain == 'googlemail.com' else domain}"


def missing_scopes(provider: ProviderConfig, granted: tuple[str, ...]) -> list[str]:
    """Mail scopes the person unticked on a granular consent screen (Google lets them)."""
    return [s for s in provider.scopes if s not in IDENTITY_SCOPES and s not in granted]


def revoke(provider: ProviderConfig, token: str) -> str:
    """Revoke ``token`` at the provider (RFC 7009). Returns "revoked", "already invalid" or "no endpoint";
    raises RetryLater when the endpoint cannot be reached or fails."""
    if provider.revoke_uri is None:
        return "no endpoint"
    try:
        with _session() as session:
            response = session.post(
                provider.revoke_uri, data={"token": token}, timeout=provider.timeout, **_verify(provider)
            )
    except requests.RequestException as exc:
        raise RetryLater(f"cannot reach {_host(provider.revoke_uri)}: {type(exc).__name__}") from None
    if response.status_code == 200:
        return "revoked"
    if response.status_code == 400:
        return "already invalid"  # Google: invalid_token for a token revoked or expired already
    raise RetryLater(f"{_host(provider.revoke_uri)} answered HTTP {response.status_code} to the revocation")


# -- helpers ----------------------------------------------------------------------------------------------------


def _post(provider: ProviderConfig, url: str, form: dict[str, str], *, what: str) -> dict[str, Any]:
    try:
        with _session() as session:
            response = session.post(
                url, data=form, headers={"Accept": "application/json"}, timeout=provider.timeout, **_verify(provider)
            )
    except requests.RequestException as exc:
        raise RetryLater(f"cannot reach the {what} {_host(url)}: {type(exc).__name__}") from None
    if response.status_code >= 500 or response.status_code == 429:
        raise RetryLater(f"the {what} {_host(url)} answered HTTP {response.status_code}; try again")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ConnectFailed(
            f"the {what} {_host(url)} answered HTTP {response.status_code} without a JSON object",
            code="provider_error",
        )
    return body


def _session() -> requests.Session:
    return requests.Session()  # per call: a connect or a disconnect is rare


def _verify(provider: ProviderConfig) -> dict[str, Any]:
    # per request, not session.verify: requests lets $REQUESTS_CA_BUNDLE override a session's verify
    return {"verify": str(provider.ca_file)} if provider.ca_file is not None else {}


def _id_token_email(id_token: Any) -> str:
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        raise ConnectFailed(
            "the provider returned no id_token, so the mailbox's address cannot be checked: "
            'add "openid" and "email" to the provider\'s scopes',
            code="no_identity",
        )
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        raise ConnectFailed("the provider's id_token is not a readable JWT", code="no_identity") from None
    if not isinstance(claims, dict):
        raise ConnectFailed("the provider's id_token is not a readable JWT", code="no_identity")
    # Google: email; Microsoft: email when the "email" scope is granted, else preferred_username (the UPN)
    for claim in ("email", "preferred_username", "upn"):
        value = claims.get(claim)
        if isinstance(value, str) and "@" in value:
            return value.strip().lower()
    raise ConnectFailed('the provider\'s id_token names no email address: add the "email" scope', code="no_identity")


def _host(url: str) -> str:
    return urlsplit(url).hostname or url


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _scrub(text: str, secrets_seen: tuple[str, ...]) -> str:
    for secret in secrets_seen:
        if secret:
            text = text.replace(secret, "***")
    return _printable(text)
