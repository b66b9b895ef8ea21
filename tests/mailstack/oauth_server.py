#!/usr/bin/env python3
"""Local OAuth2 authorization server for inboxd's loopback tests (stdlib only, in-memory, 127.0.0.1).

Speaks Google's wire format (JSON errors {"error", "error_description"}) so the daemon's real adapters (requests,
google-auth) can be pointed at it: consent with PKCE, token grants, revocation, introspection for Dovecot.

Endpoints
  GET  /authorize             RFC 6749 4.1 + PKCE: response_type=code, client_id, redirect_uri, scope, state,
                              code_challenge, code_challenge_method=S256, login_hint[, nonce] -> HTML consent page
                              (auto-submitted with decision=allow unless consent=manual). A bad client_id or
                              redirect_uri -> 400 HTML page, never a redirect; other errors redirect to redirect_uri
                              with error/error_description/state. Allowed redirect_uri: http://127.0.0.1:<port>/...,
                              http://localhost:<port>/... and those registered via /admin/config redirect_uri=.
                              Signed-in user: the one-shot /admin/config consent_user, else login_hint.
  POST /authorize             the consent form: decision=allow -> 302 redirect_uri?code=&state= (code: single use,
                              code_ttl s, bound to client, redirect_uri, challenge, user, scope);
                              decision=deny -> 302 redirect_uri?error=access_denied&state=
  POST /token                 client auth via form body or HTTP Basic (not for jwt-bearer); errors as Google's:
                grant_type=refresh_token      -> {"access_token", "expires_in", "scope", "token_type"}
                                                 (+ a new "refresh_token" while rotate_refresh=1; the old one dies)
                grant_type=authorization_code -> {"access_token", "expires_in", "refresh_token", "scope",
                                                 "token_type", "id_token" (only with scope openid; HS256 signed
                                                 with the client secret)}; a reused code revokes what it issued
                grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer (RFC 7523, Workspace domain-wide
                                                 delegation, RS256 assertion of a registered service account;
                                                 aud: this server's /token or https://oauth2.googleapis.com/token,
                                                 which google-auth always sends)
                                              -> {"access_token", "expires_in", "token_type"} for the JWT's sub
                grant_type=client_credentials (Microsoft 365 app-only, scope https://outlook.office365.com/.default)
                                              -> {"access_token", "expires_in", "ext_expires_in", "token_type"}
  POST /revoke                RFC 7009 as Google (form or query token=): 200 {} / 400 invalid_token when unknown
  POST /introspect            RFC 7662 (form: token=...), called by Dovecot's oauth2 passdb (HTTP Basic auth);
                              app-only tokens answer {"active", "app_only": true, ...} without email/username
  GET  /userinfo              Authorization: Bearer <token> -> {"email": ...} or 401 (also for app-only tokens)
  POST /admin/refresh_token   user=<email>[&refresh_token=<rt>] -> {"refresh_token": ..., "user": ...}
  POST /admin/access_token    user=<email>[&ttl=N]              -> {"access_token": ..., "expires_in": N}
  POST /admin/revoke          token=<refresh or access token>   -> {}  (a refresh token takes its access tokens along)
  POST /admin/service_account client_email, n, e (RSA public numbers, decimal), domains=a.test,b.test
                              [&scopes=s1,s2 (default https://mail.google.com/)] -> {"client_email": ...}
  POST /admin/config          any of, validated together (400 on an unknown key or bad value), -> the settings:
                                access_ttl=N[&user=<email>]  global access-token TTL, or one user's (empty clears)
                                require_pkce=0|1 (1)   consent=auto|manual (auto)   consent_user=<email> (one-shot)
                                redirect_uri=<uri> (repeatable, appends)   rotate_refresh=0|1 (0)
                                app_only=0|1 (1)   code_ttl=N (60)
  GET  /admin/issued            -> {"secrets": [...]}: every token and code minted (the run checks its logs for them)
  GET  /admin/stats[?refresh_token=<rt>] -> {"stats": {...}, "token_calls": {rt: n}, ...} or {"token_calls": n}
  GET  /healthz               -> {"ok": true, "stats": {...}}

Stats: calls per endpoint ("token", "introspect", "userinfo", "authorize", "consent", "revoke") and /token calls per
grant ("grant:refresh_token", "grant:authorization_code", "grant:jwt-bearer", "grant:client_credentials").
Any user email is accepted: users need no setup besides getting a token.
"""

