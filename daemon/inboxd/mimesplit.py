"""A fast path for ``BytesParser(policy=compat32).parsebytes``: the same Message tree, split with ``str.find``.

The stdlib feed parser reads a message line by line in Python and checks every line of every part against a
boundary regex it compiles per multipart (boundaries are unique, so the ``re`` cache never hits): half of
``parse_message``'s time on the bench corpus. This module finds the delimiter lines of a multipart with
``str.find`` and hands only header blocks to the stdlib parser, so headers, their defects and every Message
attribute the rest of inboxd reads come from the same code as before.

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
_PLAIN_TRANSFER_ENCODINGS: Final = frozenset({"7bit", "8bit", "binary"})
_HEADER_PARSER: Final = Parser(policy=policy.compat32)
_MAX_DEPTH: Final = 100  # deeper nesting is left to the caller's stdlib path (and its RecursionError handling)


def parse_bytes(raw: bytes) -> Message | None:
    """The tree ``BytesParser(policy=compat32).parsebytes(raw)`` gives, or None when ``raw`` is outside the
    shape this module handles (see the module docstring)."""
    text = raw.decode("ascii", "surrogateescape")
    if "\r" in text and text.count("\r") != text.count("\r\n"):
        return None  # a lone CR is a line end to the feed parser, not to str.find
    return _part(text, (), in_multipart=False)


def _part(text: str, enclosing: tuple[str, ...], *, in_multipart: bool) -> Message | None:
    """One part (or the whole message): its header block through the stdlib parser, its body by hand. In a
    multipart, the line end before the next delimiter belongs to the delimiter (RFC 2046), not to the part."""
    header_end = _header_end(text)
    message = _HEADER_PARSER.parsestr(text[:header_end], headersonly=True)
    if message.get_payload() != "" or message.get_content_maintype() == "message":
        return None  # a non-header line before the blank line, or an attached message
    body = text[header_end:]
    if message.get_content_maintype() != "multipart":
        message.set_payload(_without_line_end(body) if in_multipart else body)
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
    return _multipart(message, body, "--" + boundary, (*enclosing, boundary))


def _header_end(text: str) -> int:
    """Where the body starts: after the first empty line, or the end when there is none."""
    if text.startswith("\n"):
        return 1
    if text.startswith("\r\n"):
        return 2
    blank = _BLANK_LINE.search(text)
    return blank.end() if blank is not None else len(text)


def _delimiters(body: str, separator: str) -> list[tuple[int, int, bool]]:
    """(start, end, is_close) of every delimiter line: ``separator`` at a line start, then only an optional
    ``--``, blanks and the line end."""
    found: list[tuple[int, int, bool]] = []
    position = body.find(separator)
    while position >= 0:
        if position == 0 or body[position - 1] == "\n":
            tail = _DELIMITER_TAIL.match(body, position + len(separator))
            if tail is not None:
                found.append((position, tail.end(), tail.group(1) is not None))
        position = body.find(separator, position + len(separator))
    return found


def _multipart(message: Message, body: str, separator: str, enclosing: tuple[str, ...]) -> Message | None:
    delimiters = _delimiters(body, separator)
    closes = [index for index, (_, _, is_close) in enumerate(delimiters) if is_close]
    if not closes or closes[0] == 0:
        return None  # no close delimiter, or no part before it
    delimiters = delimiters[: closes[0] + 1]
    first_start = delimiters[0][0]
    if first_start > 0:
        message.preamble = _without_line_end(body[:first_start])
    children: list[Message | str] = []
    for (_, part_start, _), (next_start, _, _) in itertools.pairwise(delimiters):
        if next_start == part_start:
            return None  # two delimiter lines in a row: the feed parser skips them its own way
        child = _part(body[part_start:next_start], enclosing, in_multipart=True)
        if child is None:
            return None
        if child.is_multipart():
            epilogue = child.epilogue
            child.epilogue = None if epilogue == "" else _without_line_end(epilogue or "")
        children.append(child)
    message.set_payload(children)
    message.epilogue = body[delimiters[-1][1] :]
    return message


def _without_line_end(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text
