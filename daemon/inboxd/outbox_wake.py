"""How the sender learns that the HR app queued mail: PostgreSQL LISTEN/NOTIFY (the 0005 trigger); on SQLite,
`PRAGMA data_version` every 0.1 s, which changes when another connection commits (a cheap read, no table scan).
`wait(timeout)` returns when there may be new work, or after `timeout` seconds."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import sqlalchemy as sa
import structlog

log = structlog.get_logger(__name__)

CHANNEL = "inboxd_outbox"
SQLITE_POLL_SECONDS = 0.1


class OutboxWake:
    def __init__(self, engine: sa.Engine) -> None:
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._sqlite: Any = None  # a DBAPI connection of its own, out of any transaction
        self._version: object = None
        if engine.dialect.name == "sqlite":
            self._sqlite = engine.raw_connection()
            self._version = self._data_version()
        elif engine.dialect.name == "postgresql":
            url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._conn = psycopg.connect(url, autocommit=True)
            self._conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> None:
        if self._sqlite is not None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                time.sleep(min(SQLITE_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
                version = self._data_version()
                if version != self._version:
                    self._version = version
                    return
            return
        if self._conn is None:
            time.sleep(timeout)
            return
        for _ in self._conn.notifies(timeout=timeout, stop_after=1):
            return

    def _data_version(self) -> object:
        cursor = self._sqlite.cursor()
        try:
            cursor.execute("PRAGMA data_version")
            return cursor.fetchone()[0]
        finally:
            cursor.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._sqlite is not None:
            self._sqlite.close()
