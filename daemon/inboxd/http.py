"""The daemon's HTTP listener: GET /metrics (Prometheus text format), GET /healthz (JSON, 200 or 503), and for the
HR app GET /connect/start, GET /oauth/callback (the consent flow, connect.py) and POST /accounts/disconnect.

Served by a stdlib ThreadingHTTPServer on a daemon thread; `start` binds (port 0 picks a free port), `close` stops it.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import html
import json
import math
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import sqlalchemy as sa
import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from inboxd import __version__
from inboxd.connect import ConnectEndpoints
from inboxd.disconnect import DisconnectReport
from inboxd.errors import ConnectFailed, InboxdError, UsageError
from inboxd.metrics import Metrics
from inboxd.pipe_io import readable

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


HealthCheck = Callable[[], Health]


def database_health(engine: sa.Engine, *, threads: dict[str, threading.Thread] | None = None) -> HealthCheck:
    """Healthy when the database answers SELECT 1 and no named side thread has stopped (one not started yet, in
    the moment between the listener opening and the daemon starting its threads, has not)."""

    def check() -> Health:
        for name, thread in (threads or {}).items():
            if thread.ident is not None and not thread.is_alive():
                return Health(False, f"the {name} thread has stopped")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # only the class name: a driver's message may carry host or user names
            return Health(False, f"database unreachable ({type(exc).__name__})")
        return Health(True, details={"database": "ok"})

    return check


Disconnect = Callable[[str, bool], DisconnectReport]  # (email, purge) -> report


@dataclass(frozen=True)
class HrEndpoints:
    """What the HR app's endpoints need; the api token is read per request so a config reload applies."""

    connect: ConnectEndpoints
    disconnect: Disconnect
    api_token: Callable[[], str | None]


