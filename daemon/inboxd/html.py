"""HTML from mail bodies: sanitizing it for the HR app's browser, and deriving readable plain text.

Both functions are pure and bounded in time by the input length; neither raises on malformed markup.
"""

from __future__ import annotations

import itertools
import re
from html.parser import HTMLParser
from typing import Final

import nh3

# Formatting, lists, tables, links and images: what mail needs to read well. Everything that runs code,
# loads a document, submits data or styles the host page (script, style, iframe, object, embed, form,
# input, svg, math, base, meta, link, area) is absent, so nh3 drops it.
_ALLOWED_TAGS: Final = frozenset(
    {
        "a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "center", "cite", "code", "col",
        "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6",
        "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "samp", "small", "span",
        "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u",
        "ul", "var", "wbr",
    }
)  # fmt: skip

# Tags whose content is code or metadata, not text a reader should see.
_DROPPED_WITH_CONTENT: Final = frozenset(
    {"script", "style", "title", "template", "noscript", "iframe", "object", "embed", "svg", "math",
     "textarea", "select", "xmp", "noembed", "noframes", "head"}
)  # fmt: skip

# No ``style`` (CSS can overlay the host page or exfiltrate via url()), no ``class``/``id`` (they can
# hook the host page's CSS and scripts), no URL-bearing attributes besides a/href and img/src.
_ALLOWED_ATTRIBUTES: Final = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title", "width", "height"},
    "td": {"colspan", "rowspan", "align", "valign", "width"},
    "th": {"colspan", "rowspan", "align", "valign", "width"},
    "table": {"border", "cellpadding", "cellspacing", "width", "align"},
    "ol": {"start", "type"},
    "font": {"color", "size"},
    "bdo": {"dir"},
    "*": {"dir", "lang"},
}

# nh3 checks schemes globally; _filter_attribute narrows them per attribute. Relative URLs are denied:
# a mail has no base URL, and inside the HR app a relative URL would target the app itself.
_LINK_SCHEMES: Final = ("http:", "https:", "mailto:")
_IMAGE_SCHEMES: Final = ("http:", "https:", "cid:")
_URL_ATTRIBUTES: Final = {("a", "href"): _LINK_SCHEMES, ("img", "src"): _IMAGE_SCHEMES}


def _filter_attribute(element: str, attribute: str, value: str) -> str | None:
    schemes = _URL_ATTRIBUTES.get((element, attribute))
    if schemes is None:
        return value
    # nh3 has already parsed and checked the URL; this only narrows the scheme set per attribute.
    return value if value.strip().lower().startswith(schemes) else None


_CLEANER: Final = nh3.Cleaner(
    tags=set(_ALLOWED_TAGS),
    clean_content_tags=set(_DROPPED_WITH_CONTENT),
    attributes={tag: set(attrs) for tag, attrs in _ALLOWED_ATTRIBUTES.items()},
    attribute_filter=_filter_attribute,
    strip_comments=True,
    link_rel="noopener noreferrer nofollow",
    url_schemes={"http", "https", "mailto", "cid"},
    url_relative="deny",
)


# What a guard that takes every BaseException lets through: the process being stopped, not the input being bad.
INTERRUPTS = (KeyboardInterrupt, SystemExit, GeneratorExit)


class SanitizerFailed(ValueError):
    """nh3 (Rust) panicked on this markup. pyo3 raises a panic as PanicException, a BaseException that
    ``except Exception`` lets by: up the sync thread or the outbox's sender, past every "one bad input fails
    alone" guard. Here it becomes an ordinary error about that input."""


def _clean(cleaner: nh3.Cleaner, html: str) -> str:
    try:
        return cleaner.clean(html)
    except INTERRUPTS:
        raise
    except BaseException as exc:  # the panic's class is not importable (pyo3_runtime.PanicException)
        raise SanitizerFailed(f"the HTML sanitizer failed: {type(exc).__name__}") from exc


def sanitize_html(html: str) -> str:
    """Return ``html`` reduced to markup the HR app can render in a browser without running anything.

    Kept: basic formatting, lists, tables, blockquote, ``a href`` (http, https, mailto) and ``img src``
    (http, https, cid). Dropped: scripts, styles, frames, plugins, forms, svg/math, ``on*`` and ``style``
    attributes, and every other URL scheme (javascript:, vbscript:, data:, ...). Links get
    ``rel="noopener noreferrer nofollow"``.
    """
    return _clean(_CLEANER, _defuse(html))


