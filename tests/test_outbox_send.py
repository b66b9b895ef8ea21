"""The outbox end to end, on SQLite and PostgreSQL: rows the HR app inserts are sent through the recruiter's own
mailbox (Postfix submission with XOAUTH2 into Dovecot, or the Gmail-dialect server), read back over IMAP, threaded,
filed in Sent exactly once, stored at once; bad rows fail with a clear error and never reach SMTP; a connection cut
right after the server accepted the message never leads to a second delivery."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from harness import MailStack, make_message, wait_for
from harness.outbox import make_outbox, outbox_row
from harness.smtp_proxy import SmtpFaultProxy
from inboxd.blobs import BlobStore
from inboxd.clock import FakeClock, SystemClock
from inboxd.config import Config, load_config
from inboxd.errors import SecretsError
from inboxd.models import MailMessage, MailOutbox
from inboxd.outbox_policy import RetryPolicy
from inboxd.outbox_store import OutboxStore
from inboxd.runner import Runner
from inboxd.store import Credential, Store

pytestmark = pytest.mark.mailstack
outbox_t = MailOutbox.__table__  # type: ignore[attr-defined]
messages_t = MailMessage.__table__  # type: ignore[attr-defined]


def write_config(
    tmp_path: Path,
    db_url: str,
    stack: MailStack,
    *,
    kind: str = "imap",
    imap_port: int | None = None,
    smtp_port: int | None = None,
    smtp_tls: str = "starttls",
    extra: str = "",
) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "inboxd.toml"
    path.write_text(f"""
