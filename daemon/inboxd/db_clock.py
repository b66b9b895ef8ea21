"""The database's clock, for what several nodes compare: lease expiries, heartbeats, outbox claims.

Each node wrote and compared its own wall clock before; a node whose clock ran 20 s ahead saw the others' leases
as expired between renewals and took them (two nodes then synced one account), and a skew shortened an outbox
claim's `stale_after`. Time read from the one database all nodes share has no skew between them.

It is the node's clock plus an offset, measured with one query (PostgreSQL's `now()`, SQLite's own 'now': the
host's clock, the only host an SQLite file has) and measured again every `refresh` seconds, so that callers
reading the time many times a second (the outbox's poll) cost no query each.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import structlog

from inboxd.clock import Clock

log = structlog.get_logger(__name__)

REFRESH = 60.0
SKEW_WARNING = timedelta(seconds=5)


def database_now(conn: sa.Connection) -> datetime:
    """The database server's current time, timezone-aware UTC."""
    if conn.dialect.name == "postgresql":
        value: datetime = conn.execute(sa.text("SELECT now()")).scalar_one()
        return value.astimezone(UTC)
    text = conn.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class DatabaseClock:
    """A Clock whose `now()` follows the database's clock; `monotonic()` and `sleep()` are the node's."""

    def __init__(self, engine: sa.Engine, node: Clock, *, refresh: float = REFRESH) -> None:
        self._engine = engine
        self._node = node
        self._refresh = refresh
        self._lock = threading.Lock()
        self._offset: timedelta | None = None
        self._measured: float | None = None  # the node's monotonic time of the last attempt to measure

    def now(self) -> datetime:
        return self._node.now() + self.offset()

    def monotonic(self) -> float:
        return self._node.monotonic()

    def sleep(self, seconds: float) -> None:
        self._node.sleep(seconds)

    def offset(self) -> timedelta:
        """The database's clock minus this node's; the last one measured while the database is away (zero before
        the first), so that a node keeps running on its own clock rather than failing on every read of the time."""
        with self._lock:
            if self._measured is not None and self._node.monotonic() - self._measured < self._refresh:
                return self._offset or timedelta(0)
            try:
                before = self._node.now()
                with self._engine.connect() as conn:
                    server = database_now(conn)
                after = self._node.now()
            except sa.exc.SQLAlchemyError:  # tried again after `refresh`, not on every read of the time
                self._measured = self._node.monotonic()
                return self._offset or timedelta(0)
            offset = server - (before + (after - before) / 2)
            if abs(offset) > SKEW_WARNING and (self._offset is None or abs(offset - self._offset) > SKEW_WARNING):
                log.warning("clock.skewed", seconds=round(offset.total_seconds(), 1))
            self._offset, self._measured = offset, self._node.monotonic()
            return offset
