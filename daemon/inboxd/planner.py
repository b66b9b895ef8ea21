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
# What a server that flags no folder of a kind (no RFC 6154 SPECIAL-USE: Courier's INBOX.Trash, a Dovecot without
# special_use in its namespace, many hosted servers) calls it: the names mail clients create (imapclient's
# find_special_folder list, Outlook's and Thunderbird's). Matched case-insensitively on the whole name of a folder at
# the top level or directly under INBOX (select_folders). No names for \All, \Flagged and \Important: those are
# views a server has only if it flags them.
WELL_KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    "\\Sent": ("Sent", "Sent Items", "Sent Messages", "Sent Mail"),
    "\\Drafts": ("Drafts", "Draft"),
    "\\Trash": ("Trash", "Deleted Items", "Deleted Messages", "Deleted"),
    "\\Junk": ("Junk", "Spam", "Junk E-mail", "Junk Email"),
    "\\Archive": ("Archive", "Archives"),
}
_KIND_BY_NAME = {name.casefold(): kind for kind, names in WELL_KNOWN_NAMES.items() for name in names}
# Courier and Dovecot with an "INBOX." namespace prefix keep every folder under INBOX; "/" and "." are the
# delimiters servers use when the listing does not say which one (FolderListing.delimiter None)
_GUESSED_DELIMITERS = ("/", ".")


@dataclass(frozen=True, slots=True)
class FolderListing:
    """One LIST reply line: flags as returned (str), the decoded folder name and the hierarchy delimiter (None: not
    known, "/" and "." are tried)."""

    name: str
    flags: frozenset[str]
    delimiter: str | None = None


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


def special_uses(listing: Iterable[FolderListing]) -> dict[str, str]:
    """The special use of each listed folder that has one, by name (INBOX is not in it: it is always the inbox).

    A folder's SPECIAL-USE attribute always wins. Only for a kind that no listed folder is flagged with, a folder
    without any attribute is of that kind by its name: one of WELL_KNOWN_NAMES, matched case-insensitively on its
    whole name at the top level or directly under INBOX ("Trash", "INBOX.Trash", "deleted items"). A folder deeper
    down ("Projects/Trash") or one whose name merely contains the word ("Trash talk", "Sent to agencies") is a
    normal folder.
    """
    folders = [f for f in listing if f.name.upper() != "INBOX"]
    flagged = {f.name: kind for f in folders if (kind := _flagged_kind(f.flags)) is not None}
    kinds_flagged = {kind for f in folders for kind in KNOWN_SPECIAL_USE if kind.lower() in _lower(f.flags)}
    named = {
        f.name: kind
        for f in folders
        if f.name not in flagged and (kind := _named_kind(f)) is not None and kind not in kinds_flagged
    }
    return {**flagged, **named}


def select_folders(listing: Iterable[FolderListing]) -> list[FolderSpec]:
    """The folders to sync, INBOX first: selectable ones except trash, spam, drafts and virtual views (by their
    attribute or, on a server without SPECIAL-USE, their name: special_uses)."""
    listing = list(listing)
    uses = special_uses(listing)
    skipped = {s.lower() for s in SKIPPED_SPECIAL_USE}
    chosen: list[FolderSpec] = []
    for folder in listing:
        flags = _lower(folder.flags)  # attributes are case-insensitive (RFC 3501 9.)
        if flags & _lower(UNSELECTABLE) or flags & skipped:
            continue
        if folder.name.upper() == "INBOX":
            chosen.append(FolderSpec("INBOX", "\\Inbox"))
            continue
        special = uses.get(folder.name)
        if special is not None and special.lower() in skipped:  # by its name on a server without SPECIAL-USE
            continue
        chosen.append(FolderSpec(folder.name, special))
    chosen.sort(key=lambda f: (f.special_use != "\\Inbox", f.special_use != "\\Sent", f.name))
    return chosen


def sent_folder(listing: Iterable[FolderListing]) -> str | None:
    """Where a server without Gmail's labels keeps sent mail (the outbox files its copy there): the selectable folder
    marked \\Sent, else, on a server that marks none, the one named as WELL_KNOWN_NAMES' first match ("Sent" before
    "Sent Items"), in listing order among equals; None when there is neither."""
    listing = list(listing)
    uses = special_uses(listing)
    sent = [f for f in listing if uses.get(f.name) == "\\Sent" and not _lower(f.flags) & _lower(UNSELECTABLE)]
    names = [name.casefold() for name in WELL_KNOWN_NAMES["\\Sent"]]

    def rank(folder: FolderListing) -> int:  # 0 for every flagged one: there are no named ones then
        part = _named_part(folder).casefold()
        return names.index(part) if part in names and _flagged_kind(folder.flags) is None else 0

    return min(sent, key=rank).name if sent else None


def _flagged_kind(flags: Iterable[str]) -> str | None:
    lowered = _lower(flags)
    return next((s for s in KNOWN_SPECIAL_USE if s.lower() in lowered), None)


def _named_part(folder: FolderListing) -> str:
    """The folder's name without an INBOX parent ("INBOX.Sent Items" -> "Sent Items"); deeper paths stay whole."""
    delimiters = (folder.delimiter,) if folder.delimiter else _GUESSED_DELIMITERS
    for delimiter in delimiters:
        prefix = "INBOX" + delimiter
        if folder.name[: len(prefix)].upper() == prefix:
            return folder.name[len(prefix) :]
    return folder.name


def _named_kind(folder: FolderListing) -> str | None:
    # a well-known name has no delimiter in it: "Projects/Trash" or "INBOX.Old.Trash" is no match
    return _KIND_BY_NAME.get(_named_part(folder).casefold())


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
