"""Threading without a server thread id: References/In-Reply-To first, merges when replies arrive first, and subject
grouping only for replies that carry no references at all (on SQLite and PostgreSQL, through the sync engine)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inboxd import db
from inboxd.clock import FakeClock
from inboxd.crypto import SecretBox
from inboxd.models import MailMessage, MailThread
from inboxd.parse import parse_message
from inboxd.planner import Capabilities
from inboxd.store import Credential, NewLocation, NewMessage, Store
from inboxd.sync import AccountSync, SyncSettings
from inboxd.testing import FakeMailbox, FakeSession
from inboxd.threads import base_subject

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]


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


def _store_each(store: Store, account_email: str, raws: list[bytes]) -> list[int | None]:
    """Store each message in a batch of its own (as separate syncs do); their thread ids, in order."""
    account = store.add_account(account_email, "fake", Credential("password", "x"))
    folder = store.ensure_folder(account.id, "INBOX", None)
    for uid, raw in enumerate(raws, start=1):
        message = NewMessage(
            identity=f"uid:{uid}",
            parsed=parse_message(raw),
            folder_name="INBOX",
            direction="inbound",
            received_at=None,
            location=NewLocation(uid, (), None),
        )
        store.store_batch(account.id, folder.id, [message], {}, last_uid=uid)
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(messages_t.c.thread_id).where(messages_t.c.account_id == account.id).order_by(messages_t.c.id)
            ).scalars()
        )


def _plain(sender: str, to: str, subject: str, n: int, day: int = 2) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <s{n}@example.org>\r\n"
        f"Date: Mon, {day:02d} Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nbody\r\n"
    ).encode()


def test_a_non_ascii_subject_finds_its_thread_in_a_later_batch(engine: sa.Engine, secret_box: SecretBox) -> None:
    """The subject fallback compared lower(subject) in SQL with Python's lower(): SQLite lowercases ASCII only (and
    PostgreSQL under the C locale), so "AW: Ärztin gesucht" without references never found the thread "Ärztin
    gesucht" stored by an earlier batch."""
    store = Store(engine, clock=FakeClock(), secret_box=secret_box)
    rec = "r-umlaut@example.test"
    threads = _store_each(
        store,
        rec,
        [
            _plain("Klinik <hr@klinik.example>", rec, "=?utf-8?q?=C3=84rztin_gesucht?=", 1),
            _plain(rec, "hr@klinik.example", "AW: =?utf-8?q?=C3=84rztin_gesucht?=", 2, day=3),
        ],
    )
    assert threads[0] == threads[1]


def test_the_subject_fallback_needs_a_shared_participant(engine: sa.Engine, secret_box: SecretBox) -> None:
    """A reply without references joined the account's latest thread with the same subject whoever wrote it:
    candidate B's "AW: Bewerbung" landed in candidate A's thread. It needs a participant in common with the thread
    besides the account itself; then the latest such thread is taken."""
    store = Store(engine, clock=FakeClock(), secret_box=secret_box)
    rec = "r-shared@example.test"
    threads = _store_each(
        store,
        rec,
        [
            _plain("Anna <anna@example.org>", rec, "Bewerbung", 1, day=2),
            _plain("Bernd <bernd@example.org>", rec, "Bewerbung", 2, day=3),
            _plain("Anna <anna@example.org>", rec, "AW: Bewerbung", 3, day=4),  # Bernd's thread is the later one
            _plain(rec, "Bernd <bernd@example.org>", "Re: Bewerbung", 4, day=5),
            _plain("Clara <clara@example.org>", rec, "AW: Bewerbung", 5, day=6),  # in neither thread
        ],
    )
    anna, bernd, anna_reply, bernd_reply, clara = threads
    assert anna != bernd
    assert anna_reply == anna
    assert bernd_reply == bernd
    assert clara not in (anna, bernd)


# --- batching: a batch threads its messages exactly as storing them one at a time ------------------------------

_IDS = [f"m{i}@example.org" for i in range(8)]
_SUBJECTS = ["Application", "Re: Application", "RE: application", "Fwd: Offer", "Offer", None]


