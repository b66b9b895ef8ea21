"""The IMAP session port and its imapclient adapter: connect, authenticate (XOAUTH2 or password), read folders.

Library errors are translated into inboxd.errors here and nowhere else. One connection per thread, never shared.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from imapclient import IMAPClient, imap_utf7
from imapclient.exceptions import IMAPClientError, LoginError
from imapclient.imapclient import SocketTimeout
from imapclient.response_parser import parse_fetch_response

from inboxd import __version__
from inboxd.errors import AccountFailed, InboxdError, QuotaExceeded, ReauthRequired, RetryLater, SessionExpired
from inboxd.parse import normalize_msgid, parse_address_list, raw_header_value
from inboxd.planner import Capabilities, FolderListing, FolderStatus, sequence_set
from inboxd.tls import verified_context

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SelectInfo:
    uidvalidity: int
    uidnext: int
    exists: int
    highest_modseq: int | None


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """What the header-first FETCH tells about one UID, before any body is downloaded."""

    uid: int
    message_id: str | None
    size: int | None
    flags: tuple[str, ...]
    modseq: int | None
    internaldate: datetime | None
    # every address of From/To/Cc/Bcc/Reply-To: decides contact scope before the body is downloaded
    addresses: tuple[str, ...] = ()
    # In-Reply-To and References ids: a reply in a stored conversation is kept even without a contact on it
    references: tuple[str, ...] = ()
    # Gmail (X-GM-EXT-1) only: the stable message id, the conversation id and the raw labels (UTF-7 decoded)
    gm_msgid: int | None = None
    gm_thrid: int | None = None
    gm_labels: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class FlagUpdate:
    uid: int
    flags: tuple[str, ...] | None  # None: the reply carried no FLAGS (or NIL): unknown, not "none set"
    modseq: int | None
    gm_labels: tuple[str, ...] | None = None


class ImapSession(Protocol):
    """What the sync engine needs from an IMAP server (one authenticated connection)."""

    @property
    def capabilities(self) -> Capabilities: ...

    def list_folders(self) -> list[FolderListing]: ...

    def status(self, folder: str) -> FolderStatus: ...

    def select(self, folder: str) -> SelectInfo: ...

    def uids_after(self, last_uid: int) -> list[int]: ...

    def existing_uids(self, uids: Iterable[int]) -> set[int]:
        """Which of these UIDs still exist in the selected folder (the UID-set diff for expunges)."""

    def fetch_headers(self, uids: Iterable[int], *, fields: bool = True) -> dict[int, HeaderInfo]:
        """FLAGS, sizes, dates, MODSEQ and X-GM-* of these UIDs; with ``fields`` also the header fields that decide
        scope and identity (Message-ID, addresses, references). Without them those stay empty: the caller takes
        them from the parsed body instead of fetching and parsing them twice."""

    def fetch_bodies(self, uids: Iterable[int]) -> dict[int, bytes]: ...

    def larger_than(self, uids: Iterable[int], size: int) -> set[int]:
        """Which of these UIDs are of messages over ``size`` bytes (RFC822.SIZE), in one SEARCH."""

    def fetch_messages(self, uids: Iterable[int]) -> dict[int, tuple[bytes | None, HeaderInfo]]:
        """Bodies with their FLAGS, INTERNALDATE, MODSEQ and X-GM-* in one FETCH (no header fields: the caller
        parses the body), for each UID that got a reply; the body is None when the reply came without it. A UID with
        no reply at all no longer exists (expunged since it was listed)."""

    def search_addresses(self, addresses: Iterable[str]) -> set[int]:
        """UIDs in the selected folder of messages from, to, cc or bcc any of these addresses."""

    def find_message_id(self, folder: str, message_id: str) -> bool:
        """Whether `folder` holds a message with this Message-ID."""

    def append(self, folder: str, raw: bytes, flags: tuple[str, ...] = ("\\Seen",)) -> None:
        """Store a message in `folder` (the Sent copy on servers that do not file sent mail themselves)."""

    def changed_flags(
        self, up_to_uid: int, since_modseq: int, *, vanished: bool
    ) -> tuple[list[FlagUpdate], set[int]]: ...

    def all_flags(self, up_to_uid: int) -> list[FlagUpdate]: ...

    def park(self) -> None:
        """Leave no mailbox selected, to be kept idle between syncs (the server sends nothing unasked then)."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ImapEndpoint:
    host: str
    port: int
    tls: str  # 'tls' | 'starttls' | 'plain'
    ca_file: Path | None = None
    timeout: float = 30.0


