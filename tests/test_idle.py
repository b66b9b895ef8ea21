"""Push: the IDLE watcher tells the daemon about new mail within seconds, on Dovecot and the Gmail-dialect server,
and survives a server that ends the session."""

from __future__ import annotations

import random
import select
import threading
import time

import pytest
import structlog
from imapclient.response_parser import parse_response

from gmail.server import GmailServer
from harness import MailStack, make_message
from inboxd.clock import SystemClock
from inboxd.idle import (
    POLL_OTHERS,
    IdleWatcher,
    backoff,
    is_bye,
    is_change,
    pending_change,
    polled_folders,
    read_ahead,
)
from inboxd.imap import ImapClientSession, ImapEndpoint, connect


def test_backoff_is_capped_exponential_with_jitter() -> None:
    rng = random.Random(7)
    waits = [backoff(n, base=1, cap=60, rng=rng) for n in range(1, 10)]
    assert 0.5 <= waits[0] <= 1
    assert all(w <= 60 for w in waits)
    assert waits[-1] >= 30


def test_is_change() -> None:
    assert is_change([(3, b"EXISTS")])
    assert is_change([(2, b"EXPUNGE")])
    assert not is_change([(3, b"RECENT")])
    assert not is_change([(b"OK", b"Still here")])
    assert not is_change([])
    assert is_bye([(b"BYE", b"Session expired, please login again.")])
    assert not is_bye([(3, b"EXISTS")])


@pytest.mark.parametrize(
    "line",
    [
        b"VANISHED 5",
        b"VANISHED 3:7,9",
        b"VANISHED (EARLIER) 1:3",
        b"2 EXPUNGE",
        b"4 FETCH (UID 9 MODSEQ (12) FLAGS (\\Seen))",
        b"12 EXISTS",
    ],
)
def test_is_change_knows_each_response_as_imapclient_parses_it(line: bytes) -> None:
    """idle_check hands over what imapclient's parser makes of each untagged line: `* 12 EXISTS` is (12, b"EXISTS"),
    but `* VANISHED 5` (RFC 7162: no number in front) is (b"VANISHED", 5), which the check of the second item took
    for no news."""
    assert is_change([parse_response([line])])


def test_pending_change_counts_what_imaplib_kept_while_out_of_idle() -> None:
    """imaplib's untagged dict after a DONE or STATUS: an EXISTS repeating the known count is no news, RECENT never
    is; what it held is taken out either way (it piled up for the connection's lifetime)."""
    pending: dict[str, list[object]] = {"EXISTS": [b"12"], "RECENT": [b"0"], "STATUS": [b"x"]}
    assert pending_change(pending, 12) == (False, 12)
    assert pending == {"STATUS": [b"x"]}
    assert pending_change({"EXISTS": [b"12", b"13"]}, 12) == (True, 13)
    assert pending_change({"EXPUNGE": [b"4"]}, 12) == (True, None), "the count is unknown after an EXPUNGE"
    assert pending_change({"VANISHED": [b"1:3"]}, 12) == (True, None)
    assert pending_change({"EXISTS": [b"garbage"]}, 12) == (True, 12)
    assert pending_change({}, None) == (False, None)
    assert pending_change({"EXPUNGE": [b"37"], "EXISTS": [b"100"]}, 100) == (True, 100)
    assert pending_change({"EXISTS": [b"100"]}, None) == (True, 100), "an unknown count: any EXISTS is news"


def test_polled_folders_take_sent_every_time_and_the_rest_in_turns() -> None:
    rest = [f"F{i:02}" for i in range(25)]
    assert polled_folders(["Sent"], ["A", "B"], "A", budget=10) == ["Sent", "A", "B"]
    assert polled_folders([], [], None) == []
    turns, after = [], None
    for _ in range(6):
        turns.append(polled_folders(["Sent"], rest, after, budget=10))
        after = turns[-1][-1]
    assert all(t[0] == "Sent" and len(t) == 11 for t in turns), "Sent each time, at most the budget besides"
    for start in range(len(turns) - 2):  # any 3 polls in a row (ceil(25 / 10)) check every folder
        assert {name for t in turns[start : start + 3] for name in t[1:]} == set(rest)
    assert turns[2][1:] == [*rest[20:], *rest[:5]], "the window wraps round"
    assert polled_folders([], rest, "F00", budget=1) == ["F01"]


