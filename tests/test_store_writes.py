"""Writers of one account's messages on SQLite and PostgreSQL: the sync's batch and the outbox's sent copy look a
message up by identity and insert it when not found, and must not both insert it (the unique key on
(account_id, provider_message_id) then failed the later one: the account showed "internal error" until its next
sync). Each writer is a Store of its own, as two nodes or two processes are."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import inboxd.store as store_module
from inboxd import db
from inboxd.blobs import BlobStore
from inboxd.clock import SystemClock
from inboxd.crypto import SecretBox
from inboxd.models import MailMessage, MailQuarantine
from inboxd.parse import parse_message
from inboxd.store import Credential, NewLocation, NewMessage, Store

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
quarantine_t = MailQuarantine.__table__  # type: ignore[attr-defined]

RAW = (
    b"From: Rita Recruiter <rita@example.com>\r\nTo: cand@example.org\r\nSubject: Offer\r\n"
    b"Message-ID: <offer-1@example.com>\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n\r\nWelcome!\r\n"
)


def _message(uid: int, folder: str) -> NewMessage:
    return NewMessage(
        identity="mid:<offer-1@example.com>",  # a server without its own ids: the sync and the outbox agree
        parsed=parse_message(RAW),
        folder_name=folder,
        direction="outbound",
        received_at=None,
        location=NewLocation(uid, ("\\Seen",), None),
    )


@pytest.fixture
def node_store(secret_box: SecretBox, tmp_path: Path) -> Iterator[Any]:
    """Stores on one database (a URL), each with an engine (a connection pool) of its own."""
    engines: list[sa.Engine] = []

    def make(url: str) -> Store:
        engine = db.create_engine(url)
        engines.append(engine)
        return Store(engine, clock=SystemClock(), secret_box=secret_box, blobs=BlobStore(tmp_path / "attachments"))

    yield make
    for engine in engines:
        engine.dispose()


def test_a_sent_copy_stored_while_a_batch_looks_the_message_up_is_stored_once(
    node_store: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox stores its sent copy between the batch's lookup and its insert. It now waits for the batch's
    transaction and then finds the batch's row; before, it inserted first and the batch failed on the unique key."""
    syncing, sending = node_store(db_url), node_store(db_url)
    account = syncing.add_account("rita@example.com", "fake", Credential("password", "x"))
    sent = syncing.ensure_folder(account.id, "Sent", "\\Sent")
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["sent"] = sending.store_sent(account.id, _message(0, "Sent"))
        except Exception as exc:  # reported below
            outcome["sent"] = exc

    lookup = store_module._ids_by_identity
    sender = threading.Thread(target=send)

    def lookup_then_let_the_outbox_in(conn: sa.Connection, account_id: int, identities: Any) -> dict[str, int]:
        found = lookup(conn, account_id, identities)
        if not sender.is_alive() and "sent" not in outcome:
            sender.start()
            sender.join(timeout=2)  # the outbox's store_sent waits for this transaction now: it does not finish
        return found

    monkeypatch.setattr(store_module, "_ids_by_identity", lookup_then_let_the_outbox_in)
    inserted = syncing.store_batch(account.id, sent.id, [_message(7, "Sent")], {}, last_uid=7)
    sender.join(timeout=60)
    assert not sender.is_alive()
    assert outcome["sent"] == inserted[0], outcome
    with syncing.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(messages_t)).scalar() == 1


def test_writers_of_different_accounts_do_not_wait_for_each_other_on_postgresql(
    node_store: Any, pg_engine: sa.Engine
) -> None:
    """The lock is the account's: a batch of another account goes on while one account's transaction is open.
    (SQLite has one writer at a time for the whole database, whatever the account.)"""
    url = pg_engine.url.render_as_string(hide_password=False)
    first, second = node_store(url), node_store(url)
    one = first.add_account("one@example.com", "fake", Credential("password", "x"))
    two = first.add_account("two@example.com", "fake", Credential("password", "x"))
    folder = second.ensure_folder(two.id, "INBOX", None)
    with first._writing_messages(one.id):
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (second.store_batch(two.id, folder.id, [_message(1, "INBOX")], {}, last_uid=1), done.set())
        )
        worker.start()
        assert done.wait(timeout=60), "the other account's batch waited for this account's lock"
    worker.join()


def test_a_quarantine_row_without_bytes_keeps_the_bytes_that_came_later(store: Store) -> None:
    """A message quarantined because its body never came is asked for again (AccountSync._retry_bodiless); when the
    body comes and does not parse, its row keeps the bytes and the parser's reason."""
    account = store.add_account("q@example.com", "fake", Credential("password", "x"))
    store.quarantine(account.id, "INBOX", 7, 3, reason="the server sent no body", raw=None)
    store.quarantine(account.id, "INBOX", 7, 3, reason="no headers", raw=b"\r\n\r\nbody")
    store.quarantine(account.id, "INBOX", 7, 3, reason="the server sent no body", raw=None)  # kept as it is
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(quarantine_t.c.reason, quarantine_t.c.raw, quarantine_t.c.size_bytes)).all()
    assert [tuple(r) for r in rows] == [("no headers", b"\r\n\r\nbody", 8)]