import argparse
import base64
import contextlib
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
M365_DEFAULT_SCOPE = "https://outlook.office365.com/.default"
GMAIL_SCOPE = "https://mail.google.com/"
# google-auth's service-account assertion always names Google's endpoint as aud, whatever token_uri it posts to
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")  # DER prefix, RFC 8017 9.2 note 1
PKCE_VALUE = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 4.1 (verifier); an S256 challenge is 43 of these
LOOPBACK_REDIRECT = re.compile(r"http://(127\.0\.0\.1|localhost):[0-9]{1,5}(/[^#]*)?")

LOCK = threading.Lock()
REFRESH = {}  # refresh_token -> {"user", "scope"?, "family"?} (family: the first token of a rotation chain)
REVOKED = set()  # refresh tokens revoked or rotated away (Google answers invalid_grant "expired or revoked")
ACCESS = {}  # access_token -> {"user", "exp", "client_id", "scope", "refresh_token", "app_only"?}
USER_TTL = {}  # user -> access-token TTL overriding CONFIG["access_ttl"]
TOKEN_CALLS = {}  # refresh_token -> successful /token grants
CODES = {}  # authorization code -> {"client_id", "redirect_uri", "challenge", "method", "user", "scope", "nonce",
#                                    "exp", "used", "refresh_token"}
SERVICE_ACCOUNTS = {}  # client_email -> {"n", "e", "domains": set, "scopes": set}
REDIRECT_URIS = []  # non-loopback redirect URIs registered via /admin/config
CONFIG = {}
ISSUED = set()  # every token and code ever minted: the test run checks that none of them reached a log
ISSUED_LOCK = threading.Lock()  # its own lock: tokens are minted while LOCK is held
STATS = {"introspect": 0, "token": 0, "userinfo": 0, "authorize": 0, "consent": 0, "revoke": 0}

GRANT_STAT = {
    "refresh_token": "grant:refresh_token",
    "authorization_code": "grant:authorization_code",
    JWT_BEARER: "grant:jwt-bearer",
    "client_credentials": "grant:client_credentials",
}
SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
UNAUTHORIZED_CLIENT = (
    "Client is unauthorized to retrieve access tokens using this method, "
    "or client not authorized for any of the scopes requested."
)


class OAuthError(Exception):
    """An error answer: JSON {"error", "error_description"} with an HTTP status (token/revoke endpoints)."""

    def __init__(self, status, error, description):
        super().__init__(error)
        self.status, self.error, self.description = status, error, description


class PageError(Exception):
    """/authorize cannot trust redirect_uri (or has no user): an HTML error page, never a redirect."""

    def __init__(self, error, description):
        super().__init__(error)
        self.error, self.description = error, description


class RedirectError(Exception):
    """/authorize error that goes back to the (validated) redirect_uri, RFC 6749 4.1.2.1."""

    def __init__(self, error, description):
        super().__init__(error)
        self.error, self.description = error, description


# -- pure helpers ---------------------------------------------------------------------------------------------------


def _basic_auth(header):
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header.split(None, 1)[1]).decode()
    except ValueError:
        return None
    user, _, pw = raw.partition(":")
    return user, pw


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _pkce_s256(verifier):
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def _jwt_hs256(claims, key):
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


def _rs256_valid(signing_input, signature, n, e):
    """RSASSA-PKCS1-v1_5 verification with SHA-256 (RFC 8017 8.2.2), stdlib only."""
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:
        return False
    em = pow(s, e, n).to_bytes(k, "big")
    t = SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
    if k < len(t) + 11:
        return False
    expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return hmac.compare_digest(em, expected)


def _redirect_allowed(uri):
    if LOOPBACK_REDIRECT.fullmatch(uri or ""):
        return True
    with LOCK:
        return uri in REDIRECT_URIS


def _with_query(uri, params):
    return uri + ("&" if urlsplit(uri).query else "?") + urlencode(params)


def _flag(raw):
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


# -- token state (callers hold no lock) ------------------------------------------------------------------------------


