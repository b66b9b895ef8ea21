"""inboxd.mimesplit gives exactly the stdlib feed parser's Message tree, or declines.

The property compares whole trees (every attribute of every part: headers, payloads, preamble, epilogue,
defects, default type) on generated MIME: sane trees, and trees with the perturbations the feed parser has
its own rules for (lone CR, delimiter look-alikes, missing close delimiters, empty parts, header-less parts,
non-header lines, attached messages, digests, reused boundaries). A second property checks that sane trees are
not declined, so the fast path cannot quietly turn itself off.
"""

from __future__ import annotations

from email import policy
from email.message import Message
from email.parser import BytesParser, Parser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inboxd import mimesplit
from inboxd.mimesplit import header_block, parse_bytes
from test_hostile_mail import GENERATED

CORPUS = Path(__file__).parent / "corpus"
SAMPLES = sorted(CORPUS.glob("*.eml")) + sorted((CORPUS / "hostile").glob("*.eml"))


def tree(message: Message) -> dict[str, Any]:
    """Everything a Message holds, children included, with defects as their class names."""
    state = {key: value for key, value in vars(message).items() if key not in ("policy", "defects", "_payload")}
    state["defects"] = [type(defect).__name__ for defect in message.defects]
    payload = message._payload  # type: ignore[attr-defined]  # get_payload() would decode surrogates
    state["_payload"] = [tree(part) for part in payload] if isinstance(payload, list) else payload
    return state


def stdlib(raw: bytes) -> Message:
    return BytesParser(policy=policy.compat32).parsebytes(raw)


def assert_same_or_declined(raw: bytes) -> bool:
    fast = parse_bytes(raw)
    if fast is None:
        return False
    assert tree(fast) == tree(stdlib(raw))
    return True


# --- generated MIME --------------------------------------------------------------------------------------------


# Sane nesting uses boundaries none of which is a prefix of another; perturbed nesting may reuse them, overlap them
# ("--b--" closes b and delimits b--) or end them in a blank get_boundary() strips ("--b\t--" then closes nothing).
SANE_BOUNDARIES = ["b", "c1", "=_Part_0_1.2", "d d", "-", "E", "f--"]
ODD_BOUNDARIES = ["b--", "bb", "b1", "--", "b\t", "b "]
LEAF_TYPES = st.sampled_from(
    ["text/plain", "text/html; charset=utf-8", "application/pdf; name=a.pdf", "image/png", "text"]
)
BODY_LINE = st.sampled_from(
    [
        "hello",
        "",
        " ",
        "--",
        "--b",
        "--b--",
        "--b  ",
        "--bb",
        "--b x",
        "--b1--",
        "x--b",
        "a --c1--",
        "From me",
        "=C3=A9",
    ]
) | st.text(alphabet="ab -=:\t\u00e9", max_size=12)


def body_lines(perturb: bool) -> st.SearchStrategy[list[str]]:
    """Lines of a leaf body; only perturbed ones may look like (or be) a delimiter line."""
    line = BODY_LINE if perturb else BODY_LINE.filter(lambda text: not text.startswith("--"))
    return st.lists(line, max_size=5)


@st.composite
def leaf(draw: st.DrawFn, perturb: bool) -> list[str]:
    lines = [f"Content-Type: {draw(LEAF_TYPES)}"]
    if draw(st.booleans()):
        lines.append("Content-Transfer-Encoding: " + draw(st.sampled_from(["7bit", "base64", "quoted-printable"])))
    if perturb and draw(st.integers(0, 9)) == 0:
        lines = draw(st.sampled_from([[], ["not a header"], ["Content-Type: message/rfc822"], [" folded first"]]))
    return [*lines, "", *draw(body_lines(perturb))]


@st.composite
def multipart(draw: st.DrawFn, depth: int, perturb: bool, used: tuple[str, ...] = ()) -> list[str]:
    if perturb:
        boundary = draw(st.sampled_from(SANE_BOUNDARIES + ODD_BOUNDARIES))
    else:
        boundary = draw(st.sampled_from([b for b in SANE_BOUNDARIES if b not in used]))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related"] + (["digest"] if perturb else [])))
    lines = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"']
    if perturb and draw(st.integers(0, 9)) == 0:
        lines.append("Content-Transfer-Encoding: " + draw(st.sampled_from(["base64", "8bit", "binary"])))
    lines += ["", *draw(st.lists(st.sampled_from(["preamble", "", "--x"]), max_size=2))]
    for _ in range(draw(st.integers(1, 3))):
        trail = draw(st.sampled_from(["", "", " ", "\t ", " x"] if perturb else ["", " ", "\t"]))
        lines.append(f"--{boundary}{trail}")
        if perturb and draw(st.integers(0, 14)) == 0:
            lines.append(f"--{boundary}")  # an empty part
        nested = depth < 3 and draw(st.integers(0, 3)) == 0
        lines += draw(multipart(depth + 1, perturb, (*used, boundary))) if nested else draw(leaf(perturb))
    if not perturb or draw(st.integers(0, 9)) > 0:
        lines.append(f"--{boundary}--" + draw(st.sampled_from(["", " "])))
        lines += draw(st.lists(st.sampled_from(["epilogue", "", f"--{boundary}"]), max_size=2))
    return lines


