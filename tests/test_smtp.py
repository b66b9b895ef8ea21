"""inboxd.smtp: the aiosmtplib adapter against the real Postfix submission service (XOAUTH2 checked by Dovecot),
with faults injected by a TCP proxy at exact points of the dialogue; plus the pure reply rules.

What the proxy proves: a connection lost after the server's final reply to DATA is SendAmbiguous and the message
WAS delivered (so a blind retry would send it twice); a connection lost before the 354 is SendTemporary and a
retry delivers exactly one copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
import structlog

from harness import MailStack, make_message, wait_for
from harness.smtp_proxy import SmtpFaultProxy
from inboxd.errors import AccountFailed, ReauthRequired, RetryLater
from inboxd.mime import Draft, OutgoingAttachment, ReplyContext, build_message, envelope_recipients, make_message_id
from inboxd.parse import ParsedMessage, parse_message
from inboxd.smtp import (
    AioSmtpSender,
    SendAmbiguous,
    SendDailyLimit,
    SendRejected,
    SendResult,
    SendTemporary,
    SmtpEndpoint,
    classify_auth_failure,
    classify_reply,
    enhanced_status,
)

T = TypeVar("T")
pytestmark = pytest.mark.mailstack
ADMIN_USER, ADMIN_PASSWORD = "admin@example.test", "adminpass"  # the stack's PLAIN user


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, then a collection: a socket the sender left open fails the test that leaked it (ResourceWarning
    under filterwarnings=error), not whichever test the garbage collector happens to run in."""
    try:
        return asyncio.run(coro)
    finally:
        gc.collect()


class Tokens:
    """A TokenSource stand-in that hands out real tokens from the stack's OAuth server (or given bad ones first)."""

    def __init__(self, mailstack: MailStack, user: str, *, bad_first: int = 0) -> None:
        self.mailstack, self.user, self.bad_left = mailstack, user, bad_first
        self.issued: list[str] = []
        self.invalidated = 0

    def access_token(self) -> str:
        if self.bad_left:
            self.bad_left -= 1
            token = f"revoked-{len(self.issued)}-not-a-token"
        else:
            token = self.mailstack.access_token(self.user)
        self.issued.append(token)
        return token

    def invalidate(self) -> None:
        self.invalidated += 1


def sender_for(
    mailstack: MailStack,
    user: str,
    *,
    tokens: Tokens | None = None,
    tls: str = "starttls",
    port: int | None = None,
    ca: bool = True,
    timeout: float = 10.0,
    final_reply_timeout: float | None = None,
) -> AioSmtpSender:
    endpoint = SmtpEndpoint(
        host=mailstack.host,
        port=port or mailstack.submission_port,
        tls=tls,
        ca_file=mailstack.ca_cert if ca else None,
        timeout=timeout,
        final_reply_timeout=final_reply_timeout,
    )
    tokens = tokens or Tokens(mailstack, user)
    return AioSmtpSender(endpoint, username=user, access_token=tokens.access_token, invalidate_token=tokens.invalidate)


def message_for(sender: str, to: str, **changes: Any) -> tuple[Draft, bytes, str]:
    draft = Draft(
        from_email=sender,
        from_name="Anna Recruiter",
        to=(f"Jane Candidate <{to}>",),
        cc=(),
        bcc=(),
        subject="Interview on Monday",
        body_text="Hello Jane,\nsee you on Monday.\n",
        body_html=None,
    )
    draft = dataclasses.replace(draft, **changes)
    message_id = make_message_id("example.test")
    return draft, build_message(draft, message_id=message_id, date=datetime.now(UTC)), message_id


def delivered(mailstack: MailStack, user: str, message_id: str, *, timeout: float = 10.0) -> list[ParsedMessage]:
    """Every copy of ``message_id`` in ``user``'s INBOX, once at least one has arrived."""
    with mailstack.admin_imap(user) as imap:
        imap.select_folder("INBOX", readonly=True)

        def uids() -> list[int]:
            imap.noop()
            return list(imap.search(["HEADER", "Message-ID", message_id]))

        found = wait_for(uids, timeout, what=f"delivery of {message_id} to {user}")
        return [parse_message(data[b"BODY[]"]) for data in imap.fetch(found, ["BODY[]"]).values()]


def inbox_count(mailstack: MailStack, user: str, message_id: str) -> int:
    with mailstack.admin_imap(user) as imap:
        imap.select_folder("INBOX", readonly=True)
        return len(imap.search(["HEADER", "Message-ID", message_id]))


