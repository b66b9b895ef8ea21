"""inboxd.mime: drafts are validated field by field and built into 7-bit CRLF messages that inboxd's own parser
reads back unchanged (headers, RFC 2047 names and subjects, threading, bodies, attachments)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy

import pytest

from inboxd.errors import InboxdError
from inboxd.mime import (
    MAX_ATTACHMENTS,
    MAX_REFERENCES_SENT,
    Draft,
    InvalidDraft,
    OutgoingAttachment,
    ReplyContext,
    build_message,
    check_header_names,
    envelope_recipients,
    make_message_id,
    validate,
)
from inboxd.parse import parse_message

DATE = datetime(2026, 11, 25, 9, 30, tzinfo=timezone(timedelta(hours=1)))
MSGID = "<0123456789abcdef@recruit.example>"


def draft(**changes: object) -> Draft:
    base = Draft(
        from_email="anna@recruit.example",
        from_name="Anna Recruiter",
        to=("Jane Doe <jane@cand.example>",),
        cc=(),
        bcc=(),
        subject="Your interview",
        body_text="Hello Jane,\nsee you on Monday.\n",
        body_html=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def build(d: Draft) -> bytes:
    return build_message(d, message_id=MSGID, date=DATE)


def header_block(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode("ascii")


# --- building --------------------------------------------------------------------------------------


def test_plain_message_has_the_required_headers_crlf_and_7bit_lines() -> None:
    raw = build(draft())
    parsed = parse_message(raw)
    assert parsed.message_id_header == "0123456789abcdef@recruit.example"
    assert parsed.subject == "Your interview"
    assert (parsed.from_email, parsed.from_name) == ("anna@recruit.example", "Anna Recruiter")
    assert parsed.sent_at == DATE
    assert parsed.body_text == "Hello Jane,\nsee you on Monday.\n"
    assert parsed.body_html is None
    headers = header_block(raw)
    assert "MIME-Version: 1.0" in headers
    assert "\r\nDate: Wed, 25 Nov 2026 09:30:00 +0100\r\n" in headers
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert raw.isascii()  # needs no 8BITMIME/SMTPUTF8
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_non_ascii_subject_names_and_body_round_trip_through_rfc2047_and_transfer_encoding() -> None:
    d = draft(
        from_name="Jürgen Müller",
        to=('"Doe, Jane" <jane@cand.example>', "Zoë Ωmega <zoe@cand.example>"),
        subject="Grüße \u2013 Ihr Vorstellungsgespräch 🎉",
        body_text="Sehr geehrte Frau Doe,\nbitte bestätigen Sie den Termin. " + "ä" * 300 + "\n",
    )
    raw = build(d)
    assert raw.isascii()
    assert "=?utf-8?" in header_block(raw)
    parsed = parse_message(raw)
    assert parsed.subject == d.subject
    assert parsed.from_name == "Jürgen Müller"
    to = [(p.name, p.email) for p in parsed.participants if p.role == "to"]
    assert to == [("Doe, Jane", "jane@cand.example"), ("Zoë Ωmega", "zoe@cand.example")]
    assert parsed.body_text == d.body_text
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_bcc_is_in_the_envelope_but_not_in_the_headers() -> None:
    d = draft(cc=("Bob <BOB@cand.example>",), bcc=("Hidden Boss <boss@recruit.example>", "jane@CAND.example"))
    raw = build(d)
    assert b"boss@recruit.example" not in raw
    assert "bcc" not in header_block(raw).lower()
    parsed = parse_message(raw)
    assert {p.role for p in parsed.participants} == {"from", "to", "cc"}
    assert envelope_recipients(d) == ["jane@cand.example", "bob@cand.example", "boss@recruit.example"]


def test_html_only_draft_becomes_multipart_alternative_with_text_derived_from_the_html() -> None:
    raw = build(draft(body_text=None, body_html="<p>Hello <b>Jane</b></p><ul><li>CV</li><li>Portfolio</li></ul>"))
    message = message_from_bytes(raw, policy=policy.default)
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    parsed = parse_message(raw)
    assert parsed.body_text == "Hello Jane\n\n- CV\n- Portfolio\n"
    assert parsed.body_html is not None and "<b>Jane</b>" in parsed.body_html


class _PanickingCleaner:
    def clean(self, html: str) -> str:
        raise _Panic("byte index 3 is not a char boundary")  # what pyo3 raises for a Rust panic: a BaseException


class _Panic(BaseException):
    pass


def test_html_the_sanitizer_panics_on_fails_the_draft_not_the_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("inboxd.html._STRUCTURE_ONLY", _PanickingCleaner())
    with pytest.raises(InvalidDraft, match="body_html: the HTML sanitizer failed: _Panic; send body_text along"):
        build(draft(body_text=None, body_html="<p>Hello</p>"))
    assert b"<p>Hello</p>" in build(draft(body_html="<p>Hello</p>"))  # with a text body the HTML is sent as given


def test_text_and_html_keep_both_bodies_as_given() -> None:
    raw = build(draft(body_text="Plain version", body_html="<p>Rich version</p>"))
    parsed = parse_message(raw)
    assert parsed.body_text == "Plain version\n"
    assert parsed.body_html is not None and "Rich version" in parsed.body_html


def test_attachments_make_multipart_mixed_and_read_back_byte_for_byte() -> None:
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40
    attachments = (
        OutgoingAttachment("Lebenslauf Müller.pdf", "application/pdf", pdf),
        OutgoingAttachment("notes.txt", "text/plain", "Grüße\n".encode()),
        OutgoingAttachment("forwarded.eml", "message/rfc822", b"From: a@b.example\r\n\r\nhi\r\n"),
    )
    raw = build(draft(body_html="<p>see attached</p>", body_text=None, attachments=attachments))
    message = message_from_bytes(raw, policy=policy.default)
    assert message.get_content_type() == "multipart/mixed"
    assert next(message.iter_parts()).get_content_type() == "multipart/alternative"
    assert raw.count(b"MIME-Version") == 1
    parsed = parse_message(raw)
    got = {a.filename: (a.content_type, a.data) for a in parsed.attachments}
    assert got == {
        "Lebenslauf Müller.pdf": ("application/pdf", pdf),
        "notes.txt": ("text/plain", "Grüße\n".encode()),
        # message/rfc822 may not be base64-encoded: sent as opaque bytes
        "forwarded.eml": ("application/octet-stream", b"From: a@b.example\r\n\r\nhi\r\n"),
    }
    assert parsed.body_text == "see attached\n"


def test_attachment_only_draft_without_body_or_subject_is_allowed() -> None:
    raw = build(draft(subject="", body_text=None, attachments=(OutgoingAttachment("a.bin", "application/x-y", b"1"),)))
    assert parse_message(raw).attachments[0].data == b"1"


def test_reply_sets_in_reply_to_references_and_re_prefix() -> None:
    reply = ReplyContext(message_id_header="<parent@cand.example>", references=("root@a.example",), subject="Hi")
    parsed = parse_message(build(draft(subject="Your interview", reply_to_message=reply)))
    assert parsed.in_reply_to == "parent@cand.example"
    assert parsed.references == ("root@a.example", "parent@cand.example")
    assert parsed.subject == "Re: Your interview"


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: Interview", "Re: Interview"),
        ("RE: Interview", "RE: Interview"),
        ("re:Interview", "re:Interview"),
        ("Aw: Interview", "Aw: Interview"),
        ("AW : Interview", "AW : Interview"),
        ("Fwd: Interview", "Re: Fwd: Interview"),
        ("Reminder", "Re: Reminder"),  # "Re" without a colon is a word, not a prefix
        ("", "Re: Parent subject"),  # no subject given: the replied-to message's
    ],
)
def test_reply_subject_gets_one_re_prefix(subject: str, expected: str) -> None:
    reply = ReplyContext(message_id_header="p@x.example", references=(), subject="Parent subject")
    assert parse_message(build(draft(subject=subject, reply_to_message=reply))).subject == expected


def test_not_replying_leaves_the_subject_alone_and_sets_no_threading_headers() -> None:
    raw = build(draft(subject="Reminder"))
    parsed = parse_message(raw)
    assert parsed.subject == "Reminder"
    assert parsed.in_reply_to is None and parsed.references == ()


def test_references_are_capped_keeping_the_root_and_the_latest() -> None:
    chain = tuple(f"id{i}@x.example" for i in range(60))
    reply = ReplyContext(message_id_header="<id60@x.example>", references=chain, subject="s")
    raw = build(draft(reply_to_message=reply))
    refs = parse_message(raw).references
    assert len(refs) == MAX_REFERENCES_SENT
    assert refs[0] == "id0@x.example"
    assert refs[-1] == "id60@x.example"
    assert refs[1] == f"id{61 - MAX_REFERENCES_SENT + 1}@x.example"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_hostile_ids_from_a_received_message_are_dropped_not_injected() -> None:
    reply = ReplyContext(
        message_id_header="<evil@x.example>\r\nBcc: victim@y.example",
        references=("ok@x.example", "<fol\r\n ded@x.example>", "ünï@x.example", "<a>b@x>", "a" * 400 + "@x.example"),
        subject="Hi\r\nBcc: victim@y.example",
    )
    raw = build(draft(subject="", reply_to_message=reply))
    parsed = parse_message(raw)
    assert parsed.in_reply_to == "evil@x.example"
    assert parsed.references == ("ok@x.example", "folded@x.example", "a", "evil@x.example")
    assert parsed.subject == "Re: Hi Bcc: victim@y.example"  # unfolded into one harmless line
    assert b"\r\nBcc:" not in raw


def test_display_name_is_optional_and_quoted_when_needed() -> None:
    raw = build(draft(from_name=None, to=("jane@cand.example",), cc=('"Smith, J. (HR)" <js@cand.example>',)))
    headers = header_block(raw)
    assert "From: anna@recruit.example\r\n" in headers
    cc = [(p.name, p.email) for p in parse_message(raw).participants if p.role == "cc"]
    assert cc == [("Smith, J. (HR)", "js@cand.example")]


def test_same_draft_same_id_and_date_builds_the_same_headers() -> None:
    first, second = build(draft()), build(draft())
    assert header_block(first) == header_block(second)


def test_a_naive_date_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone"):
        build_message(draft(), message_id=MSGID, date=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "message_id", ["<no-at-sign>", "", "no-brackets@x.example", "<a@b.example>\r\nBcc: x@evil.example", "<a@b> <c@d>"]
)
def test_a_message_id_that_is_not_one_bracketed_id_fails_the_row(message_id: str) -> None:
    """The HR app is to leave message_id_header NULL; anything but <id@domain> it wrote instead is refused, naming
    the column, instead of being sent (or trimmed to its first id, as it was)."""
    with pytest.raises(InvalidDraft, match=r"message_id_header: .* is not a Message-ID") as caught:
        build_message(draft(), message_id=message_id, date=DATE)
    assert caught.value.field == "message_id_header"


def test_make_message_id_uses_the_given_domain_and_is_unique() -> None:
    ids = {make_message_id("Recruit.Example") for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"<[0-9a-f]{32}@recruit\.example>", i) for i in ids)
    with pytest.raises(ValueError, match="domain"):
        make_message_id("bad domain\r\n")


# --- validation ------------------------------------------------------------------------------------


def invalid(d: Draft, *, max_attachment_bytes: int | None = None, max_recipients: int | None = None) -> InvalidDraft:
    """validate() refuses ``d``; without limits in play, build_message() refuses it too."""
    with pytest.raises(InvalidDraft) as info:
        validate(d, max_attachment_bytes=max_attachment_bytes or 1000, max_recipients=max_recipients or 100)
    if max_attachment_bytes is None and max_recipients is None:
        with pytest.raises(InvalidDraft):
            build_message(d, message_id=MSGID, date=DATE)
    return info.value


def test_invalid_draft_is_an_inboxd_error_naming_the_field() -> None:
    error = invalid(draft(to=(), cc=(), bcc=()))
    assert isinstance(error, InboxdError)
    assert error.field == "recipients"
    assert str(error).startswith("recipients: ")


@pytest.mark.parametrize(
    "address",
    [
        "",
        "jane",
        "jane@",
        "@cand.example",
        "jane@@cand.example",
        "a@b@cand.example",
        "jane doe@cand.example",
        "jane@cand example",
        "jane@cand..example",
        "jane@-cand.example",
        ".jane@cand.example",
        "ja..ne@cand.example",
        "jäne@cand.example",
        "jane@cänd.example",
        "jane@cand\t.example",
        "jane\x01@cand.example",
        "Jane <>",
        "Jane <jane@cand.example",
        "<jane@cand.example> extra",
        "a" * 250 + "@cand.example",
        '"quoted local"@cand.example',
    ],
)
def test_invalid_recipient_addresses_are_refused_naming_the_field(address: str) -> None:
    error = invalid(draft(to=("ok@cand.example",), cc=(address,)))
    assert error.field == "cc[0]"


@pytest.mark.parametrize(
    "address",
    ["jane@cand.example", "Jane.Doe+cv@sub.cand.example", "o'brien@cand.example", "root@localhost", "x@a-b.example"],
)
def test_valid_addresses_pass(address: str) -> None:
    validate(draft(to=(address,)), max_attachment_bytes=1000)
    assert envelope_recipients(draft(to=(address,))) == [address.lower()]


INJECTIONS = ["\r\nBcc: victim@evil.example", "\nX-Evil: 1", "\rX-Evil: 1", "\x00"]


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("subject", lambda s: draft(subject="Hello" + s)),
        ("from_name", lambda s: draft(from_name="Anna" + s)),
        ("from_email", lambda s: draft(from_email="anna@recruit.example" + s)),
        ("to[0]", lambda s: draft(to=("jane@cand.example" + s,))),
        ("to[0]", lambda s: draft(to=("Jane" + s + " <jane@cand.example>",))),
        ("cc[1]", lambda s: draft(cc=("ok@cand.example", "Bob <bob@cand.example>" + s))),
        ("bcc[0]", lambda s: draft(bcc=("boss@recruit.example" + s,))),
        ("attachments[0].filename", lambda s: draft(attachments=(OutgoingAttachment("cv.pdf" + s, "a/b", b""),))),
        ("attachments[0].content_type", lambda s: draft(attachments=(OutgoingAttachment("cv", "a/b" + s, b""),))),
    ],
)
def test_cr_lf_or_nul_in_any_header_value_is_refused_as_header_injection(
    field: str, make: Callable[[str], Draft], injection: str
) -> None:
    error = invalid(make(injection))
    assert error.field == field
    assert "header injection" in str(error)


ENCODED_INJECTIONS = [
    "=?utf-8?q?Interview=0D=0AReply-To:_attacker@evil.example?=",
    "=?utf-8?q?a=0AX-Evil:_1?=",
    "=?utf-8?b?YQ1YLUV2aWw6IDE=?=",  # base64 of "a\rX-Evil: 1"
    "=?utf-8?q?=00=0A?=",
    "Hello =?iso-8859-1?q?x=0D=0A=0D=0Abody?= world",
]


@pytest.mark.parametrize("injection", ENCODED_INJECTIONS)
@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("subject", lambda s: draft(subject=s)),
        ("from_name", lambda s: draft(from_name=s)),
        ("to[0]", lambda s: draft(to=(s + " <jane@cand.example>",))),
        ("cc[0]", lambda s: draft(cc=(s + " <carl@cand.example>",))),
        ("attachments[0].filename", lambda s: draft(attachments=(OutgoingAttachment(s + ".pdf", "a/b", b"x"),))),
    ],
)
def test_an_encoded_word_that_decodes_to_a_line_break_is_refused_as_header_injection(
    field: str, make: Callable[[str], Draft], injection: str
) -> None:
    """The stdlib decodes RFC 2047 encoded words in any header value it is given and wrote the decoded CR/LF out
    raw: "=?utf-8?q?a=0D=0AReply-To:_x?=" as a subject became a Reply-To header of its own."""
    error = invalid(make(injection))
    assert error.field == field
    assert "header injection" in str(error)


def test_encoded_words_without_control_characters_are_sent_as_they_decode() -> None:
    raw = build(
        draft(subject="=?utf-8?q?R=C3=A9sum=C3=A9?= and 2+2=? four", to=("=?utf-8?q?J=C3=BCrgen?= <j@x.example>",))
    )
    message = message_from_bytes(raw, policy=policy.default)
    assert message["Subject"] == "Résumé and 2+2=? four"
    assert message["To"].addresses[0].display_name == "Jürgen"


def test_a_replied_to_subject_with_an_encoded_line_break_is_defused_not_injected() -> None:
    """The subject of a received mail is not the HR app's to fix: the reply is sent, with the word broken up."""
    reply = ReplyContext("<parent@cand.example>", (), "=?utf-8?q?hi=0D=0AX-Evil:_1?=")
    raw = build(draft(subject="", reply_to_message=reply))
    message = message_from_bytes(raw, policy=policy.compat32)
    assert message["X-Evil"] is None
    assert message["Subject"] == "Re: = ?utf-8?q?hi=0D=0AX-Evil:_1?="
    assert message["Message-ID"] == MSGID


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x1c"])
def test_unicode_line_separators_in_headers_are_refused_not_retried(separator: str) -> None:
    """The stdlib raised ValueError for these while folding, which the outbox took for an internal error and
    retried for an hour; now the row fails at once naming the field."""
    assert invalid(draft(subject=f"Interview{separator}tomorrow")).field == "subject"
    assert invalid(draft(from_name=f"Anna{separator}R")).field == "from_name"
    filename = f"cv{separator}.pdf"
    assert invalid(draft(attachments=(OutgoingAttachment(filename, "a/b", b"x"),))).field == "attachments[0].filename"
    # in a recipient's display name, whitespace (these included) is folded to one space
    message = message_from_bytes(build(draft(to=(f"J{separator}D <jane@cand.example>",))), policy=policy.default)
    assert message["To"].addresses[0].display_name == "J D"


