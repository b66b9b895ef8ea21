"""A message's MIME tree over its raw bytes and the FETCH renderings built from it: ENVELOPE, BODYSTRUCTURE,
BODY[section]. Sections are cut from the original bytes, so sizes in BODYSTRUCTURE match what BODY[] sends.
"""

from __future__ import annotations

import email.errors
import email.header
import email.message
import email.utils
import functools
import re
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser

from gmail.wire import nstring, quoted

_FIELD_START = re.compile(rb"^(?=[^ \t\r\n])", re.MULTILINE)


@dataclass
class Part:
    header: bytes  # the header block including the blank line that ends it
    body: bytes
    fields: email.message.Message
    children: list[Part] = field(default_factory=list)
    embedded: Part | None = None  # the message inside a message/rfc822 part

    @property
    def multipart(self) -> bool:
        return self.fields.get_content_maintype() == "multipart"


def parse(raw: bytes) -> Part:
    if raw.startswith(b"\r\n"):
        header, body = b"\r\n", raw[2:]
    else:
        end = raw.find(b"\r\n\r\n")
        header, body = (raw, b"") if end < 0 else (raw[: end + 4], raw[end + 4 :])
    part = Part(header, body, BytesHeaderParser().parsebytes(header))
    ctype = part.fields.get_content_type()
    boundary = part.fields.get_boundary()
    if part.multipart and boundary:
        part.children = [parse(chunk) for chunk in _split_multipart(body, boundary.encode("latin-1"))]
    elif ctype == "message/rfc822":
        part.embedded = parse(body)
    return part


@functools.lru_cache(maxsize=256)
def parse_cached(raw: bytes) -> Part:
    """``parse`` for stored messages (immutable bytes): FETCH and SEARCH parse each message once."""
    return parse(raw)


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    delimiter = re.compile(rb"(?:^|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|$)")
    chunks: list[bytes] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            chunks.append(body[start : match.start()])
        if match.group(1):
            break
        start = match.end()
    return chunks


# --- sections --------------------------------------------------------------------------------------------------


def section(root: Part, raw: bytes, spec: str) -> bytes:  # noqa: PLR0911 - one exit per section kind
    """The bytes of BODY[spec] (``""``, ``HEADER``, ``TEXT``, ``1.2``, ``1.MIME``, ``HEADER.FIELDS (A B)``...)."""
    spec = spec.strip()
    if not spec:
        return raw
    numbers: list[int] = []
    rest = spec
    while True:
        match = re.match(r"(\d+)(?:\.|$)", rest)
        if not match:
            break
        numbers.append(int(match.group(1)))
        rest = rest[match.end() :]
    part: Part | None = root
    for n in numbers:
        part = _child(part, n) if part else None
    if part is None:
        return b""
    if not rest:
        return part.body if numbers else raw
    upper = rest.upper()
    if upper == "MIME":
        return part.header
    message = part.embedded if numbers else part
    if message is None:
        return b""
    if upper == "HEADER":
        return message.header
    if upper == "TEXT":
        return message.body
    fields_match = re.match(r"HEADER\.FIELDS(\.NOT)?\s*\((.*)\)\s*$", rest, re.IGNORECASE | re.DOTALL)
    if fields_match:
        names = {n.strip('"').lower() for n in fields_match.group(2).split()}
        return header_fields(message.header, names, exclude=bool(fields_match.group(1)))
    return b""


def _child(part: Part, n: int) -> Part | None:
    target = part.embedded or part
    if target.children:
        return target.children[n - 1] if 0 < n <= len(target.children) else None
    return target if n == 1 else None


def header_fields(header: bytes, names: set[str], *, exclude: bool = False) -> bytes:
    kept = []
    for chunk in _FIELD_START.split(header):
        if not chunk.strip():
            continue
        name = chunk.split(b":", 1)[0].strip().decode("latin-1").lower()
        if (name in names) != exclude:
            kept.append(chunk if chunk.endswith(b"\r\n") else chunk + b"\r\n")
    return b"".join(kept) + b"\r\n"


# --- ENVELOPE and BODYSTRUCTURE -----------------------------------------------------------------------------------


