"""The consent flow's pure parts: the authorization URL, the provider's answer, identity checks, the sealed state,
return_to and signed links, and the config keys behind them."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.fernet import Fernet

from inboxd.clock import FakeClock
from inboxd.config import Config, ProviderConfig, parse_config
from inboxd.connect import check_return_to, check_signature, sign_start
from inboxd.connect_state import ConnectState, StateCodec
from inboxd.errors import ConfigError, ConnectFailed, UsageError
from inboxd.oauth_flow import (
    _id_token_email,
    authorization_url,
    callback_error,
    challenge_for,
    check_identity,
    missing_scopes,
    new_pkce,
)

GMAIL = """
[providers.gmail]
client_id = "123.apps.googleusercontent.com"
client_secret = "gmail-client-secret"
"""
M365 = """
[providers.m365]
kind = "microsoft"
tenant = "contoso.onmicrosoft.com"
client_id = "00000000-aaaa"
client_secret = "m365-client-secret"
"""


def parse(tmp_path: Path, text: str) -> Config:
    return parse_config(text, path=tmp_path / "inboxd.toml", env={})


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_gmail_authorization_url_asks_offline_consent_with_pkce(tmp_path: Path) -> None:
    provider = parse(tmp_path, GMAIL).providers["gmail"]
    pkce = new_pkce()
    url = authorization_url(provider, redirect_uri="http://127.0.0.1:5/", state="s1", pkce=pkce, login_hint="a@x.test")
    assert url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    q = query(url)
    assert q["scope"] == "https://mail.google.com/ openid email"
    assert (q["response_type"], q["access_type"], q["prompt"]) == ("code", "offline", "consent")
    assert (q["code_challenge_method"], q["code_challenge"]) == ("S256", challenge_for(pkce.verifier))
    assert (q["state"], q["login_hint"], q["redirect_uri"]) == ("s1", "a@x.test", "http://127.0.0.1:5/")
    assert pkce.verifier not in url
    assert 43 <= len(pkce.verifier) <= 128


def test_pkce_challenge_is_rfc7636_s256() -> None:
    # RFC 7636 appendix B
    assert challenge_for("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_microsoft_urls_and_scopes_follow_the_tenant(tmp_path: Path) -> None:
    provider = parse(tmp_path, M365).providers["m365"]
    assert provider.auth_uri == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize"
    assert provider.revoke_uri is None  # Microsoft has no RFC 7009 endpoint
    q = query(
        authorization_url(
            provider, redirect_uri="http://localhost:1/", state="s", pkce=new_pkce(), login_hint="b@c.test"
        )
    )
    assert q["scope"].split() == [
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
        "offline_access",
        "openid",
        "email",
    ]
    assert q["response_mode"] == "query"
    assert "access_type" not in q


def test_callback_errors_are_named() -> None:
    assert callback_error({"code": "c", "state": "s"}) is None
    denied = callback_error({"error": "access_denied", "state": "s"})
    assert denied is not None and denied.code == "access_denied"
    other = callback_error({"error": "invalid_scope", "error_description": "bad\x00 scope"})
    assert other is not None and other.code == "invalid_scope" and "\x00" not in str(other)
    empty = callback_error({"state": "s"})
    assert empty is not None and empty.code == "provider_error"


@pytest.mark.parametrize(
    ("expected", "signed_in", "ok"),
    [
        ("Anna@Example.test", "anna@example.test", True),
        ("anna@gmail.com", "anna@googlemail.com", True),
        ("anna@example.test", "bob@example.test", False),
        ("anna@example.test", "anna@example.test.evil", False),
    ],
)
def test_identity_must_be_the_mailbox_asked_for(expected: str, signed_in: str, ok: bool) -> None:
    if ok:
        check_identity(expected, signed_in)
    else:
        with pytest.raises(ConnectFailed, match="sign in with") as info:
            check_identity(expected, signed_in)
        assert info.value.code == "wrong_account"


def jwt(claims: dict[str, object]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.sig"


def test_identity_comes_from_the_id_token() -> None:
    assert _id_token_email(jwt({"email": "Anna@Example.test"})) == "anna@example.test"
    assert _id_token_email(jwt({"preferred_username": "b@contoso.test"})) == "b@contoso.test"
    for bad in (None, "not-a-jwt", jwt({"sub": "123"}), "a.!!!.c"):
        with pytest.raises(ConnectFailed) as info:
            _id_token_email(bad)
        assert info.value.code == "no_identity"


def test_unticked_mail_scope_is_missing(tmp_path: Path) -> None:
    provider = parse(tmp_path, GMAIL).providers["gmail"]
    assert missing_scopes(provider, ("openid", "email")) == ["https://mail.google.com/"]
    assert missing_scopes(provider, ("https://mail.google.com/",)) == []


# -- sealed state ---------------------------------------------------------------------------------------------


def test_state_round_trips_and_expires() -> None:
    clock = FakeClock()
    codec = StateCodec(Fernet(Fernet.generate_key()), clock=clock, lifetime=timedelta(minutes=15))
    state = ConnectState("a@x.test", "gmail", "https://hr.test/back", "verifier-xyz", hr_user_ref="7")
    sealed = codec.seal(state)
    assert "verifier-xyz" not in sealed and "a@x.test" not in sealed  # encrypted, not only signed
    opened = codec.open(sealed)
    assert (opened.email, opened.verifier, opened.hr_user_ref) == ("a@x.test", "verifier-xyz", "7")
    clock.advance(16 * 60)
    with pytest.raises(ConnectFailed) as info:
        codec.open(sealed)
    assert info.value.code == "expired"


def test_forged_or_foreign_state_is_refused() -> None:
    clock = FakeClock()
    codec = StateCodec(Fernet(Fernet.generate_key()), clock=clock)
    other = StateCodec(Fernet(Fernet.generate_key()), clock=clock)
    sealed = other.seal(ConnectState("a@x.test", "gmail", "https://hr.test/", "v"))
    for bad in (sealed, sealed[:-4] + "AAAA", "", "ünïcode"):
        with pytest.raises(ConnectFailed):
            codec.open(bad)


# -- return_to and signed links ---------------------------------------------------------------------------------

ORIGINS = frozenset({"https://hr.example.com"})


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/x",
        "https://hr.example.com.evil.test/",
        "http://hr.example.com/",  # scheme is part of the origin
        "https://user@hr.example.com/",
        "//hr.example.com/",
        "/relative",
        "javascript:alert(1)",
        "",
    ],
)
def test_return_to_must_be_on_an_allowed_origin(url: str) -> None:
    with pytest.raises(UsageError):
        check_return_to(url, ORIGINS)


def test_return_to_on_allowed_origin_passes() -> None:
    check_return_to("https://hr.example.com/candidates/7?tab=mail", ORIGINS)
    check_return_to("https://HR.example.com/", ORIGINS)


def test_signed_start_links() -> None:
    token = "t" * 40
    params = {"email": "a@x.test", "provider": "gmail", "return_to": "https://hr.example.com/", "expires": "2000"}
    signed = {**params, "sig": sign_start(params, token)}
    check_signature(signed, token, now=1000)
    with pytest.raises(ConnectFailed):
        check_signature(signed, token, now=3000)  # expired
    with pytest.raises(UsageError, match="signature"):
        check_signature({**signed, "email": "b@x.test"}, token, now=1000)
    with pytest.raises(UsageError, match="not signed"):
        check_signature(params, token, now=1000)


# -- config ---------------------------------------------------------------------------------------------------


def test_http_connect_settings(tmp_path: Path) -> None:
    (tmp_path / "api.token").write_text("k" * 40 + "\n")
    config = parse(
        tmp_path,
        '[http]\npublic_url = "https://inboxd.example.com/"\nreturn_to_origins = ["https://HR.example.com"]\n'
        'api_token_file = "api.token"\n',
    )
    assert config.http.redirect_uri == "https://inboxd.example.com/oauth/callback"
    assert config.http.return_to_origins == {"https://hr.example.com"}
    assert config.http.api_token == "k" * 40
    assert "k" * 40 not in repr(config)
    assert parse(tmp_path, "").http.redirect_uri == "http://127.0.0.1:9810/oauth/callback"


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[http]\npublic_url = "http://inboxd.example.com"', "http.public_url", "http(s) URL"),
        ('[http]\npublic_url = "https://x.test/path"', "http.public_url", "without path"),
        ('[http]\nreturn_to_origins = ["hr.example.com"]', "http.return_to_origins", "origins"),
        ('[http]\napi_token_file = "missing"', "http.api_token_file", "file not found"),
        (GMAIL + 'scopes = "https://mail.google.com/"', "providers.gmail.scopes", "a list of scopes"),
        (GMAIL + 'auth_uri = "http://accounts.example.com/"', "providers.gmail.auth_uri", "https://"),
        (GMAIL + "app_only = true", "providers.gmail.app_only", 'kind = "microsoft"'),
        (M365 + 'service_account_file = "sa.json"', "providers.m365.service_account_file", 'kind = "gmail"'),
        (GMAIL + 'service_account_file = "nope.json"', "providers.gmail.service_account_file", "file not found"),
    ],
)
def test_connect_config_mistakes_are_named(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, text)
    assert key in str(info.value)
    assert fragment in str(info.value)


def test_short_api_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "api.token").write_text("short")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        parse(tmp_path, '[http]\napi_token_file = "api.token"')


def test_delegation_keys(tmp_path: Path) -> None:
    (tmp_path / "sa.json").write_text("{}")
    gmail = parse(tmp_path, GMAIL + 'service_account_file = "sa.json"').providers["gmail"]
    assert gmail.delegation == "service_account"
    m365: ProviderConfig = parse(tmp_path, M365 + "app_only = true").providers["m365"]
    assert m365.delegation == "app_only"
    assert parse(tmp_path, GMAIL).providers["gmail"].delegation is None


def test_a_delegation_only_gmail_provider_needs_no_oauth_client(tmp_path: Path) -> None:
    (tmp_path / "sa.json").write_text("{}")
    provider = parse(tmp_path, '[providers.ws]\nkind = "gmail"\nservice_account_file = "sa.json"\n').providers["ws"]
    assert (provider.client_id, provider.client_secret, provider.delegation) == (None, None, "service_account")
    with pytest.raises(UsageError, match="only connect mailboxes with --delegated"):
        authorization_url(provider, redirect_uri="http://127.0.0.1:1/", state="s", pkce=new_pkce(), login_hint="a@b.c")
    with pytest.raises(ConfigError, match="client_id"):
        parse(tmp_path, '[providers.ws]\nkind = "gmail"\n')
