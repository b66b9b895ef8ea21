"""The test OAuth server's authorization-server side (consent + PKCE, code exchange, id_token, rotation, revocation,
domain-wide delegation, app-only), each test on a private instance (harness.oauth) so config changes stay local."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import google.auth.transport.requests
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.auth.exceptions import RefreshError
from google.oauth2 import service_account

from harness.oauth import OAuthServer, approve, make_service_account

GMAIL = "https://mail.google.com/"
M365 = "https://outlook.office365.com/.default"
REDIRECT = "http://127.0.0.1:54321/oauth/callback"
SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)


# -- helpers -----------------------------------------------------------------------------------------------------

SECRET_FIELDS = frozenset({"access_token", "refresh_token", "id_token", "code"})


class _Secret(str):
    """A token or code: compares as its text, but assertion messages show it as '<redacted>'."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


def _redacted(body: dict[str, Any]) -> dict[str, Any]:
    return {k: _Secret(v) if k in SECRET_FIELDS and isinstance(v, str) else v for k, v in body.items()}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_json(part: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, _b64url(hashlib.sha256(verifier.encode()).digest())


def _authorize_url(server: OAuthServer, challenge: str, **params: str | None) -> str:
    """An /authorize URL as inboxd builds it; a None value leaves that parameter out."""
    query: dict[str, str | None] = {
        "response_type": "code",
        "client_id": server.client_id,
        "redirect_uri": REDIRECT,
        "scope": f"{GMAIL} openid email",
        "state": "st-" + secrets.token_hex(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "login_hint": "Anna@Example.test",
        "access_type": "offline",
        "prompt": "consent",
        **params,
    }
    return f"{server.authorize_uri}?{urlencode({k: v for k, v in query.items() if v is not None})}"


def _query(location: str) -> dict[str, Any]:
    return _redacted({k: v[0] for k, v in parse_qs(urlsplit(location).query).items()})


def _post(url: str, **form: str) -> tuple[int, dict[str, Any]]:
    response = requests.post(url, data=form, timeout=10)
    return response.status_code, _redacted(response.json())


def _exchange(
    server: OAuthServer, code: str, verifier: str, redirect_uri: str = REDIRECT
) -> tuple[int, dict[str, Any]]:
    return _post(
        server.token_uri,
        grant_type="authorization_code",
        code=code,
        redirect_uri=redirect_uri,
        code_verifier=verifier,
        client_id=server.client_id,
        client_secret=server.client_secret,
    )


def _refresh(server: OAuthServer, refresh_token: str) -> tuple[int, dict[str, Any]]:
    return _post(
        server.token_uri,
        grant_type="refresh_token",
        refresh_token=refresh_token,
        client_id=server.client_id,
        client_secret=server.client_secret,
    )


def _code(server: OAuthServer, **params: str | None) -> tuple[str, str]:
    """Consent for a fresh PKCE pair; returns (code, verifier)."""
    verifier, challenge = _pkce()
    location = _Secret(approve(_authorize_url(server, challenge, **params)))
    return _query(location)["code"], _Secret(verifier)


def _tokens(server: OAuthServer, **params: str | None) -> dict[str, Any]:
    code, verifier = _code(server, **params)
    status, grant = _exchange(server, code, verifier)
    assert status == 200, grant.get("error_description")
    return grant


# -- /authorize --------------------------------------------------------------------------------------------------


def test_consent_page_escapes_the_scopes_and_submits_itself(oauth_server: OAuthServer) -> None:
    """A scope carrying markup is shown escaped (in the list and the hidden inputs); the page auto-approves."""
    _verifier, challenge = _pkce()
    url = _authorize_url(oauth_server, challenge, scope=f'{GMAIL} <script>alert("x")</script>')
    page = requests.get(url, timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "<title>Sign in - inboxd test OAuth</title>" in page.text
    assert '<script>alert("x")' not in page.text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page.text
    assert "anna@example.test" in page.text
    assert '<form id="consent" method="post" action="/authorize">' in page.text
    assert 'name="decision" value="allow"' in page.text
    assert 'name="decision" value="deny"' in page.text
    assert "form.submit()" in page.text


def test_manual_consent_page_has_no_auto_submit(oauth_server: OAuthServer) -> None:
    """consent=manual leaves the decision to a click: no script submits the form."""
    oauth_server.admin("config", consent="manual")
    page = requests.get(_authorize_url(oauth_server, _pkce()[1]), timeout=10)
    assert page.status_code == 200
    assert "<script" not in page.text
    assert 'id="consent"' in page.text


@pytest.mark.parametrize(
    "params",
    [
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": "http://127.0.0.1/no-port"},
        {"redirect_uri": None},
        {"client_id": "someone-else"},
    ],
    ids=["foreign-redirect", "loopback-without-port", "no-redirect", "unknown-client"],
)
def test_bad_client_or_redirect_uri_gets_a_400_page_never_a_redirect(
    oauth_server: OAuthServer, params: dict[str, str | None]
) -> None:
    """RFC 6749 4.1.2.1: an untrusted redirect_uri is never redirected to, not even with an error."""
    url = _authorize_url(oauth_server, _pkce()[1], **params)
    page = requests.get(url, allow_redirects=False, timeout=10)
    assert page.status_code == 400
    assert "Location" not in page.headers
    assert page.headers["Content-Type"].startswith("text/html")
    with pytest.raises(AssertionError, match="400"):
        approve(url)


def test_registered_redirect_uri_is_accepted(oauth_server: OAuthServer) -> None:
    """A redirect URI registered via /admin/config works, and its own query string is kept."""
    uri = "https://app.example.test/oauth/callback?tenant=7"
    oauth_server.admin("config", redirect_uri=[uri, "https://other.example.test/cb"])
    location = _Secret(approve(_authorize_url(oauth_server, _pkce()[1], redirect_uri=uri, state="s1")))
    assert location.startswith(uri + "&code=")
    assert _query(location)["state"] == "s1"
    assert _query(location)["tenant"] == "7"


def test_localhost_redirect_uri_is_accepted(oauth_server: OAuthServer) -> None:
    """Like a Google desktop client, any http://localhost:<port>/ redirect is allowed."""
    location = _Secret(
        approve(_authorize_url(oauth_server, _pkce()[1], redirect_uri="http://localhost:8765/cb", state="s2"))
    )
    assert location.startswith("http://localhost:8765/cb?code=")
    assert _query(location)["state"] == "s2"


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"scope": None}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
    ],
    ids=["plain-pkce", "no-method", "no-pkce", "no-scope", "implicit-grant"],
)
def test_request_errors_redirect_back_with_error_and_state(
    oauth_server: OAuthServer, params: dict[str, str | None], error: str
) -> None:
    """Errors other than client/redirect_uri go back to the client (error, error_description, state)."""
    location = _Secret(approve(_authorize_url(oauth_server, _pkce()[1], state="keep-me", **params)))
    assert location.startswith(REDIRECT + "?")
    answer = _query(location)
    assert answer["error"] == error
    assert answer["error_description"]
    assert answer["state"] == "keep-me"
    assert "code" not in answer


