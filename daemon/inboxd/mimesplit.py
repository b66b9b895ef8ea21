"""A fast path for ``BytesParser(policy=compat32).parsebytes``: the same Message tree, split with ``str.find``.

The stdlib feed parser reads a message line by line in Python and checks every line of every part against a
boundary regex it compiles per multipart (boundaries are unique, so the ``re`` cache never hits): half of
``parse_message``'s time on the bench corpus. This module finds the delimiter lines of a multipart with
``str.find`` and reads header blocks of plain "Name: value" lines itself (``header_block``); any other header
block goes to the stdlib parser, so odd headers and their defects come from the same code as before.

It builds the tree only for the plain shape nearly all mail has, where the result provably equals the feed
parser's (tests/test_mimesplit.py compares the two trees, part by part, on generated and hostile input):
LF or CRLF line ends (no lone CR), every multipart with a boundary, a first delimiter and a close delimiter,
no empty parts, every part with a blank line after its headers, no message/* parts and no multipart/digest,
no boundary reused inside itself, at most 100 levels deep. Anything else declines (None) and the caller uses
the stdlib parser.
"""

from __future__ import annotations

import itertools
import re
from email import policy
from email.message import Message
from email.parser import Parser
from typing import Final

# What may follow "--boundary" on a delimiter line (feedparser's boundaryre without the separator).
_DELIMITER_TAIL: Final = re.compile(r"(--)?[ \t]*(\r\n|\n|\Z)")
_BLANK_LINE: Final = re.compile(r"\n\r?\n")  # a line end, then an empty line
# A CR not followed by LF: a line end to the feed parser, not to str.find. One search, about a third of the time of
# comparing text.count("\r") with text.count("\r\n") (that comparison was a ninth of parse_message's time).
_LONE_CR: Final = re.compile(r"\r(?!\n)")
_PLAIN_TRANSFER_ENCODINGS: Final = frozenset({"7bit", "8bit", "binary"})
_HEADER_PARSER: Final = Parser(policy=policy.compat32)
_COMPAT32: Final = policy.compat32
_MAX_DEPTH: Final = 100  # deeper nesting is left to the caller's stdlib path (and its RecursionError handling)


def parse_bytes(raw: bytes) -> Message | None:
    """The tree ``BytesParser(policy=compat32).parsebytes(raw)`` gives, or None when ``raw`` is outside the
    shape this module handles (see the module docstring)."""
    text = raw.decode("ascii", "surrogateescape")
    if "\r" in text and _LONE_CR.search(text):
        return None
    return _part(text, 0, len(text), (), in_multipart=False)


# Parts are spans [start, end) of the one decoded text: each payload is copied out once, at the end.


def _part(text: str, start: int, end: int, enclosing: tuple[str, ...], *, in_multipart: bool) -> Message | None:
    """One part (or the whole message): its header block by header_block, its body by hand. In a
    multipart, the line end before the next delimiter belongs to the delimiter (RFC 2046), not to the part."""
    header_end = _header_end(text, start, end)
    message = header_block(text[start:header_end])
    if message.get_payload() != "":
        return None  # a non-header line before the blank line
    maintype = message.get_content_maintype()
    if maintype == "message":
        return None  # an attached message
    if maintype != "multipart":
        message.set_payload(text[header_end : _before_line_end(text, header_end, end) if in_multipart else end])
        return message
    boundary = message.get_boundary()
    if (
        boundary is None
        or len(enclosing) >= _MAX_DEPTH
        or boundary in enclosing
        or "\n" in boundary  # can never match a line; and find() below skips past each separator
        or "\r" in boundary
        or message.get_content_subtype() == "digest"  # parts default to message/rfc822
        or message.get("content-transfer-encoding", "8bit").lower() not in _PLAIN_TRANSFER_ENCODINGS
    ):
        return None
    return _multipart(message, text, header_end, end, separator="--" + boundary, enclosing=(*enclosing, boundary))


