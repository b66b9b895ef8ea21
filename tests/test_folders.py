"""Store.prepare_folders: the account's folder rows brought in line with the server's listing in one transaction
(on SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlalchemy as sa

from inboxd.models import MailMessage
from inboxd.parse import parse_message
from inboxd.planner import FolderSpec
from inboxd.store import Credential, NewLocation, NewMessage, Store

messages_t = MailMessage.__table__  # type: ignore[attr-defined]


def _message(uid: int) -> NewMessage:
    raw = f"From: c@example.org\r\nTo: r@example.test\r\nMessage-ID: <m{uid}@example.org>\r\n\r\nbody\r\n".encode()
    return NewMessage(
        identity=f"uid:{uid}",
        parsed=parse_message(raw),
        folder_name="Old",
        direction="inbound",
        received_at=None,
        location=NewLocation(uid, (), None),
    )


def test_prepare_folders_creates_updates_and_drops(store: Store) -> None:
    account = store.add_account("folders@example.test", "fake", Credential("password", "x"))
    first = store.prepare_folders(account.id, [FolderSpec("INBOX", "\\Inbox"), FolderSpec("Old", None)])
    assert list(first) == ["INBOX", "Old"]  # the listing's order
    assert all(f.cursor.uidvalidity is None and f.cursor.last_uid == 0 for f in first.values())
    store.start_full_sync(first["Old"].id, 7, reset_locations=False)
    store.store_batch(account.id, first["Old"].id, [_message(1)], {}, last_uid=1)

    listing = [FolderSpec("Sent", "\\Sent"), FolderSpec("INBOX", "\\Archive")]
    second = store.prepare_folders(account.id, listing)

    assert list(second) == ["Sent", "INBOX"]
    assert second["INBOX"].id == first["INBOX"].id
    assert second["INBOX"].special_use == "\\Archive"
    assert second["Sent"].cursor.uidvalidity is None
    # what was read back is what is stored; "Old" is gone with its location
    assert store.folders(account.id) == second
    # its message lost its only folder: marked dirty, so the recompute marks it deleted (never silently lost)
    store.refresh_dirty(account.id)
    with store.engine.connect() as conn:
        deleted_at = conn.execute(sa.select(messages_t.c.deleted_at)).scalar_one()
    assert deleted_at is not None


def test_prepare_folders_of_an_unchanged_account_keeps_the_cursors(store: Store) -> None:
    account = store.add_account("same@example.test", "fake", Credential("password", "x"))
    specs = [FolderSpec("INBOX", "\\Inbox")]
    inbox = store.prepare_folders(account.id, specs)["INBOX"]
    store.start_full_sync(inbox.id, 42, reset_locations=False)
    store.store_batch(account.id, inbox.id, [_message(3)], {}, last_uid=3)

    again = store.prepare_folders(account.id, specs)["INBOX"]

    assert (again.id, again.cursor.uidvalidity, again.cursor.last_uid) == (inbox.id, 42, 3)