def send(sender: AioSmtpSender, envelope_from: str, recipients: list[str], raw: bytes) -> SendResult:
    return run(sender.send(sender=envelope_from, recipients=recipients, message=raw))


def send_via_proxy(
    mailstack: MailStack,
    user: str,
    recipients: list[str],
    raw: bytes,
    arm: Callable[[SmtpFaultProxy], None],
    *,
    tls: str = "plain",
    timeout: float = 10.0,
    final_reply_timeout: float | None = None,
    tokens: Tokens | None = None,
) -> tuple[SendResult | BaseException, list[str]]:
    """Send through a fault proxy (plain SMTP on loopback: the proxy must read the dialogue); return the result or
    the exception raised, and the proxy's events."""

    async def go() -> tuple[SendResult | BaseException, list[str]]:
        async with SmtpFaultProxy(mailstack.host, mailstack.submission_port) as proxy:
            arm(proxy)
            sender = sender_for(
                mailstack,
                user,
                tls=tls,
                port=proxy.port,
                timeout=timeout,
                final_reply_timeout=final_reply_timeout,
                tokens=tokens,
            )
            try:
                result: SendResult | BaseException = await sender.send(sender=user, recipients=recipients, message=raw)
            except Exception as exc:
                result = exc
            return result, proxy.events

    return run(go())


# --- through Postfix --------------------------------------------------------------------------------


def test_starttls_xoauth2_send_is_delivered_with_headers_threading_bodies_and_attachment(
    mailstack: MailStack,
) -> None:
    user, to, cc, bcc = (mailstack.new_user(p) for p in ("sender", "to", "cc", "bcc"))
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 64
    reply = ReplyContext(message_id_header="parent@cand.example", references=("root@cand.example",), subject="Hi")
    draft, raw, message_id = message_for(
        user,
        to,
        cc=(f"Carl Cc <{cc}>",),
        bcc=(bcc,),
        subject="Grüße zum Interview",
        body_text=None,
        # lines that need SMTP dot-stuffing must arrive intact
        body_html="<p>Hallo Jane</p><pre>.\n.leading dot\n..two</pre>",
        attachments=(OutgoingAttachment("Lebenslauf Müller.pdf", "application/pdf", pdf),),
        reply_to_message=reply,
    )
    tokens = Tokens(mailstack, user)
    result = send(sender_for(mailstack, user, tokens=tokens), user, envelope_recipients(draft), raw)

    assert result.accepted == (to, cc, bcc)
    assert result.refused == {}
    assert "queued as" in result.reply
    assert (len(tokens.issued), tokens.invalidated) == (1, 0)
    [got] = delivered(mailstack, to, message_id)
    assert got.message_id_header == message_id.strip("<>")
    assert got.subject == "Re: Grüße zum Interview"
    assert (got.from_email, got.from_name) == (user, "Anna Recruiter")
    assert got.in_reply_to == "parent@cand.example"
    assert got.references == ("root@cand.example", "parent@cand.example")
    assert {(p.role, p.email) for p in got.participants} == {("from", user), ("to", to), ("cc", cc)}
    assert got.body_text == "Hallo Jane\n\n.\n.leading dot\n..two\n"
    assert got.body_html is not None and ".leading dot\n..two" in got.body_html
    assert [(a.filename, a.content_type, a.data) for a in got.attachments] == [
        ("Lebenslauf Müller.pdf", "application/pdf", pdf)
    ]
    # the Bcc recipient got it, and nobody can see that they did
    [blind] = delivered(mailstack, bcc, message_id)
    assert bcc not in {p.email for p in blind.participants}
    assert delivered(mailstack, cc, message_id)


def test_password_auth_sends_and_a_wrong_password_is_reauth_required(mailstack: MailStack) -> None:
    to = mailstack.new_user("to")
    endpoint = SmtpEndpoint(mailstack.host, mailstack.submission_port, "starttls", mailstack.ca_cert, 10.0)
    _, raw, message_id = message_for(ADMIN_USER, to)
    ok = AioSmtpSender(endpoint, username=ADMIN_USER, password=ADMIN_PASSWORD)
    assert send(ok, ADMIN_USER, [to], raw).accepted == (to,)
    assert delivered(mailstack, to, message_id)

    wrong = AioSmtpSender(endpoint, username=ADMIN_USER, password="wrong-secret-pw")
    with pytest.raises(ReauthRequired) as info:
        send(wrong, ADMIN_USER, [to], raw)
    assert "wrong-secret-pw" not in str(info.value)


