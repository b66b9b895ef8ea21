"""Unsolicited FETCH responses (RFC 3501 7.4.2): while a mailbox is selected, a server tells of flag changes made by
other clients with `* <seq> FETCH (FLAGS ...)`, also in the middle of our own UID FETCH. Without QRESYNC such a
response has no UID, only a sequence number; it must not be read as the message whose UID equals that number, nor
appear as a message we asked for. Against the real Dovecot, with and without QRESYNC enabled."""

from __future__ import annotations

import pytest

from harness import MailStack, make_message
from inboxd.imap import ImapClientSession, ImapEndpoint, connect

pytestmark = pytest.mark.mailstack


def session(stack: MailStack, user: str, variant: str) -> ImapClientSession:
    endpoint = ImapEndpoint(
        host=stack.imap_host(variant), port=stack.imap_port, tls="starttls", ca_file=stack.ca_cert, timeout=10
    )
    return connect(endpoint, username=user, access_token=lambda: stack.access_token(user))


@pytest.mark.parametrize("variant", ["full", "no_qresync"])
def test_another_clients_flag_change_is_not_taken_for_a_message_we_fetched(mailstack: MailStack, variant: str) -> None:
    user = mailstack.new_user()
    for n in range(1, 5):
        mailstack.deliver(user, make_message("cand@example.org", user, f"m{n}", "x"))
    with mailstack.admin_imap(user, variant=variant) as other:
        other.select_folder("INBOX")
        other.delete_messages([1])
        other.expunge()  # UIDs 2, 3, 4 are now at sequence numbers 1, 2, 3
    ours = session(mailstack, user, variant)
    try:
        ours.select("INBOX")
        with mailstack.admin_imap(user, variant=variant) as other:
            other.select_folder("INBOX")
            other.add_flags([4], [b"\\Flagged"])  # UID 4, sequence number 3
        headers = ours.fetch_headers([3], fields=False)
        assert sorted(headers) == [3], "only what was asked for"
        assert "\\Flagged" not in headers[3].flags, "UID 4's new flag was given to UID 3 (its sequence number is 3)"
        with mailstack.admin_imap(user, variant=variant) as other:
            other.select_folder("INBOX")
            other.add_flags([2], [b"\\Answered"])  # UID 2, sequence number 1
        bodies = ours.fetch_bodies([3])
        assert sorted(bodies) == [3]
        flags = {u.uid: u.flags for u in ours.all_flags(4)}
        assert "\\Flagged" in flags[4] and "\\Flagged" not in flags[3]
        assert "\\Answered" in flags[2] and "\\Answered" not in flags[3]
    finally:
        ours.close()