def _raw_value(fields: email.message.Message, name: str) -> bytes | None:
    value = fields.get(name)
    if value is None:
        return None
    return re.sub(r"\r?\n(?=[ \t])", "", str(value)).strip().encode("ascii", "surrogateescape")


def _addresses(fields: email.message.Message, name: str) -> bytes:
    raw = _raw_value(fields, name)
    if raw is None:
        return b"NIL"
    out = []
    for display, address in email.utils.getaddresses([raw.decode("ascii", "surrogateescape")]):
        if not address:
            continue
        mailbox, _, host = address.partition("@")
        name_bytes = display.encode("ascii", "surrogateescape") if display else None
        out.append(b"(%s NIL %s %s)" % (nstring(name_bytes), nstring(mailbox), nstring(host or None)))
    return b"(" + b"".join(out) + b")" if out else b"NIL"


def envelope(part: Part) -> bytes:
    fields = part.fields
    sender = "Sender" if "Sender" in fields else "From"
    reply_to = "Reply-To" if "Reply-To" in fields else "From"
    items = [
        nstring(_raw_value(fields, "Date")),
        nstring(_raw_value(fields, "Subject")),
        _addresses(fields, "From"),
        _addresses(fields, sender),
        _addresses(fields, reply_to),
        _addresses(fields, "To"),
        _addresses(fields, "Cc"),
        _addresses(fields, "Bcc"),
        nstring(_raw_value(fields, "In-Reply-To")),
        nstring(_raw_value(fields, "Message-ID")),
    ]
    return b"(" + b" ".join(items) + b")"


def _params(fields: email.message.Message, header: str = "content-type") -> bytes:
    if header not in fields:
        return b"NIL"
    params = fields.get_params(header=header) or []
    pairs = [
        quoted(key.upper()) + b" " + quoted(email.utils.collapse_rfc2231_value(value))
        for key, value in params[1:]
        if value
    ]
    return b"(" + b" ".join(pairs) + b")" if pairs else b"NIL"


def bodystructure(part: Part, *, extended: bool = True) -> bytes:
    fields = part.fields
    if part.children:
        inner = b"".join(bodystructure(child, extended=extended) for child in part.children)
        ext = b" " + _params(fields) if extended else b""
        return b"(" + inner + b" " + quoted(fields.get_content_subtype().upper()) + ext + b")"
    items = [
        quoted(fields.get_content_maintype().upper()),
        quoted(fields.get_content_subtype().upper()),
        _params(fields),
        nstring(_raw_value(fields, "Content-ID")),
        nstring(_raw_value(fields, "Content-Description")),
        quoted((_raw_value(fields, "Content-Transfer-Encoding") or b"7BIT").upper()),
        str(len(part.body)).encode(),
    ]
    lines = str(part.body.count(b"\n") + (1 if part.body and not part.body.endswith(b"\n") else 0)).encode()
    if part.embedded is not None:
        items += [envelope(part.embedded), bodystructure(part.embedded, extended=extended), lines]
    elif fields.get_content_maintype() == "text":
        items.append(lines)
    if extended:
        disposition = fields.get_content_disposition()
        disp = (
            b"(" + quoted(disposition.upper()) + b" " + _params(fields, "content-disposition") + b")"
            if disposition
            else b"NIL"
        )
        items += [b"NIL", disp]
    return b"(" + b" ".join(items) + b")"


# --- decoded headers for SEARCH -----------------------------------------------------------------------------------


def decoded(fields: email.message.Message, name: str) -> str:
    """All ``name`` headers, RFC 2047 decoded (raw 8-bit read as UTF-8), joined by newlines."""
    out = []
    for value in fields.get_all(name) or []:
        raw = re.sub(r"\r?\n(?=[ \t])", "", str(value))
        raw = raw.encode("ascii", "surrogateescape").decode("utf-8", "replace")
        try:
            out.append(str(email.header.make_header(email.header.decode_header(raw))))
        except (UnicodeError, LookupError, email.errors.HeaderParseError):
            out.append(raw)
    return "\n".join(out)