state_dir = "{tmp_path / "state"}"
[database]
url = "{db_url}"
[secrets]
key_file = "{tmp_path / "secret.key"}"
[sync]
scope = "all"
max_attachment_bytes = 1000
[providers.local]
kind = "{kind}"
imap_host = "127.0.0.1"
imap_port = {imap_port or stack.imap_port}
imap_tls = "starttls"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port or stack.submission_port}
smtp_tls = "{smtp_tls}"
auth = "oauth2"
token_uri = "{stack.token_uri}"
client_id = "{stack.client_id}"
client_secret = "{stack.client_secret}"
ca_file = "{stack.ca_cert}"
timeout = 5
{extra}
""")
    return load_config(path, env={})


def queue(store: Store, account_email: str, key: str, **values: Any) -> int:
    account = store.account(account_email)
    assert account is not None
    row = {"account_id": account.id, "to": [], "subject": "", "idempotency_key": key, **values}
    with store.engine.begin() as conn:
        return int(conn.execute(outbox_t.insert().values(**row).returning(outbox_t.c.id)).scalar_one())


def inbox(stack: MailStack, user: str, folder: str = "INBOX") -> list[Message]:
    with stack.admin_imap(user) as imap:
        imap.select_folder(folder, readonly=True)
        uids = imap.search(["ALL"])
        fetched = imap.fetch(uids, ["BODY.PEEK[]"]) if uids else {}
        return [message_from_bytes(d[b"BODY[]"]) for d in fetched.values()]


@pytest.fixture
def recruiter(mailstack: MailStack, store: Store) -> str:
    user = mailstack.new_user("rec")
    store.add_account(user, "local", Credential("oauth2_refresh", mailstack.refresh_token(user)))
    return user


def test_reply_with_attachment_is_delivered_threaded_filed_and_stored(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    config = write_config(
        tmp_path, db_url, mailstack, extra=f'[accounts."{recruiter}"]\ndisplay_name = "Rita Recruiter"'
    )
    candidate = mailstack.new_user("cand")
    mailstack.deliver(
        recruiter,
        make_message(f"Carl <{candidate}>", recruiter, "Application", "hi", message_id="<application@example.test>"),
    )
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok
    with store.engine.connect() as conn:
        application_id = conn.execute(sa.select(messages_t.c.id)).scalar_one()
    cv = b"%PDF-1.4 the cv"
    sha = hashlib.sha256(cv).hexdigest()
    BlobStore(config.sync.attachments_dir).put(sha, cv)
    row_id = queue(
        store,
        recruiter,
        "k1",
        to=[f"Carl Candidate <{candidate}>"],
        subject="",
        body_html="<p>Dear Carl, <b>thanks</b>! Café on Thursday?</p>",
        reply_to_message_id=application_id,
        attachments=[{"sha256": sha, "filename": "offer.pdf", "content_type": "application/pdf"}],
    )
    [report] = make_outbox(config, store).drain()
    assert report.status == "sent", report
    row = outbox_row(store, row_id)
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)
    [got] = inbox(mailstack, candidate)
    assert got["Message-ID"] == row.message_id_header
    assert got["Subject"] == "Re: Application"
    assert got["In-Reply-To"] == "<application@example.test>"
    assert "<application@example.test>" in got["References"]
    assert recruiter in got["From"] and "Rita Recruiter" in got["From"]
    parts = {p.get_content_type(): p for p in got.walk()}
    assert "Café" in parts["text/plain"].get_payload(decode=True).decode()
    assert parts["application/pdf"].get_payload(decode=True) == cv
    assert len(inbox(mailstack, recruiter, "Sent")) == 1, "a generic server gets exactly one Sent copy"
    with store.engine.connect() as conn:
        sent = conn.execute(sa.select(messages_t).where(messages_t.c.id == row.sent_message_id)).one()
        thread_of_application = conn.execute(
            sa.select(messages_t.c.thread_id).where(messages_t.c.id == application_id)
        ).scalar_one()
    assert sent.direction == "outbound"
    assert sent.thread_id == thread_of_application
    # the next sync finds the Sent copy and merges it into the same row
    assert Runner(config, store, clock=SystemClock()).sync_once()[0].ok
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(messages_t)).scalar_one() == 2
        labels = conn.execute(sa.select(messages_t.c.labels).where(messages_t.c.id == sent.id)).scalar_one()
    assert labels == ["Sent"]


@pytest.mark.parametrize(
    ("values", "error_part"),
    [
        ({"to": []}, "recipient"),
        ({"to": ["not-an-address"]}, "to[0]"),
        ({"to": ["a@example.test"], "subject": "hi\r\nBcc: victim@example.org"}, "subject"),
        ({"to": ["Evil\nName <a@example.test>"]}, "to[0]"),
        (
            {"to": ["a@example.test"], "attachments": [{"sha256": "0" * 64, "filename": "x.pdf"}]},
            "attachments[0]: no stored bytes",
        ),
        ({"to": ["a@example.test"], "attachments": [{"sha256": "0" * 64}]}, "attachments[0]: needs sha256"),
        ({"to": "a@example.test"}, "to: must be a JSON list"),
        ({"to": ["a@example.test"], "subject": "=?utf-8?q?hi=0D=0AReply-To:_x@evil.example?="}, "subject: contains an"),
        ({"to": ["a@example.test"], "subject": "Interview\u2028tomorrow"}, "subject: contains control characters"),
        (
            {"to": ["a@example.test"], "body_text": "x", "message_id_header": "<a@b.example>\r\nBcc: x@evil.example"},
            "message_id_header: ",
        ),
        (
            {"to": ["a@example.test"], "attachments": [{"sha256": "0" * 64, "filename": "x"}] * 101},
            "101 files, at most",
        ),
    ],
)
def test_bad_rows_fail_with_a_clear_error_and_never_reach_smtp(
    store: Store,
    db_url: str,
    tmp_path: Path,
    mailstack: MailStack,
    recruiter: str,
    values: dict[str, Any],
    error_part: str,
) -> None:
    config = write_config(tmp_path, db_url, mailstack, smtp_port=1)  # nothing listens there: SMTP is never used
    row_id = queue(store, recruiter, "bad", **values)
    good_id = queue(store, recruiter, "good", to=["a@example.test"], body_text="fine")
    reports = {r.row_id: r for r in make_outbox(config, store).drain()}
    bad = outbox_row(store, row_id)
    assert bad.status == "failed"
    assert error_part in (bad.last_error or ""), bad.last_error
    assert not re.match(r"([\w.\[\]]+): \1\b", bad.last_error or ""), "the field is named once"
    assert reports[good_id].status == "queued", "the good row was attempted (and hit the closed port)"
    assert "temporary" in (outbox_row(store, good_id).last_error or "")


@pytest.mark.parametrize("column", ["subject", "body_text", "body_html"])
def test_bytes_in_a_text_column_fail_their_row_naming_it(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str, column: str
) -> None:
    """SQLite keeps a BLOB the HR app writes into a text column as bytes (a number it stores as text): that failed
    deep in building the message, an internal error retried eight times. The row fails at once, naming the
    column. PostgreSQL stores text whatever it is given there: that row is sent (here: the closed port, retried)."""
    config = write_config(tmp_path, db_url, mailstack, smtp_port=1)
    row_id = queue(store, recruiter, "blob", to=["a@example.test"], body_text="x")
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(f'UPDATE mail_outbox SET "{column}" = :value WHERE id = :id'), {"value": b"Offer", "id": row_id}
        )
    [report] = make_outbox(config, store).drain()
    if store.engine.dialect.name == "postgresql":
        assert isinstance(getattr(outbox_row(store, row_id), column), str)
        assert report.status == "queued" and "temporary" in (outbox_row(store, row_id).last_error or "")
        return
    with store.engine.connect() as conn:
        status, last_error = conn.execute(
            sa.text("SELECT status, last_error FROM mail_outbox WHERE id = :id"), {"id": row_id}
        ).one()
    assert (report.status, status) == ("failed", "failed")
    assert last_error == f"{column}: must be text, not bytes"


def test_attachments_over_the_limit_in_all_fail_the_row_before_they_are_read(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """sync.max_attachment_bytes holds for each file and for the row's files together: one file under the limit
    named many times was read into memory and built into a message many times the limit."""
    config = write_config(tmp_path, db_url, mailstack, smtp_port=1)  # max_attachment_bytes = 1000
    part = b"y" * 400
    sha = hashlib.sha256(part).hexdigest()
    BlobStore(config.sync.attachments_dir).put(sha, part)
    files = [{"sha256": sha, "filename": f"part{i}.txt"} for i in range(3)]
    row_id = queue(store, recruiter, "three", to=["a@example.test"], body_text="x", attachments=files)
    two_id = queue(store, recruiter, "two", to=["a@example.test"], body_text="x", attachments=files[:2])
    make_outbox(config, store).drain()
    row = outbox_row(store, row_id)
    assert row.status == "failed"
    assert (
        row.last_error
        == "attachments: 1200 bytes in all, over the limit of 1000 (sync.max_attachment_bytes) for one message"
    )
    assert "temporary" in (outbox_row(store, two_id).last_error or ""), "two files (800 bytes) went on to SMTP"


def test_an_empty_message_id_gets_a_new_one(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    config = write_config(tmp_path, db_url, mailstack, smtp_port=1)
    row_id = queue(store, recruiter, "empty-id", to=["a@example.test"], body_text="x", message_id_header="")
    make_outbox(config, store).drain()
    row = outbox_row(store, row_id)
    assert row.message_id_header.startswith("<") and row.message_id_header.endswith(f"@{recruiter.split('@')[1]}>")
    assert "temporary" in (row.last_error or ""), "it went on to SMTP (a closed port here)"


@pytest.mark.parametrize(
    ("column", "text", "error"),
    [
        ("to", "not json", "to: not valid JSON"),
        ("cc", "{bad", "cc: not valid JSON"),
        ("attachments", "[{", "attachments: not valid JSON"),
        ("created_at", "1700000000x", "created_at: not a timestamp"),
        ("next_attempt_at", "soon", "next_attempt_at: not a timestamp"),
    ],
)
def test_a_value_that_cannot_be_read_fails_its_row_alone(
    store: Store,
    db_url: str,
    tmp_path: Path,
    mailstack: MailStack,
    recruiter: str,
    column: str,
    text: str,
    error: str,
) -> None:
    """SQLite keeps any text in a JSON or timestamp column. Such a row used to make every claim roll back: it came
    first again on every drain and no row of any account was sent, with no last_error. Now it fails naming the
    column, and the next row is sent. PostgreSQL refuses such values when the HR app writes them."""
    config = write_config(tmp_path, db_url, mailstack, smtp_port=1)
    bad_id = queue(store, recruiter, "bad", to=["a@example.test"], body_text="x")
    good_id = queue(store, recruiter, "good", to=["a@example.test"], body_text="fine")
    update = sa.text(f'UPDATE mail_outbox SET "{column}" = :text WHERE id = :id')
    if store.engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DataError), store.engine.begin() as conn:
            conn.execute(update, {"text": text, "id": bad_id})
        return
    with store.engine.begin() as conn:
        conn.execute(update, {"text": text, "id": bad_id})
    outbox = make_outbox(config, store)
    assert outbox.idle_wait() <= 0.05, "due now (the drain fails it); reading the retry time raised for 'soon'"
    reports = {r.row_id: r for r in outbox.drain()}
    with store.engine.connect() as conn:
        status, last_error = conn.execute(
            sa.text("SELECT status, last_error FROM mail_outbox WHERE id = :id"), {"id": bad_id}
        ).one()
    assert (status, last_error) == ("failed", f"{error} (" + last_error.split(" (", 1)[1])
    assert last_error.startswith(error)
    assert reports[good_id].status == "queued", "the next row was attempted (and hit the closed port)"


def test_oversize_attachment_and_paused_account(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """Attachments over sync.max_attachment_bytes fail the row; a paused account's rows are held, not attempted."""
    paused = mailstack.new_user("paused")
    store.add_account(paused, "local", Credential("oauth2_refresh", mailstack.refresh_token(paused)))
    config = write_config(
        tmp_path, db_url, mailstack, extra=f'[accounts."{paused}"]\npaused = true\nreason = "on leave"'
    )
    big = b"x" * 5000
    sha = hashlib.sha256(big).hexdigest()
    BlobStore(config.sync.attachments_dir).put(sha, big)
    big_id = queue(
        store,
        recruiter,
        "big",
        to=["a@example.test"],
        body_text="x",
        attachments=[{"sha256": sha, "filename": "big.bin"}],
    )
    held_id = queue(store, paused, "held", to=["a@example.test"], body_text="x")
    make_outbox(config, store).drain()
    assert outbox_row(store, big_id).status == "failed"
    assert "attachments[0]" in outbox_row(store, big_id).last_error
    held = outbox_row(store, held_id)
    assert (held.status, held.attempts) == ("queued", 0)
    assert "on leave" in held.last_error


