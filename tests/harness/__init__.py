"""Test harness for inboxd: the loopback mail stack (Dovecot, Postfix, OAuth server) and message builders.

Tests get a running stack through the session fixture ``mailstack`` (tests/conftest.py).
"""

from harness.browser import Browser
from harness.mailstack import IMAP_VARIANTS, MailStack
from harness.messages import make_message
from harness.oauth import OAuthServer
from harness.waiting import wait_for

__all__ = ["IMAP_VARIANTS", "Browser", "MailStack", "OAuthServer", "make_message", "wait_for"]
