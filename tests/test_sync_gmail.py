"""Gmail's dialect against the Gmail-dialect server (tests/gmail/) over a real socket with real imapclient and
XOAUTH2 tokens from the local OAuth server, on SQLite and PostgreSQL: All Mail only, X-GM-MSGID identity,
X-GM-THRID threads, normalized X-GM-LABELS, CHANGEDSINCE, departures, UIDVALIDITY re-map and the quota/throttle/
session faults Gmail really produces."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog

from gmail.model import GOOGLE_MAIL_DE_NAMES
from gmail.server import GmailServer, IntrospectValidator
from harness import MailStack, make_message
from harness.clocks import EveryReportWritten
from harness.config import write_gmail_config
from inboxd.clock import SystemClock
from inboxd.config import Config, load_config
from inboxd.gmail import ALL_MAIL_HIDDEN
from inboxd.imap import ImapEndpoint, connect, parse_vanished, uid_set_chunks
from inboxd.models import MailFolder, MailMessage, MailThread
from inboxd.runner import AccountResult, Runner
from inboxd.store import Credential, Store

pytestmark = pytest.mark.mailstack

messages_t = MailMessage.__table__  # type: ignore[attr-defined]
threads_t = MailThread.__table__  # type: ignore[attr-defined]
folders_t = MailFolder.__table__  # type: ignore[attr-defined]


def gmail_config(
    tmp_path: Path, db_url: str, stack: MailStack, server: GmailServer, *, sync: str = "", scope: str = "all"
) -> Config:
    return load_config(write_gmail_config(tmp_path, db_url, stack, server, scope=scope, sync_extra=sync), env={})


@pytest.fixture
def recruiter(mailstack: MailStack, store: Store) -> str:
    user = mailstack.new_user("rec")
    store.add_account(user, "gmail", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    return user


def rows(store: Store, email: str) -> list[sa.Row]:  # type: ignore[type-arg]
    account = store.account(email)
    assert account is not None
    with store.engine.connect() as conn:
        return list(
            conn.execute(sa.select(messages_t).where(messages_t.c.account_id == account.id).order_by(messages_t.c.id))
        )


def run(config: Config, store: Store, email: str, **kwargs: object) -> AccountResult:
    [result] = Runner(config, store, clock=SystemClock(), **kwargs).sync_once(only=email)  # type: ignore[arg-type]
    return result


def application(recruiter: str, n: int = 1) -> bytes:
    return make_message(
        "Ana Candidate <ana@example.org>",
        recruiter,
        f"Application {n}",
        "My CV is attached.",
        message_id=f"<app-{n}-{recruiter}>",
    )


def test_all_mail_identity_labels_threads_and_direction(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """Only All Mail is synced; a message in INBOX and a user label is one row keyed by X-GM-MSGID with normalized
    labels; the recruiter's Gmail-filed reply is outbound and in the same X-GM-THRID thread."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    msgid = gmail_server.deliver(application(recruiter), labels=["\\Inbox", "\\Important", "Candidates/Backend"])
    reply = make_message(
        recruiter, "ana@example.org", "Re: Application 1", "Thanks!", in_reply_to=f"<app-1-{recruiter}>"
    )
    reply_id = gmail_server.deliver(reply, labels=["\\Sent"], user=recruiter, flags=["\\Seen"])
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    got = rows(store, recruiter)
    assert [r.provider_message_id for r in got] == [f"gm:{msgid}", f"gm:{reply_id}"]
    inbound, outbound = got
    assert inbound.labels == ["Candidates/Backend", "IMPORTANT", "INBOX"]
    assert outbound.labels == ["SENT"]
    assert (inbound.direction, outbound.direction) == ("inbound", "outbound")
    assert outbound.is_read and not inbound.is_read
    assert inbound.thread_id == outbound.thread_id
    with store.engine.connect() as conn:
        thread_key = conn.execute(sa.select(threads_t.c.provider_thread_id).where(threads_t.c.id == inbound.thread_id))
        assert thread_key.scalar() == f"gm:{gmail_server.message(msgid).gm_thrid}"
        folders = conn.execute(sa.select(folders_t.c.name, folders_t.c.special_use)).all()
    assert [tuple(f) for f in folders] == [("[Gmail]/All Mail", "\\All")]