class ThreadedProxy:
    """SmtpFaultProxy on its own event loop thread, so the outbox (which runs asyncio itself) can go through it."""

    def __init__(self, host: str, port: int) -> None:
        self.proxy = SmtpFaultProxy(host, port)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.proxy:
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> SmtpFaultProxy:
        self._thread.start()
        assert self._ready.wait(5)
        return self.proxy

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


@pytest.fixture
def cut_proxy(mailstack: MailStack) -> Iterator[SmtpFaultProxy]:
    with ThreadedProxy(mailstack.host, mailstack.submission_port) as proxy:
        yield proxy


def test_connection_cut_after_250_is_never_sent_twice_on_a_generic_server(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str, cut_proxy: SmtpFaultProxy
) -> None:
    """The server accepted the message but its 250 never arrived: the row is not retried blindly (a generic server
    keeps no Sent copy that could prove delivery), and the recipient has exactly one copy."""
    config = write_config(tmp_path, db_url, mailstack, smtp_port=cut_proxy.port, smtp_tls="plain")
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "once", to=[candidate], subject="Offer", body_text="x")
    clock = FakeClock(SystemClock().now())
    cut_proxy.cut_after_data_reply()
    [first] = make_outbox(config, store, clock).drain()
    assert first.status == "queued"
    assert "uncertain" in (outbox_row(store, row_id).last_error or "")
    clock.advance(3600)
    [second] = make_outbox(config, store, clock).drain()
    row = outbox_row(store, row_id)
    assert row.status == "failed"
    assert "delivery uncertain" in row.last_error
    assert second.status == "failed"
    wait_for(lambda: len(inbox(mailstack, candidate)) >= 1, timeout=10)
    assert len(inbox(mailstack, candidate)) == 1


