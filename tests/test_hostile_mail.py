"""Hostile and broken mail, from the parser to the database: every sample either becomes a row the database can hold
(on PostgreSQL, which refuses NUL characters and over-long varchar values that SQLite takes) or a quarantine row with
a reason; none crashes, hangs or stops the sync of the mail after it.

Samples: tests/corpus/hostile/*.eml (small, one malformation each; see HOSTILE_FILES) and, generated here, the
big ones (1 MB header lines, nesting 1000 deep, 10k parts, giant Content-Type parameters). Property tests: the
parser on random bytes and on mutated corpus messages, and the sync planner on random cursor/server states and on
random sequences of server changes. INBOXD_FUZZ_EXAMPLES=5000 makes the property tests a long fuzzing run.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import MailStack, make_message
from harness.config import write_stack_config
from inboxd.clock import SystemClock
from inboxd.config import load_config
from inboxd.errors import UnparseableMessage
from inboxd.models import MailAttachment, MailLocation, MailMessage, MailParticipant, MailQuarantine
from inboxd.parse import MAX_MIME_PARTS, ParsedMessage, parse_message
from inboxd.planner import (
    Capabilities,
    ExpungeCheck,
    FolderCursor,
    FolderListing,
    FolderStatus,
    PlanKind,
    plan_folder,
    select_folders,
)
from inboxd.runner import Runner
from inboxd.store import Credential, NewLocation, NewMessage, Store
from inboxd.sync import SyncSettings

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
participants_t = MailParticipant.__table__  # type: ignore[attr-defined]
attachments_t = MailAttachment.__table__  # type: ignore[attr-defined]
quarantine_t = MailQuarantine.__table__  # type: ignore[attr-defined]
locations_t = MailLocation.__table__  # type: ignore[attr-defined]

CORPUS = Path(__file__).parent / "corpus"
HOSTILE = CORPUS / "hostile"
HOSTILE_FILES = {
    "unterminated_nested_multipart.eml": "an inner and an outer multipart, neither closed; base64 cut mid-line",
    "bad_base64_everywhere.eml": "base64 with junk, 8-bit bytes, padding in the middle; a bad base64 encoded-word",
    "bad_qp_with_nul_escape.eml": "quoted-printable with =ZZ, a dangling '=', and =00 (a NUL once decoded)",
    "utf16_declared_us_ascii.eml": "a UTF-16 body declared us-ascii: NUL in every other byte once decoded",
    "unknown_charsets.eml": "x-unknown-42 and x-klingon charsets, an empty charset, invalid UTF-8 in the html",
    "raw_8bit_headers_everywhere.eml": "raw 8-bit (UTF-8 and Latin-1) in names, addresses, subject, filename, cid",
    "no_message_id.eml": "no Message-ID header (identity by hash)",
    "same_message_id_first.eml": "two different messages that share one Message-ID (1/2)",
    "same_message_id_second.eml": "two different messages that share one Message-ID (2/2)",
    "rfc2047_garbage_everywhere.eml": "encoded-words unterminated, split, inside addresses and parameters, UTF-7",
    "nul_bytes.eml": "raw NUL bytes in a header and the body",
    "crlf_lf_cr_mix.eml": "CRLF, bare LF and bare CR line ends mixed, in headers and MIME parts",
    "overlong_address.eml": "From and To addresses of 400+ characters (mail_participants.email is varchar(320))",
    "overlong_content_type.eml": "a part whose Content-Type is 300+ characters (content_type is varchar(255))",
    "empty_boundary_and_boundary_in_body.eml": 'boundary="" and body lines that look like boundaries',
    "header_only_no_body.eml": "headers only, no blank line, no final CRLF",
    "utf7_lone_surrogates.eml": "UTF-7 (+2AA-) decoding to lone surrogates in the subject, a name, html, a filename",
    "utf7_rfc2231_filename.eml": "an RFC 2231 file name in UTF-7 that decodes to lone surrogates (was quarantined)",
}
FUZZ_EXAMPLES = int(os.environ.get("INBOXD_FUZZ_EXAMPLES", "150"))
# Hang guard: a parse of these samples takes milliseconds to ~2 s; only a loop or a quadratic blow-up gets near this.
HANG_GUARD_SECONDS = 30.0

T = TypeVar("T")


def within_hang_guard(fn: Callable[[], T], seconds: float = HANG_GUARD_SECONDS) -> T:
    """Run ``fn`` in a daemon thread and fail the test if it has not returned after ``seconds``.

    A hang guard, not a performance assertion: the bound is far above any normal run and only says "this does
    not loop forever". (A thread, not a signal, so that a hang inside C code such as a regex is caught too.)
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread below
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True, name="hang-guard")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"hang guard: still running after {seconds:.0f} s", pytrace=False)
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


