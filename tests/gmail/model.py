"""The Gmail mailbox model: per account one store of messages keyed by X-GM-MSGID, labels as the truth, and
folders as label views, each with its own UIDs, UIDVALIDITY and HIGHESTMODSEQ.

Not locked itself: the server holds ``Store.lock`` around every call.
"""

from __future__ import annotations

import email.message
import email.utils
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser

INBOX = "\\Inbox"
SENT = "\\Sent"
DRAFT = "\\Draft"
IMPORTANT = "\\Important"
STARRED = "\\Starred"
TRASH = "\\Trash"
SPAM = "\\Spam"
SYSTEM_LABELS = {label.lower(): label for label in (INBOX, SENT, DRAFT, IMPORTANT, STARRED, TRASH, SPAM)}
HIDDEN = frozenset({TRASH, SPAM})  # labels that take a message out of All Mail and the label folders

SEEN = "\\Seen"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"
SYSTEM_FLAGS = ("\\Answered", FLAGGED, "\\Draft", DELETED, SEEN)
GMAIL_KEYWORDS = ("$NotPhishing", "$Phishing")


@dataclass(frozen=True)
class FolderNames:
    """Display names of the system folders; Gmail localizes them (and uses "[Google Mail]" in some countries)."""

    root: str = "[Gmail]"
    all: str = "All Mail"
    sent: str = "Sent Mail"
    drafts: str = "Drafts"
    spam: str = "Spam"
    trash: str = "Trash"
    important: str = "Important"
    starred: str = "Starred"


GMAIL_NAMES = FolderNames()
GOOGLE_MAIL_DE_NAMES = FolderNames(
    root="[Google Mail]",
    all="Alle Nachrichten",
    sent="Gesendet",
    drafts="Entwürfe",
    spam="Spam",
    trash="Papierkorb",
    important="Wichtig",
    starred="Markiert",
)

# (SPECIAL-USE attribute, FolderNames field, membership label; None = All Mail)
SPECIAL_FOLDERS = (
    ("\\All", "all", None),
    ("\\Drafts", "drafts", DRAFT),
    ("\\Important", "important", IMPORTANT),
    ("\\Sent", "sent", SENT),
    ("\\Junk", "spam", SPAM),
    ("\\Flagged", "starred", STARRED),
    ("\\Trash", "trash", TRASH),
)
ALL_MAIL_FIRST_UID = 1001  # as if older mail had gone: All Mail UIDs never coincide with INBOX UIDs by accident


def canonical_label(label: str) -> str:
    """System labels case-insensitively to their canonical spelling; user labels unchanged."""
    return SYSTEM_LABELS.get(label.lower(), label) if label.startswith("\\") else label


@dataclass
class Message:
    gm_msgid: int
    gm_thrid: int
    raw: bytes
    internaldate: datetime
    labels: set[str]
    flags: set[str]  # \Seen \Answered \Flagged \Draft and keywords; \Deleted lives per folder
    modseq: int
    message_id: str | None


@dataclass
class Folder:
    name: str
    label: str | None  # the label that puts a message here; None for All Mail
    special_use: str | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: dict[int, int] = field(default_factory=dict)  # uid -> gm_msgid, ascending
    by_msgid: dict[int, int] = field(default_factory=dict)  # gm_msgid -> uid
    deleted: set[int] = field(default_factory=set)  # UIDs flagged \Deleted in this folder

    def holds(self, msg: Message) -> bool:
        if self.label is None:
            return not msg.labels & HIDDEN
        if self.label == TRASH:
            return TRASH in msg.labels
        if self.label == SPAM:
            return SPAM in msg.labels and TRASH not in msg.labels
        return self.label in msg.labels and not msg.labels & HIDDEN