def test_an_address_listed_many_times_is_written_once() -> None:
    """Each address once in To and Cc, as in the envelope: 16,000 copies of one address took the stdlib 18 s to
    fold into a header."""
    raw = build(draft(to=("bob@cand.example",) * 16000 + ("Jane <jane@cand.example>",), cc=("BOB@cand.example",)))
    message = message_from_bytes(raw, policy=policy.default)
    assert [a.addr_spec for a in message["To"].addresses] == ["bob@cand.example", "jane@cand.example"]
    assert message["Cc"] is None
    assert envelope_recipients(draft(to=("bob@cand.example",) * 3, cc=("BOB@cand.example",))) == ["bob@cand.example"]


def test_nul_characters_in_a_body_are_refused() -> None:
    assert invalid(draft(body_text="a\x00b")).field == "body_text"
    assert invalid(draft(body_html="<p>a\x00b</p>")).field == "body_html"


def test_more_than_max_attachments_files_are_refused() -> None:
    files = tuple(OutgoingAttachment(f"f{i}.txt", "text/plain", b"x") for i in range(MAX_ATTACHMENTS + 1))
    error = invalid(draft(attachments=files))
    assert error.field == "attachments"
    assert f"{MAX_ATTACHMENTS + 1} files, at most {MAX_ATTACHMENTS}" in str(error)
    validate(draft(attachments=files[:MAX_ATTACHMENTS]), max_attachment_bytes=1)