def test_an_attempt_ends_before_another_worker_could_take_the_row_over(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str, cut_proxy: SmtpFaultProxy
) -> None:
    """A row in 'sending' longer than stale_after is taken over by another worker or node, which sends it too. Each
    SMTP step has its own timeout (the final reply may take 5 minutes, RFC 5321), so an attempt could outlive
    stale_after: the attempt's own deadline, 90% of stale_after from its claim, ends it, as uncertain when the
    message had gone (here the server's final reply never comes). The error names the deadline, not the SMTP
    timeout (5 s here, above the 3 s stale_after: the previous code ended the attempt with that)."""
    config = write_config(tmp_path, db_url, mailstack, smtp_port=cut_proxy.port, smtp_tls="plain")
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "slow", to=[candidate], subject="Offer", body_text="x")
    policy = RetryPolicy(stale_after=timedelta(seconds=3))
    cut_proxy.stall_after_data()
    [report] = make_outbox(config, store, FakeClock(SystemClock().now()), policy=policy).drain()
    row = outbox_row(store, row_id)
    assert (report.status, row.status, row.delivery_uncertain) == ("queued", "queued", True)
    assert row.last_error == "uncertain: the attempt took over 3 s after the message went"


def test_reply_to_another_accounts_message_fails(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """reply_to_message_id must name a message of the sending account: another recruiter's mail is refused."""
    config = write_config(tmp_path, db_url, mailstack, smtp_port=1)
    other = mailstack.new_user("other")
    store.add_account(other, "local", Credential("password", "x"))
    other_account = store.account(other)
    assert other_account is not None
    with store.engine.begin() as conn:
        foreign = conn.execute(
            messages_t.insert()
            .values(
                account_id=other_account.id,
                provider_message_id="mid:x@y",
                direction="inbound",
                created_at=SystemClock().now(),
                updated_at=SystemClock().now(),
            )
            .returning(messages_t.c.id)
        ).scalar_one()
    row_id = queue(store, recruiter, "foreign", to=["a@example.test"], body_text="x", reply_to_message_id=foreign)
    make_outbox(config, store).drain()
    row = outbox_row(store, row_id)
    assert row.status == "failed"
    assert row.last_error == f"reply_to_message_id: {foreign} is not a message of {recruiter}"


def test_a_crash_after_handing_over_is_not_resent_blindly(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """The process died after the row was marked "handing to SMTP" (delivery_uncertain): the reclaimed row is not
    sent again on a server that keeps no Sent copy to check."""
    config = write_config(tmp_path, db_url, mailstack)
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "crash", to=[candidate], subject="x", body_text="x")
    clock = FakeClock(SystemClock().now())
    crashed = OutboxStore(store.engine, clock=clock, policy=RetryPolicy())
    claimed = crashed.claim_next()
    assert claimed is not None
    crashed.mark_uncertain(claimed.id)  # ... and the process is killed here
    clock.advance(RetryPolicy().stale_after.total_seconds())
    [report] = make_outbox(config, store, clock).drain()
    row = outbox_row(store, row_id)
    assert (report.status, row.status) == ("failed", "failed")
    assert "delivery uncertain" in row.last_error
    assert inbox(mailstack, candidate) == []


def test_temporary_failure_then_hold_then_send_delivers_once(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str
) -> None:
    """A failure before the message was handed over leaves no doubt: after a hold (account paused meanwhile) the
    row is sent normally, once."""
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "t", to=[candidate], subject="x", body_text="x")
    clock = FakeClock(SystemClock().now())
    closed = write_config(tmp_path / "a", db_url, mailstack, smtp_port=1)
    assert [r.status for r in make_outbox(closed, store, clock).drain()] == ["queued"]
    clock.advance(3600)
    paused = write_config(tmp_path / "b", db_url, mailstack, extra=f'[accounts."{recruiter}"]\npaused = true')
    assert [r.status for r in make_outbox(paused, store, clock).drain()] == ["held"]
    clock.advance(3600)
    working = write_config(tmp_path / "c", db_url, mailstack)
    assert [r.status for r in make_outbox(working, store, clock).drain()] == ["sent"]
    assert outbox_row(store, row_id).attempts == 2
    assert len(inbox(mailstack, candidate)) == 1


