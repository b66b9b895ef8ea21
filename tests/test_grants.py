"""The HR app's PostgreSQL role, as docs/schema.md grants it: the ```sql block of "Database user for the HR app" is
read from the doc and applied to a freshly migrated schema, then, as that role, every read and write the contract
allows works and the rest (inboxd_credentials above all) is refused. PostgreSQL only: SQLite has no grants."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from dbs import PG_URL
from inboxd import db
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox, init_key_file
from inboxd.store import Credential, Store

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
SECTION = "## Database user for the HR app (PostgreSQL)"
DOC_ROLE = "inboxd_hr"
INSUFFICIENT_PRIVILEGE = "42501"


def documented_grants() -> str:
    """The first ```sql block under the section's heading, as the doc has it."""
    text = SCHEMA_DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"docs/schema.md lost its section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```sql\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert block is not None, f"no ```sql block under {SECTION!r}"
    return block.group(1)


@dataclass(frozen=True)
class HrDatabase:
    engine: sa.Engine  # connects as the superuser, search_path = the test's schema
    schema: str
    role: str
    account_id: int


@pytest.fixture
def hr_db(tmp_path: Path) -> Iterator[HrDatabase]:
    """A private schema migrated to head, one account with stored credentials, and the doc's grants applied to a
    role of this test's own (roles are cluster-wide: a fixed name would collide with a parallel test run)."""
    schema = "t_" + uuid.uuid4().hex[:12]
    role = f"{DOC_ROLE}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = db.create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    try:
        db.upgrade(engine)
        key_file = tmp_path / "secret.key"
        init_key_file(key_file)
        store = Store(engine, clock=FakeClock(), secret_box=SecretBox.from_key_file(key_file))
        account = store.add_account("rec@corp.test", "local", Credential("oauth2_refresh", "1//refresh-token"))
        grants = documented_grants()
        # The doc grants on schema public; the test's tables live in its own schema (the rest resolves through
        # search_path), and the role gets this test's name.
        assert grants.count("ON SCHEMA public") == 1
        grants = grants.replace("ON SCHEMA public", f'ON SCHEMA "{schema}"')
        assert re.search(rf"\b{DOC_ROLE}\b", grants)
        grants = re.sub(rf"\b{DOC_ROLE}\b", f'"{role}"', grants)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
            conn.execute(sa.text(f'CREATE ROLE "{role}" NOLOGIN'))
            conn.exec_driver_sql(grants)
        yield HrDatabase(engine=engine, schema=schema, role=role, account_id=account.id)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            if conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first():
                conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
                conn.execute(sa.text(f'DROP ROLE "{role}"'))
        admin.dispose()


def as_hr_app(hr: HrDatabase, sql: str, **params: object) -> list[sa.Row[tuple[object, ...]]] | int:
    """Run one statement as the HR app's role in a transaction that is rolled back; rows, or the rowcount."""
    with hr.engine.connect() as conn, conn.begin() as tx:
        conn.execute(sa.text(f'SET LOCAL ROLE "{hr.role}"'))
        result = conn.execute(sa.text(sql), params)
        out: list[sa.Row[tuple[object, ...]]] | int = list(result) if result.returns_rows else result.rowcount
        tx.rollback()
        return out