# --- generated samples --------------------------------------------------------------------------------------------

HEAD = b"From: cand@example.org\r\nTo: rec@example.test\r\nDate: Tue, 04 Feb 2025 09:30:00 +0000\r\n"


def _headers(name: str) -> bytes:
    return HEAD + b"Message-ID: <gen-%s@example.org>\r\n" % name.replace(" ", "-").encode()


def nested_multipart(depth: int) -> bytes:
    parts = [_headers(f"nest{depth}") + b"Subject: nested\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"]
    parts += [b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i) for i in range(1, depth)]
    parts.append(b"--b%d\r\nContent-Type: text/plain\r\n\r\ninnermost\r\n" % (depth - 1))
    return b"".join(parts)


def nested_rfc822(depth: int) -> bytes:
    inner = (
        b"From: x@example.org\r\nContent-Type: message/rfc822\r\n\r\n" * depth + b"From: x@example.org\r\n\r\nend\r\n"
    )
    return _headers("rfc822") + b"Subject: forwarded 1000 times\r\nContent-Type: message/rfc822\r\n\r\n" + inner


def forwarded_applications(count: int) -> bytes:
    """``count`` CVs forwarded as attached messages, each a multipart with a 250 KB base64 attachment."""
    attachment = base64.encodebytes(bytes(range(256)) * 1000).replace(b"\n", b"\r\n")
    parts = [
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\nFrom: c%d@example.org\r\nSubject: CV %d\r\n"
        b'Content-Type: multipart/mixed; boundary="in%d"\r\n\r\n--in%d\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
        b"--in%d\r\nContent-Type: application/pdf; name=cv.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        % (i, i, i, i, i)
        + attachment
        + b"--in%d--\r\n" % i
        for i in range(count)
    ]
    head = _headers("forwarded") + b'Subject: CVs\r\nContent-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    return head + b"--outer\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n" + b"".join(parts) + b"--outer--\r\n"


def many_parts(count: int) -> bytes:
    part = b"--p\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nx\r\n"
    head = _headers(f"parts{count}") + b"Subject: many parts\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n"
    return head + part * count + b"--p--\r\n"


GENERATED: dict[str, Callable[[], bytes]] = {
    "1 MB Subject line": lambda: _headers("subject") + b"Subject: " + b"x" * 1_000_000 + b"\r\n\r\nbody",
    "1 MB X- header folded 200k times": lambda: _headers("fold") + b"X-Long: " + b"w\r\n " * 200_000 + b"\r\n\r\nb",
    "1 MB From address": lambda: b"From: " + b"a" * 1_000_000 + b"@example.org\r\nSubject: long from\r\n\r\nbody",
    "1 MB of encoded-words": lambda: _headers("2047") + b"Subject: " + b"=?utf-8?b?w6k=?= " * 60_000 + b"\r\n\r\nx",
    "100k header lines": lambda: _headers("lines") + b"X-A: b\r\n" * 100_000 + b"\r\nbody",
    "multipart nesting 1000 deep": lambda: nested_multipart(1000),
    "100 multiparts around 250k empty lines": lambda: nested_multipart(101) + b"\n" * 250_000,
    "80 KB Content-Type of quoted semicolons": lambda: (
        _headers("semicolons") + b'Content-Type: multipart/mixed; boundary="' + b";" * 80_000 + b'"\r\n\r\nbody'
    ),
    "message/rfc822 nesting 1000 deep": lambda: nested_rfc822(1000),
    "10k parts": lambda: many_parts(10_000),
    "1 MB Content-Type parameter": lambda: (
        _headers("param") + b'Content-Type: text/plain; name="' + b"n" * 1_000_000 + b'"\r\n\r\nbody'
    ),
    "50k Content-Type parameters": lambda: (
        _headers("params") + b"Content-Type: text/plain" + b"; a=b" * 50_000 + b"\r\n\r\nbody"
    ),
    "1 MB boundary": lambda: (
        _headers("boundary")
        + b'Content-Type: multipart/mixed; boundary="'
        + b"B" * 1_000_000
        + b'"\r\n\r\n--'
        + b"B" * 1_000_000
        + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    ),
    "20k RFC 2231 filename continuations": lambda: (
        _headers("2231")
        + b"Content-Type: multipart/mixed; boundary=q\r\n\r\n--q\r\nContent-Type: application/pdf\r\n"
        + b"Content-Disposition: attachment"
        + b"".join(b"; filename*%d*=%%41" % i for i in range(20_000))
        + b"\r\n\r\nx\r\n--q--\r\n"
    ),
    "200k empty parts": lambda: (
        _headers("empty") + b"Content-Type: multipart/mixed; boundary=z\r\n\r\n" + b"--z\r\n\r\n" * 200_000
    ),
}


