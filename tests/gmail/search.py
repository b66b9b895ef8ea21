"""SEARCH criteria for the Gmail test server: RFC 3501 keys, CONDSTORE's MODSEQ, Gmail's X-GM-MSGID / X-GM-THRID /
X-GM-LABELS and a subset of X-GM-RAW (Gmail web search syntax). Compiles tokens into a predicate; pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property

from gmail import mime
from gmail.model import DELETED, SYSTEM_LABELS, Message, canonical_label, date_of
from gmail.wire import Atom, ParseError, Token, decode_mutf7, in_ranges, is_sequence_set, parse_search_date
from gmail.wire import parse_sequence_set as seqset
from gmail.wire import text as as_text


@dataclass
class Candidate:
    """One message of the selected folder as SEARCH sees it."""

    seq: int
    uid: int
    msg: Message
    deleted: bool

    @cached_property
    def tree(self) -> mime.Part:
        return mime.parse_cached(self.msg.raw)

    def header(self, name: str) -> str:
        return mime.decoded(self.tree.fields, name)

    @cached_property
    def body_text(self) -> str:
        return self.tree.body.decode("utf-8", "replace")

    def flags(self) -> set[str]:
        return self.msg.flags | ({DELETED} if self.deleted else set())


Predicate = Callable[[Candidate], bool]


@dataclass
class Query:
    match: Predicate
    uses_modseq: bool


def compile_search(tokens: list[Token], largest_seq: int, largest_uid: int) -> Query:
    state = {"modseq": False}
    parser = _Parser(tokens, largest_seq, largest_uid, state)
    preds = []
    while not parser.done():
        preds.append(parser.key())
    if not preds:
        raise ParseError("empty search")
    return Query(lambda c: all(p(c) for p in preds), state["modseq"])


_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {"FROM": "From", "TO": "To", "CC": "Cc", "BCC": "Bcc", "SUBJECT": "Subject"}


class _Parser:
    def __init__(self, tokens: list[Token], largest_seq: int, largest_uid: int, state: dict[str, bool]):
        self.tokens = tokens
        self.pos = 0
        self.largest_seq = largest_seq
        self.largest_uid = largest_uid
        self.state = state

    def done(self) -> bool:
        return self.pos >= len(self.tokens)

    def take(self) -> Token:
        if self.done():
            raise ParseError("search key needs an argument")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def string(self) -> str:
        return as_text(self.take())

    def key(self) -> Predicate:
        token = self.take()
        if isinstance(token, list):
            sub = _Parser(token, self.largest_seq, self.largest_uid, self.state)
            preds = [sub.key()]
            while not sub.done():
                preds.append(sub.key())
            return lambda c: all(p(c) for p in preds)
        if not isinstance(token, Atom):
            raise ParseError("search key expected")
        return self._atom_key(token.upper(), token)

    def _atom_key(self, key: str, token: str) -> Predicate:  # noqa: PLR0911
        if is_sequence_set(token):
            ranges = seqset(token, self.largest_seq)
            return lambda c: in_ranges(c.seq, ranges)
        if key in {"ALL", "OLD"}:
            return lambda c: True
        if key in ("NEW", "RECENT"):
            return lambda c: False
        if key in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[key]
            return lambda c: (flag in c.flags()) is present
        if key in ("KEYWORD", "UNKEYWORD"):
            word, present = self.string(), key == "KEYWORD"
            return lambda c: (word in c.msg.flags) is present
        if key in _HEADER_KEYS:
            name, needle = _HEADER_KEYS[key], self.string().lower()
            return lambda c: needle in c.header(name).lower()
        if key == "HEADER":
            name, needle = self.string(), self.string().lower()
            return lambda c: name in c.tree.fields and needle in c.header(name).lower()
        if key == "BODY":
            needle = self.string().lower()
            return lambda c: needle in c.body_text.lower()
        if key == "TEXT":
            needle = self.string().lower()
            return lambda c: needle in c.msg.raw.decode("utf-8", "replace").lower()
        if key in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
            day = parse_search_date(self.string()).date()
            sent = key.startswith("SENT")
            op = key.removeprefix("SENT")
            return lambda c: _compare_day(_sent_date(c) if sent else c.msg.internaldate, op, day)
        if key in ("LARGER", "SMALLER"):
            size = int(self.string())
            return (lambda c: len(c.msg.raw) > size) if key == "LARGER" else (lambda c: len(c.msg.raw) < size)
        if key == "UID":
            ranges = seqset(self.string(), self.largest_uid)
            return lambda c: in_ranges(c.uid, ranges)
        if key == "NOT":
            inner = self.key()
            return lambda c: not inner(c)
        if key == "OR":
            left, right = self.key(), self.key()
            return lambda c: left(c) or right(c)
        if key == "X-GM-MSGID":
            msgid = int(self.string())
            return lambda c: c.msg.gm_msgid == msgid
        if key == "X-GM-THRID":
            thrid = int(self.string())
            return lambda c: c.msg.gm_thrid == thrid
        if key == "X-GM-LABELS":
            label = canonical_label(decode_mutf7(self.string()))
            return lambda c: label in c.msg.labels
        if key == "X-GM-RAW":
            return gmail_raw(self.string())
        if key == "MODSEQ":
            args = [self.string()]
            if args[0].startswith('"') or args[0].startswith("/"):  # optional entry name and type
                args = [self.string(), self.string()]
            floor = int(args[-1])
            self.state["modseq"] = True
            return lambda c: c.msg.modseq >= floor
        raise ParseError(f"unknown search key {token}")


def _sent_date(c: Candidate) -> datetime:
    return date_of(c.tree.fields)


def _compare_day(when: datetime, op: str, day: date) -> bool:
    got = when.astimezone(UTC).date()
    if op == "BEFORE":
        return got < day
    if op == "ON":
        return got == day
    return got >= day


# --- X-GM-RAW -----------------------------------------------------------------------------------------------------

_RAW_TERM = re.compile(r'(-?)(?:([a-z0-9_]+):)?("[^"]*"|\S+)', re.IGNORECASE)
_IN_LABELS = {"inbox": "\\Inbox", "sent": "\\Sent", "draft": "\\Draft", "drafts": "\\Draft", "trash": "\\Trash"}
_IN_LABELS |= {"spam": "\\Spam", "starred": "\\Starred", "important": "\\Important"}


def _label_key(label: str) -> str:
    """Gmail's search form of a label: case-insensitive, spaces and slashes as dashes."""
    return re.sub(r"[\s/]+", "-", label.lstrip("\\")).lower()