class MsgIds:
    """X-GM-MSGID source: Gmail's are milliseconds << 20 plus a counter (big unsigned 64-bit numbers)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, int(time.time() * 1000) << 20)
            return self._last


class Account:
    """One Gmail user's mailbox."""

    def __init__(self, email_address: str, names: FolderNames, msgids: Callable[[], int], notify: Callable[[], None]):
        self.email = email_address
        self.names = names
        self.all_mail_hidden = False
        self.messages: dict[int, Message] = {}
        self.folders: dict[str, Folder] = {}
        self.modseq = 1
        self._msgids = msgids
        self._notify = notify
        self._uidvalidity = 0
        self._by_message_id: dict[str, int] = {}
        self._new_folder("INBOX", INBOX, None)
        for attr, key, label in SPECIAL_FOLDERS:
            first = ALL_MAIL_FIRST_UID if label is None else 1
            self._new_folder(f"{names.root}/{getattr(names, key)}", label, attr, first_uid=first)

    # --- folders ----------------------------------------------------------------------------------------------
    def _new_folder(self, name: str, label: str | None, special_use: str | None, first_uid: int = 1) -> Folder:
        self._uidvalidity += 1
        folder = Folder(name, label, special_use, self._uidvalidity, first_uid, self.modseq)
        self.folders[name] = folder
        return folder

    def folder(self, name: str) -> Folder | None:
        """The selectable folder called ``name`` (INBOX case-insensitively); None if absent or hidden."""
        folder = self.folders.get("INBOX" if name.upper() == "INBOX" else name)
        if folder is not None and folder.special_use == "\\All" and self.all_mail_hidden:
            return None
        return folder

    def visible_folders(self) -> list[Folder]:
        return [f for f in self.folders.values() if self.folder(f.name) is f]

    def ensure_label(self, label: str) -> None:
        """A user label gets its folder (and its parents' folders, as Gmail creates "a" for "a/b")."""
        label = canonical_label(label)
        if label.startswith("\\"):
            return
        parts = label.split("/")
        for i in range(1, len(parts) + 1):
            name = "/".join(parts[:i])
            if name and name not in self.folders and name.upper() != "INBOX":
                self._new_folder(name, name, None)

    def delete_label(self, label: str) -> None:
        for msg in list(self.messages.values()):
            if label in msg.labels:
                self.change(msg, remove_labels=[label])
        self.folders.pop(label, None)

    # --- messages ---------------------------------------------------------------------------------------------
    def add(
        self,
        raw: bytes,
        labels: Iterable[str] = (INBOX,),
        flags: Iterable[str] = (),
        internaldate: datetime | None = None,
    ) -> Message:
        raw = _crlf(raw)
        headers = BytesHeaderParser().parsebytes(raw)
        message_id = _first_msgid(headers.get("Message-ID", ""))
        gm_msgid = self._msgids()
        self.modseq += 1
        msg = Message(
            gm_msgid=gm_msgid,
            gm_thrid=self._thread_of(headers) or gm_msgid,
            raw=raw,
            internaldate=internaldate or date_of(headers),
            labels=set(),
            flags=set(),
            modseq=self.modseq,
            message_id=message_id,
        )
        self.messages[gm_msgid] = msg
        if message_id:
            self._by_message_id.setdefault(message_id, gm_msgid)
        self._apply(msg, set(map(canonical_label, labels)), set(), set(flags), set())
        self._place(msg)
        self._notify()
        return msg

    def change(
        self,
        msg: Message,
        *,
        add_labels: Iterable[str] = (),
        remove_labels: Iterable[str] = (),
        add_flags: Iterable[str] = (),
        remove_flags: Iterable[str] = (),
    ) -> bool:
        """Apply label/flag changes; bumps MODSEQ and re-files the message if anything changed."""
        before = (set(msg.labels), set(msg.flags))
        self._apply(
            msg,
            set(map(canonical_label, add_labels)),
            set(map(canonical_label, remove_labels)),
            set(add_flags) - {DELETED},
            set(remove_flags) - {DELETED},
        )
        if (msg.labels, msg.flags) == before:
            return False
        self.modseq += 1
        msg.modseq = self.modseq
        self._place(msg)
        self._notify()
        return True

    def _apply(self, msg: Message, add_l: set[str], rm_l: set[str], add_f: set[str], rm_f: set[str]) -> None:
        # the \Flagged flag and the \Starred label are one thing in Gmail
        if FLAGGED in add_f:
            add_l.add(STARRED)
        if STARRED in add_l:
            add_f.add(FLAGGED)
        if FLAGGED in rm_f:
            rm_l.add(STARRED)
        if STARRED in rm_l:
            rm_f.add(FLAGGED)
        if DRAFT in add_l:
            add_f.add("\\Draft")
        for label in add_l:
            self.ensure_label(label)
        msg.labels = (msg.labels - rm_l) | add_l
        msg.flags = (msg.flags - rm_f) | add_f

    def set_deleted(self, folder: Folder, uid: int, deleted: bool) -> bool:
        if (uid in folder.deleted) == deleted or uid not in folder.uids:
            return False
        (folder.deleted.add if deleted else folder.deleted.discard)(uid)
        msg = self.messages[folder.uids[uid]]
        self.modseq += 1
        msg.modseq = self.modseq
        self._place(msg)
        self._notify()
        return True

    def expunge(self, folder: Folder, uids: Iterable[int] | None = None) -> list[int]:
        """Expunge \\Deleted messages (optionally only ``uids``): a label folder drops its label, All Mail, Trash
        and Spam delete for good. Returns the expunged UIDs."""
        wanted = sorted(folder.deleted if uids is None else folder.deleted & set(uids))
        for uid in wanted:
            gm_msgid = folder.uids.get(uid)
            folder.deleted.discard(uid)
            if gm_msgid is None:
                continue
            msg = self.messages[gm_msgid]
            if folder.label in (None, TRASH, SPAM):
                self.delete_forever(msg)
            else:
                self.change(msg, remove_labels=[folder.label])
        return wanted

    def delete_forever(self, msg: Message) -> None:
        self.messages.pop(msg.gm_msgid, None)
        self.modseq += 1
        for folder in self.folders.values():
            uid = folder.by_msgid.pop(msg.gm_msgid, None)
            if uid is not None:
                del folder.uids[uid]
                folder.deleted.discard(uid)
                folder.highestmodseq = self.modseq
        self._notify()

    def bump_uidvalidity(self, folder: Folder, first_uid: int = 1, uidvalidity: int | None = None) -> int:
        """New UIDVALIDITY and UIDs renumbered from ``first_uid`` in the same order."""
        folder.uidvalidity = uidvalidity if uidvalidity is not None else folder.uidvalidity + 1
        order = list(folder.uids.values())
        folder.uids = {first_uid + i: gm for i, gm in enumerate(order)}
        folder.by_msgid = {gm: uid for uid, gm in folder.uids.items()}
        folder.deleted.clear()
        folder.uidnext = first_uid + len(order)
        self._notify()
        return folder.uidvalidity

    def _place(self, msg: Message) -> None:
        """Give the message a UID in every folder that now holds it and take it out of the others."""
        for folder in self.folders.values():
            uid = folder.by_msgid.get(msg.gm_msgid)
            if folder.holds(msg):
                if uid is None:
                    uid = folder.uidnext
                    folder.uidnext += 1
                    folder.uids[uid] = msg.gm_msgid
                    folder.by_msgid[msg.gm_msgid] = uid
                folder.highestmodseq = max(folder.highestmodseq, msg.modseq)
            elif uid is not None:
                del folder.uids[uid]
                del folder.by_msgid[msg.gm_msgid]
                folder.deleted.discard(uid)
                folder.highestmodseq = max(folder.highestmodseq, msg.modseq)

    def _thread_of(self, headers: email.message.Message) -> int | None:
        refs: list[str] = []
        for name in ("References", "In-Reply-To"):
            refs += re.findall(r"<[^>]+>", str(headers.get(name, "") or ""))
        for ref in reversed(refs):
            gm = self._by_message_id.get(ref)
            if gm is not None and gm in self.messages:
                return self.messages[gm].gm_thrid
        return None

    def by_message_id(self, message_id: str) -> list[Message]:
        return [m for m in self.messages.values() if m.message_id == message_id]


