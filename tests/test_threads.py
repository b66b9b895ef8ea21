"""Threading without a server thread id: References/In-Reply-To first, merges when replies arrive first, and subject
grouping only for replies that carry no references at all (on SQLite and PostgreSQL, through the sync engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from inboxd import db
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.models import MailMessage
from inboxd.planner import Capabilities
from inboxd.store import Credential, Store
from inboxd.sync import AccountSync, SyncSettings
from inboxd.testing import FakeMailbox, FakeSession
from inboxd.threads import base_subject

messages_t = MailMessage.__table__  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("subject", "base", "is_reply"),
    [
        ("Re: Application", "application", True),
        ("RE: Fwd: AW: Application", "application", True),
        ("Re[2]: Application", "application", True),
        ("Application", "application", False),
        ("Rebooking", "rebooking", False),
        (None, "", False),
    ],
)
def test_base_subject(subject: str | None, base: str, is_reply: bool) -> None:
    assert base_subject(subject) == (base, is_reply)


def msg(n: int, subject: str, *, refs: str = "", date: str = "02") -> bytes:
    headers = f"References: {refs}\r\nIn-Reply-To: {refs}\r\n" if refs else ""
    return (
        f"From: c@example.org\r\nTo: r@example.test\r\nSubject: {subject}\r\nMessage-ID: <t{n}@example.org>\r\n"
        f"Date: Mon, {date} Nov 2026 10:00:00 +0000\r\n{headers}\r\nbody\r\n"
    ).encode()


def test_threads_by_references_then_subject_fallback(engine: sa.Engine, secret_box: SecretBox) -> None:
    clock = FakeClock()
    store = Store(engine, clock=clock, secret_box=secret_box)
    account = store.add_account("r@example.test", "fake", Credential("password", "x"))
    mb = FakeMailbox()
    mb.append("INBOX", msg(1, "Application"))
    mb.append("INBOX", msg(2, "Re: Application", refs="<t1@example.org>", date="03"))  # by References
    mb.append("INBOX", msg(3, "Re: Application", date="04"))  # no references: grouped by subject
    mb.append("INBOX", msg(4, "Re: Application", refs="<unknown@example.org>", date="05"))  # refs win: own thread
    mb.append("INBOX", msg(5, "Re: Something else", date="05"))  # no matching subject
    AccountSync(store, account, FakeSession(mb, Capabilities(True, True)), settings=SyncSettings(), clock=clock).run()
    with engine.connect() as conn:
        threads = dict(conn.execute(sa.select(messages_t.c.message_id_header, messages_t.c.thread_id)).all())
    assert threads["t1@example.org"] == threads["t2@example.org"] == threads["t3@example.org"]
    assert threads["t4@example.org"] != threads["t1@example.org"]
    assert threads["t5@example.org"] not in {threads["t1@example.org"], threads["t4@example.org"]}


def test_a_replys_parent_is_found_by_index_not_by_reading_the_account(tmp_path: Path) -> None:
    """SQLite without statistics read every message of the account for the thread lookups through an index that
    starts with account_id: first syncs went quadratic (docs/performance.md). Migration 0009."""
    engine = db.create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    db.upgrade(engine)
    queries = {
        "ix_mail_messages_account_message_id": "SELECT thread_id FROM mail_messages WHERE account_id = 1 "
        "AND message_id_header IN ('a', 'b') AND thread_id IS NOT NULL LIMIT 1",
        "ix_mail_messages_account_in_reply_to": "SELECT thread_id FROM mail_messages WHERE account_id = 1 "
        "AND in_reply_to = 'a' AND thread_id IS NOT NULL AND thread_id != 7",
    }
    with engine.connect() as conn:
        for index, query in queries.items():
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query))
            assert index in plan, plan
    engine.dispose()