class OpsServer:
    """The listener on one address; `port` is the bound one (useful with port 0)."""

    def __init__(
        self, host: str, port: int, *, metrics: Metrics, health: HealthCheck, hr: HrEndpoints | None = None
    ) -> None:
        handler = type("_BoundHandler", (_Handler,), {"metrics": metrics, "health": staticmethod(health), "hr": hr})
        # IPv6 literals need an AF_INET6 socket; ThreadingHTTPServer picks the family from this class attribute
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), handler)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._server.timeout = 0  # handle_request() only after a select said ready: never wait in it
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()  # written to by close(): the serving thread sleeps until a request
        self._thread = threading.Thread(target=self._serve, name="inboxd-http", daemon=True)

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("http.listening", host=self.host, port=self.port)
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join(timeout=5)
        self._server.server_close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _serve(self) -> None:
        """socketserver's serve_forever without its poll interval: it woke twice a second to look for a shutdown
        request, for nothing, in an idle daemon. Here the thread sleeps until a connection comes or close() writes
        to the wake-up pipe."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj == self._wake_r for key, _ in ready):
                    return
                if ready:  # accept and hand the request to a thread; timeout 0: never blocks here
                    self._server.handle_request()
                # out of descriptors, the connection stays queued and the socket readable: without a pause this
                # loop spun a core for as long as the daemon had no descriptor to spare
                if self._server.out_of_descriptors() and readable(self._wake_r, ACCEPT_BACKOFF):
                    return

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


MAX_CONNECTIONS = 64  # requests served at once; more are closed at once (each holds a thread and a descriptor)
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request or read the answer
MAX_BODY = 65536
ACCEPT_BACKOFF = 0.5  # seconds the listener pauses when accept() finds the process or system out of descriptors
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper must not hold up shutdown

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refused = 0
        self._refusals_logged = -math.inf
        self._out_of_descriptors = False
        self._accept_failures_logged = -math.inf

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as exc:  # socketserver drops it and returns; say why, a line a minute at most
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self._out_of_descriptors = True
                now = time.monotonic()
                if now - self._accept_failures_logged >= 60:
                    log.error("http.accept_failed", error=errno.errorcode.get(exc.errno or 0, "?"), detail=str(exc))
                    self._accept_failures_logged = now
            raise

    def out_of_descriptors(self) -> bool:
        """Whether the last accept() failed for want of a descriptor or memory (and forget it)."""
        out, self._out_of_descriptors = self._out_of_descriptors, False
        return out

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per request, up to MAX_CONNECTIONS: clients that open connections and never finish them
        (slowloris) must not take every thread and file descriptor of the daemon, whose IMAP connections need them.
        Each has REQUEST_TIMEOUT to send its request (_Handler), so a full house empties within that."""
        if not self._slots.acquire(blocking=False):
            self._refused += 1
            now = time.monotonic()
            if now - self._refusals_logged >= 60:  # one line a minute, not one per refused connection
                log.warning("http.too_many_connections", limit=MAX_CONNECTIONS, refused=self._refused)
                self._refusals_logged, self._refused = now, 0
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    health: HealthCheck
    hr: HrEndpoints | None
    server_version = f"inboxd/{__version__}"
    timeout = REQUEST_TIMEOUT  # the socket's, per read; _deadline bounds the whole request

    def setup(self) -> None:
        super().setup()
        # a deadline for sending the whole request, not only per read: a client trickling one byte every few
        # seconds would otherwise hold its thread (and one of MAX_CONNECTIONS) for as long as it likes
        self._deadline = threading.Timer(self.timeout or REQUEST_TIMEOUT, self._cut_off)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut_off(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _request_read(self) -> None:
        """The request is in: answering may take longer (an OAuth exchange with the provider)."""
        self._deadline.cancel()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def do_GET(self) -> None:
        self._request_read()
        url = urlsplit(self.path)
        path = url.path
        if path in ("/connect/start", "/oauth/callback"):
            self._connect_step(path, dict(parse_qsl(url.query, keep_blank_values=True)))
        elif path == "/metrics":
            self._reply(HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            result = self.health()
            body: dict[str, Any] = {"ok": result.ok, "version": __version__, **result.details}
            if result.reason is not None:
                body["reason"] = result.reason
            status = HTTPStatus.OK if result.ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._reply(status, json.dumps(body).encode() + b"\n", "application/json")
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/accounts/disconnect":
            self._request_read()
            self._reply(HTTPStatus.NOT_FOUND, b'{"error": "not found"}\n', "application/json")
            return
        self._disconnect()

    # -- the HR app's endpoints ----------------------------------------------------------------------------------

    def _connect_step(self, path: str, params: dict[str, str]) -> None:
        if self.hr is None:
            self._page(HTTPStatus.NOT_FOUND, "Not available", "This inboxd does not serve the connect flow.")
            return
        try:
            step = self.hr.connect.start if path == "/connect/start" else self.hr.connect.callback
            redirect = step(params)
        except (UsageError, ConnectFailed) as exc:
            self._page(HTTPStatus.BAD_REQUEST, "Cannot connect the mailbox", str(exc))
            return
        except InboxdError as exc:  # the provider's endpoint unreachable and the like
            self._page(HTTPStatus.SERVICE_UNAVAILABLE, "Cannot connect the mailbox now", str(exc))
            return
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", redirect.location)
        self.send_header("Content-Length", "0")
        self._private_headers()
        self.end_headers()

    def _disconnect(self) -> None:
        token = self.hr.api_token() if self.hr is not None else None
        if self.hr is None or token is None:
            self._json(HTTPStatus.FORBIDDEN, {"error": "disabled: set http.api_token_file to allow the HR app this"})
            return
        scheme, _, presented = self.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(errors="surrogateescape"), token.encode()
        ):
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "Authorization: Bearer <http.api_token_file> required"})
            return
        request = self._disconnect_request()
        if isinstance(request, str):
            self._json(HTTPStatus.BAD_REQUEST, {"error": request})
            return
        email, purge = request
        try:
            report = self.hr.disconnect(email, purge)
        except UsageError as exc:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(exc)})
            return
        except InboxdError as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
            return
        self._json(HTTPStatus.OK, report.as_dict())

    def _disconnect_request(self) -> tuple[str, bool] | str:
        """(email, purge) from the request's JSON body, or what is wrong with it. At most MAX_BODY bytes are read,
        whatever the client says (a negative Content-Length used to mean: read to the end)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return f"Content-Length must be 0-{MAX_BODY}"
        data = self.rfile.read(length)
        self._request_read()
        try:
            body = json.loads(data or b"null")
        except (ValueError, RecursionError):
            body = None
        email = body.get("email") if isinstance(body, dict) else None
        if not isinstance(email, str) or not _encodable(email):
            return 'expected a JSON object {"email": ..., "purge": false}'
        purge = body.get("purge", False) if isinstance(body, dict) else False
        if not isinstance(purge, bool):
            return "purge must be true or false"
        return email, purge

    def _page(self, status: HTTPStatus, title: str, message: str) -> None:
        body = (
            f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>\n"
        ).encode()
        self._reply(status, body, "text/html; charset=utf-8", private=True)

    def _json(self, status: HTTPStatus, obj: dict[str, Any]) -> None:
        self._reply(status, json.dumps(obj).encode() + b"\n", "application/json", private=True)

    def _private_headers(self) -> None:
        # the callback URL carries an authorization code: never cached, never sent on as a Referer
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str, *, private: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if private:
            self._private_headers()
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the journal; errors still reach log_error -> structlog

    def log_error(self, format: str, *args: Any) -> None:
        # a malformed request line is quoted in the detail: without its query, which may hold an OAuth code
        log.warning("http.request_failed", detail=_QUERY.sub("?…", format % args))


_QUERY = re.compile(r"\?[^\s'\"]*")


def _encodable(text: str) -> bool:
    """No lone surrogates (JSON's "\\ud800"): they cannot be encoded for the database."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def start_ops_server(
    listen: tuple[str, int] | None, *, metrics: Metrics, health: HealthCheck, hr: HrEndpoints | None = None
) -> OpsServer | None:
    """Serve /metrics and /healthz unless ``listen`` is off; a port in use is logged, not fatal: mail keeps
    syncing and the scraper sees the target down."""
    if listen is None:
        return None
    try:
        return OpsServer(*listen, metrics=metrics, health=health, hr=hr).start()
    except OSError as exc:
        log.error("http.listen_failed", host=listen[0], port=listen[1], error=exc.strerror or type(exc).__name__)
        return None
