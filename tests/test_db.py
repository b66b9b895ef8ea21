"""The schema: migrations create exactly what models.py declares (SQLite and PostgreSQL); upgrade is idempotent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from dbs import PG_URL
from inboxd import db
from inboxd.models import metadata


def test_migrations_match_the_models(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_check_schema_passes(engine: sa.Engine) -> None:
    db.upgrade(engine)
    db.check_schema(engine)
    assert db.current_revision(engine) == db.head_revision()


def test_schema_head_is_the_newest_migration() -> None:
    """check_schema compares with SCHEMA_HEAD (no Alembic in the daemon); a new migration must bump it."""
    assert db.head_revision() == db.SCHEMA_HEAD


def test_the_daemon_does_not_load_alembic() -> None:
    code = "import sys, inboxd.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_check_schema_refuses_an_older_or_unmigrated_database(empty_db_url: str) -> None:
    engine = db.create_engine(empty_db_url)
    try:
        assert db.current_revision(engine) is None
        with pytest.raises(db.DatabaseError, match="schema is at nothing"):
            db.check_schema(engine)
        db.upgrade(engine, "0008")
        assert db.current_revision(engine) == "0008"
        with pytest.raises(db.DatabaseError, match=f"schema is at 0008, this inboxd needs {db.SCHEMA_HEAD}"):
            db.check_schema(engine)
        db.upgrade(engine)
        db.check_schema(engine)
    finally:
        engine.dispose()


def test_hr_contract_tables_exist(engine: sa.Engine) -> None:
    names = set(sa.inspect(engine).get_table_names())
    assert {
        "mail_accounts",
        "mail_messages",
        "mail_participants",
        "mail_attachments",
        "mail_threads",
        "mail_contacts",
        "mail_quarantine",
    } <= names
    columns = {c["name"] for c in sa.inspect(engine).get_columns("mail_messages")}
    assert {"provider_message_id", "references", "body_html", "labels", "deleted_at", "direction"} <= columns


def test_postgresql_sessions_plan_each_query_for_the_table_as_it_is_now() -> None:
    """A first sync fills empty tables faster than autovacuum analyzes them; a generic plan cached while
    mail_messages was empty (a sequential scan) made every batch's lookups read the whole table. Every pooled
    PostgreSQL session plans per execution, also after the pool handed the connection back and out again."""
    engine = db.create_engine(PG_URL)
    try:
        for _ in range(3):  # the SET must survive the rollback the pool does when a connection is returned
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_custom_plan"
    finally:
        engine.dispose()


def test_postgresql_sessions_compress_stored_bodies_with_lz4() -> None:
    """Bodies stored by inboxd are TOAST-compressed with lz4 (cheaper than pglz); the HR app reads them as ever."""
    engine = db.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            assert conn.exec_driver_sql("SHOW default_toast_compression").scalar() == "lz4"
            conn.exec_driver_sql("CREATE TEMP TABLE toast_probe (body text)")
            body = "a recruiter's long mail " * 2000
            conn.exec_driver_sql("INSERT INTO toast_probe VALUES (%(b)s)", {"b": body})
            method, stored = conn.exec_driver_sql("SELECT pg_column_compression(body), body FROM toast_probe").one()
            assert method == "lz4"
            assert stored == body
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("query", "idle"),
    [("", 30), ("?keepalives_idle=45", 45)],
    ids=["defaults", "the url's own value wins"],
)
def test_postgresql_connections_notice_a_dead_peer_within_a_minute(query: str, idle: int) -> None:
    """TCP keepalives on every connection (read back from the live socket, not from inboxd's settings): a connection
    that died under a query (a failover, a partition) fails within about a minute instead of the kernel's two hours,
    which kept a sync, and its account, waiting. A value in database.url is kept."""
    engine = db.create_engine(PG_URL + query)
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            sock = socket.socket(fileno=os.dup(raw.pgconn.socket))
            try:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            finally:
                sock.close()
            assert raw.info.get_parameters().get("connect_timeout") == "10"
    finally:
        engine.dispose()
