"""The schema: migrations create exactly what models.py declares (SQLite and PostgreSQL); upgrade is idempotent."""

from __future__ import annotations

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