def is_refusal(exc: RetryLater) -> bool:
    """Whether a failed command was refused by the server (NO, BAD: the connection still works), not lost with the
    connection (abort, a network error, a timeout)."""
    cause = exc.__cause__
    return isinstance(cause, IMAPClientError) and not isinstance(cause, imaplib.IMAP4.abort)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ImapClientSession:
    """imapclient adapter for ImapSession. Create with `connect`."""

    def __init__(self, client: IMAPClient, caps: Capabilities, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._client = client
        self._caps = caps
        self._sleep = sleep
        self._throttled = 0  # consecutive [THROTTLED] replies: drives the per-command backoff
        self.throttle_waits = 0.0  # seconds slept because of [THROTTLED], for stats and tests
        self._last_tagged = _record_tagged_replies(client._imap)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def list_folders(self) -> list[FolderListing]:
        rows = self._readable_folders()
        return [
            FolderListing(
                name=_text(name), flags=frozenset(_text(f) for f in flags), delimiter=_text(delim) if delim else None
            )
            for flags, delim, name in rows
        ]

    def _readable_folders(self) -> list[tuple[Any, Any, Any]]:
        """The LIST without the names that are not modified UTF-7 (a raw "&" or 8-bit bytes from a non-compliant
        server), which imapclient cannot decode, nor encode again to select them: they are left out and logged
        (``imap.folder_names_unreadable``), and the other folders sync. The names are decoded here, not by
        imapclient: a raw "&" failed its decoding of the whole LIST, and 8-bit bytes (UTF-8 "Müller") it decoded
        without a word into a wrong name ("MÃ¼ller") whose SELECT the server refused at every cycle."""
        self._client.folder_encode = False
        try:
            raw = self._call(self._client.list_folders)
        finally:
            self._client.folder_encode = True
        rows, unreadable = [], []
        for flags, delimiter, name in raw:
            readable = _folder_name(name)
            if readable is None:
                unreadable.append(name)
            else:
                rows.append((flags, delimiter, readable))
        if unreadable:
            log.warning(
                "imap.folder_names_unreadable",
                folders=len(unreadable),
                names=[_text(name)[:80] for name in unreadable[:5]],
            )
        return rows

    def status(self, folder: str) -> FolderStatus:
        what = ["UIDVALIDITY", "UIDNEXT", "MESSAGES"] + (["HIGHESTMODSEQ"] if self._caps.condstore else [])
        raw = self._call(self._client.folder_status, folder, what)
        values = {_text(k).upper(): v for k, v in raw.items()}
        # a value the server left out (or sent as no number) is -1, which no cursor holds: the folder never looks
        # unchanged, and its sync plans from SELECT's numbers. A KeyError here failed the whole account, every cycle
        return FolderStatus(
            uidvalidity=_number(values.get("UIDVALIDITY")),
            uidnext=_number(values.get("UIDNEXT")),
            messages=max(0, _number(values.get("MESSAGES"))),
            highest_modseq=int(values["HIGHESTMODSEQ"]) if _number(values.get("HIGHESTMODSEQ")) >= 0 else None,
        )

    def select(self, folder: str) -> SelectInfo:
        raw = self._call(self._client.select_folder, folder, readonly=True)
        modseq = raw.get(b"HIGHESTMODSEQ")
        return SelectInfo(
            uidvalidity=int(raw[b"UIDVALIDITY"]),
            uidnext=int(raw.get(b"UIDNEXT", 0)),
            exists=int(raw[b"EXISTS"]),
            highest_modseq=int(modseq) if modseq is not None and self._caps.condstore else None,
        )

    def uids_after(self, last_uid: int) -> list[int]:
        found = self._call(self._client.search, ["UID", f"{last_uid + 1}:*"])
        # "n:*" always matches the highest UID, even when it is below n (RFC 3501 6.4.8): filter.
        return sorted(uid for uid in found if uid > last_uid)

    def existing_uids(self, uids: Iterable[int]) -> set[int]:
        """Which of ``uids`` the selected folder still has. Asked in as few SEARCHes as keep each line short: the
        UIDs stored from a sparse folder (scope "contacts", many deletions) made one SEARCH line longer than servers
        take (Dovecot: 64 KB, BAD), while a dense folder's 300,000 UIDs are one short range (this runs at every sync
        of Gmail's All Mail with new mail: one SEARCH per 2,000 UIDs was 150 round trips)."""
        wanted = set(uids)
        found: set[int] = set()
        for uid_set in uid_set_chunks(wanted, UID_SET_CHARS):
            found.update(self._call(self._client.search, ["UID", uid_set]))
        return found & wanted

    def search_addresses(self, addresses: Iterable[str]) -> set[int]:
        found: set[int] = set()
        for address in addresses:
            if self._caps.gmail:
                # Gmail's own search (it knows dots in gmail.com addresses do not matter); one simple query per
                # field rather than OR, which keeps to the documented X-GM-RAW subset
                for field in ("from", "to", "cc", "bcc"):
                    found |= set(self._call(self._client.gmail_search, f"{field}:{address}"))
            else:
                criteria = ["OR", "OR", "FROM", address, "TO", address, "OR", "CC", address, "BCC", address]
                charset = None if address.isascii() else "UTF-8"  # an internationalized address needs CHARSET
                found |= set(self._call(self._client.search, criteria, charset))
        return found

    def fetch_headers(self, uids: Iterable[int], *, fields: bool = True) -> dict[int, HeaderInfo]:
        items = ["UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE", *self._meta_items()]
        if fields:
            items.append(f"BODY.PEEK[HEADER.FIELDS ({' '.join(HEADER_FIELDS)})]")
        wanted = set(uids)
        out: dict[int, HeaderInfo] = {}
        for uid, data in self._fetch(sequence_set(wanted), items, partial=True).items():
            if uid not in wanted:  # an unsolicited flag update (with its UID under QRESYNC), not a message asked for
                continue
            header = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER.FIELDS")), b"") or b""  # NIL
            out[uid] = _header_info(uid, data, header_fields(header))  # no fields: no Message-ID, addresses, refs
        return out

    def larger_than(self, uids: Iterable[int], size: int) -> set[int]:
        wanted = set(uids)
        if not wanted:
            return set()
        found = self._call(self._client.search, ["UID", sequence_set(wanted), "LARGER", str(size)])
        return {uid for uid in found if uid in wanted}

    def fetch_messages(self, uids: Iterable[int]) -> dict[int, tuple[bytes | None, HeaderInfo]]:
        wanted = set(uids)
        items = ["UID", "FLAGS", "INTERNALDATE", *self._meta_items(), "BODY.PEEK[]"]
        out: dict[int, tuple[bytes | None, HeaderInfo]] = {}
        for uid, data in self._fetch(sequence_set(wanted), items, partial=True).items():
            if uid in wanted:  # not an unsolicited flag update
                body = data.get(b"BODY[]")
                out[uid] = (body, _header_info(uid, data, {}, size=len(body) if body is not None else None))
        return out

    def find_message_id(self, folder: str, message_id: str) -> bool:
        """Whether `folder` holds a message with this Message-ID (Gmail: rfc822msgid: in X-GM-RAW)."""
        self.select(folder)
        bare = message_id.strip().strip("<>")
        if self._caps.gmail:
            return bool(self._call(self._client.gmail_search, f"rfc822msgid:{bare}"))
        return bool(self._call(self._client.search, ["HEADER", "Message-ID", bare]))

    def append(self, folder: str, raw: bytes, flags: tuple[str, ...] = ("\\Seen",)) -> None:
        self._call(self._client.append, folder, raw, flags=flags)

    def fetch_bodies(self, uids: Iterable[int]) -> dict[int, bytes]:
        wanted = set(uids)
        fetched = self._fetch(sequence_set(wanted), ["UID", "BODY.PEEK[]"], partial=True)
        # a reply without the body (server hiccup) is left out: the caller must not move its cursor past it
        return {
            uid: data[b"BODY[]"] for uid, data in fetched.items() if uid in wanted and data.get(b"BODY[]") is not None
        }

    def changed_flags(self, up_to_uid: int, since_modseq: int, *, vanished: bool) -> tuple[list[FlagUpdate], set[int]]:
        if up_to_uid < 1:
            return [], set()
        modifiers = [f"CHANGEDSINCE {since_modseq}"] + (["VANISHED"] if vanished else [])
        fetched = self._fetch(f"1:{up_to_uid}", self._flag_items(), modifiers)
        updates = [_flag_update(uid, d) for uid, d in fetched.items()]
        gone: set[int] = set()
        if vanished:
            for line in self._client._imap.untagged_responses.pop("VANISHED", []):
                gone |= parse_vanished(_text(line))
        return updates, gone

    def all_flags(self, up_to_uid: int) -> list[FlagUpdate]:
        if up_to_uid < 1:
            return []
        fetched = self._fetch(f"1:{up_to_uid}", self._flag_items())
        return [_flag_update(uid, d) for uid, d in fetched.items()]

    def _meta_items(self) -> list[str]:
        """FETCH items that come with a new message beside FLAGS and INTERNALDATE, by what the server offers."""
        return (["MODSEQ"] if self._caps.condstore else []) + (
            ["X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS"] if self._caps.gmail else []
        )

    def _flag_items(self) -> list[str]:
        return ["UID", "FLAGS"] + (["X-GM-LABELS"] if self._caps.gmail else [])

    def park(self) -> None:
        # CLOSE expunges nothing here: sync sessions select read-only (EXAMINE)
        if self._client._imap.state == "SELECTED":
            self._call(self._client.close_folder)

    def close(self) -> None:
        try:
            self._client.logout()
        except (IMAPClientError, OSError):
            with contextlib.suppress(OSError):
                self._client.shutdown()

    # -- internals -------------------------------------------------------------------------------------------

    def _fetch(
        self, seqset: str, items: list[str], modifiers: list[str] | None = None, *, partial: bool = False
    ) -> dict[int, dict[bytes, Any]]:
        """UID FETCH over a sequence set we built ourselves, the replies keyed by UID.

        imapclient's fetch() runs message sets through int() (so "1:500" raises) and drops replies it did not
        ask for by number; this keeps its parser but sends the compact set as is.

        ``partial``: a FETCH that ends NO gives the replies that came (logged, imap.fetch_incomplete) instead of
        failing. Gmail ends a FETCH with "NO Some messages could not be FETCHed" when one message of the set cannot
        be served, for as long as it cannot, after sending the others: failing the whole FETCH held the folder at
        that message for good. Only for fetches of new messages, whose callers hold a message whose reply did not
        come (and give it up after some syncs); a flag scan or CHANGEDSINCE must not read a missing reply as
        anything.
        """

        def run() -> dict[int, dict[bytes, Any]]:
            imap = self._client._imap
            args: list[Any] = ["FETCH", seqset, "(" + " ".join(items) + ")"]
            if modifiers:
                args.append("(" + " ".join(modifiers) + ")")
            tag = imap._command("UID", *args)
            typ, data = imap._command_complete("FETCH", tag)
            text = _text(data[0]) if data and data[0] else ""
            if typ == "NO" and partial and not text.lstrip().startswith("["):
                # a NO with a response code ([OVERQUOTA], [UNAVAILABLE], ...) is about the server, not one message
                log.warning("imap.fetch_incomplete", reply=text[:200] or typ)
                typ = "OK"  # imaplib gives no untagged replies with a NO; they are there
            if typ != "OK":
                raise IMAPClientError(f"UID FETCH failed: {_text(data[0]) if data else typ}")
            typ, data = imap._untagged_response(typ, data, "FETCH")
            # normalise_times=False: INTERNALDATE with its own zone. True gives a naive time in the host's local
            # zone, which _aware took for UTC: received_at was off by the host's offset wherever TZ is not UTC
            return _by_uid(parse_fetch_response(data, normalise_times=False, uid_is_key=False))

        result: dict[int, dict[bytes, Any]] = self._call(run)
        return result

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # read imaplib's untagged dict only after the command: SELECT replaces it with a fresh one
        imap = self._client._imap
        try:
            result = fn(*args, **kwargs)
        except imaplib.IMAP4.abort as exc:
            if imap.untagged_responses.pop("BYE", None):
                raise SessionExpired(f"IMAP server ended the session: {_safe(exc)}") from exc
            raise RetryLater(f"IMAP connection lost: {_safe(exc)}") from exc
        except TimeoutError as exc:
            raise RetryLater("IMAP server did not answer in time") from exc
        except OSError as exc:
            raise RetryLater(f"IMAP network error: {exc.strerror or exc}") from exc
        except IMAPClientError as exc:
            if imap.untagged_responses.pop("OVERQUOTA", None) is not None:
                raise QuotaExceeded(f"provider quota exceeded: {_safe(exc)}") from exc
            if NOT_CONNECTED in str(exc):  # transient too (a mailbox being moved): retried, with what to check
                raise RetryLater(
                    "Exchange accepted the login but cannot open the mailbox (User is authenticated but not "
                    "connected): the signed-in user or app may have no access to it, or the mailbox is not ready; "
                    "for app-only access, grant the app access to this mailbox (Add-MailboxPermission)"
                ) from exc
            raise RetryLater(f"IMAP command failed: {_safe(exc)}") from exc
        # Gmail appends the code to the text ("OK Success [THROTTLED]"), where imaplib, which only reads a code at
        # the start, does not see it; a code at the start lands among the untagged responses
        tagged = self._last_tagged[0]
        self._last_tagged[0] = b""
        throttled = imap.untagged_responses.pop("THROTTLED", None) is not None or b"[THROTTLED]" in tagged
        self._backoff_if_throttled(throttled)
        return result

    def _backoff_if_throttled(self, throttled: bool) -> None:
        """Gmail appends [THROTTLED] to replies it wants slower: wait before the next command, longer each time."""
        if not throttled:
            self._throttled = 0
            return
        self._throttled += 1
        delay = min(0.25 * 2 ** (self._throttled - 1), 30.0)
        log.info("imap.throttled", consecutive=self._throttled, wait_s=delay)
        self.throttle_waits += delay
        self._sleep(delay)


def uid_set_chunks(uids: Iterable[int], max_chars: int) -> list[str]:
    """Compact sequence sets ("1:5,9,12:14") covering ``uids`` in order, each at most ``max_chars`` long (one range
    is never split: "1:300000" is one item however many UIDs it holds)."""
    unique = set(uids)
    if not unique:
        return []
    chunks: list[str] = []
    parts: list[str] = []
    length = 0
    for part in sequence_set(unique).split(","):
        if parts and length + 1 + len(part) > max_chars:
            chunks.append(",".join(parts))
            parts, length = [], 0
        length += len(part) + (1 if parts else 0)
        parts.append(part)
    if parts:
        chunks.append(",".join(parts))
    return chunks


def _record_tagged_replies(imap: imaplib.IMAP4) -> list[bytes]:
    """A one-item list that holds the text of the last tagged reply ``imap`` read (``A5 OK Success [THROTTLED]``
    gives ``Success [THROTTLED]``). imaplib hands the text to the command's caller, which imapclient mostly drops,
    and forgets it; this wraps the one method every command's completion goes through, on this connection only."""
    last = [b""]
    read = imap._get_tagged_response

    def recording(tag: str, expect_bye: bool = False) -> tuple[str, list[Any]]:
        typ, data = read(tag, expect_bye)
        last[0] = data[0] if data and isinstance(data[0], bytes) else b""
        return typ, data

    imap._get_tagged_response = recording  # type: ignore[attr-defined]
    return last


def _folder_name(raw: bytes | str | int) -> str | None:
    """A LIST name as text: modified UTF-7 (RFC 3501 5.1.3) decoded; None for one that is not (8-bit bytes, which
    modified UTF-7 never has, or a broken shift sequence). imapclient gives a name that looks like a number as an
    int."""
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, str):
        return raw
    if not raw.isascii():
        return None
    try:
        return str(imap_utf7.decode(raw))
    except UnicodeError:
        return None