def _token_state(tok):
    with LOCK:
        info = ACCESS.get(tok)
        if info is None:
            return None, "unknown token"
        if info["exp"] <= time.time():
            return None, "token expired"
        return info, None


def _ttl_for(user):
    with LOCK:
        return USER_TTL.get(user, CONFIG["access_ttl"])


def _mint_access(user, client_id, ttl, scope, refresh_token=None, app_only=False):
    tok = "ya29." + secrets.token_urlsafe(32)
    with ISSUED_LOCK:
        ISSUED.add(tok)
    with LOCK:
        ACCESS[tok] = {
            "user": user,
            "exp": time.time() + ttl,
            "client_id": client_id,
            "scope": scope,
            "refresh_token": refresh_token,
            "app_only": app_only,
        }
    return tok


def _new_refresh_token():
    token = "1//" + secrets.token_urlsafe(36)
    with ISSUED_LOCK:
        ISSUED.add(token)
    return token


def _revoke_refresh_locked(rt):
    """Revoke a refresh token and the access tokens minted from it; LOCK must be held."""
    if REFRESH.pop(rt, None) is None:
        return False
    REVOKED.add(rt)
    for at in [a for a, i in ACCESS.items() if i["refresh_token"] == rt]:
        del ACCESS[at]
    return True


def _revoke_family_locked(family):
    """Revoke every refresh token of a rotation chain (RFC 6749 10.5: a reused code's grant)."""
    for rt in [r for r, i in REFRESH.items() if i.get("family", r) == family]:
        _revoke_refresh_locked(rt)


# -- /authorize ------------------------------------------------------------------------------------------------------


def _check_client_and_redirect(params):
    if params.get("client_id") != CONFIG["client_id"]:
        raise PageError("invalid_client", "The OAuth client was not found.")
    if not _redirect_allowed(params.get("redirect_uri", "")):
        raise PageError(
            "redirect_uri_mismatch",
            "You can't sign in to this app because it doesn't comply with the OAuth 2.0 policy: "
            f"redirect_uri={params.get('redirect_uri', '')!r} is not registered for this client.",
        )


def _check_request(params):
    """Everything but client and redirect_uri: errors the client hears about on its redirect_uri."""
    if params.get("response_type") != "code":
        raise RedirectError("unsupported_response_type", f"Invalid response_type: {params.get('response_type', '')}")
    if not params.get("scope", "").split():
        raise RedirectError("invalid_request", "Missing required parameter: scope")
    challenge, method = params.get("code_challenge", ""), params.get("code_challenge_method", "")
    if CONFIG["require_pkce"]:
        if not challenge:
            raise RedirectError("invalid_request", "Missing required parameter: code_challenge")
        if method != "S256":
            raise RedirectError("invalid_request", "Invalid code_challenge_method: S256 is required")
    if challenge:
        if method not in ("", "plain", "S256"):
            raise RedirectError("invalid_request", f"Invalid code_challenge_method: {method}")
        if not PKCE_VALUE.fullmatch(challenge) or (method == "S256" and len(challenge) != 43):
            raise RedirectError("invalid_request", "Invalid code_challenge")


def _consent_page(params, user):
    esc = html.escape
    scopes = "".join(f"<li>{esc(s)}</li>" for s in params.get("scope", "").split())
    # the user travels in the form because this test server keeps no browser session
    fields = {**{k: v for k, v in params.items() if k not in ("user", "decision")}, "user": user}
    inputs = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in fields.items())
    script = ""
    if CONFIG["consent"] == "auto":
        script = (
            "<script>window.addEventListener('load', function () {"
            " var form = document.getElementById('consent');"
            " var decision = document.createElement('input');"
            " decision.type = 'hidden'; decision.name = 'decision'; decision.value = 'allow';"
            " form.appendChild(decision); form.submit(); });</script>"
        )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Sign in - inboxd test OAuth</title></head><body>'
        f'<h1>Sign in - inboxd test OAuth</h1><p>Signed in as <b id="user">{esc(user)}</b></p>'
        f'<p>{esc(params.get("client_id", ""))} wants to access your account:</p><ul id="scopes">{scopes}</ul>'
        f'<form id="consent" method="post" action="/authorize">{inputs}'
        '<button type="submit" name="decision" value="allow">Allow</button>'
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
        f"{script}</body></html>"
    )