def test_a_refused_token_is_retried_once_with_a_fresh_one(mailstack: MailStack) -> None:
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    tokens = Tokens(mailstack, user, bad_first=1)
    _, raw, message_id = message_for(user, to)
    assert send(sender_for(mailstack, user, tokens=tokens), user, [to], raw).accepted == (to,)
    assert (len(tokens.issued), tokens.invalidated) == (2, 1)
    assert delivered(mailstack, to, message_id)


def test_an_invalid_token_twice_is_reauth_required_and_never_shown(mailstack: MailStack) -> None:
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    tokens = Tokens(mailstack, user, bad_first=2)
    _, raw, _ = message_for(user, to)
    with structlog.testing.capture_logs() as logs, pytest.raises(ReauthRequired) as info:
        send(sender_for(mailstack, user, tokens=tokens), user, [to], raw)
    assert (len(tokens.issued), tokens.invalidated) == (2, 1)
    assert "535" in str(info.value) and "freshly issued" in str(info.value)
    shown = str(info.value) + repr(info.value.__cause__) + repr(logs)
    assert not any(token in shown for token in tokens.issued)


def test_a_revoked_real_token_is_reauth_required(mailstack: MailStack) -> None:
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    token = mailstack.access_token(user)
    mailstack.revoke(token)
    endpoint = SmtpEndpoint(mailstack.host, mailstack.submission_port, "starttls", mailstack.ca_cert, 10.0)
    sender = AioSmtpSender(endpoint, username=user, access_token=lambda: token)
    with pytest.raises(ReauthRequired):
        send(sender, user, [to], message_for(user, to)[1])


def test_token_source_errors_pass_through_unchanged(mailstack: MailStack) -> None:
    user = mailstack.new_user("sender")

    def unavailable() -> str:
        raise RetryLater("token endpoint down")

    endpoint = SmtpEndpoint(mailstack.host, mailstack.submission_port, "starttls", mailstack.ca_cert, 10.0)
    sender = AioSmtpSender(endpoint, username=user, access_token=unavailable)
    with pytest.raises(RetryLater, match="token endpoint down") as info:
        send(sender, user, [user], message_for(user, user)[1])
    assert type(info.value) is RetryLater


def test_some_recipients_refused_the_rest_get_the_message(mailstack: MailStack) -> None:
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    _, raw, message_id = message_for(user, to)
    # this Postfix refuses local-domain recipients at RCPT time (outbound relay is accepted, then bounced)
    result = send(sender_for(mailstack, user), user, [to, "nobody@localhost"], raw)
    assert result.accepted == (to,)
    assert list(result.refused) == ["nobody@localhost"]
    code, text = result.refused["nobody@localhost"]
    assert code == 550 and text.startswith("5.1.1")
    assert len(delivered(mailstack, to, message_id)) == 1


def test_all_recipients_refused_is_send_rejected_with_the_first_code(mailstack: MailStack) -> None:
    user = mailstack.new_user("sender")
    with pytest.raises(SendRejected) as info:
        send(sender_for(mailstack, user), user, ["a@localhost", "b@localhost"], message_for(user, "a@localhost")[1])
    assert info.value.code == 550
    assert info.value.text.startswith("5.1.1")
    assert "all 2 recipients refused" in str(info.value)
    assert not isinstance(info.value, RetryLater)


def test_tls_certificates_are_verified(mailstack: MailStack) -> None:
    user = mailstack.new_user("sender")
    sender = sender_for(mailstack, user, ca=False)  # the stack's self-signed CA is not trusted
    with pytest.raises(AccountFailed, match=r"TLS to 127\.0\.0\.1:11587 failed during STARTTLS: CERTIFICATE_VERIFY"):
        send(sender, user, [user], message_for(user, user)[1])


def test_nothing_listening_is_send_temporary() -> None:
    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        sender = AioSmtpSender(SmtpEndpoint("127.0.0.1", port, "plain", None, 5.0), username="u", password="p")
        await sender.send(sender="u@example.test", recipients=["v@example.test"], message=b"Subject: x\r\n\r\nx\r\n")

    with pytest.raises(SendTemporary) as info:
        run(go())
    assert info.value.code is None
    assert "while connecting" in str(info.value)


def test_plain_smtp_is_refused_to_anything_but_loopback() -> None:
    with pytest.raises(ValueError, match="only allowed to loopback"):
        SmtpEndpoint("smtp.gmail.com", 25, "plain", None, 5.0)
    with pytest.raises(ValueError, match="tls mode"):
        SmtpEndpoint("smtp.gmail.com", 25, "ssl", None, 5.0)
    SmtpEndpoint("localhost", 25, "plain", None, 5.0)


