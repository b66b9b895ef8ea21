"""Folders of a server without RFC 6154 SPECIAL-USE attributes, synced from the loopback Dovecot behind a proxy that
takes the attributes out of its LIST replies (as a Dovecot without special_use in its namespace, Courier or many
hosted servers send them): Trash, Junk and Drafts are told by their names and not synced, Sent is known as Sent, and
a draft saved in a synced folder (flagged \\Draft) is not stored, on the bodies-first and the header-first paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness import MailStack, make_message
from harness.config import write_stack_config
from harness.line_proxy import LineRewritingProxy
from harness.outbox import make_outbox, outbox_row
from inboxd.clock import SystemClock
from inboxd.config import Config, load_config
from inboxd.models import MailFolder, MailMessage, MailOutbox
from inboxd.runner import Runner
from inboxd.store import Credential, Store

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
folders_t = MailFolder.__table__  # type: ignore[attr-defined]
outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]

# the attribute list of a LIST or LSUB reply, and the RFC 6154 attributes taken out of it
_LIST_REPLY = re.compile(rb"^(\* (?:LIST|LSUB) \()([^)]*)(\))", re.IGNORECASE)
_SPECIAL_USE = {b"\\all", b"\\archive", b"\\drafts", b"\\flagged", b"\\junk", b"\\sent", b"\\trash", b"\\important"}


def _without_special_use(line: bytes) -> bytes:
    def strip(match: re.Match[bytes]) -> bytes:
        attributes = [a for a in match.group(2).split() if a.lower() not in _SPECIAL_USE]
        return match.group(1) + b" ".join(attributes) + match.group(3)

    return _LIST_REPLY.sub(strip, line, count=1)


def NoSpecialUseServer(upstream_host: str, upstream_port: int) -> LineRewritingProxy:
    """Dovecot's plain port, with the special-use attributes taken out of every LIST and LSUB reply line."""
    return LineRewritingProxy(upstream_host, upstream_port, _without_special_use)


def test_the_proxy_takes_out_special_use_attributes_and_nothing_else() -> None:
    assert _without_special_use(b'* LIST (\\HasNoChildren \\Trash) "/" Trash\r\n') == (
        b'* LIST (\\HasNoChildren) "/" Trash\r\n'
    )
    assert _without_special_use(b'* LIST (\\Sent) "/" Sent\r\n') == b'* LIST () "/" Sent\r\n'
    assert _without_special_use(b'* LSUB (\\Drafts \\Marked) "/" Drafts\r\n') == b'* LSUB (\\Marked) "/" Drafts\r\n'
    assert _without_special_use(b'* LIST (\\HasChildren) "/" Trash\r\n') == b'* LIST (\\HasChildren) "/" Trash\r\n'
    assert _without_special_use(b"* 1 FETCH (FLAGS (\\Draft) UID 4)\r\n") == b"* 1 FETCH (FLAGS (\\Draft) UID 4)\r\n"


def _config(tmp_path: Path, db_url: str, stack: MailStack, port: int) -> Config:
    path = write_stack_config(tmp_path, db_url, stack)
    text = path.read_text()
    old = f'imap_port = {stack.imap_port}\nimap_tls = "starttls"'
    assert old in text
    path.write_text(text.replace(old, f'imap_port = {port}\nimap_tls = "plain"'))
    return load_config(path, env={})


def _sync(config: Config, store: Store, email: str) -> None:
    results = Runner(config, store, clock=SystemClock()).sync_once(only=email)
    assert [r.ok for r in results] == [True], results


def _stored(store: Store, email: str) -> list[tuple[str, str, list[str]]]:
    account = store.account(email)
    assert account is not None
    query = sa.select(messages_t).where(messages_t.c.account_id == account.id).order_by(messages_t.c.subject)
    with store.engine.connect() as conn:
        return [(r.subject, r.direction, r.labels) for r in conn.execute(query)]


def _folders(store: Store, email: str) -> dict[str, str | None]:
    account = store.account(email)
    assert account is not None
    query = sa.select(folders_t.c.name, folders_t.c.special_use).where(folders_t.c.account_id == account.id)
    with store.engine.connect() as conn:
        return {row.name: row.special_use for row in conn.execute(query)}