# --- what a sane row is -------------------------------------------------------------------------------------------

# varchar sizes of the columns parsed values go to (inboxd/models.py); PostgreSQL refuses longer values
COLUMN_LIMITS = {"message_id": 1024, "email": 320, "content_type": 255, "content_id": 1024}


def text_values(parsed: ParsedMessage) -> list[tuple[str, str]]:
    """(where, value) for every text the store writes from a ParsedMessage."""
    values: list[tuple[str, str | None]] = [
        ("message_id_header", parsed.message_id_header),
        ("in_reply_to", parsed.in_reply_to),
        ("subject", parsed.subject),
        ("from_email", parsed.from_email),
        ("from_name", parsed.from_name),
        ("body_text", parsed.body_text),
        ("body_html", parsed.body_html),
        ("snippet", parsed.snippet),
    ]
    values += [("references", ref) for ref in parsed.references]
    for person in parsed.participants:
        values += [("participant.email", person.email), ("participant.name", person.name)]
    for part in parsed.attachments:
        values += [("attachment.filename", part.filename), ("attachment.content_type", part.content_type)]
        values += [("attachment.content_id", part.content_id)]
    return [(where, value) for where, value in values if value is not None]


def storability_problems(parsed: ParsedMessage, raw: bytes) -> list[str]:
    """What would make the store fail or the row insane; empty when the row is fine on SQLite and PostgreSQL."""
    problems = []
    for where, value in text_values(parsed):
        if "\x00" in value:
            problems.append(f"{where}: contains NUL (PostgreSQL text cannot)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{where}: not encodable as UTF-8 (lone surrogate)")
    limits = [("from_email", parsed.from_email, COLUMN_LIMITS["email"])]
    limits += [(f"id {i}", i, COLUMN_LIMITS["message_id"]) for i in (parsed.message_id_header, parsed.in_reply_to)]
    limits += [("participant", p.email, COLUMN_LIMITS["email"]) for p in parsed.participants]
    limits += [("content_type", a.content_type, COLUMN_LIMITS["content_type"]) for a in parsed.attachments]
    limits += [("content_id", a.content_id, COLUMN_LIMITS["content_id"]) for a in parsed.attachments]
    problems += [f"{where}: {len(v)} chars > varchar({n})" for where, v, n in limits if v is not None and len(v) > n]
    if parsed.size_bytes != len(raw):
        problems.append(f"size_bytes {parsed.size_bytes} != {len(raw)}")
    if len(parsed.snippet) > 200 or "\n" in parsed.snippet:
        problems.append("snippet longer than 200 or multi-line")
    if parsed.body_text is not None and len(parsed.body_text) > 2_000_000:
        problems.append("body_text over max_body_chars")
    if len(parsed.attachments) > MAX_MIME_PARTS:
        problems.append(f"{len(parsed.attachments)} attachments > MAX_MIME_PARTS")
    for person in parsed.participants:
        if "@" not in person.email or person.email != person.email.lower() or person.role not in ROLES:
            problems.append(f"participant {person!r}")
    if parsed.body_html is not None and "<script" in parsed.body_html.lower():
        problems.append("script in body_html")
    return problems


ROLES = frozenset({"from", "to", "cc", "bcc", "reply_to"})