# --- faults injected by the proxy -------------------------------------------------------------------


def test_connection_cut_after_the_final_reply_to_data_is_ambiguous_and_the_message_was_delivered_once(
    mailstack: MailStack,
) -> None:
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    _, raw, message_id = message_for(user, to)
    result, events = send_via_proxy(mailstack, user, [to], raw, SmtpFaultProxy.cut_after_data_reply)
    assert events == ["cut after final reply 250"]
    assert isinstance(result, SendAmbiguous)
    assert result.phase == "message"
    assert "waiting for the final reply to DATA" in str(result) and "Sent folder" in str(result)
    assert len(delivered(mailstack, to, message_id)) == 1  # so a blind retry would have sent it twice


def test_no_final_reply_within_the_timeout_is_ambiguous(mailstack: MailStack) -> None:
    """The final reply's own timeout (5 minutes by default, RFC 5321; 1 s here) runs out: ambiguous."""
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    _, raw, message_id = message_for(user, to)
    started = time.monotonic()
    result, events = send_via_proxy(
        mailstack, user, [to], raw, SmtpFaultProxy.stall_after_data, timeout=1.0, final_reply_timeout=1.0
    )
    assert events == ["swallowed final reply 250"]
    assert isinstance(result, SendAmbiguous)
    assert time.monotonic() - started < 5
    assert len(delivered(mailstack, to, message_id)) == 1


def test_a_server_that_stops_reading_the_message_ends_the_send_as_ambiguous(mailstack: MailStack) -> None:
    """The final reply's 5 minutes are counted from when the message has left; a server that stops reading it
    (the socket buffers full, the writes not moving for `timeout`) ends the send there, as ambiguous, not after
    the 5 minutes of the final reply."""
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    big = make_message(user, to, "Offer", "x" * (24 * 1024 * 1024))  # more than loopback's socket buffers hold
    started = time.monotonic()
    result, events = send_via_proxy(mailstack, user, [to], big, SmtpFaultProxy.stop_reading_data, timeout=1.0)
    assert "stopped reading the message" in events
    assert isinstance(result, SendAmbiguous), result
    assert time.monotonic() - started < 30


def test_connection_lost_before_the_354_is_temporary_and_a_retry_delivers_exactly_once(mailstack: MailStack) -> None:
    user, to = mailstack.new_user("sender"), mailstack.new_user("to")
    _, raw, message_id = message_for(user, to)
    result, events = send_via_proxy(mailstack, user, [to], raw, SmtpFaultProxy.close_at_data)
    assert events == ["closed at DATA"]
    assert isinstance(result, SendTemporary)
    assert "at DATA (before the message was sent)" in str(result)
    assert not isinstance(result, SendAmbiguous)

    retried, _ = send_via_proxy(mailstack, user, [to], raw, lambda proxy: None)
    assert isinstance(retried, SendResult)
    assert len(delivered(mailstack, to, message_id)) == 1
    time.sleep(0.5)  # a stray first copy would have been queued long before the retry's copy arrived
    assert inbox_count(mailstack, to, message_id) == 1


def test_daily_sending_limit_is_its_own_rejection(mailstack: MailStack) -> None:
    user = mailstack.new_user("sender")
    result, events = send_via_proxy(
        mailstack,
        user,
        [user],
        message_for(user, user)[1],
        lambda proxy: proxy.answer(b"MAIL FROM", b"550-5.4.5 Daily user sending limit exceeded.\r\n550 5.4.5 more"),
    )
    assert events == ["answered MAIL with 550-5.4.5"]
    assert isinstance(result, SendDailyLimit)
    assert (result.code, enhanced_status(result.text)) == (550, "5.4.5")


def test_microsoft_smtp_auth_disabled_is_an_account_failure_for_the_admin(mailstack: MailStack) -> None:
    user = mailstack.new_user("sender")
    tokens = Tokens(mailstack, user)
    result, _ = send_via_proxy(
        mailstack,
        user,
        [user],
        message_for(user, user)[1],
        lambda proxy: proxy.answer(
            b"AUTH",
            b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        ),
        tokens=tokens,
    )
    assert isinstance(result, AccountFailed)
    assert "Authenticated SMTP" in str(result) and "5.7.139" in str(result)
    assert tokens.invalidated == 0  # a fresh token would not help


