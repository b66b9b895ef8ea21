"""Raw RFC 5322 message bytes -> ParsedMessage: headers, participants, bodies, attachments.

Pure (no I/O) and total: any bytes give a ParsedMessage or UnparseableMessage, in time and memory bounded
by the input size. Why the MIME structure is read with ``policy.compat32`` rather than ``policy.default``:
the default policy's structured header parsers are super-linear on hostile input (measured on 3.11: a
900 KB To: header takes 8 s, 16 KB of quotes 4 s) and raise on some garbage. compat32 keeps header values
raw; this module decodes them itself (RFC 2047, raw 8-bit) and uses ``policy.default`` only to parse
address lists short enough to be safe, falling back to compat32's ``getaddresses`` otherwise. The compat32 tree
comes from ``inboxd.mimesplit`` (the same tree, split with ``str.find``) for ordinary MIME, else from the feed parser.
"""

from __future__ import annotations

import binascii
import bisect
import codecs
import hashlib
import itertools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import feedparser, policy
from email import message as email_message
from email.message import Message
from email.parser import BytesParser
from email.utils import collapse_rfc2231_value, getaddresses, parsedate_to_datetime
from typing import Any, Final

import pybase64

from inboxd import mimesplit
from inboxd.errors import UnparseableMessage
from inboxd.html import INTERRUPTS, SanitizerFailed, html_to_text, sanitize_html

MAX_MIME_DEPTH: Final = 50
MAX_MIME_PARTS: Final = 1000
SNIPPET_CHARS: Final = 200
MAX_REFERENCES: Final = 200  # first + the most recent: enough to thread, bounded for storage
_MAX_MIME_HEADER_CHARS: Final = 4096  # compat32's parameter parser is quadratic in quoted ';'
_MAX_DEFAULT_POLICY_ADDRESS_CHARS: Final = 4096  # policy.default's address parser is super-linear
_MAX_MSGID_CHARS: Final = 998  # RFC 5322 line limit; anything longer is not an id
# Every text below ends up in a database column. PostgreSQL text cannot hold NUL, and refuses values longer than
# a varchar: one such value would fail its batch on every sync, stopping the account. A mailbox address is at most
# 64 + 1 + 255 characters (RFC 3696), a MIME type 127 + 1 + 127 (RFC 6838): longer ones are garbage.
_MAX_ADDRESS_CHARS: Final = 320  # mail_participants.email, mail_messages.from_email
_MAX_CONTENT_TYPE_CHARS: Final = 255  # mail_attachments.content_type
_MAX_DEFECTS: Final = 50


class _LineBreakAtEnd:
    """``email.feedparser.NLCRE_eol`` (``re.compile(r"(\\r\\n|\\r|\\n)\\Z")``) without the scan. The feed parser trims
    the line break before each MIME boundary with ``NLCRE_eol.search(payload)``: a regex search tries every position
    of the whole part, so each attachment was read once more for it (17% of parse_message on the bench corpus).
    The same answer from the last two characters; tests/test_parse.py checks it against the regex."""

    class _Found:
        __slots__ = ("_text",)

        def __init__(self, text: str) -> None:
            self._text = text

        def group(self, *_: object) -> str:
            return self._text

    _CRLF, _CR, _LF = _Found("\r\n"), _Found("\r"), _Found("\n")

    def search(self, text: str) -> _LineBreakAtEnd._Found | None:
        if text.endswith("\r\n"):
            return self._CRLF
        if text.endswith("\n"):
            return self._LF
        if text.endswith("\r"):
            return self._CR
        return None


feedparser.NLCRE_eol = _LineBreakAtEnd()  # type: ignore[attr-defined]


def split_params(value: object) -> list[str]:
    """``email.message._parseparam`` in linear time: a header value split at each ';' outside double quotes (a
    quote after a backslash does not count), each ``name=value`` with its name lowercased. The stdlib counts the
    quotes from the start of a parameter again for every ';' it tries and copies the rest of the value for every
    parameter: quadratic, 10 s for an 80 KB Content-Type, whose boundary is read before any length limit applies
    (mimesplit and the feed parser both ask for it). Same output; tests/test_parse.py compares the two."""
    s = ";" + str(value)
    params: list[str] = []
    pos, size = 0, len(s)
    while pos < size and s[pos] == ";":
        pos += 1
        end = s.find(";", pos)
        if end > pos:  # the stdlib's "end > 0": a ';' right after a ';' ends an empty parameter whatever the quotes
            odd = _odd_quotes(s, pos, end)
            while odd and end != -1:  # inside quotes: on to the next ';', counting only the new stretch
                after = s.find(";", end + 1)
                odd ^= _odd_quotes(s, end, after if after != -1 else size)
                end = after
        if end < 0:
            end = size
        field = s[pos:end]
        if "=" in field:
            i = field.index("=")
            field = field[:i].strip().lower() + "=" + field[i + 1 :].strip()
        params.append(field.strip())
        pos = end
    return params


