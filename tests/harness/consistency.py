"""Whether inboxd's database holds what the IMAP server holds, for the fault and kill tests: after a fault and a clean
run, every server message (folder, UID, Message-ID) is stored exactly once, nothing is missing and nothing is extra.

The server side is read over IMAP as the account's user (the folders inboxd syncs, chosen by its documented rule);
the database side from inboxd_folders, inboxd_locations and mail_messages.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from dataclasses import dataclass

import sqlalchemy as sa

from harness.mailstack import MailStack
from inboxd.planner import FolderListing, select_folders

_MSGID = re.compile(rb"<([^<>\s]+)>")


@dataclass(frozen=True)
class ServerFolder:
    uidvalidity: int
    message_ids: dict[int, str | None]  # UID -> Message-ID (without <>), None when the message has none


@dataclass(frozen=True)
class Consistency:
    """What was compared (for reports): folders, stored message rows, locations."""

    folders: int
    messages: int
    locations: int


def server_state(stack: MailStack, user: str) -> dict[str, ServerFolder]:
    """Every folder inboxd syncs for ``user``, with its UIDVALIDITY and each UID's Message-ID."""
    out: dict[str, ServerFolder] = {}
    with stack.admin_imap(user) as imap:
        listing = [
            FolderListing(name=name, flags=frozenset(f.decode() if isinstance(f, bytes) else f for f in flags))
            for flags, _, name in imap.list_folders()
        ]
        for spec in select_folders(listing):
            selected = imap.select_folder(spec.name, readonly=True)
            uids = imap.search(["ALL"])
            fetched = imap.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
            ids: dict[int, str | None] = {}
            for uid, data in fetched.items():
                header = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER.FIELDS")), b"")
                match = _MSGID.search(header)
                ids[uid] = match.group(1).decode() if match else None
            out[spec.name] = ServerFolder(int(selected[b"UIDVALIDITY"]), ids)
    return out


def _db_state(engine: sa.Engine, user: str) -> tuple[int, dict[str, tuple[int | None, int]], list[sa.Row]]:  # type: ignore[type-arg]
    with engine.connect() as conn:
        account_id = conn.execute(
            sa.text("SELECT id FROM mail_accounts WHERE email = :e"), {"e": user.lower()}
        ).scalar_one()
        folders = {
            r.name: (r.uidvalidity, r.last_uid)
            for r in conn.execute(
                sa.text("SELECT name, uidvalidity, last_uid FROM inboxd_folders WHERE account_id = :a"),
                {"a": account_id},
            )
        }
        locations = list(
            conn.execute(
                sa.text(
                    "SELECT f.name AS folder, l.uid, m.id AS message_id, m.message_id_header, m.deleted_at "
                    "FROM inboxd_locations l JOIN inboxd_folders f ON f.id = l.folder_id "
                    "JOIN mail_messages m ON m.id = l.message_id WHERE f.account_id = :a"
                ),
                {"a": account_id},
            )
        )
    return account_id, folders, locations


def _messages(engine: sa.Engine, account_id: int) -> list[sa.Row]:  # type: ignore[type-arg]
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT id, provider_message_id, message_id_header, deleted_at FROM mail_messages "
                    "WHERE account_id = :a"
                ),
                {"a": account_id},
            )
        )