def test_a_folder_added_or_removed_does_not_hold_up_the_others_turns() -> None:
    """The turns go by name: after a LIST adds folders (or takes some away) the next window starts after the last
    folder polled, so no folder waits more than one poll longer than ceil(n / budget)."""
    rest = [f"F{i:02}" for i in range(10)]
    first = polled_folders([], rest, None, budget=4)
    assert first == ["F00", "F01", "F02", "F03"]
    grown = sorted([*rest, "A-new", "Z-new"])
    assert polled_folders([], grown, first[-1], budget=4) == ["F04", "F05", "F06", "F07"]
    shrunk = [name for name in rest if name != "F04"]
    assert polled_folders([], shrunk, "F03", budget=4) == ["F05", "F06", "F07", "F08"]
    assert polled_folders([], shrunk, "F04", budget=4) == ["F05", "F06", "F07", "F08"], "the last one polled went"
    assert polled_folders([], rest, "F09", budget=4) == ["F00", "F01", "F02", "F03"]


def _session(stack: MailStack, user: str) -> ImapClientSession:
    """A session of ``user`` on the stack's Dovecot, beside the watcher's (another client, or the test's own)."""
    endpoint = ImapEndpoint(host=stack.host, port=stack.imap_port, tls="starttls", ca_file=stack.ca_cert, timeout=10)
    return connect(endpoint, username=user, access_token=lambda: stack.access_token(user))


def _inbox_pushes(stack: MailStack, user: str, changed: threading.Event) -> bool:
    """Whether mail delivered to INBOX now is noticed (the watcher is still in IDLE there)."""
    stack.deliver(user, make_message("c@example.org", user, "and INBOX still pushes", "x"), wait=False)
    return changed.wait(10)


def _watch(
    host: str,
    port: int,
    user: str,
    stack: MailStack,
    *,
    poll_others: float = POLL_OTHERS,
    poll_budget: int = 10,
    list_every: int = 10,
) -> tuple[IdleWatcher, threading.Event]:
    changed = threading.Event()
    endpoint = ImapEndpoint(host=host, port=port, tls="starttls", ca_file=stack.ca_cert, timeout=10)

    def session():  # type: ignore[no-untyped-def]
        return connect(endpoint, username=user, access_token=lambda: stack.access_token(user))

    watcher = IdleWatcher(
        user,
        session,
        changed.set,
        clock=SystemClock(),
        poll_others=poll_others,
        poll_budget=poll_budget,
        list_every=list_every,
    )
    watcher.start()
    assert watcher.idling.wait(10), "IDLE started"
    assert changed.is_set(), "a fresh connection catches up once (mail may have come before IDLE began)"
    changed.clear()
    return watcher, changed


@pytest.mark.mailstack
def test_dovecot_push_arrives_within_seconds(mailstack: MailStack) -> None:
    user = mailstack.new_user("idle")
    mailstack.deliver(user, make_message("c@example.org", user, "first", "x"))  # INBOX exists
    watcher, changed = _watch(mailstack.host, mailstack.imap_port, user, mailstack)
    try:
        started = time.monotonic()
        mailstack.deliver(user, make_message("c@example.org", user, "pushed", "x"), wait=False)
        assert changed.wait(10)
        assert time.monotonic() - started < 5
    finally:
        watcher.stop()


@pytest.mark.mailstack
@pytest.mark.parametrize("variant", ["full", "no_qresync"])
def test_a_message_deleted_from_inbox_while_the_watcher_idles_wakes_the_sync(
    mailstack: MailStack, variant: str
) -> None:
    """A mail the recruiter deletes from INBOX in another client must leave the HR app within seconds, not at the
    next sync.interval round. With QRESYNC enabled (``connect`` enables it where offered: "full") Dovecot reports
    the expunge to the idling watcher as `* VANISHED 1`, which the watcher used to take for no news; without
    QRESYNC as `* 1 EXPUNGE`. A flag change (read elsewhere) is a FETCH and wakes it too."""
    user = mailstack.new_user("idleexpunge")
    for subject in ("first", "second"):
        mailstack.deliver(user, make_message("c@example.org", user, subject, "x"))
    host = mailstack.imap_host(variant)
    # no poll of the other folders during the test: only the IDLE responses can wake the watcher
    watcher, changed = _watch(host, mailstack.imap_port, user, mailstack, poll_others=3600)
    endpoint = ImapEndpoint(host=host, port=mailstack.imap_port, tls="starttls", ca_file=mailstack.ca_cert, timeout=10)
    other_client = connect(endpoint, username=user, access_token=lambda: mailstack.access_token(user))
    try:
        assert other_client.capabilities.qresync == (variant == "full")
        client = other_client._client
        client.select_folder("INBOX")
        first, second = sorted(client.search(["ALL"]))
        client.add_flags([second], [b"\\Seen"])
        assert changed.wait(10), "the flag change (FETCH) woke the sync"
        changed.clear()
        assert watcher.idling.wait(10)
        client.delete_messages([first])
        client.expunge()
        assert changed.wait(10), "the expunge (VANISHED under QRESYNC, else EXPUNGE) woke the sync"
    finally:
        other_client.close()
        watcher.stop()


