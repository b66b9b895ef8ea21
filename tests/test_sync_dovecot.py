"""Generic IMAP sync against a real Dovecot over loopback, XOAUTH2 tokens from the local OAuth server, on SQLite and
PostgreSQL. Each test gets fresh mailboxes; capability variants (QRESYNC / CONDSTORE only / neither) are the same
Dovecot reached on 127.0.0.1 / .2 / .3."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from harness import MailStack, make_message
from harness.clocks import EveryReportWritten
from harness.config import write_stack_config
from harness.fault_proxy import FaultProxy, OnCommand, Refuse
from inboxd.clock import SystemClock
from inboxd.config import Config, load_config
from inboxd.imap import ImapEndpoint, _flag_update, _header_info, connect, header_fields
from inboxd.models import MailMessage, MailParticipant, MailQuarantine, MailThread
from inboxd.runner import Runner
from inboxd.store import Credential, Store
from inboxd.sync import SyncSettings

pytestmark = pytest.mark.mailstack

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
participants_t = MailParticipant.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]
quarantine_t = MailQuarantine.__table__  # type: ignore[attr-defined]

VARIANTS = {"qresync": "full", "condstore": "no_qresync", "plain": "no_condstore"}
CORPUS = Path(__file__).parent / "corpus"


def write_config(
    tmp_path: Path, db_url: str, stack: MailStack, *, host: str = "127.0.0.1", scope: str = "all", sync_extra: str = ""
) -> Config:
    path = write_stack_config(tmp_path, db_url, stack, host=host, scope=scope, sync_extra=sync_extra)
    return load_config(path, env={})


def connect_account(store: Store, stack: MailStack, email: str) -> str:
    token = stack.refresh_token(email)
    store.add_account(email, "local", Credential("oauth2_refresh", token))
    return token


def rows(store: Store, email: str) -> list[sa.Row]:  # type: ignore[type-arg]
    account = store.account(email)
    assert account is not None
    with store.engine.connect() as conn:
        return list(
            conn.execute(sa.select(messages_t).where(messages_t.c.account_id == account.id).order_by(messages_t.c.id))
        )


def sync(config: Config, store: Store, email: str) -> Runner:
    runner = Runner(config, store, clock=SystemClock())
    results = runner.sync_once(only=email)
    assert [r.ok for r in results] == [True], results
    return runner


@pytest.fixture
def recruiter(mailstack: MailStack) -> str:
    return mailstack.new_user()


def test_first_sync_then_new_mail_flags_and_folders(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """First sync stores every message once with parsed fields; then new mail, a flag change and a copy into a
    second folder are picked up incrementally."""
    config = write_config(tmp_path, db_url, mailstack)
    connect_account(store, mailstack, recruiter)
    first = make_message(
        "Ana Candidate <ana@example.org>",
        recruiter,
        "Application: Backend role",
        "Hello, my CV is attached.",
        message_id="<app-1@example.org>",
    )
    mailstack.deliver(recruiter, first)
    with mailstack.admin_imap(recruiter) as imap:
        reply = make_message(
            recruiter,
            "ana@example.org",
            "Re: Application: Backend role",
            "Thanks Ana!",
            message_id="<reply-1@example.test>",
            in_reply_to="<app-1@example.org>",
        )
        imap.append("Sent", reply, flags=[b"\\Seen"])

    sync(config, store, recruiter)
    got = rows(store, recruiter)
    assert [(r.subject, r.direction, r.labels) for r in got] == [
        ("Application: Backend role", "inbound", ["INBOX"]),
        ("Re: Application: Backend role", "outbound", ["Sent"]),
    ]
    inbound, outbound = got
    assert inbound.from_email == "ana@example.org"
    assert inbound.message_id_header == "app-1@example.org"
    assert inbound.is_read is False and outbound.is_read is True
    assert inbound.thread_id == outbound.thread_id, "the reply threads with the application"
    with store.engine.connect() as conn:
        roles = {
            (p.role, p.email)
            for p in conn.execute(sa.select(participants_t).where(participants_t.c.message_id == inbound.id))
        }
    assert ("from", "ana@example.org") in roles and ("to", recruiter) in roles

    # new mail + flag change + the same message copied to a second folder
    mailstack.deliver(
        recruiter, make_message("Bo <bo@example.org>", recruiter, "Second", "hi", message_id="<second@example.org>")
    )
    with mailstack.admin_imap(recruiter) as imap:
        imap.select_folder("INBOX")
        uid = imap.search(["HEADER", "Message-ID", "app-1@example.org"])[0]
        imap.add_flags([uid], [b"\\Seen"])
        imap.copy([uid], "Archive")
    sync(config, store, recruiter)
    got = rows(store, recruiter)
    assert len(got) == 3, "a message in two folders is one row"
    by_subject = {r.subject: r for r in got}
    assert by_subject["Application: Backend role"].is_read is True
    assert by_subject["Application: Backend role"].labels == ["Archive", "INBOX"]
    assert by_subject["Second"].deleted_at is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_expunge_and_flags_on_every_capability_set(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str, variant: str
) -> None:
    """Expunges are found by QRESYNC VANISHED, by UID-set diff with CONDSTORE only, and without CONDSTORE at all;
    the row is kept with deleted_at set. Flag changes arrive on all three."""
    config = write_config(tmp_path, db_url, mailstack, host=mailstack.imap_host(VARIANTS[variant]))
    connect_account(store, mailstack, recruiter)
    for n in range(5):
        mailstack.deliver(
            recruiter, make_message("c@example.org", recruiter, f"msg {n}", "x", message_id=f"<m{n}@example.org>")
        )
    sync(config, store, recruiter)
    assert len(rows(store, recruiter)) == 5

    with mailstack.admin_imap(recruiter) as imap:
        imap.select_folder("INBOX")
        uids = sorted(imap.search(["ALL"]))
        imap.add_flags([uids[0]], [b"\\Seen"])
        imap.delete_messages([uids[1], uids[2]])
        imap.expunge()
    # without CONDSTORE, flags come from the periodic scan: make it due on every sync
    settings = SyncSettings(batch_size=3, flag_scan_interval=timedelta(0))
    runner = Runner(config, store, clock=SystemClock(), settings=settings)
    [result] = runner.sync_once(only=recruiter)
    assert result.ok
    assert result.stats.expunged == 2
    got = {r.subject: r for r in rows(store, recruiter)}
    assert len(got) == 5, "expunged rows are kept"
    assert got["msg 1"].deleted_at is not None and got["msg 2"].deleted_at is not None
    assert got["msg 0"].is_read is True
    assert all(got[f"msg {n}"].deleted_at is None for n in (0, 3, 4))


def test_uidvalidity_change_remaps_without_duplicates(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    config = write_config(tmp_path, db_url, mailstack)
    connect_account(store, mailstack, recruiter)
    for n in range(4):
        mailstack.deliver(
            recruiter, make_message("c@example.org", recruiter, f"v {n}", "x", message_id=f"<v{n}@example.org>")
        )
    sync(config, store, recruiter)
    before = {r.id for r in rows(store, recruiter)}
    mailstack.bump_uidvalidity(recruiter, "INBOX")
    runner = Runner(config, store, clock=SystemClock())
    [result] = runner.sync_once(only=recruiter)
    assert result.ok
    assert result.stats.new_messages == 0
    assert result.stats.remapped == 4
    assert result.stats.bytes_downloaded == 0, "re-mapped by Message-ID, no body downloaded again"
    after = rows(store, recruiter)
    assert {r.id for r in after} == before
    assert all(r.deleted_at is None for r in after)


def test_a_folder_refused_during_its_re_map_keeps_its_messages(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """A UIDVALIDITY change drops the folder's locations and re-maps its messages from UID 1. When the server
    refused a command in that folder before it was done (sync.folder_refused: the other folders sync on), the end
    of the sync marked every message not re-mapped yet as deleted (deleted_at, labels []). They stay as they were
    until the folder's re-map is finished; then a message really gone gets its deleted_at."""
    with FaultProxy(mailstack.host, mailstack.imap_port) as proxy:
        path = write_stack_config(tmp_path, db_url, mailstack)
        text = path.read_text()
        old = f'imap_port = {mailstack.imap_port}\nimap_tls = "starttls"'
        assert old in text
        path.write_text(text.replace(old, f'imap_port = {proxy.port}\nimap_tls = "plain"'))
        config = load_config(path, env={})
        connect_account(store, mailstack, recruiter)
        for n in range(4):
            mailstack.deliver(recruiter, make_message("c@example.org", recruiter, f"r {n}", "x"))
        with mailstack.admin_imap(recruiter) as imap:
            imap.append("Archive", make_message("c@example.org", recruiter, "archived", "x"))
        sync(config, store, recruiter)
        mailstack.bump_uidvalidity(recruiter, "INBOX")
        # the re-map lists the folder from UID 1 ("UID SEARCH UID 1:*"); an incremental sync asks from its cursor
        fault = proxy.arm(OnCommand(b"UID", contains=b"SEARCH UID 1:*"), Refuse())
        with structlog.testing.capture_logs() as logs:
            [refused] = Runner(config, store, clock=SystemClock()).sync_once(only=recruiter)
        assert fault.fired == 1
        assert refused.ok, refused.reason
        assert [e["folder"] for e in logs if e["event"] == "sync.folder_refused"] == ["INBOX"]
        before = rows(store, recruiter)
        assert [(r.subject, r.labels, r.deleted_at) for r in before] == [
            *((f"r {n}", ["INBOX"], None) for n in range(4)),
            ("archived", ["Archive"], None),
        ], "kept as they were while the re-map is unfinished"
        with mailstack.admin_imap(recruiter) as imap:
            imap.select_folder("INBOX")
            imap.delete_messages(imap.search(["SUBJECT", "r 3"]))
            imap.expunge()
        [result] = Runner(config, store, clock=SystemClock()).sync_once(only=recruiter)
        assert result.ok, result.reason
        assert result.stats.remapped == 3
    after = rows(store, recruiter)
    assert [r.id for r in after] == [r.id for r in before], "re-mapped, none stored again"
    assert [(r.subject, r.labels, r.deleted_at is None) for r in after] == [
        *((f"r {n}", ["INBOX"], True) for n in range(3)),
        ("r 3", [], False),
        ("archived", ["Archive"], True),
    ]