def parse_or_quarantine_reason(raw: bytes) -> ParsedMessage | str:
    """parse_message under the hang guard: the ParsedMessage, or the quarantine reason of an UnparseableMessage.
    Any other exception fails the test (the parser's contract: parse_message's docstring)."""

    def parse() -> ParsedMessage | str:
        try:
            return parse_message(raw)
        except UnparseableMessage as exc:
            return exc.message

    outcome = within_hang_guard(parse)
    assert outcome, "a quarantine row needs a reason"
    return outcome


SAMPLES = [pytest.param(lambda name=name: (HOSTILE / name).read_bytes(), id=name) for name in HOSTILE_FILES]
SAMPLES += [pytest.param(build, id=name) for name, build in GENERATED.items()]


def test_hostile_corpus_is_what_the_module_says() -> None:
    assert sorted(p.name for p in HOSTILE.glob("*.eml")) == sorted(HOSTILE_FILES)


@pytest.mark.parametrize("sample", SAMPLES)
def test_hostile_sample_parses_to_a_storable_row_or_a_quarantine_reason(sample: Callable[[], bytes]) -> None:
    raw = sample()
    outcome = parse_or_quarantine_reason(raw)
    if isinstance(outcome, str):
        return
    assert storability_problems(outcome, raw) == []


def test_what_inboxd_makes_of_specific_hostile_mail() -> None:
    """The documented outcome of the samples whose handling is a decision, not just "does not crash"."""
    qp = parse_message((HOSTILE / "bad_qp_with_nul_escape.eml").read_bytes())
    assert qp.body_text is not None and "NUL escape here:\ufffd:" in qp.body_text, "a NUL becomes U+FFFD"
    long_addr = parse_message((HOSTILE / "overlong_address.eml").read_bytes())
    assert long_addr.from_email is None, "no mailbox address is longer than 320 characters: dropped, not cut"
    assert [p.email for p in long_addr.participants] == ["rec@example.test"]
    long_type = parse_message((HOSTILE / "overlong_content_type.eml").read_bytes())
    assert [a.content_type for a in long_type.attachments] == ["application/octet-stream"]
    no_body = parse_message((HOSTILE / "header_only_no_body.eml").read_bytes())
    assert (no_body.subject, no_body.message_id_header, no_body.body_text) == (
        "headers and no blank line",
        "h-nobody@example.org",
        "",
    )
    deep = parse_message(nested_multipart(1000))
    assert any("nesting" in d for d in deep.defects) and deep.subject == "nested"
    # the feed parser's time is lines x depth (13 s for 1 MB inside 101 multiparts): the body is not parsed
    lines = parse_message(nested_multipart(101) + b"\n" * 250_000)
    assert lines.defects == ("MIME structure too nested for its size: body not parsed",)
    assert (lines.subject, lines.body_text, lines.attachments) == ("nested", "", ())
    assert not any("too nested" in d for d in parse_message(nested_multipart(101)).defects), "small: parsed"
    # wide is not deep: 60 forwarded applications side by side (21 MB, 61 multiparts) are parsed whole
    wide = parse_message(forwarded_applications(60))
    assert (len(wide.attachments), wide.body_text, wide.defects) == (60, "see attached", ())
    many = parse_message(many_parts(10_000))
    assert len(many.attachments) < MAX_MIME_PARTS and any("MIME parts" in d for d in many.defects)


def test_every_hostile_sample_is_stored_by_the_store(store: Store) -> None:
    """Each sample parsed and written by Store.store_batch, on SQLite and on PostgreSQL: a row the database holds
    (PostgreSQL refuses NUL and over-long varchar values, which once stopped an account's sync for good), read
    back with the parsed values."""
    account = store.add_account("hostile@example.test", "local", Credential("oauth2_refresh", "unused"))
    folder = store.ensure_folder(account.id, "INBOX", "\\Inbox")
    samples = {name: (HOSTILE / name).read_bytes() for name in HOSTILE_FILES if name != "same_message_id_second.eml"}
    samples |= {name: build() for name, build in GENERATED.items()}
    for uid, (name, raw) in enumerate(samples.items(), start=1):
        outcome = parse_or_quarantine_reason(raw)
        assert not isinstance(outcome, str), f"{name}: quarantined ({outcome})"
        new = NewMessage(
            identity=f"sample:{name}",
            parsed=outcome,
            folder_name="INBOX",
            direction="inbound",
            received_at=None,
            location=NewLocation(uid, ("\\Seen",), None),
        )
        [row_id] = store.store_batch(account.id, folder.id, [new], {}, last_uid=uid)
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(messages_t).where(messages_t.c.id == row_id)).one()
            people = conn.execute(sa.select(participants_t).where(participants_t.c.message_id == row_id)).all()
            parts = conn.execute(sa.select(attachments_t).where(attachments_t.c.message_id == row_id)).all()
        assert (row.subject, row.body_text, row.from_email) == (outcome.subject, outcome.body_text, outcome.from_email)
        assert (row.body_html, row.message_id_header) == (outcome.body_html, outcome.message_id_header), name
        assert len(people) == len(outcome.participants) and len(parts) == len(outcome.attachments), name