# html5ever/ammonia (inside nh3) is quadratic in three places a hostile mail can reach: element nesting
# depth (scope checks walk the open-element stack; 400k nested <div> take minutes), '&' and U+00A0 in
# one text node (serializer escaping), and runs of '&' that are no character reference. _defuse removes
# all three before nh3 sees the markup; html.parser never sees raw input (see html_to_text).
_MAX_DEPTH: Final = 128
_TEXT_NODE_ESCAPES: Final = 256  # '&'/U+00A0 per text node before a <wbr> splits it
_BARE_AMPERSAND = re.compile(r"&(?!#[0-9]{1,8};|#[xX][0-9a-fA-F]{1,8};|[A-Za-z][A-Za-z0-9]{0,31};)")
_ESCAPED_IN_OUTPUT = re.compile("[&\u00a0]")
_MARKUP = re.compile(r"<(?:(!--)|(/?)([A-Za-z][^\s/>]*))")
_TAG_STOP = re.compile(r"[>\"']")
_COMMENT_END = re.compile(r"--!?>")
_RAWTEXT: Final = frozenset(
    {"script", "style", "xmp", "iframe", "noembed", "noframes", "textarea", "title", "noscript", "plaintext"}
)
_RAWTEXT_END: Final = {name: re.compile(f"</{name}", re.IGNORECASE) for name in _RAWTEXT}
_VOID: Final = frozenset(
    {"area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr", "image", "img", "input",
     "keygen", "link", "meta", "param", "source", "track", "wbr"}
)  # fmt: skip
# An end tag never closes an element beyond one of these (the parser's "scope" boundaries).
_SCOPE_BOUNDARIES: Final = frozenset(
    {"applet", "caption", "html", "table", "td", "th", "marquee", "object", "template", "button",
     "foreignobject", "desc", "mi", "mo", "mn", "ms", "mtext", "annotation-xml", "svg", "math"}
)  # fmt: skip
# Start tags that close an element of the same kind left open on top of the stack.
_IMPLIED_END: Final = {
    "li": {"li"}, "p": {"p"}, "td": {"td", "th"}, "th": {"td", "th"}, "dt": {"dt", "dd"}, "dd": {"dt", "dd"},
    "option": {"option"}, "tr": {"tr"},
}  # fmt: skip


# Three more of html5ever's quadratic paths, found by fuzzing: a tag with thousands of attributes (each checked
# against the others), U+00A0 in an attribute value, and formatting elements that a closing block tag re-opens
# (the "active formatting elements" are rebuilt inside every new block, so the real nesting grows while the markup
# looks flat). The walk gives such tags no attributes, U+00A0 in attributes becomes a space, and past
# _MAX_FORMATTING formatting start tags all formatting tags are dropped (their text stays).
_MAX_ATTRIBUTES: Final = 64
_LONG_TAG: Final = 1024  # attributes are only counted in tags longer than this
_MAX_FORMATTING: Final = 4096
# "a" is a formatting element too, but one never holds another (a new <a> closes the open one): it is kept
_FORMATTING: Final = frozenset(
    {"b", "big", "code", "em", "font", "i", "nobr", "s", "small", "strike", "strong", "tt", "u"}
)
_FORMATTING_START = re.compile(r"<(?:b|big|code|em|font|i|nobr|s|small|strike|strong|tt|u)[\s/>]", re.IGNORECASE)
_ATTRIBUTE_VALUE = re.compile(r"\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s>]*)")
_SHORTCUT_MAX_CHARS: Final = 32 * 1024  # longer markup always takes the walk (a few ms), whatever its tag count
_START_TAG = re.compile(r"<[A-Za-z]")
_PLAINTEXT = re.compile(r"<plaintext", re.IGNORECASE)


