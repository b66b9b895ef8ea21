"""Outgoing mail as bytes: a Draft (what the HR app asked for) validated and built into an RFC 5322 message.

Pure stdlib (``email.message.EmailMessage``), no I/O. The output is 7-bit (non-ASCII bodies are quoted-printable or
base64, headers RFC 2047/2231), CRLF, lines <= 78 where the stdlib can fold; so it needs no 8BITMIME/SMTPUTF8.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from typing import Final

from inboxd.errors import InboxdError
from inboxd.html import SanitizerFailed, html_to_text
from inboxd.parse import normalize_msgid

# 7bit: the stdlib would otherwise send UTF-8 bodies as raw 8bit, which needs the server's 8BITMIME.
_POLICY: Final = policy.SMTP.clone(cte_type="7bit")
MAX_REFERENCES_SENT: Final = 20  # the root and the most recent ids thread as well as the whole chain
MAX_SUBJECT_CHARS: Final = 998
MAX_NAME_CHARS: Final = 200
MAX_ADDRESS_CHARS: Final = 254  # RFC 5321 path limit
MAX_ATTACHMENTS: Final = 100
_MAX_MSGID_CHARS: Final = 250  # longer ids are dropped from References rather than risk an overlong line
_MAX_LINE_BYTES: Final = 998

# C0 and C1 controls and Unicode's line and paragraph separators (str.splitlines breaks at these too)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HEADER_BREAKERS = re.compile(r"[\r\n\x00]")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_TYPE_NAME = r"[A-Za-z0-9!#$&^_.+-]+"
_CONTENT_TYPE = re.compile(rf"({_TYPE_NAME})/({_TYPE_NAME})")
_MSGID_CHARS = re.compile(r"[!-;=?-~]+")  # printable ASCII except '<' and '>'
_REPLY_PREFIX = re.compile(r"(?:re|aw)\s*:", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class InvalidDraft(InboxdError):
    """The draft cannot be sent as it is (bad address, header injection, too large, ...); the message says which
    field. Sending it again will fail the same way."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    content_type: str  # "type/subtype"; message/* and multipart/* are sent as application/octet-stream
    data: bytes


@dataclass(frozen=True)
class ReplyContext:
    """What the reply needs of the replied-to message (as stored by inboxd.parse: ids with or without <>)."""

    message_id_header: str | None
    references: tuple[str, ...]
    subject: str | None


@dataclass(frozen=True)
class Draft:
    from_email: str
    from_name: str | None
    to: tuple[str, ...]  # each "addr" or "Name <addr>"
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    subject: str
    body_text: str | None
    body_html: str | None
    attachments: tuple[OutgoingAttachment, ...] = ()
    reply_to_message: ReplyContext | None = None


@dataclass(frozen=True)
class _Mailbox:
    name: str | None
    address: str  # as given (case kept for the header); envelope_recipients lowercases


# --- validation -------------------------------------------------------------------------------------


def _check_header_value(value: str, field: str) -> None:
    if _HEADER_BREAKERS.search(value):
        raise InvalidDraft("contains CR, LF or NUL (header injection)", field=field)
    if _has_encoded_control(value):
        raise InvalidDraft(
            "contains an RFC 2047 encoded word (=?charset?q?...?=) that decodes to a line break or control "
            "character (header injection)",
            field=field,
        )


def _has_encoded_control(value: str) -> bool:
    """Whether the stdlib, which decodes RFC 2047 encoded words in any header value it is given (names, subjects,
    file names), would read a control character or line break out of ``value``: it writes those out raw, so
    "=?utf-8?q?a=0D=0AReply-To:_x?=" would become a header of its own."""
    if "=?" not in value:
        return False
    try:
        decoded = str(_POLICY.header_factory("subject", value))
    except Exception:
        return True
    return bool(_CONTROL.search(decoded.replace("\t", " ")))