# --- end to end through Dovecot -----------------------------------------------------------------------------------


@pytest.mark.mailstack
def test_hostile_mail_through_dovecot_is_stored_or_quarantined_and_the_sync_goes_on(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack
) -> None:
    """Every hostile sample APPENDed to a real mailbox (IMAP forbids NUL in a literal: Dovecot sends 0x80 for raw
    NUL bytes; the NULs that =00 and UTF-16 decode to still arrive), then one good message: one sync stores or
    quarantines each, stores the good one, and the next sync has nothing left to do. Two different messages with
    one Message-ID are one row in two locations, the first one's text (the documented identity: Message-ID)."""
    user = mailstack.new_user("hostile")
    config = load_config(write_stack_config(tmp_path, db_url, mailstack), env={})
    store.add_account(user, "local", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    generated = ["1 MB Subject line", "multipart nesting 1000 deep", "10k parts", "1 MB From address"]
    raws = [(HOSTILE / name).read_bytes() for name in HOSTILE_FILES] + [GENERATED[name]() for name in generated]
    with mailstack.admin_imap(user) as imap:
        for raw in raws:
            imap.append("INBOX", raw)
        imap.append("INBOX", make_message("cand@example.org", user, "the good one after them", "fine"))
    runner = Runner(config, store, clock=SystemClock(), settings=SyncSettings(flag_scan_interval=timedelta(0)))
    [result] = within_hang_guard(lambda: runner.sync_once(only=user), seconds=120)
    assert result.ok, result.reason
    assert result.stats.new_messages + result.stats.quarantined == len(raws)  # the shared Message-ID: one row
    with store.engine.connect() as conn:
        rows = {r.subject: r for r in conn.execute(sa.select(messages_t))}
        quarantined = conn.execute(sa.select(sa.func.count()).select_from(quarantine_t)).scalar()
    assert len(rows) + quarantined == len(raws)
    assert "the good one after them" in rows
    assert "\ufffd" in rows["quoted-printable garbage and =00"].body_text
    shared = rows["same Message-ID, first message"]
    assert "same Message-ID, second message" not in rows
    assert shared.body_text.strip() == "the first text" and shared.labels == ["INBOX"]
    with store.engine.connect() as conn:
        places = conn.execute(sa.select(locations_t.c.uid).where(locations_t.c.message_id == shared.id)).all()
    assert len(places) == 2

    [again] = runner.sync_once(only=user)
    assert again.ok and (again.stats.new_messages, again.stats.quarantined) == (0, 0)


# --- property tests: the parser -----------------------------------------------------------------------------------

SEEDS = sorted(CORPUS.glob("*.eml")) + sorted(HOSTILE.glob("*.eml"))
TOKENS = [
    b"\x00", b"\r", b"\n", b"\r\n\r\n", b"--", b"--x\r\n", b"--x--", b"=?utf-8?b?", b"=?x-unknown?q?=FF", b"?=",
    b"=00", b"=\r\n", b";", b'"', b"<", b">", b"(", b"\\", b"\xff", b"\xc3", b"\x80",
    b"Content-Type: multipart/mixed; boundary=x\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"; charset=utf-16", b"; charset=x-unknown", b"; name*0*=utf-8''%00%ff", b"<script>", b"\xfe\xff",
]  # fmt: skip
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 255).map(lambda b: bytes([b]))),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.sampled_from(TOKENS)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64).map(lambda n: b"x" * n)),
    st.tuples(st.just("repeat"), st.integers(0, 1 << 20), st.integers(1, 256).map(lambda n: b"x" * n)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(b"")),
    st.tuples(st.just("lf_only"), st.just(0), st.just(b"")),
)