def _number(value: Any) -> int:
    """A STATUS value as a number; -1 for one missing or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _safe(exc: BaseException) -> str:
    return str(exc)[:300]


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _header_info(uid: int, data: Mapping[bytes, Any], values: Mapping[str, str], size: int | None = None) -> HeaderInfo:
    """One FETCH reply (and the header fields it carried, if any) as a HeaderInfo; ``size``: the body's, when it
    came in the reply instead of RFC822.SIZE."""
    return HeaderInfo(
        uid=uid,
        message_id=normalize_msgid(values.get("message-id")) if values else None,
        addresses=tuple(email for name in ADDRESS_FIELDS for _, email in parse_address_list(values.get(name)))
        if values
        else (),
        references=reference_ids(values) if values else (),
        size=data.get(b"RFC822.SIZE") if size is None else size,
        flags=tuple(_text(f) for f in data.get(b"FLAGS") or ()),  # NIL or missing: none
        modseq=_modseq(data),
        internaldate=_aware(data.get(b"INTERNALDATE")),
        gm_msgid=_int_or_none(data.get(b"X-GM-MSGID")),
        gm_thrid=_int_or_none(data.get(b"X-GM-THRID")),
        gm_labels=_labels(data),
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if value is not None else None


def _labels(data: Mapping[bytes, Any]) -> tuple[str, ...] | None:
    """X-GM-LABELS as text: modified UTF-7 decoded; system labels keep their backslash (e.g. '\\Inbox')."""
    raw = data.get(b"X-GM-LABELS")
    if raw is None:
        return None
    return tuple(imap_utf7.decode(v) if isinstance(v, bytes) else str(v) for v in raw)


def _flag_update(uid: int, data: Mapping[bytes, Any]) -> FlagUpdate:
    flags = data.get(b"FLAGS")
    return FlagUpdate(uid, None if flags is None else tuple(_text(f) for f in flags), _modseq(data), _labels(data))


def _modseq(data: Mapping[bytes, Any]) -> int | None:
    value = data.get(b"MODSEQ")
    if isinstance(value, tuple):  # imapclient returns MODSEQ as a 1-tuple
        value = value[0] if value else None
    return int(value) if value is not None else None


# Exchange Online's answer (BAD, to the first command after the login) when the login's identity cannot open the
# mailbox: an app-only token without a mailbox permission, a user with no access, a mailbox not provisioned yet
NOT_CONNECTED = "User is authenticated but not connected"
UID_SET_CHARS = 16_000  # the longest sequence set of one SEARCH (servers take lines of 64 KB or more)
ADDRESS_FIELDS = ("from", "to", "cc", "bcc", "reply-to")
HEADER_FIELDS = ("MESSAGE-ID", "FROM", "TO", "CC", "BCC", "REPLY-TO", "IN-REPLY-TO", "REFERENCES")


def reference_ids(fields: Mapping[str, str]) -> tuple[str, ...]:
    ids = re.findall(r"<([^<>\s]+)>", fields.get("in-reply-to", "") + " " + fields.get("references", ""))
    return tuple(dict.fromkeys(i for i in (normalize_msgid(x) for x in ids) if i))


def header_fields(header: bytes) -> dict[str, str]:
    """The first value of each header field in a HEADER.FIELDS reply, unfolded, raw 8-bit read as parse_message
    reads it (each value as UTF-8, else Latin-1: parse.raw_header_value). Read as Latin-1, a raw UTF-8 Message-ID
    or address differed from the parsed message's: a second identity for one message (stored twice), and a
    contact's non-ASCII address not admitted."""
    text = header.decode("ascii", "surrogateescape")
    unfolded = re.sub(r"\r?\n[ \t]+", " ", text)
    fields: dict[str, str] = {}
    for line in unfolded.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(raw_header_value(name).strip().lower(), raw_header_value(value.strip()))
    return fields


