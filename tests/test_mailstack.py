"""The test harness itself: the loopback stack behaves as the rest of the suite assumes."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest
from imapclient import IMAPClient

from harness import MailStack, make_message, wait_for

pytestmark = pytest.mark.mailstack


def _token_grant(mailstack: MailStack, refresh_token: str) -> tuple[int, dict[str, object]]:
    form = urllib.parse.urlencode(
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": mailstack.client_id,
            "client_secret": mailstack.client_secret,
        }
    ).encode()
    try:
        with urllib.request.urlopen(mailstack.token_uri, form, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


@pytest.mark.parametrize(
    ("variant", "condstore", "qresync"),
    [("full", True, True), ("no_qresync", True, False), ("no_condstore", False, False)],
)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "imaps"])
def test_xoauth2_login_sees_the_variants_capabilities(
    mailstack: MailStack, variant: str, condstore: bool, qresync: bool, tls: bool
) -> None:
    """Each listener accepts XOAUTH2 with a /token access token and advertises its own extension set."""
    user = mailstack.new_user()
    status, grant = _token_grant(mailstack, mailstack.refresh_token(user))
    assert status == 200
    assert grant["token_type"] == "Bearer"
    if tls:
        context = ssl.create_default_context(cafile=str(mailstack.ca_cert))
        imap = IMAPClient(mailstack.imap_host(variant), mailstack.imaps_port, ssl=True, ssl_context=context)
    else:
        imap = IMAPClient(mailstack.imap_host(variant), mailstack.imap_port, ssl=False)
    with imap:
        assert b"AUTH=XOAUTH2" in imap.capabilities()
        imap.oauth2_login(user, str(grant["access_token"]))
        caps = set(imap.capabilities())
        assert (b"CONDSTORE" in caps) is condstore
        assert (b"QRESYNC" in caps) is qresync
        assert {b"IDLE", b"MOVE", b"UIDPLUS", b"ENABLE", b"SPECIAL-USE"} <= caps
        assert imap.select_folder("INBOX")[b"EXISTS"] == 0


def test_variants_share_mailboxes_and_log_commands(mailstack: MailStack) -> None:
    """A message appended on the full listener is visible on the others; their commands are logged."""
    user = mailstack.new_user()
    with mailstack.admin_imap(user) as imap:
        imap.append("INBOX", make_message("a@example.org", user, "shared", "same mailbox"))
    with mailstack.admin_imap(user, variant="no_condstore") as imap:
        assert imap.select_folder("INBOX", readonly=True)[b"EXISTS"] == 1
    commands = mailstack.imap_commands(user)
    assert any(c.startswith("EXAMINE") for c in commands)
    assert not any("CONDSTORE" in c or "CHANGEDSINCE" in c for c in commands)


def test_delivered_mail_is_visible_over_imap(mailstack: MailStack) -> None:
    """SMTP injection on 11025 lands in the recipient's INBOX with headers intact."""
    user = mailstack.new_user()
    raw = make_message(
        "hr@example.org",
        user,
        "Interview",
        "Tuesday at 10?",
        html="<p>Tuesday at 10?</p>",
        attachments=[("cv.pdf", "application/pdf", b"%PDF-1.4 test")],
    )
    mailstack.deliver(user, raw)
    with mailstack.admin_imap(user) as imap:
        imap.select_folder("INBOX", readonly=True)
        (uid,) = imap.search(["SUBJECT", "Interview"])
        body = imap.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    assert b"cv.pdf" in body
    assert b"Tuesday at 10?" in body


def test_revoked_refresh_token_is_refused_with_invalid_grant(mailstack: MailStack) -> None:
    """After /admin/revoke, /token answers 400 invalid_grant and the token's access tokens stop working."""
    user = mailstack.new_user()
    refresh_token = mailstack.refresh_token(user)
    status, grant = _token_grant(mailstack, refresh_token)
    assert status == 200
    assert mailstack.token_calls(refresh_token) == 1
    mailstack.revoke(refresh_token)
    status, error = _token_grant(mailstack, refresh_token)
    assert (status, error["error"]) == (400, "invalid_grant")
    assert mailstack.token_calls(refresh_token) == 1
    with (
        IMAPClient(mailstack.host, mailstack.imap_port, ssl=False) as imap,
        pytest.raises(IMAPClient.Error, match=r"(?i)auth"),
    ):
        imap.oauth2_login(user, str(grant["access_token"]))


def test_access_ttl_can_be_shortened_per_user(mailstack: MailStack) -> None:
    """A per-user TTL makes access tokens from /token expire quickly; Dovecot then refuses them."""
    user = mailstack.new_user()
    mailstack.set_access_ttl(1, user=user)
    _status, grant = _token_grant(mailstack, mailstack.refresh_token(user))
    assert grant["expires_in"] == 1
    other_status, other = _token_grant(mailstack, mailstack.refresh_token(mailstack.new_user()))
    assert other_status == 200
    assert int(str(other["expires_in"])) > 60

    def refused() -> bool:
        with IMAPClient(mailstack.host, mailstack.imap_port, ssl=False) as imap:
            try:
                imap.oauth2_login(user, str(grant["access_token"]))
            except imap.Error:
                return True
            imap.logout()
            return False

    wait_for(refused, 5, interval=0.25, what="the 1 s access token to expire")


def test_submission_with_xoauth2_delivers_to_another_users_inbox(mailstack: MailStack) -> None:
    """Postfix on 11587 authenticates XOAUTH2 through Dovecot and delivers over LMTP."""
    sender, recipient = mailstack.new_user("s"), mailstack.new_user("r")
    _status, grant = _token_grant(mailstack, mailstack.refresh_token(sender))
    raw = make_message(sender, recipient, "Offer", "Welcome aboard")
    xoauth2 = f"user={sender}\x01auth=Bearer {grant['access_token']}\x01\x01"
    with smtplib.SMTP(mailstack.host, mailstack.submission_port, timeout=10) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=str(mailstack.ca_cert)))
        smtp.ehlo()
        code, _ = smtp.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2.encode()).decode())
        assert code == 235
        smtp.sendmail(sender, [recipient], raw)
    with mailstack.admin_imap(recipient) as imap:
        imap.select_folder("INBOX", readonly=True)
        wait_for(lambda: imap.search(["SUBJECT", "Offer"]), 10, what="submitted mail in the INBOX")


def test_bump_uidvalidity_is_seen_by_a_new_session(mailstack: MailStack) -> None:
    """doveadm changes UIDVALIDITY; messages keep their UIDs (the case a client must not trust)."""
    user = mailstack.new_user()
    mailstack.deliver(user, make_message("a@example.org", user, "one", "1"))
    with mailstack.admin_imap(user) as imap:
        before = imap.select_folder("INBOX")[b"UIDVALIDITY"]
        uids_before = imap.search("ALL")
    new = mailstack.bump_uidvalidity(user, "INBOX")
    assert new != before
    with mailstack.admin_imap(user) as imap:
        assert imap.select_folder("INBOX")[b"UIDVALIDITY"] == new
        assert imap.search("ALL") == uids_before