def test_incremental_labels_flags_departures_and_no_change(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """CHANGEDSINCE brings label and flag changes; a trashed message gets deleted_at and comes back when restored;
    a sync with nothing changed sends one STATUS and nothing else after login."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    first = gmail_server.deliver(application(recruiter, 1))
    second = gmail_server.deliver(application(recruiter, 2))
    assert run(config, store, recruiter).ok
    gmail_server.add_labels(first, "Shortlist")
    gmail_server.set_flags(first, add=["\\Seen"])
    gmail_server.trash(second)
    assert run(config, store, recruiter).ok
    got = {r.provider_message_id: r for r in rows(store, recruiter)}
    assert got[f"gm:{first}"].labels == ["INBOX", "Shortlist"]
    assert got[f"gm:{first}"].is_read
    assert got[f"gm:{second}"].deleted_at is not None, "trashed: left All Mail"
    gmail_server.remove_labels(second, "\\Trash")
    gmail_server.add_labels(second, "\\Inbox")
    bytes_before = gmail_server.body_bytes_sent(recruiter)
    assert run(config, store, recruiter).ok
    restored = {r.provider_message_id: r for r in rows(store, recruiter)}[f"gm:{second}"]
    assert restored.deleted_at is None
    fetched = gmail_server.body_bytes_sent(recruiter) - bytes_before
    assert fetched < len(gmail_server.message(second).raw), "restored by X-GM-MSGID (headers only), not downloaded"
    assert len(rows(store, recruiter)) == 2

    before = len(gmail_server.commands(recruiter))
    result = run(config, store, recruiter)
    assert result.stats.folders_unchanged == 1
    after_login = [c for c in gmail_server.commands(recruiter)[before:] if c not in {"CAPABILITY", "ID", "ENABLE"}]
    assert after_login == ["STARTTLS", "AUTHENTICATE", "LIST", "STATUS", "LOGOUT"] or after_login[-3:] == [
        "LIST",
        "STATUS",
        "LOGOUT",
    ], after_login


def test_uidvalidity_change_remaps_by_gm_msgid_without_bodies(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    for n in range(4):
        gmail_server.deliver(application(recruiter, n))
    assert run(config, store, recruiter).ok
    ids = [r.id for r in rows(store, recruiter)]
    gmail_server.bump_uidvalidity(recruiter, "\\All", first_uid=100)
    bytes_before = gmail_server.body_bytes_sent(recruiter)
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert (result.stats.remapped, result.stats.new_messages) == (4, 0)
    assert result.stats.bytes_downloaded == 0
    total = sum(len(gmail_server.message(int(r.provider_message_id[3:])).raw) for r in rows(store, recruiter))
    assert gmail_server.body_bytes_sent(recruiter) - bytes_before < total / 2, "header fields only, no bodies"
    assert [r.id for r in rows(store, recruiter)] == ids


def test_throttled_replies_slow_down_per_command(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    gmail_server.deliver(application(recruiter))
    slept: list[float] = []
    gmail_server.throttle(10, user=recruiter)  # login-time replies count too; the rest hit sync commands
    result = run(config, store, recruiter, sleep=slept.append)
    assert result.ok, result.reason
    assert len(slept) >= 3
    # a further [THROTTLED] reply doubles the wait; an unthrottled one starts again from 0.25 s
    assert slept[0] == 0.25
    assert all(b in (0.25, min(2 * a, 30.0)) for a, b in itertools.pairwise(slept)), slept
    assert max(slept) >= 1.0
    assert len(rows(store, recruiter)) == 1


def test_overquota_pauses_the_account_then_resumes(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """[OVERQUOTA]: state error with the reason and retry_at; no IMAP at all until then; then it syncs again."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server, sync='quota_pause = "2s"')
    gmail_server.deliver(application(recruiter))
    gmail_server.overquota(recruiter)
    result = run(config, store, recruiter)
    assert not result.ok
    account = store.account(recruiter)
    assert account is not None
    assert account.state == "error"
    assert account.retry_at is not None
    assert "quota" in (account.state_reason or "")
    gmail_server.overquota(recruiter, enabled=False)
    before = len(gmail_server.commands(recruiter))
    skipped = run(config, store, recruiter)
    assert not skipped.ok
    assert skipped.skipped
    assert len(gmail_server.commands(recruiter)) == before, "no IMAP while paused"
    time.sleep(2.1)
    resumed = run(config, store, recruiter)
    assert resumed.ok, resumed.reason
    account = store.account(recruiter)
    assert account is not None
    assert (account.state, account.retry_at) == ("active", None)
    assert len(rows(store, recruiter)) == 1


def test_session_expired_bye_reconnects_silently(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    for n in range(5):
        gmail_server.deliver(application(recruiter, n))
    gmail_server.bye_after(6, user=recruiter)
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert len(rows(store, recruiter)) == 5
    account = store.account(recruiter)
    assert account is not None
    assert account.state == "active"


@pytest.mark.parametrize(
    ("fault", "state", "reason_part"),
    [
        ("hidden_all_mail", "error", "Show in IMAP"),
        ("imap_disabled", "error", "not enabled for IMAP"),
        ("too_many_connections", "active", "Too many simultaneous connections"),
    ],
)
def test_account_faults_are_reported_and_isolated(
    store: Store,
    db_url: str,
    tmp_path: Path,
    mailstack: MailStack,
    gmail_server: GmailServer,
    recruiter: str,
    fault: str,
    state: str,
    reason_part: str,
) -> None:
    """All Mail hidden and IMAP disabled need an admin (state error with an actionable reason); too many connections
    is transient (stays active, last_error set). Another account on the same server syncs regardless."""
    other = mailstack.new_user("other")
    store.add_account(other, "gmail", Credential("oauth2_refresh", mailstack.refresh_token(other)))
    gmail_server.deliver(application(other))
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    if fault == "hidden_all_mail":
        gmail_server.hide_all_mail(recruiter)
    elif fault == "imap_disabled":
        gmail_server.imap_disabled(recruiter)
    else:
        gmail_server.too_many_connections(0, user=recruiter)
    results = {r.email: r for r in Runner(config, store, clock=SystemClock()).sync_once()}
    assert not results[recruiter].ok
    assert results[other].ok
    account = store.account(recruiter)
    assert account is not None
    assert account.state == state
    assert reason_part.lower() in (account.last_error or "").lower()
    if fault == "hidden_all_mail":
        assert account.state_reason == ALL_MAIL_HIDDEN


@pytest.mark.parametrize(
    ("fault", "reason_part"),
    [("login_unavailable", "[UNAVAILABLE]"), ("login_bye", "connection lost during login")],
)
def test_a_server_failing_the_login_is_retried_not_reauthorized(
    store: Store,
    db_url: str,
    tmp_path: Path,
    mailstack: MailStack,
    gmail_server: GmailServer,
    recruiter: str,
    fault: str,
    reason_part: str,
) -> None:
    """Gmail answering a login "NO [UNAVAILABLE] Temporary System Problem", or a connection closed with a BYE during
    it, says nothing of the grant: the account stays active with the reason and syncs once the server is back. It
    became needs_reauth (imapclient reports every failed login as LoginError), which waits for the recruiter to
    connect the mailbox again; a Gmail outage would have done that to every account at once."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    gmail_server.deliver(application(recruiter))
    getattr(gmail_server, fault)(times=10)  # every login of this sync, the reconnect's included
    result = run(config, store, recruiter)
    assert not result.ok
    account = store.account(recruiter)
    assert account is not None
    assert account.state == "active", account.state_reason
    assert reason_part.lower() in (account.last_error or "").lower(), account.last_error
    gmail_server.clear_faults()
    with store.engine.begin() as conn:  # the backoff is over
        conn.execute(sa.text("UPDATE mail_accounts SET retry_at = NULL"))
    resumed = run(config, store, recruiter)
    assert resumed.ok, resumed.reason
    assert len(rows(store, recruiter)) == 1


def test_a_message_gmail_cannot_fetch_holds_up_only_itself(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """Gmail ends a FETCH with "NO Some messages could not be FETCHed" when one message of the set cannot be served,
    after sending the others. The others are stored and the sync succeeds; the one missing holds the cursor
    (fetched again by the next syncs) until it comes. The whole FETCH failed before: no message of the batch was
    stored, in every sync, for as long as Gmail could not serve that one."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    ids = [gmail_server.deliver(application(recruiter, n)) for n in range(3)]
    gmail_server.unfetchable(ids[1])
    first = run(config, store, recruiter)
    assert first.ok, first.reason
    assert [r.provider_message_id for r in rows(store, recruiter)] == [f"gm:{ids[0]}", f"gm:{ids[2]}"]
    gmail_server.unfetchable(ids[1], on=False)
    again = run(config, store, recruiter)
    assert again.ok, again.reason
    assert sorted(r.provider_message_id for r in rows(store, recruiter)) == sorted(f"gm:{i}" for i in ids)


def test_the_expunge_check_asks_for_a_dense_range_in_one_search(
    mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """Gmail has no QRESYNC: every sync of All Mail with new mail asks which stored UIDs still exist. That was one
    SEARCH per 2,000 UIDs (150 round trips at every push for 300,000 messages); a dense range is one short line."""
    for n in range(3):
        gmail_server.deliver(application(recruiter, n))
    endpoint = ImapEndpoint(
        host="127.0.0.1", port=gmail_server.imap_port, tls="starttls", ca_file=mailstack.ca_cert, timeout=10
    )
    session = connect(endpoint, username=recruiter, access_token=lambda: mailstack.access_token(recruiter))
    try:
        session.select("[Gmail]/All Mail")
        before = gmail_server.commands(recruiter).count("UID SEARCH")
        uids = set(gmail_server.folder(recruiter, "\\All").uids)
        assert len(uids) == 3 and max(uids) < 300_000
        assert session.existing_uids(range(1, 300_001)) == uids
        assert gmail_server.commands(recruiter).count("UID SEARCH") - before == 1
    finally:
        session.close()


def test_uid_set_chunks_cover_the_uids_within_the_line_limit() -> None:
    sparse = range(1, 40_000, 2)
    chunks = uid_set_chunks(sparse, 1000)
    assert all(len(c) <= 1000 for c in chunks) and len(chunks) > 1
    assert sorted(uid for c in chunks for uid in parse_vanished(c)) == list(sparse)
    assert uid_set_chunks(range(1, 300_001), 1000) == ["1:300000"]
    assert uid_set_chunks([], 1000) == []


def test_contacts_scope_and_backfill_on_gmail(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """scope = "contacts" on Gmail: header first (private mail's body never downloaded); a contact added later is
    found with X-GM-RAW and backfilled."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server, scope="contacts")
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('ana@example.org')"))
    gmail_server.deliver(application(recruiter))
    private = make_message("bank@example.org", recruiter, "statement", "secret " * 500)
    gmail_server.deliver(private)
    late = make_message("Late <late@example.org>", recruiter, "older application", "x")
    gmail_server.deliver(late)
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert [r.subject for r in rows(store, recruiter)] == ["Application 1"]
    assert gmail_server.body_bytes_sent(recruiter) < len(private), "private bodies never fetched"
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('late@example.org')"))
    before = len(gmail_server.commands(recruiter))
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert result.stats.backfilled == 1
    assert sorted(r.subject for r in rows(store, recruiter)) == ["Application 1", "older application"]
    # the mailbox itself did not change (one STATUS): the older message was found by the server-side search
    assert "UID SEARCH" in gmail_server.commands(recruiter)[before:]
    assert result.stats.folders_unchanged == 1


def test_a_backfilled_message_whose_body_did_not_come_is_fetched_by_a_later_sync(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """A new contact's older mail is searched for once per account; a message found whose body did not come
    (the server's reply lacked it) was lost for good: the backfill holds no cursor, and the contact was recorded
    as searched anyway. The contact is searched again until every message found came."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server, scope="contacts")
    first = gmail_server.deliver(make_message("Late <late@example.org>", recruiter, "older application", "x"))
    second = gmail_server.deliver(make_message("Late <late@example.org>", recruiter, "certificates", "y"))
    assert run(config, store, recruiter).ok
    assert rows(store, recruiter) == []
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('late@example.org')"))
    gmail_server.withhold_body(second)
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert [r.provider_message_id for r in rows(store, recruiter)] == [f"gm:{first}"]
    gmail_server.withhold_body(second, withheld=False)
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert result.stats.backfilled == 1
    assert [r.provider_message_id for r in rows(store, recruiter)] == [f"gm:{first}", f"gm:{second}"]
    assert run(config, store, recruiter).stats.backfilled == 0, "searched for until complete, then no more"


@pytest.mark.parametrize("scope", ["all", "contacts"])
def test_drafts_in_all_mail_are_not_stored(
    store: Store,
    db_url: str,
    tmp_path: Path,
    mailstack: MailStack,
    gmail_server: GmailServer,
    recruiter: str,
    scope: str,
) -> None:
    """All Mail holds the recruiter's drafts (\\Draft flag, "\\Draft" label). One addressed to a candidate was stored
    as outbound mail, as if sent, and every autosave (a new message in Gmail) added a row. Drafts are left out,
    in a first sync (bodies first) and after it (header first); the mail once sent is stored."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server, scope=scope)
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('ana@example.org')"))
    gmail_server.deliver(application(recruiter))

    def draft(text: str) -> bytes:
        return make_message(recruiter, "ana@example.org", "Re: Application 1", text, in_reply_to=f"<app-1-{recruiter}>")

    first = gmail_server.deliver(draft("Dear Ana, we"), labels=["\\Draft"], user=recruiter)
    assert "\\Draft" in gmail_server.message(first).flags
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert [r.subject for r in rows(store, recruiter)] == ["Application 1"]
    gmail_server.delete_forever(first)  # an autosave: Gmail replaces the draft with a new message
    gmail_server.deliver(draft("Dear Ana, we would like to invite you"), labels=["\\Draft"], user=recruiter)
    assert run(config, store, recruiter).ok
    assert [r.subject for r in rows(store, recruiter)] == ["Application 1"]
    gmail_server.deliver(draft("Dear Ana, we would like to invite you."), labels=["\\Sent"], user=recruiter)
    assert run(config, store, recruiter).ok
    got = rows(store, recruiter)
    assert [(r.subject, r.direction) for r in got] == [("Application 1", "inbound"), ("Re: Application 1", "outbound")]


def test_an_import_resumed_on_gmail_continues_its_progress(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """Gmail's one folder, All Mail, left half imported by a first sync stopped after two batches: the next attempt
    goes on from its cursor, and its progress from the 6 messages processed of the 8 in All Mail (a draft among
    them: processed, not stored; a count of the stored messages would say 5), where it started again at 0 of 2.
    What the HR app reads never goes back."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)  # batches of 3
    for n in range(1, 5):
        gmail_server.deliver(application(recruiter, n))
    gmail_server.deliver(
        make_message(recruiter, "ana@example.org", "Re: Application 1", "Dear Ana, we"),
        labels=["\\Draft"],
        user=recruiter,
    )
    for n in range(5, 8):
        gmail_server.deliver(application(recruiter, n))
    runner = Runner(config, store, clock=EveryReportWritten())
    hr_app_read: list[tuple[int | None, int | None]] = []  # the row, read before each write
    reports: list[list[tuple[int, int]]] = [[], []]

    def attempt(n: int) -> Callable[[str, int, int], None]:
        def report(_email: str, done: int, total: int) -> None:
            hr_app_read.append(import_progress(store, recruiter))
            reports[n].append((done, total))
            if n == 0 and done >= 6:
                runner.interrupt()

        return report

    [stopped] = runner.sync_once(only=recruiter, progress=attempt(0))
    assert stopped.reason == "interrupted", stopped
    assert reports[0][-1] == (6, 8)
    assert len(rows(store, recruiter)) == 5, "two batches, the draft left out"
    [result] = runner.sync_once(only=recruiter, progress=attempt(1))
    assert result.ok, result.reason
    assert (result.stats.new_messages, len(rows(store, recruiter))) == (2, 7)
    assert reports[1] == [(6, 8), (8, 8)], "from what the first attempt processed, of the whole of All Mail"
    hr_app_read.append(import_progress(store, recruiter))
    seen = hr_app_read[1:]
    assert hr_app_read[0] == (None, None) and seen[-1] == (8, 8)
    assert all(total == 8 for _, total in seen), seen
    assert [done for done, _ in seen] == sorted(done for done, _ in seen), f"never back: {seen}"


def import_progress(store: Store, email: str) -> tuple[int | None, int | None]:
    """mail_accounts.import_done / import_total, as the HR app reads them."""
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT import_done, import_total FROM mail_accounts WHERE email = :e"), {"e": email}
        ).one()
    return row.import_done, row.import_total


def test_localized_gmail_folders_are_found_by_special_use(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """A German "[Google Mail]/Alle Nachrichten" is All Mail because of its \\All attribute, not its name; the
    client identifies itself with ID as Gmail asks."""
    tls = (mailstack.root / "tls" / "cert.pem", mailstack.root / "tls" / "key.pem")
    validator = IntrospectValidator(f"{mailstack.oauth_url}/introspect")
    with GmailServer(tls=tls, validator=validator, names=GOOGLE_MAIL_DE_NAMES) as server:
        config = gmail_config(tmp_path, db_url, mailstack, server)
        server.deliver(application(recruiter), labels=["\\Inbox", "Bewerbungen/Übersicht"])
        result = run(config, store, recruiter)
        assert result.ok, result.reason
        [row] = rows(store, recruiter)
        assert row.labels == ["Bewerbungen/Übersicht", "INBOX"], "user labels decoded from modified UTF-7"
        assert "ID" in server.commands(recruiter)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(folders_t.c.name)).scalars().all() == ["[Google Mail]/Alle Nachrichten"]


def test_exclusions_hold_on_gmail(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """A candidate's message under the excluded Gmail label "Private" is never stored, nor internal mail with an
    employee who is also in mail_contacts; the candidate's other mail is."""
    config = gmail_config(
        tmp_path,
        db_url,
        mailstack,
        gmail_server,
        scope="contacts",
        sync='exclude_labels = ["Private"]\nexclude_addresses = ["@corp.example"]',
    )
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO mail_contacts (email) VALUES ('ana@example.org'), ('boss@corp.example')"))
    gmail_server.deliver(application(recruiter, 1))
    gmail_server.deliver(application(recruiter, 2), labels=["\\Inbox", "Private"])
    gmail_server.deliver(make_message("boss@corp.example", recruiter, "salaries", "internal"))
    result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert [r.subject for r in rows(store, recruiter)] == ["Application 1"]


@pytest.fixture
def new_york_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time zone is New York's (UTC-5 in November) for the test."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_received_at_is_the_internaldate_in_utc_whatever_the_hosts_time_zone(
    store: Store,
    db_url: str,
    tmp_path: Path,
    mailstack: MailStack,
    gmail_server: GmailServer,
    recruiter: str,
    new_york_time: None,
) -> None:
    """INTERNALDATE carries its own zone. imapclient's default (normalise_times) turns it into a naive local time,
    which was then taken for UTC: on a host whose TZ is not UTC every received_at was off by the host's offset."""
    assert time.localtime(0).tm_gmtoff != 0, "the test needs a local time zone other than UTC"
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    utc = datetime(2026, 11, 25, 10, 0, 5, tzinfo=UTC)
    kolkata = datetime(2026, 11, 25, 15, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))  # 10:00 UTC
    gmail_server.deliver(application(recruiter, 1), internaldate=utc)
    gmail_server.deliver(application(recruiter, 2), internaldate=kolkata)
    run(config, store, recruiter)
    received = [row.received_at for row in rows(store, recruiter)]
    assert received == [utc, datetime(2026, 11, 25, 10, 0, tzinfo=UTC)]


def test_a_folder_name_that_is_not_modified_utf7_is_left_out_not_the_account(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """A server that lists a label as raw "R&D" (modified UTF-7 says "R&-D") failed imapclient's decoding of the
    whole LIST, and so every sync of the account. The unreadable name is left out and logged; the rest syncs."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    gmail_server.deliver(application(recruiter), labels=["\\Inbox"])
    gmail_server.deliver(application(recruiter, 2), labels=["R&D"])
    gmail_server.raw_folder_names(recruiter)
    with structlog.testing.capture_logs() as logs:
        result = run(config, store, recruiter)
    assert result.ok, result.reason
    assert len(rows(store, recruiter)) == 2, "All Mail, found all the same, holds both"
    [event] = [e for e in logs if e["event"] == "imap.folder_names_unreadable"]
    assert event["folders"] == 1 and event["names"] == ["R&D"]


def test_a_folder_name_in_raw_utf8_is_left_out_not_taken_for_another_name(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """A server that lists "Bewerbungen/Müller" in raw UTF-8 (8-bit bytes, which modified UTF-7 never has): imapclient
    decoded it without a word into "Bewerbungen/MÃ¼ller", a name the server does not know, refused at every SELECT.
    It is left out and logged, as a name with a raw "&" is."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    gmail_server.deliver(application(recruiter), labels=["\\Inbox", "Bewerbungen/Müller"])
    gmail_server.raw_folder_names(recruiter)
    with structlog.testing.capture_logs() as logs:
        result = run(config, store, recruiter)
    assert result.ok, result.reason
    [event] = [e for e in logs if e["event"] == "imap.folder_names_unreadable"]
    assert event["folders"] == 1 and event["names"] == ["Bewerbungen/Müller"]
    with store.engine.connect() as conn:
        names = conn.execute(sa.select(folders_t.c.name)).scalars().all()
    assert not any("Ã" in name for name in names), names