def parse_vanished(line: str) -> set[int]:
    """`(EARLIER) 1:3,7` (or without EARLIER) -> {1, 2, 3, 7}."""
    text = line.strip()
    if text.upper().startswith("(EARLIER)"):
        text = text[len("(EARLIER)") :].strip()
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition(":")
        a, b = int(lo), int(hi or lo)
        out.update(range(min(a, b), max(a, b) + 1))
    return out


def _by_uid(by_seq: Mapping[int, dict[bytes, Any]]) -> dict[int, dict[bytes, Any]]:
    """FETCH replies keyed by sequence number -> keyed by their UID. A reply without a UID is an unsolicited flag
    update about another message (another client changed its flags, RFC 3501 7.4.2): it is left out rather than
    taken for the message whose UID happens to equal its sequence number; the next CHANGEDSINCE or flag scan sees
    that change. One with a UID (QRESYNC makes servers send it) is that message's, asked for or not."""
    replies: dict[int, dict[bytes, Any]] = {}
    for reply in by_seq.values():
        uid = reply.get(b"UID")
        if isinstance(uid, int):
            replies.setdefault(uid, {}).update(reply)
    return replies


def connect(
    endpoint: ImapEndpoint,
    *,
    username: str,
    access_token: Callable[[], str] | None = None,
    invalidate_token: Callable[[], None] | None = None,
    password: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ImapClientSession:
    """Open, secure and authenticate one IMAP connection; enable CONDSTORE/QRESYNC when offered."""
    ctx = verified_context(endpoint.ca_file)
    timeout = SocketTimeout(connect=min(endpoint.timeout, 15.0), read=endpoint.timeout)
    try:
        client = IMAPClient(
            endpoint.host, port=endpoint.port, ssl=endpoint.tls == "tls", ssl_context=ctx, timeout=timeout
        )
    except ssl.SSLError as exc:
        raise _tls_failure(endpoint, exc) from exc
    except OSError as exc:
        raise RetryLater(f"cannot connect to {endpoint.host}:{endpoint.port}: {exc.strerror or exc}") from exc
    # IMAPClient sets imaplib's debug level to 5 so imaplib hands every line it sends or reads to a logger; imaplib
    # formats each one with %r before the logger can drop it: every fetched message was repr()'d twice (a sixth of
    # a first sync's CPU). Level 0 formats nothing; inboxd logs its own events, and the token is never formatted.
    client._imap.debug = 0
    try:
        if endpoint.tls == "starttls":
            _starttls(client, ctx, endpoint)
        _authenticate(client, username, access_token, invalidate_token, password)
        caps = {_text(c).upper() for c in client.capabilities()}
        condstore = "CONDSTORE" in caps or "QRESYNC" in caps
        qresync = "QRESYNC" in caps
        gmail = "X-GM-EXT-1" in caps
        session = ImapClientSession(
            client, Capabilities(condstore=condstore, qresync=qresync, gmail=gmail), sleep=sleep
        )
        if "ID" in caps:  # Gmail asks clients to identify themselves; a refusal is not worth failing for
            with contextlib.suppress(RetryLater):
                session._call(client.id_, {"name": "inboxd", "version": __version__})
        # through the session: its error translation ([OVERQUOTA], BYE, ...) applies from the first command on
        if qresync:
            session._call(client.enable, "QRESYNC")
        elif condstore:
            session._call(client.enable, "CONDSTORE")
        log.debug("imap.connected", host=endpoint.host, condstore=condstore, qresync=qresync, gmail=gmail)
        return session
    except ssl.SSLError as exc:
        _shutdown(client)
        raise _tls_failure(endpoint, exc) from exc
    except (imaplib.IMAP4.abort, OSError) as exc:
        _shutdown(client)
        raise RetryLater(f"IMAP connection to {endpoint.host} lost during login: {_safe(exc)}") from exc
    except BaseException:
        _shutdown(client)
        raise


def _starttls(client: IMAPClient, ctx: ssl.SSLContext, endpoint: ImapEndpoint) -> None:
    """STARTTLS, or a clear error when the server does not offer it (imaplib's plain error left the account in
    "internal error"): the port or ``tls`` setting is wrong, which only the config can fix."""
    try:
        client.starttls(ctx)
    except (imaplib.IMAP4.abort, ssl.SSLError):
        raise
    except IMAPClientError as exc:
        raise AccountFailed(
            f"{endpoint.host}:{endpoint.port} refused STARTTLS ({_safe(exc)}): check the provider's imap_port and "
            'imap_tls (implicit TLS, port 993, is imap_tls = "tls")'
        ) from exc


def _tls_failure(endpoint: ImapEndpoint, exc: ssl.SSLError) -> InboxdError:
    """A TLS handshake that failed: a certificate or protocol refused is for an admin (AccountFailed); one cut short
    (the connection closed or reset mid-handshake) is the network's, tried again (RetryLater)."""
    where = f"{endpoint.host}:{endpoint.port}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) or exc.reason == "UNEXPECTED_EOF_WHILE_READING":
        return RetryLater(f"TLS to {where} was cut short: {exc.reason or exc}")
    return AccountFailed(f"TLS to {where} failed: {exc.reason or exc}")


def _authenticate(
    client: IMAPClient,
    username: str,
    access_token: Callable[[], str] | None,
    invalidate_token: Callable[[], None] | None,
    password: str | None,
) -> None:
    if access_token is None:
        try:
            client.login(username, password or "")
        except LoginError as exc:
            _raise_unless_refused(client, exc)
            raise ReauthRequired(f"IMAP server refused the password for {username}") from exc
        return
    try:
        client.oauth2_login(username, access_token())
    except LoginError as first:
        _raise_unless_refused(client, first)
        # A cached token may have been revoked or expired early on the server: one fresh token, one retry.
        if invalidate_token is not None:
            invalidate_token()
        try:
            client.oauth2_login(username, access_token())
        except LoginError as exc:
            _raise_unless_refused(client, exc)
            raise ReauthRequired(f"IMAP server refused a freshly issued access token for {username}") from exc


# response codes (RFC 5530) of a login that failed for a reason of the server's, not of the credentials
_LOGIN_TRY_LATER = ("UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT")


def _raise_unless_refused(client: IMAPClient, exc: LoginError) -> None:
    """Return only when the login failed because the server refused the credentials; else raise what the failure
    is. imapclient turns every error of a login into LoginError, a connection lost or a BYE (imaplib's abort)
    included: those, and a server that says it cannot log anyone in now ([UNAVAILABLE] and the like), are no
    reason to ask the person to connect the mailbox again. A login refused with [ALERT] is not a credentials
    problem either: the text is for a human (Gmail: IMAP disabled, sign in via the web first, too many
    connections)."""
    if isinstance(exc.__context__, imaplib.IMAP4.abort):
        raise RetryLater(f"IMAP connection lost during login: {_safe(exc.__context__)}") from exc
    untagged = client._imap.untagged_responses
    if untagged.pop("OVERQUOTA", None) is not None:
        raise QuotaExceeded(f"provider quota exceeded at login: {_reply_text(exc)}") from exc
    busy = next((code for code in _LOGIN_TRY_LATER if untagged.pop(code, None) is not None), None)
    if busy is not None:
        raise RetryLater(f"the IMAP server cannot log in now ([{busy}]): {_reply_text(exc)}") from exc
    alerts = untagged.pop("ALERT", None)
    if not alerts:
        return
    # imaplib keeps only what is inside the brackets; the human text follows them in the NO reply itself
    text = _text(alerts[-1]).strip() if alerts[-1] else _reply_text(exc)
    if "too many simultaneous connections" in text.lower():  # the only retryable alert; it has no finer code
        raise RetryLater(f"too many simultaneous IMAP connections for this mailbox: {text}") from exc
    raise AccountFailed(f"the mail server refused the login: {text}") from exc


def _reply_text(exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"\[[A-Z-]+\]\s*(.*?)['\"]?\]?$", text)
    return (match.group(1) if match else text).strip()[:300]


def _shutdown(client: IMAPClient) -> None:
    with contextlib.suppress(OSError):
        client.shutdown()


def decode_folder_name(raw: bytes | str) -> str:
    return imap_utf7.decode(raw) if isinstance(raw, bytes) else raw
