"""The ops HTTP listener: GET /metrics (Prometheus text format) and GET /healthz (JSON, 200 or 503).

Served by a stdlib ThreadingHTTPServer on a daemon thread; `start` binds (port 0 picks a free port), `close` stops it.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from inboxd import __version__
from inboxd.metrics import Metrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


HealthCheck = Callable[[], Health]


def database_health(engine: sa.Engine, *, threads: dict[str, threading.Thread] | None = None) -> HealthCheck:
    """Healthy when the database answers SELECT 1 and every named side thread is alive."""

    def check() -> Health:
        for name, thread in (threads or {}).items():
            if not thread.is_alive():
                return Health(False, f"the {name} thread has stopped")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # only the class name: a driver's message may carry host or user names
            return Health(False, f"database unreachable ({type(exc).__name__})")
        return Health(True, details={"database": "ok"})

    return check


class OpsServer:
    """/metrics and /healthz on one address; `port` is the bound one (useful with port 0)."""

    def __init__(self, host: str, port: int, *, metrics: Metrics, health: HealthCheck) -> None:
        handler = type("_BoundHandler", (_Handler,), {"metrics": metrics, "health": staticmethod(health)})
        # IPv6 literals need an AF_INET6 socket; ThreadingHTTPServer picks the family from this class attribute
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), handler)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="inboxd-http", daemon=True)

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("http.listening", host=self.host, port=self.port)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper must not hold up shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    health: HealthCheck
    server_version = f"inboxd/{__version__}"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
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

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would flood the journal; errors still reach log_error -> structlog

    def log_error(self, format: str, *args: Any) -> None:
        log.warning("http.request_failed", detail=format % args)


def start_ops_server(listen: tuple[str, int] | None, *, metrics: Metrics, health: HealthCheck) -> OpsServer | None:
    """Serve /metrics and /healthz unless ``listen`` is off; a port in use is logged, not fatal: mail keeps
    syncing and the scraper sees the target down."""
    if listen is None:
        return None
    try:
        return OpsServer(*listen, metrics=metrics, health=health).start()
    except OSError as exc:
        log.error("http.listen_failed", host=listen[0], port=listen[1], error=exc.strerror or type(exc).__name__)
        return None
