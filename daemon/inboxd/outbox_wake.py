"""How the sender learns that the HR app queued mail: PostgreSQL LISTEN/NOTIFY (the 0005 trigger), polling on
SQLite. `wait(timeout)` returns when there may be new work, or after `timeout` seconds."""

from __future__ import annotations

import time

import psycopg
import sqlalchemy as sa
import structlog

log = structlog.get_logger(__name__)

CHANNEL = "inboxd_outbox"
SQLITE_POLL_SECONDS = 1.0


class OutboxWake:
    def __init__(self, engine: sa.Engine) -> None:
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        if engine.dialect.name == "postgresql":
            url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._conn = psycopg.connect(url, autocommit=True)
            self._conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> None:
        if self._conn is None:
            time.sleep(min(timeout, SQLITE_POLL_SECONDS))
            return
        for _ in self._conn.notifies(timeout=timeout, stop_after=1):
            return

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
