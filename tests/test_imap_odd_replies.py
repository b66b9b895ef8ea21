"""Odd replies from a server become errors that say what is wrong and what can fix it, never an "internal error"
that fails the account at every cycle: against a scripted IMAP server over a real socket (tests/harness/
scripted_imap.py), with the real imapclient."""

from __future__ import annotations

import pytest

from harness.scripted_imap import ScriptedImap
from inboxd.errors import AccountFailed, QuotaExceeded, RetryLater
from inboxd.imap import ImapClientSession, ImapEndpoint, connect
from inboxd.planner import FolderStatus


def endpoint(port: int, tls: str = "none") -> ImapEndpoint:
    return ImapEndpoint(host="127.0.0.1", port=port, tls=tls, ca_file=None, timeout=5)


def logged_in(server: ScriptedImap) -> ImapClientSession:
    return connect(endpoint(server.port), username="rita@example.test", password="secret")


def test_a_server_without_starttls_is_a_config_error_that_names_the_setting() -> None:
    """imaplib's plain "STARTTLS extension not supported" left the account in "internal error"."""
    with ScriptedImap(lambda _c, _a: None) as server:
        with pytest.raises(AccountFailed, match=r"refused STARTTLS.*imap_tls"):
            connect(endpoint(server.port, "starttls"), username="rita@example.test", password="secret")
        assert "LOGIN" not in server.commands, "no password over a plain connection"


def test_a_status_without_uidnext_plans_from_select() -> None:
    """A STATUS reply that leaves UIDNEXT out raised KeyError, which failed the whole account at every cycle. The
    missing value is -1, which no cursor holds: the folder is selected, and planned from SELECT's numbers."""

    def answer(command: str, _args: str) -> list[str] | None:
        if command == "STATUS":
            return ['* STATUS "INBOX" (UIDVALIDITY 7 MESSAGES 3)', "{tag} OK done"]
        return None

    with ScriptedImap(answer) as server:
        session = logged_in(server)
        try:
            assert session.status("INBOX") == FolderStatus(uidvalidity=7, uidnext=-1, messages=3, highest_modseq=None)
        finally:
            session.close()


def test_exchanges_authenticated_but_not_connected_names_the_missing_grant() -> None:
    """Exchange Online answers the first command after a login whose identity cannot open the mailbox (an app-only
    token without a mailbox permission; also, for a while, a mailbox being moved) with BAD "User is authenticated but
    not connected". It is retried after a backoff as before, but the error now says what to check, not the raw
    reply."""

    def answer(command: str, _args: str) -> list[str] | None:
        if command == "LIST":
            return ["{tag} BAD User is authenticated but not connected."]
        return None

    with ScriptedImap(answer) as server:
        session = logged_in(server)
        try:
            with pytest.raises(RetryLater, match="Add-MailboxPermission"):
                session.list_folders()
        finally:
            session.close()


def test_a_tls_handshake_cut_short_is_tried_again() -> None:
    """The peer hung up in the middle of the TLS handshake (a restart, a load balancer): a network failure, tried
    again after a backoff. Every TLS error was an admin's (state error) before."""
    with (
        ScriptedImap(lambda _c, _a: None, hang_up=True) as server,
        pytest.raises(RetryLater, match=r"TLS .* was cut short"),
    ):
        connect(endpoint(server.port, "tls"), username="rita@example.test", password="secret")


def test_a_fetch_refused_with_a_response_code_is_not_taken_for_a_partial_reply() -> None:
    """A FETCH of new messages that ends NO without a code (Gmail: "Some messages could not be FETCHed") gives the
    replies that came; one that ends NO [OVERQUOTA] (or [UNAVAILABLE], ...) is about the server: the quota pauses
    the account, as on any other command. Taken for a partial reply, it stored nothing and the sync succeeded."""

    def answer(command: str, args: str) -> list[str] | None:
        if command in ("SELECT", "EXAMINE"):
            return ["* 2 EXISTS", "* OK [UIDVALIDITY 7] ok", "* OK [UIDNEXT 3] ok", "{tag} OK [READ-ONLY] done"]
        if command == "UID FETCH" and args.startswith("1:2 "):
            reply = "* 1 FETCH (UID 1 FLAGS () BODY[] {{4}}\r\nabcd)"  # {{4}}: a literal, braces doubled for format()
            return [reply, "{tag} NO Some messages could not be FETCHed (Failure)"]
        if command == "UID FETCH":
            return ["{tag} NO [OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)"]
        return None

    with ScriptedImap(answer) as server:
        session = logged_in(server)
        try:
            session.select("INBOX")
            assert sorted(session.fetch_bodies([1, 2])) == [1], "the reply that came"
            with pytest.raises(QuotaExceeded):
                session.fetch_bodies([1])
        finally:
            session.close()