@pytest.mark.parametrize(
    ("command", "reply", "tls"),
    [
        (b"AUTH", b"454 4.7.0 Temporary authentication failure", "plain"),
        (b"MAIL FROM", b"421 4.7.0 Try again later, closing connection.", "plain"),
        (b"RCPT TO", b"452 4.5.3 Your message has too many recipients", "plain"),
        (b"DATA", b"451 4.3.0 Mail server temporarily rejected message.", "plain"),
        (b"STARTTLS", b"454 4.7.0 TLS not available due to local problem", "starttls"),
    ],
)
def test_4xx_replies_before_the_message_is_sent_are_temporary(
    mailstack: MailStack, command: bytes, reply: bytes, tls: str
) -> None:
    user = mailstack.new_user("sender")
    result, _ = send_via_proxy(
        mailstack, user, [user], message_for(user, user)[1], lambda p: p.answer(command, reply), tls=tls
    )
    assert isinstance(result, SendTemporary)
    assert result.code == int(reply[:3])


def test_a_5xx_reply_to_data_is_a_rejection(mailstack: MailStack) -> None:
    user = mailstack.new_user("sender")
    result, _ = send_via_proxy(
        mailstack, user, [user], message_for(user, user)[1], lambda p: p.answer(b"DATA", b"554 5.7.1 Spam detected")
    )
    assert isinstance(result, SendRejected)
    assert (result.code, result.text) == (554, "5.7.1 Spam detected")


# --- pure reply rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "phase", "expected"),
    [
        (550, "5.4.5 Daily user sending limit exceeded", "mail", SendDailyLimit),
        (550, "5.4.5 Daily user sending limit exceeded", "rcpt", SendDailyLimit),
        (550, "5.4.5 Daily user sending limit exceeded", "message", SendDailyLimit),
        (550, "5.1.1 No such user", "rcpt", SendRejected),
        (552, "5.3.4 Message size exceeds fixed limit", "message", SendRejected),
        (554, "5.7.0 Message rejected", "data", SendRejected),
        (553, "5.7.1 Sender address rejected: not owned by user", "mail", SendRejected),
        (421, "4.7.0 Try again later", "mail", SendTemporary),
        (451, "4.3.0 Temporary", "message", SendTemporary),
        (452, "4.2.2 Mailbox full", "rcpt", SendTemporary),
        (554, "5.7.1 go away", "connect", SendTemporary),  # not about this message: bounded retries decide
        (502, "5.5.1 Unrecognized command", "ehlo", SendTemporary),
        (500, "no enhanced code", "message", SendRejected),
    ],
)
def test_classify_reply(code: int, text: str, phase: Any, expected: type[Exception]) -> None:
    error = classify_reply(code, text, phase=phase, where="smtp.example:587")
    assert type(error) is expected
    assert text in str(error) and "smtp.example:587" in str(error)
    if isinstance(error, SendRejected | SendTemporary):
        assert (error.code, error.text) == (code, text)


@pytest.mark.parametrize(
    ("code", "text", "verdict"),
    [
        (535, "5.7.8 Username and Password not accepted", "retry_with_fresh_token"),
        (535, "5.7.3 Authentication unsuccessful", "retry_with_fresh_token"),
        (534, "5.7.9 Application-specific password required", "retry_with_fresh_token"),
        (535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled", "account"),
        (530, "5.7.0 Must issue a STARTTLS command first", "account"),
        (504, "5.7.4 Unrecognized authentication type", "account"),
        (454, "4.7.0 Too many login attempts, please try again later", "temporary"),
    ],
)
def test_classify_auth_failure(code: int, text: str, verdict: str) -> None:
    assert classify_auth_failure(code, text) == verdict


@pytest.mark.parametrize(
    ("text", "status"),
    [("5.4.5 Daily", "5.4.5"), ("  4.7.0 x", "4.7.0"), ("5.7.139 x", "5.7.139"), ("Ok", None), ("5.4.5000", None)],
)
def test_enhanced_status(text: str, status: str | None) -> None:
    assert enhanced_status(text) == status


def test_sender_needs_exactly_one_credential() -> None:
    endpoint = SmtpEndpoint("127.0.0.1", 25, "plain", None, 5.0)
    with pytest.raises(ValueError, match="exactly one"):
        AioSmtpSender(endpoint, username="u")
    with pytest.raises(ValueError, match="exactly one"):
        AioSmtpSender(endpoint, username="u", password="p", access_token=lambda: "t")