def test_the_header_guard_refuses_a_header_block_that_is_not_the_one_set() -> None:
    """The last guard, whatever the way in: a header the builder did not set, one set twice, or a block that ends
    before Message-ID (a NUL or a blank line in a value) fails the row."""
    good = build(draft())
    names = [line.split(b":", 1)[0].decode() for line in header_block(good).encode().split(b"\r\n") if b":" in line]
    names = [
        n
        for n in names
        if not n[0].isspace() and n.lower() not in ("mime-version", "content-type", "content-transfer-encoding")
    ]
    check_header_names(good, names)
    for bad in (
        good.replace(b"Subject:", b"Reply-To: x@evil.example\r\nSubject:", 1),
        good.replace(b"Subject:", b"Subject: a\r\nSubject:", 1),
        good.replace(b"\r\nDate:", b"\r\n\r\nDate:", 1),
        good.replace(b"MIME-Version: 1.0", b"MIME-Version: 1.0\r\nMIME-Version: 1.0", 1),
    ):
        with pytest.raises(InvalidDraft, match="headers differ") as caught:
            check_header_names(bad, names)
        assert caught.value.field == "headers"


def test_other_control_characters_in_names_and_subject_are_refused() -> None:
    assert invalid(draft(subject="a\x1bb")).field == "subject"
    assert invalid(draft(from_name="A\x7f")).field == "from_name"
    assert invalid(draft(to=("J\x08 <jane@cand.example>",))).field == "to[0]"
    validate(draft(subject="tab\tis fine"), max_attachment_bytes=0)