def _error_page(error, description):
    esc = html.escape
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Error 400 - inboxd test OAuth</title></head><body>'
        f'<h1>Access blocked: authorization error</h1><p id="error">Error 400: {esc(error)}</p>'
        f'<p id="error_description">{esc(description)}</p></body></html>'
    )


# -- /token grants ---------------------------------------------------------------------------------------------------


def _grant_refresh_token(form, client_id):
    rt_value = form.get("refresh_token", "")
    with LOCK:
        rt = REFRESH.get(rt_value)
        if rt is None:
            # Google's exact wording for both cases
            desc = "Token has been expired or revoked." if rt_value in REVOKED else "Bad Request"
            raise OAuthError(400, "invalid_grant", desc)
        TOKEN_CALLS[rt_value] = TOKEN_CALLS.get(rt_value, 0) + 1  # counted under the token presented
        current = rt_value
        answer = {"scope": rt.get("scope", CONFIG["scope"]), "token_type": "Bearer"}
        if CONFIG["rotate_refresh"]:
            # Microsoft style: the presented token dies at once, its live access tokens move to the successor
            del REFRESH[rt_value]
            REVOKED.add(rt_value)
            current = _new_refresh_token()
            REFRESH[current] = {**rt, "family": rt.get("family", rt_value)}
            for info in ACCESS.values():
                if info["refresh_token"] == rt_value:
                    info["refresh_token"] = current
            answer["refresh_token"] = current
    ttl = _ttl_for(rt["user"])
    answer["access_token"] = _mint_access(rt["user"], client_id, ttl, answer["scope"], current)
    answer["expires_in"] = ttl
    return answer


def _grant_authorization_code(form, client_id, issuer):
    code_value = form.get("code", "")
    with LOCK:
        code = CODES.get(code_value)
        if code is None:
            raise OAuthError(400, "invalid_grant", "Malformed auth code.")
        if code["used"]:
            # RFC 6749 10.5: a replayed code revokes the tokens it was exchanged for
            if code["refresh_token"]:
                _revoke_family_locked(code["refresh_token"])
            raise OAuthError(400, "invalid_grant", "Bad Request")
        code["used"] = True  # any attempt consumes the code: no guessing the verifier
    if code["exp"] <= time.time() or code["client_id"] != client_id:
        raise OAuthError(400, "invalid_grant", "Bad Request")
    if form.get("redirect_uri", "") != code["redirect_uri"]:
        raise OAuthError(400, "invalid_grant", "redirect_uri_mismatch")
    if code["challenge"]:
        verifier = form.get("code_verifier", "")
        derived = _pkce_s256(verifier) if code["method"] == "S256" else verifier
        if not PKCE_VALUE.fullmatch(verifier) or not hmac.compare_digest(derived, code["challenge"]):
            raise OAuthError(400, "invalid_grant", "Invalid code verifier.")
    user, scope = code["user"], code["scope"]
    rt = _new_refresh_token()
    with LOCK:
        REFRESH[rt] = {"user": user, "scope": scope}
        REVOKED.discard(rt)
        code["refresh_token"] = rt
    ttl = _ttl_for(user)
    answer = {
        "access_token": _mint_access(user, client_id, ttl, scope, rt),
        "expires_in": ttl,
        "refresh_token": rt,
        "scope": scope,
        "token_type": "Bearer",
    }
    if "openid" in scope.split():
        now = int(time.time())
        claims = {
            "iss": issuer,
            "aud": client_id,
            "sub": user,
            "email": user,
            "email_verified": True,
            "preferred_username": user,
            "iat": now,
            "exp": now + 3600,
        }
        if code["nonce"]:
            claims["nonce"] = code["nonce"]
        answer["id_token"] = _jwt_hs256(claims, CONFIG["client_secret"])
    return answer


