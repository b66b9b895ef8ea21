"""How the sender learns that the HR app queued mail or made a row due: PostgreSQL LISTEN/NOTIFY (the 0005 and 0010
triggers); on SQLite, `PRAGMA data_version` every 0.1 s, which changes when another connection commits (a cheap
read, no table scan).
`wait(timeout)` returns when there may be new work (True), or after `timeout` seconds (False)."""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

if TYPE_CHECKING:
    import psycopg

log = structlog.get_logger(__name__)

CHANNEL = "inboxd_outbox"
SQLITE_POLL_SECONDS = 0.1


class OutboxWake:
    """`interrupt`: a file descriptor (the read end of a pipe) that ends every wait at once when it becomes readable,
    for the daemon's stop; without it a wait lasts until a change or its timeout."""

    def __init__(self, engine: sa.Engine, *, interrupt: int | None = None) -> None:
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._sqlite: Any = None  # a DBAPI connection of its own, out of any transaction
        self._version: object = None
        self._interrupt = interrupt
        if engine.dialect.name == "sqlite":
            self._sqlite = engine.raw_connection()
            self._version = self._data_version()
        elif engine.dialect.name == "postgresql":
            import psycopg  # noqa: PLC0415 (here: importing it takes 0.1 s, which every command on SQLite would pay)

            url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._conn = psycopg.connect(url, autocommit=True)
            self._conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> bool:
        """True when woken by a possible change; False after `timeout` seconds without one, or when interrupted."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        if self._interrupt is not None:
            poller.register(self._interrupt, select.POLLIN)
        if self._conn is not None:
            poller.register(self._conn.fileno(), select.POLLIN)
        while True:
            if self._changed():
                return True
            left = deadline - time.monotonic()
            if self._sqlite is not None:
                left = min(left, SQLITE_POLL_SECONDS)  # no socket to wait on: look again shortly
            if left <= 0:
                return False
            ready = poller.poll(left * 1000)
            if any(fd == self._interrupt for fd, _ in ready):
                return False

    def _changed(self) -> bool:
        """Whether another connection committed (SQLite) or a NOTIFY arrived (PostgreSQL) since the last look.

        PostgreSQL: the wait sleeps in poll(2) on the LISTEN socket, not in psycopg's notifies(timeout=...), which
        wakes every 0.1 s (its Ctrl-C check). A lost connection raises psycopg.OperationalError from notifies() at
        the latest on the second readable wake-up."""
        if self._conn is not None:
            return any(True for _ in self._conn.notifies(timeout=0, stop_after=1))
        if self._sqlite is not None:
            version = self._data_version()
            if version != self._version:
                self._version = version
                return True
        return False

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
