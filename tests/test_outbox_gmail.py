"""The outbox against the Gmail-dialect server, on SQLite and PostgreSQL: Gmail files sent mail itself (inboxd never
APPENDs), a connection lost after DATA is resolved by finding the Message-ID in All Mail (no second delivery), the
daily sending limit pauses the account's rows, and the sent row is adopted by the next sync instead of duplicated."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gmail.server import GmailServer
from harness import MailStack, make_message
from harness.config import write_gmail_config
from harness.outbox import make_outbox, outbox_row
from inboxd.blobs import BlobStore
from inboxd.clock import FakeClock, SystemClock
from inboxd.config import Config, load_config
from inboxd.models import MailMessage, MailOutbox
from inboxd.outbox_policy import RetryPolicy
from inboxd.runner import Runner
from inboxd.store import Credential, Store

pytestmark = pytest.mark.mailstack
outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]


def gmail_config(tmp_path: Path, db_url: str, stack: MailStack, server: GmailServer) -> Config:
    return load_config(write_gmail_config(tmp_path, db_url, stack, server), env={})


def queue(store: Store, account_email: str, key: str, **values: Any) -> int:
    account = store.account(account_email)
    assert account is not None
    row = {"account_id": account.id, "subject": "Offer", "body_text": "Welcome!", "idempotency_key": key, **values}
    with store.engine.begin() as conn:
        return int(conn.execute(outbox_t.insert().values(**row).returning(outbox_t.c.id)).scalar_one())


@pytest.fixture
def recruiter(mailstack: MailStack, store: Store) -> str:
    user = mailstack.new_user("rec")
    store.add_account(user, "gmail", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    return user


def _copies(server: GmailServer, user: str, message_id: str) -> int:
    with server.store.lock:
        return len(server.account(user).by_message_id(message_id))


def test_gmail_files_sent_mail_itself_and_the_sync_adopts_the_row(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    candidate = mailstack.new_user("cand")
    application = gmail_server.deliver(
        make_message(candidate, recruiter, "Application", "cv", message_id="<gm-app@example.test>")
    )
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok
    with store.engine.connect() as conn:
        app_row = conn.execute(sa.select(messages_t.c.id, messages_t.c.thread_id)).one()
    row_id = queue(store, recruiter, "k1", to=[candidate], reply_to_message_id=app_row.id)
    [report] = make_outbox(config, store).drain()
    assert report.status == "sent", report
    row = outbox_row(store, row_id)
    assert "APPEND" not in gmail_server.commands(recruiter), "Gmail files sent mail in Sent itself"
    assert _copies(gmail_server, recruiter, row.message_id_header) == 1
    assert _copies(gmail_server, candidate, row.message_id_header) == 1
    sent_info = gmail_server.message(gmail_server.smtp_sent(recruiter)[0])
    assert sent_info.gm_thrid == gmail_server.message(application).gm_thrid, "Gmail threads our reply"
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(messages_t).order_by(messages_t.c.id)).all()
    assert len(rows) == 2, "the synced Sent copy merged into the row stored at send time"
    sent_row = rows[1]
    assert sent_row.id == row.sent_message_id
    assert sent_row.provider_message_id == f"gm:{sent_info.gm_msgid}"
    assert sent_row.direction == "outbound"
    assert sent_row.thread_id == app_row.thread_id
    assert "SENT" in sent_row.labels


def test_lost_connection_after_data_is_resolved_by_the_sent_copy_not_a_resend(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "once", to=[candidate])
    gmail_server.drop_after_data()
    clock = FakeClock(SystemClock().now())
    [first] = make_outbox(config, store, clock).drain()
    assert first.status == "queued"
    assert "uncertain" in outbox_row(store, row_id).last_error
    clock.advance(3600)
    [second] = make_outbox(config, store, clock).drain()
    assert second.status == "sent"
    row = outbox_row(store, row_id)
    assert (row.status, row.attempts) == ("sent", 2)
    assert len(gmail_server.smtp_sent(recruiter)) == 1, "one SMTP delivery in all"
    assert _copies(gmail_server, candidate, row.message_id_header) == 1


def test_a_sent_mail_the_sync_stored_before_the_retry_found_it_is_stored_once(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """After an uncertain attempt the retry comes 5 minutes later at the earliest; a sync in between stores Gmail's
    copy as gm:<X-GM-MSGID>. The retry finds the mail in All Mail and links the row to that message: it stored a
    second row under mid:<Message-ID>, in a thread of its own, that no later sync merged."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "synced-first", to=[candidate])
    gmail_server.drop_after_data()
    clock = FakeClock(SystemClock().now())
    assert [r.status for r in make_outbox(config, store, clock).drain()] == ["queued"]
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok  # stores Gmail's copy of the sent mail
    clock.advance(3600)
    assert [r.status for r in make_outbox(config, store, clock).drain()] == ["sent"]
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok
    row = outbox_row(store, row_id)
    [sent_gm_msgid] = gmail_server.smtp_sent(recruiter)
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(messages_t.c.id, messages_t.c.provider_message_id)).all()
    assert [tuple(m) for m in stored] == [(row.sent_message_id, f"gm:{sent_gm_msgid}")], "one row, the row's link"


