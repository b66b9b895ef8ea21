"""Shared fixtures: the loopback mail stack (session-scoped) and the harness import path."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

# tests/ on sys.path makes the harness package importable as `harness` (pyproject stays untouched)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gmail.server import GmailServer, IntrospectValidator
from harness import MailStack
from harness.browser import browser  # noqa: F401 (a fixture: importing it here offers it to every test)
from harness.oauth import oauth_server  # noqa: F401 (a fixture, as above)

# database fixtures (engine/store over SQLite and PostgreSQL) live in tests/dbs.py
pytest_plugins = ["dbs", "fs_calls", "secret_scan"]


@pytest.fixture(autouse=True)
def _isolated_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """inboxd's main() points structlog and the root logger at the (captured) stderr of the test that calls it; undo
    that after every test, so that no later one logs into a closed capture stream (which failed whichever test
    came next, depending on the order). INBOXD_CONFIG from the caller's shell must not leak into a test."""
    monkeypatch.delenv("INBOXD_CONFIG", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def mailstack() -> MailStack:
    """The running loopback Dovecot/Postfix/OAuth stack; started once per session if it is not up."""
    return MailStack.start()


@pytest.fixture
def gmail_server(mailstack: MailStack) -> Iterator[GmailServer]:
    """A fresh Gmail-dialect IMAP + SMTP server (tests/gmail/) on free loopback ports: plain IMAP with STARTTLS
    (``imap_port``), implicit TLS (``imaps_port``) and SMTP (``smtp_port``) with the stack's certificate; XOAUTH2
    tokens from ``mailstack.access_token(user)`` are checked at the stack's OAuth server, as Dovecot does."""
    tls = (mailstack.root / "tls" / "cert.pem", mailstack.root / "tls" / "key.pem")
    validator = IntrospectValidator(f"{mailstack.oauth_url}/introspect")
    with GmailServer(tls=tls, imaps_port=0, validator=validator) as server:
        yield server
