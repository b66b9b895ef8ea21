"""What differs between IMAP servers for the sync engine: which folders, a message's identity, labels, threads.

GenericImap covers standards-compliant servers (Dovecot, Microsoft 365); gmail.py holds Gmail's dialect. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from inboxd.imap import HeaderInfo
from inboxd.planner import FolderListing, FolderSpec, message_identity, select_folders


class Dialect(Protocol):
    def folders(self, listing: Iterable[FolderListing]) -> list[FolderSpec]:
        """The folders to sync, in order."""

    def identity(self, header: HeaderInfo) -> str | None:
        """The message's identity from the header-first FETCH, or None when only its bytes can tell."""

    def labels(self, gm_labels: tuple[str, ...] | None) -> list[str] | None:
        """Labels carried by the server per message, normalized; None when labels are the folders it sits in."""

    def thread_key(self, header: HeaderInfo) -> str | None:
        """The server's conversation id, or None to thread by References/In-Reply-To."""

    def is_outbound(self, labels: list[str] | None, folder: FolderSpec) -> bool:
        """Whether the server says the account sent this message (From is checked separately)."""

    def is_draft(self, header: HeaderInfo) -> bool:
        """Whether the message is a draft in a synced folder (never stored: it was not sent)."""


class GenericImap:
    def folders(self, listing: Iterable[FolderListing]) -> list[FolderSpec]:
        return select_folders(listing)

    def identity(self, header: HeaderInfo) -> str | None:
        return message_identity(header.message_id)

    def labels(self, gm_labels: tuple[str, ...] | None) -> list[str] | None:
        return None

    def thread_key(self, header: HeaderInfo) -> str | None:
        return None

    def is_outbound(self, labels: list[str] | None, folder: FolderSpec) -> bool:
        return folder.special_use == "\\Sent"

    def is_draft(self, header: HeaderInfo) -> bool:
        """Flagged \\Draft (RFC 3501): a draft saved in a synced folder, as a client does where it has no Drafts
        folder it recognises. The Drafts folder itself is not synced (planner.select_folders)."""
        return any(flag.lower() == "\\draft" for flag in header.flags)
