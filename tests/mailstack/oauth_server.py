#!/usr/bin/env python3
"""Local OAuth2 authorization server for inboxd's loopback tests (stdlib only, in-memory, 127.0.0.1).

Speaks Google's token wire format so the daemon's real google-auth adapter can be pointed at it.

Endpoints
  POST /token                 grant_type=refresh_token -> {"access_token", "expires_in", "scope", "token_type"};
                              client auth via form body or HTTP Basic; unknown/revoked -> 400 invalid_grant
  POST /introspect            RFC 7662 (form: token=...), called by Dovecot's oauth2 passdb (HTTP Basic auth)
  GET  /userinfo              Authorization: Bearer <token> -> {"email": ...} or 401
  POST /admin/refresh_token   user=<email>[&refresh_token=<rt>] -> {"refresh_token": ..., "user": ...}
  POST /admin/access_token    user=<email>[&ttl=N]              -> {"access_token": ..., "expires_in": N}
  POST /admin/revoke          token=<refresh or access token>   -> {}  (a refresh token takes its access tokens along)
  POST /admin/config          access_ttl=N[&user=<email>]       -> set the global TTL, or one user's TTL
                              (user=<email>&access_ttl= clears that user's override)
  GET  /admin/stats[?refresh_token=<rt>] -> {"stats": {...}, "token_calls": {rt: n}} or {"token_calls": n}
  GET  /healthz               -> {"ok": true, "stats": {...}}

Any user email is accepted: users need no setup besides getting a token.
"""

import argparse
import base64
import contextlib
import json
import os
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
REFRESH = {}  # refresh_token -> {"user": ...}
REVOKED = set()  # refresh tokens revoked via /admin/revoke (Google answers invalid_grant for them)
ACCESS = {}  # access_token -> {"user", "exp", "client_id", "scope", "refresh_token"}
USER_TTL = {}  # user -> access-token TTL overriding CONFIG["access_ttl"]
TOKEN_CALLS = {}  # refresh_token -> successful /token grants
CONFIG = {}
STATS = {"introspect": 0, "token": 0, "userinfo": 0}


def _basic_auth(header):
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header.split(None, 1)[1]).decode()
    except ValueError:
        return None
    user, _, pw = raw.partition(":")
    return user, pw


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