def refused(hr: HrDatabase, sql: str, **params: object) -> str:
    """The statement fails as the HR app with permission denied; returns the server's message."""
    with pytest.raises(sa.exc.ProgrammingError) as info:
        as_hr_app(hr, sql, **params)
    assert getattr(info.value.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE, info.value
    return str(info.value.orig)


def queue_mail(hr: HrDatabase, key: str) -> int:
    """As the HR app, queue a mail (the doc's INSERT ... ON CONFLICT ... RETURNING) and keep it: its id."""
    with hr.engine.begin() as conn:
        conn.execute(sa.text(f'SET LOCAL ROLE "{hr.role}"'))
        return int(
            conn.execute(
                sa.text(
                    'INSERT INTO mail_outbox (account_id, "to", subject, body_text, idempotency_key) '
                    "VALUES (:account_id, '[\"jane.doe@example.org\"]', 'Interview', 'Hello Jane', :key) "
                    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id"
                ),
                {"account_id": hr.account_id, "key": key},
            ).scalar_one()
        )


def test_the_hr_app_reads_the_contract(hr_db: HrDatabase) -> None:
    assert as_hr_app(hr_db, "SELECT id, subject, body_html FROM mail_messages") == []
    assert as_hr_app(hr_db, "SELECT * FROM mail_contact_messages WHERE deleted_at IS NULL") == []
    rows = as_hr_app(hr_db, "SELECT email, state FROM mail_accounts")
    assert [tuple(r) for r in rows] == [("rec@corp.test", "active")]  # type: ignore[union-attr]
    for table in ("mail_participants", "mail_attachments", "mail_threads", "mail_contacts", "mail_quarantine"):
        assert as_hr_app(hr_db, f"SELECT * FROM {table}") == []


def test_the_hr_app_writes_contacts_and_outbox_rows_and_switches_a_mailbox(hr_db: HrDatabase) -> None:
    rows = as_hr_app(
        hr_db, "INSERT INTO mail_contacts (email, hr_contact_ref) VALUES ('jane.doe@example.org', 'c-42') RETURNING id"
    )
    assert len(rows) == 1  # type: ignore[arg-type]
    assert as_hr_app(hr_db, "UPDATE mail_contacts SET hr_contact_ref = 'c-43'") == 0  # allowed (no rows kept)
    assert as_hr_app(hr_db, "DELETE FROM mail_contacts") == 0
    assert as_hr_app(hr_db, "UPDATE mail_accounts SET enabled = false WHERE id = :id", id=hr_db.account_id) == 1

    outbox_id = queue_mail(hr_db, "candidate-42/message-7")
    cancel = "UPDATE mail_outbox SET status = 'cancelled' WHERE id = :id AND status = 'queued'"
    assert as_hr_app(hr_db, cancel, id=outbox_id) == 1  # allowed (each as_hr_app statement is rolled back)
    rows = as_hr_app(hr_db, "SELECT status, attempts, last_error FROM mail_outbox WHERE id = :id", id=outbox_id)
    assert [tuple(r) for r in rows] == [("queued", 0, None)]  # type: ignore[union-attr]
    retry = (
        "UPDATE mail_outbox SET next_attempt_at = NULL WHERE id = :id AND status = 'queued' AND NOT delivery_uncertain"
    )
    assert as_hr_app(hr_db, retry, id=outbox_id) == 1  # "Retrying now" (the trigger 0010 then wakes the sender)
    delete = "DELETE FROM mail_outbox WHERE id = :id AND status <> 'sending'"
    assert as_hr_app(hr_db, delete, id=outbox_id) == 1


def test_the_hr_app_cannot_read_the_encrypted_credentials_or_any_private_table(hr_db: HrDatabase) -> None:
    assert "inboxd_credentials" in refused(hr_db, "SELECT secret FROM inboxd_credentials")
    refused(hr_db, "SELECT count(*) FROM inboxd_credentials")
    with hr_db.engine.connect() as conn:
        private = conn.execute(
            sa.text(
                "SELECT c.oid::regclass::text FROM pg_class c "
                "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'v', 'S') "
                "AND c.relname NOT IN ('mail_accounts', 'mail_messages', 'mail_participants', 'mail_attachments', "
                "'mail_threads', 'mail_contacts', 'mail_quarantine', 'mail_outbox', 'mail_contact_messages', "
                "'mail_contacts_id_seq', 'mail_outbox_id_seq')"
            )
        ).scalars()
        private = sorted(private)
        assert "inboxd_credentials" in private and "alembic_version" in private
        for relation in private:
            granted = conn.execute(
                sa.text(
                    "SELECT has_table_privilege(:role, CAST(:rel AS regclass), "
                    "'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') "
                    "OR has_any_column_privilege(:role, CAST(:rel AS regclass), 'SELECT, INSERT, UPDATE, REFERENCES')"
                    if not relation.endswith("_seq")
                    else "SELECT has_sequence_privilege(:role, CAST(:rel AS regclass), 'USAGE, SELECT, UPDATE')"
                ),
                {"role": hr_db.role, "rel": relation},
            ).scalar_one()
            assert granted is False, f"{hr_db.role} holds a privilege on {relation}"


def test_the_hr_app_cannot_write_what_inboxd_owns(hr_db: HrDatabase) -> None:
    refused(hr_db, "UPDATE mail_messages SET subject = 'changed'")
    refused(hr_db, "DELETE FROM mail_messages")
    refused(hr_db, "INSERT INTO mail_threads (provider_thread_id) VALUES ('x')")
    refused(hr_db, "UPDATE mail_accounts SET state = 'active' WHERE id = :id", id=hr_db.account_id)
    refused(hr_db, "UPDATE mail_accounts SET hr_user_ref = 'u-1' WHERE id = :id", id=hr_db.account_id)
    refused(hr_db, "DELETE FROM mail_accounts WHERE id = :id", id=hr_db.account_id)
    outbox_id = queue_mail(hr_db, "candidate-42/message-8")
    refused(hr_db, "UPDATE mail_outbox SET attempts = 0, delivery_uncertain = false WHERE id = :id", id=outbox_id)
    refused(hr_db, "UPDATE mail_outbox SET last_error = NULL, claimed_at = NULL WHERE id = :id", id=outbox_id)