def test_from_email_must_be_a_bare_address() -> None:
    assert invalid(draft(from_email="Anna <anna@recruit.example>")).field == "from_email"
    assert invalid(draft(from_email="anna")).field == "from_email"


def test_too_many_recipients_counts_unique_addresses_over_to_cc_bcc() -> None:
    to = tuple(f"c{i}@cand.example" for i in range(3))
    error = invalid(draft(to=to, cc=("x@cand.example",), bcc=("y@cand.example",)), max_recipients=4)
    assert error.field == "recipients"
    assert "5 recipients, at most 4" in str(error)
    # duplicates (case-insensitive) are one RCPT
    validate(draft(to=to, cc=("C0@cand.example",)), max_attachment_bytes=0, max_recipients=3)


def test_attachment_over_the_limit_is_refused_with_its_size() -> None:
    big = OutgoingAttachment("big.bin", "application/octet-stream", b"x" * 1001)
    error = invalid(draft(attachments=(big,)), max_attachment_bytes=1000)
    assert error.field == "attachments[0].data"
    assert "1001 bytes, over the limit of 1000" in str(error)
    validate(draft(attachments=(OutgoingAttachment("ok.bin", "a/b", b"x" * 1000),)), max_attachment_bytes=1000)


@pytest.mark.parametrize("content_type", ["pdf", "application/", "/pdf", "application/pdf; name=x", "a b/c"])
def test_attachment_content_type_must_be_type_slash_subtype(content_type: str) -> None:
    error = invalid(draft(attachments=(OutgoingAttachment("a", content_type, b""),)))
    assert error.field == "attachments[0].content_type"


