"""docs/schema.md, the HR app's contract, read as the HR app's developers read it, against a freshly migrated database
(SQLite and PostgreSQL): every column its tables list exists with the stated type, nullability, default, index and
uniqueness, and no column of a mail_* table is left out; every SQL example (and the sqlite3 snippet) runs as written
on the databases it claims and returns what the doc says, on messages stored through Store as a sync stores them.
A new example in the doc fails here until a check for it is added. The grants block is tests/test_grants.py's."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from inboxd.blobs import BlobStore
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.parse import parse_message
from inboxd.store import Account, Credential, NewLocation, NewMessage, Store

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
TEXT = SCHEMA_DOC.read_text(encoding="utf-8")
REC = "rita@corp.test"
JANE = "jane.doe@example.org"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
PDF = b"%PDF-1.4 jane's CV"

# --- the doc's column tables ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocColumn:
    name: str
    type: str  # as the doc writes it ("varchar(320)", "timestamp", "JSON list of strings"); "" in the view's shared row
    null: str  # "yes", "no", "no (default true)"; "" for the view (no Null column)
    meaning: str


# the heading of each mail_* relation's section, as the doc has it
SECTIONS = {
    "mail_accounts": "## mail_accounts",
    "mail_messages": "## mail_messages",
    "mail_participants": "## mail_participants",
    "mail_attachments": "## mail_attachments",
    "mail_threads": "## mail_threads",
    "mail_contacts": "## mail_contacts",
    "mail_contact_messages": "## mail_contact_messages (view): a contact's emails",
    "mail_outbox": "## mail_outbox: sending mail from a recruiter's mailbox",
    "mail_quarantine": "## mail_quarantine",
}

# the doc's types (PostgreSQL's, see "Types and conventions") -> information_schema.columns.data_type
PG_TYPES = {
    "bigint": "bigint",
    "integer": "integer",
    "text": "text",
    "boolean": "boolean",
    "timestamp": "timestamp with time zone",
    "JSON list of strings": "json",
    "JSON list": "json",
    "bytea / BLOB": "bytea",
}


def doc_columns(relation: str) -> list[DocColumn]:
    """The first table under the relation's heading whose first header is Column, one entry per column name (a row
    may name several: `import_done`, `import_total`)."""
    heading = SECTIONS[relation]
    assert f"\n{heading}\n" in TEXT, f"docs/schema.md lost its section {heading!r}"
    section = TEXT.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    all_lines = section.splitlines()
    starts = [i for i, line in enumerate(all_lines) if line.startswith("| Column |")]
    assert starts, f"{relation}: no column table"
    lines = []
    for line in all_lines[starts[0] :]:
        if not line.startswith("|"):
            break
        lines.append(line)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    out = []
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip().strip("|").split("|")), strict=True))
        for name in re.findall(r"`([a-z0-9_]+)`", cells["Column"]):
            out.append(DocColumn(name, cells["Type"].replace("`", ""), cells.get("Null", ""), cells["Meaning"]))
    return out


@pytest.mark.parametrize("relation", sorted(SECTIONS))
def test_the_doc_lists_every_column_with_its_type_and_nullability(engine: sa.Engine, relation: str) -> None:
    """Names and NOT NULL on both databases; the types as written (PostgreSQL's) on PostgreSQL, and on SQLite the ids
    are INTEGER PRIMARY KEY (the rowid, reused after deletes, as "Types and conventions" warns)."""
    documented = doc_columns(relation)
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns(relation)}
    assert [c.name for c in documented if c.name not in columns] == [], "documented, but not in the database"
    assert sorted(set(columns) - {c.name for c in documented}) == [], "in the database, but not documented"
    if relation == "mail_contact_messages":
        return  # a view: no NOT NULL to compare; its types come from the tables (checked below on PostgreSQL)
    for doc in documented:
        assert doc.null.split(" ", 1)[0] in ("yes", "no"), doc
        assert columns[doc.name]["nullable"] is (doc.null == "yes"), f"{relation}.{doc.name}: Null {doc.null!r}"
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            info = {r.name: r for r in conn.exec_driver_sql(f"PRAGMA table_info({relation})")}
        assert (info["id"].type, info["id"].pk) == ("INTEGER", 1)


def _pg_columns(engine: sa.Engine, relation: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return {
            r.column_name: r
            for r in conn.execute(
                sa.text(
                    "SELECT column_name, data_type, character_maximum_length, column_default "
                    "FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = :t"
                ),
                {"t": relation},
            )
        }


@pytest.mark.parametrize("relation", sorted(SECTIONS))
def test_the_documented_types_and_defaults_are_postgresqls(pg_engine: sa.Engine, relation: str) -> None:
    columns = _pg_columns(pg_engine, relation)
    for doc in doc_columns(relation):
        if not doc.type:  # the view's row of columns "as in mail_messages"
            continue
        actual = columns[doc.name]
        varchar = re.fullmatch(r"varchar\((\d+)\)(?: hex)?", doc.type)
        if varchar:
            assert (actual.data_type, actual.character_maximum_length) == ("character varying", int(varchar[1])), doc
        else:
            assert doc.type in PG_TYPES, f"{relation}.{doc.name}: the doc's type {doc.type!r} is no type"
            assert actual.data_type == PG_TYPES[doc.type], f"{relation}.{doc.name}: {doc.type!r}"
        default = re.search(r"\(default (.+?)\)", doc.null)
        if default:
            stated = default[1].strip("`")
            expected = {"now": "CURRENT_TIMESTAMP", "''": "''::text"}.get(stated, stated)
            assert actual.column_default is not None, f"{relation}.{doc.name}: no default in the database"
            assert re.sub(r"^'(.*)'::character varying$", r"\1", actual.column_default) == expected, doc


@pytest.mark.parametrize("relation", sorted(set(SECTIONS) - {"mail_contact_messages"}))
def test_what_the_doc_calls_indexed_or_unique_is(engine: sa.Engine, relation: str) -> None:
    """'Indexed': an index leads with the column. 'Unique': a unique constraint or index on exactly that column;
    'Unique together with `x`': on the two. '`(a, b, ...)` is unique': on those."""
    inspector = sa.inspect(engine)
    indexes = inspector.get_indexes(relation)
    uniques = [tuple(u["column_names"]) for u in inspector.get_unique_constraints(relation)]
    uniques += [tuple(i["column_names"]) for i in indexes if i["unique"]]
    leading = {i["column_names"][0] for i in indexes} | {u[0] for u in uniques}
    for doc in doc_columns(relation):
        if "Indexed" in doc.meaning:
            assert doc.name in leading, f"{relation}.{doc.name}: documented as indexed"
        together = re.search(r"Unique together with `([a-z_]+)`", doc.meaning)
        if together:
            assert {doc.name, together[1]} in [set(u) for u in uniques], f"{relation}.{doc.name}"
        elif re.search(r"\bUnique\b|\bIt is unique\b", doc.meaning):
            assert (doc.name,) in uniques, f"{relation}.{doc.name}: documented as unique"
        tuple_unique = re.search(r"`\(([a-z_, ]+)\)` is unique", doc.meaning)
        if tuple_unique:
            assert tuple(tuple_unique[1].split(", ")) in uniques, f"{relation}: {tuple_unique[0]}"


def test_the_documented_enum_values_are_the_databases_checks(engine: sa.Engine) -> None:
    """States, directions, roles and outbox statuses the doc names are exactly those the CHECK constraints allow."""
    documented = {  # where the doc's meaning names the values, each in `backticks`
        ("mail_accounts", "state"): r"One of (.+?)\.",
        ("mail_messages", "direction"): r"^(`\w+`) when .* (`\w+`) otherwise",
        ("mail_participants", "role"): r"^(.+?)\.",
        ("mail_outbox", "status"): r"One of (.+?)\.",
    }
    inspector = sa.inspect(engine)
    for (relation, column), pattern in documented.items():
        meaning = next(c.meaning for c in doc_columns(relation) if c.name == column)
        match = re.search(pattern, meaning)
        assert match, (relation, column)
        values = set(re.findall(r"`(\w+)`", " ".join(match.groups())))
        [check] = [c["sqltext"] for c in inspector.get_check_constraints(relation) if column in c["sqltext"]]
        assert set(re.findall(r"'(\w+)'", check)) == values, (relation, column, check)


# --- the doc's SQL, run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    section: str


def doc_blocks() -> list[Block]:
    blocks = []
    section = ""
    lines = iter(TEXT.splitlines())
    for line in lines:
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("```") and line[3:]:
            code = []
            for inner in lines:
                if inner.startswith("```"):
                    break
                code.append(inner)
            blocks.append(Block(line[3:], "\n".join(code) + "\n", section))
    return blocks


def block(marker: str) -> Block:
    """The one block of the doc that holds ``marker``."""
    [found] = [b for b in doc_blocks() if marker in b.code]
    return found


# A check below for each block; a block no check names fails test_every_example_is_checked.
CHECKED = (
    "FROM mail_contact_messages",  # the Emails tab
    "SET status = 'cancelled'",
    "ON CONFLICT (idempotency_key) DO NOTHING\nRETURNING id",  # psycopg
    "import json, sqlite3",
    "SELECT status, attempts, last_error, next_attempt_at",  # follow a row
    "SET next_attempt_at = NULL",  # retry now
    "AND EXISTS (SELECT 1 FROM mail_participants p",  # a candidate's timeline
    "WHERE m.thread_id = :thread_id",
    "WHERE hr_user_ref = :hr_user_ref",
    "UPDATE mail_accounts SET enabled",
    "INSERT INTO mail_contacts",
    "FROM mail_attachments WHERE message_id = :message_id",
    "GRANT USAGE ON SCHEMA",  # tests/test_grants.py
)


def test_every_example_is_checked() -> None:
    unchecked = [b.code for b in doc_blocks() if b.lang in ("sql", "python") and not any(m in b.code for m in CHECKED)]
    assert unchecked == [], "an example in docs/schema.md that this file does not run"
    for marker in CHECKED:
        block(marker)  # each still there, once


@dataclass
class Seeded:
    """Rita's mailbox: a conversation with Jane (m1 from her with a CV and an inline logo, m2 Rita's answer, m3 from
    Jane without a Date), Bob's m4, and Jane's m5, deleted; the contacts Jane and Bob."""

    engine: sa.Engine
    store: Store
    account: Account
    ids: dict[str, int] = field(default_factory=dict)
    contacts: dict[str, int] = field(default_factory=dict)

    def run(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return list(result) if result.returns_rows else []

    def rowcount(self, sql: str, **params: Any) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.text(sql), params).rowcount


def _message(name: str, *, sender: str, to: str, date: datetime | None, reply_to: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Message-ID"] = sender, to, f"<{name}@mail.test>"
    msg["Subject"] = "Interview" if reply_to is None else "Re: Interview"
    if date is not None:
        msg["Date"] = format_datetime(date)
    if reply_to:
        msg["In-Reply-To"] = msg["References"] = f"<{reply_to}@mail.test>"
    msg.set_content(f"body of {name}")
    return msg


@pytest.fixture
def seeded(engine: sa.Engine, secret_box: SecretBox, tmp_path: Path) -> Seeded:
    store = Store(engine, clock=FakeClock(T0), secret_box=secret_box, blobs=BlobStore(tmp_path / "attachments"))
    account = store.add_account(REC, "company", Credential("password", "x"), hr_user_ref="recruiter-7")
    folder = store.ensure_folder(account.id, "INBOX", None)
    seeded = Seeded(engine, store, account)
    m1 = _message("m1", sender=f"Jane Doe <{JANE}>", to=REC, date=T0)
    m1.add_attachment(PDF, maintype="application", subtype="pdf", filename="cv.pdf")
    m1.add_attachment(b"logo", maintype="image", subtype="png", filename="logo.png", disposition="inline")
    messages = [
        ("m1", m1, None),
        ("m2", _message("m2", sender=REC, to=f"Jane <{JANE}>", date=T0 + timedelta(hours=1), reply_to="m1"), None),
        ("m3", _message("m3", sender=JANE, to=REC, date=None, reply_to="m2"), T0 + timedelta(hours=2)),
        ("m4", _message("m4", sender="bob@example.org", to=REC, date=T0 + timedelta(hours=3)), None),
        ("m5", _message("m5", sender=JANE, to=REC, date=T0 + timedelta(hours=4)), None),
    ]
    for uid, (name, msg, received_at) in enumerate(messages, start=1):
        parsed = parse_message(msg.as_bytes())
        new = NewMessage(
            identity=f"mid:{name}@mail.test",
            parsed=parsed,
            folder_name="INBOX",
            direction="outbound" if parsed.from_email == REC else "inbound",
            received_at=received_at,
            location=NewLocation(uid, (), None),
        )
        [seeded.ids[name]] = store.store_batch(account.id, folder.id, [new], {}, last_uid=uid)
    seeded.run("UPDATE mail_messages SET deleted_at = updated_at WHERE id = :id", id=seeded.ids["m5"])
    for email, ref in ((JANE, "cand-42"), ("bob@example.org", "cand-43")):
        [[seeded.contacts[email]]] = seeded.run(
            "INSERT INTO mail_contacts (email, hr_contact_ref) VALUES (:e, :r) RETURNING id", e=email, r=ref
        )
    return seeded


def test_the_emails_tab_lists_a_contacts_live_messages_and_sorts_as_the_doc_says(seeded: Seeded) -> None:
    rows = seeded.run(block("FROM mail_contact_messages").code, contact_id=seeded.contacts[JANE])
    by_id = {seeded.ids[n]: n for n in seeded.ids}
    names = [by_id[r.message_id] for r in rows]
    # "rows without sent_at come last" on SQLite, "first with DESC" on PostgreSQL (m3 has no Date)
    assert names == (["m2", "m1", "m3"] if seeded.engine.dialect.name == "sqlite" else ["m3", "m2", "m1"])
    first = {by_id[r.message_id]: r for r in rows}["m1"]
    assert (first.account_email, first.hr_user_ref, first.direction) == (REC, "recruiter-7", "inbound")
    assert (first.attachment_count, bool(first.has_attachments)) == (1, True)  # the inline logo does not count
    for order in ("ORDER BY sent_at DESC NULLS LAST", "ORDER BY COALESCE(sent_at, received_at) DESC"):
        sql = block("FROM mail_contact_messages").code.replace("ORDER BY sent_at DESC", order)
        assert [by_id[r.message_id] for r in seeded.run(sql, contact_id=seeded.contacts[JANE])][-1] == (
            "m3" if "NULLS LAST" in order else "m1"
        )
    by_ref = seeded.run(
        "SELECT message_id FROM mail_contact_messages WHERE hr_contact_ref = :ref AND deleted_at IS NULL", ref="cand-42"
    )
    assert {r.message_id for r in by_ref} == {r.message_id for r in rows}


def test_the_timeline_and_the_thread_queries(seeded: Seeded) -> None:
    by_id = {seeded.ids[n]: n for n in seeded.ids}
    timeline = seeded.run(block("AND EXISTS (SELECT 1 FROM mail_participants p").code, candidate_email=JANE)
    assert [by_id[r.id] for r in timeline] == ["m1", "m2", "m3"]  # oldest first, m3 by received_at; m5 deleted
    assert {r.mailbox for r in timeline} == {REC}
    thread = seeded.run(block("WHERE m.thread_id = :thread_id").code, thread_id=timeline[0].thread_id)
    assert [(by_id[r.id], r.attachments) for r in thread] == [("m1", 1), ("m2", 0), ("m3", 0)]
    assert thread[2].in_reply_to == "m2@mail.test"  # without <>, as the doc says
    references = thread[2].references
    assert (references if isinstance(references, list) else json.loads(references)) == ["m2@mail.test"]


def test_the_mailbox_state_query_and_the_enabled_switch(seeded: Seeded) -> None:
    state = block("WHERE hr_user_ref = :hr_user_ref").code
    [row] = seeded.run(state, hr_user_ref="recruiter-7")
    assert (row.email, bool(row.enabled), row.state, row.import_total) == (REC, True, "active", None)
    assert seeded.rowcount(block("UPDATE mail_accounts SET enabled").code, enabled=False, account_id=row.id) == 1
    assert bool(seeded.run(state, hr_user_ref="recruiter-7")[0].enabled) is False
    assert seeded.run(state.replace("hr_user_ref = :hr_user_ref", "email = :mailbox_email"), mailbox_email=REC)


def test_registering_a_candidate_and_listing_attachments(seeded: Seeded) -> None:
    assert seeded.rowcount(
        block("INSERT INTO mail_contacts").code, email_lowercase="sam@example.org", hr_contact_ref="c"
    )
    [created] = seeded.run("SELECT created_at FROM mail_contacts WHERE email = 'sam@example.org'")
    if seeded.engine.dialect.name == "sqlite":  # "when filled by the default has no fraction"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", created.created_at)
    rows = seeded.run(block("FROM mail_attachments WHERE message_id = :message_id").code, message_id=seeded.ids["m1"])
    assert [(r.filename, r.content_type, bool(r.is_inline), bool(r.stored)) for r in rows] == [
        ("cv.pdf", "application/pdf", False, True),
        ("logo.png", "image/png", True, True),
    ]
    assert rows[0].sha256 == hashlib.sha256(PDF).hexdigest()
    assert rows[0].size_bytes == len(PDF)


def queue_as_the_doc_does(seeded: Seeded, key: str) -> int | None:
    """The doc's insert for the database at hand: psycopg's on PostgreSQL, the sqlite3 snippet on SQLite."""
    if seeded.engine.dialect.name == "postgresql":
        with seeded.engine.begin() as conn:
            return conn.exec_driver_sql(
                block("ON CONFLICT (idempotency_key) DO NOTHING\nRETURNING id").code,
                {"account_id": seeded.account.id, "reply_to_message_id": seeded.ids["m1"], "idempotency_key": key},
            ).scalar()
    snippet = block("import json, sqlite3")
    assert '"/var/lib/inboxd/inboxd.db"' in snippet.code
    code = snippet.code.replace('"/var/lib/inboxd/inboxd.db"', repr(seeded.engine.url.database))
    code = code.replace('"candidate-42/message-7"', repr(key))
    before = seeded.run("SELECT max(id) AS id FROM mail_outbox")[0].id
    namespace: dict[str, Any] = {"account_id": seeded.account.id}
    exec(code, namespace)  # the doc's own snippet, on the test's database
    namespace["db"].close()
    after = seeded.run("SELECT max(id) AS id FROM mail_outbox")[0].id
    return None if after == before else int(after)


def test_queueing_following_retrying_and_cancelling_an_outbox_row(seeded: Seeded) -> None:
    row_id = queue_as_the_doc_does(seeded, "candidate-42/message-7")
    assert row_id is not None
    assert queue_as_the_doc_does(seeded, "candidate-42/message-7") is None  # the same key: nothing, no error
    follow = block("SELECT status, attempts, last_error, next_attempt_at").code
    [row] = seeded.run(follow, key="candidate-42/message-7")
    assert (row.status, row.attempts, row.last_error, row.sent_at, row.sent_message_id) == (
        "queued",
        0,
        None,
        None,
        None,
    )
    [created] = seeded.run("SELECT created_at FROM mail_outbox WHERE id = :id", id=row_id)
    if seeded.engine.dialect.name == "sqlite":  # filled by the default, like mail_contacts.created_at
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", created.created_at)

    retry = block("SET next_attempt_at = NULL").code
    seeded.run("UPDATE mail_outbox SET next_attempt_at = :t WHERE id = :id", t=T0 + timedelta(days=1), id=row_id)
    assert seeded.rowcount(retry, id=row_id) == 1
    assert seeded.run(follow, key="candidate-42/message-7")[0].next_attempt_at is None
    seeded.run("UPDATE mail_outbox SET delivery_uncertain = true WHERE id = :id", id=row_id)
    assert seeded.rowcount(retry, id=row_id) == 0  # a row that may have gone out keeps its wait
    seeded.run("UPDATE mail_outbox SET delivery_uncertain = false WHERE id = :id", id=row_id)

    cancel = block("SET status = 'cancelled'").code
    assert seeded.rowcount(cancel, id=row_id) == 1
    assert seeded.rowcount(cancel, id=row_id) == 0  # final: "updates 0 rows"
    assert seeded.rowcount(retry, id=row_id) == 0
    assert seeded.run(follow, key="candidate-42/message-7")[0].status == "cancelled"
    assert seeded.rowcount("DELETE FROM mail_outbox WHERE id = :id AND status <> 'sending'", id=row_id) == 1
