"""The database's clock (DatabaseClock), on SQLite and PostgreSQL: a node's skew is measured away, and a node
keeps its last offset while the database is away."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from structlog.testing import capture_logs

from inboxd.clock import FakeClock
from inboxd.db_clock import DatabaseClock, database_now


def test_database_now_is_aware_utc_and_current(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        now = database_now(conn)
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)  # this host is the database's


def test_a_skewed_node_reads_the_databases_time_and_is_warned(engine: sa.Engine) -> None:
    ahead = FakeClock(datetime.now(UTC) + timedelta(minutes=10))
    clock = DatabaseClock(engine, ahead)
    with capture_logs() as logs:
        now = clock.now()
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)
    assert [e["event"] for e in logs] == ["clock.skewed"]
    assert logs[0]["seconds"] < -590


def test_the_offset_is_measured_again_only_after_refresh(engine: sa.Engine) -> None:
    """One query per `refresh` seconds, not per reading: the node's clock moves between, the offset stays."""
    node = FakeClock(datetime.now(UTC))
    clock = DatabaseClock(engine, node, refresh=60)
    first = clock.offset()
    node.advance(30)  # within the refresh period: the offset measured at first still holds
    assert clock.offset() == first
    node.advance(31)  # measured again: the node's clock is now 61 s ahead of where it was
    later = clock.offset()
    assert abs(later - (first - timedelta(seconds=61))) < timedelta(seconds=5)


def test_with_the_database_away_the_node_keeps_its_own_clock_and_asks_again_after_refresh() -> None:
    engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", pool_pre_ping=False)
    attempts: list[bool] = []
    sa.event.listen(engine, "do_connect", lambda *_: attempts.append(True))
    node = FakeClock(datetime(2026, 5, 1, tzinfo=UTC))
    clock = DatabaseClock(engine, node, refresh=60)
    assert clock.now() == node.now(), "never measured: the node's own clock"
    assert clock.now() == node.now()
    assert len(attempts) == 1, "not a connection attempt on every reading of the time"
    node.advance(61)
    clock.now()
    assert len(attempts) == 2
    engine.dispose()
