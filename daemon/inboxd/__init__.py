"""inboxd: syncs recruiters' mailboxes (IMAP over XOAUTH2) into the SQL database an HR app reads."""

__version__ = "0.1.0"