def test_plain_pkce_is_allowed_once_pkce_is_not_required(oauth_server: OAuthServer) -> None:
    """require_pkce=0: a plain challenge is accepted and the verifier must equal it."""
    oauth_server.admin("config", require_pkce="0")
    verifier = _Secret(secrets.token_urlsafe(48))
    location = _Secret(approve(_authorize_url(oauth_server, verifier, code_challenge_method="plain")))
    status, grant = _exchange(oauth_server, _query(location)["code"], verifier)
    assert status == 200
    assert grant["refresh_token"]


def test_deny_redirects_with_access_denied(oauth_server: OAuthServer) -> None:
    """The person pressing Deny: access_denied and the state, no code."""
    location = _Secret(approve(_authorize_url(oauth_server, _pkce()[1], state="d1"), decision="deny"))
    assert _query(location) == {"error": "access_denied", "state": "d1"}


def test_no_signed_in_user_is_a_400_page(oauth_server: OAuthServer) -> None:
    """Without login_hint (and no consent_user override) there is nobody to consent."""
    page = requests.get(_authorize_url(oauth_server, _pkce()[1], login_hint=None), allow_redirects=False, timeout=10)
    assert page.status_code == 400
    assert "Location" not in page.headers


def test_consent_user_override_signs_in_another_account_once(oauth_server: OAuthServer) -> None:
    """consent_user simulates signing in with a different Google account, for the next /authorize only."""
    oauth_server.admin("config", consent_user="Bob@Example.test")
    grant = _tokens(oauth_server, login_hint="anna@example.test")
    assert _b64url_json(grant["id_token"].split(".")[1])["email"] == "bob@example.test"
    assert oauth_server.introspect(grant["access_token"])["email"] == "bob@example.test"
    again = _tokens(oauth_server, login_hint="anna@example.test")
    assert _b64url_json(again["id_token"].split(".")[1])["email"] == "anna@example.test"