def mutate(raw: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    data = bytearray(raw)
    for kind, position, arg in mutations:
        at = position % (len(data) + 1)
        if kind == "flip" and data:
            data[at % len(data)] = arg[0]
        elif kind == "insert":
            data[at:at] = arg
        elif kind == "delete":
            del data[at : at + len(arg)]
        elif kind == "repeat":
            data[at:at] = data[at : at + len(arg)] * 3
        elif kind == "truncate":
            del data[at:]
        elif kind == "lf_only":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n"))
    return bytes(data)


FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # no timing assertions: within_hang_guard catches hangs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(MUTATION, max_size=8))
def test_mutated_corpus_messages_parse_to_storable_rows_or_unparseable(
    seed: Path, mutations: list[tuple[str, int, bytes]]
) -> None:
    raw = mutate(seed.read_bytes(), mutations)
    outcome = parse_or_quarantine_reason(raw)
    if not isinstance(outcome, str):
        assert storability_problems(outcome, raw) == []


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=200), st.sampled_from(TOKENS)), max_size=40).map(b"".join))
def test_random_bytes_parse_to_storable_rows_or_unparseable(raw: bytes) -> None:
    outcome = parse_or_quarantine_reason(raw)
    if not isinstance(outcome, str):
        assert storability_problems(outcome, raw) == []


# --- property tests: the planner ----------------------------------------------------------------------------------

QRESYNC = Capabilities(condstore=True, qresync=True)
CONDSTORE = Capabilities(condstore=True, qresync=False)
PLAIN = Capabilities(condstore=False, qresync=False)
CAPS = st.sampled_from([QRESYNC, CONDSTORE, PLAIN])
CURSORS = st.one_of(
    st.none(),
    st.builds(
        FolderCursor,
        uidvalidity=st.one_of(st.none(), st.integers(1, 4)),
        last_uid=st.integers(0, 60),
        uidnext=st.one_of(st.none(), st.integers(1, 61)),
        highest_modseq=st.one_of(st.none(), st.integers(1, 100)),
        message_count=st.one_of(st.none(), st.integers(0, 60)),
    ),
)
STATUSES = st.builds(
    FolderStatus,
    uidvalidity=st.integers(1, 4),
    uidnext=st.integers(1, 61),
    messages=st.integers(0, 60),
    highest_modseq=st.one_of(st.none(), st.integers(1, 100)),
)


@FUZZ
@given(CURSORS, STATUSES, CAPS, st.booleans())
def test_planner_invariants_on_random_cursor_and_server_states(
    cursor: FolderCursor | None, status: FolderStatus, caps: Capabilities, flag_scan_due: bool
) -> None:
    """plan_folder's rules (planner.py docstrings) hold for any cursor and STATUS: first syncs are full; a changed
    UIDVALIDITY is a full sync that re-maps; otherwise never full, and new mail is fetched from exactly the cursor's
    last UID on (no UID it already has, none skipped); CONDSTORE is never used without the capability, VANISHED
    never without QRESYNC; "unchanged" only when the counts (and MODSEQ, or the flag scan) say so."""
    plan = plan_folder(cursor, status, caps, flag_scan_due=flag_scan_due)
    if cursor is None or cursor.uidvalidity is None:
        assert (plan.kind, plan.reset_locations, plan.fetch_new_after) == (PlanKind.FULL, False, 0)
        return
    if cursor.uidvalidity != status.uidvalidity:
        assert (plan.kind, plan.reset_locations, plan.fetch_new_after) == (PlanKind.FULL, True, 0)
        return
    assert plan.kind is not PlanKind.FULL and not plan.reset_locations
    if plan.flags_changed_since is not None:
        assert caps.condstore and status.highest_modseq is not None
        assert plan.flags_changed_since == cursor.highest_modseq
    if plan.expunge_check is ExpungeCheck.VANISHED:
        assert caps.qresync and plan.flags_changed_since is not None
    same_counts = (cursor.uidnext, cursor.message_count) == (status.uidnext, status.messages)
    modseq_path = caps.condstore and None not in (cursor.highest_modseq, status.highest_modseq)
    if plan.kind is PlanKind.UNCHANGED:
        assert same_counts
        if modseq_path:
            assert cursor.highest_modseq == status.highest_modseq
        else:
            assert not flag_scan_due
        return
    assert plan.fetch_new_after == cursor.last_uid
    assert plan.expunge_check is not ExpungeCheck.NONE
    assert plan.refresh_all_flags or plan.flags_changed_since is not None
    if not modseq_path:
        assert plan.refresh_all_flags and plan.flags_changed_since is None