def _odd_quotes(s: str, start: int, end: int) -> bool:
    """Whether s[start:end] holds an odd number of double quotes not preceded by a backslash (start follows a ';')."""
    return (s.count('"', start, end) - s.count('\\"', start, end)) % 2 == 1


STDLIB_PARSEPARAM: Final = email_message._parseparam  # type: ignore[attr-defined]  # for the tests' comparison
email_message._parseparam = split_params  # type: ignore[attr-defined]


def _as_constructor_call(self: Any) -> tuple[type, tuple[Any, ...]]:
    """``__reduce__`` of the frozen, slotted dataclasses below: pickled as a constructor call with the field values
    in order. The default for such classes walks ``dataclasses.fields()`` per object on both sides; the daemon
    unpickles every message its parser workers send (bench corpus: 28 -> 20 us per message)."""
    return type(self), tuple([getattr(self, name) for name in self.__slots__])


@dataclass(frozen=True, slots=True)
class Participant:
    role: str  # 'from' | 'to' | 'cc' | 'bcc' | 'reply_to'
    email: str  # lowercase, stripped, contains '@'
    name: str | None

    __reduce__ = _as_constructor_call


@dataclass(frozen=True, slots=True)
class AttachmentPart:
    filename: str | None
    content_type: str
    size_bytes: int  # of the decoded bytes, also when ``data`` was dropped for size
    content_id: str | None  # normalized like a Message-ID (no <>)
    is_inline: bool
    sha256: str  # hex, of the decoded bytes
    data: bytes  # b"" when the part exceeded max_attachment_bytes (a defect says so), or when ``staged``
    # a parser worker wrote ``data`` to the blob store's staging directory (durably) under this name and sent the part
    # back without it; the store moves it into place (BlobStore.adopt) with the row
    staged: str | None = None

    __reduce__ = _as_constructor_call


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    message_id_header: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    subject: str | None
    from_email: str | None
    from_name: str | None
    sent_at: datetime | None
    participants: tuple[Participant, ...]
    body_text: str | None
    body_html: str | None  # sanitized (inboxd.html.sanitize_html)
    snippet: str
    attachments: tuple[AttachmentPart, ...]
    has_attachments: bool
    size_bytes: int
    defects: tuple[str, ...]

    __reduce__ = _as_constructor_call


def parse_message(
    raw: bytes, *, max_attachment_bytes: int = 25 * 1024 * 1024, max_body_chars: int = 2_000_000
) -> ParsedMessage:
    """Parse one message as fetched over IMAP (RFC822 / BODY[]).

    Never raises anything but UnparseableMessage, and raises that only when there is nothing to store:
    the input is empty or whitespace, or it has no header at all (a blob, not a message). Everything
    else that is broken (encodings, charsets, MIME structure, dates) is parsed best effort and noted in
    ``defects``.
    """
    raw = bytes(raw)
    if not raw.strip():
        raise UnparseableMessage("empty message")
    try:
        return _parse(raw, max_attachment_bytes=max_attachment_bytes, max_body_chars=max_body_chars)
    except UnparseableMessage:
        raise
    except Exception as exc:  # a safety net: the stdlib parser has had crash bugs on garbage
        raise UnparseableMessage(f"parser failed: {type(exc).__name__}") from exc
    except INTERRUPTS:  # the process being stopped, not the message being bad
        raise
    except BaseException as exc:  # a Rust library's panic (pyo3's PanicException) is a BaseException
        raise UnparseableMessage(f"parser failed: {type(exc).__name__}") from exc