# -- code exchange -----------------------------------------------------------------------------------------------


def test_code_exchange_with_basic_client_auth_returns_tokens_for_the_user(oauth_server: OAuthServer) -> None:
    """The code grant answers Google's fields; the refresh token works like one from /admin/refresh_token."""
    code, verifier = _code(oauth_server, scope=f"{GMAIL} openid email")
    response = requests.post(
        oauth_server.token_uri,
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier},
        auth=(oauth_server.client_id, oauth_server.client_secret),
        timeout=10,
    )
    assert response.status_code == 200
    grant = _redacted(response.json())
    assert set(grant) == {"access_token", "expires_in", "refresh_token", "scope", "token_type", "id_token"}
    assert (grant["token_type"], grant["scope"]) == ("Bearer", f"{GMAIL} openid email")
    assert oauth_server.introspect(grant["access_token"])["email"] == "anna@example.test"
    status, refreshed = _refresh(oauth_server, grant["refresh_token"])
    assert status == 200
    assert refreshed["scope"] == grant["scope"]
    assert oauth_server.introspect(refreshed["access_token"])["email"] == "anna@example.test"
    stats = oauth_server.stats()
    assert (stats["grant:authorization_code"], stats["grant:refresh_token"]) == (1, 1)


def test_wrong_code_verifier_is_invalid_grant_and_the_right_one_works(oauth_server: OAuthServer) -> None:
    """PKCE: base64url(sha256(verifier)) must equal the challenge given at /authorize."""
    code, _verifier = _code(oauth_server)
    status, error = _exchange(oauth_server, code, secrets.token_urlsafe(48))
    assert (status, error) == (400, {"error": "invalid_grant", "error_description": "Invalid code verifier."})
    code, verifier = _code(oauth_server)
    status, grant = _exchange(oauth_server, code, verifier)
    assert status == 200
    assert grant["access_token"].startswith("ya29.")


def test_redirect_uri_must_match_the_authorize_request(oauth_server: OAuthServer) -> None:
    """The token request names the same redirect_uri as /authorize, or the code is refused."""
    code, verifier = _code(oauth_server)
    status, error = _exchange(oauth_server, code, verifier, redirect_uri="http://127.0.0.1:54321/other")
    assert (status, error) == (400, {"error": "invalid_grant", "error_description": "redirect_uri_mismatch"})


def test_unknown_code_is_malformed(oauth_server: OAuthServer) -> None:
    status, error = _exchange(oauth_server, "4/0-not-a-code", secrets.token_urlsafe(48))
    assert (status, error) == (400, {"error": "invalid_grant", "error_description": "Malformed auth code."})