@pytest.mark.mailstack
def test_a_reply_sent_from_another_client_is_noticed_in_sent_within_the_poll(mailstack: MailStack) -> None:
    """IDLE watches INBOX; a recruiter's reply sent from Outlook or a phone lands in Sent, which IDLE never
    reports. The watcher checks Sent's STATUS between IDLE slices (every POLL_OTHERS, 30 s; 0.5 s here)."""
    user = mailstack.new_user("idlesent")
    mailstack.deliver(user, make_message("c@example.org", user, "first", "x"))
    watcher, changed = _watch(mailstack.host, mailstack.imap_port, user, mailstack, poll_others=0.5)
    other_client = _session(mailstack, user)
    try:
        assert not changed.wait(2.0), "several polls of an unchanged Sent are no news"
        assert watcher.idling.wait(5), "back in IDLE after each poll"
        other_client._client.append("Sent", make_message(user, "c@example.org", "Re: your application", "y"))
        assert changed.wait(10), "the reply in Sent was noticed"
        changed.clear()
        assert _inbox_pushes(mailstack, user, changed), "and INBOX still pushes"
    finally:
        other_client.close()
        watcher.stop()


@pytest.mark.mailstack
def test_mail_a_rule_files_into_another_folder_is_noticed_in_turn(mailstack: MailStack) -> None:
    """A server-side rule files a candidate's mail into a folder of its own, which IDLE on INBOX never reports. The
    folders besides Sent are polled a budget at a time (1 here, of 3): a change in the last of them is still
    noticed within a few polls; several polls of unchanged folders are no news."""
    user = mailstack.new_user("idlerule")
    mailstack.deliver(user, make_message("c@example.org", user, "first", "x"))
    other_client = _session(mailstack, user)
    for name in ("Alpha", "Beta", "Candidates"):
        other_client._client.create_folder(name)
    watcher, changed = _watch(mailstack.host, mailstack.imap_port, user, mailstack, poll_others=0.3, poll_budget=1)
    try:
        assert not changed.wait(2.0), "polls of unchanged folders are no news"
        other_client._client.append("Candidates", make_message("c@example.org", user, "Re: the offer", "y"))
        assert changed.wait(10), "the mail filed in Candidates was noticed"
        changed.clear()
        assert not changed.wait(1.5), "and once only"
    finally:
        other_client.close()
        watcher.stop()


@pytest.mark.mailstack
def test_a_folder_created_while_the_watcher_idles_is_found_by_its_list(mailstack: MailStack) -> None:
    """A folder made after the watcher connected (a new rule's target) is found by the LIST every few polls: its
    appearance is news (the account's sync takes it up), and from then on it is polled like the others."""
    user = mailstack.new_user("idlenew")
    mailstack.deliver(user, make_message("c@example.org", user, "first", "x"))
    other_client = _session(mailstack, user)
    watcher, changed = _watch(mailstack.host, mailstack.imap_port, user, mailstack, poll_others=0.3, list_every=2)
    try:
        with structlog.testing.capture_logs() as logs:
            other_client._client.create_folder("Later")
            assert changed.wait(10), "the new folder was found"
        assert [(e["added"], e["removed"]) for e in logs if e["event"] == "idle.folders_changed"] == [(1, 0)]
        changed.clear()
        assert not changed.wait(1.5), "found once"
        other_client._client.append("Later", make_message("c@example.org", user, "filed", "y"))
        assert changed.wait(10), "mail in the new folder was noticed"
    finally:
        other_client.close()
        watcher.stop()