def _parse(raw: bytes, *, max_attachment_bytes: int, max_body_chars: int) -> ParsedMessage:
    defects = _Defects()
    try:
        split = mimesplit.parse_bytes(raw)  # the same tree, faster, for the usual shape; else None
        if split is None and _too_nested_for_the_feed_parser(raw):
            message = BytesParser(policy=policy.compat32).parsebytes(raw, headersonly=True)
            defects.add("MIME structure too nested for its size: body not parsed")
            message.set_payload("")
        else:
            message = split if split is not None else BytesParser(policy=policy.compat32).parsebytes(raw)
    except RecursionError:
        # The stdlib feed parser recurses once per multipart level; ~1000 levels exhaust the stack.
        message = BytesParser(policy=policy.compat32).parsebytes(raw, headersonly=True)
        defects.add("MIME nesting too deep for the parser: body not parsed")
        message.set_payload("")
    if not message.keys():
        raise UnparseableMessage("no headers")

    headers = _Headers(message)
    subject = decode_header_value(headers.first("Subject")) or None
    participants = _participants(headers, defects)
    sender = next((p for p in participants if p.role == "from"), None)
    references = _references(headers, defects)
    walk = _walk(message, defects)
    leaves = [_Leaf(part) for part in walk]
    bodies = _select_bodies(leaves, defects, max_body_chars=max_body_chars)
    attachments = tuple(
        _attachment(leaf, bodies.cid_references, defects, max_attachment_bytes=max_attachment_bytes)
        for leaf in leaves
        if all(leaf.part is not body for body in (bodies.text_part, bodies.html_part))
    )
    for part in (message, *walk):
        for defect in part.defects:
            defects.add(type(defect).__name__)

    return ParsedMessage(
        message_id_header=normalize_msgid(headers.first("Message-ID")),
        in_reply_to=normalize_msgid(headers.first("In-Reply-To")),
        references=references,
        subject=subject,
        from_email=sender.email if sender else None,
        from_name=sender.name if sender else None,
        sent_at=_sent_at(headers.first("Date"), defects),
        participants=participants,
        body_text=bodies.text,
        body_html=bodies.html,
        snippet=_snippet(bodies.text),
        attachments=attachments,
        has_attachments=any(not attachment.is_inline for attachment in attachments),
        size_bytes=len(raw),
        defects=defects.as_tuple(),
    )


# lines x boundaries above which the feed parser is not given a body (about 3 s of it on the development machine)
_FEED_PARSER_WORK_LIMIT: Final = 20_000_000


_BOUNDARY_PARAMETER = re.compile(rb'(?i)boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))')
_CLOSE_DELIMITER = re.compile(rb"(?m)^--(.{1,200}?)--[ \t]*\r?$")
_MAX_BOUNDARIES_WEIGHED: Final = 500


def _too_nested_for_the_feed_parser(raw: bytes) -> bool:
    """Whether the stdlib feed parser would take too long over ``raw``: it checks every line of a part against the
    boundary of every multipart around it, so its time is the lines inside each multipart, summed over the
    multiparts (lines x nesting depth), and hostile mail nests a hundred multiparts around a megabyte of empty
    lines (13 s). Each declared boundary is weighed by the lines from its declaration to its close delimiter (or the
    end): mail with many multiparts side by side (forwarded messages) weighs little, deep nesting a lot. Linear:
    the close delimiters are found in one pass, and lines counted once between consecutive points."""
    mentions = raw.count(b"oundary")  # "boundary" in any case of its first letter: a cheap upper bound
    if mentions < 2:
        return False
    total = _lines(raw, 0, len(raw))
    if total * mentions <= _FEED_PARSER_WORK_LIMIT:  # the most it could weigh: most mail stops here
        return False
    declared = list(itertools.islice(_BOUNDARY_PARAMETER.finditer(raw), _MAX_BOUNDARIES_WEIGHED + 1))
    if len(declared) > _MAX_BOUNDARIES_WEIGHED:
        return True
    closes: dict[bytes, list[int]] = {}
    for match in _CLOSE_DELIMITER.finditer(raw):
        closes.setdefault(match.group(1), []).append(match.start())
    spans = []
    for match in declared:
        positions = closes.get(match.group(1) or match.group(2), [])
        after = bisect.bisect_right(positions, match.end())
        spans.append((match.end(), positions[after] if after < len(positions) else len(raw)))
    lines_before: dict[int, int] = {}
    previous, counted = 0, 0
    for point in sorted({point for span in spans for point in span}):
        counted += _lines(raw, previous, point)
        lines_before[point], previous = counted, point
    return sum(lines_before[end] - lines_before[start] for start, end in spans) > _FEED_PARSER_WORK_LIMIT


def _lines(raw: bytes, start: int, end: int) -> int:
    """Lines as the feed parser splits them: LF, CRLF and a lone CR each end one."""
    return raw.count(b"\n", start, end) + raw.count(b"\r", start, end) - raw.count(b"\r\n", start, end)


class _Defects:
    def __init__(self) -> None:
        self._seen: dict[str, None] = {}

    def add(self, description: str) -> None:
        if len(self._seen) < _MAX_DEFECTS:
            self._seen.setdefault(description[:200], None)

    def as_tuple(self) -> tuple[str, ...]:
        return tuple(self._seen)