def test_code_is_single_use_and_a_replay_revokes_what_it_issued(oauth_server: OAuthServer) -> None:
    """RFC 6749 10.5: the second exchange fails and kills the refresh and access tokens of the first."""
    code, verifier = _code(oauth_server)
    status, grant = _exchange(oauth_server, code, verifier)
    assert status == 200
    status, error = _exchange(oauth_server, code, verifier)
    assert (status, error["error"]) == (400, "invalid_grant")
    status, error = _refresh(oauth_server, grant["refresh_token"])
    assert (status, error) == (
        400,
        {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
    )
    assert oauth_server.introspect(grant["access_token"]) == {"active": False}


def test_code_expires_after_code_ttl(oauth_server: OAuthServer) -> None:
    """A code older than code_ttl seconds is refused (code_ttl=0: expired at once)."""
    oauth_server.admin("config", code_ttl="0")
    code, verifier = _code(oauth_server)
    status, error = _exchange(oauth_server, code, verifier)
    assert (status, error) == (400, {"error": "invalid_grant", "error_description": "Bad Request"})


def test_id_token_is_hs256_signed_with_the_client_secret_and_names_the_user(oauth_server: OAuthServer) -> None:
    """The id_token's claims identify the signed-in user; its signature verifies with the client secret."""
    before = int(time.time())
    grant = _tokens(oauth_server, nonce="n-123")
    head, body, signature = grant["id_token"].split(".")
    expected = hmac.new(oauth_server.client_secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert hmac.compare_digest(_b64url(expected), signature)
    assert _b64url_json(head) == {"alg": "HS256", "typ": "JWT"}
    claims = _b64url_json(body)
    assert claims.pop("iat") >= before
    assert claims.pop("exp") >= before + 3600
    assert claims == {
        "iss": oauth_server.url,
        "aud": oauth_server.client_id,
        "sub": "anna@example.test",
        "email": "anna@example.test",
        "email_verified": True,
        "preferred_username": "anna@example.test",
        "nonce": "n-123",
    }


def test_no_id_token_without_openid_scope(oauth_server: OAuthServer) -> None:
    grant = _tokens(oauth_server, scope=GMAIL)
    assert "id_token" not in grant
    assert grant["scope"] == GMAIL


# -- refresh rotation and revocation ------------------------------------------------------------------------------


def test_refresh_tokens_are_not_rotated_by_default(oauth_server: OAuthServer) -> None:
    """Google style: the same refresh token keeps working and no new one is returned."""
    refresh_token = _Secret(oauth_server.refresh_token("anna@example.test"))
    for _ in range(2):
        status, grant = _refresh(oauth_server, refresh_token)
        assert status == 200
        assert "refresh_token" not in grant


def test_rotation_returns_a_new_refresh_token_and_kills_the_presented_one(oauth_server: OAuthServer) -> None:
    """rotate_refresh=1 (Microsoft style): every grant rotates; the old token is dead at once."""
    oauth_server.admin("config", rotate_refresh="1")
    first = _Secret(oauth_server.refresh_token("anna@example.test"))
    status, grant = _refresh(oauth_server, first)
    assert status == 200
    second = grant["refresh_token"]
    assert second != first
    status, error = _refresh(oauth_server, first)
    assert (status, error) == (
        400,
        {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
    )
    status, again = _refresh(oauth_server, second)
    assert status == 200
    assert again["refresh_token"] not in (first, second)
    assert oauth_server.introspect(grant["access_token"])["email"] == "anna@example.test"
    response = requests.get(f"{oauth_server.url}/admin/stats", params={"refresh_token": first}, timeout=10)
    assert response.json() == {"token_calls": 1}
    oauth_server.admin("config", rotate_refresh="0")
    status, last = _refresh(oauth_server, again["refresh_token"])
    assert status == 200
    assert "refresh_token" not in last


def test_revoke_endpoint_revokes_a_refresh_token_with_its_access_tokens(oauth_server: OAuthServer) -> None:
    """POST /revoke token=<refresh token>: 200 {}, the grant dies, a second revoke is invalid_token."""
    refresh_token = _Secret(oauth_server.refresh_token("anna@example.test"))
    _status, grant = _refresh(oauth_server, refresh_token)
    assert _post(oauth_server.revoke_uri, token=refresh_token) == (200, {})
    assert oauth_server.introspect(grant["access_token"]) == {"active": False}
    status, error = _refresh(oauth_server, refresh_token)
    assert (status, error["error_description"]) == (400, "Token has been expired or revoked.")
    assert _post(oauth_server.revoke_uri, token=refresh_token) == (
        400,
        {"error": "invalid_token", "error_description": "Token expired or revoked"},
    )
    assert oauth_server.stats()["revoke"] == 2


def test_revoke_endpoint_takes_an_access_token_in_the_query(oauth_server: OAuthServer) -> None:
    """An access token revoked alone: its refresh token still works."""
    refresh_token = _Secret(oauth_server.refresh_token("anna@example.test"))
    _status, grant = _refresh(oauth_server, refresh_token)
    response = requests.post(oauth_server.revoke_uri, params={"token": grant["access_token"]}, timeout=10)
    assert (response.status_code, response.json()) == (200, {})
    assert oauth_server.introspect(grant["access_token"]) == {"active": False}
    assert _refresh(oauth_server, refresh_token)[0] == 200


def test_revoke_endpoint_refuses_an_unknown_token(oauth_server: OAuthServer) -> None:
    assert _post(oauth_server.revoke_uri, token="1//never-issued") == (
        400,
        {"error": "invalid_token", "error_description": "Token expired or revoked"},
    )


# -- domain-wide delegation (JWT bearer) ----------------------------------------------------------------------------


def _delegated(key_file: Path, subject: str, scopes: list[str] | None = None) -> service_account.Credentials:
    credentials = service_account.Credentials.from_service_account_file(str(key_file), scopes=scopes or [GMAIL])
    delegated: service_account.Credentials = credentials.with_subject(subject)
    return delegated


def test_google_auth_service_account_gets_a_token_for_the_subject(oauth_server: OAuthServer, tmp_path: Path) -> None:
    """google-auth's real domain-wide-delegation flow; the token introspects as the delegated user."""
    key_file = make_service_account(
        oauth_server, client_email="sync@inboxd-test.iam.example", domains=["example.test"], path=tmp_path / "sa.json"
    )
    assert key_file.stat().st_mode & 0o777 == 0o600
    credentials = _delegated(key_file, "anna@example.test")
    credentials.refresh(google.auth.transport.requests.Request())
    assert credentials.valid
    info = oauth_server.introspect(str(credentials.token))
    assert (info["active"], info["email"]) == (True, "anna@example.test")
    assert oauth_server.stats()["grant:jwt-bearer"] == 1


def test_subject_outside_the_delegated_domains_is_unauthorized_client(
    oauth_server: OAuthServer, tmp_path: Path
) -> None:
    key_file = make_service_account(
        oauth_server, client_email="sync@inboxd-test.iam.example", domains="example.test", path=tmp_path / "sa.json"
    )
    with pytest.raises(RefreshError, match="unauthorized_client"):
        _delegated(key_file, "mallory@example.org").refresh(google.auth.transport.requests.Request())


def test_scope_not_granted_to_the_service_account_is_unauthorized_client(
    oauth_server: OAuthServer, tmp_path: Path
) -> None:
    key_file = make_service_account(
        oauth_server, client_email="sync@inboxd-test.iam.example", domains="example.test", path=tmp_path / "sa.json"
    )
    credentials = _delegated(key_file, "anna@example.test", ["https://www.googleapis.com/auth/admin.directory.user"])
    with pytest.raises(RefreshError, match="unauthorized_client"):
        credentials.refresh(google.auth.transport.requests.Request())


def test_assertion_signed_with_another_key_is_invalid_grant(oauth_server: OAuthServer, tmp_path: Path) -> None:
    """A key file naming a registered service account but holding another private key fails the signature."""
    genuine = make_service_account(
        oauth_server, client_email="sync@inboxd-test.iam.example", domains="example.test", path=tmp_path / "sa.json"
    )
    forged = json.loads(genuine.read_text())
    forged["private_key"] = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    forged_file = tmp_path / "forged.json"
    forged_file.write_text(json.dumps(forged))
    with pytest.raises(RefreshError, match=r"invalid_grant: Invalid JWT Signature\."):
        _delegated(forged_file, "anna@example.test").refresh(google.auth.transport.requests.Request())


def _assertion(key_file: Path, **claims: object) -> str:
    """An RS256 assertion signed with the key file's private key (for claims google-auth would not produce)."""
    info = json.loads(key_file.read_text())
    key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": info["private_key_id"]}).encode())
    body = _b64url(json.dumps(claims).encode())
    signature = key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{_b64url(signature)}"


def test_jwt_audience_and_lifetime_are_checked(oauth_server: OAuthServer, tmp_path: Path) -> None:
    """aud must name this server's token URL (or Google's, as google-auth sends); exp/iat must describe a
    short-lived token issued about now."""
    email = "sync@inboxd-test.iam.example"
    key_file = make_service_account(oauth_server, client_email=email, domains="example.test", path=tmp_path / "sa.json")
    now = int(time.time())
    good = {"iss": email, "aud": oauth_server.token_uri, "scope": GMAIL, "sub": "anna@example.test"}
    cases: list[tuple[dict[str, object], str]] = [
        ({"aud": "https://login.microsoftonline.com/common/oauth2/v2.0/token"}, "Invalid JWT: Failed audience check."),
        ({"aud": "http://127.0.0.1:1/token"}, "Invalid JWT: Failed audience check."),
        ({"iat": now - 7200, "exp": now - 3600}, SHORT_LIVED),
        ({"iat": now, "exp": now + 7200}, SHORT_LIVED),
        ({"iat": now + 600, "exp": now + 1200}, SHORT_LIVED),
    ]
    for change, description in cases:
        assertion = _assertion(key_file, **{**good, "iat": now, "exp": now + 3600, **change})
        status, error = _post(
            oauth_server.token_uri, grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer", assertion=assertion
        )
        assert (status, error) == (400, {"error": "invalid_grant", "error_description": description}), change
    status, error = _post(
        oauth_server.token_uri,
        grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer",
        assertion=_assertion(key_file, **{**good, "iat": now, "exp": now + 3600, "sub": None}),
    )
    assert (status, error["error"]) == (401, "unauthorized_client")
    status, grant = _post(
        oauth_server.token_uri,
        grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer",
        assertion=_assertion(key_file, **{**good, "iat": now, "exp": now + 3600}),
    )
    assert status == 200
    assert set(grant) == {"access_token", "expires_in", "token_type"}


# -- app-only (client credentials) ---------------------------------------------------------------------------------


def _client_credentials(server: OAuthServer, scope: str = M365) -> tuple[int, dict[str, Any]]:
    return _post(
        server.token_uri,
        grant_type="client_credentials",
        scope=scope,
        client_id=server.client_id,
        client_secret=server.client_secret,
    )


def test_client_credentials_token_is_app_only_without_a_user(oauth_server: OAuthServer) -> None:
    """An app-only token introspects active with app_only and no email; /userinfo refuses it."""
    status, grant = _client_credentials(oauth_server)
    assert status == 200
    assert "refresh_token" not in grant
    info = oauth_server.introspect(grant["access_token"])
    assert info["active"] is True
    assert info["app_only"] is True
    assert (info["client_id"], info["scope"]) == (oauth_server.client_id, M365)
    assert not {"email", "username", "sub"} & set(info)
    userinfo = requests.get(
        f"{oauth_server.url}/userinfo", headers={"Authorization": f"Bearer {grant['access_token']}"}, timeout=10
    )
    assert userinfo.status_code == 401
    assert oauth_server.stats()["grant:client_credentials"] == 1


def test_client_credentials_refusals(oauth_server: OAuthServer) -> None:
    """Wrong scope -> invalid_scope; no client secret -> invalid_client; app_only=0 -> AADSTS7000229."""
    status, error = _client_credentials(oauth_server, scope=GMAIL)
    assert (status, error["error"]) == (400, "invalid_scope")
    status, error = _post(oauth_server.token_uri, grant_type="client_credentials", scope=M365)
    assert (status, error["error"]) == (401, "invalid_client")
    oauth_server.admin("config", app_only="0")
    status, error = _client_credentials(oauth_server)
    assert status == 400
    assert error == {
        "error": "unauthorized_client",
        "error_description": "AADSTS7000229: The client application is missing service principal in the tenant.",
    }


# -- admin -------------------------------------------------------------------------------------------------------


def test_admin_config_rejects_unknown_keys_and_bad_values_without_applying_anything(
    oauth_server: OAuthServer,
) -> None:
    for form in ({"bogus": "1"}, {"rotate_refresh": "1", "consent": "sometimes"}, {}):
        response = requests.post(f"{oauth_server.url}/admin/config", data=form, timeout=10)
        assert response.status_code == 400, form
    settings = oauth_server.admin("config", code_ttl="60")
    assert settings["rotate_refresh"] is False
    assert settings["consent"] == "auto"
    assert settings["require_pkce"] is True


def test_private_server_writes_its_port_and_stops_on_close() -> None:
    """--port 0 binds a free port that the port file names; close() ends the process."""
    server = OAuthServer()
    try:
        assert requests.get(f"{server.url}/healthz", timeout=5).json()["ok"] is True
        assert server.port != 11080
    finally:
        server.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/healthz", timeout=2)