@pytest.mark.mailstack
def test_a_folder_the_server_refuses_a_status_of_is_left_out_not_taken_for_a_lost_connection(
    mailstack: MailStack,
) -> None:
    """STATUS of a folder deleted or renamed meanwhile fails (NO): it is left out, logged once per connection, and
    is no news (the LIST finds a folder that went), instead of ending the watcher, and INBOX's push with it, to
    reconnect every 30 s."""
    user = mailstack.new_user("idlegone")
    session = _session(mailstack, user)
    watcher = IdleWatcher(user, lambda: session, lambda: None, clock=SystemClock())
    try:
        with structlog.testing.capture_logs() as logs:
            first = watcher._statuses(session, ["Sent", "No Such Folder"])
            again = watcher._statuses(session, ["Sent", "No Such Folder"])
        assert first == again and list(first) == ["Sent"]
        assert [e["folder"] for e in logs if e["event"] == "idle.status_failed"] == ["No Such Folder"]
        assert session.status("INBOX").messages == 0, "the connection is still good"
    finally:
        session.close()


@pytest.mark.mailstack
def test_a_folder_deleted_while_the_watcher_idles_is_news_once(mailstack: MailStack) -> None:
    """A folder deleted (or renamed) meanwhile: its STATUS is refused, which is no news, and the next LIST finds it
    gone, which is, once; the watcher stays in IDLE and INBOX still pushes."""
    user = mailstack.new_user("idledel")
    mailstack.deliver(user, make_message("c@example.org", user, "first", "x"))
    other_client = _session(mailstack, user)
    other_client._client.create_folder("Old rule")
    watcher, changed = _watch(mailstack.host, mailstack.imap_port, user, mailstack, poll_others=0.3, list_every=3)
    try:
        with structlog.testing.capture_logs() as logs:
            other_client._client.delete_folder("Old rule")
            assert changed.wait(10), "the folder's going was noticed"
            changed.clear()
            assert not changed.wait(2.0), "once"
        assert [(e["added"], e["removed"]) for e in logs if e["event"] == "idle.folders_changed"] == [(0, 1)]
        assert not [e for e in logs if e["event"] in ("idle.reconnect", "idle.crashed")]
        assert _inbox_pushes(mailstack, user, changed), "and INBOX still pushes"
    finally:
        other_client.close()
        watcher.stop()


@pytest.mark.mailstack
def test_read_ahead_sees_a_response_the_socket_poll_cannot(mailstack: MailStack) -> None:
    """A response imaplib has already read into its buffer (with the one before it) is invisible to a poll of the
    socket, which idle_check waits on: the watcher missed an EXISTS sent right after "+ idling" until the next
    renewal (seen in CI: a delivery at the moment IDLE restarted after a Sent poll)."""
    user = mailstack.new_user("readahead")
    session = _session(mailstack, user)
    try:
        client = session._client
        client.select_folder("INBOX")
        assert not read_ahead(client), "nothing sent: nothing to read, and no wait"
        client._imap.send(b"T1 NOOP\r\n")
        time.sleep(0.5)
        assert read_ahead(client), "the answer, in the socket"
        poller = select.poll()
        poller.register(client.socket().fileno(), select.POLLIN)
        assert not poller.poll(0), "read into the buffer: a poll of the socket no longer sees it"
        assert read_ahead(client), "but read_ahead does"
        while not client._imap._get_line().startswith(b"T1 OK"):
            pass
        assert not read_ahead(client)
    finally:
        session.close()


@pytest.mark.mailstack
def test_gmail_push_on_all_mail_and_reconnect_after_bye(mailstack: MailStack, gmail_server: GmailServer) -> None:
    user = mailstack.new_user("idlegm")
    watcher, changed = _watch("127.0.0.1", gmail_server.imap_port, user, mailstack)
    try:
        gmail_server.deliver(make_message("c@example.org", user, "pushed", "x"))
        assert changed.wait(10), "EXISTS in All Mail while idling"
        changed.clear()
        gmail_server.kick(user)  # the server ends the session: the watcher reconnects by itself
        gmail_server.deliver(make_message("c@example.org", user, "while away", "x"))
        assert changed.wait(15), "a reconnect catches up with what arrived meanwhile"
        changed.clear()
        assert watcher.idling.wait(15)
        gmail_server.deliver(make_message("c@example.org", user, "again", "x"))
        assert changed.wait(10), "and pushes again afterwards"
    finally:
        watcher.stop()
