"""An in-memory IMAP mailbox and an ImapSession over it, to test the sync engine's logic without a socket.

It keeps the fake honest by modelling what real servers do (UIDs never reused, MODSEQ bumped on every change,
UIDVALIDITY renumbering); the same behaviours are proven against Dovecot in the integration tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from inboxd.imap import ADDRESS_FIELDS, FlagUpdate, HeaderInfo, SelectInfo, header_fields, reference_ids
from inboxd.parse import normalize_msgid, parse_address_list
from inboxd.planner import Capabilities, FolderListing, FolderStatus


@dataclass
class FakeMessage:
    raw: bytes
    flags: set[str]
    modseq: int


@dataclass
class FakeFolder:
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int = 1
    messages: dict[int, FakeMessage] = field(default_factory=dict)
    highest_modseq: int = 1
    vanished: dict[int, int] = field(default_factory=dict)  # uid -> modseq at which it was expunged


class FakeMailbox:
    def __init__(self) -> None:
        self._validity = itertools.count(100)
        self._modseq = itertools.count(2)
        self.folders: dict[str, FakeFolder] = {}
        self.commands: list[str] = []
        self.add_folder("INBOX", "\\Inbox")

    def add_folder(self, name: str, special_use: str | None = None) -> FakeFolder:
        folder = FakeFolder(name, special_use, next(self._validity))
        self.folders[name] = folder
        return folder

    def append(self, folder: str, raw: bytes, flags: Iterable[str] = ()) -> int:
        f = self.folders[folder]
        uid = f.uidnext
        f.uidnext += 1
        f.highest_modseq = next(self._modseq)
        f.messages[uid] = FakeMessage(raw, set(flags), f.highest_modseq)
        return uid

    def set_flags(self, folder: str, uid: int, flags: Iterable[str]) -> None:
        f = self.folders[folder]
        f.highest_modseq = next(self._modseq)
        f.messages[uid].flags = set(flags)
        f.messages[uid].modseq = f.highest_modseq

    def expunge(self, folder: str, uid: int) -> None:
        f = self.folders[folder]
        f.highest_modseq = next(self._modseq)
        del f.messages[uid]
        f.vanished[uid] = f.highest_modseq

    def move(self, src: str, uid: int, dst: str) -> None:
        msg = self.folders[src].messages[uid]
        self.append(dst, msg.raw, msg.flags)
        self.expunge(src, uid)

    def renumber(self, folder: str) -> None:
        """A UIDVALIDITY change: same messages, new UIDs from 1."""
        f = self.folders[folder]
        old = [f.messages[u] for u in sorted(f.messages)]
        f.uidvalidity = next(self._validity)
        f.messages = {}
        f.vanished = {}
        f.uidnext = 1
        for msg in old:
            self.append(folder, msg.raw, msg.flags)


class FakeSession:
    """ImapSession over a FakeMailbox; records every command it is asked to send."""

    def __init__(self, mailbox: FakeMailbox, caps: Capabilities) -> None:
        self._mb = mailbox
        self._caps = caps
        self._selected: FakeFolder | None = None

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def _cmd(self, name: str) -> None:
        self._mb.commands.append(name)

    def _folder(self) -> FakeFolder:
        assert self._selected is not None, "no folder selected"
        return self._selected

    def list_folders(self) -> list[FolderListing]:
        self._cmd("LIST")
        return [
            FolderListing(f.name, frozenset({f.special_use} if f.special_use and f.name != "INBOX" else set()))
            for f in self._mb.folders.values()
        ]

    def status(self, folder: str) -> FolderStatus:
        self._cmd("STATUS")
        f = self._mb.folders[folder]
        return FolderStatus(
            f.uidvalidity, f.uidnext, len(f.messages), f.highest_modseq if self._caps.condstore else None
        )

    def select(self, folder: str) -> SelectInfo:
        self._cmd("SELECT")
        f = self._mb.folders[folder]
        self._selected = f
        return SelectInfo(f.uidvalidity, f.uidnext, len(f.messages), f.highest_modseq if self._caps.condstore else None)

    def uids_after(self, last_uid: int) -> list[int]:
        self._cmd("SEARCH")
        return sorted(u for u in self._folder().messages if u > last_uid)

    def existing_uids(self, uids: Iterable[int]) -> set[int]:
        self._cmd("SEARCH")
        return set(uids) & set(self._folder().messages)

    def fetch_headers(self, uids: Iterable[int], *, fields: bool = True) -> dict[int, HeaderInfo]:
        # "FETCH headers" asks for the header fields too; "FETCH meta" only for flags, sizes and the like
        self._cmd("FETCH headers" if fields else "FETCH meta")
        out = {}
        for uid in uids:
            msg = self._folder().messages.get(uid)
            if msg is not None:
                head = msg.raw.split(b"\r\n\r\n", 1)[0]
                out[uid] = HeaderInfo(
                    uid,
                    message_id_of(msg.raw) if fields else None,
                    len(msg.raw),
                    tuple(sorted(msg.flags)),
                    msg.modseq if self._caps.condstore else None,
                    None,
                    addresses=addresses_of(msg.raw) if fields else (),
                    references=reference_ids(header_fields(head)) if fields else (),
                )
        return out

    def search_addresses(self, addresses: Iterable[str]) -> set[int]:
        self._cmd("SEARCH")
        wanted = {a.lower() for a in addresses}
        return {u for u, m in self._folder().messages.items() if wanted & set(addresses_of(m.raw))}

    def find_message_id(self, folder: str, message_id: str) -> bool:
        self._cmd("SEARCH")
        wanted = message_id.strip().strip("<>")
        return any(message_id_of(m.raw) == wanted for m in self._mb.folders[folder].messages.values())

    def append(self, folder: str, raw: bytes, flags: tuple[str, ...] = ("\\Seen",)) -> None:
        self._cmd("APPEND")
        self._mb.append(folder, raw, flags)

    def fetch_bodies(self, uids: Iterable[int]) -> dict[int, bytes]:
        self._cmd("FETCH bodies")
        return {u: self._folder().messages[u].raw for u in uids if u in self._folder().messages}

    def larger_than(self, uids: Iterable[int], size: int) -> set[int]:
        self._cmd("SEARCH larger")
        messages = self._folder().messages
        return {u for u in uids if u in messages and len(messages[u].raw) > size}

    def fetch_messages(self, uids: Iterable[int]) -> dict[int, tuple[bytes | None, HeaderInfo]]:
        self._cmd("FETCH messages")
        out: dict[int, tuple[bytes | None, HeaderInfo]] = {}
        for uid in uids:
            msg = self._folder().messages.get(uid)
            if msg is not None:
                modseq = msg.modseq if self._caps.condstore else None
                out[uid] = (msg.raw, HeaderInfo(uid, None, len(msg.raw), tuple(sorted(msg.flags)), modseq, None))
        return out

    def changed_flags(self, up_to_uid: int, since_modseq: int, *, vanished: bool) -> tuple[list[FlagUpdate], set[int]]:
        assert self._caps.condstore
        self._cmd("FETCH changedsince")
        f = self._folder()
        updates = [
            FlagUpdate(u, tuple(sorted(m.flags)), m.modseq)
            for u, m in f.messages.items()
            if u <= up_to_uid and m.modseq > since_modseq
        ]
        gone = {u for u, ms in f.vanished.items() if u <= up_to_uid and ms > since_modseq} if vanished else set()
        return updates, gone

    def all_flags(self, up_to_uid: int) -> list[FlagUpdate]:
        self._cmd("FETCH flags")
        return [
            FlagUpdate(u, tuple(sorted(m.flags)), None) for u, m in self._folder().messages.items() if u <= up_to_uid
        ]

    def park(self) -> None:
        if self._selected is not None:
            self._cmd("CLOSE")
            self._selected = None

    def close(self) -> None:
        self._cmd("LOGOUT")


def addresses_of(raw: bytes) -> tuple[str, ...]:
    fields = header_fields(raw.split(b"\r\n\r\n", 1)[0])
    return tuple(email for name in ADDRESS_FIELDS for _, email in parse_address_list(fields.get(name)))


def message_id_of(raw: bytes) -> str | None:
    return normalize_msgid(header_fields(raw.split(b"\r\n\r\n", 1)[0]).get("message-id"))
