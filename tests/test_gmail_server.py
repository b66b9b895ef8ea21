"""The Gmail-dialect test server (tests/gmail/) speaks Gmail's IMAP/SMTP as gmail-imap.md documents it, proven with
the real imapclient and aiosmtplib over loopback sockets and XOAUTH2 tokens from the stack's OAuth server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.message import EmailMessage

import aiosmtplib
import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from gmail.model import GOOGLE_MAIL_DE_NAMES
from gmail.server import GmailServer, IntrospectValidator
from harness import MailStack, make_message, wait_for

pytestmark = pytest.mark.mailstack

USER = "recruiter@example.test"
CANDIDATE = "Ann Applicant <ann@example.org>"


@contextmanager
def imap(server: GmailServer, mailstack: MailStack, user: str = USER) -> Iterator[IMAPClient]:
    """imapclient logged in with XOAUTH2 over the plain port."""
    client = IMAPClient("127.0.0.1", server.imap_port, ssl=False, timeout=5)
    try:
        client.oauth2_login(user, mailstack.access_token(user))
        yield client
    finally:
        client.shutdown()


class RawImap:
    """A line-level client for asserting Gmail's exact response lines."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        self.n = 0

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def readline(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def command(self, command: bytes) -> list[bytes]:
        """Send a tagged command; return every line up to and including the tagged reply (or EOF)."""
        self.n += 1
        tag = b"A%d" % self.n
        self.send(tag + b" " + command)
        lines = []
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def xoauth2(self, user: str, token: str) -> list[bytes]:
        sasl = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
        return self.command(b"AUTHENTICATE XOAUTH2 " + sasl)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(gmail_server: GmailServer) -> Iterator[RawImap]:
    client = RawImap(gmail_server.imap_port)
    yield client
    client.close()


def _msg(subject: str = "Interview", **kwargs: object) -> bytes:
    return make_message(CANDIDATE, USER, subject, "Hello", **kwargs)  # type: ignore[arg-type]


def test_capabilities_advertise_gmail_extensions_and_no_qresync_over_starttls(
    gmail_server: GmailServer, mailstack: MailStack
) -> None:
    """Pre-login: XOAUTH2 + STARTTLS; after STARTTLS and XOAUTH2 login: X-GM-EXT-1, CONDSTORE, but no QRESYNC and
    no COMPRESS (advertising an unimplemented COMPRESS would break a client that uses it)."""
    client = IMAPClient("127.0.0.1", gmail_server.imap_port, ssl=False, timeout=5)
    try:
        assert client.welcome.startswith(b"* OK Gimap ready")
        assert {b"AUTH=XOAUTH2", b"STARTTLS", b"X-GM-EXT-1"} <= set(client.capabilities())
        client.starttls(ssl.create_default_context(cafile=str(mailstack.ca_cert)))
        client.oauth2_login(USER, mailstack.access_token(USER))
        caps = set(client.capabilities())
        assert {b"X-GM-EXT-1", b"CONDSTORE", b"IDLE", b"MOVE", b"UIDPLUS", b"SPECIAL-USE", b"ESEARCH"} <= caps
        assert b"QRESYNC" not in caps
        assert b"COMPRESS=DEFLATE" not in caps
        assert client.id_({"name": "inboxd"})[0][:2] == (b"name", b"GImap")
    finally:
        client.shutdown()
    assert gmail_server.commands(USER)[:2] == ["AUTHENTICATE", "ID"]


def test_implicit_tls_port_accepts_xoauth2(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """imaps_port speaks TLS from the first byte, like imap.gmail.com:993."""
    context = ssl.create_default_context(cafile=str(mailstack.ca_cert))
    with IMAPClient("127.0.0.1", gmail_server.imaps_port, ssl=True, ssl_context=context, timeout=5) as client:
        client.oauth2_login(USER, mailstack.access_token(USER))
        assert client.select_folder("INBOX")[b"EXISTS"] == 0


def test_bad_token_gets_json_challenge_then_authenticationfailed(
    gmail_server: GmailServer, mailstack: MailStack, raw: RawImap
) -> None:
    """A bad XOAUTH2 token: a base64 JSON error continuation, the client's empty answer, then
    NO [AUTHENTICATIONFAILED]."""
    sasl = base64.b64encode(f"user={USER}\x01auth=Bearer not-a-token\x01\x01".encode())
    raw.send(b"A1 AUTHENTICATE XOAUTH2 " + sasl)
    challenge = raw.readline()
    assert challenge.startswith(b"+ ")
    assert base64.b64decode(challenge[2:]) == b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}'
    raw.send(b"")
    assert raw.readline() == b"A1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
    # a valid token of another user is refused too (introspection's email must match)
    sasl = base64.b64encode(
        f"user={USER}\x01auth=Bearer {mailstack.access_token('other@example.test')}\x01\x01".encode()
    )
    raw.send(b"A2 AUTHENTICATE XOAUTH2 " + sasl)
    assert raw.readline().startswith(b"+ ")
    raw.send(b"")
    assert raw.readline() == b"A2 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
    client = IMAPClient("127.0.0.1", gmail_server.imap_port, ssl=False, timeout=5)
    try:
        with pytest.raises(LoginError, match="AUTHENTICATIONFAILED"):
            client.oauth2_login(USER, "expired")
    finally:
        client.shutdown()


def test_login_with_password_map(mailstack: MailStack) -> None:
    """LOGIN works for users given a password; others get AUTHENTICATIONFAILED."""
    with GmailServer(passwords={"plain@example.test": "secret"}) as server:
        with IMAPClient("127.0.0.1", server.imap_port, ssl=False, timeout=5) as client:
            client.login("plain@example.test", "secret")
            assert client.select_folder("INBOX")[b"EXISTS"] == 0
        client = IMAPClient("127.0.0.1", server.imap_port, ssl=False, timeout=5)
        try:
            with pytest.raises(LoginError, match="AUTHENTICATIONFAILED"):
                client.login("plain@example.test", "wrong")
        finally:
            client.shutdown()


def test_list_shows_special_use_attributes(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """LIST: [Gmail] is \\Noselect; system folders carry SPECIAL-USE; user labels (nested, non-ASCII) are folders."""
    gmail_server.deliver(_msg(), labels=["\\Inbox", "Candidates", "work/project x", "Bewerbung/Müller"])
    with imap(gmail_server, mailstack) as client:
        folders = {name: set(flags) for flags, _, name in client.list_folders()}
        assert folders["[Gmail]"] == {b"\\HasChildren", b"\\Noselect"}
        specials = {
            flag: name for name, flags in folders.items() for flag in flags if flag not in (b"\\HasNoChildren",)
        }
        assert specials[b"\\All"] == "[Gmail]/All Mail"
        assert specials[b"\\Sent"] == "[Gmail]/Sent Mail"
        assert specials[b"\\Junk"] == "[Gmail]/Spam"
        assert specials[b"\\Trash"] == "[Gmail]/Trash"
        assert {b"\\Drafts", b"\\Important", b"\\Flagged"} <= set(specials)
        assert {"INBOX", "Candidates", "work", "work/project x", "Bewerbung/Müller"} <= set(folders)
        assert client.find_special_folder(b"\\All") == "[Gmail]/All Mail"
        xlist = {name: set(flags) for flags, _, name in client.xlist_folders()}
        assert b"\\AllMail" in xlist["[Gmail]/All Mail"]
        status = client.folder_status("Bewerbung/Müller", ["MESSAGES", "UIDNEXT", "UIDVALIDITY", "HIGHESTMODSEQ"])
        assert status[b"MESSAGES"] == 1


def test_localized_names_and_hidden_all_mail(mailstack: MailStack) -> None:
    """ "[Google Mail]/Alle Nachrichten" is found by \\All, not by name; hiding All Mail unlists it and SELECT fails."""
    validator = IntrospectValidator(f"{mailstack.oauth_url}/introspect")
    with GmailServer(names=GOOGLE_MAIL_DE_NAMES, validator=validator) as server:
        server.deliver(_msg())
        with imap(server, mailstack) as client:
            all_mail = client.find_special_folder(b"\\All")
            assert all_mail == "[Google Mail]/Alle Nachrichten"
            assert client.select_folder(all_mail, readonly=True)[b"EXISTS"] == 1
            server.hide_all_mail(USER)
            assert client.find_special_folder(b"\\All") is None
            with pytest.raises(IMAPClientError, match=r"NONEXISTENT"):
                client.select_folder(all_mail)


def test_delivered_message_has_own_uid_per_folder_and_one_msgid(
    gmail_server: GmailServer, mailstack: MailStack
) -> None:
    """INBOX and All Mail number the same message differently; X-GM-MSGID is the same; a reply joins the thread."""
    first = make_message(CANDIDATE, USER, "Application", "CV attached", message_id="<app-1@example.org>")
    gm1 = gmail_server.deliver(first)
    gm2 = gmail_server.deliver(_msg("Re: Application", in_reply_to="<app-1@example.org>"))
    assert gm1 > 10**17  # big unsigned 64-bit ids, as Gmail's
    with imap(gmail_server, mailstack) as client:
        client.select_folder("INBOX")
        inbox = client.fetch(client.search("ALL"), ["X-GM-MSGID", "X-GM-THRID"])
        client.select_folder("[Gmail]/All Mail")
        all_mail = client.fetch(client.search("ALL"), ["X-GM-MSGID", "X-GM-THRID"])
    assert set(inbox) != set(all_mail)
    by_msgid = {d[b"X-GM-MSGID"]: uid for uid, d in all_mail.items()}
    assert sorted(by_msgid) == sorted(d[b"X-GM-MSGID"] for d in inbox.values()) == [gm1, gm2]
    assert {d[b"X-GM-THRID"] for d in all_mail.values()} == {gm1}
    assert gmail_server.message(gm2).uids == {"INBOX": 2, "[Gmail]/All Mail": 1002}


def test_labels_full_in_all_mail_own_label_omitted_in_label_folders(
    gmail_server: GmailServer, mailstack: MailStack, raw: RawImap
) -> None:
    """X-GM-LABELS: system labels quoted with the backslash escaped on the wire, user labels in modified UTF-7; a
    label folder leaves out its own label, All Mail shows them all."""
    gmail_server.deliver(_msg(), labels=["\\Inbox", "\\Important", "work/project x", "Bewerbung/Müller"])
    raw.xoauth2(USER, mailstack.access_token(USER))
    raw.command(b'SELECT "[Gmail]/All Mail"')
    wire = raw.command(b"UID FETCH 1:* (X-GM-LABELS)")[0]
    assert wire == (
        b'* 1 FETCH (UID 1001 X-GM-LABELS ("\\\\Important" "\\\\Inbox" Bewerbung/M&APw-ller "work/project x"))'
    )
    with imap(gmail_server, mailstack) as client:
        client.select_folder("[Gmail]/All Mail")
        assert client.get_gmail_labels([1001]) == {
            1001: ["\\Important", "\\Inbox", "Bewerbung/Müller", "work/project x"]
        }
        client.select_folder("INBOX")
        assert client.get_gmail_labels([1]) == {1: ["\\Important", "Bewerbung/Müller", "work/project x"]}
        client.select_folder("Bewerbung/Müller")
        assert client.get_gmail_labels([1]) == {1: ["\\Important", "\\Inbox", "work/project x"]}
        client.select_folder("[Gmail]/Important")
        assert client.get_gmail_labels([1]) == {1: ["\\Inbox", "Bewerbung/Müller", "work/project x"]}


def test_gmail_search_and_x_gm_search_keys(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """imapclient.gmail_search (X-GM-RAW, also non-ASCII via CHARSET UTF-8 literal) and X-GM-MSGID/THRID/LABELS."""
    gm1 = gmail_server.deliver(
        make_message("Jürgen Groß <juergen@example.org>", USER, "Bewerbung Müller", "x", message_id="<m1@example.org>"),
        labels=["\\Inbox", "\\Important"],
    )
    gmail_server.deliver(_msg(message_id="<m2@example.org>", date=datetime(2026, 1, 5, tzinfo=UTC)))
    with imap(gmail_server, mailstack) as client:
        client.select_folder("[Gmail]/All Mail")
        assert client.gmail_search("from:juergen rfc822msgid:<m1@example.org>") == [1001]
        assert client.gmail_search("from:jürgen subject:müller") == [1001]
        assert client.gmail_search("from:ann@example.org rfc822msgid:m1@example.org") == []
        epoch = int(datetime(2026, 2, 1, tzinfo=UTC).timestamp())
        assert client.gmail_search(f"before:{epoch} in:anywhere") == [1002]
        assert client.gmail_search(f"after:{epoch}") == [1001]
        assert client.gmail_search("label:important -from:ann") == [1001]
        assert client.search(["X-GM-MSGID", gm1]) == [1001]
        assert client.search(["X-GM-THRID", gm1]) == [1001]
        assert client.search(["X-GM-LABELS", "\\Important"]) == [1001]
        assert client.search(["HEADER", "Message-ID", "<m2@example.org>"]) == [1002]
        assert client.search(["NOT", "FROM", "ann", "SINCE", datetime(2026, 1, 1).date()]) == [1001]


def test_changedsince_returns_only_changed_messages(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """CONDSTORE: HIGHESTMODSEQ moves on a flag or label change; FETCH (CHANGEDSINCE n) and SEARCH MODSEQ n return
    only what changed after n."""
    gms = [gmail_server.deliver(_msg(f"m{i}")) for i in range(3)]
    with imap(gmail_server, mailstack) as client:
        client.enable("CONDSTORE")
        before = client.select_folder("[Gmail]/All Mail")[b"HIGHESTMODSEQ"]
        gmail_server.set_flags(gms[1], add=["\\Seen"])
        gmail_server.add_labels(gms[2], "Candidates")
        status = client.folder_status("[Gmail]/All Mail", ["HIGHESTMODSEQ"])
        assert status[b"HIGHESTMODSEQ"] > before
        changed = client.fetch([1001, 1002, 1003], ["FLAGS", "X-GM-LABELS"], modifiers=[f"CHANGEDSINCE {before}"])
        assert sorted(changed) == [1002, 1003]
        assert changed[1002][b"FLAGS"] == (b"\\Seen",)
        assert (
            changed[1003][b"X-GM-LABELS"] == (b"Candidates", b"\\Inbox")
            or b"Candidates" in changed[1003][b"X-GM-LABELS"]
        )
        assert changed[1003][b"MODSEQ"][0] > before
        assert client.search(["MODSEQ", before + 1]) == [1002, 1003]


def test_uidvalidity_bump_renumbers_the_folder(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """bump_uidvalidity gives the folder a new UIDVALIDITY and new UIDs; X-GM-MSGID stays."""
    gm = gmail_server.deliver(_msg())
    gmail_server.deliver(_msg("second"))
    gmail_server.delete_forever(gm)
    with imap(gmail_server, mailstack) as client:
        old = client.folder_status("INBOX", ["UIDVALIDITY"])[b"UIDVALIDITY"]
        client.select_folder("INBOX")
        before = client.fetch([2], ["X-GM-MSGID"])
    new = gmail_server.bump_uidvalidity(USER, "INBOX")
    assert new == old + 1
    with imap(gmail_server, mailstack) as client:
        assert client.select_folder("INBOX")[b"UIDVALIDITY"] == new
        after = client.fetch(client.search("ALL"), ["X-GM-MSGID"])
    assert list(after) == [1]
    assert after[1][b"X-GM-MSGID"] == before[2][b"X-GM-MSGID"]


def test_store_copy_move_expunge_follow_gmail_label_semantics(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """COPY to a label folder adds the label; EXPUNGE in a label folder removes it; MOVE to Trash leaves All Mail;
    expunge in All Mail deletes for good; APPEND to a label folder labels the new message; STORE on labels."""
    gm = gmail_server.deliver(_msg())
    gone = gmail_server.deliver(_msg("spam me"))
    with imap(gmail_server, mailstack) as client:
        client.create_folder("Candidates")
        client.select_folder("INBOX")
        client.copy([1], "Candidates")
        assert "Candidates" in gmail_server.message(gm).labels
        client.add_gmail_labels([1], ["\\Starred", "Shortlist"])
        assert {"\\Starred", "Shortlist"} <= gmail_server.message(gm).labels
        assert "\\Flagged" in gmail_server.message(gm).flags
        client.select_folder("Candidates")
        client.delete_messages([1])
        client.expunge()
        assert "Candidates" not in gmail_server.message(gm).labels
        client.select_folder("INBOX")
        client.move([2], "[Gmail]/Trash")
        assert "[Gmail]/All Mail" not in gmail_server.message(gone).uids
        assert gmail_server.message(gone).uids == {"[Gmail]/Trash": 1}
        client.select_folder("[Gmail]/All Mail")
        client.delete_messages([1001])
        client.expunge()
        with pytest.raises(KeyError):
            gmail_server.message(gm)
        result = client.append("Candidates", _msg("appended"), flags=[b"\\Seen"])
        assert result.startswith(b"[APPENDUID ")
        appended = gmail_server.folder(USER, "Candidates").uids
        assert len(appended) == 1


def test_throttled_and_overquota_lines(gmail_server: GmailServer, mailstack: MailStack, raw: RawImap) -> None:
    """throttle(n): the next n tagged OKs carry [THROTTLED], appended as Gmail does; overquota(): commands answer
    NO [OVERQUOTA]."""
    raw.xoauth2(USER, mailstack.access_token(USER))
    gmail_server.throttle(2)
    assert raw.command(b"NOOP") == [b"A2 OK Success [THROTTLED]"]
    assert raw.command(b"NOOP") == [b"A3 OK Success [THROTTLED]"]
    assert raw.command(b"NOOP") == [b"A4 OK Success"]
    gmail_server.overquota(USER)
    assert raw.command(b"SELECT INBOX") == [
        b"A5 NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)"
    ]
    gmail_server.overquota(USER, enabled=False)
    assert raw.command(b"SELECT INBOX")[-1] == b"A6 OK [READ-WRITE] INBOX selected. (Success)"
    with imap(gmail_server, mailstack) as client:
        gmail_server.throttle(1, user=USER)
        assert client.noop()[0] == b"Success [THROTTLED]"


def test_bye_after_n_commands_closes_the_session(gmail_server: GmailServer, mailstack: MailStack, raw: RawImap) -> None:
    """bye_after(n): n more commands are answered, then "* BYE Session expired, please login again." and close."""
    raw.xoauth2(USER, mailstack.access_token(USER))
    gmail_server.bye_after(2)
    assert raw.command(b"NOOP") == [b"A2 OK Success"]
    assert raw.command(b"NOOP") == [b"A3 OK Success"]
    assert raw.readline() == b"* BYE Session expired, please login again."
    assert raw.readline() == b""
    wait_for(lambda: gmail_server.connections(USER) == 0, 2, what="session closed")
    with imap(gmail_server, mailstack) as client:
        client.select_folder("INBOX")
        gmail_server.bye_after(0)  # now: like an expiry while IDLE
        with pytest.raises(IMAPClientAbortError, match=r"Session expired, please login again\."):
            client.select_folder("INBOX")


def test_too_many_connections_and_imap_disabled(gmail_server: GmailServer, mailstack: MailStack, raw: RawImap) -> None:
    """Login beyond the concurrent-session limit and login to an IMAP-disabled account answer Gmail's [ALERT]s."""
    gmail_server.too_many_connections(1, user=USER)
    with imap(gmail_server, mailstack):
        assert gmail_server.connections(USER) == 1
        assert raw.xoauth2(USER, mailstack.access_token(USER)) == [
            b"A1 NO [ALERT] Too many simultaneous connections. (Failure)"
        ]
    gmail_server.imap_disabled("disabled@example.test")
    assert raw.xoauth2("disabled@example.test", mailstack.access_token("disabled@example.test")) == [
        b"A2 NO [ALERT] Your account is not enabled for IMAP use. Please visit your Gmail settings page and enable "
        b"your account for IMAP access. (Failure)"
    ]


def test_idle_gets_exists_on_delivery_and_fetch_on_label_change(
    gmail_server: GmailServer, mailstack: MailStack
) -> None:
    """IDLE: "+ idling"; a delivery pushes EXISTS, a label change pushes FETCH, a trashing pushes EXPUNGE."""
    gm = gmail_server.deliver(_msg())
    with imap(gmail_server, mailstack) as client:
        client.select_folder("INBOX")
        client.idle()
        gm2 = gmail_server.deliver(_msg("new"))
        responses = client.idle_check(timeout=5)
        assert (2, b"EXISTS") in responses
        gmail_server.add_labels(gm, "Candidates")
        responses = client.idle_check(timeout=5)
        assert responses[0][:2] == (1, b"FETCH")
        gmail_server.trash(gm2)
        responses = client.idle_check(timeout=5)
        assert (2, b"EXPUNGE") in responses
        text, _ = client.idle_done()
        assert text == b"IDLE terminated (Success)"
        assert client.search("ALL") == [1]


def test_counters_record_commands_body_bytes_and_connections(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """Per user: the command names, bytes of bodies sent, and open authenticated connections."""
    raw_message = _msg()
    gmail_server.deliver(raw_message)
    with imap(gmail_server, mailstack) as client:
        assert gmail_server.connections(USER) == 1
        client.select_folder("INBOX", readonly=True)
        client.fetch([1], ["BODY.PEEK[]", "FLAGS"])
    wait_for(lambda: gmail_server.connections(USER) == 0, 2, what="disconnect counted")
    assert gmail_server.commands(USER)[-2:] == ["EXAMINE", "UID FETCH"]
    assert gmail_server.body_bytes_sent(USER) == len(raw_message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def _smtp_message(to: str, from_: str = "someone-else@example.org") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Recruiter <{from_}>"
    msg["To"] = to
    msg["Subject"] = "Offer"
    msg["Message-ID"] = "<offer-1@example.test>"
    msg.set_content("We are happy to offer...")
    return msg


async def _closed(smtp: aiosmtplib.SMTP, sock: socket.socket) -> None:
    """Close the client and wait until its socket really is closed: aiosmtplib's close() only starts a TLS
    shutdown, and asyncio.run would otherwise end the loop first and leak the socket (a ResourceWarning)."""
    if smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException):
            await smtp.quit()
    smtp.close()
    for _ in range(200):
        if sock.fileno() == -1:
            return
        await asyncio.sleep(0.005)


async def _send(server: GmailServer, mailstack: MailStack, msg: EmailMessage) -> None:
    """Submit with aiosmtplib over STARTTLS (the server's certificate is the stack's) and XOAUTH2."""
    context = ssl.create_default_context(cafile=str(mailstack.ca_cert))
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.smtp_port, tls_context=context, timeout=5)
    await smtp.connect()
    sock = smtp.get_transport_info("socket")
    try:
        await smtp.auth_xoauth2(USER, mailstack.access_token(USER))
        await smtp.send_message(msg)
    finally:
        await _closed(smtp, sock)


def test_smtp_send_files_into_sent_with_rewritten_from(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """aiosmtplib over STARTTLS with XOAUTH2: the message lands in \\Sent (From rewritten to the user), and in the
    INBOX of a local recipient."""
    asyncio.run(_send(gmail_server, mailstack, _smtp_message("candidate@example.test")))
    [gm] = gmail_server.smtp_sent(USER)
    sent = gmail_server.message(gm)
    assert sent.labels == {"\\Sent"}
    assert b"From: Recruiter <recruiter@example.test>" in sent.raw
    assert list(sent.uids) == ["[Gmail]/All Mail", "[Gmail]/Sent Mail"]
    assert gmail_server.folder("candidate@example.test", "INBOX").uids == (1,)
    with imap(gmail_server, mailstack) as client:
        client.select_folder("[Gmail]/All Mail")
        assert client.get_gmail_labels(client.search(["X-GM-LABELS", "\\Sent"])) == {1001: ["\\Sent"]}


def test_smtp_faults(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """drop_after_data: connection closed without a reply, yet the message is filed; daily_limit: 550 5.4.5;
    temp_fail: 421 4.7.0; a bad token: 535 5.7.8."""
    gmail_server.drop_after_data()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        asyncio.run(_send(gmail_server, mailstack, _smtp_message("x@example.org")))
    assert len(gmail_server.smtp_sent(USER)) == 1
    assert gmail_server.folder(USER, "\\Sent").uids == (1,)
    gmail_server.daily_limit(USER)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        asyncio.run(_send(gmail_server, mailstack, _smtp_message("x@example.org")))
    assert refused.value.code == 550
    assert "5.4.5 Daily user sending limit exceeded." in refused.value.message
    gmail_server.daily_limit(USER, enabled=False)
    gmail_server.temp_fail()
    with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
        asyncio.run(_send(gmail_server, mailstack, _smtp_message("x@example.org")))
    assert failed.value.code == 421
    assert failed.value.message.startswith("4.7.0 Try again later")

    async def bad_token() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=gmail_server.smtp_port, start_tls=False, timeout=5)
        await smtp.connect()
        sock = smtp.get_transport_info("socket")
        try:
            await smtp.auth_xoauth2(USER, "bogus")
        finally:
            await _closed(smtp, sock)

    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as denied:
        asyncio.run(bad_token())
    assert denied.value.code == 535
    assert len(gmail_server.smtp_sent(USER)) == 1


def test_append_with_non_synchronizing_literal_and_date_then_close_expunges(
    gmail_server: GmailServer, mailstack: MailStack, raw: RawImap
) -> None:
    """APPEND with LITERAL- ({n+}), flags and INTERNALDATE into a label folder: APPENDUID, the label, the date;
    CLOSE expunges \\Deleted, which in a label folder only removes the label."""
    raw.xoauth2(USER, mailstack.access_token(USER))
    assert raw.command(b"CREATE Candidates")[-1] == b"A2 OK Success"
    message = _msg("appended")
    raw.send(b'A3 APPEND Candidates (\\Seen $Phishing) "05-Jan-2026 10:00:00 +0100" {%d+}' % len(message))
    raw.sock.sendall(message + b"\r\n")
    reply = raw.readline()
    folder = gmail_server.folder(USER, "Candidates")
    assert reply == b"A3 OK [APPENDUID %d 1] (Success)" % folder.uidvalidity
    all_mail_uid = gmail_server.folder(USER, "\\All").uids[0]
    raw.n = 3
    assert raw.command(b'EXAMINE "[Gmail]/All Mail"')[-1].endswith(b"[READ-ONLY] [Gmail]/All Mail selected. (Success)")
    fetched = raw.command(b"UID FETCH %d (FLAGS INTERNALDATE X-GM-LABELS)" % all_mail_uid)[0]
    assert fetched == (
        b'* 1 FETCH (UID 1001 FLAGS ($Phishing \\Seen) INTERNALDATE "05-Jan-2026 10:00:00 +0100" '
        b"X-GM-LABELS (Candidates))"
    )
    raw.command(b"SELECT Candidates")
    assert raw.command(b"STORE 1 +FLAGS.SILENT (\\Deleted)") == [b"A7 OK Success"]
    assert raw.command(b"CLOSE") == [b"A8 OK Returned to authenticated state. (Success)"]
    assert gmail_server.folder(USER, "Candidates").uids == ()
    assert gmail_server.folder(USER, "\\All").uids == (1001,)


def test_spam_and_self_send(gmail_server: GmailServer, mailstack: MailStack) -> None:
    """spam() moves a message out of INBOX and All Mail into Spam; mail sent to oneself is one message labelled
    \\Sent and \\Inbox, as in Gmail."""
    gm = gmail_server.deliver(_msg())
    gmail_server.spam(gm)
    assert gmail_server.message(gm).uids == {"[Gmail]/Spam": 1}
    asyncio.run(_send(gmail_server, mailstack, _smtp_message(USER, from_=USER)))
    [sent] = gmail_server.smtp_sent(USER)
    assert gmail_server.message(sent).labels == {"\\Sent", "\\Inbox"}
    assert set(gmail_server.message(sent).uids) == {"INBOX", "[Gmail]/All Mail", "[Gmail]/Sent Mail"}


def test_stop_with_idling_and_unauthenticated_clients_is_clean(mailstack: MailStack) -> None:
    """stop() ends sessions that are idling or not logged in without errors or warnings, and quickly."""
    server = GmailServer(passwords={USER: "pw"}).start()
    idler = IMAPClient("127.0.0.1", server.imap_port, ssl=False, timeout=5)
    idle_client = IMAPClient("127.0.0.1", server.imap_port, ssl=False, timeout=5)
    try:
        idler.login(USER, "pw")
        idler.select_folder("INBOX")
        idler.idle()
        server.stop()
        assert idler.idle_check(timeout=1) == []
    finally:
        idler.shutdown()
        idle_client.shutdown()
        server.stop()