@dataclass
class ModelFolder:
    """A server folder as RFC 3501/7162 describe it: UIDs ascend and are never reused, every change bumps MODSEQ."""

    uidvalidity: int = 1
    uidnext: int = 1
    modseq: int = 1
    messages: dict[int, tuple[str, frozenset[str], int]] = field(default_factory=dict)  # uid: identity, flags, modseq
    vanished: dict[int, int] = field(default_factory=dict)  # uid: MODSEQ of its expunge

    def status(self, caps: Capabilities) -> FolderStatus:
        return FolderStatus(self.uidvalidity, self.uidnext, len(self.messages), self.modseq if caps.condstore else None)

    def apply(self, op: tuple[str, int, int]) -> None:
        kind, a, b = op
        uids = sorted(self.messages)
        self.modseq += 1
        if kind == "append":
            self.messages[self.uidnext] = (f"id{a % 6}", frozenset(), self.modseq)
            self.uidnext += 1
        elif kind == "flag" and uids:
            uid = uids[a % len(uids)]
            identity, flags, _ = self.messages[uid]
            self.messages[uid] = (identity, flags ^ {("\\Seen", "\\Flagged", "$Label1")[b % 3]}, self.modseq)
        elif kind == "expunge" and uids:
            uid = uids[a % len(uids)]
            del self.messages[uid]
            self.vanished[uid] = self.modseq
        elif kind == "renumber":  # the folder re-created: a new UIDVALIDITY, the same messages under new UIDs
            old = [self.messages[u] for u in uids]
            order = sorted(range(len(old)), key=lambda i: (i * (a + 1) + b) % (len(old) or 1))
            self.uidvalidity += 1
            self.messages = {n: (old[i][0], old[i][1], self.modseq) for n, i in enumerate(order, start=1)}
            self.uidnext, self.vanished = len(old) + 1, {}


@dataclass
class ModelClient:
    """What sync.py does with a plan, reduced to UIDs and flags (the store keyed by identity)."""

    cursor: FolderCursor | None = None
    locations: dict[int, tuple[str, frozenset[str]]] = field(default_factory=dict)

    def sync(self, server: ModelFolder, caps: Capabilities, flag_scan_due: bool) -> None:
        status = server.status(caps)
        plan = plan_folder(self.cursor, status, caps, flag_scan_due=flag_scan_due)
        if plan.kind is PlanKind.UNCHANGED:
            return
        if plan.reset_locations:
            self.locations.clear()
        after = 0 if plan.kind is PlanKind.FULL else plan.fetch_new_after
        new = sorted(uid for uid in server.messages if uid > after)
        assert not set(new) & set(self.locations), "the plan fetches a UID already held under this UIDVALIDITY"
        for uid in new:
            self.locations[uid] = server.messages[uid][:2]
        if plan.kind is PlanKind.INCREMENTAL:
            assert self.cursor is not None
            known = {uid for uid in self.locations if uid <= self.cursor.last_uid}
            since = plan.flags_changed_since
            for uid in known & set(server.messages):
                if plan.refresh_all_flags or (since is not None and server.messages[uid][2] > since):
                    self.locations[uid] = server.messages[uid][:2]
            if plan.expunge_check is ExpungeCheck.VANISHED:
                assert since is not None
                gone = {uid for uid, modseq in server.vanished.items() if modseq > since and uid in known}
            else:
                gone = known - set(server.messages)
            for uid in gone:
                self.locations.pop(uid, None)
        last_uid = max(new, default=0 if plan.kind is PlanKind.FULL else after)
        self.cursor = FolderCursor(status.uidvalidity, last_uid, status.uidnext, status.highest_modseq, status.messages)


