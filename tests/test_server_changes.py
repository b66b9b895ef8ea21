"""What the server does behind inboxd's back, against the real Dovecot: folders renamed, deleted and re-created
(a UIDVALIDITY reset with renumbered UIDs), messages moved, half a folder expunged, 10k flag changes with and without
CONDSTORE, a 0-byte message, an attachment over sync.max_attachment_bytes and a 50 MB message. After each, the
database is compared with the server message by message (assert_db_matches_server below).

test_sync_dovecot.py already proves a UIDVALIDITY bump that keeps the UID numbers; here the folder is re-created.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import socket
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from harness import MailStack, make_message
from harness.config import connect_accounts, write_stack_config
from harness.consistency import assert_db_matches_server as assert_same_messages_as_server
from inboxd.clock import SystemClock
from inboxd.config import Config, load_config
from inboxd.models import MailAttachment, MailFolder, MailLocation, MailMessage, MailQuarantine
from inboxd.runner import AccountResult, Runner
from inboxd.store import Credential, Store
from inboxd.sync import SyncSettings

pytestmark = pytest.mark.mailstack

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
folders_t = MailFolder.__table__  # type: ignore[attr-defined]
locations_t = MailLocation.__table__  # type: ignore[attr-defined]
quarantine_t = MailQuarantine.__table__  # type: ignore[attr-defined]
attachments_t = MailAttachment.__table__  # type: ignore[attr-defined]

INBOXD = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "inboxd")
INBOXD_PYTHON = str(Path(INBOXD).with_name("python"))
# docs/schema.md: Trash, Junk and Drafts are not synced, nor the virtual views
NOT_SYNCED = frozenset({"\\trash", "\\junk", "\\drafts", "\\all", "\\flagged", "\\important", "\\noselect"})
MIB = 1024 * 1024


# --- the database equals the server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerMessage:
    folder: str
    uid: int
    message_id: str | None  # without <>
    flags: frozenset[str]
    size: int


@dataclass(frozen=True)
class Comparison:
    """What assert_db_matches_server saw, for tests that assert more."""

    server: list[ServerMessage]
    live_rows: int
    deleted_rows: int
    quarantined: int


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _message_id(header_block: bytes) -> str | None:
    value = BytesHeaderParser().parsebytes(header_block).get("Message-ID")
    if value is None:
        return None
    match = re.search(r"<([^<>]+)>", str(value))
    return "".join((match.group(1) if match else str(value)).split()) or None


def server_mailbox(stack: MailStack, user: str) -> tuple[dict[str, int], list[ServerMessage]]:
    """UIDVALIDITY of every folder inboxd should sync, and every message in them, read with a separate client."""
    uidvalidities: dict[str, int] = {}
    found: list[ServerMessage] = []
    with stack.admin_imap(user) as imap:
        for flags, _, name in imap.list_folders():
            attributes = {(f.decode() if isinstance(f, bytes) else f).lower() for f in flags}
            if attributes & NOT_SYNCED:
                continue
            folder = name.decode() if isinstance(name, bytes) else name
            selected = imap.select_folder(folder, readonly=True)
            uidvalidities[folder] = int(selected[b"UIDVALIDITY"])
            uids = sorted(imap.search(["ALL"]))
            for chunk in _chunks(uids, 1000):
                fetched = imap.fetch(list(chunk), ["FLAGS", "RFC822.SIZE", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
                for uid, data in fetched.items():
                    header = next(v for k, v in data.items() if k.startswith(b"BODY[HEADER.FIELDS"))
                    found.append(
                        ServerMessage(
                            folder=folder,
                            uid=uid,
                            message_id=_message_id(header),
                            flags=frozenset(f.decode() for f in data[b"FLAGS"] if f != b"\\Recent"),
                            size=int(data[b"RFC822.SIZE"]),
                        )
                    )
    return uidvalidities, found


def assert_db_matches_server(store: Store, stack: MailStack, user: str) -> Comparison:
    """The database holds exactly what the server holds, message by message. harness.consistency's check (folders,
    UIDVALIDITY, (folder, UID) -> Message-ID, one row per message, cursors, nothing left to recompute) when nothing is
    quarantined (it counts a quarantined message as missing), and in every case the details server changes touch:

    - the synced folders are the server's (Trash, Junk, Drafts left out), with the server's UIDVALIDITY;
    - every server message is either one location (folder, UID) with the server's flags, size and Message-ID, or a
      quarantine row for that (folder, UIDVALIDITY, UID); no location the server does not have;
    - a mail_messages row is live exactly when it has a location, its labels are the folders it is in and is_read
      says \\Seen in any of them; rows without a location carry deleted_at and no labels;
    - no Message-ID is held by two live rows (one row per message, however many folders it is in).
    """
    account = store.account(user)
    assert account is not None
    uidvalidities, server = server_mailbox(stack, user)
    with store.engine.connect() as conn:
        folders = {r.id: r for r in conn.execute(sa.select(folders_t).where(folders_t.c.account_id == account.id))}
        locations = conn.execute(
            sa.select(locations_t.c.folder_id, locations_t.c.uid, locations_t.c.message_id, locations_t.c.flags)
            .join(folders_t, folders_t.c.id == locations_t.c.folder_id)
            .where(folders_t.c.account_id == account.id)
        ).all()
        rows = {
            r.id: r
            for r in conn.execute(
                sa.select(
                    messages_t.c.id,
                    messages_t.c.message_id_header,
                    messages_t.c.labels,
                    messages_t.c.is_read,
                    messages_t.c.deleted_at,
                    messages_t.c.size_bytes,
                ).where(messages_t.c.account_id == account.id)
            )
        }
        quarantine = conn.execute(
            sa.select(quarantine_t.c.folder, quarantine_t.c.uidvalidity, quarantine_t.c.uid).where(
                quarantine_t.c.account_id == account.id
            )
        ).all()

    problems: list[str] = []
    db_folders = {f.name: f for f in folders.values()}
    if set(db_folders) != set(uidvalidities):
        problems.append(f"folders: database {sorted(db_folders)} != server {sorted(uidvalidities)}")
    for name, uidvalidity in uidvalidities.items():
        if name in db_folders and db_folders[name].uidvalidity != uidvalidity:
            problems.append(f"{name}: UIDVALIDITY {db_folders[name].uidvalidity} != server {uidvalidity}")

    by_place = {(folders[loc.folder_id].name, loc.uid): loc for loc in locations}
    quarantined = {(q.folder, q.uid) for q in quarantine if uidvalidities.get(q.folder) == q.uidvalidity}
    on_server = {(m.folder, m.uid): m for m in server}
    for place in sorted(set(by_place) - set(on_server)):
        problems.append(f"{place}: stored location the server does not have")
    for place in sorted(set(on_server) - set(by_place) - quarantined):
        problems.append(f"{place}: server message neither stored nor quarantined")
    for place in sorted(set(by_place) & quarantined):
        problems.append(f"{place}: both stored and quarantined")

    flags_of: dict[int, list[frozenset[str]]] = defaultdict(list)
    folders_of: dict[int, set[str]] = defaultdict(set)
    for place, loc in by_place.items():
        # \Recent is per session (RFC 3501 2.3.2): whoever selects first sees it, so it is not compared
        stored_flags = frozenset(loc.flags or ()) - {"\\Recent"}
        flags_of[loc.message_id].append(stored_flags)
        folders_of[loc.message_id].add(place[0])
        message = on_server.get(place)
        row = rows.get(loc.message_id)
        if message is None or row is None:
            continue
        if stored_flags != message.flags:
            problems.append(f"{place}: flags {sorted(stored_flags)} != server {sorted(message.flags)}")
        if row.size_bytes != message.size:
            problems.append(f"{place}: size_bytes {row.size_bytes} != server RFC822.SIZE {message.size}")
        if message.message_id is not None and row.message_id_header != message.message_id:
            problems.append(f"{place}: Message-ID {row.message_id_header!r} != server {message.message_id!r}")

    live_ids: dict[str, int] = {}
    for row in rows.values():
        if row.id in folders_of:
            expected_labels = sorted(folders_of[row.id])
            expected_read = any("\\Seen" in flags for flags in flags_of[row.id])
            if row.deleted_at is not None:
                problems.append(f"row {row.id}: deleted_at set but it is in {expected_labels}")
            if sorted(row.labels or []) != expected_labels:
                problems.append(f"row {row.id}: labels {row.labels} != {expected_labels}")
            if row.is_read != expected_read:
                problems.append(f"row {row.id}: is_read {row.is_read} != {expected_read}")
            if row.message_id_header is not None:
                if row.message_id_header in live_ids:
                    problems.append(f"rows {live_ids[row.message_id_header]} and {row.id}: same Message-ID, both live")
                live_ids[row.message_id_header] = row.id
        elif row.deleted_at is None or row.labels:
            problems.append(f"row {row.id}: in no folder but deleted_at={row.deleted_at} labels={row.labels}")

    assert not problems, f"{len(problems)} differences between database and server:\n" + "\n".join(problems[:30])
    if not quarantined:
        assert_same_messages_as_server(store.engine, stack, user)
    live = sum(1 for r in rows.values() if r.id in folders_of)
    return Comparison(server, live_rows=live, deleted_rows=len(rows) - live, quarantined=len(quarantined))


# --- helpers ----------------------------------------------------------------------------------------------------


def write_config(
    tmp_path: Path, db_url: str, stack: MailStack, *, variant: str = "full", sync_extra: str = ""
) -> Config:
    path = write_stack_config(tmp_path, db_url, stack, host=stack.imap_host(variant), sync_extra=sync_extra)
    return load_config(path, env={})


def connect(store: Store, stack: MailStack, user: str) -> None:
    store.add_account(user, "local", Credential("oauth2_refresh", stack.refresh_token(user)))


def sync(config: Config, store: Store, user: str, *, batch_size: int = 200) -> AccountResult:
    """One cycle; the flag scan of servers without CONDSTORE is due on every sync."""
    settings = SyncSettings(
        batch_size=batch_size,
        max_attachment_bytes=config.sync.max_attachment_bytes,
        flag_scan_interval=timedelta(0),
    )
    [result] = Runner(config, store, clock=SystemClock(), settings=settings).sync_once(only=user)
    assert result.ok, result.reason
    return result


def rows_by_subject(store: Store, user: str) -> dict[str, Any]:
    account = store.account(user)
    assert account is not None
    with store.engine.connect() as conn:
        found = conn.execute(sa.select(messages_t).where(messages_t.c.account_id == account.id)).all()
    return {r.subject: r for r in found}


def bulk_message(user: str, n: int) -> bytes:
    """Message number ``n`` of a bulk load, written out directly (the stdlib builder costs ~1 ms a message)."""
    return (
        f"From: Cand {n} <cand{n}@example.org>\r\nTo: {user}\r\nSubject: bulk {n}\r\n"
        f"Date: Tue, 04 Feb 2025 09:30:00 +0000\r\nMessage-ID: <bulk{n}-{uuid.uuid4().hex}@example.org>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nmessage {n}\r\n"
    ).encode()


def message(user: str, subject: str, *, message_id: str | None = "", body: str = "x") -> bytes:
    """A small message; a fresh Message-ID unless one is given, none at all with ``message_id=None``."""
    raw = make_message("cand@example.org", user, subject, body, message_id=message_id or None)
    if message_id is None:
        raw = re.sub(rb"(?im)^Message-ID:[^\r\n]*\r\n", b"", raw, count=1)
    return raw


def uids_of(imap: Any, subjects: Sequence[str]) -> list[int]:
    found: list[int] = []
    for subject in subjects:
        found += imap.search(["SUBJECT", subject])
    return sorted(found)


@pytest.fixture
def user(mailstack: MailStack) -> str:
    return mailstack.new_user("chg")


# --- folders ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["full", "no_condstore"])
def test_folder_recreated_with_new_uidvalidity_and_renumbered_uids(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str, variant: str
) -> None:
    """A folder deleted and re-created under the same name: new UIDVALIDITY, and the survivors come back under other
    UID numbers in another order. Rows keep their ids (re-mapped by Message-ID, bodies not downloaded again; only the
    messages without a Message-ID are re-read, to hash them), the message that did not come back gets deleted_at, a
    new one is stored, and a message also in INBOX never leaves it."""
    config = write_config(tmp_path, db_url, mailstack, variant=variant)
    connect(store, mailstack, user)
    subjects = ["keep 1", "keep 2", "keep 3", "drops out", "no id 1", "no id 2"]
    with mailstack.admin_imap(user) as imap:
        imap.create_folder("Projects")
        for subject in subjects:
            no_id = subject.startswith("no id")
            imap.append("Projects", message(user, subject, message_id=None if no_id else f"<{uuid.uuid4()}@x>"))
        imap.select_folder("Projects")
        imap.copy(uids_of(imap, ["keep 1"]), "INBOX")
        kept = {s: imap.fetch(uids_of(imap, [s]), ["BODY.PEEK[]"]) for s in subjects if s != "drops out"}
    sync(config, store, user)
    before = rows_by_subject(store, user)
    assert_db_matches_server(store, mailstack, user)
    old_uidvalidity = mailstack.uidvalidity(user, "Projects")

    with mailstack.admin_imap(user) as imap:
        imap.delete_folder("Projects")
        imap.create_folder("Projects")
        for subject in reversed([s for s in subjects if s != "drops out"]):
            [data] = kept[subject].values()
            imap.append("Projects", data[b"BODY[]"])
        imap.append("Projects", message(user, "arrived after", message_id="<after@x>"))
    assert mailstack.uidvalidity(user, "Projects") != old_uidvalidity

    result = sync(config, store, user)
    after = rows_by_subject(store, user)
    assert result.stats.new_messages == 1
    assert {s: after[s].id for s in before} == {s: r.id for s, r in before.items()}, "no row was replaced"
    assert after["drops out"].deleted_at is not None
    assert after["keep 1"].labels == ["INBOX", "Projects"]
    no_id_sizes = sum(after[s].size_bytes for s in ("no id 1", "no id 2"))
    assert result.stats.bytes_downloaded == no_id_sizes + after["arrived after"].size_bytes
    compared = assert_db_matches_server(store, mailstack, user)
    assert (compared.live_rows, compared.deleted_rows) == (6, 1)


def test_folder_renamed_with_its_subfolder(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str
) -> None:
    """A renamed folder, and with it its subfolder: the messages keep their rows and are found under the new names
    without downloading a body, and are never marked deleted on the way (Dovecot refuses to rename INBOX)."""
    config = write_config(tmp_path, db_url, mailstack)
    connect(store, mailstack, user)
    with mailstack.admin_imap(user) as imap:
        imap.create_folder("Projects")
        imap.create_folder("Projects/2025")
        for n, folder in enumerate(["Projects", "Projects", "Projects/2025"]):
            imap.append(folder, message(user, f"m{n}", message_id=f"<ren{n}-{uuid.uuid4()}@x>"), flags=[b"\\Seen"])
    sync(config, store, user)
    before = rows_by_subject(store, user)

    with mailstack.admin_imap(user) as imap:
        imap.rename_folder("Projects", "Renamed 2026")
    result = sync(config, store, user)
    after = rows_by_subject(store, user)
    assert {s: r.id for s, r in after.items()} == {s: r.id for s, r in before.items()}
    assert result.stats.bytes_downloaded == 0
    assert result.stats.remapped == 3
    assert {s: r.labels for s, r in after.items()} == {
        "m0": ["Renamed 2026"],
        "m1": ["Renamed 2026"],
        "m2": ["Renamed 2026/2025"],
    }
    assert all(r.deleted_at is None and r.is_read for r in after.values())
    assert_db_matches_server(store, mailstack, user)


def test_folder_deleted(store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str) -> None:
    """A deleted folder is forgotten: messages only in it get deleted_at (rows kept), a message that is also in
    INBOX stays live with INBOX as its only label."""
    config = write_config(tmp_path, db_url, mailstack)
    connect(store, mailstack, user)
    with mailstack.admin_imap(user) as imap:
        imap.create_folder("Old stuff")
        for n in range(3):
            imap.append("Old stuff", message(user, f"old {n}", message_id=f"<old{n}-{uuid.uuid4()}@x>"))
        imap.select_folder("Old stuff")
        imap.copy(uids_of(imap, ["old 0"]), "INBOX")
    sync(config, store, user)
    assert rows_by_subject(store, user)["old 0"].labels == ["INBOX", "Old stuff"]

    with mailstack.admin_imap(user) as imap:
        imap.delete_folder("Old stuff")
    sync(config, store, user)
    after = rows_by_subject(store, user)
    assert (after["old 0"].deleted_at, after["old 0"].labels) == (None, ["INBOX"])
    assert all(after[f"old {n}"].deleted_at is not None and after[f"old {n}"].labels == [] for n in (1, 2))
    compared = assert_db_matches_server(store, mailstack, user)
    assert (compared.live_rows, compared.deleted_rows) == (1, 2)


@pytest.mark.parametrize("variant", ["full", "no_condstore"])
def test_messages_moved_between_folders(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str, variant: str
) -> None:
    """IMAP MOVE in both directions (INBOX is synced before Archive, so one direction is seen as "new copy, then
    expunge" and the other as "expunge, then new copy"), including a message without a Message-ID: one row per
    message, same id, labels follow, nothing marked deleted, nothing stored twice."""
    config = write_config(tmp_path, db_url, mailstack, variant=variant)
    connect(store, mailstack, user)
    with mailstack.admin_imap(user) as imap:
        for n in range(4):
            imap.append("INBOX", message(user, f"in {n}", message_id=f"<in{n}-{uuid.uuid4()}@x>"))
            imap.append("Archive", message(user, f"arch {n}", message_id=f"<ar{n}-{uuid.uuid4()}@x>"))
        imap.append("INBOX", message(user, "in no id", message_id=None))
    sync(config, store, user)
    before = rows_by_subject(store, user)

    with mailstack.admin_imap(user) as imap:
        imap.select_folder("INBOX")
        imap.move(uids_of(imap, ["in 0", "in 1", "in no id"]), "Archive")
        imap.select_folder("Archive")
        imap.move(uids_of(imap, ["arch 0", "arch 1"]), "INBOX")
    result = sync(config, store, user)
    after = rows_by_subject(store, user)
    assert {s: r.id for s, r in after.items()} == {s: r.id for s, r in before.items()}, "moved, not duplicated"
    assert result.stats.new_messages == 0
    expected = {"in 0": "Archive", "in 1": "Archive", "in no id": "Archive", "arch 0": "INBOX", "arch 1": "INBOX"}
    for subject, folder in expected.items():
        assert (after[subject].labels, after[subject].deleted_at) == ([folder], None), subject
    compared = assert_db_matches_server(store, mailstack, user)
    assert (compared.live_rows, compared.deleted_rows) == (9, 0)


# --- volume -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("db_url", "variant"), [("sqlite", "full"), ("postgresql", "no_qresync")], indirect=["db_url"])
def test_mass_expunge_of_half_a_folder(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str, variant: str
) -> None:
    """1000 of 2000 messages expunged at once (every other UID: the most fragmented UID set): found by QRESYNC
    VANISHED (SQLite run) and by the UID-set diff with CONDSTORE only (PostgreSQL run); 1000 rows get deleted_at."""
    config = write_config(tmp_path, db_url, mailstack, variant=variant)
    connect(store, mailstack, user)
    batch = [bulk_message(user, n) for n in range(2000)]
    with mailstack.admin_imap(user) as imap:
        for start in range(0, len(batch), 500):
            imap.multiappend("INBOX", batch[start : start + 500])
    assert sync(config, store, user, batch_size=500).stats.new_messages == 2000

    with mailstack.admin_imap(user) as imap:
        imap.select_folder("INBOX")
        uids = sorted(imap.search(["ALL"]))
        imap.delete_messages(uids[::2])
        imap.expunge()
    result = sync(config, store, user, batch_size=500)
    assert result.stats.expunged == 1000
    compared = assert_db_matches_server(store, mailstack, user)
    assert (compared.live_rows, compared.deleted_rows) == (1000, 1000)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ten_thousand_flag_changes_with_and_without_condstore(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str
) -> None:
    """10k messages; every one's flags change, first seen through CONDSTORE (CHANGEDSINCE), then again through the
    full flag scan of a server that does not offer CONDSTORE (the same mailbox on the no_condstore listener, as when
    a provider stops advertising it). SQLite only: 10k ingests on PostgreSQL would double this test's minute."""
    (tmp_path / "condstore").mkdir()
    (tmp_path / "plain").mkdir()
    condstore = write_config(tmp_path / "condstore", db_url, mailstack, variant="no_qresync")
    plain = write_config(tmp_path / "plain", db_url, mailstack, variant="no_condstore")
    connect(store, mailstack, user)
    batch = [bulk_message(user, n) for n in range(10_000)]
    with mailstack.admin_imap(user) as imap:
        for start in range(0, len(batch), 1000):
            imap.multiappend("INBOX", batch[start : start + 1000])
    assert sync(condstore, store, user, batch_size=1000).stats.new_messages == 10_000

    with mailstack.admin_imap(user) as imap:
        imap.select_folder("INBOX")
        uids = sorted(imap.search(["ALL"]))
        imap.add_flags(uids, [b"\\Seen"])
    result = sync(condstore, store, user, batch_size=1000)
    assert result.stats.flag_changes == 10_000
    compared = assert_db_matches_server(store, mailstack, user)
    assert compared.live_rows == 10_000

    with mailstack.admin_imap(user) as imap:
        imap.select_folder("INBOX")
        imap.remove_flags(uids[::2], [b"\\Seen"])
        imap.add_flags(uids[1::2], [b"\\Flagged"])
    result = sync(plain, store, user, batch_size=1000)
    assert result.stats.flag_changes == 10_000
    assert_db_matches_server(store, mailstack, user)
    with store.engine.connect() as conn:
        read = conn.execute(sa.select(sa.func.count()).select_from(messages_t).where(messages_t.c.is_read)).scalar()
    assert read == 5000


def test_bodies_fetched_in_runs_by_size_keep_rows_and_cursor_consistent(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str
) -> None:
    """With max_fetch_bytes below any message's size every body is its own FETCH and transaction inside one batch
    of 200; a batch mixing re-mapped and new messages ends with every message stored once and the cursor at the
    folder's last UID (harness.consistency checks it), as with one FETCH per batch."""
    config = write_config(tmp_path, db_url, mailstack)
    connect(store, mailstack, user)
    with mailstack.admin_imap(user) as imap:
        for n in range(6):
            imap.append("INBOX", message(user, f"run {n}", message_id=f"<run{n}-{uuid.uuid4()}@x>"))
        imap.select_folder("INBOX")
        imap.copy(uids_of(imap, ["run 1", "run 4"]), "Archive")
        imap.append("Archive", message(user, "only archived", message_id=None))
    settings = SyncSettings(batch_size=200, max_fetch_bytes=1, flag_scan_interval=timedelta(0))
    [result] = Runner(config, store, clock=SystemClock(), settings=settings).sync_once(only=user)
    assert result.ok, result.reason
    assert (result.stats.new_messages, result.stats.remapped) == (7, 2)
    compared = assert_db_matches_server(store, mailstack, user)
    assert (compared.live_rows, compared.deleted_rows) == (7, 0)


# --- odd sizes --------------------------------------------------------------------------------------------------


def write_into_maildir(stack: MailStack, user: str, raw: bytes, folder: str = "INBOX") -> None:
    """Drop a file into the user's Maildir (Dovecot refuses to APPEND some of what a disk can hold, like 0 bytes)
    and make Dovecot index it."""
    maildir = stack.root / "mail" / user / "Maildir"
    target = maildir if folder == "INBOX" else maildir / f".{folder}"
    path = target / "new" / f"{time.time_ns()}.inboxd-test-{uuid.uuid4().hex}.{socket.gethostname()}"
    path.write_bytes(raw)
    mail = pwd.getpwnam("mail")
    os.chown(path, mail.pw_uid, mail.pw_gid)
    stack.doveadm("force-resync", "-u", user, folder)


def test_zero_byte_message_is_quarantined_once(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str
) -> None:
    """A 0-byte message in the Maildir: quarantined with its reason, the message after it stored, and the next
    sync neither quarantines it again nor stalls on it."""
    config = write_config(tmp_path, db_url, mailstack)
    connect(store, mailstack, user)
    with mailstack.admin_imap(user) as imap:
        imap.append("INBOX", message(user, "before", message_id="<before@x>"))
    write_into_maildir(mailstack, user, b"")
    with mailstack.admin_imap(user) as imap:
        imap.append("INBOX", message(user, "after", message_id="<after@x>"))

    result = sync(config, store, user)
    assert (result.stats.new_messages, result.stats.quarantined) == (2, 1)
    again = sync(config, store, user)
    assert (again.stats.new_messages, again.stats.quarantined) == (0, 0)
    with store.engine.connect() as conn:
        [row] = conn.execute(sa.select(quarantine_t)).all()
    assert (row.folder, row.reason, row.size_bytes, bytes(row.raw or b"")) == ("INBOX", "empty message", 0, b"")
    assert set(rows_by_subject(store, user)) == {"before", "after"}
    assert assert_db_matches_server(store, mailstack, user).quarantined == 1


def test_attachment_over_the_limit_is_listed_not_stored(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, user: str
) -> None:
    """sync.max_attachment_bytes = 64 KiB (docs/config.md): a 200 KB attachment is a mail_attachments row with its
    real size and hash and stored = false, no file written; the small attachment beside it and the message itself
    are stored as usual."""
    config = write_config(tmp_path, db_url, mailstack, sync_extra='max_attachment_bytes = "64KiB"')
    connect(store, mailstack, user)
    big, small = os.urandom(200_000), b"%PDF-1.4 small\n"
    raw = make_message(
        "cand@example.org",
        user,
        "CV and portfolio",
        "see attached",
        message_id="<cv@x>",
        attachments=[("portfolio.zip", "application/zip", big), ("cv.pdf", "application/pdf", small)],
    )
    with mailstack.admin_imap(user) as imap:
        imap.append("INBOX", raw)
    [result] = Runner(config, store, clock=SystemClock()).sync_once(only=user)  # the config's limit, not a test's
    assert result.ok, result.reason
    row = rows_by_subject(store, user)["CV and portfolio"]
    assert row.has_attachments and row.body_text.strip() == "see attached"
    with store.engine.connect() as conn:
        attachments = {
            a.filename: a for a in conn.execute(sa.select(attachments_t).where(attachments_t.c.message_id == row.id))
        }
    assert (attachments["portfolio.zip"].size_bytes, attachments["portfolio.zip"].stored) == (200_000, False)
    assert attachments["portfolio.zip"].sha256 == hashlib.sha256(big).hexdigest()
    assert attachments["cv.pdf"].stored
    files = {p.name for p in (tmp_path / "attachments").rglob("*") if p.is_file()}  # the store fixture's blobs
    assert hashlib.sha256(small).hexdigest() in files
    assert hashlib.sha256(big).hexdigest() not in files
    assert_db_matches_server(store, mailstack, user)


# `inboxd run --once` as the console script runs it, reporting its own peak RSS (VmHWM) on the way out. Not the
# rusage of the child: Linux carries the parent's high-water mark across vfork/exec into ru_maxrss, so after a test
# that held big messages in this pytest process the child would report pytest's size, not its own.
RUN_ONCE_REPORTING_PEAK = """
import sys
from pathlib import Path
from inboxd.cli import main
try:
    code = main(["run", "--once"])
finally:
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    Path(sys.argv[1]).write_text(peak_kib)
sys.exit(code)
"""


def run_once_peak_rss(env: dict[str, str], log: Path) -> tuple[int, int]:
    """`inboxd run --once` in a child process: (exit code, the child's peak RSS in bytes)."""
    peak_file = log.with_suffix(".peak")
    with log.open("ab") as out:
        proc = subprocess.run(
            [INBOXD_PYTHON, "-c", RUN_ONCE_REPORTING_PEAK, str(peak_file)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    return proc.returncode, int(peak_file.read_text()) * 1024


def big_message(user: str, subject: str, attachment: bytes) -> bytes:
    """A text part and ``attachment`` base64-encoded, written out directly (the stdlib builder takes seconds for
    tens of megabytes)."""
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (
        (
            f"From: cand@example.org\r\nTo: {user}\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4()}@x>\r\n"
            "Date: Tue, 04 Feb 2025 09:30:00 +0000\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nportfolio attached\r\n"
            '--b\r\nContent-Type: application/octet-stream; name="portfolio.bin"\r\n'
            'Content-Disposition: attachment; filename="portfolio.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        ).encode()
        + encoded
        + b"--b--\r\n"
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fifty_megabyte_message_is_stored_in_memory_linear_in_its_size(
    db_url: str, tmp_path: Path, mailstack: MailStack, user: str
) -> None:
    """A 50 MB message (a 37.5 MB attachment, over the default 25 MiB max_attachment_bytes) through `inboxd run
    --once`: the message row is stored, the attachment listed with stored = false. inboxd holds the whole message
    while parsing it (imaplib literal, stdlib email parser, base64 decoding): peak RSS grows by about 9x the message
    size, measured from the kernel's rusage against a run over an empty mailbox; the bound below is 12x."""
    config = write_stack_config(tmp_path, db_url, mailstack)
    env = connect_accounts(config, mailstack, [user], INBOXD)
    code, baseline = run_once_peak_rss(env, tmp_path / "run.log")
    assert code == 0
    raw = big_message(user, "fifty megabytes", os.urandom(37_500_000))
    assert len(raw) > 50_000_000
    with mailstack.admin_imap(user) as imap:
        imap.append("INBOX", raw)

    code, peak = run_once_peak_rss(env, tmp_path / "run.log")
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    growth = peak - baseline
    assert growth < 12 * len(raw), f"peak RSS grew by {growth / MIB:.0f} MiB for a {len(raw) / MIB:.0f} MiB message"
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(messages_t)).one()
        attachment = conn.execute(sa.select(attachments_t)).one()
    engine.dispose()
    assert (row.subject, row.size_bytes, row.has_attachments) == ("fifty megabytes", len(raw), True)
    assert (attachment.size_bytes, attachment.stored) == (37_500_000, False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_batch_of_big_messages_is_not_held_in_memory_all_at_once(
    db_url: str, tmp_path: Path, mailstack: MailStack, user: str
) -> None:
    """24 messages of 8 MB (6 MB attachments, under max_attachment_bytes, so their bytes are kept) with the default
    batch_size of 200: all 24 are one batch. Peak RSS must not grow with the batch's total size (192 MB raw, 144 MB
    of decoded attachments), only with what one body FETCH may carry."""
    config = write_stack_config(tmp_path, db_url, mailstack)
    config.write_text(config.read_text().replace("batch_size = 3", "batch_size = 200"))
    env = connect_accounts(config, mailstack, [user], INBOXD)
    code, baseline = run_once_peak_rss(env, tmp_path / "run.log")
    assert code == 0
    attachment = os.urandom(6_000_000)  # the same bytes in each: one blob file, 24 parts decoded in memory
    with mailstack.admin_imap(user) as imap:
        for n in range(24):
            imap.append("INBOX", big_message(user, f"big {n}", attachment))

    code, peak = run_once_peak_rss(env, tmp_path / "run.log")
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    growth = peak - baseline
    assert growth < 300 * MIB, f"peak RSS grew by {growth / MIB:.0f} MiB for 24 messages of 8 MB in one batch"
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(attachments_t).where(attachments_t.c.stored))
        assert stored.scalar() == 24
    engine.dispose()