def test_unchanged_mailbox_sync_is_cheap_and_idempotent(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """With CONDSTORE, a sync where nothing changed sends one STATUS per folder and never SELECTs or FETCHes
    (read from Dovecot's own log of the commands the client sent)."""
    config = write_config(tmp_path, db_url, mailstack, host=mailstack.imap_host("no_qresync"))
    connect_account(store, mailstack, recruiter)
    mailstack.deliver(recruiter, make_message("c@example.org", recruiter, "once", "x"))
    sync(config, store, recruiter)
    before = len(mailstack.imap_commands(recruiter))
    runner = Runner(config, store, clock=SystemClock())
    [result] = runner.sync_once(only=recruiter)
    assert result.stats.folders == result.stats.folders_unchanged > 0
    assert len(rows(store, recruiter)) == 1
    sent = [c.split(" ", 1)[0].upper() for c in mailstack.imap_commands(recruiter)[before:]]
    assert sent.count("STATUS") == result.stats.folders
    assert "LIST" in sent, sent
    assert not {"SELECT", "EXAMINE", "FETCH", "UID", "SEARCH"} & set(sent), sent


def test_no_condstore_server_is_never_sent_condstore_commands(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """Against a server that does not advertise CONDSTORE (like Microsoft 365) inboxd never uses it, even though
    this Dovecot would still accept it; new mail, flags (periodic scan) and expunges still arrive."""
    config = write_config(tmp_path, db_url, mailstack, host=mailstack.imap_host("no_condstore"))
    connect_account(store, mailstack, recruiter)
    mailstack.deliver(recruiter, make_message("c@example.org", recruiter, "first", "x"))
    settings = SyncSettings(batch_size=3, flag_scan_interval=timedelta(0))
    runner = Runner(config, store, clock=SystemClock(), settings=settings)
    assert runner.sync_once(only=recruiter)[0].ok
    mailstack.deliver(recruiter, make_message("c@example.org", recruiter, "second", "x"))
    with mailstack.admin_imap(recruiter) as imap:
        imap.select_folder("INBOX")
        imap.add_flags(imap.search(["SUBJECT", "first"]), [b"\\Seen"])
    assert runner.sync_once(only=recruiter)[0].ok
    assert {r.subject: r.is_read for r in rows(store, recruiter)} == {"first": True, "second": False}
    sent = " ".join(mailstack.imap_commands(recruiter)).upper()
    assert "CONDSTORE" not in sent
    assert "CHANGEDSINCE" not in sent
    assert "HIGHESTMODSEQ" not in sent
    assert "QRESYNC" not in sent


def test_malformed_corpus_never_stops_a_sync(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """Every file of tests/corpus is appended; the sync succeeds, parseable ones are stored, the rest quarantined,
    and a good message after them is still stored."""
    config = write_config(tmp_path, db_url, mailstack)
    connect_account(store, mailstack, recruiter)
    files = sorted(CORPUS.glob("*.eml"))
    assert len(files) >= 10
    with mailstack.admin_imap(recruiter) as imap:
        for f in files:
            imap.append("INBOX", f.read_bytes())
        imap.append("INBOX", make_message("last@example.org", recruiter, "after the corpus", "fine"))
    runner = Runner(config, store, clock=SystemClock())
    [result] = runner.sync_once(only=recruiter)
    assert result.ok, result.reason
    got = rows(store, recruiter)
    with store.engine.connect() as conn:
        quarantined = conn.execute(sa.select(sa.func.count()).select_from(quarantine_t)).scalar()
    assert len(got) + quarantined >= len(files) + 1 - _duplicates(files)
    assert "after the corpus" in {r.subject for r in got}


def _duplicates(files: list[Path]) -> int:
    return len(files) - len({f.read_bytes() for f in files})


def test_access_token_expiring_between_cycles_is_refreshed_once(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """A 2-second access token: cached across a cycle, refreshed once after it expires, never per poll."""
    config = write_config(tmp_path, db_url, mailstack)
    token = connect_account(store, mailstack, recruiter)
    mailstack.set_access_ttl(2)
    try:
        runner = Runner(config, store, clock=SystemClock())
        for _ in range(3):
            [result] = runner.sync_once(only=recruiter)
            assert result.ok, result.reason
        assert mailstack.token_calls(token) == 1
        time.sleep(2.5)
        mailstack.deliver(recruiter, make_message("late@example.org", recruiter, "after expiry", "x"))
        [result] = runner.sync_once(only=recruiter)
        assert result.ok, result.reason
        assert mailstack.token_calls(token) == 2
        assert [r.subject for r in rows(store, recruiter)] == ["after expiry"]
    finally:
        mailstack.set_access_ttl(3600)


def test_revoked_refresh_token_is_isolated_to_its_account(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack
) -> None:
    config = write_config(tmp_path, db_url, mailstack)
    good, bad = mailstack.new_user(), mailstack.new_user()
    connect_account(store, mailstack, good)
    bad_token = connect_account(store, mailstack, bad)
    mailstack.deliver(good, make_message("c@example.org", good, "for good", "x"))
    mailstack.revoke(bad_token)
    runner = Runner(config, store, clock=SystemClock())
    results = {r.email: r for r in runner.sync_once()}
    assert results[good].ok and not results[bad].ok
    bad_account = store.account(bad)
    assert bad_account is not None
    assert bad_account.state == "needs_reauth"
    assert "invalid_grant" in (bad_account.state_reason or "")
    assert bad_token not in (bad_account.state_reason or "")
    assert [r.subject for r in rows(store, good)] == ["for good"]
    # Reconnecting (new credentials) puts the account back to active.
    connect_account(store, mailstack, bad)
    assert runner.sync_once(only=bad)[0].ok


def test_contacts_scope_stores_only_candidate_mail(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """scope = "contacts": mail with an HR-app contact (matched case- and Gmail-dot-insensitively) is stored;
    everything else leaves no trace, and the cursor still moves past it."""
    config = write_config(tmp_path, db_url, mailstack, scope="contacts")
    connect_account(store, mailstack, recruiter)
    with store.engine.begin() as conn:  # the HR app adds a candidate
        conn.execute(sa.text("INSERT INTO mail_contacts (email, hr_contact_ref) VALUES ('jane.doe@gmail.com', 'c-1')"))
    mailstack.deliver(recruiter, make_message("Jane <JaneDoe+jobs@googlemail.com>", recruiter, "my CV", "x"))
    mailstack.deliver(recruiter, make_message("Bank <private@bank.example>", recruiter, "your statement", "secret"))
    runner = Runner(config, store, clock=SystemClock())
    [result] = runner.sync_once(only=recruiter)
    assert result.ok, result.reason
    assert result.stats.out_of_scope == 1
    assert [r.subject for r in rows(store, recruiter)] == ["my CV"]
    with store.engine.connect() as conn:
        leaked = conn.execute(
            sa.select(sa.func.count())
            .select_from(participants_t)
            .where(participants_t.c.email == "private@bank.example")
        ).scalar()
    assert leaked == 0
    cv = rows(store, recruiter)[0]
    assert result.stats.bytes_downloaded == cv.size_bytes, "header first: the private message's body never came"
    [again] = runner.sync_once(only=recruiter)
    assert again.stats.out_of_scope == 0, "the skipped message is not fetched again"


def test_contact_added_later_gets_its_history_backfilled(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """A candidate the HR app adds after the first sync: the next `run --once` searches the mailbox (INBOX and
    Sent) for them and stores their older mail; other private mail stays out; the search runs once."""
    config = write_config(tmp_path, db_url, mailstack, scope="contacts")
    connect_account(store, mailstack, recruiter)
    mailstack.deliver(recruiter, make_message("Late <late.cand@example.org>", recruiter, "old application", "x"))
    mailstack.deliver(recruiter, make_message("Other <other@example.org>", recruiter, "not a candidate", "x"))
    with mailstack.admin_imap(recruiter) as imap:
        imap.append("Sent", make_message(recruiter, "late.cand@example.org", "old answer", "y"), flags=[b"\\Seen"])
    runner = Runner(config, store, clock=SystemClock())
    assert runner.sync_once(only=recruiter)[0].ok
    assert rows(store, recruiter) == []
    with store.engine.begin() as conn:  # the HR app adds the candidate today
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('late.cand@example.org')"))
    [result] = runner.sync_once(only=recruiter)
    assert result.ok, result.reason
    assert result.stats.backfilled == 2
    assert sorted((r.subject, r.direction) for r in rows(store, recruiter)) == [
        ("old answer", "outbound"),
        ("old application", "inbound"),
    ]
    [again] = runner.sync_once(only=recruiter)
    assert again.stats.backfilled == 0


def test_exclusions_hold(store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str) -> None:
    """Excluded domains never make mail storable (an employee in mail_contacts does not pull internal mail in),
    and nothing in an excluded folder/label is stored, candidate or not."""
    config = write_config(
        tmp_path,
        db_url,
        mailstack,
        scope="contacts",
        sync_extra='exclude_addresses = ["@corp.example"]\nexclude_labels = ["Private"]',
    )
    connect_account(store, mailstack, recruiter)
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('cand@example.org'), ('boss@corp.example')"))
    mailstack.deliver(recruiter, make_message("Boss <boss@corp.example>", recruiter, "internal salary talk", "x"))
    mailstack.deliver(recruiter, make_message("Cand <cand@example.org>", recruiter, "application", "x"))
    with mailstack.admin_imap(recruiter) as imap:
        imap.create_folder("Private")
        imap.append("Private", make_message("Cand <cand@example.org>", recruiter, "personal note", "x"))
    [result] = Runner(config, store, clock=SystemClock()).sync_once(only=recruiter)
    assert result.ok, result.reason
    assert [r.subject for r in rows(store, recruiter)] == ["application"]


def test_rest_of_a_candidate_thread_is_kept(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """Once a conversation touches a candidate, a later reply in it is stored even with no contact on it (a
    colleague answering internally), and lands in the same thread; unrelated internal mail is not stored."""
    config = write_config(tmp_path, db_url, mailstack, scope="contacts")
    connect_account(store, mailstack, recruiter)
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('cand@example.org')"))
    mailstack.deliver(
        recruiter, make_message("cand@example.org", recruiter, "application", "x", message_id="<app-9@example.org>")
    )
    runner = Runner(config, store, clock=SystemClock())
    assert runner.sync_once(only=recruiter)[0].ok
    mailstack.deliver(
        recruiter,
        make_message(
            "Colleague <colleague@example.test>",
            recruiter,
            "Re: application",
            "looks good",
            in_reply_to="<app-9@example.org>",
        ),
    )
    mailstack.deliver(recruiter, make_message("colleague@example.test", recruiter, "lunch?", "x"))
    assert runner.sync_once(only=recruiter)[0].ok
    got = rows(store, recruiter)
    assert [r.subject for r in got] == ["application", "Re: application"]
    assert got[0].thread_id == got[1].thread_id


def test_the_expunge_check_of_a_sparse_folder_stays_within_the_servers_line_limit(
    mailstack: MailStack, recruiter: str
) -> None:
    """existing_uids asked for every stored UID in one SEARCH: the UIDs kept from a sparse folder (scope
    "contacts", many deletions) made a line longer than Dovecot takes (64 KB: BAD), so every incremental sync of
    the folder failed. It asks in chunks now."""
    for n in range(3):
        mailstack.deliver(recruiter, make_message("c@example.org", recruiter, f"m{n}", "x"))
    endpoint = ImapEndpoint(
        host=mailstack.host, port=mailstack.imap_port, tls="starttls", ca_file=mailstack.ca_cert, timeout=10
    )
    session = connect(endpoint, username=recruiter, access_token=lambda: mailstack.access_token(recruiter))
    try:
        session.select("INBOX")
        sparse = list(range(100_001, 100_001 + 2 * 12_000, 2))  # "100001,100003,...": about 84 KB in one line
        assert session.existing_uids([1, 2, 3, *sparse]) == {1, 2, 3}
    finally:
        session.close()


def test_nil_items_in_a_fetch_reply_read_as_absent() -> None:
    """FETCH items may be NIL (an nstring): BODY[HEADER.FIELDS ...] NIL raised AttributeError and FLAGS NIL a
    TypeError, an internal error on every cycle at that message, so no folder after it synced."""
    header = _header_info(7, {b"FLAGS": None, b"INTERNALDATE": None, b"X-GM-LABELS": None}, header_fields(b""))
    assert (header.uid, header.flags, header.internaldate, header.gm_labels, header.message_id) == (
        7, (), None, None, None,
    )  # fmt: skip
    update = _flag_update(7, {b"FLAGS": None, b"MODSEQ": (12,)})
    assert (update.flags, update.gm_labels) == (None, None), "unknown, not 'no flags': kept as stored"


def raw_8bit(from_: str, to: str, subject: str, message_id: str) -> bytes:
    """A message whose header fields carry raw UTF-8 (no RFC 2047), as many mail clients write them."""
    return (
        f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
        "Date: Mon, 02 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "\r\nHallo\r\n"
    ).encode()


def test_an_8bit_message_id_gives_the_header_phase_the_identity_of_the_parsed_message(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """The header fields were read as Latin-1 and the parsed message as UTF-8: a raw UTF-8 Message-ID got
    "mid:cafÃ©..." in the header phase and "mid:café..." from the body, so the copy of a stored message in a second
    folder was downloaded and stored as a second row."""
    config = write_config(tmp_path, db_url, mailstack)
    connect_account(store, mailstack, recruiter)
    raw = raw_8bit("Zoë <zoe@example.org>", recruiter, "Bewerbung", "<café-1@example.org>")
    with mailstack.admin_imap(recruiter) as imap:
        imap.append("INBOX", raw)
    sync(config, store, recruiter)  # a first sync: the identity comes from the parsed body
    [stored] = rows(store, recruiter)
    assert stored.provider_message_id == "mid:café-1@example.org"
    with mailstack.admin_imap(recruiter) as imap:
        imap.append("Archive", raw)
    [result] = Runner(config, store, clock=SystemClock()).sync_once(only=recruiter)
    assert result.ok, result.reason
    assert (result.stats.new_messages, result.stats.remapped, result.stats.bytes_downloaded) == (0, 1, 0)
    [again] = rows(store, recruiter)
    assert again.id == stored.id
    assert again.labels == ["Archive", "INBOX"]


def test_an_8bit_address_of_a_contact_is_admitted_by_the_header_phase(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """scope = "contacts": a candidate whose address has a non-ASCII local part (RFC 6532), written raw in From;
    the header phase read it as Latin-1 and did not find the contact, so the mail was never stored."""
    config = write_config(tmp_path, db_url, mailstack, scope="contacts")
    connect_account(store, mailstack, recruiter)
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('jürgen@example.org')"))
    with mailstack.admin_imap(recruiter) as imap:
        imap.append("INBOX", raw_8bit("Jürgen <jürgen@example.org>", recruiter, "Bewerbung", "<j-1@example.org>"))
    sync(config, store, recruiter)
    assert [(r.subject, r.from_email) for r in rows(store, recruiter)] == [("Bewerbung", "jürgen@example.org")]


def test_a_first_sync_reports_its_progress_to_the_hr_app(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """mail_accounts.import_done / import_total: written while the first sync runs (the first report at once, with
    every folder's message count from STATUS, not only the first folder's; then at most every IMPORT_EVERY seconds),
    and the final numbers when it is over; a later sync leaves them as they are (the import is done). The listener
    that logs the client's commands (CONDSTORE, no QRESYNC) tells how many STATUS it took."""
    config = write_config(tmp_path, db_url, mailstack, host=mailstack.imap_host("no_qresync"))  # batches of 3
    connect_account(store, mailstack, recruiter)
    with mailstack.admin_imap(recruiter) as imap:
        imap.multiappend("INBOX", [make_message(f"c{i}@example.org", recruiter, f"m{i}", "x") for i in range(7)])
        imap.multiappend("Archive", [make_message(f"a{i}@example.org", recruiter, f"a{i}", "x") for i in range(2)])
    writes: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("UPDATE mail_accounts") and "import_done" in statement:
            writes.append(statement)

    reports: list[tuple[int, int]] = []
    before = len(mailstack.imap_commands(recruiter))
    sa.event.listen(store.engine, "before_cursor_execute", seen)
    [result] = Runner(config, store, clock=SystemClock()).sync_once(
        only=recruiter, progress=lambda _email, done, total: reports.append((done, total))
    )
    sa.event.remove(store.engine, "before_cursor_execute", seen)
    assert result.ok, result
    sent = [c.split(" ", 1)[0].upper() for c in mailstack.imap_commands(recruiter)[before:]]
    assert sent.count("STATUS") == result.stats.folders, "one STATUS per folder: the estimate's is planned from"
    assert reports[0] == (0, 9), "the whole mailbox from the first report"
    assert reports[-1] == (9, 9)
    assert _import(store, recruiter) == (9, 9)
    assert len(writes) == 2, "the first report at once, then nothing for 5 s, then the final numbers"
    mailstack.deliver(recruiter, make_message("late@example.org", recruiter, "later", "x"))
    sync(config, store, recruiter)
    assert len(rows(store, recruiter)) == 10
    assert _import(store, recruiter) == (9, 9)


def test_an_import_resumed_after_an_interruption_continues_its_progress(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """A first sync stopped after three batches (the daemon's stop, or this node losing the lease) finished INBOX
    and left Archive half imported; the next attempt resumes from the folders' cursors. Its progress is of the whole
    import: from its first report it counts the 7 messages the first attempt processed (INBOX's 4 by its cursor and
    STATUS, Archive's 3 asked of the server), of the 9 of the mailbox, where the HR app's bar jumped back to 0 of 2
    (what was left of Archive). What the HR app reads, from before the first write to the end, never goes back."""
    config = write_config(tmp_path, db_url, mailstack, host=mailstack.imap_host("no_qresync"))  # batches of 3
    connect_account(store, mailstack, recruiter)
    with mailstack.admin_imap(recruiter) as imap:
        imap.multiappend("INBOX", [make_message(f"c{i}@example.org", recruiter, f"m{i}", "x") for i in range(4)])
        imap.multiappend("Archive", [make_message(f"a{i}@example.org", recruiter, f"a{i}", "x") for i in range(5)])
    runner = Runner(config, store, clock=EveryReportWritten())
    hr_app_read: list[tuple[int | None, int | None]] = []  # the row, read before each write
    first: list[tuple[int, int]] = []

    def stopped_in_archive(_email: str, done: int, total: int) -> None:
        hr_app_read.append(_import(store, recruiter))
        first.append((done, total))
        if done >= 7:
            runner.interrupt()

    [stopped] = runner.sync_once(only=recruiter, progress=stopped_in_archive)
    assert stopped.reason == "interrupted", stopped
    assert first == [(0, 9), (3, 9), (4, 9), (7, 9)]
    assert len(rows(store, recruiter)) == 7, "INBOX and Archive's first batch stored, then the sync stopped"
    second: list[tuple[int, int]] = []

    def resumed(_email: str, done: int, total: int) -> None:
        hr_app_read.append(_import(store, recruiter))
        second.append((done, total))

    [result] = runner.sync_once(only=recruiter, progress=resumed)
    assert result.ok, result
    assert result.stats.new_messages == 2, "resumed from the cursors"
    assert second == [(7, 9), (9, 9)], "from what the first attempt processed, of the whole mailbox"
    hr_app_read.append(_import(store, recruiter))
    seen = hr_app_read[1:]
    assert hr_app_read[0] == (None, None) and seen[-1] == (9, 9)
    assert all(total == 9 for _, total in seen), seen
    assert [done for done, _ in seen] == sorted(done for done, _ in seen), f"never back: {seen}"


def _import(store: Store, email: str) -> tuple[int | None, int | None]:
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT import_done, import_total FROM mail_accounts WHERE email = :e"), {"e": email}
        ).one()
    return row.import_done, row.import_total