SERVER_OPS = st.tuples(
    st.sampled_from(["append", "append", "flag", "flag", "expunge", "renumber"]), st.integers(0, 50), st.integers(0, 50)
)
SYNC_OPS = st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 1))


@FUZZ
@given(st.lists(st.one_of(SERVER_OPS, SYNC_OPS), max_size=40), CAPS)
def test_any_sequence_of_server_changes_ends_in_the_servers_state(
    ops: list[tuple[str, int, int]], final_caps: Capabilities
) -> None:
    """Random appends, flag changes, expunges and renumberings (UIDVALIDITY resets), synced at random points with
    random capabilities (a server may stop or start offering CONDSTORE): after every sync the client holds exactly
    the server's UIDs; its flags are current whenever CONDSTORE was usable or the flag scan was due; and one sync
    with the scan due always ends in the server's exact state."""
    server, client = ModelFolder(), ModelClient()
    for op in ops:
        if op[0] != "sync":
            server.apply(op)
            continue
        caps, due = [QRESYNC, CONDSTORE, PLAIN][op[1]], bool(op[2])
        modseq_before = client.cursor.highest_modseq if client.cursor else None
        client.sync(server, caps, due)
        assert set(client.locations) == set(server.messages)
        if due or (caps.condstore and modseq_before is not None):
            assert client.locations == {u: m[:2] for u, m in server.messages.items()}
    client.sync(server, final_caps, True)
    assert client.locations == {u: m[:2] for u, m in server.messages.items()}


LISTINGS = st.lists(
    st.builds(
        FolderListing,
        name=st.sampled_from(["INBOX", "inbox", "Sent", "Archive", "Trash", "Junk", "Drafts", "All", "x", "y/z"]),
        flags=st.frozensets(
            st.sampled_from(["\\Sent", "\\SENT", "\\Trash", "\\Junk", "\\Drafts", "\\All", "\\Noselect",
                             "\\NonExistent", "\\Archive", "\\Flagged", "\\Important", "\\HasChildren"])
        ),
    ),
    max_size=12,
    unique_by=lambda folder: folder.name.upper(),
)  # fmt: skip


@FUZZ
@given(LISTINGS)
def test_folder_selection_on_random_listings(listing: list[FolderListing]) -> None:
    """Exactly the selectable folders that are not trash, spam, drafts or a virtual view are synced, whatever the
    case of their attributes or of INBOX's name; INBOX first, then the \\Sent folders. A folder without attributes
    named Trash, Junk or Drafts is one when no other folder carries that kind's attribute (no SPECIAL-USE)."""
    skipped = {"\\trash", "\\junk", "\\drafts", "\\all", "\\flagged", "\\important", "\\noselect", "\\nonexistent"}
    special_use = {"\\sent", "\\archive", "\\trash", "\\junk", "\\drafts", "\\all", "\\flagged", "\\important"}
    flagged = {flag.lower() for folder in listing if folder.name.upper() != "INBOX" for flag in folder.flags}

    def skipped_by_name(folder: FolderListing) -> bool:
        kind = {"trash": "\\trash", "junk": "\\junk", "drafts": "\\drafts"}.get(folder.name.lower())
        own = {flag.lower() for flag in folder.flags} & special_use
        return kind is not None and kind not in flagged and not own

    chosen = select_folders(listing)
    expected = {
        "INBOX" if folder.name.upper() == "INBOX" else folder.name
        for folder in listing
        if not {flag.lower() for flag in folder.flags} & skipped and not skipped_by_name(folder)
    }
    assert [spec.name for spec in chosen if spec.name in expected] == [spec.name for spec in chosen]
    assert {spec.name for spec in chosen} == expected
    order = [0 if spec.name == "INBOX" else 1 if spec.special_use == "\\Sent" else 2 for spec in chosen]
    assert order == sorted(order)


def test_fields_of_parsed_message_are_all_checked() -> None:
    """text_values covers every text field of ParsedMessage: a field added later must be added to the checks."""
    checked = {"message_id_header", "in_reply_to", "subject", "from_email", "from_name", "body_text", "body_html"}
    checked |= {"snippet", "references", "participants", "attachments"}
    not_text = {"sent_at", "has_attachments", "size_bytes", "defects"}
    assert {f.name for f in fields(ParsedMessage)} == checked | not_text