@pytest.mark.mailstack
def test_trash_junk_and_drafts_of_a_server_without_special_use_are_not_synced_and_sent_is_sent(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack
) -> None:
    """Without the attributes, Trash, Junk, Drafts and "Deleted Items" were synced as mail: the recruiter's autosaved
    draft showed up as outbound mail, deleted and spam mail stayed visible; a reply in Sent from an alias address was
    inbound. Now they are told by their names: not synced, Sent known as \\Sent (the reply is outbound).
    "Projects/Trash" (deeper down) and "Trash talk" (merely containing the word) are synced as normal folders. A draft
    saved in INBOX (\\Draft) is not stored, on the first sync (bodies first) and on the next one (header first)."""
    user = mailstack.new_user("nospecialuse")
    store.add_account(user, "local", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    mailstack.deliver(user, make_message("Ana <ana@example.org>", user, "application", "my CV"))
    with mailstack.admin_imap(user) as imap:  # straight to Dovecot, which creates Trash, Junk, Drafts, Sent, Archive
        for folder in ("Projects", "Projects/Trash", "Trash talk", "Deleted Items"):
            imap.create_folder(folder)
        imap.append("Drafts", make_message(user, "ana@example.org", "autosaved draft", "Dear Ana"), flags=[b"\\Draft"])
        imap.append("Trash", make_message("bo@example.org", user, "deleted", "x"), flags=[b"\\Seen"])
        imap.append("Deleted Items", make_message("cy@example.org", user, "deleted too", "x"))
        imap.append("Junk", make_message("spam@example.org", user, "spam", "x"))
        imap.append("Sent", make_message("jobs@corp.example", "ana@example.org", "reply from alias", "x"))
        imap.append("Projects/Trash", make_message("di@example.org", user, "filed in Projects/Trash", "x"))
        imap.append("Trash talk", make_message("ed@example.org", user, "filed in Trash talk", "x"))
        imap.append("INBOX", make_message(user, "ana@example.org", "draft in INBOX", "x"), flags=[b"\\Draft"])

    with NoSpecialUseServer(mailstack.host, mailstack.imap_port) as proxy:
        config = _config(tmp_path, db_url, mailstack, proxy.port)
        _sync(config, store, user)
        expected = [
            ("application", "inbound", ["INBOX"]),
            ("filed in Projects/Trash", "inbound", ["Projects/Trash"]),
            ("filed in Trash talk", "inbound", ["Trash talk"]),
            ("reply from alias", "outbound", ["Sent"]),
        ]
        assert _stored(store, user) == expected
        assert _folders(store, user) == {
            "INBOX": "\\Inbox",
            "Sent": "\\Sent",
            "Archive": "\\Archive",
            "Projects": None,
            "Projects/Trash": None,
            "Trash talk": None,
        }

        with mailstack.admin_imap(user) as imap:
            imap.append("INBOX", make_message(user, "bo@example.org", "second draft in INBOX", "x"), flags=[b"\\Draft"])
            imap.append("INBOX", make_message("bo@example.org", user, "second application", "x"))
        _sync(config, store, user)  # not the first sync: header first
        assert _stored(store, user) == sorted([*expected, ("second application", "inbound", ["INBOX"])])


@pytest.mark.mailstack
def test_the_outbox_files_its_copy_in_the_folder_named_sent(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack
) -> None:
    """On a server that marks no folder \\Sent, the outbox's copy of a sent mail goes to the folder named "Sent". The
    row was sent with a note "the copy in Sent could not be filed: the mailbox has no folder marked \\Sent"."""
    user = mailstack.new_user("nospecialuse-out")
    store.add_account(user, "local", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    account = store.account(user)
    assert account is not None
    with store.engine.begin() as conn:
        row_id = conn.execute(
            outbox_t.insert()
            .values(
                account_id=account.id,
                to=["ana@example.org"],
                subject="Interview",
                body_text="Thursday?",
                idempotency_key="sent-by-name",
            )
            .returning(outbox_t.c.id)
        ).scalar_one()
    with NoSpecialUseServer(mailstack.host, mailstack.imap_port) as proxy:
        config = _config(tmp_path, db_url, mailstack, proxy.port)
        [report] = make_outbox(config, store).drain()
    assert (report.status, report.detail) == ("sent", None)
    assert outbox_row(store, row_id).status == "sent"
    with mailstack.admin_imap(user) as imap:
        imap.select_folder("Sent", readonly=True)
        assert len(imap.search(["SUBJECT", "Interview"])) == 1