def gmail_raw(query: str) -> Predicate:
    """The supported X-GM-RAW subset; terms separated by spaces must all match; ``-term`` negates."""
    preds: list[Predicate] = []
    for negate, op, raw_value in _RAW_TERM.findall(query):
        value = raw_value.strip('"')
        pred = _raw_term(op.lower(), value)
        preds.append(_negate(pred) if negate else pred)
    return lambda c: all(p(c) for p in preds)


def _negate(pred: Predicate) -> Predicate:
    return lambda c: not pred(c)


def _raw_term(op: str, value: str) -> Predicate:  # noqa: PLR0911
    needle = value.lower()
    if op in ("from", "to", "cc", "bcc", "subject"):
        name = op.capitalize() if op != "cc" else "Cc"
        return lambda c: needle in c.header(name).lower()
    if op == "rfc822msgid":
        wanted = needle.strip("<>")
        return lambda c: (c.msg.message_id or "").lower().strip("<>") == wanted
    if op in ("after", "before"):
        bound = _raw_date(value)
        if op == "after":
            return lambda c: c.msg.internaldate >= bound
        return lambda c: c.msg.internaldate < bound
    if op == "label":
        key = _label_key(value)
        return lambda c: any(_label_key(label) == key for label in c.msg.labels)
    if op == "in":
        if needle == "anywhere":
            return lambda c: True
        label = _IN_LABELS.get(needle)
        if label:
            return lambda c: label in c.msg.labels
        key = _label_key(value)
        return lambda c: any(_label_key(lb) == key for lb in c.msg.labels if lb.lower() not in SYSTEM_LABELS)
    if op == "is":
        flag = {"unread": ("\\Seen", False), "read": ("\\Seen", True), "starred": ("\\Flagged", True)}.get(needle)
        if flag is None and needle == "important":
            return lambda c: "\\Important" in c.msg.labels
        if flag is None:
            raise ParseError(f"unsupported X-GM-RAW is:{value}")
        return lambda c: (flag[0] in c.msg.flags) is flag[1]
    if op == "has" and needle == "attachment":
        return lambda c: b"attachment" in c.msg.raw.lower()
    if op in ("larger", "smaller"):
        size = _raw_size(value)
        return (lambda c: len(c.msg.raw) > size) if op == "larger" else (lambda c: len(c.msg.raw) < size)
    if op:
        raise ParseError(f"unsupported X-GM-RAW operator {op}:")
    return lambda c: needle in c.msg.raw.decode("utf-8", "replace").lower() or needle in c.header("Subject").lower()


def _raw_date(value: str) -> datetime:
    if value.isdigit():
        return datetime.fromtimestamp(int(value), UTC)
    return datetime.strptime(value.replace("-", "/"), "%Y/%m/%d").replace(tzinfo=UTC)


def _raw_size(value: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    suffix = value[-1:].lower()
    return int(value[:-1]) * units[suffix] if suffix in units else int(value)