def _grant_jwt_bearer(form, token_url):
    bad_signature = OAuthError(400, "invalid_grant", "Invalid JWT Signature.")
    try:
        head_b64, body_b64, sig_b64 = form.get("assertion", "").split(".")
        header = json.loads(_b64url_decode(head_b64))
        claims = json.loads(_b64url_decode(body_b64))
        signature = _b64url_decode(sig_b64)
    except ValueError:
        raise bad_signature from None
    if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256":
        raise bad_signature
    iss = claims.get("iss")
    with LOCK:
        account = SERVICE_ACCOUNTS.get(iss) if isinstance(iss, str) else None
    if account is None or not _rs256_valid(f"{head_b64}.{body_b64}".encode(), signature, account["n"], account["e"]):
        raise bad_signature
    if claims.get("aud") not in (token_url, GOOGLE_TOKEN_AUDIENCE):
        raise OAuthError(400, "invalid_grant", "Invalid JWT: Failed audience check.")
    iat, exp, now = claims.get("iat"), claims.get("exp"), time.time()
    if (
        not isinstance(iat, (int, float))
        or not isinstance(exp, (int, float))
        or exp <= now
        or exp - iat > 3600
        or iat > now + 60
    ):
        raise OAuthError(400, "invalid_grant", SHORT_LIVED)
    scopes = str(claims.get("scope") or "").split()
    if not scopes:
        raise OAuthError(400, "invalid_scope", "Empty or missing scope not allowed.")
    sub = str(claims.get("sub") or "").strip().lower()
    _local, at, domain = sub.rpartition("@")
    if not at or domain not in account["domains"] or not set(scopes) <= account["scopes"]:
        raise OAuthError(401, "unauthorized_client", UNAUTHORIZED_CLIENT)
    ttl = _ttl_for(sub)
    token = _mint_access(sub, iss, ttl, " ".join(scopes))
    return {"access_token": token, "expires_in": ttl, "token_type": "Bearer"}


def _grant_client_credentials(form, client_id):
    if form.get("scope", "").strip() != M365_DEFAULT_SCOPE:
        raise OAuthError(
            400, "invalid_scope", "AADSTS70011: The provided value for the input parameter 'scope' is not valid."
        )
    if not CONFIG["app_only"]:
        raise OAuthError(
            400,
            "unauthorized_client",
            "AADSTS7000229: The client application is missing service principal in the tenant.",
        )
    ttl = CONFIG["access_ttl"]
    token = _mint_access(None, client_id, ttl, M365_DEFAULT_SCOPE, app_only=True)
    return {"access_token": token, "expires_in": ttl, "ext_expires_in": ttl, "token_type": "Bearer"}


# -- /admin/config ---------------------------------------------------------------------------------------------------

CONFIG_KEYS = {
    "require_pkce": _flag,
    "rotate_refresh": _flag,
    "app_only": _flag,
    "code_ttl": int,
    "consent": lambda raw: {"auto": "auto", "manual": "manual"}[raw.strip().lower()],
}


def _apply_config(form):
    """Validate every key first, then apply them all: a 400 changes nothing."""
    unknown = set(form) - {*CONFIG_KEYS, "access_ttl", "user", "consent_user", "redirect_uri"}
    if unknown or not form:
        raise ValueError(f"unknown or no config keys: {sorted(unknown)}")
    values = {}
    for key, parse in CONFIG_KEYS.items():
        if key in form:
            try:
                values[key] = parse(form[key][-1])
            except (KeyError, ValueError):
                raise ValueError(f"bad value for {key}: {form[key][-1]!r}") from None
    user = form.get("user", [""])[-1].strip().lower()
    if user and "access_ttl" not in form:
        raise ValueError("user= needs access_ttl=")
    ttl_raw = form["access_ttl"][-1].strip() if "access_ttl" in form else None
    if ttl_raw is not None and (ttl_raw or not user):
        int(ttl_raw)  # raises ValueError for the caller
    for uri in form.get("redirect_uri", []):
        if not urlsplit(uri).scheme or not urlsplit(uri).netloc:
            raise ValueError(f"not an absolute redirect_uri: {uri!r}")
    with LOCK:
        CONFIG.update(values)
        if ttl_raw is not None:
            if user and not ttl_raw:
                USER_TTL.pop(user, None)
            elif user:
                USER_TTL[user] = int(ttl_raw)
            else:
                CONFIG["access_ttl"] = int(ttl_raw)
        if "consent_user" in form:
            CONFIG["consent_user"] = form["consent_user"][-1].strip().lower() or None
        REDIRECT_URIS.extend(u for u in form.get("redirect_uri", []) if u not in REDIRECT_URIS)
        return {
            "access_ttl": CONFIG["access_ttl"],
            "user_ttl": dict(USER_TTL),
            **{key: CONFIG[key] for key in CONFIG_KEYS},
            "consent_user": CONFIG["consent_user"],
            "redirect_uris": list(REDIRECT_URIS),
        }