# --- headers ---------------------------------------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,80})\?([bBqQ])\?([^?\s]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_WHITESPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]+")
# Codecs that are no charset a mail could declare, or are quadratic (punycode) on long input.
_REFUSED_CODECS: Final = frozenset({"punycode", "idna", "raw_unicode_escape", "unicode_escape"})


class _Headers:
    """A message's or part's raw header values by lowercased name, in order, read in one pass (the root is asked for
    ten names, each part for four); raw_items never runs a header parser, so this never raises."""

    def __init__(self, message: Message) -> None:
        self._values: dict[str, list[str]] = {}
        for key, value in message.raw_items():
            self._values.setdefault(key.lower(), []).append(str(value))

    def all(self, name: str) -> list[str]:
        return self._values.get(name.lower(), [])

    def first(self, name: str) -> str | None:
        values = self._values.get(name.lower())
        return values[0] if values else None


_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")


def _undo_surrogates(value: str) -> str:
    """The parser keeps raw 8-bit header bytes as surrogate escapes: read them as UTF-8, else Latin-1."""
    if value.isascii() or _SURROGATE_ESCAPE.search(value) is None:
        return value
    try:
        return _decode_8bit(value.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # other lone surrogates beside the escapes (an RFC 2231 value decoded as UTF-7)
        return _without_surrogates(value)


def raw_header_value(value: str) -> str:
    """A header value as parse_message reads it, from text with the raw bytes kept as surrogate escapes (bytes
    decoded as ASCII with "surrogateescape", as the message parser does): raw 8-bit as UTF-8, else Latin-1, for the
    whole value. Header fields fetched apart from the body (imap.header_fields) must read the same Message-IDs and
    addresses as the parsed message, or one message has two identities."""
    return _undo_surrogates(value)


def _decode_8bit(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _lookup_charset(charset: str | None) -> str | None:
    """The Python codec for a declared charset, or None when unknown or refused."""
    if not charset:
        return None
    name = charset.split("*", 1)[0].strip().strip("\"'").lower()  # RFC 2231 "utf-8*en"
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _REFUSED_CODECS:
        return None
    return info.name


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> str:
    """Lone surrogates (UTF-7's "+2AA-" decodes to one) as U+FFFD: no database can store them (UTF-8 cannot encode
    them), and one in a batch failed that batch, and so the account's sync, on every attempt; nh3 refused them."""
    if text.isascii() or _LONE_SURROGATE.search(text) is None:
        return text
    return _LONE_SURROGATE.sub("\ufffd", text)


def _decode_text(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode with the declared charset, else UTF-8, else Latin-1; the flag says the declaration held."""
    codec = _lookup_charset(charset) or "us-ascii"
    try:
        return _without_surrogates(data.decode(codec)), True
    except (UnicodeDecodeError, LookupError, ValueError):
        pass
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        pass
    if codec not in ("us-ascii", "ascii", "utf-8"):
        try:
            return _without_surrogates(data.decode(codec, "replace")), False
        except (LookupError, ValueError):
            pass
    return data.decode("latin-1"), False


def _decode_b(text: str) -> bytes:
    data = _NOT_BASE64.sub(b"", text.encode("ascii", "ignore"))
    data = data[: len(data) - 1] if len(data) % 4 == 1 else data  # one dangling sextet carries no byte
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4))


def _decode_q(text: str) -> bytes:
    data = text.replace("_", " ").encode("ascii", "ignore")
    return _Q_ESCAPE.sub(lambda match: bytes([int(match.group(1), 16)]), data)


def decode_header_value(value: str | bytes | None) -> str | None:
    """Decode a raw header value for display: raw 8-bit (UTF-8, else Latin-1), RFC 2047 encoded-words
    (unknown or lying charsets fall back to UTF-8, then Latin-1), unfolded, whitespace and control
    characters collapsed to single spaces. Never raises; None only for None."""
    if value is None:
        return None
    text = _decode_8bit(value) if isinstance(value, bytes) else _undo_surrogates(value)
    text = _FOLD.sub("", text)
    pieces: list[str] = []
    pending: tuple[str, bytearray] | None = None  # adjacent words of one charset decode together
    position = 0
    for match in _ENCODED_WORD.finditer(text):
        gap = text[position : match.start()]
        position = match.end()
        charset, encoding, payload = match.groups()
        try:
            data = _decode_b(payload) if encoding in "bB" else _decode_q(payload)
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            gap += match.group(0)
        if gap and (gap.strip() or data is None):  # whitespace between two encoded-words is dropped
            if pending:
                pieces.append(_decode_text(bytes(pending[1]), pending[0])[0])
                pending = None
            pieces.append(gap)
        if data is None:
            continue
        if pending and pending[0] == charset.lower():
            pending[1].extend(data)
        else:
            if pending:
                pieces.append(_decode_text(bytes(pending[1]), pending[0])[0])
            pending = (charset.lower(), bytearray(data))
    if pending:
        pieces.append(_decode_text(bytes(pending[1]), pending[0])[0])
    pieces.append(text[position:])
    return _without_surrogates(_WHITESPACE_OR_CONTROL.sub(" ", "".join(pieces)).strip())


_MSGID_IN_BRACKETS = re.compile(r"<([^<>]*)>")


def normalize_msgid(value: str | None) -> str | None:
    """The first message id in ``value``, without <> and whitespace ("<abc@host> (x)" -> "abc@host").

    Ids without brackets are accepted (first whitespace-separated token); None when nothing is left or
    the candidate is longer than a header line may be.
    """
    if value is None:
        return None
    text = _undo_surrogates(value)
    match = _MSGID_IN_BRACKETS.search(text)
    if match is not None:
        candidate = match.group(1)
    else:
        tokens = text.replace(",", " ").split(maxsplit=1)
        candidate = tokens[0] if tokens else ""
    candidate = "".join(candidate.replace("\x00", "").split()).strip("<>")
    if not candidate or len(candidate) > _MAX_MSGID_CHARS:
        return None
    return candidate


def _references(headers: _Headers, defects: _Defects) -> tuple[str, ...]:
    ids: dict[str, None] = {}
    for value in headers.all("References"):
        text = _undo_surrogates(value)
        found = _MSGID_IN_BRACKETS.findall(text) or text.replace(",", " ").split()
        for candidate in found:
            normalized = normalize_msgid(f"<{candidate}>")
            if normalized:
                ids.setdefault(normalized, None)
    references = tuple(ids)
    if len(references) > MAX_REFERENCES:
        defects.add(f"References trimmed from {len(references)} ids")
        references = (references[0], *references[-(MAX_REFERENCES - 1) :])
    return references


def _sent_at(value: str | None, defects: _Defects) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = parsedate_to_datetime(_undo_surrogates(value).strip())
        if parsed.tzinfo is None:  # "-0000" or no zone: RFC 5322 says unknown; UTC is the best guess
            parsed = parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        defects.add("Date header unparseable")
        return None
    if not 1900 <= parsed.year <= 9999:
        defects.add("Date header out of range")
        return None
    return parsed


# --- addresses -------------------------------------------------------------------------------------

_BARE_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+@[^\s<>()\[\],;:\"@]+")
_ADDRESS_HEADERS: Final = (
    ("from", "From"), ("to", "To"), ("cc", "Cc"), ("bcc", "Bcc"), ("reply_to", "Reply-To"),
)  # fmt: skip


# Fast path: the shape nearly all real address headers have, "a@b.c", "<a@b.c>", "Name <a@b.c>",
# '"Last, First" <a@b.c>', comma-separated: ASCII, no encoded-words, comments, groups, quoted-pairs, domain
# literals or quoted local parts. For that grammar the result equals policy.default's (tests/test_parse.py
# checks it on the corpus and tricky cases); anything else declines to the strict path. Not getaddresses:
# on 3.11.7 it has no ``strict`` mode (CVE-2023-27043) and would need this same shape check to be safe.
# Every token class is disjoint from its neighbours, so matching is linear in the input.
_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_FAST_ADDR: Final = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_ATEXT}+(?:\.{_ATEXT}+)*"
_FAST_WORD: Final = rf"{_ATEXT}[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]*"
_FAST_ADDRESS_ELEMENT = re.compile(
    rf"[ \t]*(?:(?P<bare>{_FAST_ADDR})"
    rf'|(?:"(?P<quoted>[ \t!#-\[\]-~]*)"|(?P<phrase>{_FAST_WORD}(?:[ \t]+{_FAST_WORD})*))?'
    rf"[ \t]*<(?P<angle>{_FAST_ADDR})>)"
    r"[ \t]*(?P<end>,|\Z)"
)


def _fast_address_pairs(text: str) -> list[tuple[str, str]] | None:
    """(name, addr-spec) pairs for a plain address list, or None (decline) for anything outside the shape."""
    if not text.isascii() or "=?" in text:
        return None
    pairs: list[tuple[str, str]] = []
    position = 0
    while True:
        match = _FAST_ADDRESS_ELEMENT.match(text, position)
        if match is None:
            return None
        bare, quoted, phrase, angle, end = match.group("bare", "quoted", "phrase", "angle", "end")
        pairs.append(("", bare) if bare is not None else (quoted or phrase or "", angle))
        if not end:
            return pairs
        position = match.end()


@dataclass
class AddressBudget:
    """Characters of one message's address headers that the slow parsers may still read. policy.default's parser
    costs up to 0.3 s for a hostile 4 KB value and compat32's ``getaddresses`` about 5 s per MB: a message of many
    such headers (70 s per MB of them) would hold its account's sync. Plain lists take the regex fast path, which
    has no budget; past the budget the rest is skipped (``exhausted``: the caller notes a defect)."""

    strict: int = 16 * 1024
    fallback: int = 256 * 1024
    exhausted: bool = False


def _strict_address_pairs(text: str, budget: AddressBudget) -> list[tuple[str, str]]:
    """policy.default's parser for short values, compat32's ``getaddresses`` for long or unparseable ones,
    and a bare "x@y" scan as the last resort, each within ``budget``. Never raises."""
    if len(text) <= min(_MAX_DEFAULT_POLICY_ADDRESS_CHARS, budget.strict):
        budget.strict -= len(text)
        try:
            header = policy.default.header_factory("to", text)
            return [(address.display_name, address.addr_spec) for address in header.addresses]
        except Exception:  # noqa: S110 - the compat32 parser below is the documented fallback
            pass
    if len(text) > budget.fallback:
        budget.exhausted = True
        return []
    budget.fallback -= len(text)
    try:
        return getaddresses([text])
    except Exception:  # RecursionError on nested comments, among others
        return [("", match.group(0)) for match in _BARE_ADDRESS.finditer(text)]


def parse_address_list(value: str | None, budget: AddressBudget | None = None) -> list[tuple[str | None, str]]:
    """(display name, email) pairs from an address header; emails lowercased, entries without '@', with
    NUL, lone surrogates or longer than 320 characters dropped, names RFC 2047 decoded (None when empty). Groups
    ("undisclosed-recipients:;") are fine.
    Never raises: a regex fast path for plain lists (see _FAST_ADDRESS_ELEMENT), else _strict_address_pairs, within
    ``budget`` (one message's, shared by its headers; a fresh one when not given)."""
    if not value:
        return []
    text = _FOLD.sub("", _undo_surrogates(value))
    pairs = _fast_address_pairs(text)
    if pairs is None:
        pairs = _strict_address_pairs(text, budget if budget is not None else AddressBudget())
    return _normalize_address_pairs(pairs)


def _normalize_address_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str | None, str]]:
    result: list[tuple[str | None, str]] = []
    for name, address in pairs:
        email = "".join(address.split()).strip("<>").lower()
        if "@" not in email.strip("@") or "\x00" in email or len(email) > _MAX_ADDRESS_CHARS:
            continue
        if _LONE_SURROGATE.search(email):  # policy.default decodes 8-bit encoded-words in an addr-spec: garbage
            continue
        result.append((decode_header_value(name) or None, email))
    return result


def _participants(headers: _Headers, defects: _Defects) -> tuple[Participant, ...]:
    seen: dict[tuple[str, str], Participant] = {}
    budget = AddressBudget()
    for role, header in _ADDRESS_HEADERS:
        values = headers.all(header)
        for value in values[:1] if role == "from" else values:
            for name, email in parse_address_list(value, budget):
                seen.setdefault((role, email), Participant(role=role, email=email, name=name))
    if budget.exhausted:
        defects.add("address headers too long or malformed: some addresses not read")
    return tuple(seen.values())


# --- MIME structure --------------------------------------------------------------------------------


def _walk(message: Message, defects: _Defects) -> list[Message]:
    """Leaf parts in document order, iteratively; nesting past MAX_MIME_DEPTH and parts past
    MAX_MIME_PARTS are skipped with a defect. Attached messages (message/*) are leaves: a forwarded
    mail is an attachment, its body is not ours."""
    leaves: list[Message] = []
    stack: list[tuple[Message, int]] = [(message, 0)]
    visited = 0
    while stack:
        part, depth = stack.pop()
        visited += 1
        if visited > MAX_MIME_PARTS:
            defects.add(f"more than {MAX_MIME_PARTS} MIME parts: rest skipped")
            break
        _cap_mime_headers(part, defects)
        children = part.get_payload() if part.is_multipart() else None
        if not isinstance(children, list) or (part is not message and _content_type(part).startswith("message/")):
            leaves.append(part)
            continue
        if depth >= MAX_MIME_DEPTH:
            defects.add(f"MIME nesting deeper than {MAX_MIME_DEPTH}: inner parts skipped")
            continue
        stack.extend((child, depth + 1) for child in reversed(children) if isinstance(child, Message))
    return leaves


def _cap_mime_headers(part: Message, defects: _Defects) -> None:
    headers = _Headers(part)
    for name in ("Content-Type", "Content-Disposition", "Content-Transfer-Encoding", "Content-ID"):
        value = headers.first(name)
        if value is not None and len(value) > _MAX_MIME_HEADER_CHARS:
            part.replace_header(name, value[:_MAX_MIME_HEADER_CHARS])
            defects.add(f"{name} header longer than {_MAX_MIME_HEADER_CHARS} chars: truncated")


def _content_type(part: Message) -> str:
    try:
        content_type = part.get_content_type()
    except Exception:
        return "application/octet-stream"
    if len(content_type) > _MAX_CONTENT_TYPE_CHARS or "\x00" in content_type:
        return "application/octet-stream"
    if content_type.startswith("multipart/") and not part.is_multipart():
        return "text/plain"  # a multipart the parser could not split (no boundary): its text is all there is
    return content_type


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:
        return None


def _may_have_param(part: Message, header: str, name: str) -> bool:
    """False only when ``header`` cannot hold a parameter called ``name`` or ``*name*`` (it is missing, or the name
    is nowhere in its lowercased text, as get_param lowercases the names it reads), so get_param would find none.
    The stdlib parses a header's parameters again for each get_param; most parts have no file name."""
    value = part.get(header)
    if value is None:
        return False
    return not isinstance(value, str) or name in value.lower()


def _filename(part: Message) -> str | None:
    # get_filename reads Content-Disposition's "filename", then Content-Type's "name"
    if not _may_have_param(part, "content-disposition", "name") and not _may_have_param(part, "content-type", "name"):
        return None
    try:
        filename = part.get_filename() or part.get_param("name")
    except Exception:
        filename = None
    if isinstance(filename, tuple):  # an RFC 2231 value get_param did not collapse
        filename = collapse_rfc2231_value(filename)
    if isinstance(filename, str):  # RFC 2231 decodes with the value's own charset: UTF-7 can give lone surrogates
        filename = _without_surrogates(filename)
    return (decode_header_value(filename) or None) if isinstance(filename, str) else None


def _charset(part: Message) -> str | None:
    if not _may_have_param(part, "content-type", "charset"):
        return None
    try:
        charset = part.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


def _payload_bytes(part: Message, defects: _Defects) -> bytes:
    """The decoded content of a leaf part; bad base64/QP is decoded best effort (stdlib notes defects)."""
    if part.is_multipart():  # an attached message/*: keep its source
        try:
            return part.as_bytes(policy=policy.compat32)
        except Exception:
            defects.add("attached message could not be re-serialized")
            return b""
    fast = _plain_base64(part)
    if fast is not None:
        return fast
    try:
        data = part.get_payload(decode=True)
    except Exception:
        defects.add("undecodable body part")
        return b""
    return data if isinstance(data, bytes) else b""


def _plain_base64(part: Message) -> bytes | None:
    """``get_payload(decode=True)`` of a well-formed base64 part (only the alphabet and line breaks, padding at the
    end, whole quanta), decoded in one pass; None for anything else. The stdlib path makes four copies of the part
    and a list of its lines first (for a 10 MB attachment, ~50 MB at once); tests/test_parse.py checks the two agree.
    pybase64 (SIMD) decodes about 10x faster than binascii: attachments, such as CVs, are most of the bytes. Its
    strict mode (validate=True) is the check: after the line breaks are taken out, any other character outside the
    alphabet, padding before the end or a partial quantum is an error, and the stdlib path takes the part."""
    if str(part.get("content-transfer-encoding", "")).lower() != "base64":
        return None
    payload = part.get_payload()
    if not isinstance(payload, str) or not payload.isascii():
        return None
    try:
        return pybase64.b64decode(payload.encode("ascii").translate(None, b"\r\n"), validate=True)
    except binascii.Error:
        return None


@dataclass(frozen=True, slots=True)
class _Bodies:
    text: str | None
    html: str | None
    cid_references: frozenset[str]  # lowercased "x@y" of every cid:x@y in the unsanitized html
    text_part: Message | None
    html_part: Message | None


_CID_REFERENCE = re.compile(r"cid:([^\s\"'<>)]+)", re.IGNORECASE)


class _Leaf:
    """A leaf part with what the body choice and the attachment list ask of it, each worked out once (they were up
    to three times, and the stdlib parses the whole header again for each parameter asked)."""

    __slots__ = ("content_type", "disposition", "filename", "part")

    def __init__(self, part: Message) -> None:
        self.part = part
        self.content_type = _content_type(part)
        self.disposition = _disposition(part)
        self.filename = _filename(part)

    def body_candidate(self, content_type: str) -> bool:
        """Of this type, and not marked as an attachment (by its disposition or a file name)."""
        return self.content_type == content_type and self.disposition != "attachment" and self.filename is None


def _select_bodies(leaves: list[_Leaf], defects: _Defects, *, max_body_chars: int) -> _Bodies:
    text_part = next((leaf.part for leaf in leaves if leaf.body_candidate("text/plain")), None)
    html_part = next((leaf.part for leaf in leaves if leaf.body_candidate("text/html")), None)
    text = _part_text(text_part, defects) if text_part is not None else None
    raw_html = _part_text(html_part, defects) if html_part is not None else None
    html = None
    if raw_html is not None:
        try:  # a failure drops what it would have made, not the message
            html = _truncate(sanitize_html(raw_html[:max_body_chars]), max_body_chars, defects)
        except SanitizerFailed as exc:
            defects.add(f"HTML body dropped: {exc}")
        if text is None:
            try:
                text = html_to_text(raw_html[:max_body_chars])
            except SanitizerFailed as exc:
                defects.add(f"text of the HTML body dropped: {exc}")
    if text is not None:
        text = text.replace("\r\n", "\n")
        if len(text) > max_body_chars:
            defects.add(f"text body truncated to {max_body_chars} chars")
        text = text[:max_body_chars]
    return _Bodies(text, html, _cid_references(raw_html), text_part, html_part)


def _cid_references(raw_html: str | None) -> frozenset[str]:
    """Every cid:x@y of the unsanitized html, lowercased. Most html names none: a plain search of its lowercased
    copy says so in a sixth of the case-insensitive regex's time. Non-ASCII html always takes the regex, whose
    case folding (one character at a time: "\u0130" matches "i") str.lower() does not share."""
    if not raw_html or (raw_html.isascii() and "cid:" not in raw_html.lower()):
        return frozenset()
    return frozenset(m.group(1).lower() for m in _CID_REFERENCE.finditer(raw_html))


def _truncate(clean_html: str, max_chars: int, defects: _Defects) -> str:
    """Sanitizing escapes and closes tags, so the output can outgrow the limit; cut and sanitize again
    (the second pass keeps the cut well-formed), leaving room for the closing tags it adds."""
    if len(clean_html) <= max_chars:
        return clean_html
    defects.add(f"HTML body truncated to {max_chars} chars")
    recut = sanitize_html(clean_html[: max(0, max_chars - 4096)])
    return recut if len(recut) <= max_chars else ""


def _part_text(part: Message, defects: _Defects) -> str:
    charset = _charset(part)
    text, declared_ok = _decode_text(_payload_bytes(part, defects), charset)
    if not declared_ok and charset is not None:
        defects.add(f"charset {charset[:40]!r} unknown or wrong: decoded as UTF-8/Latin-1")
    if "\x00" in text:  # raw, from =00 or base64, or UTF-16 declared as ASCII: U+FFFD, as HTML parsers do
        defects.add("NUL characters in a text part: replaced by U+FFFD")
        text = text.replace("\x00", "\ufffd")
    return text


def _attachment(
    leaf: _Leaf, cid_references: frozenset[str], defects: _Defects, *, max_attachment_bytes: int
) -> AttachmentPart:
    data = _payload_bytes(leaf.part, defects)
    content_id = normalize_msgid(_Headers(leaf.part).first("Content-ID"))
    referenced = content_id is not None and content_id.lower() in cid_references
    if len(data) > max_attachment_bytes:
        defects.add(f"attachment over {max_attachment_bytes} bytes: content dropped")
    return AttachmentPart(
        filename=leaf.filename,
        content_type=leaf.content_type,
        size_bytes=len(data),
        content_id=content_id,
        is_inline=leaf.disposition == "inline" or referenced,
        sha256=hashlib.sha256(data).hexdigest(),
        data=data if len(data) <= max_attachment_bytes else b"",
    )


def _snippet(text: str | None) -> str:
    """The first SNIPPET_CHARS characters of ``text`` with each run of whitespace made one space, looking at most
    20 x SNIPPET_CHARS characters in (a mail opening with pages of blank lines gets a short snippet, quickly)."""
    if not text:
        return ""
    # The words of a prefix, joined, are a prefix of the longer window's words joined (a cut word included): when
    # the first 2 x SNIPPET_CHARS characters already give SNIPPET_CHARS, the result is the same, 10x sooner.
    short = " ".join(text[: SNIPPET_CHARS * 2].split())
    if len(short) >= SNIPPET_CHARS:
        return short[:SNIPPET_CHARS]
    return " ".join(text[: SNIPPET_CHARS * 20].split())[:SNIPPET_CHARS]