def assert_db_matches_server(
    engine: sa.Engine, stack: MailStack, user: str, *, allow_unlocated: bool = False
) -> Consistency:
    """The database equals the server for ``user``: the same folders (and UIDVALIDITY), the same (folder, UID) ->
    Message-ID map, one mail_messages row per message (none duplicated, none missing, none left over), cursors at
    the server's last UID and no pending recomputation. ``allow_unlocated``: rows stored by the outbox whose Sent
    copy is not on the server (a send interrupted before filing it) may exist."""
    server = server_state(stack, user)
    account_id, folders, locations = _db_state(engine, user)
    messages = _messages(engine, account_id)
    problems: list[str] = []
    for name, folder in server.items():
        if name not in folders:
            problems.append(f"folder {name!r} is not in the database")
            continue
        uidvalidity, last_uid = folders[name]
        if uidvalidity != folder.uidvalidity:
            problems.append(f"{name}: UIDVALIDITY {uidvalidity} stored, {folder.uidvalidity} on the server")
        if folder.message_ids and last_uid < max(folder.message_ids):
            problems.append(f"{name}: cursor at UID {last_uid}, the server's last UID is {max(folder.message_ids)}")
    problems += [f"folder {name!r} is stored but not on the server" for name in set(folders) - set(server)]
    stored = {(r.folder, r.uid): r for r in locations}
    on_server = {(name, uid): mid for name, f in server.items() for uid, mid in f.message_ids.items()}
    missing = sorted(set(on_server) - set(stored))
    extra = sorted(set(stored) - set(on_server))
    if missing:
        problems.append(f"{len(missing)} server messages are not stored, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} stored locations are not on the server, e.g. {extra[:5]}")
    wrong = [key for key in set(stored) & set(on_server) if stored[key].message_id_header != on_server[key]]
    if wrong:
        problems.append(f"{len(wrong)} locations point at the wrong message, e.g. {sorted(wrong)[:5]}")
    deleted = [key for key, r in stored.items() if r.deleted_at is not None]
    if deleted:
        problems.append(f"{len(deleted)} messages on the server are marked deleted, e.g. {sorted(deleted)[:5]}")
    duplicated = {mid: n for mid, n in Counter(r.message_id_header for r in messages).items() if mid and n > 1}
    if duplicated:
        problems.append(f"{len(duplicated)} Message-IDs are stored more than once, e.g. {list(duplicated)[:5]}")
    expected_ids = {mid for mid in on_server.values() if mid}
    stored_ids = {r.message_id_header for r in messages if r.message_id_header}
    if expected_ids - stored_ids:
        problems.append(f"Message-IDs not stored: {sorted(expected_ids - stored_ids)[:5]}")
    located = {r.message_id for r in locations}
    unlocated = [r for r in messages if r.id not in located and r.deleted_at is None]
    if unlocated and not allow_unlocated:
        problems.append(f"{len(unlocated)} stored messages are in no server folder, e.g. {unlocated[:3]}")
    with engine.connect() as conn:
        dirty = conn.execute(
            sa.text(
                "SELECT count(*) FROM inboxd_dirty d JOIN mail_messages m ON m.id = d.message_id "
                "WHERE m.account_id = :a"
            ),
            {"a": account_id},
        ).scalar_one()
    if dirty:
        problems.append(f"{dirty} messages still marked dirty (labels/read state not recomputed)")
    assert not problems, f"database differs from the server for {user}:\n  " + "\n  ".join(problems)
    return Consistency(folders=len(server), messages=len(messages), locations=len(locations))


def assert_db_is_prefix_of_server(engine: sa.Engine, stack: MailStack, user: str) -> int:
    """What an interrupted sync may leave: only messages that are on the server, none twice, and no cursor ahead of
    its rows (every server UID up to a folder's cursor is stored, so the next run cannot skip one). Returns the
    number of stored locations."""
    server = server_state(stack, user)
    account_id, folders, locations = _db_state(engine, user)
    messages = _messages(engine, account_id)
    problems: list[str] = []
    stored = {(r.folder, r.uid): r for r in locations}
    for (name, uid), row in stored.items():
        folder = server.get(name)
        if folder is None or uid not in folder.message_ids:
            problems.append(f"{name} UID {uid} is stored but not on the server")
        elif row.message_id_header != folder.message_ids[uid]:
            problems.append(f"{name} UID {uid} points at the wrong message")
    for name, (_, last_uid) in folders.items():
        skipped = [uid for uid in server.get(name, ServerFolder(0, {})).message_ids if uid <= last_uid]
        skipped = [uid for uid in skipped if (name, uid) not in stored]
        if skipped:
            problems.append(f"{name}: cursor at UID {last_uid} but UIDs {skipped[:5]} are not stored (would be lost)")
    duplicated = {mid: n for mid, n in Counter(r.message_id_header for r in messages).items() if mid and n > 1}
    if duplicated:
        problems.append(f"Message-IDs stored more than once: {list(duplicated)[:5]}")
    assert not problems, f"interrupted sync left an inconsistent database for {user}:\n  " + "\n  ".join(problems)
    return len(stored)


def copies_in_inbox(stack: MailStack, user: str, message_ids: list[str]) -> dict[str, int]:
    """How many copies of each Message-ID (with or without <>) sit in ``user``'s INBOX."""
    counts: dict[str, int] = {}
    with stack.admin_imap(user) as imap:
        imap.select_folder("INBOX", readonly=True)
        uids = imap.search(["ALL"])
        fetched = imap.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
        found: Counter[str] = Counter()
        for data in fetched.values():
            header = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER.FIELDS")), b"")
            match = _MSGID.search(header)
            if match:
                found[match.group(1).decode()] += 1
    for message_id in message_ids:
        counts[message_id] = found[message_id.strip().strip("<>")]
    return counts


def postfix_holds_mail_for(stack: MailStack, recipient: str) -> bool:
    """Whether the stack's Postfix still has a message for ``recipient`` in its queue (not delivered yet)."""
    proc = subprocess.run(
        ["postqueue", "-c", str(stack.root / "postfix"), "-j"], capture_output=True, text=True, check=True, timeout=30
    )
    for line in proc.stdout.splitlines():
        entry = json.loads(line)
        if any(r.get("address", "").lower() == recipient.lower() for r in entry.get("recipients", [])):
            return True
    return False