def test_a_possible_delivery_is_not_sent_again_when_all_mail_is_hidden_from_imap(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """With All Mail hidden from IMAP (Gmail's "Show in IMAP" unticked) the Sent copy cannot be searched for: that
    proves nothing, and the row fails as uncertain instead of being sent a second time."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "hidden", to=[candidate])
    gmail_server.drop_after_data()
    gmail_server.hide_all_mail(recruiter)
    clock = FakeClock(SystemClock().now())
    assert [r.status for r in make_outbox(config, store, clock).drain()] == ["queued"]
    clock.advance(3600)
    [second] = make_outbox(config, store, clock).drain()
    row = outbox_row(store, row_id)
    assert (second.status, row.status) == ("failed", "failed")
    assert "delivery uncertain" in row.last_error and "no Sent folder" in row.last_error
    assert len(gmail_server.smtp_sent(recruiter)) == 1, "one SMTP delivery in all"
    assert not row.delivery_uncertain, "a final row"


def test_a_delivered_row_is_sent_even_when_it_no_longer_builds(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """After an attempt that may have delivered, Sent is searched by the Message-ID before the row is built again:
    its attachment file deleted meanwhile failed the row ("no stored bytes") although the mail had gone out.
    The row is sent; the sync stores the server's copy."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    candidate = mailstack.new_user("cand")
    cv = b"%PDF-1.4 the offer letter"
    sha = hashlib.sha256(cv).hexdigest()
    blobs = BlobStore(config.sync.attachments_dir)
    blobs.put(sha, cv)
    row_id = queue(store, recruiter, "gone", to=[candidate], attachments=[{"sha256": sha, "filename": "offer.pdf"}])
    gmail_server.drop_after_data()
    clock = FakeClock(SystemClock().now())
    assert [r.status for r in make_outbox(config, store, clock).drain()] == ["queued"]
    blobs.path(sha).unlink()  # the HR app deleted the file meanwhile
    clock.advance(3600)
    [second] = make_outbox(config, store, clock).drain()
    row = outbox_row(store, row_id)
    assert (second.status, row.status, row.last_error) == ("sent", "sent", None)
    assert len(gmail_server.smtp_sent(recruiter)) == 1, "one SMTP delivery in all"
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(messages_t.c.message_id_header, messages_t.c.direction)).all()
    assert [(m, d) for m, d in stored] == [(row.message_id_header.strip("<>"), "outbound")], "the sync stored it"


def test_daily_sending_limit_defers_the_accounts_rows_a_day(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    first = queue(store, recruiter, "a", to=["x@example.test"])
    second = queue(store, recruiter, "b", to=["y@example.test"])
    gmail_server.daily_limit(recruiter)
    clock = FakeClock(SystemClock().now())
    reports = make_outbox(config, store, clock).drain()
    assert [r.status for r in reports] == ["queued"], "the second row is deferred, not attempted"
    for row_id in (first, second):
        row = outbox_row(store, row_id)
        assert row.status == "queued"
        assert row.next_attempt_at >= clock.now() + RetryPolicy().daily_limit_pause
        assert "5.4.5" in row.last_error


def test_new_conversation_from_the_outbox_threads_with_the_candidates_reply(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, gmail_server: GmailServer, recruiter: str
) -> None:
    """A first message sent from the HR app (no reply_to) is stored at once; when the sync adopts it, it joins
    Gmail's X-GM-THRID thread, so the candidate's reply lands in the same thread."""
    config = gmail_config(tmp_path, db_url, mailstack, gmail_server)
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "first", to=[candidate], subject="Interview invitation")
    assert [r.status for r in make_outbox(config, store).drain()] == ["sent"]
    row = outbox_row(store, row_id)
    gmail_server.deliver(
        make_message(candidate, recruiter, "Re: Interview invitation", "Yes!", in_reply_to=row.message_id_header),
        user=recruiter,
    )
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok
    with store.engine.connect() as conn:
        got = conn.execute(sa.select(messages_t.c.id, messages_t.c.thread_id, messages_t.c.direction)).all()
    assert len(got) == 2
    assert len({r.thread_id for r in got}) == 1, got
