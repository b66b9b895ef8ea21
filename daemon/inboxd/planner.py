"""Pure sync decisions: which folders to sync, and what to ask the server for, given a cursor and a STATUS.

Nothing here does I/O; sync.py carries the plans out. Every rule is tested without a socket (tests/test_planner.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

# Folders that are never synced as sources of messages: trash and spam are departures, drafts are unfinished,
# \All / \Flagged / \Important are virtual views of messages that live elsewhere.
SKIPPED_SPECIAL_USE = frozenset({"\\Trash", "\\Junk", "\\Drafts", "\\All", "\\Flagged", "\\Important"})
UNSELECTABLE = frozenset({"\\Noselect", "\\NonExistent"})
KNOWN_SPECIAL_USE = ("\\Sent", "\\Archive", "\\Trash", "\\Junk", "\\Drafts", "\\All", "\\Flagged", "\\Important")


@dataclass(frozen=True, slots=True)
class FolderListing:
    """One LIST reply line: flags as returned (str), and the decoded folder name."""

    name: str
    flags: frozenset[str]


@dataclass(frozen=True, slots=True)
class FolderSpec:
    name: str
    special_use: str | None  # '\\Inbox' for INBOX, '\\Sent', '\\Archive', ... or None


@dataclass(frozen=True, slots=True)
class Capabilities:
    condstore: bool
    qresync: bool
    gmail: bool = False  # X-GM-EXT-1: X-GM-MSGID / X-GM-THRID / X-GM-LABELS


@dataclass(frozen=True, slots=True)
class FolderCursor:
    """What inboxd remembers of a folder after its last completed sync."""

    uidvalidity: int | None
    last_uid: int
    uidnext: int | None
    highest_modseq: int | None
    message_count: int | None


@dataclass(frozen=True, slots=True)
class FolderStatus:
    """STATUS (or SELECT) numbers of a folder now."""

    uidvalidity: int
    uidnext: int
    messages: int
    highest_modseq: int | None


class PlanKind(Enum):
    UNCHANGED = "unchanged"
    FULL = "full"
    INCREMENTAL = "incremental"


class ExpungeCheck(Enum):
    NONE = "none"
    VANISHED = "vanished"  # QRESYNC: UID FETCH ... (CHANGEDSINCE n VANISHED) reports expunged UIDs
    UID_DIFF = "uid_diff"  # compare UID SEARCH ALL with the UIDs we know


@dataclass(frozen=True, slots=True)
class FolderPlan:
    kind: PlanKind
    reason: str
    reset_locations: bool = False  # UIDVALIDITY changed: forget old UIDs, re-map messages by identity
    fetch_new_after: int = 0  # fetch messages with UID greater than this
    flags_changed_since: int | None = None  # CONDSTORE: only flags changed since this MODSEQ
    refresh_all_flags: bool = False  # no CONDSTORE: read FLAGS of every known UID
    expunge_check: ExpungeCheck = ExpungeCheck.NONE


def _lower(flags: Iterable[str]) -> set[str]:
    return {f.lower() for f in flags}


def select_folders(listing: Iterable[FolderListing]) -> list[FolderSpec]:
    """The folders to sync, INBOX first: selectable ones except trash, spam, drafts and virtual views."""
    chosen: list[FolderSpec] = []
    for folder in listing:
        flags = {f.lower() for f in folder.flags}  # attributes are case-insensitive (RFC 3501 9.)
        if flags & _lower(UNSELECTABLE) or flags & _lower(SKIPPED_SPECIAL_USE):
            continue
        if folder.name.upper() == "INBOX":
            chosen.append(FolderSpec("INBOX", "\\Inbox"))
            continue
        special = next((s for s in KNOWN_SPECIAL_USE if s.lower() in flags), None)
        chosen.append(FolderSpec(folder.name, special))
    chosen.sort(key=lambda f: (f.special_use != "\\Inbox", f.special_use != "\\Sent", f.name))
    return chosen


def plan_folder(
    cursor: FolderCursor | None,
    status: FolderStatus,
    caps: Capabilities,
    *,
    flag_scan_due: bool = False,
) -> FolderPlan:
    """Decide how to bring one folder up to date.

    `flag_scan_due` only matters without CONDSTORE, where flag changes are invisible to STATUS: the caller sets
    it when the bounded periodic flag scan is due.
    """
    if cursor is None or cursor.uidvalidity is None:
        return FolderPlan(PlanKind.FULL, "first sync")
    if cursor.uidvalidity != status.uidvalidity:
        return FolderPlan(PlanKind.FULL, "uidvalidity changed", reset_locations=True)

    modseq_known = caps.condstore and status.highest_modseq is not None and cursor.highest_modseq is not None
    same_counts = cursor.uidnext == status.uidnext and cursor.message_count == status.messages
    if modseq_known:
        if same_counts and cursor.highest_modseq == status.highest_modseq:
            return FolderPlan(PlanKind.UNCHANGED, "no change")
        return FolderPlan(
            PlanKind.INCREMENTAL,
            "changed",
            fetch_new_after=cursor.last_uid,
            flags_changed_since=cursor.highest_modseq,
            expunge_check=ExpungeCheck.VANISHED if caps.qresync else ExpungeCheck.UID_DIFF,
        )
    if same_counts and not flag_scan_due:
        return FolderPlan(PlanKind.UNCHANGED, "no change")
    return FolderPlan(
        PlanKind.INCREMENTAL,
        "flag scan" if same_counts else "changed",
        fetch_new_after=cursor.last_uid,
        refresh_all_flags=True,
        expunge_check=ExpungeCheck.UID_DIFF,
    )


def imported_earlier(cursor: FolderCursor, status: FolderStatus) -> int | None:
    """How many of a folder's messages (``status``) earlier attempts of the account's import processed, as far as
    its cursor and STATUS tell: none when it was never started or its UIDVALIDITY changed (it starts again from
    UID 1), all of them when it was finished and nothing came since (the UIDNEXT it was finished at). None: only
    the server can tell (started but not finished, or new mail since): the messages at or below the cursor."""
    if cursor.uidvalidity is None or cursor.uidvalidity != status.uidvalidity:
        return 0
    if cursor.uidnext is not None and cursor.uidnext == status.uidnext:
        return status.messages
    return None


def expunged_uids(known: Iterable[int], current: Iterable[int]) -> set[int]:
    return set(known) - set(current)


def batches(uids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(uids), size):
        yield list(uids[start : start + size])


def message_identity(message_id_header: str | None, raw: bytes | None = None) -> str | None:
    """A message's identity within an account: its Message-ID, or a hash of its bytes when it has none.

    Returns None when the identity needs the bytes (no Message-ID and no raw given yet).
    """
    if message_id_header:
        return "mid:" + message_id_header
    if raw is not None:
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    return None


def direction(from_email: str | None, account_email: str, special_use: str | None) -> str:
    if special_use == "\\Sent" or (from_email or "").lower() == account_email.lower():
        return "outbound"
    return "inbound"


def sequence_set(uids: Iterable[int]) -> str:
    """Compact IMAP sequence set ("1:5,9,12:14") for sorted or unsorted UIDs."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty sequence set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)