def _defuse(html: str) -> str:
    """Rewrite ``html`` so nh3 parses it in linear time; one linear pass, same rendering for sane mail.

    Bare '&' become "&amp;"; long text runs get an invisible <wbr> every few hundred '&'/U+00A0; start
    tags nested deeper than _MAX_DEPTH are dropped. The depth estimate errs high, never low: an end tag
    only closes an element it provably matches, and '<' inside attribute values and raw text (script,
    style, ...) is escaped, so no element can hide there (in attribute values "&lt;" means the same).
    Unchanged stretches are copied in one slice: most mail needs no change at all.

    Most mail has no more start tags than _MAX_DEPTH: then no element can be nested deeper, whatever the tags hide,
    and when no text needs splitting either the markup goes to nh3 as it is (no tag walk; a fifth of the parsing
    of the bench's mail). For well-formed markup the '<' escapes left out change nothing nh3 gives: inside a tag
    '<' and "&lt;" read the same in a value and never make an allowed name, and raw-text elements are dropped with
    their content; except <plaintext>, whose content is text to the end, so markup with one takes the walk
    (tests/test_html.py compares both on generated markup). On tag soup the walk can read a tag differently from
    html5ever and escape what html5ever would keep; skipping it, nh3 gets the markup as written.
    """
    html = _BARE_AMPERSAND.sub("&amp;", html)
    split_text = html.count("&") + html.count("\u00a0") > _TEXT_NODE_ESCAPES  # else no text node needs it
    if not split_text and len(html) <= _SHORTCUT_MAX_CHARS and _few_elements(html):
        return html
    formatting = sum(1 for _ in itertools.islice(_FORMATTING_START.finditer(html), _MAX_FORMATTING + 1))
    return _walk_tags(html, split_text=split_text, drop_formatting=formatting > _MAX_FORMATTING)


def _few_elements(html: str) -> bool:
    """At most _MAX_DEPTH start tags, and no <plaintext>."""
    start_tags = sum(1 for _ in itertools.islice(_START_TAG.finditer(html), _MAX_DEPTH + 1))
    return start_tags <= _MAX_DEPTH and _PLAINTEXT.search(html) is None


def _walk_tags(html: str, *, split_text: bool, drop_formatting: bool = False) -> str:
    """_defuse's rewrite of markup with '&' already escaped: one pass over its tags."""
    out: list[str] = []
    stack: list[str] = []
    copied = 0  # html[copied:] is not in ``out`` yet
    pos = 0
    length = len(html)
    while (match := _MARKUP.search(html, pos)) is not None:
        start, name_end = match.span()
        if split_text:
            out += (html[copied:pos], _split_text_node(html[pos:start]))
            copied = start
        if match.group(1):  # a comment holds no elements; "<!-->" and "<!--->" close at once
            close = _COMMENT_END.search(html, name_end - 2)
            pos = length if close is None else close.end()
            continue
        is_end, name = bool(match.group(2)), match.group(3).lower()
        pos = _tag_end(html, name_end)
        kept = _open_or_close(stack, name, is_end=is_end, drop_formatting=drop_formatting)
        attributes = html[name_end:pos]
        if not kept or "<" in attributes or "\u00a0" in attributes or _too_many_attributes(attributes):
            out.append(html[copied:start])
            if kept:
                out.append(html[start:name_end] + _safe_attributes(attributes))
            copied = pos
        if not is_end and name in _RAWTEXT:
            close = _RAWTEXT_END[name].search(html, pos) if name != "plaintext" else None
            raw_end = length if close is None else close.start()
            if html.find("<", pos, raw_end) >= 0:
                out += (html[copied:pos], html[pos:raw_end].replace("<", "&lt;"))
                copied = raw_end
            pos = raw_end
    if split_text:
        out += (html[copied:pos], _split_text_node(html[pos:]))
        copied = length
    out.append(html[copied:])
    return "".join(out)


def _open_or_close(stack: list[str], name: str, *, is_end: bool, drop_formatting: bool) -> bool:
    """The walk's model of the open elements after tag ``name``; False when the tag is to be dropped (nested
    deeper than _MAX_DEPTH, or a formatting tag when those are dropped)."""
    if drop_formatting and name in _FORMATTING:
        return False
    if is_end:
        _close(stack, name)
        return True
    if name in _VOID:
        return True
    if stack and stack[-1] in _IMPLIED_END.get(name, ()):
        stack.pop()
    if len(stack) >= _MAX_DEPTH:
        return False
    stack.append(name)
    return True


def _too_many_attributes(attributes: str) -> bool:
    """More than _MAX_ATTRIBUTES attribute names in a long tag: quoted values and "=value" left out of the count, so
    a long style or link with spaces is one attribute."""
    if len(attributes) <= _LONG_TAG:
        return False
    names = _ATTRIBUTE_VALUE.sub(" ", attributes)
    return len(names.split(maxsplit=_MAX_ATTRIBUTES)) > _MAX_ATTRIBUTES


def _safe_attributes(attributes: str) -> str:
    """A tag's attributes (up to its '>') as the walk passes them on: none at all when there are too many, else
    with '<' escaped and U+00A0 as a space."""
    if _too_many_attributes(attributes):
        return ">" if attributes.endswith(">") else ""
    return attributes.replace("<", "&lt;").replace("\u00a0", " ")