class Handler(BaseHTTPRequestHandler):
    server_version = "inboxd-mailstack-oauth/1"
    protocol_version = "HTTP/1.1"  # keep-alive: Dovecot's http client reuses connections

    def log_message(self, fmt, *args):
        if CONFIG.get("verbose"):
            sys.stderr.write(f"oauth: {self.address_string()} - {fmt % args}\n")

    def _send(self, status, obj, extra_headers=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, no-store, max-age=0, must-revalidate")
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _form(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n).decode() if n else ""
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    def _client_ok(self, form):
        cid, csec = form.get("client_id"), form.get("client_secret")
        ba = _basic_auth(self.headers.get("Authorization"))
        if ba:
            cid, csec = ba
        return cid == CONFIG["client_id"] and csec == CONFIG["client_secret"], cid

    def _mint_access(self, user, client_id, ttl, refresh_token=None):
        tok = "ya29." + secrets.token_urlsafe(32)
        with LOCK:
            ACCESS[tok] = {
                "user": user,
                "exp": time.time() + ttl,
                "client_id": client_id,
                "scope": CONFIG["scope"],
                "refresh_token": refresh_token,
            }
        return tok

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/healthz":
            return self._send(200, {"ok": True, "stats": STATS})
        if url.path == "/admin/stats":
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
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
        if url.path == "/userinfo":
            STATS["userinfo"] += 1
            auth = self.headers.get("Authorization", "")
            tok = auth[7:] if auth.lower().startswith("bearer ") else ""
            info, err = _token_state(tok)
            if info is None:
                return self._send(
                    401,
                    {"error": "invalid_token", "error_description": err},
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            return self._send(200, {"email": info["user"], "sub": info["user"]})
        return self._send(404, {"error": "not_found"})

    def do_POST(self):  # noqa: PLR0911 - one flat route table reads best here
        path = urlsplit(self.path).path
        form = self._form()
        if path == "/token":
            with LOCK:
                STATS["token"] += 1
            ok, cid = self._client_ok(form)
            if not ok:
                return self._send(401, {"error": "invalid_client", "error_description": "Unauthorized"})
            if form.get("grant_type") != "refresh_token":
                return self._send(
                    400,
                    {
                        "error": "unsupported_grant_type",
                        "error_description": f"Invalid grant_type: {form.get('grant_type')}",
                    },
                )
            rt_value = form.get("refresh_token", "")
            with LOCK:
                rt = REFRESH.get(rt_value)
                revoked = rt_value in REVOKED
            if rt is None:
                # Google's exact wording for both cases
                desc = "Token has been expired or revoked." if revoked else "Bad Request"
                return self._send(400, {"error": "invalid_grant", "error_description": desc})
            ttl = _ttl_for(rt["user"])
            tok = self._mint_access(rt["user"], cid, ttl, rt_value)
            with LOCK:
                TOKEN_CALLS[rt_value] = TOKEN_CALLS.get(rt_value, 0) + 1
            return self._send(
                200, {"access_token": tok, "expires_in": ttl, "scope": CONFIG["scope"], "token_type": "Bearer"}
            )
        if path == "/introspect":
            with LOCK:
                STATS["introspect"] += 1
            ba = _basic_auth(self.headers.get("Authorization"))
            if CONFIG["introspect_auth"] and ba != tuple(CONFIG["introspect_auth"].split(":", 1)):
                return self._send(401, {"error": "invalid_client"}, {"WWW-Authenticate": 'Basic realm="introspect"'})
            info, _err = _token_state(form.get("token", ""))
            if info is None:
                return self._send(200, {"active": False})
            return self._send(
                200,
                {
                    "active": True,
                    "email": info["user"],
                    "username": info["user"],
                    "sub": info["user"],
                    "client_id": info["client_id"],
                    "scope": info["scope"],
                    "token_type": "Bearer",
                    "exp": int(info["exp"]),
                },
            )
        if path == "/admin/refresh_token":
            user = form.get("user", "").strip().lower()
            if not user:
                return self._send(400, {"error": "user required"})
            rt = form.get("refresh_token") or ("1//" + secrets.token_urlsafe(36))
            with LOCK:
                REFRESH[rt] = {"user": user}
                REVOKED.discard(rt)
            return self._send(200, {"refresh_token": rt, "user": user})
        if path == "/admin/access_token":
            user = form.get("user", "").strip().lower()
            if not user:
                return self._send(400, {"error": "user required"})
            ttl = int(form["ttl"]) if form.get("ttl") else _ttl_for(user)
            tok = self._mint_access(user, CONFIG["client_id"], ttl)
            return self._send(200, {"access_token": tok, "expires_in": ttl})
        if path == "/admin/revoke":
            tok = form.get("token", "")
            with LOCK:
                ACCESS.pop(tok, None)
                if REFRESH.pop(tok, None) is not None:
                    REVOKED.add(tok)
                    for at in [a for a, i in ACCESS.items() if i["refresh_token"] == tok]:
                        del ACCESS[at]
            return self._send(200, {})
        if path == "/admin/config":
            if "access_ttl" not in form:
                return self._send(400, {"error": "access_ttl required"})
            user = form.get("user", "").strip().lower()
            raw = form["access_ttl"].strip()
            with LOCK:
                if user and not raw:
                    USER_TTL.pop(user, None)
                elif user:
                    USER_TTL[user] = int(raw)
                else:
                    CONFIG["access_ttl"] = int(raw)
                return self._send(200, {"access_ttl": CONFIG["access_ttl"], "user_ttl": dict(USER_TTL)})
        return self._send(404, {"error": "not_found"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=11080)
    ap.add_argument("--client-id", default="inboxd-test-client")
    ap.add_argument("--client-secret", default="inboxd-test-secret")
    ap.add_argument(
        "--introspect-auth",
        default="dovecot:introspect-secret",
        help="user:pass the introspection caller must send (HTTP Basic); '' = none",
    )
    ap.add_argument("--access-ttl", type=int, default=3599)
    ap.add_argument("--scope", default="https://mail.google.com/")
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
    )
    for s in a.seed:
        user, rt = s.split("=", 1)
        REFRESH[rt] = {"user": user.lower()}
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    if a.pidfile:
        with open(a.pidfile, "w") as f:
            f.write(str(os.getpid()))
    sys.stderr.write(f"oauth server listening on 127.0.0.1:{a.port}\n")
    sys.stderr.flush()
    with contextlib.suppress(KeyboardInterrupt):
        srv.serve_forever()


if __name__ == "__main__":
    main()