def test_a_failure_before_the_message_went_out_leaves_no_doubt(
    store: Store, db_url: str, tmp_path: Path, mailstack: MailStack, recruiter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt that failed before the message reached SMTP (the credentials unreadable: a wrong secrets key; an
    unexpected error while the token was fetched, before DATA) is retried as a plain temporary failure. Before,
    the write-ahead mark stayed set, and on a server that keeps no Sent copy the next attempt failed the row as
    "delivery uncertain" although nothing had been sent. Then the row goes out, once."""
    config = write_config(tmp_path, db_url, mailstack)
    candidate = mailstack.new_user("cand")
    row_id = queue(store, recruiter, "pre", to=[candidate], subject="x", body_text="x")
    clock = FakeClock(SystemClock().now())

    def wrong_key(*args: object) -> None:
        raise SecretsError("the secrets key does not decrypt the stored credentials")

    with monkeypatch.context() as patch:
        patch.setattr("inboxd.connections.Connections.smtp", wrong_key)
        assert [r.status for r in make_outbox(config, store, clock).drain()] == ["queued"]
    row = outbox_row(store, row_id)
    assert row.last_error.startswith("temporary: ") and not row.delivery_uncertain

    def token_crash(self: object) -> str:
        raise RuntimeError("the token store's database went away")

    clock.advance(3600)
    with monkeypatch.context() as patch:
        patch.setattr("inboxd.tokens.CachedTokenSource.access_token", token_crash)
        assert [r.status for r in make_outbox(config, store, clock).drain()] == ["queued"]
    row = outbox_row(store, row_id)
    assert "internal error (RuntimeError)" in row.last_error and not row.delivery_uncertain
    assert inbox(mailstack, candidate) == []
    clock.advance(3600)
    assert [r.status for r in make_outbox(config, store, clock).drain()] == ["sent"]
    assert len(inbox(mailstack, candidate)) == 1