def _split_text_node(text: str) -> str:
    if text.count("&") + text.count("\u00a0") <= _TEXT_NODE_ESCAPES:  # nearly every node: no list built
        return text
    escapes = [m.start() for m in _ESCAPED_IN_OUTPUT.finditer(text)]
    cuts = escapes[_TEXT_NODE_ESCAPES::_TEXT_NODE_ESCAPES]
    pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return "<wbr>".join(pieces)


def _tag_end(html: str, pos: int) -> int:
    """Index just past the '>' ending the tag whose attributes start at ``pos`` (quotes respected)."""
    while (stop := _TAG_STOP.search(html, pos)) is not None:
        char = html[stop.start()]
        if char == ">":
            return stop.end()
        # A quote delimits a value only right after '=' (spaces allowed); elsewhere it is part of a name.
        before = html[pos : stop.start()].rstrip()
        if before.endswith("="):
            close = html.find(char, stop.end())
            if close < 0:
                return len(html)
            pos = close + 1
        else:
            pos = stop.end()
    return len(html)


def _close(stack: list[str], name: str) -> None:
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] == name:
            del stack[index:]
            return
        if stack[index] in _SCOPE_BOUNDARIES:
            return


_BLOCK_TAGS: Final = frozenset(
    {
        "address", "article", "aside", "blockquote", "caption", "center", "dd", "details", "div", "dl",
        "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
        "header", "hr", "legend", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table",
        "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
    }
)  # fmt: skip
# Not "head": an unclosed <head> would hide the whole mail; what inside it is invisible is listed here.
_INVISIBLE_TAGS: Final = frozenset({"script", "style", "title", "template", "noscript"})
_INLINE_SPACE = re.compile(r"[ \t\r\f\v\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


_STRUCTURE_ONLY: Final = nh3.Cleaner(
    tags=set(_BLOCK_TAGS | {"br"}),
    clean_content_tags=set(_DROPPED_WITH_CONTENT),
    attributes={},
    link_rel=None,
)


_PARAGRAPH_TAGS: Final = frozenset(
    {"blockquote", "dl", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "ol", "p", "pre", "table", "ul"}
)


class _TextExtractor(HTMLParser):
    """Collects visible text; block boundaries become line breaks, paragraphs a blank line."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._pending_breaks = 0  # line breaks owed before the next text, merged across adjacent blocks
        self._invisible_depth = 0
        self._pre_depth = 0

    def _block_boundary(self, tag: str) -> None:
        self._pending_breaks = max(self._pending_breaks, 2 if tag in _PARAGRAPH_TAGS else 1)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _INVISIBLE_TAGS:
            self._invisible_depth += 1
        elif tag == "br":
            self.chunks.append("\n" * self._pending_breaks + "\n")
            self._pending_breaks = 0
        elif tag in ("td", "th"):
            self.chunks.append(" ")  # cells of a row share a line; <tr> owes the break
        elif tag in _BLOCK_TAGS:
            self._block_boundary(tag)
            if tag == "li":
                self._write("- ")
            elif tag == "pre":
                self._pre_depth += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" or tag in _BLOCK_TAGS:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _INVISIBLE_TAGS:
            self._invisible_depth = max(0, self._invisible_depth - 1)
        elif tag in _BLOCK_TAGS and tag not in ("td", "th"):
            self._block_boundary(tag)
            if tag == "pre":
                self._pre_depth = max(0, self._pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self._invisible_depth:
            return
        # Outside <pre>, source newlines are just spaces, as a browser renders them.
        self._write(data.replace("\r\n", "\n") if self._pre_depth else re.sub(r"\s+", " ", data))

    def _write(self, text: str) -> None:
        if not text.strip(" "):
            self.chunks.append(text)
            return
        self.chunks.append("\n" * self._pending_breaks + text)
        self._pending_breaks = 0


def html_to_text(html: str) -> str:
    """Return the readable text of ``html``: block elements and ``br`` become line breaks, list items
    get "- ", script/style/title content is dropped, entities are decoded and whitespace is collapsed
    (runs of spaces to one, at most one blank line in a row; ``pre`` keeps its line breaks)."""
    extractor = _TextExtractor()
    # html.parser is quadratic on some unclosed constructs ("<!--" * n); nh3 first turns any input into
    # well-formed markup of the structural tags only, which html.parser then reads in linear time.
    extractor.feed(_clean(_STRUCTURE_ONLY, _defuse(html)))
    extractor.close()
    text = "".join(extractor.chunks)
    lines = [_INLINE_SPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()
