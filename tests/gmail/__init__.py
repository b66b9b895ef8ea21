"""A Gmail-dialect IMAP + SMTP server for inboxd's tests: All Mail and label folders with their own UIDs,
X-GM-MSGID/THRID/LABELS, X-GM-RAW, CONDSTORE, IDLE, XOAUTH2, and injectable Gmail failures.

Start it with the ``gmail_server`` fixture (tests/conftest.py) or ``GmailServer(...).start()``.
"""

from gmail.model import GMAIL_NAMES, GOOGLE_MAIL_DE_NAMES, FolderNames
from gmail.server import FolderInfo, GmailServer, IntrospectValidator, MessageInfo

__all__ = [
    "GMAIL_NAMES",
    "GOOGLE_MAIL_DE_NAMES",
    "FolderInfo",
    "FolderNames",
    "GmailServer",
    "IntrospectValidator",
    "MessageInfo",
]