def test_attachment_filename_must_not_be_empty() -> None:
    assert invalid(draft(attachments=(OutgoingAttachment("  ", "a/b", b""),))).field == "attachments[0].filename"


def test_a_message_needs_a_subject_or_a_body() -> None:
    assert invalid(draft(subject=" ", body_text="", body_html="  ")).field == "subject"
    validate(draft(subject="Subject only", body_text=None), max_attachment_bytes=0)
    validate(draft(subject="", body_text="Body only"), max_attachment_bytes=0)


def test_overlong_subject_and_names_are_refused() -> None:
    assert invalid(draft(subject="x" * 999)).field == "subject"
    assert invalid(draft(from_name="x" * 201)).field == "from_name"


def test_the_first_bad_field_is_reported_and_all_fields_are_checked_in_order() -> None:
    d = draft(to=("bad",), bcc=("also bad",))
    assert invalid(d).field == "to[0]"
    assert invalid(dataclasses.replace(d, to=("ok@cand.example",))).field == "bcc[0]"


def test_envelope_recipients_refuses_invalid_addresses_too() -> None:
    with pytest.raises(InvalidDraft):
        envelope_recipients(draft(to=("not an address",)))


def test_message_dates_in_other_zones_are_kept() -> None:
    raw = build_message(draft(), message_id=MSGID, date=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert "Date: Fri, 02 Jan 2026 03:04:05 +0000" in header_block(raw)