@st.composite
def _mail(
    draw: st.DrawFn,
) -> tuple[str | None, tuple[str, ...], str | None, str | None, int, str | None, str]:
    """(Message-ID, References, In-Reply-To, Subject, day, Gmail thread key, sender): ids from a small pool, so
    replies arrive before and after their parents, ids repeat, threads get merged and subjects fall back (to a
    thread with the sender in it, or not)."""
    own = draw(st.sampled_from([*_IDS, None]))
    refs = tuple(draw(st.lists(st.sampled_from(_IDS), max_size=3)))
    in_reply_to = draw(st.sampled_from([*_IDS, None])) if draw(st.booleans()) else (refs[-1] if refs else None)
    key = draw(st.sampled_from([None, None, None, "gm1", "gm2"]))
    sender = draw(st.sampled_from(["c@example.org", "d@example.org"]))
    return own, refs, in_reply_to, draw(st.sampled_from(_SUBJECTS)), draw(st.integers(1, 90)), key, sender


def _raw(
    own: str | None,
    refs: tuple[str, ...],
    in_reply_to: str | None,
    subject: str | None,
    day: int,
    sender: str = "c@example.org",
    to: str = "r@example.test",
) -> bytes:
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=day)
    lines = [f"From: {sender}", f"To: {to}", f"Date: {format_datetime(when)}"]
    lines += [f"Message-ID: <{own}>"] if own else []
    lines += [f"References: {' '.join(f'<{r}>' for r in refs)}"] if refs else []
    lines += [f"In-Reply-To: <{in_reply_to}>"] if in_reply_to else []
    lines += [f"Subject: {subject}"] if subject is not None else []
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


_ACCOUNTS = itertools.count()


def _store_in_batches(store: Store, mails: list[Any], cuts: list[int]) -> dict[str, Any]:
    """Store ``mails`` in batches cut at ``cuts``; returns, per message identity, its thread: the identities it
    shares it with and the thread row's (count, first, last, subject)."""
    account = store.add_account(f"r{next(_ACCOUNTS)}@example.test", "fake", Credential("password", "x"))
    folder = store.ensure_folder(account.id, "INBOX", None)
    news = [
        NewMessage(
            identity=f"uid:{uid}",
            parsed=parse_message(_raw(*mail[:5], sender=mail[6], to=account.email)),  # the account shares every thread
            folder_name="INBOX",
            direction="inbound",
            received_at=None,
            location=NewLocation(uid, (), None),
            thread_key=mail[5],
        )
        for uid, mail in enumerate(mails, start=1)
    ]
    bounds = sorted({0, len(news), *(c % (len(news) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        store.store_batch(account.id, folder.id, news[start:end], {}, last_uid=end)
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                messages_t.c.provider_message_id,
                messages_t.c.thread_id,
                threads_t.c.message_count,
                threads_t.c.first_message_at,
                threads_t.c.last_message_at,
                threads_t.c.subject,
            )
            .join(threads_t, threads_t.c.id == messages_t.c.thread_id)
            .where(messages_t.c.account_id == account.id)
        ).all()
        orphans = conn.execute(
            sa.select(sa.func.count())
            .select_from(threads_t)
            .where(threads_t.c.account_id == account.id, ~threads_t.c.id.in_(sa.select(messages_t.c.thread_id)))
        ).scalar_one()
    assert len(rows) == len(mails), "every message has a thread"
    assert orphans == 0, "no thread row is left without messages"
    members: dict[int, set[str]] = {}
    for row in rows:
        members.setdefault(row.thread_id, set()).add(row.provider_message_id)
    for row in rows:
        assert row.message_count == len(members[row.thread_id]), "message_count counts the thread's messages"
    return {
        row.provider_message_id: (
            frozenset(members[row.thread_id]),
            row.message_count,
            row.first_message_at,
            row.last_message_at,
            row.subject,
        )
        for row in rows
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_mail(), min_size=1, max_size=14), st.lists(st.integers(0, 14), max_size=4))
def test_a_batch_threads_its_messages_as_storing_them_one_by_one(
    engine: sa.Engine, secret_box: SecretBox, mails: list[Any], cuts: list[int]
) -> None:
    """Store.store_batch threads a whole batch with a few queries and decides in memory (threads.ThreadPlan):
    whatever the batch boundaries, threads, merges, counts, dates and subjects come out as with batches of one."""
    store = Store(engine, clock=FakeClock(), secret_box=secret_box)
    one_by_one = _store_in_batches(store, mails, list(range(len(mails) + 1)))
    assert _store_in_batches(store, mails, cuts) == one_by_one
