"""inboxd.table_stats: a lookup table that has outgrown its planner statistics is analyzed after a batch is stored,
on PostgreSQL (where a first sync's key lookups otherwise scan all the account's rows); SQLite is left alone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from inboxd.bulk import insert_rows
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.models import MailMessage
from inboxd.store import Credential, Store
from inboxd.table_stats import MIN_CHANGES, TableStats, analyze_due

messages_t: sa.Table = MailMessage.__table__  # type: ignore[attr-defined]
WHEN = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize(
    ("live", "changed", "analyzed_at", "due"),
    [
        (999, 999, None, False),  # too few changes to matter
        (MIN_CHANGES, MIN_CHANGES, None, True),  # never analyzed, 1000 rows
        (3000, 1500, None, False),  # half of the rows changed: not yet doubled
        (3000, 1501, None, True),
        (4000, 3000, 2500, False),  # this process analyzed it at 2500 rows: not doubled since
        (5000, 3000, 2500, True),
        (1_000_000, 200, None, False),  # a grown table taking one more batch
    ],
)
def test_analyze_is_due_once_a_table_has_doubled(live: int, changed: int, analyzed_at: int | None, due: bool) -> None:
    assert analyze_due(live, changed, analyzed_at) is due


def _messages(account_id: int, count: int) -> list[dict[str, object]]:
    return [
        {
            "account_id": account_id,
            "provider_message_id": f"mid:{i}@example.test",
            "message_id_header": f"{i}@example.test",
            "references": [],
            "subject": f"message {i}",
            "direction": "inbound",
            "snippet": "",
            "labels": ["INBOX"],
            "created_at": WHEN,
            "updated_at": WHEN,
        }
        for i in range(count)
    ]


def _last_analyze(engine: sa.Engine, table: str) -> datetime | None:
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT last_analyze FROM pg_stat_user_tables WHERE relid = CAST(:t AS regclass)"), {"t": table}
        ).scalar()


def test_a_young_table_is_analyzed_once_it_has_grown(engine: sa.Engine, secret_box: SecretBox) -> None:
    store = Store(engine, clock=FakeClock(), secret_box=secret_box)
    account = store.add_account("stats@example.test", "local", Credential("password", "pw")).id
    stats = TableStats(engine)
    with engine.begin() as conn:
        insert_rows(conn, messages_t, _messages(account, 1500))
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))  # the counters reach other sessions now
    done = stats.after_write()
    if engine.dialect.name != "postgresql":
        assert done == []
        return
    assert done == ["mail_messages"]
    assert _last_analyze(engine, "mail_messages") is not None
    assert _last_analyze(engine, "mail_threads") is None, "an empty table has nothing to analyze"
    assert stats.after_write() == [], "just analyzed: not again until it doubles"


def test_a_failed_analyze_does_not_fail_the_caller() -> None:
    """Statistics are an optimization: an error (here: no database answers) is logged, not raised."""
    unreachable = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        assert TableStats(unreachable).after_write() == []
    finally:
        unreachable.dispose()
