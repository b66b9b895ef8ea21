"""IMAP wire syntax for the Gmail test server: command tokenizer, sequence sets, response quoting, modified UTF-7.

Pure functions over bytes; no sockets here.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from typing import TypeAlias

# a literal announced at the end of a line: {n} (synchronizing) or {n+} (LITERAL-/LITERAL+)
LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}\r?\n$")

_ATOM_SPECIALS = set(b'(){ %*"\\]') | set(range(0x20)) | {0x7F}
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


class ParseError(ValueError):
    """The client sent something that is not valid IMAP syntax (answered with BAD)."""


class CommandError(Exception):
    """Ends a command with a tagged NO or BAD carrying ``line``."""

    def __init__(self, line: bytes):
        super().__init__(line.decode(errors="replace"))
        self.line = line


class Atom(str):
    """An unquoted token (command names, flags, search keys, fetch items); strings are ``bytes``."""

    __slots__ = ()


Token: TypeAlias = Atom | bytes | list["Token"] | None  # None is NIL


def tokenize(raw: bytes) -> list[Token]:
    """Parse a complete command (literals inline, as read from the wire) into nested tokens.

    ``BODY[HEADER.FIELDS (A B)]<0.10>`` stays one atom: brackets may contain spaces and parentheses.
    """
    pos = 0
    stack: list[list[Token]] = [[]]
    n = len(raw)
    while pos < n:
        c = raw[pos]
        if c in b" \r\n":
            pos += 1
        elif c == ord("("):
            stack.append([])
            pos += 1
        elif c == ord(")"):
            if len(stack) == 1:
                raise ParseError("unbalanced )")
            done = stack.pop()
            stack[-1].append(done)
            pos += 1
        elif c == ord('"'):
            out = bytearray()
            pos += 1
            while True:
                if pos >= n:
                    raise ParseError("unterminated quoted string")
                ch = raw[pos]
                if ch == ord("\\") and pos + 1 < n:
                    out.append(raw[pos + 1])
                    pos += 2
                elif ch == ord('"'):
                    pos += 1
                    break
                else:
                    out.append(ch)
                    pos += 1
            stack[-1].append(bytes(out))
        elif c == ord("{"):
            m = re.compile(rb"\{(\d+)\+?\}\r\n").match(raw, pos)
            if not m:
                raise ParseError("bad literal")
            size = int(m.group(1))
            start = m.end()
            if start + size > n:
                raise ParseError("short literal")
            stack[-1].append(raw[start : start + size])
            pos = start + size
        else:
            start = pos
            depth = 0
            while pos < n:
                ch = raw[pos]
                if ch == ord("["):
                    depth += 1
                elif ch == ord("]") and depth:
                    depth -= 1
                elif depth == 0 and (ch in b" ()\r\n" or ch == ord('"')):
                    break
                pos += 1
            word = raw[start:pos].decode("utf-8", "surrogateescape")
            stack[-1].append(None if word.upper() == "NIL" else Atom(word))
    if len(stack) != 1:
        raise ParseError("unbalanced (")
    return stack[0]


def text(token: Token) -> str:
    """An astring argument as text (UTF-8; atoms as sent)."""
    if isinstance(token, bytes):
        return token.decode("utf-8", "surrogateescape")
    if isinstance(token, str):
        return str(token)
    raise ParseError("expected a string")


def as_list(token: Token) -> list[Token]:
    """A parenthesized list argument."""
    if not isinstance(token, list):
        raise ParseError("expected a parenthesized list")
    return token


def parse_sequence_set(spec: str, largest: int) -> list[tuple[int, int]]:
    """``1:3,7,9:*`` as ranges (``*`` = ``largest``; ``high:low`` is allowed); never expanded, ``1:4294967295`` is
    fine."""
    ranges = []
    for member in spec.split(","):
        lo_s, _, hi_s = member.partition(":")
        try:
            lo = largest if lo_s == "*" else int(lo_s)
            hi = lo if not hi_s else (largest if hi_s == "*" else int(hi_s))
        except ValueError as exc:
            raise ParseError(f"bad sequence set {spec!r}") from exc
        ranges.append((min(lo, hi), max(lo, hi)))
    return ranges


def in_ranges(number: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= number <= hi for lo, hi in ranges)


def is_sequence_set(word: str) -> bool:
    return bool(re.fullmatch(r"(\d+|\*)(:(\d+|\*))?(,(\d+|\*)(:(\d+|\*))?)*", word))


def compress_set(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1:3,7`` (for COPYUID/ESEARCH)."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in runs)


# --- output --------------------------------------------------------------------------------------------------


def quoted(value: str | bytes) -> bytes:
    """A quoted string, or a literal when the value holds CR/LF or 8-bit bytes (not allowed in quotes)."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if any(b > 0x7E or b in (0x0D, 0x0A, 0) for b in data):
        return b"{%d}\r\n%s" % (len(data), data)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def nstring(value: str | bytes | None) -> bytes:
    return b"NIL" if value is None else quoted(value)


def astring(value: str | bytes) -> bytes:
    """Bare atom when possible (``foo``, ``&ANw-bung``), else quoted (``"work/project x"``, ``"\\\\Inbox"``)."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if data and data.upper() != b"NIL" and not any(b in _ATOM_SPECIALS or b > 0x7E for b in data):
        return data
    return quoted(data)


def internaldate(when: datetime) -> bytes:
    """``"17-Jul-1996 02:44:25 -0700"``."""
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    offset = when.strftime("%z") or "+0000"
    return f'"{when.day:02d}-{_MONTHS[when.month - 1]}-{when.year:04d} {when:%H:%M:%S} {offset}"'.encode()


def parse_internaldate(value: str) -> datetime:
    return datetime.strptime(value.strip(), "%d-%b-%Y %H:%M:%S %z")


def parse_search_date(value: str) -> datetime:
    """SEARCH date ``1-Feb-1994`` as a UTC midnight."""
    return datetime.strptime(value.strip(), "%d-%b-%Y").replace(tzinfo=UTC)


# --- modified UTF-7 (RFC 3501 5.1.3) -------------------------------------------------------------------------


def encode_mutf7(name: str) -> str:
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_mutf7(name: str) -> str:
    """Decode modified UTF-7; text that is not valid modified UTF-7 (e.g. raw UTF-8) is returned as is."""
    out: list[str] = []
    pos = 0
    while pos < len(name):
        amp = name.find("&", pos)
        if amp < 0:
            out.append(name[pos:])
            break
        out.append(name[pos:amp])
        end = name.find("-", amp)
        if end < 0:
            return name
        chunk = name[amp + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            try:
                out.append(base64.b64decode(b64 + "=" * (-len(b64) % 4)).decode("utf-16-be"))
            except ValueError:
                return name
        pos = end + 1
    return "".join(out)
