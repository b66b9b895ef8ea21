"""inboxd.bulk: rows inserted in bulk (COPY on PostgreSQL, executemany on SQLite) read back exactly as a plain
INSERT of the same rows does: text with COPY's special characters, non-ASCII, JSON lists, UTC timestamps, booleans,
NULLs. Runs on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg as postgresql_dialect
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite as sqlite_dialect

from inboxd.bulk import among, insert_returning_ids, insert_rows
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.models import MailMessage, MailThread
from inboxd.store import Credential, Store

messages_t: sa.Table = MailMessage.__table__  # type: ignore[attr-defined]
threads_t: sa.Table = MailThread.__table__  # type: ignore[attr-defined]

# what PostgreSQL text cannot hold (NUL) aside, anything: COPY's own escapes (backslash, tab, newline, CR), quotes,
# non-ASCII and surrogate-free astral characters
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)
WHEN = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7, minutes=-30))]),
).map(lambda d: d.replace(microsecond=d.microsecond))


def _row(account_id: int, i: int, text: str, words: list[str], when: datetime, flag: bool) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "provider_message_id": f"id-{i}",
        "message_id_header": None if flag else text[:1000],
        "in_reply_to": None,
        "references": words,
        "thread_id": None,
        "subject": text,
        "from_email": "a@example.test",
        "from_name": text or None,
        "sent_at": when,
        "received_at": when,
        "direction": "inbound",
        "snippet": text[:20],
        "body_text": text * 3,
        "body_html": None if flag else f"<p>{text}</p>",
        "is_read": flag,
        "labels": words or None,
        "size_bytes": len(text.encode()),
        "has_attachments": not flag,
        "deleted_at": None,
        "created_at": when,
        "updated_at": when,
    }


def _read(conn: sa.Connection, ids: list[int]) -> list[dict[str, Any]]:
    rows = conn.execute(sa.select(messages_t).where(messages_t.c.id.in_(ids)).order_by(messages_t.c.id)).mappings()
    return [{k: v for k, v in row.items() if k != "id"} for row in rows]


@pytest.fixture
def account(engine: sa.Engine, secret_box: SecretBox) -> int:
    store = Store(engine, clock=FakeClock(), secret_box=secret_box)
    return store.add_account("bulk@example.test", "local", Credential("password", "pw")).id


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(TEXT, st.lists(TEXT, max_size=4), WHEN, st.booleans()), min_size=1, max_size=6))
def test_bulk_rows_read_back_as_inserted_ones(engine: sa.Engine, account: int, cases: list[Any]) -> None:
    """Each row's values as a plain INSERT stores them, also when rows share one object in a column (the store gives
    every row of a batch the same created_at, and bulk converts such a value once)."""
    stamp = cases[-1][2]
    rows = [{**_row(account, i, *case), "updated_at": stamp} for i, case in enumerate(cases)]
    with engine.begin() as conn:
        bulk_ids = insert_returning_ids(conn, messages_t, rows)
        plain_ids = [
            int(
                conn.execute(
                    messages_t.insert().values(**{**row, "provider_message_id": f"p-{i}"}).returning(messages_t.c.id)
                ).scalar_one()
            )
            for i, row in enumerate(rows)
        ]
        bulk, plain = _read(conn, bulk_ids), _read(conn, plain_ids)
        conn.execute(messages_t.delete())
    for got, want, row in zip(bulk, plain, rows, strict=True):
        assert got == {**want, "provider_message_id": row["provider_message_id"]}
        assert got["sent_at"] == row["sent_at"]
        assert got["references"] == row["references"]


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12, minutes=-45))]),
    )
)
def test_the_bulk_timestamp_processor_gives_what_sqlalchemys_gives(when: datetime) -> None:
    """UTCDateTime.bulk_bind_processor (one step) and bind_processor (process_bind_param, then the dialect's DATETIME
    processor) turn any aware timestamp into the same value, on both dialects; a naive one is refused by both."""
    column_type = messages_t.c.sent_at.type
    for dialect in (sqlite_dialect(), postgresql_dialect()):
        fast = column_type.bulk_bind_processor(dialect)
        slow = column_type.dialect_impl(dialect).bind_processor(dialect)
        assert fast(when) == (slow(when) if slow else when.astimezone(UTC))
        assert fast(None) is None
        with pytest.raises(ValueError, match="naive"):
            fast(when.replace(tzinfo=None))


def test_insert_rows_and_ids_in_order(engine: sa.Engine, account: int) -> None:
    """Ids come back in the rows' order; insert_rows leaves out nothing and takes server defaults."""
    when = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    keys = [f"k{i}" for i in range(30)]
    with engine.begin() as conn:
        ids = insert_returning_ids(
            conn,
            threads_t,
            [{"account_id": account, "provider_thread_id": k, "first_message_at": when} for k in keys],
        )
        found = dict(conn.execute(sa.select(threads_t.c.id, threads_t.c.provider_thread_id)).all())
        assert [found[i] for i in ids] == keys
        insert_rows(conn, threads_t, [{"account_id": account, "provider_thread_id": "x"}])
        counts = conn.execute(
            sa.select(threads_t.c.message_count).where(threads_t.c.provider_thread_id == "x")
        ).scalar_one()
        assert counts == 0, "the server default applies to a column left out"
        insert_rows(conn, threads_t, [])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(TEXT, max_size=8), st.sets(TEXT, max_size=8))
def test_among_selects_exactly_the_values_given(
    engine: sa.Engine, account: int, stored: set[str], asked: set[str]
) -> None:
    """among() finds the stored values among any texts (COPY's escapes, non-ASCII, empty) on both databases."""
    when = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [{**_row(account, 0, text, [], when, True), "provider_message_id": text} for text in sorted(stored)]
    with engine.begin() as conn:
        insert_rows(conn, messages_t, rows)
        found = set()
        for condition in among(conn, messages_t.c.provider_message_id, sorted(asked)):
            found |= set(conn.execute(sa.select(messages_t.c.provider_message_id).where(condition)).scalars())
        conn.execute(messages_t.delete())
    assert found == stored & asked


def test_among_on_an_expression_and_past_sqlites_parameter_limit(engine: sa.Engine, account: int) -> None:
    """More values than one IN list may hold: every row asked for is found, once (one ANY(array) on PostgreSQL, IN
    lists of 500 elsewhere); an expression (lower(subject), as thread lookup by subject uses it) works too."""
    when = datetime(2026, 11, 26, tzinfo=UTC)
    keys = [f"K{i}" for i in range(1234)]
    with engine.begin() as conn:
        rows = [{"account_id": account, "provider_thread_id": k, "subject": k, "first_message_at": when} for k in keys]
        insert_rows(conn, threads_t, rows)
        ids = sorted(int(i) for i in conn.execute(sa.select(threads_t.c.id)).scalars())
        conditions = list(among(conn, threads_t.c.id, [*ids[::2], ids[-1] + 1]))
        found = [i for c in conditions for i in conn.execute(sa.select(threads_t.c.id).where(c)).scalars()]
        lower = sa.func.lower(threads_t.c.subject, type_=sa.String())
        subjects = [
            s
            for c in among(conn, lower, ["k7", "k1233", "K8", "k9999"])
            for s in conn.execute(sa.select(threads_t.c.subject).where(c)).scalars()
        ]
        assert list(among(conn, threads_t.c.id, [])) == []
    assert sorted(found) == ids[::2]
    assert len(conditions) == (1 if engine.dialect.name == "postgresql" else 2)
    assert sorted(subjects) == ["K1233", "K7"]