_HEADER_LINE: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+:|[ \t]")  # "Name:" (feedparser's headerRE, a name) or a fold


def header_block(block: str) -> Message:
    """``Parser(policy=compat32).parsestr(block, headersonly=True)``. A block of plain header lines (see
    _plain_fields) is read here, in half of the feed parser's time; anything else goes to the feed parser, which
    also notes the defects."""
    fields = _plain_fields(block)
    if fields is None:
        return _HEADER_PARSER.parsestr(block, headersonly=True)
    message = Message()
    for source in fields:
        message.set_raw(*_COMPAT32.header_source_parse(source))
    message.set_payload("")
    return message


def _plain_fields(block: str) -> list[list[str]] | None:
    """The source lines of each header field, when every line is "Name:" or a folded continuation of the one
    before and the block ends in its blank line; None for anything else, such as a first line that is a fold, a
    line that is no header, a "From " line, no blank line at the end, or a lone CR (a line end to the feed parser)."""
    lines = block.split("\n")
    if len(lines) < 2 or lines[-1] != "" or lines[-2] not in ("", "\r"):  # the block ends in an empty line
        return None
    if "\r" in block and _LONE_CR.search(block):
        return None
    fields: list[list[str]] = []
    for line in lines[:-2]:
        if _HEADER_LINE.match(line) is None:
            return None
        if line[0] in " \t":
            if not fields:
                return None
            fields[-1].append(line + "\n")
        else:
            fields.append([line + "\n"])
    return fields


def _header_end(text: str, start: int, end: int) -> int:
    """Where the body starts: after the first empty line, or the end when there is none."""
    if text.startswith("\n", start, end):
        return start + 1
    if text.startswith("\r\n", start, end):
        return start + 2
    blank = _BLANK_LINE.search(text, start, end)
    return blank.end() if blank is not None else end


def _delimiters(text: str, start: int, end: int, separator: str) -> list[tuple[int, int, bool]]:
    """(start, end, is_close) of every delimiter line in the span: ``separator`` at a line start, then only an
    optional ``--``, blanks and the line end."""
    found: list[tuple[int, int, bool]] = []
    position = text.find(separator, start, end)
    while position >= 0:
        if position == start or text[position - 1] == "\n":
            tail = _DELIMITER_TAIL.match(text, position + len(separator), end)
            if tail is not None:
                found.append((position, tail.end(), tail.group(1) is not None))
        position = text.find(separator, position + len(separator), end)
    return found


def _multipart(
    message: Message, text: str, start: int, end: int, *, separator: str, enclosing: tuple[str, ...]
) -> Message | None:
    delimiters = _delimiters(text, start, end, separator)
    closes = [index for index, (_, _, is_close) in enumerate(delimiters) if is_close]
    if not closes or closes[0] == 0:
        return None  # no close delimiter, or no part before it
    delimiters = delimiters[: closes[0] + 1]
    first_start = delimiters[0][0]
    if first_start > start:
        message.preamble = text[start : _before_line_end(text, start, first_start)]
    children: list[Message | str] = []
    for (_, part_start, _), (next_start, _, _) in itertools.pairwise(delimiters):
        if next_start == part_start:
            return None  # two delimiter lines in a row: the feed parser skips them its own way
        child = _part(text, part_start, next_start, enclosing, in_multipart=True)
        if child is None:
            return None
        if child.is_multipart():
            epilogue = child.epilogue
            child.epilogue = None if epilogue == "" else _without_line_end(epilogue or "")
        children.append(child)
    message.set_payload(children)
    message.epilogue = text[delimiters[-1][1] : end]
    return message


def _before_line_end(text: str, start: int, end: int) -> int:
    """``end``, moved back over the line end that closes the span, if it has one."""
    if text.endswith("\r\n", start, end):
        return end - 2
    if text.endswith("\n", start, end):
        return end - 1
    return end


def _without_line_end(text: str) -> str:
    return text[: _before_line_end(text, 0, len(text))]