@st.composite
def message(draw: st.DrawFn, perturb: bool) -> bytes:
    head = ["From: a@example.org", "Subject: =?utf-8?q?caf=C3=A9?=", "X-Raw: caf\u00e9"]
    body = draw(multipart(0, perturb)) if draw(st.booleans()) else draw(leaf(perturb))
    lines = head + body
    ends = st.sampled_from(["\r\n", "\n"] + (["\r"] if perturb else []))
    if draw(st.booleans()):  # one line end for the whole message, as real mail has
        end = draw(ends)
        text = end.join(lines) + draw(st.sampled_from([end, ""]))
    else:
        text = "".join(line + draw(ends) for line in lines)
    return text.encode("utf-8")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message(perturb=True))
def test_the_tree_equals_the_feed_parsers_or_the_fast_path_declines(raw: bytes) -> None:
    assert_same_or_declined(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message(perturb=False))
def test_sane_mime_takes_the_fast_path(raw: bytes) -> None:
    assert assert_same_or_declined(raw), raw


# --- files and hostile samples ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_corpus_files_give_the_same_tree_or_decline(path: Path) -> None:
    assert_same_or_declined(path.read_bytes())


@pytest.mark.parametrize(
    "name", ["plain.eml", "alternative.eml", "attachment.eml", "inline_cid.eml", "lf_only.eml", "html_only.eml"]
)
def test_ordinary_corpus_mail_takes_the_fast_path(name: str) -> None:
    assert assert_same_or_declined((CORPUS / name).read_bytes())


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_hostile_generated_samples_give_the_same_tree_or_decline(name: str) -> None:
    raw = GENERATED[name]()
    try:
        fast = parse_bytes(raw)
    except RecursionError:
        pytest.fail("the fast path must decline deep nesting, not recurse into it")
    if fast is not None:
        assert tree(fast) == tree(stdlib(raw))


def test_what_declines() -> None:
    head = b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    part = b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    assert parse_bytes(head + part + b"--b--\r\n") is not None
    assert parse_bytes(head + part) is None  # no close delimiter
    assert parse_bytes(head + part.replace(b"\r\n", b"\r") + b"--b--\r") is None  # lone CR line ends
    assert parse_bytes(head + b"--b\r\n" + part + b"--b--\r\n") is None  # an empty part
    assert parse_bytes(head + b"--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: x\r\n\r\ny\r\n--b--\r\n") is None
    assert parse_bytes(head.replace(b"mixed", b"digest") + part + b"--b--\r\n") is None


HEADER_LINES = st.sampled_from(
    [
        "Subject: hello",
        "Subject:",
        "X-Empty:  ",
        "To: a@example.org,",
        " b@example.org",
        "\tfolded",
        " ",
        "From someone",
        "From: a@example.org",
        ": no name",
        "not a header",
        "Na me: x",
        "X-\u00e9: raw",
        'Content-Type: text/plain; charset="utf-8"',
        "X-Colons: a:b:c",
        "Date: Thu, 26 Nov 2026 10:00:00 +0000",
        "Subject: a lone\rCR",
        "X-Trailing: cr\r",
    ]
)


@settings(max_examples=800, deadline=None)
@given(
    st.lists(HEADER_LINES, max_size=8),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.sampled_from(["blank", "none", "text"]),
)
def test_a_header_block_reads_as_the_feed_parser_reads_it(lines: list[str], end: str, after: str) -> None:
    """header_block gives parsestr(headersonly=True)'s Message, defects and payload included, for plain blocks
    (read directly) and for odd ones (folded first line, "From ", no name, no header, no blank line, lone CRs:
    declined)."""
    block = "".join(line + end for line in lines) + {"blank": end, "none": "", "text": "body" + end}[after]
    expected = Parser(policy=policy.compat32).parsestr(block, headersonly=True)
    assert tree(header_block(block)) == tree(expected)


def test_plain_header_blocks_are_read_without_the_feed_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Message:
        raise AssertionError("the feed parser was used")

    monkeypatch.setattr(mimesplit._HEADER_PARSER, "parsestr", refuse)
    message = header_block("Subject: hi\r\nTo: a@example.org,\r\n b@example.org\r\n\r\n")
    assert message.items() == [("Subject", "hi"), ("To", "a@example.org,\r\n b@example.org")]
    assert header_block("\n").items() == []
