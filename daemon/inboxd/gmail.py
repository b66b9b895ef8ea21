"""How a Gmail mailbox is synced: only "All Mail" (found by SPECIAL-USE), identity X-GM-MSGID, threads X-GM-THRID,
labels from X-GM-LABELS with system labels normalized, drafts left out. Facts: shared/docs/gmail-imap.md. Pure."""

from __future__ import annotations

from collections.abc import Iterable

from inboxd.errors import AccountFailed
from inboxd.imap import HeaderInfo
from inboxd.planner import FolderListing, FolderSpec

# Gmail system labels as the HR app sees them (the names Gmail's own API uses).
SYSTEM_LABELS = {
    "\\inbox": "INBOX",
    "\\sent": "SENT",
    "\\important": "IMPORTANT",
    "\\starred": "STARRED",
    "\\draft": "DRAFT",
    "\\drafts": "DRAFT",
    "\\spam": "SPAM",
    "\\junk": "SPAM",
    "\\trash": "TRASH",
}

ALL_MAIL_HIDDEN = (
    'Gmail hides "All Mail" from IMAP for this account: in Gmail, Settings > Labels, tick "Show in IMAP" for '
    "All Mail (Workspace admins: IMAP access must also be on)"
)


def normalize_label(label: str) -> str:
    """'\\\\Inbox' -> 'INBOX'; other system labels likewise; user labels as they are (already UTF-7 decoded)."""
    if label.startswith("\\"):
        return SYSTEM_LABELS.get(label.lower(), label[1:].upper())
    return label


class Gmail:
    def folders(self, listing: Iterable[FolderListing]) -> list[FolderSpec]:
        for folder in listing:
            flags = {f.lower() for f in folder.flags}
            if "\\all" in flags and "\\noselect" not in flags:
                return [FolderSpec(folder.name, "\\All")]
        raise AccountFailed(ALL_MAIL_HIDDEN)

    def identity(self, header: HeaderInfo) -> str | None:
        if header.gm_msgid is None:
            return None
        return f"gm:{header.gm_msgid}"

    def labels(self, gm_labels: tuple[str, ...] | None) -> list[str] | None:
        return sorted({normalize_label(label) for label in gm_labels or ()})

    def thread_key(self, header: HeaderInfo) -> str | None:
        return f"gm:{header.gm_thrid}" if header.gm_thrid is not None else None

    def is_outbound(self, labels: list[str] | None, folder: FolderSpec) -> bool:
        return "SENT" in (labels or [])

    def is_draft(self, header: HeaderInfo) -> bool:
        """All Mail holds the drafts too (\\Draft flag, "\\Draft" label); each autosave is a new message, and the
        mail once sent another one."""
        return any(f.lower() == "\\draft" for f in header.flags) or any(
            SYSTEM_LABELS.get(label.lower()) == "DRAFT" for label in header.gm_labels or ()
        )