class Store:
    """All accounts of one server, created on first use; ``lock`` guards every access."""

    def __init__(self, names: FolderNames, notify: Callable[[str], None]):
        self.lock = threading.RLock()
        self.names = names
        self.accounts: dict[str, Account] = {}
        self._notify = notify
        self._msgids = MsgIds()

    def account(self, email_address: str) -> Account:
        key = email_address.strip().lower()
        with self.lock:
            if key not in self.accounts:
                self.accounts[key] = Account(key, self.names, self._msgids, lambda: self._notify(key))
            return self.accounts[key]

    def exists(self, email_address: str) -> bool:
        return email_address.strip().lower() in self.accounts

    def find(self, gm_msgid: int) -> tuple[Account, Message]:
        with self.lock:
            for account in self.accounts.values():
                if gm_msgid in account.messages:
                    return account, account.messages[gm_msgid]
        raise KeyError(f"no message with X-GM-MSGID {gm_msgid}")


def _crlf(raw: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", raw)


def _first_msgid(value: str) -> str | None:
    found = re.search(r"<[^>]+>", str(value))
    return found.group(0) if found else None


def date_of(headers: email.message.Message) -> datetime:
    value = headers.get("Date")
    if value:
        try:
            parsed = email.utils.parsedate_to_datetime(str(value))
        except (TypeError, ValueError):
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.now(UTC).replace(microsecond=0)