def _check_address(address: str, field: str) -> None:
    if len(address) > MAX_ADDRESS_CHARS:
        raise InvalidDraft(f"address longer than {MAX_ADDRESS_CHARS} characters", field=field)
    if _CONTROL.search(address) or " " in address:
        raise InvalidDraft(f"address {address!r} contains spaces or control characters", field=field)
    if not address.isascii():
        raise InvalidDraft(
            f"address {address!r} is not ASCII (internationalized addresses are not supported)", field=field
        )
    if address.count("@") != 1:
        raise InvalidDraft(f"address {address!r} must contain exactly one @", field=field)
    local, domain = address.split("@")
    if not local or not domain:
        raise InvalidDraft(f"address {address!r} has an empty local part or domain", field=field)
    if not _LOCAL_PART.fullmatch(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidDraft(f"address {address!r} has an invalid local part", field=field)
    if not _DOMAIN.fullmatch(domain):
        raise InvalidDraft(f"address {address!r} has an invalid domain", field=field)
    try:  # the stdlib must agree, or it would render the header differently from what we checked
        Address(addr_spec=address)
    except (ValueError, IndexError) as exc:
        raise InvalidDraft(f"address {address!r} is invalid ({exc})", field=field) from None


def _parse_mailbox(item: str, field: str) -> _Mailbox:
    """``"addr"`` or ``"Name <addr>"`` (the name may be quoted and may contain commas and non-ASCII)."""
    _check_header_value(item, field)
    text = item.strip()
    name: str | None = None
    if text.endswith(">") and "<" in text:
        name_part, _, rest = text[:-1].rpartition("<")
        address = rest.strip()
        name_part = name_part.strip()
        if len(name_part) >= 2 and name_part[0] == name_part[-1] == '"':
            name_part = name_part[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        name = _WHITESPACE.sub(" ", name_part).strip() or None
    else:
        address = text
    if not address:
        raise InvalidDraft(f"empty address in {item!r}", field=field)
    _check_address(address, field)
    if name is not None:
        if len(name) > MAX_NAME_CHARS:
            raise InvalidDraft(f"display name longer than {MAX_NAME_CHARS} characters", field=field)
        if _CONTROL.search(name):
            raise InvalidDraft("display name contains control characters", field=field)
    return _Mailbox(name=name, address=address)


def check_from_name(value: str) -> None:
    """The sender's display name (the config's ``display_name``): no header injection, no control characters, at
    most MAX_NAME_CHARS. Raises InvalidDraft (field from_name)."""
    _check_header_value(value, "from_name")
    if _CONTROL.search(value) or len(value) > MAX_NAME_CHARS:
        raise InvalidDraft(f"control characters or longer than {MAX_NAME_CHARS} characters", field="from_name")


def _recipients(draft: Draft) -> list[tuple[str, _Mailbox]]:
    parsed: list[tuple[str, _Mailbox]] = []
    for field, items in (("to", draft.to), ("cc", draft.cc), ("bcc", draft.bcc)):
        for index, item in enumerate(items):
            parsed.append((field, _parse_mailbox(item, f"{field}[{index}]")))
    return parsed


def _effective_subject(draft: Draft) -> str:
    """The subject as sent: "Re: " added when replying (once), the parent's subject when the draft has none."""
    subject = draft.subject.strip()
    reply = draft.reply_to_message
    if reply is None:
        return subject
    if not subject and reply.subject:
        # from a received message: unfold, drop controls, never trust it with a line break (nor an encoded word
        # that decodes to one: it is not the HR app's to fix, so the word is broken up instead of refused)
        subject = _WHITESPACE.sub(" ", _CONTROL.sub(" ", reply.subject)).strip()[:MAX_SUBJECT_CHARS]
        if _has_encoded_control(subject):
            subject = subject.replace("=?", "= ?")
    if not subject:
        return subject
    return subject if _REPLY_PREFIX.match(subject) else f"Re: {subject}"


def validate(draft: Draft, *, max_attachment_bytes: int, max_recipients: int = 100) -> None:
    """Raise InvalidDraft naming the first bad field; return None when the draft can be built and sent."""
    from_mailbox = _parse_mailbox(draft.from_email, "from_email")
    if from_mailbox.name is not None:
        raise InvalidDraft("must be a bare address; the display name goes in from_name", field="from_email")
    if draft.from_name is not None:
        check_from_name(draft.from_name)
    _check_header_value(draft.subject, "subject")
    if _CONTROL.search(draft.subject.replace("\t", " ")):
        raise InvalidDraft("contains control characters", field="subject")
    if len(draft.subject) > MAX_SUBJECT_CHARS:
        raise InvalidDraft(f"longer than {MAX_SUBJECT_CHARS} characters", field="subject")
    recipients = _recipients(draft)
    if not recipients:
        raise InvalidDraft("no recipients: to, cc and bcc are all empty", field="recipients")
    unique = {mailbox.address.lower() for _, mailbox in recipients}
    if len(unique) > max_recipients:
        raise InvalidDraft(f"{len(unique)} recipients, at most {max_recipients} allowed", field="recipients")
    _check_attachments(draft.attachments, max_attachment_bytes)
    for field, body in (("body_text", draft.body_text), ("body_html", draft.body_html)):
        if body is not None and "\x00" in body:
            raise InvalidDraft("contains NUL characters, which mail cannot carry", field=field)
    has_body = bool((draft.body_text or "").strip() or (draft.body_html or "").strip() or draft.attachments)
    if not has_body and not _effective_subject(draft):
        raise InvalidDraft("neither a subject nor a body nor an attachment", field="subject")


def _check_attachments(attachments: tuple[OutgoingAttachment, ...], max_attachment_bytes: int) -> None:
    if len(attachments) > MAX_ATTACHMENTS:
        raise InvalidDraft(f"{len(attachments)} files, at most {MAX_ATTACHMENTS} allowed", field="attachments")
    for index, attachment in enumerate(attachments):
        field = f"attachments[{index}]"
        _check_header_value(attachment.filename, f"{field}.filename")
        if not attachment.filename.strip() or _CONTROL.search(attachment.filename):
            raise InvalidDraft("empty or contains control characters", field=f"{field}.filename")
        _check_header_value(attachment.content_type, f"{field}.content_type")
        if not _CONTENT_TYPE.fullmatch(attachment.content_type.strip()):
            raise InvalidDraft(f"{attachment.content_type!r} is not a type/subtype", field=f"{field}.content_type")
        if len(attachment.data) > max_attachment_bytes:
            raise InvalidDraft(
                f"{attachment.filename!r} is {len(attachment.data)} bytes, over the limit of {max_attachment_bytes}",
                field=f"{field}.data",
            )


# --- building ---------------------------------------------------------------------------------------


def make_message_id(domain: str) -> str:
    """A new ``<random@domain>``; ``domain`` is the sending account's (never this machine's host name, which
    would leak into every message and tie mail to the server that sent it)."""
    domain = domain.strip().lower()
    if not _DOMAIN.fullmatch(domain):
        raise ValueError(f"not a domain: {domain!r}")
    return f"<{secrets.token_hex(16)}@{domain}>"


def _bracketed_id(value: str | None) -> str | None:
    msgid = normalize_msgid(value)
    if msgid is None or len(msgid) > _MAX_MSGID_CHARS or not _MSGID_CHARS.fullmatch(msgid):
        return None
    return f"<{msgid}>"


def _references(reply: ReplyContext) -> list[str]:
    ids: dict[str, None] = {}
    for value in (*reply.references, reply.message_id_header):
        bracketed = _bracketed_id(value)
        if bracketed is not None:
            ids.pop(bracketed, None)  # a repeated id keeps its latest position
            ids[bracketed] = None
    chain = list(ids)
    if len(chain) > MAX_REFERENCES_SENT:
        chain = [chain[0], *chain[-(MAX_REFERENCES_SENT - 1) :]]
    return chain


def _address(mailbox: _Mailbox) -> Address:
    return Address(display_name=mailbox.name or "", addr_spec=mailbox.address)


def _attach(message: EmailMessage, attachment: OutgoingAttachment) -> None:
    match = _CONTENT_TYPE.fullmatch(attachment.content_type.strip())
    assert match is not None  # validated
    maintype, subtype = match.group(1).lower(), match.group(2).lower()
    if maintype in ("message", "multipart"):
        # message/rfc822 may not be base64 (RFC 2046) and a multipart needs a structure, not opaque bytes
        maintype, subtype = "application", "octet-stream"
    message.add_attachment(attachment.data, maintype=maintype, subtype=subtype, filename=attachment.filename.strip())


def build_message(draft: Draft, *, message_id: str, date: datetime) -> bytes:
    """The message bytes (CRLF) for ``draft``. ``message_id`` ("<id@domain>") and ``date`` (timezone-aware) are
    fixed by the caller before the first attempt, so every retry sends the same message. Bcc is not in the
    headers; the envelope gets it from ``envelope_recipients``. Raises InvalidDraft (see ``validate``); the
    attachment limit is the caller's (validate it first), here only headers and recipients are checked."""
    validate(draft, max_attachment_bytes=max(len(a.data) for a in draft.attachments) if draft.attachments else 0)
    if date.tzinfo is None:
        raise ValueError("date must be timezone-aware")
    own_id = _bracketed_id(message_id)
    if own_id is None or "@" not in own_id or own_id != message_id.strip():
        raise InvalidDraft(
            f"{message_id[:80]!r} is not a Message-ID like <id@domain> (leave it NULL: inboxd sets it)",
            field="message_id_header",
        )

    message = EmailMessage(policy=_POLICY)
    names = _set_headers(message, draft, message_id=own_id, date=date)
    _set_bodies(message, draft)
    raw = message.as_bytes(policy=_POLICY)
    if any(len(line) > _MAX_LINE_BYTES for line in raw.split(b"\r\n")):  # a guard; the stdlib folds and encodes
        raise InvalidDraft("a header cannot be folded to 998 characters per line", field="headers")
    check_header_names(raw, names)
    return raw


_BODY_HEADERS: Final = ("MIME-Version", "Content-Type", "Content-Transfer-Encoding")


def check_header_names(raw: bytes, names: list[str]) -> None:
    """The last guard against header injection, whatever the way in: the message's header block, read back, holds
    exactly the headers inboxd set (and the stdlib's MIME headers), each once, in that order."""
    read = [name.lower() for name in BytesHeaderParser(policy=policy.compat32).parsebytes(raw)]
    expected = [name.lower() for name in names]
    body = [name for name in read if name in {h.lower() for h in _BODY_HEADERS}]
    if [name for name in read if name not in body] != expected or len(set(body)) != len(body):
        raise InvalidDraft(
            "the built message's headers differ from those set (header injection?): " + ", ".join(read)[:300],
            field="headers",
        )


def _set_headers(message: EmailMessage, draft: Draft, *, message_id: str, date: datetime) -> list[str]:
    """Set the message's headers; returns their names, in order."""
    from_mailbox = _Mailbox(name=(draft.from_name or "").strip() or None, address=draft.from_email.strip())
    message["From"] = _address(from_mailbox)
    listed: set[str] = set()  # each address once in To and Cc (the envelope has each once too)
    for field, header in (("to", "To"), ("cc", "Cc")):
        mailboxes = []
        for kind, mailbox in _recipients(draft):
            if kind == field and mailbox.address.lower() not in listed:
                listed.add(mailbox.address.lower())
                mailboxes.append(_address(mailbox))
        if mailboxes:
            message[header] = mailboxes
    subject = _effective_subject(draft)
    if subject:
        message["Subject"] = subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    reply = draft.reply_to_message
    if reply is not None:
        parent = _bracketed_id(reply.message_id_header)
        if parent is not None:
            message["In-Reply-To"] = parent
        chain = _references(reply)
        if chain:
            message["References"] = " ".join(chain)
    return list(message.keys())


def _set_bodies(message: EmailMessage, draft: Draft) -> None:
    text, html = draft.body_text, draft.body_html
    if html is not None and not html.strip():
        html = None
    if html is not None and not (text or "").strip():
        try:
            text = html_to_text(html)
        except SanitizerFailed as exc:
            raise InvalidDraft(f"{exc}; send body_text along with it", field="body_html") from exc
    message.set_content(_normalize_newlines(text or ""))
    if html is not None:
        message.add_alternative(_normalize_newlines(html), subtype="html")
    for attachment in draft.attachments:
        _attach(message, attachment)
    for part in message.walk():
        if part is not message:  # the stdlib stamps MIME-Version on converted parts too; it belongs on top only
            del part["MIME-Version"]


def _normalize_newlines(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def envelope_recipients(draft: Draft) -> list[str]:
    """RCPT TO addresses: to + cc + bcc, bare, lowercased, first occurrence kept. Raises InvalidDraft."""
    seen: dict[str, None] = {}
    for _, mailbox in _recipients(draft):
        seen.setdefault(mailbox.address.lower(), None)
    return list(seen)
