"""Push on a server without IDLE: the watcher polls with NOOP on one connection instead of failing IDLE and
reconnecting in a loop. The server is the loopback Dovecot behind a proxy that takes IDLE out of its capabilities."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

import pytest
import structlog

from harness import MailStack, make_message
from harness.line_proxy import LineRewritingProxy
from harness.scripted_imap import ScriptedImap
from inboxd.clock import SystemClock
from inboxd.idle import IdleWatcher
from inboxd.imap import ImapClientSession, ImapEndpoint, connect

# " IDLE" as a word of a capability list, which ends at a space, "]" (a response code) or the line's end
_IDLE_CAPABILITY = re.compile(rb" IDLE(?=[ \]\r\n])")


def NoIdleServer(upstream_host: str, upstream_port: int) -> LineRewritingProxy:
    """Dovecot's plain port, with IDLE taken out of every capability list it sends (the greeting's, the login's
    response code, CAPABILITY replies), as from a server that has no IDLE."""
    return LineRewritingProxy(upstream_host, upstream_port, _without_idle)


def _without_idle(line: bytes) -> bytes:
    return _IDLE_CAPABILITY.sub(b"", line) if b"CAPABILITY" in line.upper() else line


def _session(stack: MailStack, user: str, port: int, tls: str) -> ImapClientSession:
    endpoint = ImapEndpoint(host=stack.host, port=port, tls=tls, ca_file=stack.ca_cert, timeout=10)
    return connect(endpoint, username=user, access_token=lambda: stack.access_token(user))


@contextlib.contextmanager
def _watching(stack: MailStack, user: str, port: int) -> Iterator[tuple[IdleWatcher, threading.Event]]:
    changed = threading.Event()
    watcher = IdleWatcher(
        user, lambda: _session(stack, user, port, "plain"), changed.set, clock=SystemClock(), poll_others=0.3
    )
    watcher.start()
    try:
        yield watcher, changed
    finally:
        watcher.stop()


def _watcher_events(logs: list[dict[str, object]]) -> list[object]:
    """What the watcher logged, but for each change it signalled (idle.changed, debug)."""
    return [e["event"] for e in logs if str(e["event"]).startswith("idle.") and e["event"] != "idle.changed"]


def test_the_proxy_hides_idle_and_nothing_else() -> None:
    assert _without_idle(b"* CAPABILITY IMAP4rev1 IDLE SORT\r\n") == b"* CAPABILITY IMAP4rev1 SORT\r\n"
    assert _without_idle(b"A1 OK [CAPABILITY IMAP4rev1 ENABLE IDLE] Logged in\r\n") == (
        b"A1 OK [CAPABILITY IMAP4rev1 ENABLE] Logged in\r\n"
    )
    assert _without_idle(b"* CAPABILITY IMAP4rev1 IDLE\r\n") == b"* CAPABILITY IMAP4rev1\r\n"
    assert _without_idle(b"* 1 FETCH (BODY[] {4}\r\n") == b"* 1 FETCH (BODY[] {4}\r\n"
    assert _without_idle(b"* CAPABILITY IMAP4rev1 IDLEX\r\n") == b"* CAPABILITY IMAP4rev1 IDLEX\r\n"


@pytest.mark.mailstack
def test_a_server_without_idle_is_polled_on_one_connection_not_reconnected_to(mailstack: MailStack) -> None:
    """On a server without IDLE, `idle()` failed and the watcher reconnected in a loop, each time logging in, taking
    a STATUS of every folder and firing a catch-up sync. Now it logs `idle.unsupported` once and polls on the same
    connection (every POLL_OTHERS, 30 s; 0.3 s here): a NOOP of INBOX, where the server tells new mail and
    deletions, and the STATUS of Sent and the other folders as with IDLE. Unchanged polls are no news."""
    user = mailstack.new_user("noidle")
    mailstack.deliver(user, make_message("c@example.org", user, "first", "x"))
    other_client = _session(mailstack, user, mailstack.imap_port, "starttls")  # beside the proxy: keeps IDLE
    try:
        with (
            NoIdleServer(mailstack.host, mailstack.imap_port) as server,
            structlog.testing.capture_logs() as logs,
            _watching(mailstack, user, server.port) as (_, changed),
        ):
            assert changed.wait(10), "a fresh connection catches up once"
            changed.clear()
            assert not changed.wait(3.0), "polls of an unchanged mailbox are no news (nor is a reconnect)"
            mailstack.deliver(user, make_message("c@example.org", user, "new", "x"), wait=False)
            assert changed.wait(10), "new mail in INBOX was noticed by the NOOP"
            changed.clear()
            client = other_client._client
            client.select_folder("INBOX")
            client.delete_messages(client.search(["SUBJECT", "first"]))
            client.expunge()
            assert changed.wait(10), "a deletion from INBOX was noticed by the NOOP"
            changed.clear()
            client.append("Sent", make_message(user, "c@example.org", "Re: your application", "y"))
            assert changed.wait(10), "a reply in Sent was noticed by the STATUS poll"
            changed.clear()
            assert not changed.wait(1.5), "each change once"
    finally:
        other_client.close()
    assert server.connections == 1, "one connection throughout"
    assert _watcher_events(logs) == ["idle.unsupported"]


@pytest.mark.mailstack
def test_a_lost_connection_to_a_server_without_idle_is_reopened_and_not_logged_as_unsupported_again(
    mailstack: MailStack,
) -> None:
    """A reconnect (the network dropped the connection) goes back to polling; `idle.unsupported` is said once per
    watcher, not on each connection."""
    user = mailstack.new_user("noidledrop")
    mailstack.deliver(user, make_message("c@example.org", user, "first", "x"))
    with (
        NoIdleServer(mailstack.host, mailstack.imap_port) as server,
        structlog.testing.capture_logs() as logs,
        _watching(mailstack, user, server.port) as (_, changed),
    ):
        assert changed.wait(10)
        changed.clear()
        server.drop()
        assert changed.wait(15), "reconnected, with a catch-up"
        changed.clear()
        mailstack.deliver(user, make_message("c@example.org", user, "new", "x"), wait=False)
        assert changed.wait(10), "and polls again"
    assert server.connections == 2
    assert _watcher_events(logs) == ["idle.unsupported", "idle.reconnect"]


def test_a_server_that_offers_idle_but_refuses_it_is_polled_on_the_same_connection() -> None:
    """IDLE in the capabilities, but the command answered NO (turned off for the mailbox): the watcher reconnected
    in a loop, each time catching up. It now polls with NOOP from then on, on the one connection, and a change a
    NOOP reports (EXISTS) reaches the daemon."""
    noops = 0
    fixed = {
        "LOGIN": ["{tag} OK [CAPABILITY IMAP4rev1 IDLE] logged in"],
        "CAPABILITY": ["* CAPABILITY IMAP4rev1 IDLE", "{tag} OK done"],
        "LIST": ['* LIST (\\HasNoChildren) "/" INBOX', "{tag} OK done"],
        "EXAMINE": ["* 2 EXISTS", "* OK [UIDVALIDITY 7] ok", "* OK [UIDNEXT 3] ok", "{tag} OK [READ-ONLY] done"],
        "IDLE": ["{tag} NO IDLE is not allowed for this mailbox"],
    }
    fixed["SELECT"] = fixed["EXAMINE"]

    def answer(command: str, _args: str) -> list[str] | None:
        nonlocal noops
        if command == "NOOP":
            noops += 1
            return (["* 3 EXISTS"] if noops == 3 else []) + ["{tag} OK done"]
        return fixed.get(command)

    changed = threading.Event()
    with ScriptedImap(answer) as server, structlog.testing.capture_logs() as logs:
        endpoint = ImapEndpoint(host="127.0.0.1", port=server.port, tls="plain", timeout=5)
        watcher = IdleWatcher(
            "refused@example.test",
            lambda: connect(endpoint, username="refused@example.test", password="x"),
            changed.set,
            clock=SystemClock(),
            poll_others=0.3,
        )
        watcher.start()
        try:
            assert changed.wait(10), "a fresh connection catches up once"
            changed.clear()
            assert changed.wait(10), "the EXISTS of the third NOOP"
        finally:
            watcher.stop()
    assert server.commands.count("LOGIN") == 1, server.commands
    assert server.commands.count("IDLE") == 1, "refused once, not sent again"
    assert [e.get("reason") for e in logs if e["event"] == "idle.unsupported"] == ["refused"]
    assert not [e for e in logs if e["event"] == "idle.reconnect"]
