"""The schema: migrations create exactly what models.py declares (SQLite and PostgreSQL); upgrade is idempotent."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

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