# -- HTTP ------------------------------------------------------------------------------------------------------------


def _count(key):
    with LOCK:
        STATS[key] = STATS.get(key, 0) + 1


class Handler(BaseHTTPRequestHandler):
    server_version = "inboxd-mailstack-oauth/1"
    protocol_version = "HTTP/1.1"  # keep-alive: Dovecot's http client reuses connections

    def log_message(self, fmt, *args):
        if CONFIG.get("verbose"):
            sys.stderr.write(f"oauth: {self.address_string()} - {fmt % args}\n")

    def log_request(self, code="-", size="-"):
        # not the request line: its query string can carry secrets (/revoke?token=, the redirect's code)
        self.log_message("%s %s %s", self.command, urlsplit(self.path).path, code)

    @property
    def issuer(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _reply(self, status, body, content_type, extra_headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, no-store, max-age=0, must-revalidate")
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send(self, status, obj, extra_headers=None):
        self._reply(status, json.dumps(obj).encode(), "application/json; charset=utf-8", extra_headers)

    def _send_html(self, status, page):
        self._reply(status, page.encode(), "text/html; charset=utf-8")

    def _redirect(self, location):
        self._reply(302, b"", "text/plain; charset=utf-8", {"Location": location})

    def _form_lists(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n).decode() if n else ""
        return parse_qs(raw, keep_blank_values=True)

    def _form(self):
        return {k: v[0] for k, v in self._form_lists().items()}

    def _query(self):
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}

    def _client_ok(self, form):
        cid, csec = form.get("client_id"), form.get("client_secret")
        ba = _basic_auth(self.headers.get("Authorization"))
        if ba:
            cid, csec = ba
        return cid == CONFIG["client_id"] and csec == CONFIG["client_secret"], cid

    # -- routes ----------------------------------------------------------------------------------------------------

    def do_GET(self):
        route = {
            "/healthz": self._get_healthz,
            "/admin/stats": self._get_stats,
            "/admin/issued": self._get_issued,
            "/userinfo": self._get_userinfo,
            "/authorize": self._get_authorize,
        }.get(urlsplit(self.path).path)
        if route is None:
            return self._send(404, {"error": "not_found"})
        return route()

    def do_POST(self):
        route = {
            "/token": self._post_token,
            "/introspect": self._post_introspect,
            "/revoke": self._post_revoke,
            "/authorize": self._post_authorize,
            "/admin/refresh_token": self._post_admin_refresh_token,
            "/admin/access_token": self._post_admin_access_token,
            "/admin/revoke": self._post_admin_revoke,
            "/admin/service_account": self._post_admin_service_account,
            "/admin/config": self._post_admin_config,
        }.get(urlsplit(self.path).path)
        if route is None:
            self._form_lists()  # drain the body: the connection is kept alive
            return self._send(404, {"error": "not_found"})
        return route()

    def _get_healthz(self):
        with LOCK:
            return self._send(200, {"ok": True, "stats": dict(STATS)})

    def _get_issued(self):
        with ISSUED_LOCK:
            issued = sorted(ISSUED)
        return self._send(200, {"secrets": issued})

    def _get_stats(self):
        query = self._query()
        with LOCK:
            if "refresh_token" in query:
                return self._send(200, {"token_calls": TOKEN_CALLS.get(query["refresh_token"], 0)})
            return self._send(
                200,
                {
                    "stats": dict(STATS),
                    "token_calls": dict(TOKEN_CALLS),
                    "access_ttl": CONFIG["access_ttl"],
                    "user_ttl": dict(USER_TTL),
                },
            )

    def _get_userinfo(self):
        _count("userinfo")
        auth = self.headers.get("Authorization", "")
        tok = auth[7:] if auth.lower().startswith("bearer ") else ""
        info, err = _token_state(tok)
        if info is not None and info["app_only"]:
            info, err = None, "app-only token has no user"
        if info is None:
            return self._send(
                401,
                {"error": "invalid_token", "error_description": err},
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return self._send(200, {"email": info["user"], "sub": info["user"]})

    def _get_authorize(self):
        _count("authorize")
        params = self._query()
        try:
            _check_client_and_redirect(params)
            _check_request(params)
            with LOCK:
                user = CONFIG["consent_user"] or params.get("login_hint", "").strip().lower()
                if not user:
                    raise PageError("invalid_request", "No signed-in user: pass login_hint (or set consent_user).")
                CONFIG["consent_user"] = None  # one-shot: the next sign-in is login_hint's again
        except PageError as exc:
            return self._send_html(400, _error_page(exc.error, exc.description))
        except RedirectError as exc:
            return self._redirect_error(params, exc)
        return self._send_html(200, _consent_page(params, user))

    def _post_authorize(self):
        _count("consent")
        form = self._form()
        try:
            _check_client_and_redirect(form)
            _check_request(form)
            user = form.get("user", "").strip().lower()
            if not user:
                raise PageError("invalid_request", "The consent form carries no user.")
            if form.get("decision") not in ("allow", "deny"):
                raise PageError("invalid_request", "decision must be allow or deny.")
        except PageError as exc:
            return self._send_html(400, _error_page(exc.error, exc.description))
        except RedirectError as exc:
            return self._redirect_error(form, exc)
        state = {"state": form["state"]} if "state" in form else {}
        if form["decision"] == "deny":
            return self._redirect(_with_query(form["redirect_uri"], {"error": "access_denied", **state}))
        code = "4/0" + secrets.token_urlsafe(32)
        with ISSUED_LOCK:
            ISSUED.add(code)
        with LOCK:
            CODES[code] = {
                "client_id": form["client_id"],
                "redirect_uri": form["redirect_uri"],
                "challenge": form.get("code_challenge", ""),
                "method": form.get("code_challenge_method") or "plain",
                "user": user,
                "scope": " ".join(form["scope"].split()),
                "nonce": form.get("nonce", ""),
                "exp": time.time() + CONFIG["code_ttl"],
                "used": False,
                "refresh_token": None,
            }
        return self._redirect(_with_query(form["redirect_uri"], {"code": code, **state}))

    def _redirect_error(self, params, exc):
        answer = {"error": exc.error, "error_description": exc.description}
        if "state" in params:
            answer["state"] = params["state"]
        return self._redirect(_with_query(params["redirect_uri"], answer))

    def _post_token(self):
        _count("token")
        form = self._form()
        grant_type = form.get("grant_type", "")
        if grant_type in GRANT_STAT:
            _count(GRANT_STAT[grant_type])
        try:
            if grant_type == JWT_BEARER:  # authenticated by the assertion's signature, not a client secret
                return self._send(200, _grant_jwt_bearer(form, f"{self.issuer}/token"))
            ok, cid = self._client_ok(form)
            if not ok:
                raise OAuthError(401, "invalid_client", "Unauthorized")
            if grant_type == "refresh_token":
                return self._send(200, _grant_refresh_token(form, cid))
            if grant_type == "authorization_code":
                return self._send(200, _grant_authorization_code(form, cid, self.issuer))
            if grant_type == "client_credentials":
                return self._send(200, _grant_client_credentials(form, cid))
            raise OAuthError(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        except OAuthError as exc:
            return self._send(exc.status, {"error": exc.error, "error_description": exc.description})

    def _post_introspect(self):
        _count("introspect")
        form = self._form()
        ba = _basic_auth(self.headers.get("Authorization"))
        if CONFIG["introspect_auth"] and ba != tuple(CONFIG["introspect_auth"].split(":", 1)):
            return self._send(401, {"error": "invalid_client"}, {"WWW-Authenticate": 'Basic realm="introspect"'})
        info, _err = _token_state(form.get("token", ""))
        if info is None:
            return self._send(200, {"active": False})
        common = {
            "client_id": info["client_id"],
            "scope": info["scope"],
            "token_type": "Bearer",
            "exp": int(info["exp"]),
        }
        if info["app_only"]:
            # no user: Dovecot refuses the login, the Gmail-dialect test server lets it open any mailbox
            return self._send(200, {"active": True, "app_only": True, **common})
        return self._send(
            200, {"active": True, "email": info["user"], "username": info["user"], "sub": info["user"], **common}
        )

    def _post_revoke(self):
        _count("revoke")
        form = self._form()
        tok = form.get("token") or self._query().get("token", "")
        with LOCK:
            if tok in REFRESH:
                _revoke_refresh_locked(tok)
                known = True
            else:
                known = ACCESS.pop(tok, None) is not None
        if not known:
            return self._send(400, {"error": "invalid_token", "error_description": "Token expired or revoked"})
        return self._send(200, {})

    def _post_admin_refresh_token(self):
        form = self._form()
        user = form.get("user", "").strip().lower()
        if not user:
            return self._send(400, {"error": "user required"})
        rt = form.get("refresh_token") or _new_refresh_token()
        with ISSUED_LOCK:
            ISSUED.add(rt)
        with LOCK:
            REFRESH[rt] = {"user": user}
            REVOKED.discard(rt)
        return self._send(200, {"refresh_token": rt, "user": user})

    def _post_admin_access_token(self):
        form = self._form()
        user = form.get("user", "").strip().lower()
        if not user:
            return self._send(400, {"error": "user required"})
        ttl = int(form["ttl"]) if form.get("ttl") else _ttl_for(user)
        tok = _mint_access(user, CONFIG["client_id"], ttl, CONFIG["scope"])
        return self._send(200, {"access_token": tok, "expires_in": ttl})

    def _post_admin_revoke(self):
        tok = self._form().get("token", "")
        with LOCK:
            ACCESS.pop(tok, None)
            _revoke_refresh_locked(tok)
        return self._send(200, {})

    def _post_admin_service_account(self):
        form = self._form()
        try:
            email = form["client_email"].strip()
            account = {
                "n": int(form["n"]),
                "e": int(form["e"]),
                "domains": {d.strip().lower() for d in form.get("domains", "").split(",") if d.strip()},
                "scopes": {s.strip() for s in (form.get("scopes") or GMAIL_SCOPE).split(",") if s.strip()},
            }
        except (KeyError, ValueError):
            return self._send(400, {"error": "client_email, n and e (decimal) required"})
        if not email or account["n"] < 2**1023:
            return self._send(400, {"error": "client_email and an RSA modulus of at least 1024 bits required"})
        with LOCK:
            SERVICE_ACCOUNTS[email] = account
        return self._send(
            200, {"client_email": email, "domains": sorted(account["domains"]), "scopes": sorted(account["scopes"])}
        )

    def _post_admin_config(self):
        try:
            settings = _apply_config(self._form_lists())
        except ValueError as exc:
            return self._send(400, {"error": str(exc)})
        return self._send(200, settings)


def _write_atomically(path, text):
    """A reader polling ``path`` never sees a partial file: write a temp name, then rename over."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=11080, help="0 = any free port (see --port-file)")
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--client-id", default="inboxd-test-client")
    ap.add_argument("--client-secret", default="inboxd-test-secret")
    ap.add_argument(
        "--introspect-auth",
        default="dovecot:introspect-secret",
        help="user:pass the introspection caller must send (HTTP Basic); '' = none",
    )
    ap.add_argument("--access-ttl", type=int, default=3599)
    ap.add_argument("--scope", default=GMAIL_SCOPE)
    ap.add_argument("--seed", action="append", default=[], help="user=refresh_token pairs to pre-register")
    ap.add_argument("--pidfile")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    CONFIG.update(
        client_id=a.client_id,
        client_secret=a.client_secret,
        introspect_auth=a.introspect_auth,
        access_ttl=a.access_ttl,
        scope=a.scope,
        verbose=a.verbose,
        require_pkce=True,
        consent="auto",
        consent_user=None,
        rotate_refresh=False,
        app_only=True,
        code_ttl=60,
    )
    for s in a.seed:
        user, rt = s.split("=", 1)
        REFRESH[rt] = {"user": user.lower()}
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    port = srv.server_address[1]
    if a.pidfile:
        _write_atomically(a.pidfile, str(os.getpid()))
    if a.port_file:
        _write_atomically(a.port_file, str(port))
    sys.stderr.write(f"oauth server listening on 127.0.0.1:{port}\n")
    sys.stderr.flush()
    with contextlib.suppress(KeyboardInterrupt):
        srv.serve_forever()


if __name__ == "__main__":
    main()
